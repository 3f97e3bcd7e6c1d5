"""Learner throughput: LearnerGroup.update vs a plain DeepSpeed loop on the same model, batch and ZeRO stage.

A (cai-ray): the controller calls ``LearnerGroup.update(sft_update, seqs)`` (Ray fan-out of the update
function, per-rank sharding, collation, ``LearnerWorker.train_step``'s micro-batching, the pure ``sft_loss``)
and times each call end to end. ``sft_update`` is written here, as any update function would be: the product's
SFT stage is a Ray Train job of its own, and the RL updates need rewards or labels.
B (baseline): the same number of ranks as plain Ray actors that only host a hand-written DeepSpeed loop
(``deepspeed.initialize`` with the same ds_config and a torch AdamW, pre-collated tensors, HF-style
cross-entropy with ignore_index, ``backward``/``step``), timed inside rank 0 between two barriers.
Both see the same rows per rank and count real (non-pad) tokens. After a warm-up, A and B alternate
(A B A B ...) and the JSON reports every repetition, min/median/max and the median ratio A/B.

    python -m benchmarks.bench_learner [--quick] [--reps 7] [--steps 10] [--warmup 5] [--set learner.deepspeed.zero_stage=3]

The work comes from the config (default the quickstart): the model (``models.policy``), ranks, ZeRO stage, rows
per rank (``learner.micro_batch_size``) and learning rate (``learner.*``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bench_config, bench_parser, command_line, summary, write_result  # noqa: E402
from cai_ray import launcher  # noqa: E402
from cai_ray.config import LearnerConfig  # noqa: E402
from cai_ray.models import ModelRef  # noqa: E402
from cai_ray.types import TrainSequence  # noqa: E402


class PlainDeepSpeedLoop:
    """Baseline rank: a textbook DeepSpeed training loop over pre-collated tensors."""

    def __init__(self, *, rank: int, world_size: int, learner: LearnerConfig, model: ModelRef, seed: int) -> None:
        self.rank, self.world_size, self.learner = rank, world_size, learner
        self.model, self.seed = model, seed
        self.store = None

    def open_rendezvous(self) -> tuple[str, int]:
        from cai_ray.training.engine import open_store

        self.store, addr, port = open_store(self.world_size, timeout_s=self.learner.collective_timeout_s)
        return addr, port

    def setup(self, addr: str, port: int, seqs: list[TrainSequence]) -> None:
        import deepspeed
        import torch

        from cai_ray.training.engine import ds_config, init_distributed
        from cai_ray.training.modeling import collate_sequences

        init_distributed(backend="gloo", rank=self.rank, world_size=self.world_size, master_addr=addr,
                         master_port=port, timeout_s=self.learner.collective_timeout_s, store=self.store)
        torch.manual_seed(self.seed)
        model = self.model.causal_lm(dtype=torch.float32)
        optim = self.learner.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        config = ds_config(self.learner.deepspeed, micro_batch_size=len(seqs), grad_clip=optim.grad_clip,
                           world_size=self.world_size, dtype=torch.float32)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        batch = collate_sequences(seqs, pad_id=0)
        labels = batch.input_ids.clone()
        labels[:, 1:][batch.loss_mask == 0] = -100
        labels[:, 0] = -100
        self.input_ids, self.attention_mask, self.labels = batch.input_ids, batch.attention_mask, labels

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` optimizer steps, between barriers (rank 0's clock)."""
        import torch
        import torch.nn.functional as F

        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            logits = self.engine(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), self.labels[:, 1:].flatten(),
                                   ignore_index=-100)
            self.engine.backward(loss)
            self.engine.step()
        torch.distributed.barrier()
        return time.perf_counter() - start


def sft_update(worker: Any, seqs: list[TrainSequence], num_valid: int) -> dict[str, float]:
    """Runs on every learner rank: one optimizer step of masked-token NLL on the responses."""
    from cai_ray.algorithms.sft import sft_loss

    batch = worker.sequences(seqs, num_valid)

    def loss_fn(start: int, stop: int) -> tuple[Any, dict[str, float], int]:
        mb = batch.rows(start, stop).to(worker.device)
        logits = worker.policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        loss, metrics = sft_loss(logits=logits[:, :-1], labels=mb.labels, loss_mask=mb.loss_mask)
        return loss, metrics, int(mb.valid.sum())

    return worker.train_step(worker.policy, num_items=batch.num_rows, num_valid=num_valid, loss_fn=loss_fn)


def make_batch(num_rows: int, *, vocab: int, prompt_len: tuple[int, int], response_len: tuple[int, int],
               seed: int) -> list[TrainSequence]:
    rng = random.Random(seed)
    return [TrainSequence(prompt_token_ids=tuple(rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_len))),
                          response_token_ids=tuple(rng.randrange(4, vocab) for _ in range(rng.randint(*response_len))))
            for _ in range(num_rows)]


