"""SL-CAI generation rows/s: the Ray Data batch job vs the driver-side FeedbackPool path, for 1 and 2 workers.

Both sides do the same work end to end, as an SL-CAI run does it: start ``n`` feedback engines, give the same
red-team prompts an initial response and ``--rounds`` critique/revision rounds (same seeds, principles and
lengths; the pool's batch is the job's shard size), stop the engines. Ray Data side: :func:`run_batch` with a
``ReviseTask`` into a fresh folder per repetition (nothing to skip), Parquet shards written by the actors. Pool
side (the path SL-CAI took before the Ray Data job): :func:`start_feedback_pool` + ``critique_and_revise``, the
rows then written once on the driver as one Parquet file. After one warm-up of each side, repetitions alternate
(pool 1, ray_data 1, pool 2, ray_data 2, ...). The unit is input prompts; engine start-up is inside the timing,
as in a real run.

    python -m benchmarks.bench_sl [--quick] [--reps 2] [--prompts 32] [--workers 1,2]
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

from benchmarks.common import RESULTS_DIR, alternate, command_line, summary, write_result  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smallest run that exercises the code; numbers not quoted")
    p.add_argument("--model", default="tiny-random-llama", help="model reference (built-in, folder or hub id)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions of every (side, worker count)")
    p.add_argument("--prompts", type=int, default=32, help="red-team prompts per repetition")
    p.add_argument("--workers", default="1,2", help="worker counts (comma-separated)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON and PNG")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.prompts, args.workers = 1, 4, "1"
    args.counts = sorted({int(n) for n in args.workers.split(",")})
    return args


# The work of one repetition: shared by both sides.
SHARD_ROWS = 8
MAX_NEW_TOKENS = 32
ROUNDS = 1


def _configs(model_name: str, n: int) -> dict[str, Any]:
    from cai_ray.config import (
        ConstitutionConfig,
        DataConfig,
        EngineConfig,
        FeedbackConfig,
        ModelConfig,
        ResourcesConfig,
    )

    return {"model": ModelConfig(name=model_name, dtype="float32", max_model_len=1024),
            "feedback": FeedbackConfig(num_workers=n, batch_size=SHARD_ROWS, num_revision_rounds=ROUNDS,
                                       critique_max_new_tokens=MAX_NEW_TOKENS,
                                       engine=EngineConfig(kv_cache_memory_mb=64),
                                       # Both sides: the node's cores shared by the n engines, as an SL run does.
                                       resources=ResourcesConfig(num_cpus=1, num_threads="node")),
            "constitution": ConstitutionConfig(path="harmless", num_few_shot=1), "data": DataConfig()}


def ray_data_side(model_name: str, n: int, rows: list[dict[str, Any]], seed: int) -> Callable[[int], float]:
    """The Ray Data job over ``rows`` on ``n`` engines, into a fresh folder each call; returns the prompts done."""
    from cai_ray.pipelines.batch import ReviseTask, run_batch

    c = _configs(model_name, n)
    task = ReviseTask(c["model"], c["feedback"], c["constitution"], c["data"], seed)

    def run(rep: int) -> float:
        with tempfile.TemporaryDirectory(prefix="bench-sl-") as out:
            result = run_batch(task, rows, out, num_workers=n, num_rows_per_shard=SHARD_ROWS, progress=False,
                               desc=f"ray_data n={n} rep={rep}")
        return float(result.num_inputs)

    return run


def pool_side(model_name: str, n: int, rows: list[dict[str, Any]], seed: int, cluster: Any) -> Callable[[int], float]:
    """The previous SL path: a FeedbackPool of ``n`` engines, ``critique_and_revise``, one Parquet file written on
    the driver; returns the prompts done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cai_ray.inference.feedback import start_feedback_pool
    from cai_ray.types import Prompt

    c = _configs(model_name, n)
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

    from cai_ray.config import ClusterConfig
    from cai_ray.data import load_prompts
    from cai_ray.launcher import init_ray
    from cai_ray.models import resolve_model

    resolve_model(args.model)
    cluster = ClusterConfig(num_cpus=8, object_store_memory_mb=1024)
    init_ray(cluster)
    rows = [{"id": r.id, "where": f"redteam_train row {i}", "prompt": r.prompt}
            for i, r in enumerate(load_prompts("redteam_train", max_rows=args.prompts))]
    sides: dict[str, Callable[[int], float]] = {}
    for n in args.counts:
        sides[f"pool/{n}"] = pool_side(args.model, n, rows, 0, cluster)
        sides[f"ray_data/{n}"] = ray_data_side(args.model, n, rows, 0)
    try:
        runs = alternate(sides, args.reps)
    finally:
        ray.shutdown()
    result: dict[str, Any] = {
        "settings": {"model": args.model, "reps": args.reps, "worker_counts": args.counts, "prompts": len(rows),
                     "rows_per_shard": SHARD_ROWS, "critique_max_new_tokens": MAX_NEW_TOKENS,
                     "num_revision_rounds": ROUNDS, "engine_start_in_timing": True,
                     "actor_num_cpus": 1, "threads": "node: the machine's cores over the n engines"},
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
