"""The product loop on the real CPU stack: SL + RL-CAI (sync and async), resume, a killed rollout actor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cai_ray.config import ExperimentConfig, load_config
from cai_ray.metrics import read_metrics

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml"


def quickstart(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    return load_config(QUICKSTART, [f"logging.output_dir={tmp_path}/{{name}}", "logging.wandb_mode=disabled",
                                    "cluster.num_cpus=8", *overrides])


@pytest.fixture(scope="module")
def sl_policy(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """SL-CAI once for the module: critique/revision in the feedback pool, then the Ray Train SFT job."""
    from cai_ray.pipelines.run import run_experiment

    cfg = quickstart(tmp_path_factory.mktemp("sl"), "sl.num_red_team_prompts=4")
    run_dir = run_experiment(cfg, sl=True, rl=False)
    rows = (run_dir / "sl" / "sft_data.jsonl").read_text().splitlines()
    assert len(rows) >= 4  # revisions + helpfulness samples
    return str(run_dir / "sl" / "policy")


def _check_history(history: list[dict[str, float]], iterations: int) -> None:
    assert [int(m["iteration"]) for m in history] == list(range(iterations))
    for m in history:
        assert m["samples/count"] > 0 and m["labels/count"] > 0
        assert 0.0 <= m["pm_fresh/accuracy"] <= 1.0
        assert math.isfinite(m["reward/mean"]) and math.isfinite(m["loss/pm"])
        for phase in ("generate", "label", "pm_update", "policy_update", "sync"):
            assert m[f"timing/{phase}"] >= 0.0
        assert m["sync/num_engines"] == 2.0  # the rollout engine + the self-critiquing feedback engine
    assert [m["weight_version"] for m in history] == [float(i + 1) for i in range(iterations)]


@pytest.fixture(scope="module")
def uninterrupted(sl_policy: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, list]:
    """Two synchronous iterations from the SL policy, checkpointing every iteration."""
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    cfg = quickstart(tmp_path_factory.mktemp("full"), f"models.policy.name={sl_policy}")
    return cfg, rl_cai(cfg, run_dir_for(cfg))


def test_sync_loop_from_sl_policy(uninterrupted: tuple[ExperimentConfig, list]) -> None:
    from cai_ray.pipelines.run import run_dir_for

    cfg, history = uninterrupted
    _check_history(history, 2)
    assert read_metrics(run_dir_for(cfg) / "metrics.jsonl")[-1]["iteration"] == 1
    assert (run_dir_for(cfg) / "labels" / "iter_0001.jsonl").is_file()


def test_async_loop_drops_nothing_within_staleness(sl_policy: str, tmp_path: Path) -> None:
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    cfg = quickstart(tmp_path, f"models.policy.name={sl_policy}", "schedule.mode=async", "schedule.num_iterations=3",
                     "learner.algorithm=grpo")
    history = rl_cai(cfg, run_dir_for(cfg))
    _check_history(history, 3)
    # Iteration i>0 trains on samples generated one version earlier, inside the bound of 1.
    assert sum(m["samples/dropped_stale"] for m in history) == 0
    assert all(m["timing/idle"] >= 0 and m["timing/checkpoint"] >= 0 for m in history)


def test_resume_reproduces_uninterrupted_run(uninterrupted: tuple[ExperimentConfig, list], sl_policy: str,
                                             tmp_path: Path) -> None:
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    _, full = uninterrupted
    part = quickstart(tmp_path, f"models.policy.name={sl_policy}", "schedule.num_iterations=1")
    rl_cai(part, run_dir_for(part))
    resumed_cfg = quickstart(tmp_path, f"models.policy.name={sl_policy}")  # same run folder, 2 iterations
    resumed = rl_cai(resumed_cfg, run_dir_for(resumed_cfg), resume=True)
    assert [int(m["iteration"]) for m in resumed] == [1]
    keys = ["reward/mean", "pm_fresh/accuracy", "pm_fresh/loss", "loss/pm", "loss/dpo", "labels/prob_a_mean",
            "response/length_mean"]
    for key in keys:
        assert resumed[0][key] == pytest.approx(full[1][key], rel=1e-4, abs=1e-5), key


def test_killed_rollout_and_feedback_actors_lose_no_work(ray_local: None, tmp_path: Path) -> None:
    import ray

    from cai_ray.pipelines.rl_cai import _iteration_prompts, _prompt_pool, make_pairs
    from cai_ray.pipelines.roles import start_roles

    cfg = quickstart(tmp_path, "schedule.num_prompts_per_iteration=6")
    prompts = _iteration_prompts(cfg, _prompt_pool(cfg), 0)
    roles = start_roles(cfg)
    try:
        roles.push_weights(1)
        pending = roles.submit_generate(prompts, iteration=0)
        ray.kill(roles.rollout[0], no_restart=False)  # dies with its batch in flight
        samples = roles.collect(pending)
        k = cfg.rollout.num_samples_per_prompt
        assert sorted(s.prompt_id for s in samples) == sorted(p.id for p in prompts for _ in range(k))
        assert {s.weight_version for s in samples} == {1}  # the restarted engine got the current weights first
        requests, _ = make_pairs(samples, iteration=0)
        worker = roles.feedback.workers[0]
        ray.kill(worker, no_restart=False)
        labels = roles.feedback.label_pairs(requests)
        assert [lab.pair_id for lab in labels] == [r.pair_id for r in requests]
        assert all(lab.error is None for lab in labels)
        assert ray.get(worker.weight_version.remote(), timeout=60) == 1  # re-synced through on_restart
    finally:
        roles.shutdown()


def test_eval_on_the_quickstart_checkpoints(uninterrupted: tuple[ExperimentConfig, list], tmp_path: Path) -> None:
    """`cai-ray eval --run-dir` on the RL run: base (its SL starting policy) vs rl, scored by the run's own PM."""
    import json

    from cai_ray.cli import main
    from cai_ray.pipelines.run import run_dir_for

    cfg, _ = uninterrupted
    run_dir = run_dir_for(cfg)
    rc = main(["eval", "--config", str(QUICKSTART), "--run-dir", str(run_dir), "--out", str(tmp_path),
               "--set", f"models.policy.name={cfg.models.policy.name}", "--set", "data.red_team_eval.max_rows=4",
               "--set", "data.helpful_eval.max_rows=4", "--set", "eval.max_new_tokens=8",
               "--set", "eval.num_bootstrap_samples=100"])
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report["checkpoints"]) == ["base", "rl"]
    assert report["checkpoints"]["rl"]["model"].endswith("policy_hf")
    for r in report["checkpoints"].values():
        assert r["counts"]["responses"] == 8 and r["counts"]["judge_errors"] == 0
        assert 0.0 <= r["harmlessness"]["harmful_rate"] <= 1.0 and 0.0 <= r["over_refusal"]["refusal_rate"] <= 1.0
        assert r["pm_score"]["n"] == 4 and math.isfinite(r["pm_score"]["mean"])
    [win] = report["win_rates"]
    assert (win["a"], win["b"]) == ("base", "rl") and win["n"] == 8
    assert report["metadata"]["preference_model"] == str(run_dir / "checkpoint" / "learner" / "preference_hf")