# The work, as config values over --config (default the quickstart); rows per rank = learner.micro_batch_size.
DEFAULTS = ("learner.num_ranks=2", "learner.deepspeed.zero_stage=2", "learner.micro_batch_size=8",
            "learner.optim.lr=1e-5",
            "cluster.step_timeout_s=1800")
QUICK = ("learner.micro_batch_size=2",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, reps=7, warmup=5, warmup_help="untimed optimizer steps of each side before timing")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per repetition")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.warmup = min(args.reps, 2), 2, 1
    args.cfg = bench_config(args, DEFAULTS, QUICK)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    learner, rows_per_rank = args.cfg.learner, args.cfg.learner.micro_batch_size

    import ray
    from ray import cloudpickle

    from cai_ray.models import resolve_model
    from cai_ray.training.group import LearnerGroup
    from cai_ray.training.learner import LearnerRoles
    from cai_ray.training.modeling import shard

    policy = args.cfg.models.policy
    model_path = resolve_model(policy.name, revision=policy.revision)
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    lengths = ((8, 16), (8, 24)) if args.quick else ((32, 96), (32, 160))
    seqs = make_batch(rows_per_rank * learner.num_ranks, vocab=vocab, prompt_len=lengths[0],
                      response_len=lengths[1], seed=0)
    tokens_per_step = sum(len(s.prompt_token_ids) + len(s.response_token_ids) for s in seqs)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the ranks run sft_update without this module
    cluster = args.cfg.cluster  # both sides' ranks at once
    cluster = cluster.model_copy(update={"num_cpus": max(cluster.num_cpus or 0, 2 * learner.num_ranks)})
    launcher.init_ray(cluster)

    models = args.cfg.models.model_copy(update={"policy": policy.model_copy(update={"name": model_path})})
    group = LearnerGroup(learner, models, cluster, seed=0, roles=LearnerRoles(reference=False))
    plain = [launcher.spawn(PlainDeepSpeedLoop, rank=i, world_size=learner.num_ranks, learner=learner,
                            model=ModelRef(model_path, revision=None, trust_remote_code=policy.trust_remote_code),
                            seed=0, role="learner", resources=learner.resources)
             for i in range(learner.num_ranks)]
    names = [f"plain rank {i}" for i in range(learner.num_ranks)]
    try:
        addr, port = launcher.get(plain[0].open_rendezvous.remote(), timeout=cluster.startup, what="plain rank 0")
        shards = shard(seqs, learner.num_ranks)
        launcher.get_all([p.setup.remote(addr, port, part) for p, (part, _) in zip(plain, shards, strict=True)],
                         timeout=cluster.startup, names=names)

        def run_learner(steps: int) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                group.update(sft_update, seqs)
            return time.perf_counter() - start

        def run_plain(steps: int) -> float:
            return launcher.get_all([p.run.remote(steps) for p in plain], timeout=cluster.step, names=names)[0]

        run_learner(args.warmup)
        run_plain(args.warmup)
        reps = []
        for rep in range(args.reps):
            t_learner = run_learner(args.steps)
            t_plain = run_plain(args.steps)
            a = tokens_per_step * args.steps / t_learner
            b = tokens_per_step * args.steps / t_plain
            reps.append({"rep": rep, "learner_s": t_learner, "plain_s": t_plain, "learner_tokens_per_s": a,
                         "plain_tokens_per_s": b, "ratio": a / b})
            print(f"rep {rep}: learner {a:,.0f} tok/s  plain {b:,.0f} tok/s  ratio {a / b:.3f}", flush=True)
    finally:
        group.shutdown()
        for p in plain:
            ray.kill(p)

    stage = learner.deepspeed.resolved_stage(learner.num_ranks)  # 'auto' resolved, as both sides ran it
    result: dict[str, Any] = {
        "comparison": "LearnerGroup.update (an SFT step) vs a plain DeepSpeed loop",
        "config": {"model": policy.name, "model_path": model_path, "zero_stage": stage,
                   "num_ranks": learner.num_ranks, "rows_per_rank": rows_per_rank,
                   "tokens_per_step": tokens_per_step, "steps_per_rep": args.steps, "warmup_steps": args.warmup,
                   "reps": args.reps, "dtype": "float32", "threads_per_rank": learner.resources.num_cpus},
        "repetitions": reps,
        "learner_tokens_per_s": summary([r["learner_tokens_per_s"] for r in reps]),
        "plain_tokens_per_s": summary([r["plain_tokens_per_s"] for r in reps]),
        "ratio": summary([r["ratio"] for r in reps]),
        "median_ratio": statistics.median(r["ratio"] for r in reps),
    }
    path = write_result(f"learner-zero{stage}", result, quick=args.quick, out_dir=Path(args.out),
                        command=command_line("benchmarks.bench_learner", argv))
    result["json"] = str(path)
    print(f"median ratio learner/plain = {result['median_ratio']:.3f}  ->  {path}")
    return result


if __name__ == "__main__":
    main()
