"""Smoke test of benchmarks/bench_inference.py --quick: it runs and writes the JSON fields (not the speed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_inference.py"


def test_bench_inference_quick_writes_json(ray_local: None, tiny_model_path: str, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    # In-process: reuses the session's Ray; --niceness keep leaves the test process's priority alone.
    returned = bench.main(["--quick", "--niceness", "keep", "--out", str(tmp_path)])
    result = json.loads(Path(returned["json"]).read_text())
    assert result["rollout"] == returned["rollout"] and result["labels"] == returned["labels"]

    assert result["benchmark"] == "inference" and result["quick"] is True
    assert "benchmarks.bench_inference --quick" in result["command"]
    machine = result["machine"]
    assert machine["logical_cores"] >= 1 and machine["ram_gib"] > 0 and isinstance(machine["cpu_flags"], list)
    assert {"torch", "ray", "transformers"} <= set(result["packages"])
    assert set(result["settings"]["niceness"]) == {"actors", "baselines"}
    reps = result["settings"]["reps"]
    rollout, labels = result["rollout"], result["labels"]
    for side in (rollout["actor"], rollout["direct"], labels["pool"], labels["naive_generate_per_option"],
                 labels["raw_vllm_prompt_logprobs"]):
        assert len(side["seconds"]) == len(side["per_s"]) == reps
        assert side["summary"]["min"] <= side["summary"]["median"] <= side["summary"]["max"]
    assert rollout["same_tokens_generated"] is True  # both sides did the same work
    for key in ("median_ratio_actor_vs_direct", "median_ratio_pool_vs_naive", "median_ratio_pool_vs_raw"):
        assert (rollout | labels)[key] > 0
    # The three labelling methods compute the same labels: to float32 noise between engines (labels.py states
    # the bound), and within 1e-4 for the raw prompt_logprobs path (whole-prompt recompute, as against HF).
    from cai_ray.inference.labels import CROSS_CALL_TOLERANCE

    assert labels["max_abs_label_diff_vs_naive"] < CROSS_CALL_TOLERANCE
    assert labels["max_abs_label_diff_vs_raw"] < 1e-4
    # Labels/s along 1, 4 and 12 axes (axes12): every K measured each repetition, no item errors, the axes the K
    # share labelled alike whatever K (other engines: the cross-call tolerance), and the PNG written.
    axes = result["axes"]
    assert axes["axis_counts"] == [1, 4, 12] and len(axes["axes"]) >= 12
    for k in ("1", "4", "12"):
        assert len(axes["rate"][k]["per_s"]) == reps and axes["item_errors"][k] == 0
        assert axes["median_ratio_vs_1_axis"][k] > 0 and axes["cost_per_axis_vs_1_axis"][k] > 0
    assert axes["median_ratio_vs_1_axis"]["1"] == 1.0
    assert axes["max_abs_diff_shared_axes_vs_1_axis"] < CROSS_CALL_TOLERANCE
    assert Path(returned["json"]).with_suffix(".png").is_file()
