"""Iterated online RL-CAI (RLAIF), Bai et al. 2022 §4 with the §6.1 "iterated online" idea.

Each iteration:
  1. sample prompts; the policy samples k responses per prompt on the vLLM rollout engines;
  2. pair the responses; the feedback pool labels each pair against a principle of the constitution;
  3. append the fresh labels to the preference data (a replay window of older iterations is kept);
  4. measure the preference model's accuracy on the fresh labels *before* updating it (the
     distribution-shift signal the online loop exists to fix), then update it -- when the policy's reward
     comes from it, or as a monitor with DPO (``schedule.preference_model``). A multi-head PM (one head per
     ``feedback.label_axes`` axis) first scores the iteration's samples -- held out from it, as it has not
     trained on them yet -- into ``pm_scores/iter_NNNN.jsonl`` for the ``cai-ray axes`` correlation report;
  5. update the policy: online DPO straight from the labels, or PPO / GRPO / RLOO / REINFORCE++ with the
     preference model's score as reward (KL to the reference inside the learner);
  6. push the new weights into the engines; log; checkpoint every N iterations.
With ``red_team.enabled``, a red-team phase after generation proposes new attacks, has the policy answer and
the feedback pool judge them, and archives the successful, diverse ones; ``schedule.red_team_fraction`` of
the next batches' red-team prompts come from that archive (:mod:`cai_ray.pipelines.red_team`).
Schedules: ``sync`` runs the phases in order; ``async`` generates iteration i+1 with the current weights
while iteration i is labelled and trained, so its samples are one version old (``samples/staleness_max``).
An iteration with nothing to train on trains and syncs nothing: it is logged as empty with its reason, or
stops the run (``schedule.on_empty_iteration``).
Simplification: the preference model is scored on the policy's own samples, one pair per two samples.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from cai_ray.axes_report import PM_SCORES_DIR
from cai_ray.config import ExperimentConfig
from cai_ray.data import read_prompts, write_jsonl
from cai_ray.metrics import Metrics, MetricsWriter, PhaseTimer
from cai_ray.pipelines.checkpoint import (
    LoopState,
    checkpoint_dir,
    load_for_resume,
    write_atomically,
    write_loop_files,
)
from cai_ray.pipelines.policy_update import PolicyUpdate, policy_update, update_preference_model
from cai_ray.pipelines.red_team import RedTeam
from cai_ray.pipelines.roles import PendingRollout, Roles, role_mismatches, start_roles
from cai_ray.redteam_archive import Attack, draw_red_team_prompts
from cai_ray.seeds import stable_seed
from cai_ray.training.group import LearnerGroup
from cai_ray.training.learner import pm_axis_scores
from cai_ray.types import (
    ComparisonRequest,
    PreferenceLabel,
    Prompt,
    RolloutBatch,
    Sample,
    TrainPair,
    TrainSequence,
)

logger = logging.getLogger(__name__)


class EmptyIterationError(RuntimeError):
    """An iteration had nothing to train on and ``schedule.on_empty_iteration`` is 'error'."""


# ----------------------------------------------------------------------------------- the loop
def rl_cai(cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, roles: Roles | None = None) -> list[Metrics]:
    """Run ``cfg.schedule.num_iterations`` RL-CAI iterations (on started ``roles``: :func:`running`); their metrics."""
    pool = _prompt_pool(cfg)
    num_iterations, overlap = cfg.schedule.num_iterations, cfg.schedule.mode == "async"
    state = load_for_resume(run_dir, cfg.model_dump(mode="json")) if resume else LoopState()  # before any start-up
    red_team = RedTeam(cfg.red_team, cfg.data.red_team, run_dir, seed=cfg.seed, first_iteration=state.iteration)
    update_policy = policy_update(cfg.learner, samples_per_prompt=cfg.rollout.num_samples_per_prompt)  # chosen once
    history: list[Metrics] = []
    with running(cfg, run_dir, state, resume=resume, roles=roles) as (roles, writer, bar):
        pending: PendingRollout | None = None
        for it in range(state.iteration, num_iterations):
            timer = PhaseTimer()
            with timer.phase("generate"):
                rollout = roles.collect(pending or roles.submit_generate(
                    _iteration_prompts(cfg, pool, it, archive=state.archive.attacks()), it),
                    learner_version=state.version)
            with timer.phase("red_team"):  # updates the archive the next batch draws from
                red_metrics = red_team.step(roles, state.archive, rollout, iteration=it, version=state.version)
            # async: the next batch is sampled with the current weights while this one is labelled and trained
            pending = roles.submit_generate(_iteration_prompts(cfg, pool, it + 1, archive=state.archive.attacks()),
                                            it + 1) if overlap and it + 1 < num_iterations else None
            samples = list(rollout.samples)
            sample_metrics = sample_stats(samples, current_version=state.version)  # the version they train
            with timer.phase("label"):
                requests, pairs = make_pairs(samples, iteration=it)
                labels = roles.feedback.label_pairs(requests)
            fresh = [pair_for_training(p, lab) for p, lab in zip(pairs, labels, strict=True) if lab.error is None]
            empty = nothing_to_train(rollout, labels, fresh, update=update_policy)
            if empty is None:
                pm_metrics = {}
                if roles.learner.roles.preference_model:  # schedule.preference_model: its reward, or a monitor
                    with timer.phase("pm_scores"):  # before the update: samples the PM has not trained on
                        write_pm_scores(roles.learner, samples, run_dir / PM_SCORES_DIR / f"iter_{it:04d}.jsonl")
                    with timer.phase("pm_update"):
                        state.replay = (state.replay + [fresh])[-cfg.schedule.replay_window:]
                        pm_metrics = update_preference_model(roles.learner, fresh, state.replay,
                                                             epochs=cfg.learner.num_pm_epochs)
                with timer.phase("policy_update"):
                    policy_metrics = update_policy(roles.learner, samples, fresh)
                state.version += 1  # the learner holds the new weights; the engines get them at sync
            else:
                pm_metrics, policy_metrics = {}, empty_iteration(it, empty, policy=cfg.schedule.on_empty_iteration)
            with timer.phase("idle"):
                if pending is not None:  # an engine must be done generating to join the weight sync
                    roles.finish(pending, learner_version=state.version)
            with timer.phase("sync"):
                sync_metrics = roles.push_weights(state.version) if empty is None else {}
            state.iteration = it + 1
            with timer.phase("checkpoint"):
                write_jsonl([asdict(lab) for lab in labels], run_dir / "labels" / f"iter_{it:04d}.jsonl")
                if state.iteration % cfg.schedule.checkpoint_every == 0 or state.iteration == num_iterations:
                    save_checkpoint(roles.learner, state, run_dir, cfg)
            metrics = {"iteration": float(it), "weight_version": float(state.version), "iteration/empty": 0.0,
                       **sample_metrics, **label_stats(labels),
                       **pm_metrics, **policy_metrics, **sync_metrics, **red_metrics, **timer.metrics()}
            history.append(log_iteration(writer, bar, it, metrics))
    red_team.plot(run_dir / "metrics.jsonl")
    return history


@contextmanager
def running(cfg: ExperimentConfig, run_dir: Path, state: LoopState, *, resume: bool,
            roles: Roles | None = None) -> Iterator[tuple[Roles, MetricsWriter, tqdm]]:
    """The metrics writer, the started roles (restored from the checkpoint on resume) and a progress bar.

    ``roles``: roles already started (by :func:`start_roles` for a config agreeing on every role field) to run
    on and leave running, e.g. several runs on one set of engines; their engines first get the learner's
    weights as the run's first version (its version 0, or the checkpoint's). None: the run starts its own.
    Whatever fails (a role's start-up, the restore, the loop, one role's shutdown), everything started so far
    is closed, in reverse order.
    """
    mismatches = role_mismatches(roles.requested, cfg) if roles is not None else []
    if mismatches:  # before anything is created
        raise ValueError("rl_cai: the given roles were started for a different config:\n  " + "\n  ".join(
            mismatches) + "\nStart roles for this config (start_roles), or run with roles=None")
    with ExitStack() as cleanup:
        writer = MetricsWriter(cfg.logging, run_dir, cfg.name, cfg.model_dump(mode="json"),
                               first_step=state.iteration)
        cleanup.callback(writer.close)
        lent = roles is not None
        if roles is None:
            roles = start_roles(cfg)
            cleanup.callback(roles.shutdown)
        if resume:
            roles.learner.load_checkpoint(str(checkpoint_dir(run_dir) / "learner"))
        if resume or lent:  # lent engines may hold another run's weights, or lag their learner
            roles.push_weights(state.version)
        if not resume and cfg.feedback.judge_check:
            check_judge(roles, cfg, run_dir)
        bar = tqdm(total=cfg.schedule.num_iterations, initial=state.iteration, desc="RL-CAI", unit="iter",
                   disable=not cfg.logging.progress)
        cleanup.callback(bar.close)
        yield roles, writer, bar


def check_judge(roles: Roles, cfg: ExperimentConfig, run_dir: Path) -> None:
    """The judge reliability check on the calibration set, once at the start: ``judge_check.json``, a warning."""
    from cai_ray.constitution import load_constitution
    from cai_ray.judge_check import judge_check, trained_axes, warn_if_at_chance

    constitution = load_constitution(cfg.constitution.path)
    report = judge_check(roles.feedback.label_pairs, constitution, tiers=cfg.constitution.tiers,
                         trained_axes=trained_axes(constitution, cfg.feedback.label_axes, cfg.constitution.tiers))
    (run_dir / "judge_check.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    warn_if_at_chance(report)


def log_iteration(writer: MetricsWriter, bar: tqdm, iteration: int, metrics: Metrics) -> Metrics:
    """Log one iteration's metrics and show its reward and PM accuracy on the progress bar; returns them."""
    writer.log(iteration, metrics)
    bar.set_postfix(reward=f"{metrics.get('reward/mean', math.nan):.3f}",
                    pm_acc=f"{metrics.get('pm_fresh/accuracy', math.nan):.2f}")
    bar.update()
    return metrics


