"""Peer comparison: cai-ray's RL-CAI loop vs TRL's online DPO with an LLM-judge reward, on the same work.

Same on both sides: the model (float32), each iteration's prompts (the loop's own draw), 2 responses per
prompt (TRL's online DPO samples exactly 2), max new tokens, temperature 1.0, learning rate, DPO beta,
gradient clip, seed, the whole machine (cai-ray: threads follow the layout, so each sync phase uses every
core; TRL: torch's default thread count, every core; ``--trl-threads`` pins it), and the judge: the
constitution's multiple-choice comparison ("(A)/(B)" with few-shot examples, one principle per pair drawn
exactly as the feedback pool draws it, both presentation orders averaged), scored from the option tokens' log-probs (TRL's judge gives the
FeedbackWorker's labels to 1e-10 on the tiny model: tests/integration/test_bench_suite.py checks it).
  cai-ray  ``rl_cai`` with learner.algorithm=dpo, schedule sync (and async): a vLLM rollout actor, the
           FeedbackPool's labels, a DeepSpeed DPO step, the weight sync.
  TRL      ``trl.experimental.online_dpo.OnlineDPOTrainer``: HF ``generate`` in-process, the judge as a reward
           function on HF transformers in-process (a second copy of the model; it stays at the initial
           weights where cai-ray's self-labelling engine receives each update: the same compute), torch AdamW.
           Run with TRL's defaults (gradient checkpointing on, which also turns the KV cache off during
           generation) and with gradient checkpointing off; ratios
           are quoted against the faster of the two.
Differences left in on purpose (each framework's own design): cai-ray pushes weights into separate
engines (no preference model in its DPO loop: ``schedule.preference_model=auto``); TRL's reward functions
are pointwise, so the judge's soft label p for a pair becomes rewards (p, 1 - p) and TRL trains on the hard chosen/rejected choice, where cai-ray trains on the soft label.
Iteration time: wall seconds between consecutive iterations (cai-ray: metrics records; TRL: ``on_step_end``),
with each side's phases (``phase_medians_s``), first ``--warmup`` iterations dropped; whole runs alternate (cai-ray, TRL defaults, TRL no-GC, ...) for
``--reps``, with this process at the Ray workers' niceness.

    python -m benchmarks.bench_peer [--quick] [--reps 3] [--warmup 1] [--set schedule.num_iterations=8]
        [--schedules sync,async] [--trl-variants trl_defaults,trl_no_gradient_checkpointing] [--trl-threads 0]

The work comes from the config, as in bench_loop (``rollout.num_samples_per_prompt`` must stay 2).
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

from benchmarks.bench_loop import check_loop_args, loop_config, loop_parser, phase_medians, run_loop  # noqa: E402
from benchmarks.common import command_line, figure, match_actor_niceness, summary, write_result  # noqa: E402

TRL_VARIANTS = {"trl_defaults": True, "trl_no_gradient_checkpointing": False}  # name -> gradient checkpointing


PEER_QUICK = ("schedule.num_iterations=3", "schedule.num_prompts_per_iteration=4", "rollout.max_new_tokens=8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = loop_parser(__doc__)
    p.add_argument("--schedules", default="sync,async", help="cai-ray schedules to run (comma-separated)")
    p.add_argument("--trl-variants", default=",".join(TRL_VARIANTS),
                   help=f"TRL configurations to run (comma-separated, of {', '.join(TRL_VARIANTS)}; empty: none)")
    p.add_argument("--trl-threads", type=int, default=0,
                   help="torch threads of the TRL process (0: torch's default, every core, as a TRL user gets it)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.schedules = 1, "sync"
    cfg = peer_config(args)
    if cfg.rollout.num_samples_per_prompt != 2:
        raise SystemExit("rollout.num_samples_per_prompt must be 2: TRL's online DPO samples exactly 2 responses "
                         "per prompt")
    unknown = [v for v in _names(args.trl_variants) if v not in TRL_VARIANTS]
    if unknown:
        raise SystemExit(f"--trl-variants: unknown {unknown}; choose from {list(TRL_VARIANTS)}")
    if not _names(args.schedules) and not _names(args.trl_variants):
        raise SystemExit("nothing to run: --schedules and --trl-variants are both empty")
    check_loop_args(args, cfg)
    return args


def peer_config(args: argparse.Namespace, *fixed: str) -> Any:
    """The loop's config on this comparison's work; DPO as shipped: no preference model in the loop (the
    quickstart config keeps one as a monitor)."""
    return loop_config(args, "learner.algorithm=dpo", "schedule.preference_model=auto", *fixed, quick=PEER_QUICK)


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t.strip()]


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

        from cai_ray.inference.label_modes import option_continuations

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
TRL_PHASES = ("generate", "judge", "policy_forward", "reference_forward", "backward")  # the rest: "other"


def timed_trainer(base: type, timer: Any) -> type:
    """``base`` (TRL's OnlineDPOTrainer) with its phases timed into ``timer`` (a cai_ray PhaseTimer)."""

    class TimedOnlineDPOTrainer(base):  # type: ignore[misc, valid-type]
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            with timer.phase("generate"):
                return super()._generate(*args, **kwargs)

        def _forward(self, model: Any, *args: Any, **kwargs: Any) -> Any:
            with timer.phase("reference_forward" if model is self.ref_model else "policy_forward"):
                return super()._forward(model, *args, **kwargs)

        def _calculate_rewards_from_functions(self, *args: Any, **kwargs: Any) -> Any:
            with timer.phase("judge"):
                return super()._calculate_rewards_from_functions(*args, **kwargs)

    return TimedOnlineDPOTrainer


def _time_backward(trainer: Any, timer: Any) -> None:
    backward = trainer.accelerator.backward

    def timed(loss: Any, **kwargs: Any) -> Any:
        with timer.phase("backward"):
            return backward(loss, **kwargs)

    trainer.accelerator.backward = timed


def run_trl(cfg: Any, prompts_per_iteration: list[list[Any]], *, gradient_checkpointing: bool, warmup: int,
            threads: int) -> dict[str, Any]:
    """One TRL online-DPO run of ``len(prompts_per_iteration)`` steps; per-step wall seconds and phases.

    ``threads`` 0 leaves torch at its default (every core of the machine, what a TRL user gets).
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from cai_ray.constitution import load_constitution, render_chat
    from cai_ray.metrics import PhaseTimer
    from cai_ray.models import ModelRef

    if threads:
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
            self.timer = PhaseTimer()
            self.phases: list[dict[str, float]] = []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.stamps.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.stamps.append(time.perf_counter())
            self.phases.append(dict(self.timer.seconds))
            self.timer.seconds.clear()

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="cai-ray-bench-trl-") as tmp:
        learner = cfg.learner
        config = OnlineDPOConfig(
            output_dir=tmp, per_device_train_batch_size=len(prompts_per_iteration[0]), gradient_accumulation_steps=1,
            max_steps=len(prompts_per_iteration), learning_rate=learner.optim.lr, beta=learner.dpo.beta,
            max_grad_norm=learner.optim.grad_clip, weight_decay=learner.optim.weight_decay,
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            max_length=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
            gradient_checkpointing=gradient_checkpointing, bf16=False, fp16=False, use_cpu=True, seed=cfg.seed,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
            train_sampling_strategy="sequential", lr_scheduler_type="constant",  # cai-ray's learner: constant lr
        )
        model = ref.causal_lm(dtype=torch.float32)
        trainer = timed_trainer(OnlineDPOTrainer, clock.timer)(
            model=model, reward_funcs=judge, args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_list(rows), callbacks=[clock])
        _time_backward(trainer, clock.timer)
        trainer.train()
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    for wall, phases in zip(steps, clock.phases):
        phases["other"] = wall - sum(phases.values())  # optimizer step, tokenising, the Trainer's own work
    measured = steps[warmup:]
    return {"gradient_checkpointing": gradient_checkpointing, "threads": torch.get_num_threads(), "steps_s": steps,
            "phases_s": clock.phases, "warmup_steps": warmup, "median_iteration_s": statistics.median(measured),
            "phase_medians_s": _medians(clock.phases[warmup:]), "judge_calls": judge.calls}


def _medians(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Median of each key over ``rows`` (0 where a row lacks it)."""
    keys = sorted({k for row in rows for k in row})
    return {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys} if rows else {}


# -------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns the result (also written as JSON + PNG under ``--out``)."""
    args = parse_args(argv)
    import ray

    from cai_ray.launcher import init_ray
    from cai_ray.models import resolve_model
    from cai_ray.pipelines.rl_cai import _iteration_prompts, _prompt_pool

    schedules, variants = _names(args.schedules), _names(args.trl_variants)
    configs = {s: peer_config(args, f"schedule.mode={s}") for s in schedules or ["sync"]}
    base = next(iter(configs.values()))
    resolve_model(base.models.policy.name, revision=base.models.policy.revision)
    init_ray(base.cluster)
    class Probe:  # an idle actor, only to read the niceness Ray gives its workers (local: pickled by value)
        pass

    probe = ray.remote(num_cpus=0)(Probe).remote()
    niceness = match_actor_niceness(probe)
    ray.kill(probe)
    pool = _prompt_pool(base)
    prompts = [_iteration_prompts(base, pool, it) for it in range(base.schedule.num_iterations)]

    runs: dict[str, list[dict[str, Any]]] = {f"cai_ray_{s}": [] for s in schedules} | {v: [] for v in variants}
    for rep in range(args.reps):
        for s in schedules:
            run = run_loop(configs[s], warmup=args.warmup)
            measured = [it for it in run["iterations"] if it["measured"]]
            run["median_iteration_without_pm_update_s"] = statistics.median(
                it["wall_s"] - it["phases_s"].get("pm_update", 0.0) for it in measured)
            runs[f"cai_ray_{s}"].append(run)
            print(f"rep {rep} cai-ray {s}: median iteration {run['median_iteration_s']:.3f}s", flush=True)
        for name in variants:
            run = run_trl(base, prompts, gradient_checkpointing=TRL_VARIANTS[name], warmup=args.warmup,
                          threads=args.trl_threads)
            runs[name].append(run)
            print(f"rep {rep} {name}: median iteration {run['median_iteration_s']:.3f}s "
                  f"({run['threads']} threads)", flush=True)

    iteration = {name: [r["median_iteration_s"] for r in rs] for name, rs in runs.items()}
    result: dict[str, Any] = {
        "settings": {"model": base.models.policy.name, "reps": args.reps,
                     "iterations_per_run": base.schedule.num_iterations, "warmup_iterations": args.warmup,
                     "prompts_per_iteration": base.schedule.num_prompts_per_iteration,
                     "samples_per_prompt": base.rollout.num_samples_per_prompt,
                     "max_new_tokens": base.rollout.max_new_tokens, "seed": base.seed,
                     "dtype": base.models.policy.dtype, "lr": base.learner.optim.lr, "dpo_beta": base.learner.dpo.beta,
                     "cai_ray_schedules": schedules, "trl_variants": variants, "niceness": niceness,
                     "cai_ray_threads": "rollout/feedback/learner resources.num_threads 'auto' (backend.layout_threads)",
                     "cai_ray_preference_model": base.schedule.preference_model,
                     "trl_threads": args.trl_threads or "torch default",
                     "trl_version": importlib.metadata.version("trl"),
                     "trl_trainer": "trl.experimental.online_dpo.OnlineDPOTrainer",
                     "judge": "constitution multiple-choice comparison, 1 principle, swap-debiased, option log-probs "
                              "(cai-ray: FeedbackPool on vLLM; TRL: reward function on HF transformers)"},
        "definitions": {"iteration_s": "wall seconds per iteration (median over the measured iterations of a run)",
                        "phase_medians_s": "per side, the median seconds of each phase over the measured iterations "
                                           "(cai-ray: the loop's timing/*; TRL: generate, judge, policy and reference "
                                           "forwards, backward, other = optimizer step and the Trainer's own work)",
                        "ratio": "cai-ray iteration time / TRL iteration time, median over repetitions "
                                 "(below 1: cai-ray is faster)"},
        "runs": runs,
        "iteration_s": {name: summary(v) for name, v in iteration.items()},
        "phase_medians_s": _side_phases(runs),
    }
    if schedules and variants:
        result |= _ratios(runs, iteration, schedules, variants)
    path = write_result("peer", result, quick=args.quick, out_dir=Path(args.out),
                        command=command_line("benchmarks.bench_peer", argv))
    plot(result, path.with_suffix(".png"))
    result["json"] = str(path)
    for s in schedules if variants else ():
        print(f"cai-ray {s} / TRL ({result['faster_trl_variant']}) iteration time: "
              f"{result['ratios'][s]['vs_faster_trl']:.3f}")
    print(f"wrote {path}")
    return result


def _side_phases(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Each side's phase medians over the measured iterations of all its runs."""
    out = {}
    for name, rs in runs.items():
        if name.startswith("cai_ray_"):
            out[name] = phase_medians(rs)
        else:
            out[name] = _medians([p for r in rs for p in r["phases_s"][r["warmup_steps"]:]])
    return out


def _ratios(runs: dict[str, list[dict[str, Any]]], iteration: dict[str, list[float]], schedules: Sequence[str],
            variants: Sequence[str]) -> dict[str, Any]:
    """cai-ray / TRL iteration-time ratios, paired by repetition, against each variant and the faster one."""
    faster = min(variants, key=lambda v: statistics.median(iteration[v]))
    ratios = {}
    for s in schedules:
        ours = iteration[f"cai_ray_{s}"]
        no_pm = [r["median_iteration_without_pm_update_s"] for r in runs[f"cai_ray_{s}"]]
        ratios[s] = {
            "vs_faster_trl": statistics.median(a / b for a, b in zip(ours, iteration[faster])),
            **{f"vs_{v}": statistics.median(a / b for a, b in zip(ours, iteration[v])) for v in variants},
            "without_pm_update_vs_faster_trl": statistics.median(a / b for a, b in zip(no_pm, iteration[faster])),
        }
    return {"faster_trl_variant": faster, "ratios": ratios}


def plot(result: dict[str, Any], path: Path) -> None:
    """Median iteration time of each side (min-max bars)."""
    with figure(path, figsize=(7, 4)) as ax:
        _plot_sides(ax, result)


def _plot_sides(ax: Any, result: dict[str, Any]) -> None:
    names = list(result["iteration_s"])
    med = [result["iteration_s"][n]["median"] for n in names]
    lo = [m - result["iteration_s"][n]["min"] for m, n in zip(med, names)]
    hi = [result["iteration_s"][n]["max"] - m for m, n in zip(med, names)]
    ax.bar(names, med, yerr=[lo, hi], capsize=3,
           color=["tab:blue" if n.startswith("cai_ray") else "tab:orange" for n in names])
    s = result["settings"]
    ax.set_ylabel("seconds per iteration (median, min-max over runs)")
    ax.set_title(f"online DPO with an LLM judge: cai-ray vs TRL {s['trl_version']}\n({s['model']}, "
                 f"{s['prompts_per_iteration']}x2 samples, {s['max_new_tokens']} tokens)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)


if __name__ == "__main__":
    main()
