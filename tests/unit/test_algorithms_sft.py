"""Unit tests for cai_ray.algorithms.sft."""

import math

import pytest
import torch
from torch.testing import assert_close

from cai_ray.algorithms.sft import sft_loss


def _logits():
    # t0: logits [0, 0]     label 1 -> p = 1/2, NLL = log 2     = 0.6931472
    # t1: logits [0, ln 3]  label 1 -> p = 3/4, NLL = log(4/3)  = 0.2876821
    # t2: prompt/pad position with arbitrary logits
    return torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]]])


def test_sft_loss_hand_value():
    loss, metrics = sft_loss(
        logits=_logits(), labels=torch.tensor([[1, 1, -100]]), loss_mask=torch.tensor([[1, 1, 0]])
    )
    # (0.6931472 + 0.2876821) / 2 = 0.4904146
    assert_close(loss, torch.tensor(0.4904146))
    assert metrics["loss/sft"] == pytest.approx(0.4904146, rel=1e-5)
    assert metrics["sft/num_tokens"] == 2.0


def test_sft_loss_masked_positions_do_not_matter():
    base, _ = sft_loss(
        logits=_logits(), labels=torch.tensor([[1, 1, 0]]), loss_mask=torch.tensor([[1, 1, 0]])
    )
    other_logits = _logits()
    other_logits[0, 2] = torch.tensor([-30.0, 30.0])
    other, _ = sft_loss(
        logits=other_logits, labels=torch.tensor([[1, 1, 1]]), loss_mask=torch.tensor([[1, 1, 0]])
    )
    assert_close(base, other)


def test_sft_loss_pad_equals_eos_token_still_counted():
    # label 1 plays the role of eos == pad; the explicit mask decides, not the id.
    loss, metrics = sft_loss(
        logits=_logits()[:, :1], labels=torch.tensor([[1]]), loss_mask=torch.tensor([[1]])
    )
    assert_close(loss, torch.tensor(math.log(2.0)))
    assert metrics["sft/num_tokens"] == 1.0


def test_sft_loss_token_mean_across_rows():
    # Row 0 has 2 tokens (NLL log2, log(4/3)), row 1 has 1 token (NLL log 2):
    # token mean = (0.6931472 + 0.2876821 + 0.6931472) / 3 = 0.5579922
    logits = torch.cat([_logits(), _logits()], dim=0)
    labels = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = sft_loss(logits=logits, labels=labels, loss_mask=mask)
    assert_close(loss, torch.tensor(0.5579922))
    assert metrics["sft/num_tokens"] == 3.0


def test_sft_loss_gradient_raises_label_logit():
    logits = _logits().requires_grad_(True)
    loss, _ = sft_loss(
        logits=logits, labels=torch.tensor([[1, 1, 0]]), loss_mask=torch.tensor([[1, 1, 0]])
    )
    loss.backward()
    # d/dlogit_label of mean NLL = (p - 1) / N; t0: (0.5 - 1) / 2 = -0.25, other logit +0.25
    assert_close(logits.grad[0, 0], torch.tensor([0.25, -0.25]))
    # t1: p = [1/4, 3/4] -> grad = ([0.25, 0.75] - [0, 1]) / 2 = [0.125, -0.125]
    assert_close(logits.grad[0, 1], torch.tensor([0.125, -0.125]))
    assert_close(logits.grad[0, 2], torch.zeros(2))
