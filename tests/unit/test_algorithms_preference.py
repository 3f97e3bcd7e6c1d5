"""Unit tests for cai_ray.algorithms.preference."""

import pytest
import torch
from torch.testing import assert_close

from cai_ray.algorithms.preference import calibration_metrics, last_token_index, preference_loss


def test_preference_loss_soft_target_hand_value():
    # r_a - r_b = 1, p = 0.75:
    # log sigmoid(1) = -log(1 + e^-1) = -0.3132617, log sigmoid(-1) = -1.3132617
    # BCE = 0.75 * 0.3132617 + 0.25 * 1.3132617 = 0.2349463 + 0.3283154 = 0.5632617
    loss, metrics = preference_loss(
        reward_a=torch.tensor([1.5]), reward_b=torch.tensor([0.5]), prob_a=torch.tensor([0.75])
    )
    assert_close(loss, torch.tensor(0.5632617))
    assert metrics["loss/pm"] == pytest.approx(0.5632617, rel=1e-5)
    assert metrics["pm/accuracy"] == 1.0
    assert metrics["pm/num_decisive"] == 1.0
    assert metrics["pm/margin_mean"] == pytest.approx(1.0)


def test_preference_loss_hard_label_is_standard_bt():
    # p = 1, margin 0 -> -log sigmoid(0) = log 2
    loss, _ = preference_loss(
        reward_a=torch.tensor([0.3]), reward_b=torch.tensor([0.3]), prob_a=torch.tensor([1.0])
    )
    assert_close(loss, torch.tensor(0.6931472))


def test_preference_accuracy_excludes_ties():
    # margins r_a - r_b = [1, -1, 2, -3]; p = [0.75, 0.9, 0.5, 0.2]
    # row0 a preferred & margin > 0 -> correct; row1 a preferred & margin < 0 -> wrong;
    # row2 tie -> excluded; row3 b preferred & margin < 0 -> correct. accuracy 2/3.
    # signed margins over decisive rows: [1, -1, 3] -> mean 1.0
    _, metrics = preference_loss(
        reward_a=torch.tensor([1.0, 0.0, 2.0, 0.0]),
        reward_b=torch.tensor([0.0, 1.0, 0.0, 3.0]),
        prob_a=torch.tensor([0.75, 0.9, 0.5, 0.2]),
    )
    assert metrics["pm/accuracy"] == pytest.approx(2.0 / 3.0)
    assert metrics["pm/num_decisive"] == 3.0
    assert metrics["pm/margin_mean"] == pytest.approx(1.0)


def test_preference_all_ties_reports_chance_and_zero_decisive():
    loss, metrics = preference_loss(
        reward_a=torch.tensor([2.0, 0.0]),
        reward_b=torch.tensor([0.0, 0.0]),
        prob_a=torch.tensor([0.5, 0.5]),
    )
    # BCE(sigmoid(2), 0.5) = 0.5 * (log(1 + e^-2) + log(1 + e^2)) = 0.5 * (0.1269280 + 2.1269280)
    # = 1.1269280; BCE(sigmoid(0), 0.5) = log 2 = 0.6931472 -> mean 0.9100376
    assert_close(loss, torch.tensor(0.9100376))
    assert metrics["pm/accuracy"] == 0.5
    assert metrics["pm/num_decisive"] == 0.0
    assert metrics["pm/margin_mean"] == 0.0


def test_preference_gradient_direction():
    reward_a = torch.tensor([0.0], requires_grad=True)
    reward_b = torch.tensor([0.0], requires_grad=True)
    loss, _ = preference_loss(reward_a=reward_a, reward_b=reward_b, prob_a=torch.tensor([0.9]))
    loss.backward()
    # dBCE/dmargin = sigmoid(0) - 0.9 = -0.4 -> descent raises r_a and lowers r_b
    assert_close(reward_a.grad, torch.tensor([-0.4]))
    assert_close(reward_b.grad, torch.tensor([0.4]))


def test_preference_soft_target_optimum_at_logit_of_p():
    # The BCE gradient vanishes where sigmoid(margin) = p: margin = log(0.75/0.25) = log 3
    margin = torch.tensor([1.0986123], requires_grad=True)
    loss, _ = preference_loss(reward_a=margin, reward_b=torch.zeros(1), prob_a=torch.tensor([0.75]))
    loss.backward()
    assert_close(margin.grad, torch.zeros(1), atol=1e-6, rtol=0)


def test_calibration_metrics_hand_values():
    # bins (10): 0.12, 0.16 -> bin 1; 0.85 -> bin 8; 0.95 -> bin 9
    # bin1: |mean pred 0.14 - mean target 0.5| = 0.36, weight 2/4 -> 0.18
    # bin8: |0.85 - 1| = 0.15, weight 1/4 -> 0.0375; bin9: |0.95 - 1| * 1/4 = 0.0125
    # ECE = 0.23; Brier = (0.0144 + 0.7056 + 0.0225 + 0.0025) / 4 = 0.18625
    out = calibration_metrics(
        pred_prob_a=torch.tensor([0.12, 0.16, 0.85, 0.95]),
        prob_a=torch.tensor([0.0, 1.0, 1.0, 1.0]),
    )
    assert set(out) == {"pm/ece", "pm/brier"}
    assert out["pm/ece"] == pytest.approx(0.23, abs=1e-6)
    assert out["pm/brier"] == pytest.approx(0.18625, abs=1e-6)


def test_calibration_metrics_perfect_and_edge_bins():
    # prediction 1.0 falls in the last bin; perfect predictions give zero error
    out = calibration_metrics(
        pred_prob_a=torch.tensor([0.0, 1.0, 0.75]), prob_a=torch.tensor([0.0, 1.0, 0.75])
    )
    assert out["pm/ece"] == pytest.approx(0.0, abs=1e-7)
    assert out["pm/brier"] == pytest.approx(0.0, abs=1e-7)
    # one bin: ECE = |mean pred - mean target| = |0.5 - 0.25| = 0.25
    out = calibration_metrics(
        pred_prob_a=torch.tensor([0.2, 0.8]), prob_a=torch.tensor([0.0, 0.5]), num_bins=1
    )
    assert out["pm/ece"] == pytest.approx(0.25)
    # Brier = (0.04 + 0.09) / 2 = 0.065
    assert out["pm/brier"] == pytest.approx(0.065)
    with pytest.raises(ValueError):
        calibration_metrics(pred_prob_a=torch.tensor([0.5]), prob_a=torch.tensor([0.5]), num_bins=0)


def test_last_token_index_reads_scalar_head():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1]])
    idx = last_token_index(attention_mask)
    assert torch.equal(idx, torch.tensor([2, 0, 3]))
    head = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [9.0, 9.0, 0.7, 0.8]])
    rewards = head.gather(1, idx.unsqueeze(1)).squeeze(1)
    assert_close(rewards, torch.tensor([0.3, 0.5, 0.8]))
