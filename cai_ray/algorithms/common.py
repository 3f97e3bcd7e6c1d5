"""Shared tensor helpers for the algorithm layer.

Masked reductions (``masked_mean``/``masked_sum``), masked whitening, and the
log-softmax-then-gather used to score sampled or labelled tokens. Masks are 0/1 tensors
(bool or float) broadcastable to ``values``; a position with mask 0 never affects a result.
Simplifications: an all-zero mask yields a mean of 0 (not NaN), and whitening uses the
population variance (divide by the number of masked elements, no Bessel correction).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1, over ``dim`` (all elements if None)."""
    masked = values * mask.to(values.dtype)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1, over ``dim`` (all elements if None).

    Where the mask has no ones the result is 0 rather than NaN.
    """
    mask = mask.to(values.dtype)
    total = masked_sum(values, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1.0)


def masked_whiten(
    values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Normalise ``values`` to zero mean and unit variance over the masked elements.

    Statistics are taken over all masked elements jointly (population variance).
    With ``shift_mean=False`` the mean is added back (only the scale changes).
    Masked-out positions are set to 0 in the output.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def gather_token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of ``tokens`` under ``logits``: log_softmax over V, then gather.

    Args:
        logits: [B, T, V]; ``logits[:, t]`` scores ``tokens[:, t]`` (already shifted).
        tokens: [B, T] integer ids, each in ``[0, V)``.

    Returns:
        [B, T] float32 log-probabilities.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(dim=-1, index=tokens.long().unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sum of token log-probabilities over masked positions: [B, T] -> [B]."""
    return masked_sum(token_logprobs, mask, dim=-1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last position with ``attention_mask == 1`` in each row: [B, T] -> [B].

    Works for right padding (last real token) and left padding (always T - 1).
    A row with no ones returns 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.bool().long() * positions).amax(dim=-1)
