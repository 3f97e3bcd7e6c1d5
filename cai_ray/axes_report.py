"""``cai-ray axes``: how the behavioural axes of a run relate, in its labels and in its preference model.

Two sources, the same statistics:
- **labels** (``RUN/labels/iter_NNNN.jsonl``): the judge's per-axis soft labels, one point per labelled pair;
- **PM scores** (``RUN/pm_scores/iter_NNNN.jsonl``, written by the RL loop when the PM has one head per axis):
  each head's score of the iteration's policy samples, taken *before* the PM is updated on their labels, so
  the PM has trained on none of them (held out as ``pm_fresh/*`` is). Scores are centred within each
  prompt's samples: a Bradley-Terry head is only defined up to a per-prompt constant, and the within-prompt
  contrast is what a reward or a group advantage uses. A prompt with one sample has no contrast and is
  left out.
For each window of iterations (and for the whole run): the Pearson correlation between every two axes with a
percentile-bootstrap interval (seeded), resampling the independent units -- pairs for labels, prompts for PM
scores (a prompt's samples share it). A pair of axes *trades off* when its interval lies wholly below zero.
``trend`` lists each pair's r window by window: how the relation moves over the iterations.
JSON + one PNG heatmap per source and window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_ray.evaluation.stats import percentile_interval

LABELS_DIR = "labels"
PM_SCORES_DIR = "pm_scores"  # the RL loop writes here (multi-head PM only)
Cluster = list[dict[str, float]]  # the per-axis values of rows that are resampled together


class AxesReportError(ValueError):
    """A run folder without per-axis labels; the message names the folder and the fix."""


def _read_iterations(folder: Path) -> dict[int, list[dict[str, Any]]]:
    """The rows of each ``iter_NNNN.jsonl`` under ``folder``, by iteration (empty when there are none)."""
    out = {}
    for path in sorted(folder.glob("iter_*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        out[int(path.stem.removeprefix("iter_"))] = [json.loads(line) for line in lines if line.strip()]
    return out


def read_axis_labels(run_dir: Path) -> dict[int, list[Cluster]]:
    """Per iteration, the per-axis soft labels of the labelled pairs, one cluster per pair (errors skipped)."""
    by_iter = _read_iterations(run_dir / LABELS_DIR)
    if not by_iter:
        raise AxesReportError(f"{run_dir}: no {LABELS_DIR}/iter_*.jsonl; is this an RL run folder?")
    out = {it: [[r["axis_probs"]] for r in rows if r.get("error") is None and r.get("axis_probs")]
           for it, rows in by_iter.items()}
    if not any(out.values()):
        raise AxesReportError(f"{run_dir}: the labels carry no per-axis soft labels; run with feedback.label_axes "
                              "set to 'all' or a list of axes")
    return out


def read_pm_scores(run_dir: Path) -> dict[int, list[Cluster]]:
    """Per iteration, the held-out per-axis PM scores centred within each prompt, one cluster per prompt with
    two or more samples (empty when the run wrote none: no multi-head PM)."""
    out = {}
    for it, rows in _read_iterations(run_dir / PM_SCORES_DIR).items():
        groups: dict[str, list[dict[str, float]]] = {}
        for r in rows:
            groups.setdefault(r["prompt_id"], []).append(r["scores"])
        out[it] = [_centred(g) for g in groups.values() if len(g) >= 2]
    return out


def _centred(rows: Sequence[dict[str, float]]) -> Cluster:
    """Each axis's values minus their mean over ``rows`` (the axes all rows have)."""
    axes = [a for a in rows[0] if all(a in r for r in rows)]
    means = {a: sum(r[a] for r in rows) / len(rows) for a in axes}
    return [{a: r[a] - means[a] for a in axes} for r in rows]


