"""Smoke the learner benchmark (--quick): it runs end to end and writes the JSON fields we promise (not the speed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_learner.py"


def test_bench_learner_quick_writes_json(ray_local: None, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_learner", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # as `python -m` would: the benchmark ships its update function by value
    spec.loader.exec_module(bench)

    # In-process: every rank (LearnerGroup's and the plain loop's) is an actor on the session's Ray.
    returned = bench.main(["--quick", "--out", str(tmp_path)])
    [out] = tmp_path.glob("learner-zero2-quick-*.json")
    assert returned["json"] == str(out)
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert {"logical_cores", "ram_gib", "cpu_flags"} <= result["machine"].keys()
    assert {"torch", "deepspeed", "ray", "transformers"} <= result["packages"].keys()
    assert "benchmarks.bench_learner --quick" in result["command"]
    assert len(result["repetitions"]) == result["config"]["reps"] >= 1
    for rep in result["repetitions"]:
        assert rep["learner_tokens_per_s"] > 0 and rep["plain_tokens_per_s"] > 0
    for key in ("learner_tokens_per_s", "plain_tokens_per_s", "ratio"):
        assert result[key]["min"] <= result[key]["median"] <= result[key]["max"]
    assert result["median_ratio"] > 0
