"""Unit tests for cai_ray.algorithms.critic_free."""

import pytest
import torch
from torch.testing import assert_close

from cai_ray.algorithms.critic_free import (
    broadcast_sequence_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


def test_grpo_hand_values():
    # groups [1, 2], [3, 4]: mean 1.5 / 3.5, population std 0.5 -> [-1, 1, -1, 1]
    out = grpo_advantages(rewards=torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=2)
    assert_close(out, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    # k = 4 on [1, 2, 3, 6]: mean 3, var (4 + 1 + 0 + 9) / 4 = 3.5, std 1.8708287
    out = grpo_advantages(rewards=torch.tensor([1.0, 2.0, 3.0, 6.0]), group_size=4, eps=0.0)
    assert_close(out, torch.tensor([-1.0690450, -0.5345225, 0.0, 1.6035675]))


def test_grpo_unscaled_and_constant_group():
    # Dr. GRPO: only subtract the group mean
    out = grpo_advantages(rewards=torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=2, scale=False)
    assert_close(out, torch.tensor([-0.5, 0.5, -0.5, 0.5]))
    # a constant group has zero advantage (eps prevents 0/0)
    out = grpo_advantages(rewards=torch.tensor([5.0, 5.0, 1.0, 3.0]), group_size=2)
    assert_close(out, torch.tensor([0.0, 0.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_rloo_hand_values():
    # [1, 2, 3], k = 3: 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5
    out = rloo_advantages(rewards=torch.tensor([1.0, 2.0, 3.0]), group_size=3)
    assert_close(out, torch.tensor([-1.5, 0.0, 1.5]))
    # k = 2: r_i - r_other
    out = rloo_advantages(rewards=torch.tensor([1.0, 2.0, 3.0, 7.0]), group_size=2)
    assert_close(out, torch.tensor([-1.0, 1.0, -4.0, 4.0]))


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_size_validation(fn):
    with pytest.raises(ValueError, match="divisible"):
        fn(rewards=torch.arange(5.0), group_size=2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        fn(rewards=torch.arange(4.0), group_size=1)
    with pytest.raises(ValueError, match="1-D"):
        fn(rewards=torch.zeros(2, 2), group_size=2)


def test_reinforce_pp_batch_whitening():
    # gamma = 1: row0 rewards [0, 0, 1] -> G = [1, 1, 1]; row1 rewards [0, -1, (pad 7)] -> [-1, -1]
    # masked G = [1, 1, 1, -1, -1]: mean 0.2, var (3 * 0.64 + 2 * 1.44) / 5 = 0.96, std 0.9797959
    # (1 - 0.2) / 0.9797959 = 0.8164966; (-1 - 0.2) / 0.9797959 = -1.2247449
    out = reinforce_pp_advantages(
        token_rewards=torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 7.0]]),
        mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
    )
    expected = torch.tensor([[0.8164966, 0.8164966, 0.8164966], [-1.2247449, -1.2247449, 0.0]])
    assert_close(out, expected)


def test_reinforce_pp_discount():
    # gamma = 0.5, rewards [0, 0, 1] -> G = [0.25, 0.5, 1]; mean 7/12, population std 0.3118048
    # whitened: [-1.0690450, -0.2672612, 1.3363062]
    out = reinforce_pp_advantages(
        token_rewards=torch.tensor([[0.0, 0.0, 1.0]]), mask=torch.ones(1, 3), gamma=0.5
    )
    assert_close(out, torch.tensor([[-1.0690450, -0.2672612, 1.3363062]]))


def test_broadcast_sequence_advantages():
    out = broadcast_sequence_advantages(
        torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [0, 1, 1]])
    )
    assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]))
