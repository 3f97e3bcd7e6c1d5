"""Pure label math: hand-computed values, exact swap symmetry, clamps and rating rescaling."""

from __future__ import annotations

import math
import random

import pytest

from cai_ray.inference.labels import (
    GRID_BITS,
    clamp,
    expected_rating_score,
    mean,
    normalised,
    option_probability,
    preference_label,
)


def test_option_probability_hand_values() -> None:
    assert option_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75, abs=1e-15)
    assert option_probability(0.0, 0.0) == 0.5
    assert option_probability(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-15)  # no underflow
    assert option_probability(-1001.0, -1000.0) == pytest.approx(1 / (1 + math.exp(1)), abs=1e-15)
    assert option_probability(0.0, -math.inf) == 1.0
    assert option_probability(-math.inf, 0.0) == 0.0
    assert option_probability(-math.inf, -math.inf) == 0.5


def test_preference_label_hand_values() -> None:
    # Shown (A,B): first (A) better with 0.8; shown (B,A): first (B) better with 0.4 -> A better with 0.6.
    assert preference_label([0.8], [0.4]) == pytest.approx(0.5 * (0.8 + 0.6), abs=1e-12)
    assert preference_label([0.4], [0.8]) == pytest.approx(0.3, abs=1e-12)
    # Ensemble of two principles, each debiased to 0.7 and 0.5 -> 0.6.
    assert preference_label([0.8, 0.6], [0.4, 0.6]) == pytest.approx(0.6, abs=1e-12)
    # Without swap-debiasing: the plain ensemble mean.
    assert preference_label([0.2, 0.4]) == pytest.approx(0.3, abs=1e-12)
    assert preference_label([1.0], [0.0]) == 1.0
    assert preference_label([0.0], [1.0]) == 0.0
    assert preference_label([0.5], [0.5]) == 0.5


def test_preference_label_is_on_the_grid() -> None:
    label = preference_label([0.123456789], [0.987654321])
    assert (label * (1 << GRID_BITS)).is_integer()


def test_swap_debiasing_is_exactly_antisymmetric() -> None:
    rng = random.Random(0)
    for _ in range(5000):
        k = rng.choice([1, 2, 3, 5])
        ab = [rng.random() for _ in range(k)]
        ba = [rng.random() for _ in range(k)]
        if rng.random() < 0.1:  # also values right at the edges and on ties
            ab[0], ba[0] = rng.choice([(0.0, 1.0), (0.5, 0.5), (1.0, 1.0), (1e-300, 1 - 1e-16)])
        forward, backward = preference_label(ab, ba), preference_label(ba, ab)
        assert backward == 1 - forward  # exact, not approximate
        assert 0.0 <= forward <= 1.0


def test_preference_label_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        preference_label([])
    with pytest.raises(ValueError, match="scores"):
        preference_label([0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preference_label([1.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preference_label([math.nan])


def test_clamp_to_band() -> None:
    assert clamp(0.9, (0.4, 0.6)) == 0.6
    assert clamp(0.1, (0.4, 0.6)) == 0.4
    assert clamp(0.55, (0.4, 0.6)) == 0.55


def test_normalised_candidates() -> None:
    assert normalised([math.log(1), math.log(3)]) == pytest.approx([0.25, 0.75], abs=1e-15)
    assert normalised([-math.inf, -math.inf]) == [0.5, 0.5]


def test_expected_rating_score_hand_values() -> None:
    def peaked(rating: int) -> list[float]:
        return [0.0 if r == rating else -math.inf for r in range(1, 11)]

    assert expected_rating_score(peaked(10)) == 1.0
    assert expected_rating_score(peaked(1)) == -1.0
    assert expected_rating_score(peaked(7)) == pytest.approx(1 / 3, abs=1e-15)  # (2*7 - 11) / 9
    assert expected_rating_score([-2.0] * 10) == pytest.approx(0.0, abs=1e-15)  # uniform: E = 5.5
    # Half on 2, half on 4 -> E = 3 -> (6 - 11) / 9.
    half = [math.log(0.5) if r in (2, 4) else -math.inf for r in range(1, 11)]
    assert expected_rating_score(half) == pytest.approx(-5 / 9, abs=1e-15)
    with pytest.raises(ValueError, match="10 rating"):
        expected_rating_score([0.0] * 9)


def test_mean() -> None:
    assert mean([0.5, -0.5, 1.0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        mean([])
