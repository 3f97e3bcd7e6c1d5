"""SL-CAI generation rows/s: the Ray Data batch job vs the driver-side FeedbackPool path, for 1 and 2 workers.

Both sides do the same work end to end, as an SL-CAI run does it: start ``n`` feedback engines, give the same
red-team prompts an initial response and ``feedback.num_revision_rounds`` critique/revision rounds (same seeds, principles and
lengths; the pool's batch is the job's shard size), stop the engines. Ray Data side: :func:`run_batch` with a
``ReviseTask`` into a fresh folder per repetition (nothing to skip), Parquet shards written by the actors. Pool
side (the path SL-CAI took before the Ray Data job): :func:`start_feedback_pool` + ``critique_and_revise``, the
rows then written once on the driver as one Parquet file. After one warm-up of each side, repetitions alternate
(pool 1, ray_data 1, pool 2, ray_data 2, ...). The unit is input prompts; engine start-up is inside the timing,
as in a real run.

    python -m benchmarks.bench_sl [--quick] [--reps 2] [--workers 1,2] [--set sl.num_red_team_prompts=32 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    alternate,
    bench_config,
    bench_parser,
    command_line,
    figure,
    summary,
    write_result,
)


# The work of one repetition, as config values over --config (default the quickstart), shared by both sides: the
# pool's batch is the job's shard size; the node's cores shared by the n engines, as an SL run does.
DEFAULTS = ("sl.num_red_team_prompts=32", "feedback.batch_size=8", "feedback.num_revision_rounds=1",
            "feedback.critique_max_new_tokens=32", "feedback.engine.kv_cache_memory_mb=64",
            "feedback.resources.num_cpus=1", "feedback.resources.num_threads=node", "constitution.path=harmless",
            "cluster.num_cpus=8", "cluster.object_store_memory_mb=1024")
QUICK = ("sl.num_red_team_prompts=4",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, reps=2)
    p.add_argument("--workers", default="1,2", help="worker counts (comma-separated)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.workers = 1, "1"
    args.counts = sorted({int(n) for n in args.workers.split(",")})
    args.cfg = bench_config(args, DEFAULTS, QUICK)
    return args


def _configs(cfg: Any, n: int) -> dict[str, Any]:
    """The sub-configs both sides get, with ``n`` feedback engines."""
    return {"model": cfg.models.policy, "feedback": cfg.feedback.model_copy(update={"num_workers": n}),
            "constitution": cfg.constitution, "data": cfg.data}


def ray_data_side(cfg: Any, n: int, rows: list[dict[str, Any]], seed: int) -> Callable[[int], float]:
    """The Ray Data job over ``rows`` on ``n`` engines, into a fresh folder each call; returns the prompts done."""
    from cai_ray.pipelines.batch import ReviseTask, run_batch

    c = _configs(cfg, n)
    task = ReviseTask(c["model"], c["feedback"], c["constitution"], c["data"], seed)

    def run(rep: int) -> float:
        with tempfile.TemporaryDirectory(prefix="bench-sl-") as out:
            result = run_batch(task, rows, out, num_workers=n, num_rows_per_shard=cfg.feedback.batch_size, progress=False,
                               desc=f"ray_data n={n} rep={rep}")
        return float(result.num_inputs)

    return run


def pool_side(cfg: Any, n: int, rows: list[dict[str, Any]], seed: int, cluster: Any) -> Callable[[int], float]:
    """The previous SL path: a FeedbackPool of ``n`` engines, ``critique_and_revise``, one Parquet file written on
    the driver; returns the prompts done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cai_ray.inference.feedback import start_feedback_pool
    from cai_ray.types import Prompt

    c = _configs(cfg, n)
    prompts = [Prompt(r["id"], r["prompt"]) for r in rows]

    def run(rep: int) -> float:
        pool = start_feedback_pool(c["model"], c["feedback"], c["constitution"], c["data"], cluster, seed=seed)
        try:
            revised = pool.critique_and_revise(prompts)
        finally:
            pool.shutdown()
        out = [{"prompt_id": ch.prompt_id, "prompt": ch.prompt, "response": ch.final_response,
                "critiques": list(ch.critiques), "revisions": list(ch.revisions)} for ch in revised.chains]
        with tempfile.TemporaryDirectory(prefix="bench-sl-") as folder:
            pq.write_table(pa.Table.from_pylist(out), Path(folder) / "sft_data.parquet")
        return float(len(prompts))

    return run


