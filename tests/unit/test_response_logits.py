"""Only the loss columns go through the LM head: same log-probs and SFT loss as the full forward (fp32 tolerance)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from cai_ray.algorithms.common import gather_token_logprobs
from cai_ray.algorithms.sft import sft_loss
from cai_ray.training.learner import token_logprobs
from cai_ray.training.modeling import collate_sequences, response_logits
from cai_ray.types import TrainSequence

FP32_TOL = 1e-5  # a slice of the LM head's matmul vs the whole one: same values up to fp32 summation order


def _seq(prompt: list[int], response: list[int]) -> TrainSequence:
    return TrainSequence(prompt_token_ids=tuple(prompt), response_token_ids=tuple(response))


# Prompts of 5 and 3 tokens, then a filler row with a 1-token prompt: the loss starts at column 2, not 0.
SEQS = [_seq([5, 6, 7, 8, 9], [10, 11, 2]), _seq([5, 6, 7], [12, 13, 14, 15, 2]), _seq([5], [6, 7])]


def test_first_loss_column_is_the_earliest_response_column_of_a_valid_row() -> None:
    batch = collate_sequences(SEQS, pad_id=2, num_valid=2)
    assert batch.first_loss_column == 2  # row 1's prompt of 3 tokens; the filler row (column 0) has no loss
    assert collate_sequences(SEQS, pad_id=2).first_loss_column == 0  # the 1-token prompt, now a valid row
    assert collate_sequences(SEQS[:1], pad_id=2, num_valid=0).first_loss_column == 0  # no loss anywhere


@pytest.fixture(scope="module")
def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).float().eval()


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: every column is computed, the extra ones dropped."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def _full_logits(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]


@pytest.mark.parametrize("wrapped", [False, True])
def test_token_logprobs_match_the_full_forward_on_the_loss_columns(tiny_llama: nn.Module, wrapped: bool) -> None:
    model = _NoLogitsToKeep(tiny_llama) if wrapped else tiny_llama
    batch = collate_sequences(SEQS, pad_id=2, num_valid=2)
    with torch.no_grad():
        full = gather_token_logprobs(_full_logits(tiny_llama, batch), batch.labels)
        trimmed = token_logprobs(model, batch)
        logits, start = response_logits(model, batch)
    assert start == 2 and logits.shape[:2] == (3, batch.labels.shape[1] - 2)
    assert trimmed.shape == full.shape
    mask = batch.loss_mask.bool()
    torch.testing.assert_close(trimmed[mask], full[mask], rtol=0, atol=FP32_TOL)
    assert (trimmed[:, :start] == 0).all()  # never computed, and outside every row's loss mask


def test_sft_loss_and_its_gradient_match_the_full_forward(tiny_llama: nn.Module) -> None:
    batch = collate_sequences(SEQS[:2], pad_id=2)

    def loss_and_grad(trim: bool) -> tuple[float, torch.Tensor]:
        tiny_llama.zero_grad()
        if trim:
            logits, start = response_logits(tiny_llama, batch)
        else:
            logits, start = _full_logits(tiny_llama, batch), 0
        loss, _ = sft_loss(logits=logits, labels=batch.labels[:, start:], loss_mask=batch.loss_mask[:, start:])
        loss.backward()
        return float(loss.detach()), tiny_llama.lm_head.weight.grad.clone()

    full_loss, full_grad = loss_and_grad(trim=False)
    loss, grad = loss_and_grad(trim=True)
    assert loss == pytest.approx(full_loss, abs=FP32_TOL)
    torch.testing.assert_close(grad, full_grad, rtol=0, atol=FP32_TOL)
