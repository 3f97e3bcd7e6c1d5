"""Aggregating per-axis feedback into one training signal.

A per-axis label is ``{axis: p}`` with p = P(response A is better on that axis). Rules:
- ``mean``: the mean of the labelled axes;
- ``weighted``: the weight-normalised mean (every labelled axis needs a weight);
- ``priority``: the constitution's tier order decides lexicographically. Axes are grouped by tier rank;
  the highest tier whose mean preference is clear (|p_t - 0.5| > margin, strictly) decides and its mean
  is the label; if no tier is clear the label is the mean of all labelled axes (so it stays near 0.5);
- ``soft_priority``: tier t (rank 0 = highest) gets total weight ``decay**t``, split evenly over its
  labelled axes; a differentiable version of ``priority`` that keeps a gradient from every tier.
Axes missing from a label are skipped (the weights renormalise over what is present).

For critic-free RL with one reward per axis, :func:`decoupled_group_advantages` normalises each axis
within its group before the weighted sum and whitens the sum over the batch, as GDPO does for multiple
rewards, so a high-variance axis cannot drown out the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from cai_ray.algorithms.critic_free import grpo_advantages, rloo_advantages

Mode = Literal["mean", "weighted", "priority", "soft_priority"]


def _present(labels: Mapping[str, float]) -> dict[str, float]:
    if not labels:
        raise ValueError("a per-axis label needs at least one axis; got an empty mapping")
    return dict(labels)


def _weighted_mean(labels: Mapping[str, float], weights: Mapping[str, float]) -> float:
    total = sum(weights[a] for a in labels)
    if total <= 0:
        raise ValueError(f"axis weights of the labelled axes {sorted(labels)} sum to {total}; need > 0")
    return sum(weights[a] * p for a, p in labels.items()) / total


def axis_weights(axes: list[str], *, mode: Mode, weights: Mapping[str, float] | None = None,
                 ranks: Mapping[str, int] | None = None, decay: float = 0.5) -> dict[str, float]:
    """Linear weights over ``axes`` (summing to 1) for the linear modes; ``priority`` uses its soft weights.

    Used where the signal must be linear in the per-axis scores (rewards of a multi-head PM).
    """
    if not axes:
        raise ValueError("axis_weights needs at least one axis")
    if mode == "mean":
        raw = {a: 1.0 for a in axes}
    elif mode == "weighted":
        missing = [a for a in axes if weights is None or a not in weights]
        if missing:
            raise ValueError(f"weighted aggregation: no weight for axis/axes {missing}; add them to the weights")
        raw = {a: float(weights[a]) for a in axes}  # type: ignore[index]
    else:
        raw = _tier_weights(axes, ranks, decay)
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"axis weights {raw} sum to {total}; need > 0")
    return {a: w / total for a, w in raw.items()}


def _tier_weights(axes: list[str], ranks: Mapping[str, int] | None, decay: float) -> dict[str, float]:
    if ranks is None or any(a not in ranks for a in axes):
        missing = [a for a in axes if ranks is None or a not in ranks]
        raise ValueError(f"priority aggregation: no tier rank for axis/axes {missing}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"priority decay must be in (0, 1], got {decay}")
    per_tier: dict[int, int] = {}
    for a in axes:
        per_tier[ranks[a]] = per_tier.get(ranks[a], 0) + 1
    return {a: decay ** ranks[a] / per_tier[ranks[a]] for a in axes}


def priority_label(labels: Mapping[str, float], ranks: Mapping[str, int], margin: float) -> float:
    """Lexicographic tier decision: the mean of the highest tier with |mean - 0.5| > margin."""
    present = _present(labels)
    missing = [a for a in present if a not in ranks]
    if missing:
        raise ValueError(f"priority aggregation: no tier rank for axis/axes {missing}")
    for rank in sorted({ranks[a] for a in present}):
        tier = [p for a, p in present.items() if ranks[a] == rank]
        p_tier = sum(tier) / len(tier)
        if abs(p_tier - 0.5) > margin:
            return p_tier
    return sum(present.values()) / len(present)


def aggregate_label(labels: Mapping[str, float], *, mode: Mode, weights: Mapping[str, float] | None = None,
                    ranks: Mapping[str, int] | None = None, margin: float = 0.1, decay: float = 0.5) -> float:
    """One soft label P(A better) from per-axis soft labels, by ``mode`` (see the module docstring)."""
    present = _present(labels)
    if mode == "priority":
        if ranks is None:
            raise ValueError("priority aggregation needs tier ranks per axis")
        return priority_label(present, ranks, margin)
    return _weighted_mean(present, axis_weights(list(present), mode=mode, weights=weights, ranks=ranks,
                                                decay=decay))


def decoupled_group_advantages(rewards: Tensor, weights: Tensor, *, group_size: int,
                               estimator: Literal["grpo", "rloo"] = "grpo", eps: float = 1e-6) -> Tensor:
    """GDPO-style advantages: normalise each axis's reward within its group, sum with ``weights``, whiten.

    Args:
        rewards: [B, K] per-axis rewards, groups of ``group_size`` contiguous rows.
        weights: [K] axis weights.
        group_size: samples per prompt (>= 2, divides B).
        estimator: per-axis baseline, ``grpo`` (group z-score) or ``rloo`` (leave-one-out).
        eps: added to standard deviations.

    Returns:
        [B] advantages (detached), zero mean and unit std over the batch (all zero if constant).
    """
    if rewards.dim() != 2 or weights.shape != (rewards.shape[1],):
        raise ValueError(f"rewards must be [B, K] and weights [K]; got {tuple(rewards.shape)} and "
                         f"{tuple(weights.shape)}")
    per_axis = [
        grpo_advantages(rewards=rewards[:, k], group_size=group_size, eps=eps) if estimator == "grpo"
        else rloo_advantages(rewards=rewards[:, k], group_size=group_size)
        for k in range(rewards.shape[1])
    ]
    summed = (torch.stack(per_axis, dim=-1) * weights.to(rewards.dtype)).sum(dim=-1)
    centered = summed - summed.mean()
    return (centered / (summed.std(unbiased=False) + eps)).detach()
