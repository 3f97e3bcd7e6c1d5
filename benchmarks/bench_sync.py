"""Weight-sync bandwidth: each transport vs one flat ``broadcast`` of the same bytes on the same backend.

Set-up (all real): a 2-rank ZeRO-3 LearnerGroup holding the policy, and ``--engines`` vLLM rollout engines.
Per repetition, alternating after a warm-up:
  A_t  ``WeightSync.push`` with transport t (gloo | object_store): ZeRO-3 gather -> buckets -> engines ->
       ``reload_weights`` + prefix-cache reset; the phases gather / transfer / load are timed separately;
  B    the baseline: learner rank 0 and the same engines in one stateless gloo group, one flat
       ``broadcast`` of a uint8 tensor with exactly the bytes A moved (group set-up not timed).
Effective bandwidth = bytes / transfer seconds; the ratio is A's over B's, paired by repetition (target >= 0.7).
The default model is SmolLM2-135M (134.5M params, 538 MB in fp32), the "~100M-param" case.

    python -m benchmarks.bench_sync [--quick] [--model smollm2-135m-instruct] [--reps 5] [--engines 2]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.common import summary, write_result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--transports", default="gloo,object_store")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repetition: a smoke run, not a number")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.reps, args.engines = "tiny-random-llama", 1, 1
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

    from cai_ray.config import (
        ClusterConfig,
        DataConfig,
        EngineConfig,
        LearnerConfig,
        ModelConfig,
        ModelsConfig,
        ResourcesConfig,
        RolloutConfig,
        SyncConfig,
    )
    from cai_ray.inference.rollout import start_rollout_workers
    from cai_ray.launcher import get_all, init_ray
    from cai_ray.models import resolve_model
    from cai_ray.sync import WeightSync
    from cai_ray.training.group import LearnerGroup
    from cai_ray.training.learner import LearnerRoles

    model = ModelConfig(name=resolve_model(args.model), dtype="float32", max_model_len=512)
    cluster = ClusterConfig(num_cpus=8, object_store_memory_mb=2048, step_timeout_s=600)
    init_ray(cluster)
    learner = LearnerGroup(LearnerConfig(num_ranks=2, deepspeed={"zero_stage": 3}, collective_timeout_s=600),
                           ModelsConfig(policy=model), cluster, seed=0, roles=LearnerRoles(reference=False))
    fleet = start_rollout_workers(model, RolloutConfig(num_workers=args.engines, resources=ResourcesConfig(num_cpus=1),
                                                       engine=EngineConfig(kv_cache_memory_mb=32, max_num_seqs=4)),
                                  DataConfig(max_prompt_tokens=256), cluster, seed=0)
    targets = [(f"rollout worker {i}", w) for i, w in enumerate(fleet.workers)]
    transports = args.transports.split(",")
    syncs = {t: WeightSync(SyncConfig(transport=t, bucket_size_mb=args.bucket_mb, timeout_s=300), learner, targets,
                           transport=t, grace=cluster.control)
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

    result: dict[str, Any] = {"model": args.model, "num_bytes": runs[transports[0]][0]["sync/num_bytes"],
                              "engines": args.engines, "reps": args.reps, "bucket_mb": args.bucket_mb,
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
    path = write_result("sync", result, quick=args.quick)
    _plot(result, path.with_suffix(".png"))
    result["json"] = str(path)
    print(f"weight sync ({args.model}, {result['num_bytes'] / 1e6:.0f} MB -> {args.engines} engines): " + ", ".join(
        f"{t} {r['summary']['median']:.0f} MB/s (x{r['ratio_vs_flat_broadcast']:.2f} of flat broadcast)"
        for t, r in result["transports"].items()) + f"; flat broadcast {result['flat_broadcast']['summary']['median']:.0f} MB/s")
    return result


def _plot(result: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bw_ax, ph_ax) = plt.subplots(1, 2, figsize=(10, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
