"""Smoke the learner benchmark (--quick): it runs end to end and writes the JSON fields we promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_bench_learner_quick_writes_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_learner.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [out] = tmp_path.glob("learner-zero2-quick-*.json")
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert {"logical_cores", "ram_gib", "cpu_flags"} <= result["machine"].keys()
    assert {"torch", "deepspeed", "ray", "transformers"} <= result["packages"].keys()
    assert "bench_learner.py" in result["command"] and "--quick" in result["command"]
    assert len(result["repetitions"]) == result["config"]["reps"] >= 1
    for rep in result["repetitions"]:
        assert rep["learner_tokens_per_s"] > 0 and rep["plain_tokens_per_s"] > 0
    for key in ("learner_tokens_per_s", "plain_tokens_per_s", "ratio"):
        assert result[key]["min"] <= result[key]["median"] <= result[key]["max"]
    assert result["median_ratio"] > 0
