"""Weight-sync bandwidth: each transport vs one flat ``broadcast`` of the same bytes on the same backend.

Set-up (all real): a 2-rank ZeRO-3 LearnerGroup holding the policy, and ``rollout.num_workers`` vLLM rollout engines.
Per repetition, alternating after a warm-up:
  A_t  ``WeightSync.push`` with transport t (gloo | object_store): ZeRO-3 gather -> buckets -> engines ->
       ``reload_weights`` + prefix-cache reset; the phases gather / transfer / load are timed separately;
  B    the baseline: learner rank 0 and the same engines in one stateless gloo group, one flat
       ``broadcast`` of a uint8 tensor with exactly the bytes A moved (group set-up not timed).
Effective bandwidth = bytes / transfer seconds; the ratio is A's over B's, paired by repetition (target >= 0.7).
The default model is SmolLM2-135M (134.5M params, 538 MB in fp32), the "~100M-param" case.

    python -m benchmarks.bench_sync [--quick] [--reps 5] [--transports gloo,object_store]
        [--set rollout.num_workers=2] [--set sync.bucket_size_mb=256]

The work comes from the config (default the quickstart, with the model below): the model (``models.policy``),
the engines (``rollout.num_workers``, ``rollout.engine``), the learner (``learner.num_ranks``,
``learner.deepspeed.zero_stage``), the bucket size and deadline (``sync.*``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import bench_config, bench_parser, command_line, figure, summary, write_result

# The work, as config values over --config (default the quickstart).
DEFAULTS = ("models.policy.name=smollm2-135m-instruct", "models.policy.dtype=float32",
            "models.policy.max_model_len=512", "rollout.num_workers=2", "rollout.resources.num_cpus=1",
            "rollout.engine.kv_cache_memory_mb=32", "rollout.engine.max_num_seqs=4", "learner.num_ranks=2",
            "learner.deepspeed.zero_stage=3", "learner.collective_timeout_s=600", "sync.bucket_size_mb=256", "sync.timeout_s=300",
            "cluster.num_cpus=8", "cluster.object_store_memory_mb=2048", "cluster.step_timeout_s=600")
QUICK = ("models.policy.name=tiny-random-llama", "rollout.num_workers=1")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, reps=5)
    p.add_argument("--transports", default="gloo,object_store", help="transports to measure (comma-separated)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
    args.cfg = bench_config(args, DEFAULTS, QUICK)
    return args


def _flat_broadcast(self: Any, rank: int, host: str, port: int, world: int, nbytes: int, timeout_s: float,
                    store_owner: bool) -> float:
    """Runs inside an actor: join a fresh stateless gloo group, broadcast ``nbytes`` once; seconds of the op."""
    import time
    from datetime import timedelta

    import torch
    from torch.distributed import BroadcastOptions, PrefixStore, ProcessGroupGloo, TCPStore

    base = self._sync_store if store_owner else TCPStore(host, port, world, is_master=False,
                                                         timeout=timedelta(seconds=timeout_s))
    group = ProcessGroupGloo(PrefixStore("flat-baseline", base), rank, world, timedelta(seconds=timeout_s))
    buffer = torch.ones(nbytes, dtype=torch.uint8) if rank == 0 else torch.empty(nbytes, dtype=torch.uint8)
    group.barrier().wait()
    opts = BroadcastOptions()
    opts.rootRank = 0
    start = time.perf_counter()
    group.broadcast([buffer], opts).wait()
    seconds = time.perf_counter() - start
    group.barrier().wait()
    return seconds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result (also written as JSON + PNG under benchmarks/results/)."""
    args = parse_args(argv)
    import sys

    import cloudpickle
    import ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors run _flat_broadcast without this module

    from cai_ray.inference.rollout import start_rollout_workers
    from cai_ray.launcher import get_all, init_ray
    from cai_ray.models import resolve_model
    from cai_ray.sync import WeightSync
    from cai_ray.training.group import LearnerGroup
    from cai_ray.training.learner import LearnerRoles

    cfg = args.cfg
    policy = cfg.models.policy
    model = policy.model_copy(update={"name": resolve_model(policy.name, revision=policy.revision)})
    cluster = cfg.cluster
    init_ray(cluster)
    learner = LearnerGroup(cfg.learner, cfg.models.model_copy(update={"policy": model}), cluster, seed=cfg.seed,
                           roles=LearnerRoles(reference=False))
    fleet = start_rollout_workers(model, cfg.rollout, cfg.data, cluster, seed=cfg.seed)
    targets = [(f"rollout worker {i}", w) for i, w in enumerate(fleet.workers)]
    transports = args.transports.split(",")
    syncs = {t: WeightSync(cfg.sync.model_copy(update={"transport": t}), learner, targets, transport=t,
                           grace=cluster.control)
             for t in transports}
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in transports} | {"flat_broadcast": []}
    version = 0
    try:
        def flat(nbytes: int) -> float:
            world = len(targets) + 1
            rank0 = learner.actors[0]
            host, port = ray.get(rank0.open_sync_store.remote(world, 300), timeout=300)
            refs = [rank0.__ray_call__.remote(_flat_broadcast, 0, host, port, world, nbytes, 300, True)]
            refs += [w.__ray_call__.remote(_flat_broadcast, i + 1, host, port, world, nbytes, 300, False)
                     for i, (_, w) in enumerate(targets)]
            return get_all(refs, timeout=cluster.step, names=["learner rank 0"] + [n for n, _ in targets])[0]

        for rep in range(-1, args.reps):  # rep -1: warm-up, not recorded
            for t in transports:
                version += 1
                m = syncs[t].push(version)
                if rep >= 0:
                    runs[t].append(m)
            seconds = flat(int(m["sync/num_bytes"]))
            if rep >= 0:
                runs["flat_broadcast"].append({"sync/transfer_s": seconds, "sync/num_bytes": m["sync/num_bytes"]})
    finally:
        fleet.shutdown()
        learner.shutdown()

    def bandwidth(m: dict[str, float]) -> float:
        return m["sync/num_bytes"] / m["sync/transfer_s"] / 1e6

    result: dict[str, Any] = {"model": policy.name, "num_bytes": runs[transports[0]][0]["sync/num_bytes"],
                              "engines": cfg.rollout.num_workers, "reps": args.reps,
                              "bucket_mb": cfg.sync.bucket_size_mb,
                              "baseline": "one flat gloo broadcast of the same bytes, same processes", "transports": {}}
    base_bw = [bandwidth(m) for m in runs["flat_broadcast"]]
    result["flat_broadcast"] = {"bandwidth_mb_s": base_bw, "summary": summary(base_bw)}
    for t in transports:
        bw = [bandwidth(m) for m in runs[t]]
        phases = {p: [m[f"sync/{p}_s"] for m in runs[t]] for p in ("gather", "transfer", "load", "total")}
        result["transports"][t] = {
            "bandwidth_mb_s": bw, "summary": summary(bw),
            "phases_s": {p: {"values": v, **summary(v)} for p, v in phases.items()},
            "ratio_vs_flat_broadcast": statistics.median(a / b for a, b in zip(bw, base_bw)),
            "target": 0.7,
        }
    path = write_result("sync", result, quick=args.quick, out_dir=Path(args.out),
                        command=command_line("benchmarks.bench_sync", argv))
    _plot(result, path.with_suffix(".png"))
    result["json"] = str(path)
    print(f"weight sync ({policy.name}, {result['num_bytes'] / 1e6:.0f} MB -> {cfg.rollout.num_workers} engines): "
          + ", ".join(
        f"{t} {r['summary']['median']:.0f} MB/s (x{r['ratio_vs_flat_broadcast']:.2f} of flat broadcast)"
        for t, r in result["transports"].items()) + f"; flat broadcast {result['flat_broadcast']['summary']['median']:.0f} MB/s")
    return result


