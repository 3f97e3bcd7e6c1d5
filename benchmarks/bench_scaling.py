"""Throughput vs number of rollout and feedback workers, on a multi-node Ray topology on one machine.

``ray.cluster_utils.Cluster`` starts a head raylet with no CPUs (the driver only) and ``max(--workers)`` worker
raylets of ``--cpus-per-node`` logical CPUs: separate raylets, object stores and schedulers, as on a real
cluster, but every node shares this machine's cores. The largest fleets start once, spread over the nodes
(placement strategy SPREAD), each actor with 1 CPU (1 thread):
  rollout   the iteration's prompts split evenly over the first n RolloutWorkers, as the RL loop does; the
            unit is real generated tokens (per-prompt seeds, so every n generates the same tokens);
  feedback  a FeedbackPool over the first n FeedbackWorkers labels a fresh set of pairs (multiple choice,
            swap-debiased); the unit is labelled pairs.
After one warm-up of every n, repetitions alternate over n (1, 2, 1, 2, ...). Reported: min/median/max
throughput per n, the speed-up over 1 worker (paired by repetition) and its efficiency (speed-up / n).
The bound is the hardware, not the topology: with C usable cores no fleet beats min(n, C) x one worker, and
the driver and Ray's own processes share the same cores.

Needs its own process (one Ray per process): ``python -m benchmarks.bench_scaling [--quick] [--workers 1,2,4]``.
The work comes from the config (default the quickstart): model, prompts per repetition
(``schedule.num_prompts_per_iteration``), samples and length (``rollout.*``), the pool's batch (``feedback.*``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bench_config, bench_parser, command_line, figure, summary, write_result  # noqa: E402

# The work, as config values over --config (default the quickstart): every actor 1 CPU (1 thread), spread.
DEFAULTS = ("schedule.num_prompts_per_iteration=32", "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=32",
            "rollout.resources.num_cpus=1", "feedback.resources.num_cpus=1", "feedback.batch_size=8",
            "feedback.max_in_flight_per_worker=2", "feedback.label_mode=multiple_choice", "feedback.swap_debias=true",
            "cluster.placement_strategy=SPREAD", "cluster.startup_timeout_s=900", "cluster.step_timeout_s=900")
QUICK = ("schedule.num_prompts_per_iteration=4", "rollout.num_samples_per_prompt=2", "rollout.max_new_tokens=8",
         "feedback.batch_size=2")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, reps=3)
    p.add_argument("--workers", default="1,2,4", help="worker counts to measure (comma-separated)")
    p.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs of each worker raylet")
    p.add_argument("--pairs", type=int, default=48, help="pairs labelled per repetition")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.workers, args.pairs = 1, "1,2", 4
    args.cfg = bench_config(args, DEFAULTS, QUICK)
    args.counts = sorted({int(n) for n in args.workers.split(",")})
    if args.counts[0] < 1:
        raise SystemExit("--workers: counts must be >= 1")
    return args


def measure(sides: dict[int, Callable[[int], float]], reps: int) -> dict[int, list[tuple[float, float]]]:
    """One warm-up of each worker count, then ``reps`` rounds over the counts; (seconds, units) per rep."""
    for n, side in sides.items():
        side(-1)
    runs: dict[int, list[tuple[float, float]]] = {n: [] for n in sides}
    for rep in range(reps):
        for n, side in sides.items():
            start = time.perf_counter()
            units = side(rep)
            runs[n].append((time.perf_counter() - start, units))
    return runs


def points(runs: dict[int, list[tuple[float, float]]]) -> list[dict[str, Any]]:
    """Throughput per worker count, speed-up over the smallest count (paired by repetition), efficiency."""
    base_n = min(runs)
    base = [u / s for s, u in runs[base_n]]
    out = []
    for n, reps in runs.items():
        per_s = [u / s for s, u in reps]
        speedup = statistics.median(a / b for a, b in zip(per_s, base))
        out.append({"workers": n, "seconds": [s for s, _ in reps], "units": [u for _, u in reps], "per_s": per_s,
                    "summary": summary(per_s), f"speedup_vs_{base_n}": speedup, "efficiency": speedup * base_n / n})
    return out


def measure_rollout(workers: Sequence[Any], prompts: Sequence[Any], counts: Sequence[int], reps: int,
                    cluster: Any) -> tuple[dict[int, list[tuple[float, float]]], bool]:
    """Generated tokens per repetition with the prompts split over the first n workers; and whether every n
    generated the same tokens (per-prompt seeds make the work identical)."""
    from cai_ray.launcher import get_all

    tokens: dict[int, list[float]] = {n: [] for n in counts}

    def side(n: int) -> Callable[[int], float]:
        def run(rep: int) -> float:
            refs = [w.generate.remote(list(prompts[i::n]), seed=rep) for i, w in enumerate(workers[:n])]
            batches = get_all(refs, timeout=cluster.step, names=[f"rollout worker {i}" for i in range(n)])
            tokens[n].append(float(sum(len(s.response_token_ids) for b in batches for s in b.samples)))
            return tokens[n][-1]
        return run

    runs = measure({n: side(n) for n in counts}, reps)
    return runs, len({tuple(v) for v in tokens.values()}) == 1


def fresh_pairs(worker: Any, records: Sequence[Any], counts: Sequence[int], reps: int,
                cluster: Any) -> dict[tuple[int, int], list[Any]]:
    """A new set of pairs for every (repetition, count), sampled up front (untimed): a pair labelled twice would
    come from the prefix cache and measure nothing. One pair per prompt: its first two samples."""
    import ray

    from cai_ray.types import ComparisonRequest, Prompt

    prompts = [Prompt(r.id, r.prompt) for r in records]
    sets = {}
    for rep in range(-1, reps):
        for n in counts:
            batch = ray.get(worker.generate.remote(prompts, seed=10_000 + 100 * (rep + 1) + n),
                            timeout=cluster.step_timeout_s)
            by_prompt: dict[str, list[Any]] = {}
            for s in batch.samples:
                by_prompt.setdefault(s.prompt_id, []).append(s)
            sets[(rep, n)] = [ComparisonRequest(f"r{rep}n{n}/{pid}", g[0].prompt, g[0].response_text,
                                                g[1].response_text) for pid, g in by_prompt.items()]
    return sets


def measure_feedback(workers: Sequence[Any], feedback: Any, pair_sets: dict[tuple[int, int], list[Any]],
                     counts: Sequence[int], reps: int,
                     cluster: Any) -> tuple[dict[int, list[tuple[float, float]]], int]:
    """Labelled pairs per repetition through a FeedbackPool over the first n workers; and the item errors."""
    from cai_ray.inference.feedback_pool import FeedbackPool

    pools = {n: FeedbackPool(workers[:n], feedback, cluster) for n in counts}
    errors = [0]

    def side(n: int) -> Callable[[int], float]:
        def run(rep: int) -> float:
            labels = pools[n].label_pairs(pair_sets[(rep, n)])
            errors[0] += sum(lab.error is not None for lab in labels)
            return float(len(labels))
        return run

    return measure({n: side(n) for n in counts}, reps), errors[0]


def _node_of(actor: Any) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result (also written as JSON + PNG under ``--out``)."""
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise SystemExit("bench_scaling starts its own multi-node Ray: run it in a fresh process "
                         "(python -m benchmarks.bench_scaling), not next to another Ray session")
    from cai_ray.data import load_prompts
    from cai_ray.inference.feedback import start_feedback_pool
    from cai_ray.inference.rollout import start_rollout_workers
    from cai_ray.launcher import init_ray
    from cai_ray.models import resolve_model
    from cai_ray.types import Prompt

    cfg = args.cfg
    model = cfg.models.policy
    resolve_model(model.name, revision=model.revision)
    num_nodes = max(args.counts)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 256 << 20})
    for _ in range(num_nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, object_store_memory=256 << 20)
    cluster.wait_for_nodes()
    cluster_cfg = cfg.cluster.model_copy(update={"address": cluster.address})
    init_ray(cluster_cfg)
    # The largest fleets start once; each count uses its first n workers.
    rollout_cfg = cfg.rollout.model_copy(update={"num_workers": num_nodes})
    feedback_cfg = cfg.feedback.model_copy(update={"num_workers": num_nodes})
    fleet = pool = None
    try:
        fleet = start_rollout_workers(model, rollout_cfg, cfg.data, cluster_cfg, seed=cfg.seed)
        pool = start_feedback_pool(model, feedback_cfg, cfg.constitution, cfg.data, cluster_cfg, seed=cfg.seed)
        placement = {"rollout": [_node_of(w) for w in fleet.workers], "feedback": [_node_of(w) for w in pool.workers]}
        records = load_prompts("redteam_train") + load_prompts("helpful_train")
        prompts = [Prompt(r.id, r.prompt) for r in records[: cfg.schedule.num_prompts_per_iteration]]

        rollout_runs, same_tokens = measure_rollout(fleet.workers, prompts, args.counts, args.reps, cluster_cfg)
        pair_sets = fresh_pairs(fleet.workers[0], records[: args.pairs], args.counts, args.reps, cluster_cfg)
        feedback_runs, label_errors = measure_feedback(pool.workers, feedback_cfg, pair_sets, args.counts, args.reps,
                                                       cluster_cfg)
    finally:
        if pool is not None:
            pool.shutdown()
        if fleet is not None:
            fleet.shutdown()
        ray.shutdown()
        cluster.shutdown()

    cores = len(os.sched_getaffinity(0))
    result: dict[str, Any] = {
        "settings": {"model": model.name, "reps": args.reps, "worker_counts": args.counts,
                     "prompts_per_rep": cfg.schedule.num_prompts_per_iteration,
                     "samples_per_prompt": rollout_cfg.num_samples_per_prompt,
                     "max_new_tokens": rollout_cfg.max_new_tokens, "pairs_per_rep": args.pairs,
                     "feedback_batch_size": feedback_cfg.batch_size,
                     "threads_per_actor": rollout_cfg.resources.num_cpus, "seed": cfg.seed},
        "topology": {"head_node_cpus": 0, "worker_nodes": num_nodes, "cpus_per_node": args.cpus_per_node,
                     "placement_strategy": cluster_cfg.placement_strategy,
                     "distinct_nodes": {role: len(set(nodes)) for role, nodes in placement.items()},
                     "actor_nodes": placement},
        "rollout": {"unit": "generated tokens", "points": points(rollout_runs),
                    "same_tokens_for_every_count": same_tokens},
        "feedback": {"unit": "labelled pairs (both orders)", "points": points(feedback_runs),
                     "label_errors": label_errors},
        "bound": {"usable_cores": cores, "ideal_speedup": {n: min(n, cores) for n in args.counts},
                  "note": f"{num_nodes} raylets share this machine's {cores} cores: no count can beat "
                          f"min(n, {cores}) x one worker, and Ray's own processes and the driver use the same cores"},
    }
    path = write_result("scaling", result, quick=args.quick, out_dir=Path(args.out),
                        command=command_line("benchmarks.bench_scaling", argv))
    plot(result, path.with_suffix(".png"))
    result["json"] = str(path)
    for role in ("rollout", "feedback"):
        print(f"{role}: " + ", ".join(f"{p['workers']} workers {p['summary']['median']:.1f}/s "
                                      f"(x{p['speedup_vs_' + str(min(args.counts))]:.2f})"
                                      for p in result[role]["points"]))
    print(f"wrote {path}")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput vs workers for both roles, with linear scaling and the cores bound."""
    with figure(path, figsize=(10, 4), ncols=2) as axes:
        _plot_roles(axes, result)


def _plot_roles(axes: Any, result: dict[str, Any]) -> None:
    cores = result["bound"]["usable_cores"]
    for ax, role, label in zip(axes, ("rollout", "feedback"), ("generated tokens/s", "labelled pairs/s")):
        pts = result[role]["points"]
        ns = [p["workers"] for p in pts]
        med = [p["summary"]["median"] for p in pts]
        lo = [m - p["summary"]["min"] for m, p in zip(med, pts)]
        hi = [p["summary"]["max"] - m for m, p in zip(med, pts)]
        ax.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, label="measured (median, min-max)")
        base = med[0] / ns[0]
        ax.plot(ns, [base * n for n in ns], linestyle=":", color="grey", label="linear")
        ax.plot(ns, [base * min(n, cores) for n in ns], linestyle="--", color="red", label=f"{cores}-core bound")
        ax.set_xticks(ns)
        ax.set_xlabel(f"{role} workers (1 CPU each, spread over raylets)")
        ax.set_ylabel(label)
        ax.set_title(f"{role} throughput ({result['topology']['worker_nodes']} raylets on one machine)", fontsize=9)
        ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
