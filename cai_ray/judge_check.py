"""Judge reliability check: is the feedback model better than chance on the axes it labels?

A shipped calibration set (``cai_ray/calibration/judge_calibration.jsonl``) holds pairs where one
response is unambiguously better on one named axis. Each pair is labelled on its axis (one principle of that axis)
with the better response as (A), in the per-axis layout (question after the responses); the worker scores both
orders (swap-debiasing), so the label is order-free and its ``position_bias`` measures how much the judge
prefers whichever option is listed first.
Per axis: accuracy (label > 0.5; a 0.5 tie counts half) with a 95% Wilson interval (sound at the ~5
pairs per axis; a percentile bootstrap of 5/5 hits would claim [1, 1]), mean position bias, and mean
|p - 0.5| (how decisive the labels are). An axis is *at chance* when its interval reaches 0.5, or when
its labels are undecided (mean |p - 0.5| < ``MIN_DECISIVENESS``: the sign of a difference that small
is noise, however often it happens to point the right way).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.constitution import Constitution
from cai_ray.types import ComparisonRequest, PreferenceLabel

log = logging.getLogger(__name__)
CALIBRATION_FILE = Path(__file__).parent / "calibration" / "judge_calibration.jsonl"  # not a prompt set
_FIELDS = ("id", "axis", "prompt", "better", "worse")
MIN_DECISIVENESS = 0.01
Z95 = 1.959963984540054


class CalibrationError(ValueError):
    """A malformed calibration file; the message names the file, the row and the field."""


@dataclass(frozen=True)
class CalibrationPair:
    """One response clearly better than the other on ``axis``."""

    id: str
    axis: str
    prompt: str
    better: str
    worse: str


def load_calibration(path: Path = CALIBRATION_FILE) -> list[CalibrationPair]:
    """Read and check the calibration set (one JSON object per line with id, axis, prompt, better, worse)."""
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}:{n}: not JSON: {err}") from None
        missing = [f for f in _FIELDS if not isinstance(row.get(f), str) or not row[f].strip()]
        if missing or set(row) - set(_FIELDS):
            raise CalibrationError(f"{path}:{n}: needs exactly the string fields {list(_FIELDS)}; missing or empty "
                                   f"{missing}, unknown {sorted(set(row) - set(_FIELDS))}")
        pairs.append(CalibrationPair(**row))
    return pairs


def checkable(pairs: Sequence[CalibrationPair], constitution: Constitution,
              tiers: list[str] | None) -> list[CalibrationPair]:
    """The pairs whose axis the constitution can judge (a comparison principle of it in ``tiers``)."""
    pool = constitution.principles_for("comparison", tiers)
    judged = {a for p in pool for a in p.axes}
    return [p for p in pairs if p.axis in judged]


def wilson_interval(hits: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``hits / n``."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _axis_summary(labels: Sequence[PreferenceLabel]) -> dict[str, Any]:
    ok = [lab for lab in labels if lab.error is None]
    if not ok:
        return {"n": 0, "errors": len(labels), "accuracy": None, "ci": None, "at_chance": True,
                "position_bias": None, "decisiveness": None}
    hits = [1.0 if lab.prob_a > 0.5 else 0.5 if lab.prob_a == 0.5 else 0.0 for lab in ok]
    low, high = wilson_interval(sum(hits), len(hits))
    biases = [lab.position_bias for lab in ok if lab.position_bias is not None]
    decisiveness = sum(abs(lab.prob_a - 0.5) for lab in ok) / len(ok)
    return {"n": len(ok), "errors": len(labels) - len(ok), "accuracy": sum(hits) / len(hits), "ci": [low, high],
            "at_chance": low <= 0.5 or decisiveness < MIN_DECISIVENESS,
            "position_bias": sum(biases) / len(biases) if biases else None, "decisiveness": decisiveness}


def judge_check(label: Callable[[list[ComparisonRequest]], list[PreferenceLabel]], constitution: Constitution, *,
                tiers: list[str] | None, trained_axes: Sequence[str],
                pairs: Sequence[CalibrationPair] | None = None) -> dict[str, Any]:
    """Label the calibration pairs with ``label`` (a worker's or pool's ``label_pairs``) and summarise."""
    chosen = checkable(pairs if pairs is not None else load_calibration(), constitution, tiers)
    if not chosen:
        return {"constitution": constitution.name, "num_pairs": 0, "axes": {}, "overall": None,
                "at_chance_trained_axes": list(trained_axes), "skipped_axes": []}
    requests = [ComparisonRequest(f"calib/{p.id}", p.prompt, p.better, p.worse, axis=p.axis) for p in chosen]
    labels = label(requests)
    by_axis: dict[str, list[PreferenceLabel]] = {}
    for p, lab in zip(chosen, labels, strict=True):
        by_axis.setdefault(p.axis, []).append(lab)
    axes = {a: _axis_summary(labs) for a, labs in by_axis.items()}
    all_axes = {p.axis for p in (pairs if pairs is not None else load_calibration())}
    return {"constitution": constitution.name, "num_pairs": len(chosen), "axes": axes,
            "overall": _axis_summary(labels),
            "at_chance_trained_axes": sorted(a for a in trained_axes if axes.get(a, {"at_chance": True})["at_chance"]),
            "skipped_axes": sorted(all_axes - set(by_axis))}


def trained_axes(constitution: Constitution, label_axes: str | list[str], tiers: list[str] | None) -> tuple[str, ...]:
    """The axes a run trains on: ``feedback.label_axes``, else those of the comparison principles it samples."""
    chosen = constitution.label_axes(label_axes, tiers)
    if chosen:
        return chosen
    return tuple(dict.fromkeys(a for p in constitution.principles_for("comparison", tiers) for a in p.axes))


def warn_if_at_chance(report: dict[str, Any]) -> None:
    """Log the check once; a loud warning naming the trained axes on which the judge is at chance."""
    overall = report["overall"]
    if overall is not None:
        log.info("judge check on %d calibration pairs: accuracy %.2f [%.2f, %.2f], position bias %s, "
                 "mean |p-0.5| %.3f", report["num_pairs"], overall["accuracy"], *overall["ci"],
                 "n/a" if overall["position_bias"] is None else f"{overall['position_bias']:+.3f}",
                 overall["decisiveness"])
    if report["at_chance_trained_axes"]:
        log.warning("!!! THE FEEDBACK MODEL IS AT CHANCE on trained axes %s: its accuracy interval on the "
                    "calibration set reaches 0.5, so its labels on these axes are close to noise. Use a "
                    "stronger feedback model (models.feedback) before trusting this run's preferences. !!!",
                    report["at_chance_trained_axes"])


def format_report(report: dict[str, Any]) -> str:
    """One line per axis."""
    lines = [f"judge check: {report['num_pairs']} pairs, constitution '{report['constitution']}'"]
    for axis, s in sorted(report["axes"].items()):
        if s["accuracy"] is None:
            lines.append(f"  {axis:14s} no labels ({s['errors']} errors)")
            continue
        bias = "n/a" if s["position_bias"] is None else f"{s['position_bias']:+.3f}"
        lines.append(f"  {axis:14s} acc {s['accuracy']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] n={s['n']} "
                     f"bias {bias} |p-0.5| {s['decisiveness']:.3f}{'  AT CHANCE' if s['at_chance'] else ''}")
    if report["skipped_axes"]:
        lines.append(f"  not judged (no principle for them in this constitution): {', '.join(report['skipped_axes'])}")
    return "\n".join(lines)
