"""The axis-correlation report: hand-computed correlations, trade-off detection, windows, the held-out PM
scores (centred per prompt, prompts resampled), files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.axes_report import (
    AxesReportError,
    axes_report,
    correlation_with_ci,
    format_trade_offs,
    pearson,
    read_pm_scores,
    write_axes_report,
)
from cai_ray.cli import main
from cai_ray.pipelines.rl_cai import pm_score_rows
from cai_ray.types import Sample


def _run(tmp_path: Path, iters: list[list[dict[str, float]]]) -> Path:
    (tmp_path / "labels").mkdir(parents=True)
    for it, rows in enumerate(iters):
        lines = [json.dumps({"pair_id": f"p{i}", "prob_a": 0.5, "error": None, "axis_probs": r})
                 for i, r in enumerate(rows)]
        lines.append(json.dumps({"pair_id": "bad", "prob_a": 0.5, "error": "identical", "axis_probs": None}))
        (tmp_path / "labels" / f"iter_{it:04d}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def _pm_scores(run: Path, iteration: int, by_prompt: dict[str, list[tuple[float, ...]]], axes: list[str]) -> None:
    """The loop's own rows (``pm_score_rows``) for samples of the given prompts and head scores."""
    samples = [Sample(pid, "p", (1,), "r", (2,), (-0.1,), "stop", 0, i)
               for pid, rows in by_prompt.items() for i in range(len(rows))]
    scores = [row for rows in by_prompt.values() for row in rows]
    (run / "pm_scores").mkdir(exist_ok=True)
    rows = pm_score_rows(samples, scores, axes)
    (run / "pm_scores" / f"iter_{iteration:04d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pearson_by_hand() -> None:
    # x = [1, 2, 3], y = [1, 3, 2]: means 2, 2; sxy = (-1)(-1) + 0 + (1)(0) = 1; sxx = syy = 2 -> r = 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-12)
    assert pearson([1, 2], [5, 5]) is None and pearson([1], [2]) is None
    assert pearson([0.1, 0.1, 0.1], [1, 2, 3]) is None  # constant, even where float means round


def test_cluster_bootstrap_resamples_whole_clusters() -> None:
    # two clusters of two points: a resample holds cluster 0 twice (p = 1/4; its two points lie on a line of
    # slope -1: r = -1), cluster 1 twice (1/4; slope 1: r = 1) or one of each (1/2; all four points: r = 0.8).
    # So the 30% and 70% quantiles of the bootstrap r both sit in the r = 0.8 half.
    clusters = [[(0.0, 1.0), (1.0, 0.0)], [(2.0, 2.0), (3.0, 3.0)]]
    cell = correlation_with_ci(clusters, num_samples=400, seed=0, alpha=0.6)
    assert cell["n"] == 4 and cell["r"] == pytest.approx(0.8)  # sxy = 4, sxx = syy = 5
    assert cell["ci"] == pytest.approx([0.8, 0.8])
    assert correlation_with_ci(clusters, num_samples=400, seed=0)["ci"] == pytest.approx([-1.0, 1.0])
    single = correlation_with_ci([[p] for c in clusters for p in c], num_samples=400, seed=0, alpha=0.6)
    assert single["r"] == pytest.approx(0.8) and single["ci"] != pytest.approx([0.8, 0.8])  # points, singly


def test_trade_offs_and_windows(tmp_path: Path) -> None:
    ps = [0.1, 0.3, 0.45, 0.6, 0.7, 0.9, 0.2, 0.8]
    rows = [{"honesty": p, "harmlessness": p, "verbosity": 1 - p, "tone": 0.5} for p in ps]  # tone: undecided
    run = _run(tmp_path, [rows, rows[:4], rows[4:]])
    report = axes_report(run, window=2, num_samples=100, seed=1)
    overall = report["labels"]["overall"]
    assert overall["n"] == 16 and overall["axes"] == ["honesty", "harmlessness", "verbosity", "tone"]
    assert overall["pairs"]["honesty|harmlessness"]["r"] == pytest.approx(1.0)
    assert overall["pairs"]["honesty|verbosity"]["r"] == pytest.approx(-1.0)
    assert overall["matrix"][0][2] == pytest.approx(-1.0) and overall["matrix"][2][0] == pytest.approx(-1.0)
    assert overall["pairs"]["honesty|tone"] == {"r": None, "ci": None, "n": 16}  # constant: undefined, not 0
    called = {tuple(t["axes"]) for t in overall["trade_offs"]}
    assert called == {("honesty", "verbosity"), ("harmlessness", "verbosity")}
    windows = report["labels"]["windows"]
    assert [w["iterations"] for w in windows] == [[0, 1], [2, 2]]
    assert windows[0]["n"] == 12 and windows[0]["num_units"] == 12
    assert report["labels"]["trend"]["honesty|verbosity"] == pytest.approx([-1.0, -1.0])
    text = format_trade_offs(report)
    assert "trade-off honesty vs verbosity: r=-1.00 [-1.00, -1.00]; by window: -1.00 -1.00" in text
    assert "the run had no per-axis preference model" in text
    assert report["pm_scores"] is None  # no multi-head PM in this run


def test_pm_scores_centred_per_prompt_and_their_trend(tmp_path: Path) -> None:
    run = _run(tmp_path, [[{"a": 0.2, "b": 0.8}, {"a": 0.6, "b": 0.3}]] * 2)
    axes = ["a", "b", "c"]
    # iteration 0: within each prompt, head b moves against head a (a trade-off); prompt offsets (+10, -5)
    # are shared by all heads and would make raw scores correlate positively; prompt "solo" has one sample.
    _pm_scores(run, 0, {"p": [(10.0, 11.0, 1.0), (12.0, 10.0, 1.0)], "q": [(-5.0, -2.0, 2.0), (-4.0, -3.0, 2.0)],
                        "r": [(0.0, 3.0, 0.0), (3.0, 0.0, 1.0)], "solo": [(9.0, 9.0, 9.0)]}, axes)
    # iteration 1: b moves with a
    _pm_scores(run, 1, {"p": [(10.0, 10.0, 1.0), (12.0, 12.0, 0.0)], "q": [(-5.0, -5.0, 0.0), (-4.0, -4.0, 1.0)]},
               axes)
    by_iter = read_pm_scores(run)
    assert len(by_iter[0]) == 3  # "solo" carries no within-prompt contrast
    assert by_iter[0][0] == [{"a": -1.0, "b": 0.5, "c": 0.0}, {"a": 1.0, "b": -0.5, "c": 0.0}]
    report = axes_report(run, window=1, num_samples=100, seed=0)
    pm = report["pm_scores"]
    first, second = pm["windows"]
    assert first["n"] == 6 and first["num_units"] == 3
    # centred points (a, b): (-1, .5), (1, -.5), (-.5, .5), (.5, -.5), (-1.5, 1.5), (1.5, -1.5):
    # sxy = -6, sxx = 7, syy = 5.5 -> r = -6 / sqrt(38.5); the raw scores correlate positively
    r0 = -6 / 38.5 ** 0.5
    assert pearson([10, 12, -5, -4, 0, 3], [11, 10, -2, -3, 3, 0]) > 0.9
    assert first["pairs"]["a|b"]["r"] == pytest.approx(r0) and first["pairs"]["a|b"]["ci"][1] < 0
    assert ["a", "b"] in [t["axes"] for t in first["trade_offs"]]
    assert second["pairs"]["a|b"]["r"] == pytest.approx(1.0)
    assert ["a", "b"] not in [t["axes"] for t in second["trade_offs"]]
    assert pm["trend"]["a|b"] == pytest.approx([r0, 1.0])  # how the relation moved
    # c: constant within prompts p and q at iteration 0, moves with a in r; defined overall
    assert pm["overall"]["pairs"]["a|c"]["r"] is not None


def test_files_cli_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run", [[{"a": 0.2, "b": 0.8}, {"a": 0.6, "b": 0.3}, {"a": 0.9, "b": 0.1}]])
    report = write_axes_report(run, run / "axes", window=1, num_samples=50, seed=0)
    assert len(report["plots"]) == 2 and all(Path(p).is_file() for p in report["plots"])
    assert (run / "axes" / "axes.json").is_file()
    _pm_scores(run, 0, {"p": [(0.0, 1.0), (1.0, 0.0)], "q": [(0.0, 0.0), (2.0, 1.0)]}, ["a", "b"])
    assert main(["axes", "--run-dir", str(run), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "labels: 3 labelled pairs (3 resampled units), 2 axes;" in out
    assert "pm_scores: 4 held-out policy samples (2 resampled units), 2 axes;" in out
    saved = json.loads((run / "axes" / "axes.json").read_text())
    assert {Path(p).name for p in saved["plots"]} == {"labels_overall.png", "labels_iter_0000-0000.png",
                                                      "pm_scores_overall.png", "pm_scores_iter_0000-0000.png"}
    (tmp_path / "single" / "labels").mkdir(parents=True)
    (tmp_path / "single" / "labels" / "iter_0000.jsonl").write_text(json.dumps({"error": None, "prob_a": 0.4}))
    with pytest.raises(AxesReportError, match="feedback.label_axes"):
        axes_report(tmp_path / "single", window=1, num_samples=50, seed=0)
    assert main(["axes", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "no labels/iter_*.jsonl" in capsys.readouterr().err
