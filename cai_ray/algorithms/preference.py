"""Preference-model (PM) loss for RL-CAI: Bradley-Terry with soft AI-feedback targets.

The PM gives each (prompt, response) a scalar reward r, read at the last non-pad token.
P(a preferred over b) = sigmoid(r_a - r_b), trained with binary cross-entropy against a
soft target p (the feedback model's normalised preference for a), so p = 1 recovers the
usual -log sigmoid(r_chosen - r_rejected). Simplifications: no margin term and no reward
centering regulariser; ties (p == 0.5) contribute to the loss but not to the accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cai_ray.algorithms.common import last_token_index

__all__ = ["calibration_metrics", "last_token_index", "preference_loss"]


def preference_loss(
    *, reward_a: Tensor, reward_b: Tensor, prob_a: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Bradley-Terry BCE: mean of BCE(sigmoid(reward_a - reward_b), prob_a).

    Args:
        reward_a: [B] scalar rewards for response a.
        reward_b: [B] scalar rewards for response b.
        prob_a: [B] soft target probability that a is preferred, in [0, 1].

    Returns:
        Scalar loss and metrics:
        ``loss/pm``; ``pm/accuracy``, the fraction of decisive pairs (prob_a != 0.5) where
        sign(reward_a - reward_b) agrees with prob_a > 0.5 (0.5 when there are none);
        ``pm/num_decisive``; ``pm/margin_mean``, the mean over decisive pairs of
        (r_preferred - r_other) (0.0 when there are none).
    """
    margin = reward_a - reward_b
    target = prob_a.to(margin.dtype)
    loss = F.binary_cross_entropy_with_logits(margin, target)

    with torch.no_grad():
        direction = torch.sign(target - 0.5)  # +1: a preferred, -1: b preferred, 0: tie
        decisive = direction != 0
        num_decisive = int(decisive.sum())
        if num_decisive > 0:
            signed_margin = (margin * direction)[decisive]
            accuracy = float((signed_margin > 0).float().mean())
            margin_mean = float(signed_margin.mean())
        else:
            accuracy, margin_mean = 0.5, 0.0

    metrics = {
        "loss/pm": float(loss.detach()),
        "pm/accuracy": accuracy,
        "pm/num_decisive": float(num_decisive),
        "pm/margin_mean": margin_mean,
    }
    return loss, metrics


def calibration_metrics(
    *, pred_prob_a: Tensor, prob_a: Tensor, num_bins: int = 10
) -> dict[str, float]:
    """Expected calibration error and Brier score of predicted vs target P(a preferred).

    ECE bins ``pred_prob_a`` into ``num_bins`` equal-width bins on [0, 1] and sums, over
    non-empty bins, (bin size / B) * |mean prediction - mean target|. Brier is
    mean((pred_prob_a - prob_a) ** 2); with soft targets both compare against the soft label.

    Args:
        pred_prob_a: [B] predicted probabilities, e.g. sigmoid(reward_a - reward_b).
        prob_a: [B] target probabilities in [0, 1].
        num_bins: number of equal-width bins (>= 1).

    Returns:
        ``{"pm/ece": float, "pm/brier": float}``.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    pred = pred_prob_a.detach().double().flatten()
    target = prob_a.detach().double().flatten()
    if pred.numel() == 0:
        return {"pm/ece": 0.0, "pm/brier": 0.0}
    bins = (pred * num_bins).floor().long().clamp(0, num_bins - 1)
    counts = torch.bincount(bins, minlength=num_bins).double()
    pred_sum = torch.bincount(bins, weights=pred, minlength=num_bins)
    target_sum = torch.bincount(bins, weights=target, minlength=num_bins)
    gap = (pred_sum - target_sum).abs() / counts.clamp(min=1.0)
    ece = (counts / pred.numel() * gap).sum()
    brier = ((pred - target) ** 2).mean()
    return {"pm/ece": float(ece), "pm/brier": float(brier)}
