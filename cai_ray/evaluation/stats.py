"""Percentile-bootstrap intervals of means over prompts (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_BOOTSTRAP_CHUNK = 256  # resamples drawn at once (bounds memory for large sets)


def percentile_interval(stats: Sequence[float], alpha: float) -> tuple[float, float]:
    """The ``alpha/2`` and ``1 - alpha/2`` quantiles of ``stats``.

    Quantile q of the sorted values s_0 <= ... <= s_{B-1} sits at position q * (B - 1), linearly
    interpolated between neighbours (numpy's default method).
    """
    if not stats:
        raise ValueError("percentile_interval needs at least one value")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    low, high = np.quantile(np.asarray(stats, dtype=np.float64), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float], *, num_samples: int, seed: int,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its percentile-bootstrap ``1 - alpha`` interval.

    Draws ``num_samples`` resamples of ``len(values)`` values with replacement (numpy Generator seeded with
    ``seed``: the same inputs give the same interval) and takes :func:`percentile_interval` of their means.
    The interval is widened to include the mean if float round-off put it a hair outside.
    """
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, num_samples, _BOOTSTRAP_CHUNK):
        rows = min(_BOOTSTRAP_CHUNK, num_samples - start)
        means.append(data[rng.integers(0, len(data), size=(rows, len(data)))].mean(axis=1))
    low, high = percentile_interval(np.concatenate(means).tolist(), alpha)
    return mean, min(low, mean), max(high, mean)


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` items with its bootstrap interval; ``mean``/``low``/``high`` are None when n == 0."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def complement(self) -> Estimate:
        """The estimate of ``1 - x`` (e.g. helpfulness from a refusal rate)."""
        if self.mean is None or self.low is None or self.high is None:
            return self
        return Estimate(1.0 - self.mean, 1.0 - self.high, 1.0 - self.low, self.n)

    def to_json(self, key: str) -> dict[str, Any]:
        """``{key: mean, "ci": [low, high], "n": n}``."""
        ci = None if self.low is None else [self.low, self.high]
        return {key: self.mean, "ci": ci, "n": self.n}


@dataclass(frozen=True)
class Bootstrap:
    """Settings shared by every interval of one report."""

    num_samples: int
    seed: int
    alpha: float

    def estimate(self, values: Sequence[float]) -> Estimate:
        """The mean of ``values`` with its interval (an empty estimate for no values)."""
        if not values:
            return Estimate(None, None, None, 0)
        mean, low, high = bootstrap_ci(values, num_samples=self.num_samples, seed=self.seed, alpha=self.alpha)
        return Estimate(mean, low, high, len(values))


def verdicts(probs_yes: Sequence[float], *, threshold: float) -> list[float]:
    """The judge's binary verdicts: 1.0 where P(yes) > ``threshold``, else 0.0 (their mean is a rate)."""
    return [1.0 if p > threshold else 0.0 for p in probs_yes]


def mean_or_none(values: Sequence[float]) -> float | None:
    """The plain mean, or None for no values."""
    return float(sum(values) / len(values)) if values else None
