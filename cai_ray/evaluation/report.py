"""The evaluation report: per-checkpoint rates, win-rates, and their JSON, table and plot.

``eval.json`` is the report; ``eval_items.jsonl`` has every response with its judgement; ``eval.png`` puts
harmlessness against helpfulness, one point per checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_ray.data import write_jsonl
from cai_ray.evaluation.items import BENIGN, RED_TEAM, Comparison, EvalPrompt, Judged
from cai_ray.evaluation.stats import Bootstrap, mean_or_none, verdicts
from cai_ray.types import RejectedItem

REPORT_FILE, ITEMS_FILE, PLOT_FILE = "eval.json", "eval_items.jsonl", "eval.png"


def checkpoint_report(*, harm: Sequence[float], refusal: Sequence[float], sensitive: Sequence[bool],
                      pm_red: Sequence[float] | None, pm_benign: Sequence[float] | None, threshold: float,
                      boot: Bootstrap) -> dict[str, Any]:
    """One checkpoint's metrics from the judge's P(yes) per response.

    Args:
        harm: P(harmful) per judged red-team response.
        refusal: P(refusal) per judged benign response, aligned with ``sensitive``.
        sensitive: whether each of those benign prompts merely sounds sensitive.
        pm_red, pm_benign: preference-model scores per response, or None without a preference model.
    """
    if len(refusal) != len(sensitive):
        raise ValueError(f"{len(refusal)} refusal judgements but {len(sensitive)} sensitive flags")
    refused = verdicts(refusal, threshold=threshold)
    refusal_est = boot.estimate(refused)
    sens = [r for r, s in zip(refused, sensitive) if s]
    over_refusal = refusal_est.to_json("refusal_rate") | {
        "mean_prob_refusal": mean_or_none(refusal),
        "sensitive_sounding": boot.estimate(sens).to_json("refusal_rate"),
    }
    report = {
        "harmlessness": boot.estimate(verdicts(harm, threshold=threshold)).to_json("harmful_rate")
        | {"mean_prob_harmful": mean_or_none(harm)},
        "over_refusal": over_refusal,
        "helpfulness": refusal_est.complement().to_json("score"),
        "pm_score": None,
    }
    if pm_red is not None and pm_benign is not None:
        benign_pm = boot.estimate(pm_benign).to_json("mean")
        report["pm_score"] = boot.estimate(pm_red).to_json("mean") | {"benign": benign_pm}
    return report


def win_rate_report(prob_b: dict[str, list[float]], *, ties: int, errors: int, boot: Bootstrap) -> dict[str, Any]:
    """Win-rate of B over A from the soft labels P(B better) per split, over all prompts and per split."""
    everything = [p for values in prob_b.values() for p in values]
    by_split = {split: boot.estimate(values).to_json("win_rate") for split, values in prob_b.items()}
    return boot.estimate(everything).to_json("win_rate") | {"ties": ties, "errors": errors, "by_split": by_split}


def checkpoint_entry(judged: Sequence[Judged], *, prompts: Sequence[EvalPrompt], rejected: Sequence[RejectedItem],
                     threshold: float, boot: Bootstrap, with_pm: bool) -> dict[str, Any]:
    """:func:`checkpoint_report` of one checkpoint's responses (judge errors left out, counted), with counts."""
    ok = [j for j in judged if j.prob_yes is not None]
    red = [j for j in ok if j.response.prompt.red_team]
    benign = [j for j in ok if not j.response.prompt.red_team]

    def pm(red_team: bool) -> list[float] | None:
        if not with_pm:
            return None
        return [j.pm_score for j in judged if j.response.prompt.red_team == red_team]  # type: ignore[misc]

    entry = checkpoint_report(
        harm=[j.prob_yes for j in red], refusal=[j.prob_yes for j in benign],  # type: ignore[misc]
        sensitive=[j.response.prompt.sensitive for j in benign], pm_red=pm(True), pm_benign=pm(False),
        threshold=threshold, boot=boot,
    )
    samples = [j.response.sample for j in judged]
    counts = {
        "red_team_prompts": sum(p.red_team for p in prompts), "benign_prompts": sum(not p.red_team for p in prompts),
        "sensitive_sounding_prompts": sum(p.sensitive for p in prompts), "responses": len(judged),
        "rejected_prompts": len(rejected), "judge_errors": len(judged) - len(ok),
        "truncated_responses": sum(s.finish_reason == "length" for s in samples),
    }
    return entry | {"response_length_mean": mean_or_none([len(s.response_token_ids) for s in samples]),
                    "counts": counts}


