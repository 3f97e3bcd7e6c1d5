"""The RL-CAI roles started together: rollout engines, the feedback pool, the learner group, weight sync.

The controller talks to them through a few verbs. Rollout calls that die with their actor are retried
once after Ray restarts it and the learner's weights are pushed into it, so no sample is lost or counted
twice; the retried samples record the version of those weights (in the async schedule the learner may be
one update ahead of the other engines). A learner failure stops the run (it is resumable from the last
checkpoint). One set of roles may serve several runs in turn (``rl_cai(..., roles=...)``) when their configs
agree on every role field (:func:`role_mismatches`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cai_ray import launcher
from cai_ray.backend import layout_threads
from cai_ray.config import ExperimentConfig
from cai_ray.inference.feedback import start_feedback_pool
from cai_ray.inference.feedback_pool import FeedbackPool
from cai_ray.inference.redteam import RedTeamWorkers, start_red_team_workers
from cai_ray.inference.rollout import RolloutWorkers, start_rollout_workers
from cai_ray.pipelines.checkpoint import dotted_leaves
from cai_ray.seeds import stable_seed
from cai_ray.sync import WeightSync
from cai_ray.training.group import LearnerGroup
from cai_ray.training.learner import LearnerRoles
from cai_ray.types import Prompt, RejectedItem, RolloutBatch, Sample


@dataclass
class PendingRollout:
    """Generation calls in flight (or finished) for one iteration."""

    iteration: int
    calls: list[tuple[int, list[Prompt], Any]]  # (worker index, its prompts, object ref)
    samples: list[Sample] | None = None  # set once collected
    num_samples: int | None = None  # responses per prompt; None: rollout.num_samples_per_prompt
    rejected: list[RejectedItem] = field(default_factory=list)


class Roles:
    """Everything the RL loop drives. Build with :func:`start_roles`; always ``shutdown()``."""

    def __init__(self, cfg: ExperimentConfig, rollout: RolloutWorkers, feedback: FeedbackPool,
                 learner: LearnerGroup, red_team: RedTeamWorkers | None = None, *,
                 requested: ExperimentConfig | None = None) -> None:
        self.cfg = cfg  # threads resolved for the schedule the roles were started for
        self.requested = requested or cfg  # as asked for: what :func:`role_mismatches` compares a run's config with
        self._fleet = rollout
        self.rollout = rollout.workers
        self.feedback = feedback
        self.learner = learner
        self.red_team = red_team  # None unless red_team.enabled
        targets = [(f"rollout worker {i}", w) for i, w in enumerate(self.rollout)]
        self._sync_feedback = cfg.models.feedback is None and cfg.sync.sync_feedback_engines
        if self._sync_feedback:
            targets += [(f"feedback worker {i}", w) for i, w in enumerate(feedback.workers)]
            # A feedback worker that Ray restarts comes back with its initial weights: re-sync it first.
            feedback.on_restart = lambda i: self.sync.push(self.version, only=[f"feedback worker {i}"])
        self.sync = WeightSync(cfg.sync, learner, targets, transport=cfg.resolved_sync_transport(),
                               grace=cfg.cluster.control)
        self.version = 0

    # ------------------------------------------------------------------------------- rollout
    def submit_generate(self, prompts: Sequence[Prompt], iteration: int, *,
                        num_samples: int | None = None) -> PendingRollout:
        """Start generation for ``prompts`` split evenly over the rollout workers (``num_samples`` responses per
        prompt; None: ``rollout.num_samples_per_prompt``)."""
        calls = []
        n = len(self.rollout)
        for i, worker in enumerate(self.rollout):
            part = list(prompts[i::n])
            if part:
                ref = worker.generate.remote(part, seed=self._seed(iteration), num_samples=num_samples)
                calls.append((i, part, ref))
        return PendingRollout(iteration, calls, num_samples=num_samples)

    def finish(self, pending: PendingRollout, *, learner_version: int) -> PendingRollout:
        """Wait for ``pending`` to complete, redoing a dead worker's share once.

        The restarted engine first gets the learner's weights, which ``learner_version`` names: in the async
        schedule the learner is already one update ahead of the engines while this batch is finished.
        """
        if pending.samples is None:
            samples: list[Sample] = []
            for i, part, ref in pending.calls:
                batch = self._get_rollout(i, part, ref, pending, learner_version)
                samples.extend(batch.samples)
                pending.rejected.extend(batch.rejected)
            pending.samples = samples
        return pending

    def collect(self, pending: PendingRollout, *, learner_version: int) -> RolloutBatch:
        """The samples and rejected prompts of ``pending`` (waits if needed; see :meth:`finish`)."""
        done = self.finish(pending, learner_version=learner_version)
        return RolloutBatch(tuple(done.samples or ()), tuple(done.rejected))

    def _get_rollout(self, i: int, part: list[Prompt], ref: Any, pending: PendingRollout, learner_version: int) -> Any:
        what = f"rollout worker {i}: generate"
        try:
            return launcher.get(ref, timeout=self.cfg.cluster.step, what=what)
        except launcher.RemoteCallError:
            # Once: wait for Ray to restart the actor, give it the learner's weights, redo its share.
            worker = self.rollout[i]
            launcher.wait_restarted(worker, timeout=self.cfg.cluster.startup, what=f"rollout worker {i}")
            self.sync.push(learner_version, only=[f"rollout worker {i}"])
            retry = worker.generate.remote(part, seed=self._seed(pending.iteration), num_samples=pending.num_samples)
            return launcher.get(retry, timeout=self.cfg.cluster.step, what=f"{what} (retry)")

    def _seed(self, iteration: int) -> int:
        return stable_seed(self.cfg.seed, "rollout", iteration)

    # ---------------------------------------------------------------------------------- sync
    def push_weights(self, version: int) -> dict[str, float]:
        """Push the learner's policy into every target engine as ``version``."""
        self.version = version
        return self.sync.push(version)

    def shutdown(self) -> None:
        """Stop every role and release its placement group, even when another fails to stop; raises the first error."""
        shutdown_all([self._fleet, self.feedback, self.learner, *([self.red_team] if self.red_team else [])])