# ------------------------------------------------------------------------------------ phases
def make_pairs(samples: Sequence[Sample], *, iteration: int) -> tuple[list[ComparisonRequest], list[tuple[Sample, Sample]]]:
    """Pair consecutive samples of the same prompt: (0,1), (2,3), ...; an odd one out is unused."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.prompt_id, []).append(s)
    requests, pairs = [], []
    for pid, group in groups.items():
        group.sort(key=lambda s: s.sample_index)
        for j in range(0, len(group) - 1, 2):
            a, b = group[j], group[j + 1]
            requests.append(ComparisonRequest(f"it{iteration}/{pid}/{j}", a.prompt, a.response_text, b.response_text))
            pairs.append((a, b))
    return requests, pairs


def pair_for_training(pair: tuple[Sample, Sample], label: PreferenceLabel) -> TrainPair:
    """A labelled pair as the learner's input."""
    a, b = pair
    axis_probs = tuple(label.axis_probs.values()) if label.axis_probs else None  # in feedback.label_axes order
    return TrainPair(a.prompt_token_ids, a.response_token_ids, b.response_token_ids, label.prob_a, axis_probs)


def pm_score_rows(samples: Sequence[Sample], scores: Sequence[Sequence[float]],
                  axes: Sequence[str]) -> list[dict[str, object]]:
    """One row per sample: its prompt, index and weight version, and each PM head's score by axis."""
    return [{"prompt_id": s.prompt_id, "sample_index": s.sample_index, "weight_version": s.weight_version,
             "scores": dict(zip(axes, row, strict=True))} for s, row in zip(samples, scores, strict=True)]


