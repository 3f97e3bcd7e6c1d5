"""End-to-end RL-CAI iteration time by phase: the synchronous vs the asynchronous schedule, in one run.

The quickstart loop (configs/quickstart-cpu.yaml, or ``--config``: tiny model, SL skipped so RL starts from the
built-in policy, online DPO from AI labels, the policy labelling itself) runs ``schedule.num_iterations``
iterations with ``schedule.mode=sync`` and with ``async``, alternating whole runs (sync, async, sync, async, ...)
for ``--reps`` runs each. When both schedules give the roles the same thread layout (``--quick`` sets
``*.resources.num_threads=reserved``) one set of roles serves every run; with the default ``auto`` each schedule
lays out the threads its own way and every run starts its roles. Every run drops its first ``--warmup``
iterations (first-call warm-ups) and its last
(it also saves the end-of-run checkpoint; mid-run checkpoints are off).

Per iteration it records
  wall    seconds between the run's consecutive metrics records: all the controller does in an
          iteration, untimed bookkeeping included (start-up is excluded);
  phases  the loop's own ``timing/<phase>``: generate, label, pm_update, policy_update, idle (async: waiting
          for the overlapped generation to end before the weight sync), sync, checkpoint (label files).
It reports per-phase medians, each schedule's median iteration time, their ratio (paired by repetition),
and the async target
  async_iteration <= 1.15 * max(generate, train),   train = label + pm_update + policy_update + sync,
with generate and train taken from the sync runs' medians: in sync mode nothing overlaps, so those are
each phase's own cost (in async mode generation hides behind training and its timer sees only the wait).

    python -m benchmarks.bench_loop [--quick] [--reps 3] [--warmup 1] [--set schedule.num_iterations=8]

The work comes from the config: model, iterations, prompts per iteration, samples, response length, seed
(``models.policy``, ``schedule.*``, ``rollout.*``, ``seed``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bench_config, bench_parser, command_line, figure, summary, write_result  # noqa: E402

PHASES = ("generate", "label", "pm_update", "policy_update", "idle", "sync", "checkpoint")  # the loop's timers
TRAIN_PHASES = ("label", "pm_update", "policy_update", "sync")
ASYNC_TARGET = 1.15


# The work, as config values over --config (shared with bench_peer: the same loop on the same work).
LOOP_DEFAULTS = ("schedule.num_iterations=8", "schedule.num_prompts_per_iteration=8",
                 "rollout.num_samples_per_prompt=2", "rollout.max_new_tokens=32")
# One thread layout for both schedules: the smoke starts the roles once.
LOOP_QUICK = ("schedule.num_iterations=3", "schedule.num_prompts_per_iteration=4", "rollout.max_new_tokens=16",
              *(f"{role}.resources.num_threads=reserved" for role in ("rollout", "feedback", "learner")))
# What the measurement fixes: no mid-run checkpoints (the final one comes after the last record), no wandb, no bar.
LOOP_FIXED = (f"schedule.checkpoint_every={10**6}", "logging.wandb_mode=disabled", "logging.progress=false",
              "cluster.num_cpus=8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = loop_parser(__doc__)
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
    check_loop_args(args, loop_config(args))
    return args


def loop_parser(doc: str) -> argparse.ArgumentParser:
    """Arguments shared with bench_peer: the common set, with the warm-up counted in iterations."""
    return bench_parser(doc, reps=3, warmup=1, warmup_help="first iterations of each run left out")


def check_loop_args(args: argparse.Namespace, cfg: Any) -> None:
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1: iteration 0 has no previous record to time it from")
    if cfg.schedule.num_iterations < args.warmup + 2:
        raise SystemExit(f"schedule.num_iterations ({cfg.schedule.num_iterations}) must be at least --warmup + 2: "
                         "the warm-up and the last iteration (end-of-run checkpoint) are not measured")


def loop_config(args: argparse.Namespace, *fixed: str, quick: Sequence[str] = LOOP_QUICK) -> Any:
    """The loop config of this benchmark's work: ``--config`` with the loop's defaults, ``quick`` sizes, ``--set``,
    then ``fixed`` (e.g. the schedule compared)."""
    return bench_config(args, LOOP_DEFAULTS, quick, fixed=(*LOOP_FIXED, *fixed))


def run_loop(cfg: Any, *, warmup: int, roles: Any = None) -> dict[str, Any]:
    """Run ``rl_cai`` once in a scratch folder (on ``roles`` if given, else starting its own); per-iteration wall
    time and phases, which ones are measured."""
    from cai_ray.metrics import read_metrics
    from cai_ray.pipelines.rl_cai import rl_cai

    with tempfile.TemporaryDirectory(prefix="cai-ray-bench-loop-") as tmp:
        start = time.time()
        history = rl_cai(cfg, Path(tmp), roles=roles)
        stamps = [m["time"] for m in read_metrics(Path(tmp) / "metrics.jsonl")]
    iterations = []
    for i, m in enumerate(history):
        phases = {k.removeprefix("timing/"): v for k, v in m.items() if k.startswith("timing/")}
        wall = stamps[i] - stamps[i - 1] if i else None
        iterations.append({"iteration": i, "measured": warmup <= i < len(history) - 1, "wall_s": wall,
                           "phases_s": phases, "other_s": wall - sum(phases.values()) if wall is not None else None,
                           "samples": m["samples/count"], "labels": m["labels/count"]})
    measured = [it for it in iterations if it["measured"]]
    return {"startup_and_first_iteration_s": stamps[0] - start, "iterations": iterations,
            "median_iteration_s": statistics.median(it["wall_s"] for it in measured)}


def run_alternating(configs: dict[str, Any], *, reps: int, warmup: int) -> dict[str, list[dict[str, Any]]]:
    """``reps`` runs of each schedule, alternating. When both schedules give the roles the same thread layout,
    one set of roles serves every run (start-up is not measured either way); else each run starts its own."""
    from cai_ray.backend import layout_threads
    from cai_ray.pipelines.roles import role_mismatches, start_roles

    same = not role_mismatches(*(layout_threads(cfg, "rl") for cfg in configs.values()))
    roles = start_roles(configs["sync"]) if same else None
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in configs}
    try:
        for rep in range(reps):
            for mode, cfg in configs.items():
                run = run_loop(cfg, warmup=warmup, roles=roles)
                runs[mode].append(run)
                print(f"rep {rep} {mode}: median iteration {run['median_iteration_s']:.3f}s", flush=True)
    finally:
        if roles is not None:
            roles.shutdown()
    return runs


def phase_medians(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median of each phase (and of the untimed rest) over the measured iterations of ``runs``."""
    measured = [it for run in runs for it in run["iterations"] if it["measured"]]
    names = list(PHASES) + sorted({p for it in measured for p in it["phases_s"]} - set(PHASES))
    out = {p: statistics.median(it["phases_s"].get(p, 0.0) for it in measured) for p in names}
    out["other"] = statistics.median(it["other_s"] for it in measured)
    out["train"] = statistics.median(sum(it["phases_s"].get(p, 0.0) for p in TRAIN_PHASES) for it in measured)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result (also written as JSON + PNG under ``--out``)."""
    args = parse_args(argv)
    from cai_ray.launcher import init_ray
    from cai_ray.models import resolve_model

    configs = {mode: loop_config(args, f"schedule.mode={mode}") for mode in ("sync", "async")}
    base = configs["sync"]
    resolve_model(base.models.policy.name, revision=base.models.policy.revision)  # once, outside any timing
    init_ray(configs["sync"].cluster)
    runs = run_alternating(configs, reps=args.reps, warmup=args.warmup)

    phases = {mode: phase_medians(r) for mode, r in runs.items()}
    iteration = {mode: [r["median_iteration_s"] for r in rs] for mode, rs in runs.items()}
    generate, train = phases["sync"]["generate"], phases["sync"]["train"]
    async_iter = statistics.median(iteration["async"])
    result: dict[str, Any] = {
        "settings": {"model": base.models.policy.name, "algorithm": base.learner.algorithm, "reps": args.reps,
                     "iterations_per_run": base.schedule.num_iterations, "warmup_iterations": args.warmup,
                     "prompts_per_iteration": base.schedule.num_prompts_per_iteration,
                     "samples_per_prompt": base.rollout.num_samples_per_prompt,
                     "max_new_tokens": base.rollout.max_new_tokens, "seed": base.seed, "base_config": args.config,
                     "threads_per_actor": configs["sync"].rollout.resources.num_cpus,
                     "threads": base.rollout.resources.num_threads,
                     "config_sync": configs["sync"].model_dump(mode="json")},
        "definitions": {
            "wall_s": "seconds between consecutive metrics records of a run (one whole iteration)",
            "measured": "iterations after --warmup, except the last (it saves the end-of-run checkpoint)",
            "other": "wall_s minus the sum of the timed phases (untimed controller work)",
            "train": "label + pm_update + policy_update + sync (per iteration, median)",
            "async_target": "median async iteration <= 1.15 * max(generate, train), generate and train being "
                            "the sync runs' phase medians (the phases' own costs, nothing overlapped)",
            "median_ratio_async_vs_sync": "median over repetitions of async / sync median iteration time "
                                          "(below 1: async is faster)",
        },
        "runs": runs,
        "phase_medians_s": phases,
        "iteration_s": {mode: summary(v) for mode, v in iteration.items()},
        "median_ratio_async_vs_sync": statistics.median(a / s for a, s in zip(iteration["async"], iteration["sync"])),
        "async_target": {"generate_s": generate, "train_s": train, "max_s": max(generate, train),
                         "bound_s": ASYNC_TARGET * max(generate, train), "async_iteration_s": async_iter,
                         "ratio_to_max": async_iter / max(generate, train), "target": ASYNC_TARGET,
                         "met": async_iter <= ASYNC_TARGET * max(generate, train)},
    }
    path = write_result("loop", result, quick=args.quick, out_dir=Path(args.out),
                        command=command_line("benchmarks.bench_loop", argv))
    plot(result, path.with_suffix(".png"))
    result["json"] = str(path)
    t = result["async_target"]
    print(f"iteration sync {statistics.median(iteration['sync']):.3f}s, async {async_iter:.3f}s "
          f"(ratio {result['median_ratio_async_vs_sync']:.3f}); async / max(generate {generate:.3f}, "
          f"train {train:.3f}) = {t['ratio_to_max']:.3f} (target <= {ASYNC_TARGET}) -> {path}")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Stacked median phases per schedule, with the async bound."""
    with figure(path, figsize=(6, 4.5)) as ax:
        _plot_phases(ax, result)


def _plot_phases(ax: Any, result: dict[str, Any]) -> None:
    modes = ["sync", "async"]
    bottom = [0.0, 0.0]
    for phase in [p for p in result["phase_medians_s"]["sync"] if p != "train"]:
        values = [max(result["phase_medians_s"][m].get(phase, 0.0), 0.0) for m in modes]
        ax.bar(modes, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(modes, [result["iteration_s"][m]["median"] for m in modes], color="black", zorder=3,
               label="median iteration (wall)")
    t = result["async_target"]
    ax.axhline(t["max_s"], color="grey", linestyle=":", label="max(generate, train)")
    ax.axhline(t["bound_s"], color="red", linestyle="--", label=f"async target {t['target']} x max")
    ax.set_ylabel("seconds per iteration (median)")
    s = result["settings"]
    ax.set_title(f"RL-CAI iteration by phase ({s['model']}, {s['prompts_per_iteration']}x{s['samples_per_prompt']} "
                 f"samples, {s['max_new_tokens']} tokens)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


if __name__ == "__main__":
    main()
