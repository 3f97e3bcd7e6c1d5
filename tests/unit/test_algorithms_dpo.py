"""Unit tests for cai_ray.algorithms.dpo."""

import math

import pytest
import torch
from torch.testing import assert_close

from cai_ray.algorithms.dpo import dpo_loss


def _call(pa, pb, ra, rb, p, beta, label_smoothing=0.0):
    return dpo_loss(
        policy_logps_a=torch.as_tensor(pa, dtype=torch.float32),
        policy_logps_b=torch.as_tensor(pb, dtype=torch.float32),
        ref_logps_a=torch.as_tensor(ra, dtype=torch.float32),
        ref_logps_b=torch.as_tensor(rb, dtype=torch.float32),
        prob_a=torch.as_tensor(p, dtype=torch.float32),
        beta=beta,
        label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_dpo_at_zero_margin_is_log2(p):
    # h = (-3 - -4) - (-5 - -6) = 0 -> -[p + (1-p)] log sigmoid(0) = log 2 for every p
    loss, metrics = _call([-3.0], [-5.0], [-4.0], [-6.0], [p], beta=0.1)
    assert_close(loss, torch.tensor(math.log(2.0)))
    assert metrics["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-7)


def test_dpo_hard_and_soft_label_hand_values():
    # h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1; beta * h = 0.5
    # -log sigmoid(0.5) = log(1 + e^-0.5) = 0.4740770; -log sigmoid(-0.5) = 0.9740770
    loss, metrics = _call([-1.0], [-2.0], [-1.5], [-1.5], [1.0], beta=0.5)
    assert_close(loss, torch.tensor(0.4740770))
    assert metrics["loss/dpo"] == pytest.approx(0.4740770, rel=1e-5)
    # rewards: a = 0.5 * 0.5 = 0.25, b = 0.5 * -0.5 = -0.25
    assert metrics["dpo/chosen_reward"] == pytest.approx(0.25)
    assert metrics["dpo/rejected_reward"] == pytest.approx(-0.25)
    assert metrics["dpo/reward_margin"] == pytest.approx(0.5)
    assert metrics["dpo/accuracy"] == 1.0
    # p = 0.75: 0.75 * 0.4740770 + 0.25 * 0.9740770 = 0.3555577 + 0.2435192 = 0.5990770
    loss, _ = _call([-1.0], [-2.0], [-1.5], [-1.5], [0.75], beta=0.5)
    assert_close(loss, torch.tensor(0.5990770))


def test_dpo_label_smoothing():
    # eps = 0.1, p = 1 -> p' = 0.9: 0.9 * 0.4740770 + 0.1 * 0.9740770 = 0.5240770
    loss, _ = _call([-1.0], [-2.0], [-1.5], [-1.5], [1.0], beta=0.5, label_smoothing=0.1)
    assert_close(loss, torch.tensor(0.5240770))
    # eps = 0.5 makes every target 0.5: 0.5 * (0.4740770 + 0.9740770) = 0.7240770
    loss, _ = _call([-1.0], [-2.0], [-1.5], [-1.5], [0.0], beta=0.5, label_smoothing=0.5)
    assert_close(loss, torch.tensor(0.7240770))


def test_dpo_chosen_is_b_when_prob_below_half():
    # same logps, p = 0.25 -> chosen is b (reward -0.25), rejected is a (0.25)
    loss, metrics = _call([-1.0], [-2.0], [-1.5], [-1.5], [0.25], beta=0.5)
    # 0.25 * 0.4740770 + 0.75 * 0.9740770 = 0.1185193 + 0.7305578 = 0.8490770
    assert_close(loss, torch.tensor(0.8490770))
    assert metrics["dpo/chosen_reward"] == pytest.approx(-0.25)
    assert metrics["dpo/rejected_reward"] == pytest.approx(0.25)
    assert metrics["dpo/reward_margin"] == pytest.approx(-0.5)
    assert metrics["dpo/accuracy"] == 0.0


def test_dpo_batch_mean():
    # row0: loss 0.4740770 (as above); row1: h = 0 -> log 2 = 0.6931472; mean 0.5836121
    loss, metrics = _call(
        [-1.0, -3.0], [-2.0, -5.0], [-1.5, -4.0], [-1.5, -6.0], [1.0, 1.0], beta=0.5
    )
    assert_close(loss, torch.tensor(0.5836121))
    # accuracy: row0 0.25 > -0.25 yes; row1 0 > 0 no -> 0.5
    assert metrics["dpo/accuracy"] == 0.5


def test_dpo_gradient_direction_and_soft_half_symmetry():
    pa = torch.tensor([-1.0], requires_grad=True)
    pb = torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(
        policy_logps_a=pa, policy_logps_b=pb, ref_logps_a=torch.tensor([-1.0]),
        ref_logps_b=torch.tensor([-1.0]), prob_a=torch.tensor([1.0]), beta=0.1,
    )
    loss.backward()
    # dloss/dpa = -beta * (1 - sigmoid(0)) = -0.05; dloss/dpb = +0.05
    assert_close(pa.grad, torch.tensor([-0.05]))
    assert_close(pb.grad, torch.tensor([0.05]))

    # p = 0.5: loss is even in h, so the gradient vanishes at h = 0 and is odd in h
    def grad_at(h: float) -> torch.Tensor:
        x = torch.tensor([h], requires_grad=True)
        l, _ = dpo_loss(
            policy_logps_a=x, policy_logps_b=torch.zeros(1), ref_logps_a=torch.zeros(1),
            ref_logps_b=torch.zeros(1), prob_a=torch.tensor([0.5]), beta=0.1,
        )
        l.backward()
        return l.detach(), x.grad

    l0, g0 = grad_at(0.0)
    lp, gp = grad_at(2.0)
    lm, gm = grad_at(-2.0)
    assert_close(g0, torch.zeros(1))
    assert_close(lp, lm)
    assert_close(gp, -gm)
    # d/dh at h=2: -beta * (0.5 - sigmoid(0.2)) = -0.1 * (0.5 - 0.5498340) = 0.0049834
    assert_close(gp, torch.tensor([0.0049834]))


def test_dpo_reference_gets_no_gradient():
    ref_a = torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(
        policy_logps_a=torch.tensor([-1.0], requires_grad=True), policy_logps_b=torch.tensor([-2.0]),
        ref_logps_a=ref_a, ref_logps_b=torch.tensor([-1.0]), prob_a=torch.tensor([1.0]), beta=0.1,
    )
    loss.backward()
    assert ref_a.grad is None
