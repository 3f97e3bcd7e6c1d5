"""The RL loop's update phases: the policy update chosen once from ``learner.algorithm``, and the PM update.

:func:`policy_update` is the one place that reads ``learner.algorithm``: it binds the algorithm's update
function (:mod:`cai_ray.training.updates`) to its own sub-config and says what it trains on. The loop then
calls the :class:`PolicyUpdate` it got, once per iteration, without switching on the name again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from cai_ray.algorithms.preference import calibration_metrics, preference_loss
from cai_ray.config import LearnerConfig
from cai_ray.metrics import Metrics
from cai_ray.training import updates
from cai_ray.training.group import LearnerGroup, RankFn
from cai_ray.training.learner import pm_axis_scores, pm_scores
from cai_ray.types import Sample, TrainPair, TrainSequence


@dataclass(frozen=True)
class PolicyUpdate:
    """One policy-update algorithm, bound to its settings: call it with an iteration's samples and labels."""

    name: str  # learner.algorithm, for metrics and messages
    fn: RankFn  # the update every learner rank runs, its sub-config bound
    samples_per_prompt: int  # rollout.num_samples_per_prompt
    from_labels: bool = False  # DPO: learns from the labelled pairs; the PM's reward is only a monitor
    whole_groups: bool = False  # GRPO / RLOO: trains on prompts with all their samples; a group never splits

    def __call__(self, learner: LearnerGroup, samples: Sequence[Sample], pairs: Sequence[TrainPair]) -> Metrics:
        """One policy update (its ``num_policy_epochs`` passes); its metrics plus the PM reward's."""
        if self.whole_groups:
            whole = whole_groups(samples, self.samples_per_prompt)
            samples = [s for s in samples if s.prompt_id in whole]
        groups = _group_ids(samples)
        seqs = [TrainSequence(s.prompt_token_ids, s.response_token_ids, s.response_logprobs,
                              group_id=groups[s.prompt_id]) for s in samples]
        if self.from_labels:
            rewards = learner.forward(pm_scores, seqs) if seqs and learner.roles.preference_model else []
            return _reward_stats(rewards) | self.train(learner, pairs)
        rewards = learner.forward(pm_scores, seqs) if seqs else []
        per_axis = learner.roles.pm_axes and self.whole_groups and seqs  # GDPO-style advantages
        axis_rewards = [tuple(r) for r in learner.forward(pm_axis_scores, seqs)] if per_axis else [None] * len(seqs)
        scored = [TrainSequence(s.prompt_token_ids, s.response_token_ids, s.rollout_logprobs, r, s.group_id, ar)
                  for s, r, ar in zip(seqs, rewards, axis_rewards, strict=True)]
        return {"reward/mean": _mean(rewards), "reward/std": _std(rewards)} | self.train(learner, scored)

    def train(self, learner: LearnerGroup, items: Sequence[TrainPair] | Sequence[TrainSequence]) -> Metrics:
        """The update on the learner ranks: on labelled pairs (DPO) or scored sequences, a group never split."""
        if not self.from_labels:  # checked before the fan-out: a rank that raised would leave the others waiting
            missing = [i for i, s in enumerate(items) if getattr(s, "reward", None) is None]
            if missing:
                raise ValueError(f"sequences {missing[:5]} have no reward; score them first (learner.pm_scores)")
        if not self.whole_groups:
            return learner.update(self.fn, list(items))
        k = self.samples_per_prompt
        return learner.update(partial(self.fn, samples_per_prompt=k), list(items), unit=k)

    def nothing_to_train(self, samples: Sequence[Sample], fresh: Sequence[TrainPair]) -> str | None:
        """Why this update would have no input, given samples (some) and labelled pairs (None: it has one)."""
        if self.from_labels and not fresh:
            return "no labelled pair for DPO"
        if self.whole_groups and not whole_groups(samples, self.samples_per_prompt):
            return f"no prompt has all {self.samples_per_prompt} samples that {self.name} needs as a group"
        return None


