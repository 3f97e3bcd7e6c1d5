"""Unit tests for cai_ray.algorithms.ppo."""

import math

import pytest
import torch
from torch.testing import assert_close

from cai_ray.algorithms.ppo import (
    gae_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
)

# GAE, gamma = 0.9, lam = 0.8 (gamma * lam = 0.72), rewards [0, 0, 1], values [0.5, 0.6, 0.7]
#   delta2 = 1 + 0.9 * 0   - 0.7 = 0.3   -> A2 = 0.3
#   delta1 = 0 + 0.9 * 0.7 - 0.6 = 0.03  -> A1 = 0.03 + 0.72 * 0.3   = 0.246
#   delta0 = 0 + 0.9 * 0.6 - 0.5 = 0.04  -> A0 = 0.04 + 0.72 * 0.246 = 0.21712
#   returns = A + V = [0.71712, 0.846, 1.0]
GAE_ADV = [0.21712, 0.246, 0.3]
GAE_RET = [0.71712, 0.846, 1.0]


def test_gae_hand_values():
    adv, ret = gae_advantages(
        rewards=torch.tensor([[0.0, 0.0, 1.0]]),
        values=torch.tensor([[0.5, 0.6, 0.7]]),
        mask=torch.ones(1, 3),
        gamma=0.9,
        lam=0.8,
    )
    assert_close(adv, torch.tensor([GAE_ADV]))
    assert_close(ret, torch.tensor([GAE_RET]))


def test_gae_right_padding_and_prompt_prefix_ignored():
    # right padding with garbage rewards/values must not leak into valid tokens
    adv, ret = gae_advantages(
        rewards=torch.tensor([[0.0, 0.0, 1.0, 5.0, 5.0], [0.0, 0.0, 1.0, 0.0, 0.0]]),
        values=torch.tensor([[0.5, 0.6, 0.7, 9.0, 9.0], [0.5, 0.6, 0.7, 0.0, 0.0]]),
        mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]),
        gamma=0.9,
        lam=0.8,
    )
    expected_adv = torch.tensor([GAE_ADV + [0.0, 0.0]] * 2)
    expected_ret = torch.tensor([GAE_RET + [0.0, 0.0]] * 2)
    assert_close(adv, expected_adv)
    assert_close(ret, expected_ret)
    # a masked prompt prefix before the response does not change response advantages
    adv, ret = gae_advantages(
        rewards=torch.tensor([[3.0, 0.0, 0.0, 1.0]]),
        values=torch.tensor([[4.0, 0.5, 0.6, 0.7]]),
        mask=torch.tensor([[0, 1, 1, 1]]),
        gamma=0.9,
        lam=0.8,
    )
    assert_close(adv, torch.tensor([[0.0] + GAE_ADV]))
    assert_close(ret, torch.tensor([[0.0] + GAE_RET]))


def test_gae_gamma_lam_one_is_return_minus_value():
    # gamma = lam = 1: A_t = sum_{s>=t} r_s - V_t -> [3 - 1, 2 - 1, 1 - 1] with rewards of 1
    adv, ret = gae_advantages(
        rewards=torch.ones(1, 3), values=torch.ones(1, 3), mask=torch.ones(1, 3), gamma=1.0, lam=1.0
    )
    assert_close(adv, torch.tensor([[2.0, 1.0, 0.0]]))
    assert_close(ret, torch.tensor([[3.0, 2.0, 1.0]]))