def _pearson_rows(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Pearson r of the points (x, y) [n] for each row of weights w [B, n]; nan where a side is
    constant over the points of weight > 0 (or fewer than two points)."""
    total = w.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = x - (w * x).sum(axis=1, keepdims=True) / total
        dy = y - (w * y).sum(axis=1, keepdims=True) / total
        r = (w * dx * dy).sum(axis=1) / np.sqrt((w * dx * dx).sum(axis=1) * (w * dy * dy).sum(axis=1))
    used = w > 0
    constant = np.zeros(len(w), dtype=bool)
    for v in (x, y):  # exact, unlike a variance threshold: a constant side gives no correlation, not noise
        constant |= np.where(used, v, np.inf).min(axis=1) == np.where(used, v, -np.inf).max(axis=1)
    return np.where(constant, np.nan, r)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than 2 points."""
    if len(xs) < 2:
        return None
    r = _pearson_rows(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), np.ones((1, len(xs))))
    return None if math.isnan(r[0]) else float(r[0])


def correlation_with_ci(clusters: Sequence[Sequence[tuple[float, float]]], *, num_samples: int, seed: int,
                        alpha: float = 0.05) -> dict[str, Any]:
    """``{"r", "ci", "n"}`` of the (x, y) points: the correlation and its percentile-bootstrap interval, the
    clusters resampled with replacement (None where undefined)."""
    points = [p for c in clusters for p in c]
    x, y = (np.asarray([p[i] for p in points], dtype=np.float64) for i in (0, 1))
    r = pearson(x.tolist(), y.tolist())
    if r is None or num_samples < 1:
        return {"r": r, "ci": None, "n": len(points)}
    owner = np.repeat(np.arange(len(clusters)), [len(c) for c in clusters])
    counts = np.random.default_rng(seed).multinomial(len(clusters), [1 / len(clusters)] * len(clusters),
                                                     size=num_samples)  # a resample = how often each cluster
    stats = _pearson_rows(x, y, counts[:, owner].astype(np.float64))
    stats = stats[~np.isnan(stats)]
    ci = list(percentile_interval(stats.tolist(), alpha)) if len(stats) >= 2 else None
    return {"r": r, "ci": ci, "n": len(points)}


def window_report(clusters: Sequence[Cluster], *, num_samples: int, seed: int) -> dict[str, Any]:
    """Correlation matrix (axes in first-seen order), intervals and the trade-off pairs of one window."""
    axes = list(dict.fromkeys(a for c in clusters for r in c for a in r))
    cells: dict[str, dict[str, Any]] = {}
    trade_offs = []
    for i, a in enumerate(axes):
        for b in axes[i + 1:]:
            both = [pts for c in clusters if (pts := [(r[a], r[b]) for r in c if a in r and b in r])]
            cell = correlation_with_ci(both, num_samples=num_samples, seed=seed + i)
            cells[f"{a}|{b}"] = cell
            if cell["ci"] is not None and cell["ci"][1] < 0:
                trade_offs.append({"axes": [a, b], "r": cell["r"], "ci": cell["ci"]})
    matrix = [[1.0 if a == b else cells.get(f"{a}|{b}", cells.get(f"{b}|{a}", {})).get("r") for b in axes]
              for a in axes]
    trade_offs.sort(key=lambda t: t["r"])
    return {"n": sum(len(c) for c in clusters), "num_units": len(clusters), "axes": axes, "matrix": matrix,
            "pairs": cells, "trade_offs": trade_offs}


def source_report(by_iter: dict[int, list[Cluster]], *, window: int, num_samples: int, seed: int) -> dict[str, Any]:
    """One source over the whole run and each window of ``window`` iterations, and each pair's r by window."""
    iters = sorted(by_iter)
    windows = []
    for start in range(0, len(iters), window):
        chunk = iters[start:start + window]
        clusters = [c for it in chunk for c in by_iter[it]]
        windows.append({"iterations": [chunk[0], chunk[-1]]} | window_report(clusters, num_samples=num_samples,
                                                                             seed=seed))
    overall = window_report([c for it in iters for c in by_iter[it]], num_samples=num_samples, seed=seed)
    trend = {pair: [w["pairs"].get(pair, {}).get("r") for w in windows] for pair in overall["pairs"]}
    return {"overall": overall, "windows": windows, "trend": trend}


