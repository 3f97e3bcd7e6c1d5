"""Supervised fine-tuning loss (SL-CAI stage): masked next-token negative log-likelihood.

The loss is the mean NLL over tokens where ``loss_mask`` is 1 (the response, i.e. the
revised answer), with labels already shifted so ``logits[:, t]`` predicts ``labels[:, t]``.
Simplifications: the mean is over the tokens of this batch only (token-mean per micro-batch,
not normalised across gradient-accumulation steps or data-parallel ranks). The mask is given
explicitly and never derived from a pad id, since pad == eos in some tokenizers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cai_ray.algorithms.common import gather_token_logprobs, masked_mean


def sft_loss(
    *, logits: Tensor, labels: Tensor, loss_mask: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Masked token NLL averaged over response tokens.

    Args:
        logits: [B, T, V] model outputs, aligned so ``logits[:, t]`` predicts ``labels[:, t]``.
        labels: [B, T] target ids; values at masked positions are ignored (may be -100).
        loss_mask: [B, T] 1 where the token contributes to the loss, else 0.

    Returns:
        Scalar loss and metrics ``loss/sft``, ``sft/num_tokens``.
    """
    keep = loss_mask.bool()
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
    token_logprobs = gather_token_logprobs(logits, safe_labels)
    loss = -masked_mean(token_logprobs, loss_mask)
    metrics = {
        "loss/sft": float(loss.detach()),
        "sft/num_tokens": float(keep.sum()),
    }
    return loss, metrics
