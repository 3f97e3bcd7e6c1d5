"""Critic-free advantage estimators: GRPO (and Dr. GRPO), RLOO and REINFORCE++.

GRPO and RLOO sample k responses per prompt and use the group as the baseline:
GRPO normalises rewards within the group, (r - mean_g) / (std_g + eps) (``scale=False``
gives Dr. GRPO's mean-centering only); RLOO subtracts the mean of the other k - 1 rewards.
REINFORCE++ takes per-token rewards (e.g. KL-penalised, from ``ppo.kl_penalized_rewards``),
forms the discounted return-to-go and whitens it over the whole batch.
Groups are contiguous rows ``[g*k:(g+1)*k]``; std is the population std (unbiased=False).
Sequence-level advantages are broadcast to tokens with ``broadcast_sequence_advantages``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cai_ray.algorithms.common import masked_whiten


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Reshape [B] rewards into [B // group_size, group_size] after validating shapes."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    batch = rewards.shape[0]
    if batch % group_size != 0:
        raise ValueError(
            f"batch size {batch} is not divisible by group_size {group_size}; "
            "each prompt needs exactly group_size contiguous samples"
        )
    return rewards.reshape(batch // group_size, group_size)


def grpo_advantages(
    *, rewards: Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
) -> Tensor:
    """Group-normalised advantages: (r - mean_g) / (std_g + eps), std with unbiased=False.

    Args:
        rewards: [B] scalar rewards, groups of ``group_size`` contiguous rows.
        group_size: samples per prompt k (>= 2, divides B).
        eps: added to the group std.
        scale: if False, only subtract the group mean (Dr. GRPO).

    Returns:
        [B] advantages (detached).
    """
    grouped = _grouped(rewards.detach(), group_size)
    centered = grouped - grouped.mean(dim=-1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=-1, unbiased=False, keepdim=True) + eps)
    return centered.reshape(-1)


def rloo_advantages(*, rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out advantages: r_i - mean of the other k - 1 rewards in its group.

    Args:
        rewards: [B] scalar rewards, groups of ``group_size`` contiguous rows.
        group_size: samples per prompt k (>= 2, divides B).

    Returns:
        [B] advantages (detached).
    """
    grouped = _grouped(rewards.detach(), group_size)
    others_mean = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)


def reinforce_pp_advantages(
    *, token_rewards: Tensor, mask: Tensor, gamma: float = 1.0
) -> Tensor:
    """REINFORCE++ advantages: discounted return-to-go per token, whitened over the batch.

    G_t = r_t + gamma * G_{t+1} with rewards at masked-out positions treated as 0, then
    ``masked_whiten`` over all response tokens of the batch.

    Args:
        token_rewards: [B, T] per-token rewards (e.g. -kl_coef * KL plus final reward).
        mask: [B, T] 1 on response tokens.
        gamma: discount factor.

    Returns:
        [B, T] advantages (detached), 0 at masked-out positions.
    """
    m = mask.to(token_rewards.dtype)
    rewards = token_rewards.detach() * m
    running = torch.zeros_like(rewards[:, 0])
    reversed_returns = []
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[:, t] + gamma * running
        reversed_returns.append(running)
    returns = torch.stack(reversed_returns[::-1], dim=-1)
    return masked_whiten(returns, mask)


def broadcast_sequence_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcast per-sequence advantages [B] to tokens [B, T], zero where mask is 0."""
    return advantages.detach().unsqueeze(-1) * mask.to(advantages.dtype)