def write_pm_scores(learner: LearnerGroup, samples: Sequence[Sample], path: Path) -> None:
    """The multi-head PM's per-axis scores of this iteration's samples as JSONL, for ``cai-ray axes``.

    Called before the PM's update, so the PM has trained on none of these samples: they are held out from it
    the way ``pm_fresh/*`` is. Nothing is written for a one-head PM or an iteration without samples.
    """
    axes = learner.roles.pm_axes
    if axes and samples:
        seqs = [TrainSequence(s.prompt_token_ids, s.response_token_ids) for s in samples]
        write_jsonl(pm_score_rows(samples, learner.forward(pm_axis_scores, seqs), axes), path)


def nothing_to_train(rollout: RolloutBatch, labels: Sequence[PreferenceLabel], fresh: Sequence[TrainPair], *,
                     update: PolicyUpdate) -> str | None:
    """Why the policy update would have no input this iteration (None: there is something to train on).

    No samples at all (every prompt rejected); DPO with no labelled pair (every label errored); GRPO / RLOO
    with no prompt that has all its samples. PPO and REINFORCE++ train on any samples, labelled or not.
    """
    if not rollout.samples:
        first = f" (first: {rollout.rejected[0].reason})" if rollout.rejected else ""
        return f"no samples: all {len(rollout.rejected)} prompts were rejected{first}"
    reason = update.nothing_to_train(rollout.samples, fresh)
    if reason is not None and update.from_labels:
        errors = [lab.error for lab in labels if lab.error is not None]
        first = f" (first: {errors[0]})" if errors else ""
        return f"{reason}: {len(errors)} of {len(labels)} labels errored{first}"
    return reason