def policy_update(learner: LearnerConfig, *, samples_per_prompt: int) -> PolicyUpdate:
    """The update ``learner.algorithm`` names, each function given only its own sub-config."""
    epochs = learner.num_policy_epochs
    if learner.algorithm == "dpo":
        return PolicyUpdate("dpo", partial(updates.dpo, cfg=learner.dpo, num_epochs=epochs), samples_per_prompt,
                            from_labels=True)
    if learner.algorithm == "ppo":
        return PolicyUpdate("ppo", partial(updates.ppo, cfg=learner.ppo, num_epochs=epochs), samples_per_prompt)
    estimators: dict[str, updates.Estimator] = {
        "grpo": partial(updates.grpo, scale_rewards=learner.grpo.scale_rewards),
        "rloo": updates.rloo,
        "reinforce_pp": updates.reinforce_pp,
    }
    fn = partial(updates.group, cfg=learner.ppo, estimator=estimators[learner.algorithm], num_epochs=epochs)
    return PolicyUpdate(learner.algorithm, fn, samples_per_prompt, whole_groups=learner.algorithm != "reinforce_pp")


def update_preference_model(learner: LearnerGroup, fresh: Sequence[TrainPair], replay: Sequence[Sequence[TrainPair]],
                            *, epochs: int) -> Metrics:
    """The PM's accuracy on the fresh labels before its update, then ``epochs`` steps on the replay window."""
    pairs = [p for window in replay for p in window]
    metrics: Metrics = preference_accuracy(learner.forward(pm_scores, flatten(fresh)), fresh) if fresh else {}
    if fresh and learner.roles.pm_axes:
        metrics |= axis_preference_accuracy(learner.forward(pm_axis_scores, flatten(fresh)), fresh,
                                            learner.roles.pm_axes)
    for _ in range(epochs if pairs else 0):
        metrics |= learner.update(updates.pm, pairs)
    return metrics


def preference_accuracy(scores: Sequence[float], pairs: Sequence[TrainPair]) -> dict[str, float]:
    """The preference model's accuracy / loss / calibration (ECE, Brier) on labelled pairs, from its scores of
    [a0, b0, a1, b1, ...]."""
    if not pairs:
        return {}
    r = torch.tensor(scores, dtype=torch.float32).view(-1, 2)
    prob_a = torch.tensor([p.prob_a for p in pairs], dtype=torch.float32)
    _, metrics = preference_loss(reward_a=r[:, 0], reward_b=r[:, 1], prob_a=prob_a)
    metrics |= calibration_metrics(pred_prob_a=torch.sigmoid(r[:, 0] - r[:, 1]), prob_a=prob_a)
    # "loss/pm" -> "pm_fresh/loss", "pm/accuracy" -> "pm_fresh/accuracy", ...
    return {k.replace("loss/pm", "pm/loss").replace("pm/", "pm_fresh/", 1): v for k, v in metrics.items()}


def axis_preference_accuracy(scores: Sequence[Sequence[float]], pairs: Sequence[TrainPair],
                             axes: Sequence[str]) -> Metrics:
    """``pm_fresh/<axis>/accuracy`` (and loss, ...) of each PM head on its axis's labels, from [a0, b0, ...] rows."""
    heads = torch.tensor(scores, dtype=torch.float32).view(len(pairs), 2, len(axes))
    targets = torch.tensor([list(p.axis_probs or ()) for p in pairs], dtype=torch.float32)
    out: Metrics = {}
    for j, axis in enumerate(axes):
        _, m = preference_loss(reward_a=heads[:, 0, j], reward_b=heads[:, 1, j], prob_a=targets[:, j])
        out |= {f"pm_fresh/{axis}/{'loss' if k == 'loss/pm' else k.removeprefix('pm/')}": v for k, v in m.items()}
    return out


# -------------------------------------------------------------------------------------- helpers
def flatten(pairs: Sequence[TrainPair]) -> list[TrainSequence]:
    """[a0, b0, a1, b1, ...] as sequences to score."""
    out = []
    for p in pairs:
        out.append(TrainSequence(p.prompt_token_ids, p.response_a_token_ids))
        out.append(TrainSequence(p.prompt_token_ids, p.response_b_token_ids))
    return out


def whole_groups(samples: Sequence[Sample], k: int) -> set[str]:
    """Prompt ids with all ``k`` samples (GRPO / RLOO need complete groups)."""
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.prompt_id] = counts.get(s.prompt_id, 0) + 1
    return {pid for pid, n in counts.items() if n == k}


def _group_ids(samples: Sequence[Sample]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for s in samples:
        ids.setdefault(s.prompt_id, len(ids))
    return ids


def _reward_stats(rewards: Sequence[float]) -> Metrics:
    return {"reward/mean": _mean(rewards), "reward/std": _std(rewards)} if rewards else {}


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