def points(runs: dict[str, list[tuple[float, float]]], counts: Sequence[int]) -> list[dict[str, Any]]:
    """Rows/s of each side per worker count and the Ray Data / pool ratio (paired by repetition)."""
    out = []
    for n in counts:
        pool = [u / s for s, u in runs[f"pool/{n}"]]
        data = [u / s for s, u in runs[f"ray_data/{n}"]]
        out.append({"workers": n, "pool": {"seconds": [s for s, _ in runs[f"pool/{n}"]], "rows_per_s": pool,
                                           "summary": summary(pool)},
                    "ray_data": {"seconds": [s for s, _ in runs[f"ray_data/{n}"]], "rows_per_s": data,
                                 "summary": summary(data)},
                    "ratio_ray_data_over_pool": statistics.median(d / p for d, p in zip(data, pool))})
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result (also written as JSON + PNG under ``--out``)."""
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import ray

    from cai_ray.data import load_prompts
    from cai_ray.launcher import init_ray
    from cai_ray.models import resolve_model

    cfg = args.cfg
    model, feedback, cluster = cfg.models.policy, cfg.feedback, cfg.cluster
    resolve_model(model.name, revision=model.revision)  # once, outside any timing
    init_ray(cluster)
    rows = [{"id": r.id, "where": f"redteam_train row {i}", "prompt": r.prompt}
            for i, r in enumerate(load_prompts("redteam_train", max_rows=cfg.sl.num_red_team_prompts))]
    sides: dict[str, Callable[[int], float]] = {}
    for n in args.counts:
        sides[f"pool/{n}"] = pool_side(cfg, n, rows, cfg.seed, cluster)
        sides[f"ray_data/{n}"] = ray_data_side(cfg, n, rows, cfg.seed)
    try:
        runs = alternate(sides, args.reps)
    finally:
        ray.shutdown()
    result: dict[str, Any] = {
        "settings": {"model": model.name, "reps": args.reps, "worker_counts": args.counts, "prompts": len(rows),
                     "rows_per_shard": feedback.batch_size, "critique_max_new_tokens": feedback.critique_max_new_tokens,
                     "num_revision_rounds": feedback.num_revision_rounds, "engine_start_in_timing": True,
                     "actor_num_cpus": feedback.resources.num_cpus, "threads": feedback.resources.num_threads,
                     "seed": cfg.seed, "config": args.config, "overrides": args.set},
        "unit": "input prompts per second (initial response + critique + revision, engines started and stopped)",
        "points": points(runs, args.counts),
    }
    path = write_result("sl", result, quick=args.quick, out_dir=Path(args.out),
                        command=command_line("benchmarks.bench_sl", argv))
    plot(result, path.with_suffix(".png"))
    result["json"] = str(path)
    for p in result["points"]:
        print(f"{p['workers']} workers: pool {p['pool']['summary']['median']:.2f} rows/s, ray_data "
              f"{p['ray_data']['summary']['median']:.2f} rows/s (x{p['ratio_ray_data_over_pool']:.2f})")
    print(f"wrote {path}")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Median rows/s per worker count, both sides, with min-max whiskers."""
    with figure(path, figsize=(6, 4)) as ax:
        width = 0.38
        for k, side in enumerate(("pool", "ray_data")):
            xs = [i + (k - 0.5) * width for i in range(len(result["points"]))]
            med = [p[side]["summary"]["median"] for p in result["points"]]
            lo = [m - p[side]["summary"]["min"] for m, p in zip(med, result["points"])]
            hi = [p[side]["summary"]["max"] - m for m, p in zip(med, result["points"])]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=4, label={"pool": "FeedbackPool (previous SL path)",
                                                                    "ray_data": "Ray Data batch job"}[side])
        ax.set_xticks(range(len(result["points"])), [f"{p['workers']} worker(s)" for p in result["points"]])
        ax.set_ylabel("prompts / s (engine start included)")
        ax.set_title(f"SL-CAI generation, {result['settings']['prompts']} prompts, {result['settings']['model']}")
        ax.legend()


if __name__ == "__main__":
    main()
