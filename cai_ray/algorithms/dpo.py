"""Direct Preference Optimisation (sigmoid DPO) with soft AI-feedback labels.

With h = (log pi(a) - log ref(a)) - (log pi(b) - log ref(b)) and target p = P(a preferred),
loss = -[p * log sigmoid(beta * h) + (1 - p) * log sigmoid(-beta * h)], i.e. BCE of
sigmoid(beta * h) against p; p = 1 is standard DPO. ``label_smoothing`` eps mixes p toward
0.5 as p' = p(1 - eps) + (1 - p) eps (conservative DPO). Simplifications: sequence
log-probs are precomputed sums over response tokens (no length normalisation); mean over B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_loss(
    *,
    policy_logps_a: Tensor,
    policy_logps_b: Tensor,
    ref_logps_a: Tensor,
    ref_logps_b: Tensor,
    prob_a: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Sigmoid DPO loss with soft labels.

    Args:
        policy_logps_a: [B] policy sequence log-prob of response a (with grad).
        policy_logps_b: [B] policy sequence log-prob of response b (with grad).
        ref_logps_a: [B] reference sequence log-prob of response a.
        ref_logps_b: [B] reference sequence log-prob of response b.
        prob_a: [B] target probability that a is preferred, in [0, 1].
        beta: inverse temperature of the implicit reward.
        label_smoothing: eps in [0, 0.5], mixes the target toward 0.5.

    Returns:
        Scalar loss and metrics ``loss/dpo``, ``dpo/reward_margin`` (mean chosen minus
        rejected implicit reward), ``dpo/accuracy`` (fraction with chosen > rejected),
        ``dpo/chosen_reward``, ``dpo/rejected_reward``; "chosen" is a where prob_a >= 0.5,
        else b, and the implicit reward is beta * (log pi - log ref).
    """
    log_ratio_a = policy_logps_a - ref_logps_a.detach()
    log_ratio_b = policy_logps_b - ref_logps_b.detach()
    logits = beta * (log_ratio_a - log_ratio_b)
    p = prob_a.to(logits.dtype)
    target = p * (1.0 - label_smoothing) + (1.0 - p) * label_smoothing
    losses = -(target * F.logsigmoid(logits) + (1.0 - target) * F.logsigmoid(-logits))
    loss = losses.mean()

    with torch.no_grad():
        reward_a = beta * log_ratio_a.detach()
        reward_b = beta * log_ratio_b.detach()
        a_chosen = p >= 0.5
        chosen = torch.where(a_chosen, reward_a, reward_b)
        rejected = torch.where(a_chosen, reward_b, reward_a)
    metrics = {
        "loss/dpo": float(loss.detach()),
        "dpo/reward_margin": float((chosen - rejected).mean()),
        "dpo/accuracy": float((chosen > rejected).float().mean()),
        "dpo/chosen_reward": float(chosen.mean()),
        "dpo/rejected_reward": float(rejected.mean()),
    }
    return loss, metrics