def win_rate_entry(a: str, b: str, comparisons: Sequence[Comparison], *, boot: Bootstrap) -> dict[str, Any]:
    """:func:`win_rate_report` of B over A from their comparisons (label errors left out, counted)."""
    by_split: dict[str, list[float]] = {RED_TEAM: [], BENIGN: []}
    for c in comparisons:
        if c.prob_b is not None:
            by_split[c.a.prompt.split].append(c.prob_b)
    errors = sum(c.prob_b is None for c in comparisons)
    ties = sum(c.tie for c in comparisons)
    return {"a": a, "b": b} | win_rate_report(by_split, ties=ties, errors=errors, boot=boot)


def format_table(report: dict[str, Any]) -> str:
    """A compact text table of the report (rates with their intervals)."""
    def cell(d: dict[str, Any] | None, key: str) -> str:
        if not d or d.get(key) is None:
            return "-"
        low, high = d["ci"]
        return f"{d[key]:.3f} [{low:.3f}, {high:.3f}]"

    level = f"{report['metadata']['confidence_level']:.0%}"
    head = ("checkpoint", "harmful", "refusal (benign)", "refusal (sensitive)", "helpfulness", "PM score")
    rows = [head]
    for name, r in report["checkpoints"].items():
        rows.append((name, cell(r["harmlessness"], "harmful_rate"), cell(r["over_refusal"], "refusal_rate"),
                     cell(r["over_refusal"]["sensitive_sounding"], "refusal_rate"), cell(r["helpfulness"], "score"),
                     cell(r["pm_score"], "mean")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"rates with {level} bootstrap intervals"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for w in report["win_rates"]:
        lines.append(f"win-rate {w['b']} over {w['a']}: {cell(w, 'win_rate')} (n={w['n']}, ties {w['ties']}, "
                     f"errors {w['errors']})")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Harmlessness (1 - harmful rate) against helpfulness (1 - benign refusal rate), one point per checkpoint.

    The shape of Fig. 2 of Bai et al. 2022 with rates instead of Elo; bars are the bootstrap intervals and a
    line joins the checkpoints in order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = [], []
    for name, r in report["checkpoints"].items():
        help_, harm = r["helpfulness"], r["harmlessness"]
        if help_["score"] is None or harm["harmful_rate"] is None:
            continue
        x, y = help_["score"], 1.0 - harm["harmful_rate"]
        y_low, y_high = 1.0 - harm["ci"][1], 1.0 - harm["ci"][0]
        ax.errorbar([x], [y], xerr=[[x - help_["ci"][0]], [help_["ci"][1] - x]], yerr=[[y - y_low], [y_high - y]],
                    fmt="o", capsize=3, label=name)
        stacked = sum(abs(x - x0) < 0.02 and abs(y - y0) < 0.02 for x0, y0 in zip(xs, ys))  # coincident points
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6 - 12 * stacked))
        xs.append(x)
        ys.append(y)
    ax.plot(xs, ys, color="0.6", linewidth=1, zorder=0)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("helpfulness (1 - refusal rate on benign prompts)")
    ax.set_ylabel("harmlessness (1 - harmful rate on red-team prompts)")
    meta = report["metadata"]
    ax.set_title(f"{meta['config_name']}: harmlessness vs helpfulness ({meta['confidence_level']:.0%} CIs)")
    ax.grid(alpha=0.3)
    if xs:
        ax.legend(loc="lower left")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def write_report(report: dict[str, Any], judged: Sequence[Judged], out_dir: str | Path) -> Path:
    """Write ``eval.json`` (strict JSON: NaN and inf become null), ``eval_items.jsonl`` and ``eval.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(_finite(report), indent=1))
    write_jsonl([j.to_row() for j in judged], out / ITEMS_FILE)
    plot_report(report, out / PLOT_FILE)
    return out


def _finite(tree: Any) -> Any:
    """The report with NaN / inf replaced by None (strict JSON)."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree
