"""Peer comparison: cai-ray's RL-CAI loop vs TRL's online DPO with an LLM-judge reward, on the same work.

Same on both sides: the model (float32), each iteration's prompts (the loop's own draw), 2 responses per
prompt (TRL's online DPO samples exactly 2), max new tokens, temperature 1.0, learning rate, DPO beta,
gradient clip, seed, 1 CPU thread per worker, and the judge: the constitution's multiple-choice
comparison ("(A)/(B)" with few-shot examples, one principle per pair drawn exactly as the feedback pool
draws it, both presentation orders averaged), scored from the option tokens' log-probs (TRL's judge gives the
FeedbackWorker's labels to 1e-10 on the tiny model: tests/integration/test_bench_suite.py checks it).
  cai-ray  ``rl_cai`` with learner.algorithm=dpo, schedule sync (and async): a vLLM rollout actor, the
           FeedbackPool's labels, the preference-model update, a DeepSpeed DPO step, the weight sync.
  TRL      ``trl.experimental.online_dpo.OnlineDPOTrainer``: HF ``generate`` in-process, the judge as a reward
           function on HF transformers in-process (a second copy of the model; it stays at the initial
           weights where cai-ray's self-labelling engine receives each update: the same compute), torch AdamW.
           Run with TRL's defaults (gradient checkpointing on, which also turns the KV cache off during
           generation) and with gradient checkpointing off; ratios
           are quoted against the faster of the two.
Differences left in on purpose (each framework's own design): cai-ray also updates a preference model each
iteration (the iteration time without ``pm_update`` is reported too) and pushes weights into separate
engines; TRL's reward functions are pointwise, so the judge's soft label p for a pair becomes rewards
(p, 1 - p) and TRL trains on the hard chosen/rejected choice, where cai-ray trains on the soft label.
Iteration time: wall seconds between consecutive iterations (cai-ray: metrics records; TRL: ``on_step_end``),
first ``--warmup`` iterations dropped; whole runs alternate (cai-ray, TRL defaults, TRL no-GC, ...) for
``--reps``, with this process at the Ray workers' niceness.

    python -m benchmarks.bench_peer [--quick] [--model tiny-random-llama] [--reps 3] [--iterations 8]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_loop import add_loop_args, check_loop_args, loop_config, run_loop  # noqa: E402
from benchmarks.common import RESULTS_DIR, command_line, match_actor_niceness, summary, write_result  # noqa: E402

TRL_VARIANTS = {"trl_defaults": True, "trl_no_gradient_checkpointing": False}  # name -> gradient checkpointing


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loop_args(p)
    p.add_argument("--reps", type=int, default=3, help="runs of each side (alternating)")
    p.add_argument("--schedules", default="sync,async", help="cai-ray schedules to run (comma-separated)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON")
    args = p.parse_args(argv)
    if args.samples != 2:
        raise SystemExit("--samples must be 2: TRL's online DPO samples exactly 2 responses per prompt")
    if args.quick:
        args.reps, args.iterations, args.prompts, args.max_new_tokens, args.schedules = 1, 3, 4, 8, "sync"
    check_loop_args(args)
    return args


# ------------------------------------------------------------------------------------- the judge
class ConstitutionJudge:
    """TRL reward function: the feedback pool's multiple-choice label, computed with HF transformers in-process.

    TRL's ``OnlineDPOTrainer`` calls it with ``2 * prompts``: completion ``i`` and ``i + B`` are the two samples
    of prompt ``i``. It returns ``p`` for the first and ``1 - p`` for the second, ``p`` being the swap-debiased
    probability that the first is better under a principle drawn as :class:`FeedbackWorker` draws it.
    """

    __name__ = "constitution_judge"

    def __init__(self, model: Any, constitution: Any, num_few_shot: int, seed: int) -> None:
        import torch

        from cai_ray.inference.feedback import option_continuations

        self.model = model.causal_lm(dtype=torch.float32).eval()  # model: a cai_ray.models.ModelRef
        self.tokenizer = model.tokenizer()
        self.constitution, self.num_few_shot, self.seed = constitution, num_few_shot, seed
        option_a, option_b = option_continuations(lambda s: self.tokenizer.encode(s, add_special_tokens=False))
        if len(option_a) != 1 or len(option_b) != 1:
            raise SystemExit("the judge assumes single-token options (true for the built-in models)")
        self.options = (option_a[0], option_b[0])
        self.calls = 0

    def __call__(self, prompts: list[Any], completions: list[Any], user_text: list[str], **_: Any) -> list[float]:
        from cai_ray.constitution import comparison_prompt
        from cai_ray.seeds import stable_seed
        from cai_ray.inference.labels import option_probability, preference_label

        b = len(prompts) // 2
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        rendered = []
        for i in range(b):
            rng = random.Random(stable_seed(self.seed, "comparison", f"trl/{self.calls}/{i}", 0))
            [principle] = self.constitution.sample_principles(rng, "comparison", 1, None)
            for x, y in ((texts[i], texts[i + b]), (texts[i + b], texts[i])):
                rendered.append(comparison_prompt(self.tokenizer, self.constitution, principle, prompt=user_text[i],
                                                  response_a=x, response_b=y, num_few_shot=self.num_few_shot))
        self.calls += 1
        first = [option_probability(a, bb) for a, bb in self._option_logprobs(rendered)]
        probs = [preference_label([first[2 * i]], [first[2 * i + 1]]) for i in range(b)]
        return probs + [1.0 - p for p in probs]

    def _option_logprobs(self, texts: list[str]) -> list[tuple[float, float]]:
        """Log-probs of the two option tokens after each text: one left-padded batched forward."""
        import torch

        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                use_cache=False).logits[:, -1].float()
        logp = logits.log_softmax(-1)
        a, b = self.options
        return [(float(row[a]), float(row[b])) for row in logp]


# ---------------------------------------------------------------------------------------- TRL side
def run_trl(cfg: Any, prompts_per_iteration: list[list[Any]], *, gradient_checkpointing: bool, warmup: int,
            threads: int) -> dict[str, Any]:
    """One TRL online-DPO run of ``len(prompts_per_iteration)`` steps; per-step wall seconds."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from cai_ray.constitution import load_constitution, render_chat
    from cai_ray.models import ModelRef

    torch.set_num_threads(threads)
    ref = ModelRef.of(cfg.models.policy)
    tokenizer = ref.tokenizer()
    # Prompts go in already rendered with the chat template exactly as the rollout worker renders them.
    rows = [{"prompt": render_chat(tokenizer, [{"role": "user", "content": p.text}]), "user_text": p.text}
            for batch in prompts_per_iteration for p in batch]
    judge = ConstitutionJudge(ref, load_constitution(cfg.constitution.path), cfg.constitution.num_few_shot,
                              cfg.seed)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.stamps.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.stamps.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="cai-ray-bench-trl-") as tmp:
        learner = cfg.learner
        config = OnlineDPOConfig(
            output_dir=tmp, per_device_train_batch_size=len(prompts_per_iteration[0]), gradient_accumulation_steps=1,
            max_steps=len(prompts_per_iteration), learning_rate=learner.lr, beta=learner.dpo_beta,
            max_grad_norm=learner.grad_clip, weight_decay=learner.weight_decay,
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            max_length=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
            gradient_checkpointing=gradient_checkpointing, bf16=False, fp16=False, use_cpu=True, seed=cfg.seed,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
            train_sampling_strategy="sequential", lr_scheduler_type="constant",  # cai-ray's learner: constant lr
        )
        model = ref.causal_lm(dtype=torch.float32)
        trainer = OnlineDPOTrainer(model=model, reward_funcs=judge, args=config, processing_class=tokenizer,
                                   train_dataset=Dataset.from_list(rows), callbacks=[clock])
        trainer.train()
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    measured = steps[warmup:]
    return {"gradient_checkpointing": gradient_checkpointing, "steps_s": steps, "warmup_steps": warmup,
            "median_iteration_s": statistics.median(measured), "judge_calls": judge.calls}


# -------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns the result (also written as JSON + PNG under ``--out``)."""
    args = parse_args(argv)
    import ray

    from cai_ray.launcher import init_ray
    from cai_ray.models import resolve_model
    from cai_ray.pipelines.rl_cai import _iteration_prompts, _prompt_pool

    resolve_model(args.model)
    schedules = args.schedules.split(",")
    configs = {s: loop_config(args, f"schedule.mode={s}", "learner.algorithm=dpo") for s in schedules}
    base = configs[schedules[0]]
    init_ray(base.cluster)
    class Probe:  # an idle actor, only to read the niceness Ray gives its workers (local: pickled by value)
        pass

    probe = ray.remote(num_cpus=0)(Probe).remote()
    niceness = match_actor_niceness(probe)
    ray.kill(probe)
    pool = _prompt_pool(base)
    prompts = [_iteration_prompts(base, pool, it) for it in range(args.iterations)]
    threads = int(base.rollout.resources.num_cpus)

    runs: dict[str, list[dict[str, Any]]] = {f"cai_ray_{s}": [] for s in schedules} | {v: [] for v in TRL_VARIANTS}
    for rep in range(args.reps):
        for s, cfg in configs.items():
            run = run_loop(cfg, warmup=args.warmup)
            measured = [it for it in run["iterations"] if it["measured"]]
            run["median_iteration_without_pm_update_s"] = statistics.median(
                it["wall_s"] - it["phases_s"].get("pm_update", 0.0) for it in measured)
            runs[f"cai_ray_{s}"].append(run)
            print(f"rep {rep} cai-ray {s}: median iteration {run['median_iteration_s']:.3f}s", flush=True)
        for name, gc in TRL_VARIANTS.items():
            run = run_trl(base, prompts, gradient_checkpointing=gc, warmup=args.warmup, threads=threads)
            runs[name].append(run)
            print(f"rep {rep} {name}: median iteration {run['median_iteration_s']:.3f}s", flush=True)

    iteration = {name: [r["median_iteration_s"] for r in rs] for name, rs in runs.items()}
    faster_trl = min(TRL_VARIANTS, key=lambda v: statistics.median(iteration[v]))
    ratios = {}
    for s in schedules:
        ours = iteration[f"cai_ray_{s}"]
        no_pm = [r["median_iteration_without_pm_update_s"] for r in runs[f"cai_ray_{s}"]]
        ratios[s] = {
            "vs_faster_trl": statistics.median(a / b for a, b in zip(ours, iteration[faster_trl])),
            **{f"vs_{v}": statistics.median(a / b for a, b in zip(ours, iteration[v])) for v in TRL_VARIANTS},
            "without_pm_update_vs_faster_trl": statistics.median(a / b for a, b in zip(no_pm, iteration[faster_trl])),
        }
    result: dict[str, Any] = {
        "settings": {"model": args.model, "reps": args.reps, "iterations_per_run": args.iterations,
                     "warmup_iterations": args.warmup, "prompts_per_iteration": args.prompts,
                     "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                     "dtype": base.models.policy.dtype, "threads_per_worker": threads, "lr": base.learner.lr,
                     "dpo_beta": base.learner.dpo_beta, "cai_ray_schedules": schedules, "niceness": niceness,
                     "trl_version": importlib.metadata.version("trl"),
                     "trl_trainer": "trl.experimental.online_dpo.OnlineDPOTrainer",
                     "judge": "constitution multiple-choice comparison, 1 principle, swap-debiased, option log-probs "
                              "(cai-ray: FeedbackPool on vLLM; TRL: reward function on HF transformers)"},
        "definitions": {"iteration_s": "wall seconds per iteration (median over the measured iterations of a run)",
                        "ratio": "cai-ray iteration time / TRL iteration time, median over repetitions "
                                 "(below 1: cai-ray is faster)"},
        "runs": runs,
        "iteration_s": {name: summary(v) for name, v in iteration.items()},
        "faster_trl_variant": faster_trl,
        "ratios": ratios,
    }
    path = write_result("peer", result, quick=args.quick, out_dir=Path(args.out),
                        command=command_line("benchmarks.bench_peer", argv))
    plot(result, path.with_suffix(".png"))
    result["json"] = str(path)
    for s in schedules:
        print(f"cai-ray {s} / TRL ({faster_trl}) iteration time: {ratios[s]['vs_faster_trl']:.3f}")
    print(f"wrote {path}")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Median iteration time of each side (min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["iteration_s"])
    med = [result["iteration_s"][n]["median"] for n in names]
    lo = [m - result["iteration_s"][n]["min"] for m, n in zip(med, names)]
    hi = [result["iteration_s"][n]["max"] - m for m, n in zip(med, names)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, med, yerr=[lo, hi], capsize=3,
           color=["tab:blue" if n.startswith("cai_ray") else "tab:orange" for n in names])
    s = result["settings"]
    ax.set_ylabel("seconds per iteration (median, min-max over runs)")
    ax.set_title(f"online DPO with an LLM judge: cai-ray vs TRL {s['trl_version']} ({s['model']}, "
                 f"{s['prompts_per_iteration']}x2 samples, {s['max_new_tokens']} tokens)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