def _plot(result: dict[str, Any], path: Any) -> None:
    with figure(path, figsize=(10, 4), ncols=2) as (bw_ax, ph_ax):
        _plot_bandwidth(bw_ax, ph_ax, result)


def _plot_bandwidth(bw_ax: Any, ph_ax: Any, result: dict[str, Any]) -> None:
    names = ["flat_broadcast", *result["transports"]]
    medians = [result["flat_broadcast"]["summary"]["median"]] + [
        r["summary"]["median"] for r in result["transports"].values()]
    bw_ax.bar(names, medians, color=["grey"] + ["tab:blue"] * len(result["transports"]))
    bw_ax.set_ylabel("effective bandwidth, MB/s (median)")
    bw_ax.set_title(f"{result['model']}: {result['num_bytes'] / 1e6:.0f} MB to {result['engines']} engines")
    bottom = [0.0] * len(result["transports"])
    for phase, colour in (("gather", "tab:orange"), ("transfer", "tab:blue"), ("load", "tab:green")):
        values = [r["phases_s"][phase]["median"] for r in result["transports"].values()]
        ph_ax.bar(list(result["transports"]), values, bottom=bottom, label=phase, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    ph_ax.set_ylabel("seconds per sync (median)")
    ph_ax.set_title("phases")
    ph_ax.legend()


if __name__ == "__main__":
    main()
