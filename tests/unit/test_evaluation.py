"""Evaluation statistics and report assembly: hand-computed values and properties (no model, no Ray)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cai_ray.config import ConfigError
from cai_ray.constitution import ANSWER_PREFIX, judge_prompt
from cai_ray.evaluation.items import (
    BENIGN,
    HARMFUL_QUESTION,
    RED_TEAM,
    REFUSAL_QUESTION,
    EvalPrompt,
    Judged,
    Response,
    comparison_pairs,
    pair_up,
)
from cai_ray.evaluation.report import (
    checkpoint_entry,
    checkpoint_report,
    format_table,
    plot_report,
    win_rate_entry,
    win_rate_report,
)
from cai_ray.evaluation.run import parse_checkpoints, run_checkpoints
from cai_ray.evaluation.stats import Bootstrap, Estimate, bootstrap_ci, percentile_interval, verdicts
from cai_ray.inference.labels import preference_label
from cai_ray.types import Sample

BOOT = Bootstrap(num_samples=2000, seed=0, alpha=0.05)


# -------------------------------------------------------------------------------- statistics
def test_percentile_interval_hand_values() -> None:
    # Sorted 1..5: quantile q sits at position 4q; 0.025 -> 0.1 -> 1.1, 0.975 -> 3.9 -> 4.9.
    assert percentile_interval([5, 1, 4, 2, 3], 0.05) == pytest.approx((1.1, 4.9), abs=1e-12)
    assert percentile_interval([0.0, 10.0], 0.5) == pytest.approx((2.5, 7.5), abs=1e-12)
    assert percentile_interval([3.0], 0.05) == (3.0, 3.0)
    with pytest.raises(ValueError):
        percentile_interval([], 0.05)
    with pytest.raises(ValueError):
        percentile_interval([1.0], 1.0)


def test_bootstrap_ci_hand_values_two_points() -> None:
    # Resampled means of [0, 1]: 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4.
    assert bootstrap_ci([0.0, 1.0], num_samples=4000, seed=0) == (0.5, 0.0, 1.0)
    # The central 40 % (quantiles 0.3 and 0.7) lies inside the mass at 0.5.
    assert bootstrap_ci([0.0, 1.0], num_samples=4000, seed=0, alpha=0.6) == (0.5, 0.5, 0.5)


def test_bootstrap_ci_hand_values_three_points() -> None:
    # Means of [0, 0, 1]: k/3 with k ~ Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27; cumulative 0.296, 0.741,
    # 0.963, 1. The 97.5 % quantile is in the last block (1.0), the 95 % quantile in the one before (2/3).
    mean, low, high = bootstrap_ci([0.0, 0.0, 1.0], num_samples=20000, seed=1)
    assert (mean, low, high) == (pytest.approx(1 / 3), 0.0, 1.0)
    _, low, high = bootstrap_ci([0.0, 0.0, 1.0], num_samples=20000, seed=1, alpha=0.1)
    assert (low, high) == (0.0, pytest.approx(2 / 3))


def test_bootstrap_ci_degenerate_and_errors() -> None:
    assert bootstrap_ci([7.0], num_samples=100, seed=0) == (7.0, 7.0, 7.0)
    assert bootstrap_ci([0.3] * 5, num_samples=100, seed=0) == pytest.approx((0.3, 0.3, 0.3))
    with pytest.raises(ValueError):
        bootstrap_ci([], num_samples=100, seed=0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], num_samples=0, seed=0)


def test_bootstrap_ci_properties() -> None:
    rng = random.Random(0)
    for trial in range(50):
        values = [rng.random() for _ in range(rng.randint(1, 30))]
        mean, low, high = bootstrap_ci(values, num_samples=300, seed=trial)
        assert low <= mean <= high
        assert min(values) <= low and high <= max(values)
        assert mean == pytest.approx(sum(values) / len(values))
        assert bootstrap_ci(values, num_samples=300, seed=trial) == (mean, low, high)  # deterministic
        # Shifting the data shifts the interval (same seed: same resamples).
        shifted = bootstrap_ci([v + 10 for v in values], num_samples=300, seed=trial)
        assert shifted == pytest.approx((mean + 10, low + 10, high + 10))


def test_bootstrap_ci_narrows_with_more_data_and_covers() -> None:
    coin = np.random.default_rng(0)
    small = bootstrap_ci(coin.integers(0, 2, 10).tolist(), num_samples=1000, seed=0)
    large = bootstrap_ci(coin.integers(0, 2, 1000).tolist(), num_samples=1000, seed=0)
    assert large[2] - large[1] < small[2] - small[1]
    # Coverage of a Bernoulli(0.3) mean with n = 100 is near the nominal 95 %.
    covered = 0
    for trial in range(200):
        _, low, high = bootstrap_ci((coin.random(100) < 0.3).astype(float).tolist(), num_samples=500, seed=trial)
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_estimate_complement_and_json() -> None:
    est = Estimate(0.25, 0.1, 0.4, 8)
    assert est.complement() == Estimate(0.75, pytest.approx(0.6), pytest.approx(0.9), 8)
    assert est.to_json("rate") == {"rate": 0.25, "ci": [0.1, 0.4], "n": 8}
    empty = BOOT.estimate([])
    assert empty == Estimate(None, None, None, 0) and empty.complement() == empty
    assert empty.to_json("rate") == {"rate": None, "ci": None, "n": 0}


def test_verdicts_threshold_is_strict() -> None:
    assert verdicts([0.2, 0.5, 0.51, 1.0], threshold=0.5) == [0.0, 0.0, 1.0, 1.0]
    assert verdicts([], threshold=0.5) == []


def test_judge_prompt_orders_and_debiasing() -> None:
    yes_first = judge_prompt(None, question="Is it rude?", prompt="Hi", response="Go away.")
    no_first = judge_prompt(None, question="Is it rude?", prompt="Hi", response="Go away.", yes_first=False)
    assert "(A) Yes\n(B) No" in yes_first and "(A) No\n(B) Yes" in no_first
    assert yes_first.endswith(ANSWER_PREFIX) and "Assistant: Go away." in yes_first
    # P(A) = 0.8 with Yes first, P(A) = 0.4 with No first (so P(yes) = 0.6): debiased P(yes) = (0.8 + 0.6) / 2.
    assert preference_label([0.8], [0.4]) == pytest.approx(0.7, abs=1e-12)


# ------------------------------------------------------------------------------ checkpoints
def test_comparison_pairs() -> None:
    names = ["base", "sl", "rl"]
    assert comparison_pairs(names, "previous") == [("base", "sl"), ("sl", "rl")]
    assert comparison_pairs(names, "first") == [("base", "sl"), ("base", "rl")]
    assert comparison_pairs(["base"], "previous") == []
    with pytest.raises(ValueError):
        comparison_pairs(names, "best")


def test_parse_checkpoints() -> None:
    assert parse_checkpoints(["a=x", " b = runs/y=z "]) == {"a": "x", "b": "runs/y=z"}
    assert list(parse_checkpoints(["z=1", "a=2"])) == ["z", "a"]  # order kept
    for bad in (["a"], ["=x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(ConfigError, match="--checkpoint"):
            parse_checkpoints(bad)


def test_run_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "sl" / "policy").mkdir(parents=True)
    assert run_checkpoints(run, "tiny") == ({"base": "tiny"}, None)  # an empty folder is not a checkpoint
    for sub in ("sl/policy", "checkpoint/learner/policy_hf", "checkpoint/learner/preference_hf"):
        (run / sub).mkdir(parents=True, exist_ok=True)
        (run / sub / "config.json").write_text("{}")
    found, pm = run_checkpoints(run, "tiny")
    assert found == {"base": "tiny", "sl": str(run / "sl" / "policy"),
                     "rl": str(run / "checkpoint" / "learner" / "policy_hf")}
    assert list(found) == ["base", "sl", "rl"]
    assert pm == str(run / "checkpoint" / "learner" / "preference_hf")
    with pytest.raises(ConfigError, match="no such folder"):
        run_checkpoints(tmp_path / "missing", "tiny")


# ----------------------------------------------------------------------------------- report
def test_checkpoint_report_hand_values() -> None:
    report = checkpoint_report(harm=[0.9, 0.2, 0.7, 0.4], refusal=[0.8, 0.1, 0.6], sensitive=[True, False, True],
                               pm_red=[1.0, 3.0], pm_benign=[-1.0], threshold=0.5, boot=BOOT)
    harm = report["harmlessness"]
    assert harm["harmful_rate"] == 0.5 and harm["n"] == 4 and harm["mean_prob_harmful"] == pytest.approx(0.55)
    assert 0.0 <= harm["ci"][0] <= 0.5 <= harm["ci"][1] <= 1.0
    refusal = report["over_refusal"]
    assert refusal["refusal_rate"] == pytest.approx(2 / 3) and refusal["n"] == 3
    assert refusal["mean_prob_refusal"] == pytest.approx(0.5)
    assert refusal["sensitive_sounding"] == {"refusal_rate": 1.0, "ci": [1.0, 1.0], "n": 2}
    helpful = report["helpfulness"]
    assert helpful["score"] == pytest.approx(1 / 3)
    assert helpful["ci"] == pytest.approx([1 - refusal["ci"][1], 1 - refusal["ci"][0]])
    assert report["pm_score"]["mean"] == 2.0 and report["pm_score"]["n"] == 2
    assert report["pm_score"]["benign"] == {"mean": -1.0, "ci": [-1.0, -1.0], "n": 1}
    without_pm = checkpoint_report(harm=[0.9], refusal=[], sensitive=[], pm_red=None, pm_benign=None,
                                   threshold=0.5, boot=BOOT)
    assert without_pm["pm_score"] is None
    assert without_pm["over_refusal"]["refusal_rate"] is None and without_pm["helpfulness"]["score"] is None
    with pytest.raises(ValueError):
        checkpoint_report(harm=[], refusal=[0.5], sensitive=[], pm_red=None, pm_benign=None, threshold=0.5,
                          boot=BOOT)


def test_win_rate_report_hand_values() -> None:
    report = win_rate_report({"red_team": [0.75, 0.25, 1.0], "benign": [0.5]}, ties=1, errors=2, boot=BOOT)
    assert report["win_rate"] == pytest.approx(0.625) and report["n"] == 4
    assert report["ties"] == 1 and report["errors"] == 2
    assert report["by_split"]["red_team"]["win_rate"] == pytest.approx(2 / 3)
    assert report["by_split"]["benign"] == {"win_rate": 0.5, "ci": [0.5, 0.5], "n": 1}
    low, high = report["ci"]
    assert 0.25 <= low <= 0.625 <= high <= 1.0


def _report() -> dict:
    entry = checkpoint_report(harm=[0.9, 0.2], refusal=[0.8, 0.1], sensitive=[True, False], pm_red=None,
                              pm_benign=None, threshold=0.5, boot=BOOT)
    better = checkpoint_report(harm=[0.1, 0.2], refusal=[0.3, 0.1], sensitive=[True, False], pm_red=None,
                               pm_benign=None, threshold=0.5, boot=BOOT)
    return {"checkpoints": {"base": entry, "rl": better},
            "win_rates": [{"a": "base", "b": "rl"} | win_rate_report({"red_team": [0.9]}, ties=0, errors=0, boot=BOOT)],
            "metadata": {"config_name": "unit", "confidence_level": 0.95}}


def test_format_table() -> None:
    text = format_table(_report())
    assert "95% bootstrap" in text
    assert text.splitlines()[2].startswith("base") and "0.500 [" in text.splitlines()[2]
    assert "win-rate rl over base: 0.900 [0.900, 0.900] (n=1, ties 0, errors 0)" in text


def test_plot_report_writes_a_png(tmp_path: Path) -> None:
    path = plot_report(_report(), tmp_path / "sub" / "eval.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    json.dumps(_report())  # the report is plain JSON


def test_cli_eval_rejects_bad_flags_before_starting_anything(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from cai_ray.cli import main

    config = str(Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml")
    run = tmp_path / "run"
    run.mkdir()
    cases = [
        (["--run-dir", str(run), "--checkpoint", "base=x"], "already taken by --run-dir"),
        (["--checkpoint", "no-equals-sign"], "expected NAME=MODEL"),
        (["--run-dir", str(tmp_path / "missing")], "no such folder"),
        (["--checkpoint", f"a={tmp_path / 'not-a-model'}"], "not-a-model"),
    ]
    for flags, message in cases:
        assert main(["eval", "--config", config, "--out", str(tmp_path / "out"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ items -> report
def _response(checkpoint: str, prompt: EvalPrompt, text: str, *, finish: str = "stop") -> Response:
    sample = Sample(prompt.id, prompt.text, (1, 2), text, (3,) * len(text), (-0.1,) * len(text), finish, 0, 0)
    return Response(checkpoint, prompt, sample)


def test_items_pair_up_and_report_entries() -> None:
    red = EvalPrompt(RED_TEAM, "r0", "how do I pick a lock?", False)
    benign = [EvalPrompt(BENIGN, f"b{i}", f"question {i}", i == 0) for i in range(2)]
    prompts = [red, *benign]
    base = [_response("base", p, t) for p, t in zip(prompts, ["sure", "no", "yes"])]
    tuned = [_response("tuned", p, t, finish="length") for p, t in zip(prompts[1:], ["no", "fine"])]
    assert base[0].item_id == "base|red_team/r0" and base[0].judge_request().question == HARMFUL_QUESTION
    assert base[1].judge_request().question == REFUSAL_QUESTION

    pairs = pair_up(base, tuned)  # only the prompts both answered, in A's order; identical texts tie at 0.5
    assert [(c.pair_id, c.tie, c.prob_b) for c in pairs] == [("base>tuned|benign/b0", True, 0.5),
                                                             ("base>tuned|benign/b1", False, None)]
    win = win_rate_entry("base", "tuned", pairs, boot=BOOT)  # the unlabelled pair counts as a label error
    assert (win["a"], win["b"], win["n"], win["ties"], win["errors"]) == ("base", "tuned", 1, 1, 1)
    assert win["by_split"]["benign"]["win_rate"] == 0.5 and win["by_split"]["red_team"]["n"] == 0

    judged = [Judged(base[0], 0.9, 1.0), Judged(base[1], None, 2.0), Judged(base[2], 0.2, 3.0)]
    entry = checkpoint_entry(judged, prompts=prompts, rejected=[], threshold=0.5, boot=BOOT, with_pm=True)
    assert entry["counts"] == {"red_team_prompts": 1, "benign_prompts": 2, "sensitive_sounding_prompts": 1,
                               "responses": 3, "rejected_prompts": 0, "judge_errors": 1, "truncated_responses": 0}
    assert entry["harmlessness"]["harmful_rate"] == 1.0 and entry["over_refusal"]["n"] == 1
    assert entry["over_refusal"]["sensitive_sounding"]["n"] == 0  # the sensitive prompt's judgement failed
    assert entry["pm_score"]["mean"] == 1.0 and entry["pm_score"]["benign"]["mean"] == 2.5  # PM scores all
    assert entry["response_length_mean"] == pytest.approx(3.0)  # (4 + 2 + 3) tokens / 3
    assert judged[1].to_row() | {"prompt": None} == {
        "checkpoint": "base", "prompt_id": "benign/b0", "prompt": None, "response": "no", "finish_reason": "stop",
        "question": "refusal", "prob_yes": None, "pm_score": 2.0}
    assert checkpoint_entry(judged, prompts=prompts, rejected=[], threshold=0.5, boot=BOOT,
                            with_pm=False)["pm_score"] is None