SOURCES = {  # key: (what a row is, what is correlated) -- for the JSON and the plots
    "labels": ("labelled pair", "per-axis labels"),
    "pm_scores": ("held-out policy sample", "per-axis PM scores (centred per prompt)"),
}


def axes_report(run_dir: Path, *, window: int, num_samples: int = 200, seed: int = 0) -> dict[str, Any]:
    """Both sources (``pm_scores`` is None when the run has no multi-head PM scores)."""
    if window < 1:
        raise AxesReportError(f"--window must be >= 1, got {window}")
    labels = read_axis_labels(run_dir)
    pm = read_pm_scores(run_dir)
    report: dict[str, Any] = {"run_dir": str(run_dir), "window": window, "bootstrap_samples": num_samples}
    for key, by_iter in (("labels", labels), ("pm_scores", pm)):
        report[key] = None
        if any(by_iter.values()):
            unit, what = SOURCES[key]
            report[key] = {"unit": unit, "what": what} | source_report(by_iter, window=window,
                                                                       num_samples=num_samples, seed=seed)
    return report


def plot_heatmap(win: dict[str, Any], title: str, path: Path, *, what: str, unit: str) -> Path:
    """A correlation heatmap (blue negative, red positive; blank where undefined)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axes = win["axes"]
    values = [[math.nan if v is None else v for v in row] for row in win["matrix"]]
    size = 2.5 + 0.45 * len(axes)
    fig = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(axes)), axes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(axes)), axes, fontsize=8)
    ax.set_title(f"{title} (n={win['n']} {unit}s)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"Pearson r of {what}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_axes_report(run_dir: Path, out: Path, *, window: int, num_samples: int, seed: int) -> dict[str, Any]:
    """``axes.json`` and, per source, ``<source>_overall.png`` / ``<source>_iter_A-B.png`` under ``out``."""
    report = axes_report(run_dir, window=window, num_samples=num_samples, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = []
    for key in SOURCES:
        src = report[key]
        if src is None:
            continue
        style = {"what": src["what"], "unit": src["unit"]}
        report["plots"].append(str(plot_heatmap(src["overall"], f"{key}: all iterations",
                                                out / f"{key}_overall.png", **style)))
        for win in src["windows"]:
            a, b = win["iterations"]
            report["plots"].append(str(plot_heatmap(win, f"{key}: iterations {a}-{b}",
                                                    out / f"{key}_iter_{a:04d}-{b:04d}.png", **style)))
    (out / "axes.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def format_trade_offs(report: dict[str, Any]) -> str:
    """A short text summary: per source, the most anti-correlated pairs of the whole run."""
    lines = []
    if report["pm_scores"] is None:
        lines.append(f"no {PM_SCORES_DIR}/iter_*.jsonl: the run had no per-axis preference model")
    for key in SOURCES:
        src = report[key]
        if src is None:
            continue
        overall = src["overall"]
        tested = sum(cell["ci"] is not None for cell in overall["pairs"].values())
        # one-sided: an interval wholly below 0 by chance alone has probability about alpha/2 per tested pair,
        # more with few units (a percentile interval from < ~20 units is too narrow)
        lines.append(f"{key}: {overall['n']} {src['unit']}s ({overall['num_units']} resampled units), "
                     f"{len(overall['axes'])} axes; {len(overall['trade_offs'])} of {tested} pairs called "
                     f"trade-offs (about {0.025 * tested:.1f} would be by chance alone)")
        if not overall["trade_offs"]:
            lines.append("  no axis pair is reliably anti-correlated (no 95% interval wholly below 0)")
        for t in overall["trade_offs"]:
            by_window = " ".join("-" if r is None else f"{r:.2f}" for r in src["trend"]["|".join(t["axes"])])
            lines.append(f"  trade-off {t['axes'][0]} vs {t['axes'][1]}: r={t['r']:.2f} "
                         f"[{t['ci'][0]:.2f}, {t['ci'][1]:.2f}]; by window: {by_window}")
    return "\n".join(lines)
