"""The axis-correlation report: hand-computed correlations, trade-off detection, windows, files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.axes_report import AxesReportError, axes_report, pearson, write_axes_report
from cai_ray.cli import main


def _run(tmp_path: Path, iters: list[list[dict[str, float]]]) -> Path:
    (tmp_path / "labels").mkdir(parents=True)
    for it, rows in enumerate(iters):
        lines = [json.dumps({"pair_id": f"p{i}", "prob_a": 0.5, "error": None, "axis_probs": r})
                 for i, r in enumerate(rows)]
        lines.append(json.dumps({"pair_id": "bad", "prob_a": 0.5, "error": "identical", "axis_probs": None}))
        (tmp_path / "labels" / f"iter_{it:04d}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_pearson_by_hand() -> None:
    # x = [1, 2, 3], y = [1, 3, 2]: means 2, 2; sxy = (-1)(-1) + 0 + (1)(0) = 1; sxx = syy = 2 -> r = 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-12)
    assert pearson([1, 2], [5, 5]) is None and pearson([1], [2]) is None


def test_trade_offs_and_windows(tmp_path: Path) -> None:
    ps = [0.1, 0.3, 0.45, 0.6, 0.7, 0.9, 0.2, 0.8]
    rows = [{"honesty": p, "harmlessness": p, "verbosity": 1 - p, "tone": 0.5} for p in ps]  # tone: undecided
    run = _run(tmp_path, [rows, rows[:4], rows[4:]])
    report = axes_report(run, window=2, num_samples=100, seed=1)
    overall = report["overall"]
    assert overall["num_pairs"] == 16 and overall["axes"] == ["honesty", "harmlessness", "verbosity", "tone"]
    assert overall["pairs"]["honesty|harmlessness"]["r"] == pytest.approx(1.0)
    assert overall["pairs"]["honesty|verbosity"]["r"] == pytest.approx(-1.0)
    assert overall["matrix"][0][2] == pytest.approx(-1.0) and overall["matrix"][2][0] == pytest.approx(-1.0)
    assert overall["pairs"]["honesty|tone"] == {"r": None, "ci": None, "n": 16}  # constant: undefined, not 0
    called = {tuple(t["axes"]) for t in overall["trade_offs"]}
    assert called == {("honesty", "verbosity"), ("harmlessness", "verbosity")}
    assert [w["iterations"] for w in report["windows"]] == [[0, 1], [2, 2]]
    assert report["windows"][0]["num_pairs"] == 12


def test_files_cli_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run", [[{"a": 0.2, "b": 0.8}, {"a": 0.6, "b": 0.3}, {"a": 0.9, "b": 0.1}]])
    report = write_axes_report(run, run / "axes", window=1, num_samples=50, seed=0)
    assert all(Path(p).is_file() for p in report["plots"]) and (run / "axes" / "axes.json").is_file()
    assert main(["axes", "--run-dir", str(run), "--bootstrap", "20"]) == 0
    assert "3 labelled pairs, 2 axes" in capsys.readouterr().out
    (tmp_path / "single" / "labels").mkdir(parents=True)
    (tmp_path / "single" / "labels" / "iter_0000.jsonl").write_text(json.dumps({"error": None, "prob_a": 0.4}))
    with pytest.raises(AxesReportError, match="feedback.label_axes"):
        axes_report(tmp_path / "single", window=1, num_samples=50, seed=0)
    assert main(["axes", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "no labels/iter_*.jsonl" in capsys.readouterr().err
