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
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from cai_ray import launcher
from cai_ray.config import ClusterConfig, Deadline, LearnerConfig, ModelsConfig
from cai_ray.training.learner import CRITIC_FREE_ESTIMATORS, LearnerRoles, LearnerWorker, Metrics
from cai_ray.training.modeling import group_size, shard
from cai_ray.types import TrainPair, TrainSequence


class LearnerGroup:
    """``num_ranks`` learner actors behind the same verbs as ``LearnerWorker``, on whole batches.

    After a ``RemoteCallError`` the surviving ranks may be stuck in a collective: shut the group down
    and build a new one (from the last checkpoint).
    """

    def __init__(self, learner: LearnerConfig, models: ModelsConfig, cluster: ClusterConfig, *, seed: int,
                 roles: LearnerRoles | None = None) -> None:
        self.cfg = learner
        self.step_timeout, self.control_timeout = cluster.step, cluster.control
        self.roles = roles or LearnerRoles.for_algorithm(learner.algorithm)
        n = learner.num_ranks
        self.names = [f"learner rank {i}" for i in range(n)]
        self._ranks, self._pg = launcher.start_actors(
            LearnerWorker, role="learner", resources=learner.resources, cluster=cluster, names=self.names,
            args=lambda i: ((), {"rank": i, "world_size": n, "learner": learner, "models": models, "seed": seed,
                                 "roles": self.roles}))
        try:
            addr, port = launcher.get(self._ranks[0].open_rendezvous.remote(), timeout=cluster.startup,
                                      what="learner rank 0: open_rendezvous")
            self.rank_info = self._all("setup", addr, port, timeout=cluster.startup)
        except BaseException:
            self.shutdown()
            raise

    @property
    def actors(self) -> list[Any]:
        """The rank actors, in rank order (for the weight-sync transport and fault tests)."""
        return list(self._ranks)

    @property
    def num_ranks(self) -> int:
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

    def _all(self, method: str, *args: Any, timeout: Deadline) -> list[Any]:
        """Call ``method`` with the same arguments on every rank."""
        refs = [getattr(actor, method).remote(*args) for actor in self._ranks]
        return self._wait(refs, method, timeout)

    def _sharded(self, method: str, items: Sequence[Any], *args: Any, unit: int = 1,
                 **kwargs: Any) -> tuple[list[Any], list[int]]:
        """``method(shard, *args, num_valid=, **kwargs)`` on each rank; returns results and valid counts."""
        shards = shard(list(items), self.num_ranks, unit=unit)
        refs = [getattr(actor, method).remote(part, *args, num_valid=valid, **kwargs)
                for actor, (part, valid) in zip(self._ranks, shards, strict=True)]
        return self._wait(refs, method, self.step_timeout), [valid for _, valid in shards]

    def _step(self, method: str, items: Sequence[Any], *args: Any, unit: int = 1, **kwargs: Any) -> Metrics:
        results, weights = self._sharded(method, items, *args, unit=unit, **kwargs)
        return _weighted_mean(results, weights)

    # ---------------------------------------------------------------------------------- verbs
    def ping(self) -> list[dict[str, Any]]:
        """Every rank's identity; raises naming any rank that is gone."""
        return self._all("ping", timeout=self.control_timeout)

    def sft_step(self, seqs: Sequence[TrainSequence]) -> Metrics:
        """One optimizer step of SFT on ``seqs`` (split over ranks)."""
        return self._step("sft_step", seqs)

    def pm_step(self, pairs: Sequence[TrainPair]) -> Metrics:
        """One optimizer step of the preference model on labelled pairs."""
        return self._step("pm_step", pairs)

    def pm_scores(self, seqs: Sequence[TrainSequence]) -> list[float]:
        """Preference-model reward for each sequence, in order."""
        results, _ = self._sharded("pm_scores", seqs)
        return [score for part in results for score in part]

    def pm_axis_scores(self, seqs: Sequence[TrainSequence]) -> list[list[float]]:
        """Per-axis head scores of each sequence, in order (multi-head PM)."""
        results, _ = self._sharded("pm_axis_scores", seqs)
        return [row for part in results for row in part]

    def dpo_step(self, pairs: Sequence[TrainPair]) -> Metrics:
        """``learner.num_policy_epochs`` optimizer steps of online DPO on labelled pairs."""
        return self._step("dpo_step", pairs)

    def ppo_step(self, seqs: Sequence[TrainSequence]) -> Metrics:
        """PPO update (``learner.num_policy_epochs`` steps) of policy and critic on rollouts with ``reward`` set."""
        _require_rewards(seqs)
        return self._step("ppo_step", seqs)

    def critic_free_step(self, seqs: Sequence[TrainSequence], estimator: str) -> Metrics:
        """GRPO / RLOO / REINFORCE++ update (``learner.num_policy_epochs`` steps); groups never span ranks."""
        if estimator not in CRITIC_FREE_ESTIMATORS:
            raise ValueError(f"estimator {estimator!r}: expected one of {CRITIC_FREE_ESTIMATORS}")
        _require_rewards(seqs)
        if estimator == "reinforce_pp":
            return self._step("critic_free_step", seqs, estimator)
        k = group_size(seqs)
        return self._step("critic_free_step", seqs, estimator, unit=k, samples_per_prompt=k)

    def policy_logprobs(self, seqs: Sequence[TrainSequence]) -> list[tuple[float, ...]]:
        """Per-response-token log-probs under the current policy, in order."""
        results, _ = self._sharded("policy_logprobs", seqs)
        return [row for part in results for row in part]

    def export_weights(self, bucket_bytes: int) -> Iterator[list[tuple[str, Any]]]:
        """Yield (HF name, tensor) buckets from rank 0 while every rank runs the gathers.

        Rank 0 runs at most two buckets ahead of the consumer (Ray generator backpressure), so the whole
        model is never materialised outside the learner. Consume the generator to the end.
        """
        gens = [actor.export_weights.options(num_returns="streaming", _generator_backpressure_num_objects=2)
                .remote(bucket_bytes) for actor in self._ranks]
        done = {gen.completed(): i for i, gen in enumerate(gens[1:], start=1)}
        source = gens[0]
        while True:
            ready, _ = ray.wait([source, *done], num_returns=1, timeout=self.step_timeout.seconds)
            if not ready:
                raise launcher.RemoteCallError(f"learner rank 0: export_weights: no bucket within {self.step_timeout}")
            if ready[0] is not source:
                i = done.pop(ready[0])
                launcher.get_all([ready[0]], timeout=self.step_timeout, names=[f"{self.names[i]}: export_weights"],
                                 left_s=0)
                continue
            try:
                ref = next(source)
            except StopIteration:
                break
            yield launcher.get(ref, timeout=self.step_timeout, what="learner rank 0: export_weights")
        self._wait([gen.completed() for gen in gens], "export_weights", self.step_timeout)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed states + HF folders (policy_hf, preference_hf) + RNG under ``path`` (shared storage)."""
        self._all("save_checkpoint", path, timeout=self.step_timeout)

    def load_checkpoint(self, path: str) -> None:
        """Restore a checkpoint written by a group of the same size and ZeRO stage."""
        self._all("load_checkpoint", path, timeout=self.step_timeout)

    def shutdown(self) -> None:
        """Kill the rank actors and release their placement group."""
        launcher.stop_actors(self._ranks, self._pg)
        self._ranks, self._pg = [], None


def _require_rewards(seqs: Sequence[TrainSequence]) -> None:
    """Checked here, before the fan-out, so no rank is left waiting in a collective for one that raised."""
    missing = [i for i, s in enumerate(seqs) if s.reward is None]
    if missing:
        raise ValueError(f"sequences {missing[:5]} have no reward; score them first (pm_scores)")


def _weighted_mean(results: Sequence[Metrics], weights: Sequence[int]) -> Metrics:
    """Average per-rank metrics, weighting each rank by its number of real items."""
    totals: dict[str, float] = {}
    norms: dict[str, float] = {}
    for metrics, weight in zip(results, weights, strict=True):
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * weight
            norms[key] = norms.get(key, 0.0) + weight
    return {key: totals[key] / norms[key] for key in totals if norms[key] > 0}
