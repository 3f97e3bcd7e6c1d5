"""The learner group: one ``LearnerWorker`` Ray actor per rank, driven as one object by the controller.

Set-up: a placement group of ``num_ranks`` bundles (strategy from ``ClusterConfig``, so ranks may span
nodes), one actor per bundle, rank 0 opens the rendezvous store on a free port and reports its address,
then every rank joins the process group and builds its engines.

Every call fans out to all ranks (ZeRO-3 forwards and gathers are collectives), each rank getting an
equal-length contiguous shard of the data (``modeling.shard``; the last shard is filled with copies that
carry no loss). The controller waits with one deadline and fails fast: a rank that dies or raises is
reported by rank as soon as it is known, not after the survivors' collectives time out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from cai_ray import launcher
from cai_ray.config import ClusterConfig, Deadline, LearnerConfig, ModelsConfig
from cai_ray.training.learner import LearnerRoles, LearnerWorker, Metrics
from cai_ray.training.modeling import shard

# What the group ships to its ranks: ``fn(worker, shard, num_valid)`` (see ``LearnerWorker.run``).
RankFn = Callable[[LearnerWorker, Sequence[Any], int], Any]


class LearnerGroup:
    """``num_ranks`` learner actors driven as one: ``update(fn, items)`` / ``forward(fn, items)`` on whole batches.

    ``fn`` is a plain function (the updates of :mod:`cai_ray.training.updates`, the scoring passes of
    :mod:`cai_ray.training.learner`), with its settings bound by ``functools.partial``; it is shipped to every
    rank with that rank's shard. After a ``RemoteCallError`` the surviving ranks may be stuck in a collective:
    shut the group down and build a new one (from the last checkpoint).
    """

    def __init__(self, learner: LearnerConfig, models: ModelsConfig, cluster: ClusterConfig, *, seed: int,
                 roles: LearnerRoles) -> None:
        self.step_timeout, self.control_timeout = cluster.step, cluster.control
        self.roles = roles
        n = learner.num_ranks
        self.names = [f"learner rank {i}" for i in range(n)]
        self._ranks, self._pg = launcher.start_actors(
            LearnerWorker, role="learner", resources=learner.resources, cluster=cluster, names=self.names,
            args=lambda i: ((), {"rank": i, "world_size": n, "learner": learner, "models": models, "seed": seed,
                                 "roles": roles}))
        try:
            addr, port = launcher.get(self._ranks[0].open_rendezvous.remote(), timeout=cluster.startup,
                                      what="learner rank 0: open_rendezvous")
            self.rank_info = self._each(lambda rank: rank.setup.remote(addr, port), "setup", cluster.startup)
        except BaseException:
            self.shutdown()
            raise

    @property
    def actors(self) -> list[Any]:
        """The rank actors, in rank order (for the weight-sync transport and fault tests)."""
        return list(self._ranks)

    @property
    def num_ranks(self) -> int:
        """How many ranks the group has."""
        return len(self._ranks)

    # -------------------------------------------------------------------------------- fan-out
    def _wait(self, refs: Sequence[Any], what: str, timeout: Deadline) -> list[Any]:
        """All results in rank order; the first rank to fail is named at once (fail fast)."""
        pending = {ref: i for i, ref in enumerate(refs)}
        waiting = list(refs)
        deadline = timeout.seconds
        start = time.monotonic()
        while waiting:
            left = deadline - (time.monotonic() - start)
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, left))
            if not ready:
                break
            for ref in ready:
                i = pending[ref]
                launcher.get_all([ref], timeout=timeout, names=[f"{self.names[i]}: {what}"], left_s=0)  # raises
        return launcher.get_all(list(refs), timeout=timeout, left_s=deadline - (time.monotonic() - start),
                                names=[f"{name}: {what}" for name in self.names])

    def _each(self, call: Callable[[Any], Any], what: str, timeout: Deadline) -> list[Any]:
        """``call(rank actor)`` (which returns its ObjectRef) on every rank; the results in rank order."""
        return self._wait([call(actor) for actor in self._ranks], what, timeout)

    def _sharded(self, fn: RankFn, items: Sequence[Any], unit: int) -> tuple[list[Any], list[int]]:
        """``fn(worker, shard, num_valid)`` on each rank; returns its results and each shard's valid count."""
        shards = shard(list(items), self.num_ranks, unit=unit)
        refs = [actor.run.remote(fn, part, valid) for actor, (part, valid) in zip(self._ranks, shards, strict=True)]
        return self._wait(refs, _name(fn), self.step_timeout), [valid for _, valid in shards]

    # ---------------------------------------------------------------------------------- verbs
    def update(self, fn: RankFn, items: Sequence[Any], *, unit: int = 1) -> Metrics:
        """An update ``fn`` on ``items`` split over the ranks (``unit`` rows never split: a GRPO group); the
        ranks' metrics averaged, each weighted by its number of real items."""
        results, weights = self._sharded(fn, items, unit)
        return _weighted_mean(results, weights)

    def forward(self, fn: RankFn, items: Sequence[Any]) -> list[Any]:
        """A scoring pass ``fn`` (one result per item) on ``items`` split over the ranks; the results in order."""
        results, _ = self._sharded(fn, items, 1)
        return [row for part in results for row in part]

    def ping(self) -> list[dict[str, Any]]:
        """Every rank's identity; raises naming any rank that is gone."""
        return self._each(lambda rank: rank.ping.remote(), "ping", self.control_timeout)

    def save_checkpoint(self, path: str, *, bucket_bytes: int) -> None:
        """DeepSpeed states + HF folders (policy_hf, preference_hf, gathered ``bucket_bytes`` at a time) + RNG
        under ``path`` (shared storage)."""
        self._each(lambda rank: rank.save_checkpoint.remote(path, bucket_bytes), "save_checkpoint", self.step_timeout)

    def load_checkpoint(self, path: str) -> None:
        """Restore a checkpoint written by a group of the same size and ZeRO stage."""
        self._each(lambda rank: rank.load_checkpoint.remote(path), "load_checkpoint", self.step_timeout)

    def shutdown(self) -> None:
        """Kill the rank actors and release their placement group."""
        launcher.stop_actors(self._ranks, self._pg)
        self._ranks, self._pg = [], None


def _name(fn: Any) -> str:
    """What a remote-call error calls ``fn``: its function's name (through ``functools.partial``)."""
    return getattr(getattr(fn, "func", fn), "__name__", type(fn).__name__)


def _weighted_mean(results: Sequence[Metrics], weights: Sequence[int]) -> Metrics:
    """Average per-rank metrics, weighting each rank by its number of real items."""
    totals: dict[str, float] = {}
    norms: dict[str, float] = {}
    for metrics, weight in zip(results, weights, strict=True):
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * weight
            norms[key] = norms.get(key, 0.0) + weight
    return {key: totals[key] / norms[key] for key in totals if norms[key] > 0}
