"""``cai-ray axes``: how the behavioural axes of a run's per-axis labels relate.

For each window of iterations (and for the whole run) the Pearson correlation between every two axes'
soft labels over the labelled pairs, with a percentile-bootstrap interval (pairs resampled, seeded).
A pair of axes *trades off* when its interval lies wholly below zero: the judge tends to prefer the
other response on one axis whenever it prefers a response on the other. JSON + one PNG heatmap per window.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_ray.evaluation.stats import percentile_interval

LABELS_DIR = "labels"


class AxesReportError(ValueError):
    """A run folder without per-axis labels; the message names the folder and the fix."""


def read_axis_labels(run_dir: Path) -> dict[int, list[dict[str, float]]]:
    """Per iteration, the per-axis soft labels of the labelled pairs (errors skipped)."""
    files = sorted((run_dir / LABELS_DIR).glob("iter_*.jsonl"))
    if not files:
        raise AxesReportError(f"{run_dir}: no {LABELS_DIR}/iter_*.jsonl; is this an RL run folder?")
    out: dict[int, list[dict[str, float]]] = {}
    for path in files:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out[int(path.stem.removeprefix("iter_"))] = [r["axis_probs"] for r in rows
                                                      if r.get("error") is None and r.get("axis_probs")]
    if not any(out.values()):
        raise AxesReportError(f"{run_dir}: the labels carry no per-axis soft labels; run with feedback.label_axes "
                              "set to 'all' or a list of axes")
    return out


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than 2 points."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def correlation_with_ci(xs: Sequence[float], ys: Sequence[float], *, num_samples: int, seed: int,
                        alpha: float = 0.05) -> dict[str, Any]:
    """``{"r", "ci", "n"}``: the correlation and its bootstrap interval (None where undefined)."""
    r = pearson(xs, ys)
    rng = random.Random(seed)
    stats = []
    for _ in range(num_samples if r is not None else 0):
        idx = [rng.randrange(len(xs)) for _ in xs]
        value = pearson([xs[i] for i in idx], [ys[i] for i in idx])
        if value is not None:
            stats.append(value)
    ci = list(percentile_interval(stats, alpha)) if len(stats) >= 2 else None
    return {"r": r, "ci": ci, "n": len(xs)}


def window_report(rows: Sequence[dict[str, float]], *, num_samples: int, seed: int) -> dict[str, Any]:
    """Correlation matrix (axes in first-seen order), intervals and the trade-off pairs of one window."""
    axes = list(dict.fromkeys(a for r in rows for a in r))
    cells: dict[str, dict[str, Any]] = {}
    trade_offs = []
    for i, a in enumerate(axes):
        for b in axes[i + 1:]:
            both = [r for r in rows if a in r and b in r]
            cell = correlation_with_ci([r[a] for r in both], [r[b] for r in both], num_samples=num_samples,
                                       seed=seed + i)
            cells[f"{a}|{b}"] = cell
            if cell["ci"] is not None and cell["ci"][1] < 0:
                trade_offs.append({"axes": [a, b], "r": cell["r"], "ci": cell["ci"]})
    matrix = [[1.0 if a == b else cells.get(f"{a}|{b}", cells.get(f"{b}|{a}", {})).get("r") for b in axes]
              for a in axes]
    trade_offs.sort(key=lambda t: t["r"])
    return {"num_pairs": len(rows), "axes": axes, "matrix": matrix, "pairs": cells, "trade_offs": trade_offs}


def axes_report(run_dir: Path, *, window: int, num_samples: int, seed: int) -> dict[str, Any]:
    """The whole run and each window of ``window`` iterations."""
    if window < 1:
        raise AxesReportError(f"--window must be >= 1, got {window}")
    by_iter = read_axis_labels(run_dir)
    iters = sorted(by_iter)
    windows = []
    for start in range(0, len(iters), window):
        chunk = iters[start:start + window]
        rows = [r for it in chunk for r in by_iter[it]]
        windows.append({"iterations": [chunk[0], chunk[-1]]} | window_report(rows, num_samples=num_samples,
                                                                             seed=seed))
    all_rows = [r for it in iters for r in by_iter[it]]
    return {"run_dir": str(run_dir), "window": window, "bootstrap_samples": num_samples,
            "overall": window_report(all_rows, num_samples=num_samples, seed=seed), "windows": windows}


def plot_heatmap(win: dict[str, Any], title: str, path: Path) -> Path:
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
    ax.set_title(f"{title} (n={win['num_pairs']} pairs)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson r of per-axis labels")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_axes_report(run_dir: Path, out: Path, *, window: int, num_samples: int, seed: int) -> dict[str, Any]:
    """``axes.json`` and ``axes_overall.png`` / ``axes_iter_A-B.png`` under ``out``."""
    report = axes_report(run_dir, window=window, num_samples=num_samples, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [str(plot_heatmap(report["overall"], "all iterations", out / "axes_overall.png"))]
    for win in report["windows"]:
        a, b = win["iterations"]
        report["plots"].append(str(plot_heatmap(win, f"iterations {a}-{b}", out / f"axes_iter_{a:04d}-{b:04d}.png")))
    (out / "axes.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def format_trade_offs(report: dict[str, Any]) -> str:
    """A short text summary: the most anti-correlated pairs of the whole run."""
    overall = report["overall"]
    lines = [f"{overall['num_pairs']} labelled pairs, {len(overall['axes'])} axes"]
    if not overall["trade_offs"]:
        lines.append("no axis pair is reliably anti-correlated (no 95% interval wholly below 0)")
    for t in overall["trade_offs"]:
        lines.append(f"trade-off {t['axes'][0]} vs {t['axes'][1]}: r={t['r']:.2f} [{t['ci'][0]:.2f}, {t['ci'][1]:.2f}]")
    return "\n".join(lines)