def empty_iteration(iteration: int, reason: str, *, policy: str) -> Metrics:
    """The metrics of an iteration that trains nothing, or :class:`EmptyIterationError` when ``policy`` is 'error'."""
    if policy == "error":
        raise EmptyIterationError(
            f"RL-CAI iteration {iteration} has nothing to train on: {reason}. Fix the cause, or set "
            "schedule.on_empty_iteration=skip to log such iterations as empty and go on")
    logger.warning("RL-CAI iteration %d is empty (nothing trained, no weight sync): %s", iteration, reason)
    return {"iteration/empty": 1.0, "iteration/empty_reason": reason}


def sample_stats(samples: Sequence[Sample], *, current_version: int) -> Metrics:
    """Response length, truncation rate, and how many weight versions the oldest sample lags behind."""
    lengths = [len(s.response_token_ids) for s in samples]
    return {"samples/count": float(len(samples)), "response/length_mean": _mean(lengths),
            "response/truncated_frac": _mean([float(s.finish_reason == "length") for s in samples]),
            "samples/staleness_max": float(max((current_version - s.weight_version for s in samples), default=0))}


def label_stats(labels: Sequence[PreferenceLabel]) -> Metrics:
    """Mean soft label, mean binary entropy (a collapsed judge has entropy near 0 or near log 2), errors."""
    ok = [lab.prob_a for lab in labels if lab.error is None]
    ent = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0 for p in ok]
    out = {"labels/count": float(len(ok)), "labels/errors": float(len(labels) - len(ok)),
           "labels/prob_a_mean": _mean(ok), "labels/entropy": _mean(ent)}
    per_axis: dict[str, list[float]] = {}
    for lab in labels:  # feedback.label_axes: how decisive the judge is on each axis
        for axis, p in (lab.axis_probs or {}).items() if lab.error is None else ():
            per_axis.setdefault(axis, []).append(abs(p - 0.5))
    out.update({f"labels/{axis}/decisiveness": _mean(v) for axis, v in per_axis.items()})
    return out


# ---------------------------------------------------------------------------------- durability
def save_checkpoint(learner: LearnerGroup, state: LoopState, run_dir: Path, cfg: ExperimentConfig) -> None:
    """Learner states + loop state + config, swapped in atomically (see :mod:`cai_ray.pipelines.checkpoint`)."""

    def write(folder: Path) -> None:
        learner.save_checkpoint(str(folder / "learner"), bucket_bytes=cfg.sync.bucket_size_mb << 20)
        write_loop_files(folder, state, cfg.model_dump(mode="json"))

    write_atomically(checkpoint_dir(run_dir), write)


# -------------------------------------------------------------------------------------- helpers
def _prompt_pool(cfg: ExperimentConfig) -> dict[str, list[Prompt]]:
    return {"red_team": read_prompts(cfg.data.red_team), "helpful": read_prompts(cfg.data.helpful)}


def _iteration_prompts(cfg: ExperimentConfig, pool: dict[str, list[Prompt]], iteration: int, *,
                       archive: Sequence[Attack] = ()) -> list[Prompt]:
    """The iteration's prompts, a pure function of (seed, iteration, archive) so a resumed run draws the same ones.

    ``schedule.red_team_fraction`` of the red-team prompts come from the attack ``archive`` as it was before
    this iteration's red-team phase (empty unless red-teaming is on).
    """
    rng = random.Random(stable_seed(cfg.seed, "prompts", iteration))
    n = cfg.schedule.num_prompts_per_iteration
    n_helpful = round(n * cfg.schedule.helpful_fraction)
    picked = draw_red_team_prompts(pool["red_team"], archive, n - n_helpful, fraction=cfg.schedule.red_team_fraction,
                                   rng=rng)
    picked += rng.sample(pool["helpful"], min(n_helpful, len(pool["helpful"])))
    return picked


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