def shutdown_all(roles: Iterable[Any]) -> None:
    """``shutdown()`` each role in order, every one of them; then raise the first failure, if any."""
    errors: list[Exception] = []
    for role in roles:
        try:
            role.shutdown()
        except Exception as err:  # noqa: BLE001 - collected, re-raised below once every role has been asked
            errors.append(err)
    if errors:
        raise errors[0]


# The config sections a set of roles is built from: each role receives its own sub-config of these.
ROLE_SECTIONS = ("seed", "models", "constitution", "rollout", "feedback", "learner", "sync", "cluster")


def role_fields(cfg: ExperimentConfig) -> dict[str, Any]:
    """What roles started for ``cfg`` are made of: its role sections (threads as requested, 'auto' unresolved),
    the prompt-length policy the engines apply, whether the learner holds a preference model, the red-teamer."""
    fields = cfg.model_dump(mode="json", include=set(ROLE_SECTIONS))
    fields["data"] = {"max_prompt_tokens": cfg.data.max_prompt_tokens, "overlong_prompt": cfg.data.overlong_prompt}
    fields["learner"]["holds_preference_model"] = cfg.uses_preference_model()  # schedule.preference_model decides
    fields["red_team"] = cfg.red_team.model_dump(mode="json") if cfg.red_team.enabled else {"enabled": False}
    return fields


def role_mismatches(started_for: ExperimentConfig, cfg: ExperimentConfig) -> list[str]:
    """``"key: <value> (roles) != <value> (config)"`` for each role field where ``cfg`` differs from the config
    roles were ``started_for``; empty when a run of ``cfg`` may use them. A schedule's resolved thread counts
    are no difference: roles keep the threads of the schedule they were started for."""
    have, want = dotted_leaves(role_fields(started_for)), dotted_leaves(role_fields(cfg))
    absent = "<absent>"
    return [f"{key}: {json.dumps(have.get(key, absent))} (roles) != {json.dumps(want.get(key, absent))} (config)"
            for key in sorted(have.keys() | want.keys()) if have.get(key, absent) != want.get(key, absent)]


def pm_heads(cfg: ExperimentConfig) -> dict[str, tuple]:
    """The multi-head PM's axes and head mix (``feedback.label_axes``); empty for the one-head PM.

    The mix is the aggregation rule as linear weights; ``priority`` mixes with its soft (decaying) weights,
    since a reward must be linear in the heads.
    """
    from cai_ray.algorithms.aggregation import axis_weights
    from cai_ray.constitution import load_constitution

    constitution = load_constitution(cfg.constitution.path)
    axes = constitution.label_axes(cfg.feedback.label_axes, cfg.constitution.tiers)
    if not axes:
        return {"pm_axes": (), "pm_mix": ()}
    agg = cfg.feedback.aggregation
    weights = axis_weights(list(axes), mode=agg.mode, weights=agg.weights, decay=agg.decay,
                           ranks={a: constitution.axis_tier_rank(a) for a in axes})
    return {"pm_axes": axes, "pm_mix": tuple(weights[a] for a in axes)}


def start_roles(cfg: ExperimentConfig) -> Roles:
    """Start the learner group, rollout workers and feedback pool together; on any failure stop what started."""
    from concurrent.futures import ThreadPoolExecutor

    requested, cfg = cfg, layout_threads(cfg, "rl")  # 'auto' threads from the schedule: sync phases use the node
    # The start-ups mostly wait (imports, engine and DeepSpeed init inside their actors): overlap them.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="start-roles") as threads:
        futures = {
            "learner": threads.submit(
                LearnerGroup, cfg.learner, cfg.models, cfg.cluster, seed=cfg.seed,
                roles=LearnerRoles(reference=True, preference_model=cfg.uses_preference_model(),
                                   critic=cfg.learner.algorithm == "ppo",
                                   **pm_heads(cfg))),
            "rollout": threads.submit(start_rollout_workers, cfg.models.policy, cfg.rollout, cfg.data, cfg.cluster,
                                      seed=cfg.seed),
            "feedback": _start_feedback(threads, cfg),
        }
        if cfg.red_team.enabled:  # its model: red_team.model, else the policy's initial weights
            futures["red_team"] = threads.submit(start_red_team_workers, cfg.red_team.model or cfg.models.policy,
                                                 cfg.red_team, cfg.cluster, seed=cfg.seed)
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    failed = [(name, f.exception()) for name, f in futures.items() if f.exception() is not None]
    if failed:
        try:
            shutdown_all(started.values())
        finally:
            raise failed[0][1]
    return Roles(cfg, started["rollout"], started["feedback"], started["learner"], started.get("red_team"),
                 requested=requested)


def _start_feedback(threads: Any, cfg: ExperimentConfig) -> Any:
    """The feedback role's start-up: its own actor pool, or the labelling service (``feedback.backend``)."""
    if cfg.feedback.backend == "serve":
        from cai_ray.serving.client import start_feedback_client

        return threads.submit(start_feedback_client, cfg)
    return threads.submit(start_feedback_pool, cfg.models.resolved_feedback(), cfg.feedback, cfg.constitution,
                          cfg.data, cfg.cluster, seed=cfg.seed)