def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, math.log(0.5), -2.0])
    ref = torch.tensor([-2.0, math.log(0.25), -2.0])
    # k1 = logp - ref = [1, log 2, 0]
    assert_close(kl_k1(logp, ref), torch.tensor([1.0, 0.6931472, 0.0]))
    # k2 = 0.5 * (logp - ref)^2 = [0.5, 0.2402265, 0]
    assert_close(kl_k2(logp, ref), torch.tensor([0.5, 0.2402265, 0.0]))
    # k3 with d = ref - logp: e^d - d - 1
    #   d = -1:     e^-1 + 1 - 1 = 0.3678794
    #   d = -log 2: 0.5 + 0.6931472 - 1 = 0.1931472
    #   d = 0: 0
    assert_close(kl_k3(logp, ref), torch.tensor([0.3678794, 0.1931472, 0.0]))
    # k3 is >= 0 even when logp < ref (d = 1: e - 1 - 1 = 0.7182818), k1 is negative there
    assert_close(kl_k3(torch.tensor([-2.0]), torch.tensor([-1.0])), torch.tensor([0.7182818]))
    assert kl_k1(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == -1.0


def _kl_inputs():
    logprobs = torch.full((2, 3), -1.0)
    ref = torch.tensor([[-2.0, -1.0, -1.5], [-1.0, -3.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, ref, mask


def test_kl_penalized_rewards_per_token():
    logprobs, ref, mask = _kl_inputs()
    # k1: row0 [1, 0, 0.5], row1 [0, 2, (masked)]; kl_coef 0.1
    # row0: [-0.1, 0, -0.05 + 1.0] ; row1: last valid token is t=1: [0, -0.2 + 2.0, 0]
    out = kl_penalized_rewards(
        sequence_rewards=torch.tensor([1.0, 2.0]), logprobs=logprobs, ref_logprobs=ref,
        mask=mask, kl_coef=0.1, kl_estimator=kl_k1,
    )
    assert_close(out, torch.tensor([[-0.1, 0.0, 0.95], [0.0, 1.8, 0.0]]))


def test_kl_penalized_rewards_k3_and_empty_row():
    logprobs, ref, _ = _kl_inputs()
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    # k3 row0: d = [-1, 0, -0.5] -> [0.3678794, 0, e^-0.5 - 0.5 = 0.1065307]
    out = kl_penalized_rewards(
        sequence_rewards=torch.tensor([1.0, 2.0]), logprobs=logprobs, ref_logprobs=ref,
        mask=mask, kl_coef=0.1, kl_estimator=kl_k3,
    )
    expected = torch.tensor([[-0.0367879, 0.0, 1.0 - 0.0106531], [0.0, 0.0, 0.0]])
    assert_close(out, expected)


def test_kl_penalized_rewards_k2():
    logprobs, ref, mask = _kl_inputs()
    # k2 = 0.5 * (logp - ref)^2: row0 [0.5, 0, 0.125], row1 [0, 2, (masked)]; kl_coef 0.1
    out = kl_penalized_rewards(
        sequence_rewards=torch.tensor([1.0, 2.0]), logprobs=logprobs, ref_logprobs=ref,
        mask=mask, kl_coef=0.1, kl_estimator=kl_k2,
    )
    assert_close(out, torch.tensor([[-0.05, 0.0, 1.0 - 0.0125], [0.0, 1.8, 0.0]]))


def test_every_configurable_kl_estimator_is_the_named_function():
    from typing import get_args

    from cai_ray.config import PPOConfig
    from cai_ray.training.updates import KL_ESTIMATORS

    names = get_args(PPOConfig.model_fields["kl_estimator"].annotation)
    assert {name: KL_ESTIMATORS[name] for name in names} == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


LOG_1_5 = math.log(1.5)  # ratio 1.5 against old_logprobs = 0


def test_policy_loss_clip_positive_and_negative_advantage():
    # ratio 1.5, eps 0.2:
    #   A = +1: min(1.5, 1.2) = 1.2 -> loss -1.2 (clipped)
    #   A = -1: min(-1.5, -1.2) = -1.5 -> loss +1.5 (not clipped)
    # token mean = (-1.2 + 1.5) / 2 = 0.15, clip_frac = 0.5
    # approx_kl (k3 of KL(old||new)) = 1.5 - log 1.5 - 1 = 0.0945349
    logprobs = torch.tensor([[LOG_1_5, LOG_1_5]], requires_grad=True)
    loss, metrics = policy_loss(
        logprobs=logprobs, old_logprobs=torch.zeros(1, 2), advantages=torch.tensor([[1.0, -1.0]]),
        mask=torch.ones(1, 2), clip_eps=0.2,
    )
    assert_close(loss, torch.tensor(0.15))
    assert metrics["loss/policy"] == pytest.approx(0.15, rel=1e-5)
    assert metrics["policy/clip_frac"] == pytest.approx(0.5)
    assert metrics["policy/approx_kl"] == pytest.approx(0.0945349, rel=1e-5)
    assert metrics["policy/ratio_mean"] == pytest.approx(1.5, rel=1e-6)
    loss.backward()
    # clipped token has no gradient; unclipped: d(-ratio * A)/dlogp / 2 = -(1.5 * -1) / 2 = 0.75
    assert_close(logprobs.grad, torch.tensor([[0.0, 0.75]]))


def test_policy_loss_clip_eps_high_and_low_side():
    # clip_eps_high = 0.6: ratio 1.5 with A = +1 is inside [0.8, 1.6] -> loss -1.5, no clipping
    loss, metrics = policy_loss(
        logprobs=torch.tensor([[LOG_1_5]]), old_logprobs=torch.zeros(1, 1),
        advantages=torch.tensor([[1.0]]), mask=torch.ones(1, 1), clip_eps=0.2, clip_eps_high=0.6,
    )
    assert_close(loss, torch.tensor(-1.5))
    assert metrics["policy/clip_frac"] == 0.0
    # ratio 0.5, A = -1, eps 0.2: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped
    loss, metrics = policy_loss(
        logprobs=torch.tensor([[math.log(0.5)]]), old_logprobs=torch.zeros(1, 1),
        advantages=torch.tensor([[-1.0]]), mask=torch.ones(1, 1), clip_eps=0.2, clip_eps_high=0.6,
    )
    assert_close(loss, torch.tensor(0.8))
    assert metrics["policy/clip_frac"] == 1.0


def test_policy_loss_gradient_direction_and_masking():
    # ratio 1 everywhere: loss = -(A0 + A1) / 2 over the 2 valid tokens
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    loss, _ = policy_loss(
        logprobs=logprobs, old_logprobs=logprobs.detach().clone(),
        advantages=torch.tensor([[1.0, -1.0, 100.0]]), mask=torch.tensor([[1, 1, 0]]),
        clip_eps=0.2,
    )
    assert_close(loss, torch.tensor(0.0))
    loss.backward()
    # descent (-grad) raises the positive-advantage token, lowers the negative, ignores padding
    assert_close(logprobs.grad, torch.tensor([[-0.5, 0.5, 0.0]]))


def test_value_loss_hand_values():
    # eps 0.2
    # t0: v 1.0, old 0.5, R 2.0: clip(v) = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # t1: v 0.1, old 0.0, R 0.0: clip(v) = 0.1; 0.01, 0.01 -> 0.01
    # t2: v 1.0, old 0.5, R 0.0: clip(v) = 0.7; 1, 0.49 -> 1.0
    # t3: padding, ignored
    # loss = 0.5 * (1.69 + 0.01 + 1.0) / 3 = 0.45; clip_frac = 1/3
    values = torch.tensor([[1.0, 0.1, 1.0, 50.0]], requires_grad=True)
    loss, metrics = value_loss(
        values=values, old_values=torch.tensor([[0.5, 0.0, 0.5, 0.0]]),
        returns=torch.tensor([[2.0, 0.0, 0.0, -50.0]]), mask=torch.tensor([[1, 1, 1, 0]]),
        clip_eps=0.2,
    )
    assert_close(loss, torch.tensor(0.45))
    assert metrics["loss/value"] == pytest.approx(0.45, rel=1e-5)
    assert metrics["value/clip_frac"] == pytest.approx(1.0 / 3.0)
    loss.backward()
    # t0 clipped branch is constant in v -> 0; t1: (0.1 - 0) / 3; t2: (1 - 0) / 3
    assert_close(values.grad, torch.tensor([[0.0, 0.1 / 3.0, 1.0 / 3.0, 0.0]]))
