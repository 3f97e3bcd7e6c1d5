"""Aggregation rules for per-axis feedback: hand-computed cases, ties and missing axes."""

from __future__ import annotations

import pytest
import torch

from cai_ray.algorithms.aggregation import aggregate_label, axis_weights, decoupled_group_advantages

RANKS = {"harm": 0, "honesty": 1, "help": 3, "verb": 3}
TOL = 1e-9


def test_mean_and_weighted() -> None:
    assert aggregate_label({"a": 0.8, "b": 0.4, "c": 0.6}, mode="mean") == pytest.approx(0.6, abs=TOL)
    # (3 * 0.8 + 1 * 0.4) / 4
    assert aggregate_label({"a": 0.8, "b": 0.4}, mode="weighted", weights={"a": 3, "b": 1}) == pytest.approx(0.7)
    # a missing axis is skipped and the weights renormalise: only b present
    assert aggregate_label({"b": 0.4}, mode="weighted", weights={"a": 3, "b": 1}) == pytest.approx(0.4, abs=TOL)
    with pytest.raises(ValueError, match=r"no weight for axis/axes \['c'\]"):
        aggregate_label({"a": 0.8, "c": 0.1}, mode="weighted", weights={"a": 1})
    with pytest.raises(ValueError, match="at least one axis"):
        aggregate_label({}, mode="mean")


@pytest.mark.parametrize(
    ("labels", "margin", "expected"),
    [
        ({"harm": 0.9, "honesty": 0.1, "help": 0.1, "verb": 0.1}, 0.1, 0.9),  # the top tier is clear: it decides
        ({"harm": 0.55, "honesty": 0.2, "help": 0.9, "verb": 0.9}, 0.1, 0.2),  # top tier unclear, next decides
        ({"honesty": 0.2, "help": 0.9}, 0.1, 0.2),  # harm missing: skipped
        ({"harm": 0.75, "honesty": 0.1}, 0.25, 0.1),  # |0.75 - 0.5| == margin is a tie, not clear (strict >)
        # a tier is judged on its mean: help 0.9 and verb 0.2 cancel (0.55), nothing is clear -> overall mean
        ({"harm": 0.52, "honesty": 0.45, "help": 0.9, "verb": 0.2}, 0.1, (0.52 + 0.45 + 0.9 + 0.2) / 4),
    ],
)
def test_priority_is_lexicographic_by_tier(labels: dict[str, float], margin: float, expected: float) -> None:
    assert aggregate_label(labels, mode="priority", ranks=RANKS, margin=margin) == pytest.approx(expected, abs=TOL)


def test_priority_needs_ranks_for_every_axis() -> None:
    with pytest.raises(ValueError, match=r"no tier rank for axis/axes \['style'\]"):
        aggregate_label({"harm": 0.5, "style": 0.9}, mode="priority", ranks=RANKS, margin=0.1)


def test_soft_priority_decays_geometrically() -> None:
    # raw weights: harm 0.5**0 = 1, honesty 0.5**1 = 0.5, help and verb share 0.5**3 -> 0.0625 each; sum 1.625
    w = axis_weights(["harm", "honesty", "help", "verb"], mode="soft_priority", ranks=RANKS, decay=0.5)
    assert w == pytest.approx({"harm": 1 / 1.625, "honesty": 0.5 / 1.625, "help": 0.0625 / 1.625,
                               "verb": 0.0625 / 1.625})
    got = aggregate_label({"harm": 0.5, "honesty": 1.0, "help": 0.0, "verb": 0.0}, mode="soft_priority",
                          ranks=RANKS, decay=0.5)
    assert got == pytest.approx(1.0 / 1.625, abs=TOL)
    # decay 1 is the plain mean over tiers (each tier equal weight), here two tiers
    assert aggregate_label({"harm": 1.0, "help": 0.0, "verb": 1.0}, mode="soft_priority", ranks=RANKS,
                           decay=1.0) == pytest.approx(0.75, abs=TOL)
    with pytest.raises(ValueError, match="decay"):
        axis_weights(["harm"], mode="soft_priority", ranks=RANKS, decay=0.0)


def test_decoupled_group_advantages_normalise_each_axis_first() -> None:
    # axis 0 groups [1, 3] -> [-1, 1] and [0, 0] -> [0, 0]; axis 1 groups [100, 0] -> [1, -1], [5, 7] -> [-1, 1]
    # sum [0, 0, -1, 1]: mean 0, std sqrt(0.5) -> [0, 0, -sqrt 2, sqrt 2]
    rewards = torch.tensor([[1.0, 100.0], [3.0, 0.0], [0.0, 5.0], [0.0, 7.0]])
    adv = decoupled_group_advantages(rewards, torch.tensor([1.0, 1.0]), group_size=2)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -2**0.5, 2**0.5]), atol=1e-4, rtol=0)
    # summing raw rewards first would let axis 1's scale decide the first group; decoupling makes it a tie
    rloo = decoupled_group_advantages(rewards, torch.tensor([1.0, 1.0]), group_size=2, estimator="rloo")
    # rloo per axis: axis 0 [-2, 2, 0, 0]; axis 1 [100, -100, -2, 2]; sum [98, -98, -2, 2];
    # std sqrt((2 * 98**2 + 2 * 2**2) / 4)
    s = 4804 ** 0.5
    torch.testing.assert_close(rloo, torch.tensor([98 / s, -98 / s, -2 / s, 2 / s]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        decoupled_group_advantages(rewards[:, 0], torch.tensor([1.0]), group_size=2)


def test_label_axes_config_and_constitution_checks() -> None:
    from cai_ray.config import FeedbackConfig
    from cai_ray.constitution import ConstitutionError, load_constitution

    with pytest.raises(ValueError, match="label_axes needs label_mode multiple_choice or cot"):
        FeedbackConfig(label_axes="all", label_mode="direct")
    with pytest.raises(ValueError, match="colour"):
        FeedbackConfig(aggregation={"mode": "priority", "colour": 1})
    c = load_constitution("axes12")
    assert c.label_axes("none") == () and c.label_axes("all") == c.axis_ids
    assert c.label_axes(["tone", "honesty"]) == ("tone", "honesty")
    with pytest.raises(ConstitutionError, match=r"\['vibes'\] not declared by constitution 'axes12'"):
        c.label_axes(["vibes"])
    with pytest.raises(ConstitutionError, match=r"no comparison principle for axis/axes \['tone'\]"):
        c.label_axes(["tone"], tiers=["broadly_safe"])
