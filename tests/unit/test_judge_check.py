"""Judge reliability check: the shipped calibration set, Wilson intervals, the summary on hand-made labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.constitution import load_constitution
from cai_ray.judge_check import (
    CalibrationError,
    judge_check,
    load_calibration,
    trained_axes,
    wilson_interval,
)
from cai_ray.types import ComparisonRequest, PreferenceLabel


def test_shipped_calibration_set_covers_the_axes() -> None:
    pairs = load_calibration()
    assert len(pairs) >= 60 and len({p.id for p in pairs}) == len(pairs)
    axes12 = set(load_constitution("axes12").axis_ids)
    assert {p.axis for p in pairs} == axes12  # every shipped axis, >= 4 pairs each
    assert min(sum(p.axis == a for p in pairs) for a in axes12) >= 4
    assert all(p.better != p.worse for p in pairs)


def test_wilson_by_hand() -> None:
    # 5/5: centre (1 + z^2/10) / (1 + z^2/5), half z * sqrt(z^2/100) / (1 + z^2/5); z = 1.96 -> low 0.5655
    low, high = wilson_interval(5, 5)
    assert low == pytest.approx(0.5655, abs=1e-3) and high == pytest.approx(1.0)
    assert wilson_interval(0, 5)[0] == 0.0
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


def test_summary_flags_chance_and_position_bias() -> None:
    c = load_constitution("axes12")

    def judge(requests: list[ComparisonRequest]) -> list[PreferenceLabel]:
        # a judge that is right and decisive on honesty, and coin-flip-undecided elsewhere
        return [PreferenceLabel(r.pair_id, 0.9 if r.axis == "honesty" else 0.505, (), (), (r.axis,), "multiple_choice",
                                position_bias=0.1) for r in requests]

    report = judge_check(judge, c, tiers=None, trained_axes=["honesty", "tone"])
    assert report["num_pairs"] == len(load_calibration())
    assert report["axes"]["honesty"]["accuracy"] == 1.0 and not report["axes"]["honesty"]["at_chance"]
    assert report["axes"]["tone"]["accuracy"] == 1.0  # always "right", but by a hair:
    assert report["axes"]["tone"]["at_chance"] and report["at_chance_trained_axes"] == ["tone"]
    assert report["overall"]["position_bias"] == pytest.approx(0.1)
    assert report["axes"]["honesty"]["decisiveness"] == pytest.approx(0.4)
    # a constitution without some axes judges only the ones it has
    harmless = load_constitution("harmless")
    part = judge_check(judge, harmless, tiers=None, trained_axes=trained_axes(harmless, "none", None))
    assert "verbosity" in part["skipped_axes"] and "honesty" in part["axes"]


def test_bad_calibration_rows_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    path.write_text(json.dumps({"id": "x", "axis": "tone", "prompt": "p", "better": "b"}) + "\n")
    with pytest.raises(CalibrationError, match=r"cal\.jsonl:1: .*missing or empty \['worse'\]"):
        load_calibration(path)
