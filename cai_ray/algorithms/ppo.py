"""PPO for RL-CAI: GAE, KL estimators, KL-penalised rewards, clipped policy and value losses.

Per-token rewards are -kl_coef * KL(pi || ref) at each response token plus the PM reward at
the last response token; advantages come from GAE over the value model, and the policy and
value heads are trained with the clipped PPO objectives (optionally asymmetric "clip-higher").
Simplifications: sequences are right-padded with the response marked by ``mask``; the value
after the last response token is 0 (episode ends); losses are token means over the whole
micro-batch; no entropy bonus, no dual-clip, no adaptive KL controller (kl_coef is given).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cai_ray.algorithms.common import last_token_index, masked_mean

KLEstimator = Callable[[Tensor, Tensor], Tensor]


def gae_advantages(
    *, rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with
    rewards and values at masked-out positions treated as 0 (so the value after the last
    response token is 0). Inputs are detached.

    Args:
        rewards: [B, T] per-token rewards.
        values: [B, T] value estimates V_t.
        mask: [B, T] 1 on response tokens, right-padded.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both [B, T], with returns = advantages + values and
        zeros at masked-out positions.
    """
    m = mask.to(values.dtype)
    rewards = rewards.detach().to(values.dtype) * m
    values = values.detach() * m
    num_tokens = values.shape[-1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(num_tokens)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        next_value = values[:, t]
        reversed_adv.append(next_adv)
    advantages = torch.stack(reversed_adv[::-1], dim=-1)
    returns = (advantages + values) * m
    return advantages * m, returns


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 KL estimator, elementwise: logp - ref_logp (unbiased, can be negative)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 KL estimator, elementwise: 0.5 * (logp - ref_logp)^2 (biased, >= 0)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 KL estimator, elementwise: exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def kl_penalized_rewards(
    *,
    sequence_rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: KLEstimator = kl_k1,
) -> Tensor:
    """Per-token rewards: -kl_coef * KL_t at response tokens, plus the scalar reward at the last.

    Args:
        sequence_rewards: [B] scalar (PM) reward per sequence.
        logprobs: [B, T] policy log-probs of the sampled tokens.
        ref_logprobs: [B, T] reference-model log-probs of the same tokens.
        mask: [B, T] 1 on response tokens.
        kl_coef: KL penalty coefficient.
        kl_estimator: elementwise estimator, ``kl_k1``, ``kl_k2`` or ``kl_k3`` (``learner.ppo.kl_estimator``).

    Returns:
        [B, T] detached rewards, zero at masked-out positions (and all-zero for empty rows).
    """
    m = mask.to(logprobs.dtype)
    kl = kl_estimator(logprobs.detach(), ref_logprobs.detach())
    rewards = -kl_coef * kl * m
    last = last_token_index(mask)
    has_tokens = mask.bool().any(dim=-1).to(rewards.dtype)
    bonus = sequence_rewards.detach().to(rewards.dtype) * has_tokens
    return rewards.scatter_add(-1, last.unsqueeze(-1), bonus.unsqueeze(-1))


def policy_loss(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate, token mean over ``mask``.

    loss_t = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A_t),
    ratio_t = exp(logprobs_t - old_logprobs_t); ``clip_eps_high`` defaults to ``clip_eps``.

    Args:
        logprobs: [B, T] current policy log-probs (with grad).
        old_logprobs: [B, T] log-probs of the sampling policy.
        advantages: [B, T] advantages (already broadcast to tokens).
        mask: [B, T] 1 on response tokens.
        clip_eps: lower clip range.
        clip_eps_high: upper clip range (None: same as ``clip_eps``).

    Returns:
        Scalar loss and metrics ``loss/policy``, ``policy/clip_frac`` (fraction of tokens
        where the clipped term is the active one), ``policy/approx_kl`` (k3 estimate of
        KL(old || new)), ``policy/ratio_mean``.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surr_unclipped = ratio * advantages
    surr_clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
    loss = masked_mean(-torch.minimum(surr_unclipped, surr_clipped), mask)

    with torch.no_grad():
        clip_frac = masked_mean((surr_clipped < surr_unclipped).float(), mask)
        approx_kl = masked_mean(kl_k3(old_logprobs, logprobs.detach()), mask)
        ratio_mean = masked_mean(ratio.detach(), mask)
    metrics = {
        "loss/policy": float(loss.detach()),
        "policy/clip_frac": float(clip_frac),
        "policy/approx_kl": float(approx_kl),
        "policy/ratio_mean": float(ratio_mean),
    }
    return loss, metrics


def value_loss(
    *,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2).

    Args:
        values: [B, T] current value predictions (with grad).
        old_values: [B, T] values at rollout time.
        returns: [B, T] GAE returns (targets).
        mask: [B, T] 1 on response tokens.
        clip_eps: value clip range around ``old_values``.

    Returns:
        Scalar loss (token mean over ``mask``) and metrics ``loss/value``,
        ``value/clip_frac`` (fraction of tokens where the clipped error is larger).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((err_clipped > err_unclipped).float(), mask)
    metrics = {
        "loss/value": float(loss.detach()),
        "value/clip_frac": float(clip_frac),
    }
    return loss, metrics
