"""The product loop on the real CPU stack: SL + RL-CAI (sync and async), resume, eval, killed actors, empty iterations.

Starting the roles (two vLLM engines and a DeepSpeed learner) is most of an RL run's cost on CPU, 20-40 s on 2
cores, where an iteration of the tiny model takes well under a second. So start-ups are shared where isolation
allows: SL runs once per session (``sl_policy`` in conftest), the resume test continues a copy of the
uninterrupted run as it was after its first iteration, and the tests that need no fresh learner run on one set
of roles (``base_roles``, lent to ``rl_cai(roles=...)``). Runs whose assertions count from a fresh learner, or
restore into fresh actors, start their own: three role start-ups in all. ``cai-ray eval`` runs once, on the
uninterrupted run's checkpoints and a perturbed copy of the tiny model.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cai_ray.config import ExperimentConfig, load_config
from cai_ray.metrics import read_metrics

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml"


def quickstart(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    return load_config(QUICKSTART, [f"logging.output_dir={tmp_path}/{{name}}", "logging.wandb_mode=disabled",
                                    "cluster.num_cpus=8", *overrides])


EPOCHS = 2  # learner.num_policy_epochs of the loop runs: exactly this many policy optimizer steps per iteration


def _check_history(history: list[dict[str, float]], iterations: int, *, fresh_learner: bool = True) -> None:
    assert [int(m["iteration"]) for m in history] == list(range(iterations))
    # Counted by the policy's DeepSpeed engine (restored on resume); twice-applied epochs gave EPOCHS**2. A lent
    # learner (base_roles) has trained before: its count goes on from there.
    steps = [m["policy/optimizer_steps"] for m in history]
    first = EPOCHS if fresh_learner else steps[0]
    assert steps[0] >= EPOCHS and steps == [float(first + EPOCHS * i) for i in range(iterations)]
    for m in history:
        assert m["iteration/empty"] == 0.0
        assert m["samples/count"] > 0 and m["labels/count"] > 0
        assert 0.0 <= m["pm_fresh/accuracy"] <= 1.0
        assert math.isfinite(m["reward/mean"]) and math.isfinite(m["loss/pm"])
        for phase in ("generate", "label", "pm_update", "policy_update", "sync"):
            assert m[f"timing/{phase}"] >= 0.0
        assert m["sync/num_engines"] == 2.0  # the rollout engine + the self-critiquing feedback engine
    assert [m["weight_version"] for m in history] == [float(i + 1) for i in range(iterations)]


@pytest.fixture(scope="module")
def uninterrupted(sl_policy: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, list, Path]:
    """Two synchronous iterations from the SL policy, checkpointing every iteration; and a copy of its run folder
    taken as an interruption right after iteration 0 would leave it (that checkpoint and metrics row 0)."""
    from cai_ray.metrics import MetricsWriter
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    cfg = quickstart(tmp_path_factory.mktemp("full"), f"models.policy.name={sl_policy}",
                     f"learner.num_policy_epochs={EPOCHS}")
    run_dir, after_first = run_dir_for(cfg), tmp_path_factory.mktemp("after_first") / "run"
    log = MetricsWriter.log

    def log_then_copy(self: MetricsWriter, step: int, metrics: dict[str, Any]) -> None:
        log(self, step, metrics)  # iteration 0 logs after its checkpoint: the copy holds both
        if step == 0:
            shutil.copytree(run_dir, after_first)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MetricsWriter, "log", log_then_copy)
        history = rl_cai(cfg, run_dir)
    return cfg, history, after_first


def test_sync_loop_from_sl_policy(uninterrupted: tuple[ExperimentConfig, list, Path]) -> None:
    from cai_ray.pipelines.run import run_dir_for

    cfg, history, _ = uninterrupted
    _check_history(history, 2)
    assert [m["samples/staleness_max"] for m in history] == [0.0, 0.0]  # sync: trained on the weights that sampled
    assert read_metrics(run_dir_for(cfg) / "metrics.jsonl")[-1]["iteration"] == 1
    assert (run_dir_for(cfg) / "labels" / "iter_0001.jsonl").is_file()


def test_resume_reproduces_uninterrupted_run(uninterrupted: tuple[ExperimentConfig, list, Path], sl_policy: str,
                                             tmp_path: Path) -> None:
    from cai_ray.pipelines.checkpoint import ResumeError
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    _, full, after_first = uninterrupted
    args = (f"models.policy.name={sl_policy}", f"learner.num_policy_epochs={EPOCHS}")
    run_dir = run_dir_for(quickstart(tmp_path, *args))
    with pytest.raises(ResumeError, match="no checkpoint under"):  # nothing to resume: an error, not iteration 0
        rl_cai(quickstart(tmp_path, *args), run_dir, resume=True)
    # The uninterrupted run as it was after iteration 0 (its checkpoint and metrics row 0), in a new folder.
    shutil.copytree(after_first, run_dir, dirs_exist_ok=True)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0]
    # As if the interrupted run had logged iteration 1 after its last checkpoint: the resume drops that row.
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1, "iteration": 1.0, "leftover": 1.0}\n')
    with pytest.raises(ResumeError, match=r"learner\.optim\.lr: 0\.0001 \(checkpoint\) != 0\.001 \(now\)"):
        rl_cai(quickstart(tmp_path, *args, "learner.optim.lr=1e-3"), run_dir, resume=True)  # refused before start-up
    resumed_cfg = quickstart(tmp_path, *args)  # same run folder, 2 iterations, roles started afresh
    resumed = rl_cai(resumed_cfg, run_dir_for(resumed_cfg), resume=True)
    assert [int(m["iteration"]) for m in resumed] == [1]
    keys = ["reward/mean", "pm_fresh/accuracy", "pm_fresh/loss", "loss/pm", "loss/dpo", "labels/prob_a_mean",
            "response/length_mean", "policy/optimizer_steps"]
    for key in keys:
        assert resumed[0][key] == pytest.approx(full[1][key], rel=1e-4, abs=1e-5), key
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and "leftover" not in rows[1]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: str) -> str:
    """A copy of the tiny model with perturbed weights: a third checkpoint for ``cai-ray eval``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("eval") / "tuned"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)
    return str(out)


def _check_interval(block: dict, key: str, *, low: float = 0.0, high: float = 1.0) -> None:
    lo, hi = block["ci"]
    assert low <= lo <= block[key] <= hi <= high, block


EVAL_ROWS = 6


def test_eval_on_the_quickstart_checkpoints(uninterrupted: tuple[ExperimentConfig, list, Path], tuned: str,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cai-ray eval --run-dir` on the RL run: base (its SL starting policy), rl, and a --checkpoint, scored by
    the run's own PM."""
    from cai_ray.cli import main
    from cai_ray.data import load_prompts
    from cai_ray.pipelines.run import run_dir_for

    cfg, _, _ = uninterrupted
    run_dir, n = run_dir_for(cfg), EVAL_ROWS
    rc = main(["eval", "--config", str(QUICKSTART), "--run-dir", str(run_dir), "--checkpoint", f"tuned={tuned}",
               "--out", str(tmp_path), "--set", f"models.policy.name={cfg.models.policy.name}",
               # A dotted override of one dataset field replaces the whole section, so the path is repeated.
               "--set", "data.red_team_eval.path=redteam_eval", "--set", f"data.red_team_eval.max_rows={n}",
               "--set", "data.helpful_eval.path=helpful_eval", "--set", f"data.helpful_eval.max_rows={n}",
               "--set", "eval.max_new_tokens=8", "--set", "eval.num_bootstrap_samples=200",
               "--set", "rollout.engine.kv_cache_memory_mb=32", "--set", "feedback.engine.kv_cache_memory_mb=32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "win-rate rl over base" in printed and "win-rate tuned over rl" in printed
    assert str(tmp_path / "eval.json") in printed
    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report["checkpoints"]) == ["base", "rl", "tuned"]  # --run-dir's first, then --checkpoint's
    assert report["checkpoints"]["rl"]["model"].endswith("policy_hf")
    assert report["checkpoints"]["tuned"]["model"] == str(Path(tuned).resolve())
    num_sensitive = sum(bool(r.meta.get("sensitive_sounding")) for r in load_prompts("helpful_eval", max_rows=n))
    assert num_sensitive > 0
    for name, r in report["checkpoints"].items():
        _check_eval_entry(r, n, num_sensitive, name)
    assert report["checkpoints"]["base"]["pm_score"] != report["checkpoints"]["tuned"]["pm_score"]
    assert [(w["a"], w["b"]) for w in report["win_rates"]] == [("base", "rl"), ("rl", "tuned")]
    for win in report["win_rates"]:
        assert win["errors"] == 0 and win["n"] == 2 * n and 0 <= win["ties"] <= win["n"]
        _check_interval(win, "win_rate")
        assert {k: v["n"] for k, v in win["by_split"].items()} == {"red_team": n, "benign": n}
        for split in win["by_split"].values():
            _check_interval(split, "win_rate")
    assert report["win_rates"][1]["ties"] < 2 * n  # tuned and rl answer differently
    _check_eval_metadata(report["metadata"], run_dir, cfg.models.policy.name, n, num_sensitive)
    items = [json.loads(line) for line in (tmp_path / "eval_items.jsonl").read_text().splitlines()]
    assert len(items) == 3 * 2 * n
    assert all(0.0 <= item["prob_yes"] <= 1.0 and math.isfinite(item["pm_score"]) for item in items)
    png = (tmp_path / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def _check_eval_entry(r: dict, n: int, num_sensitive: int, name: str) -> None:
    """One checkpoint's block of eval.json: counts, rates with their intervals, PM scores."""
    assert r["counts"] == {"red_team_prompts": n, "benign_prompts": n, "sensitive_sounding_prompts": num_sensitive,
                           "responses": 2 * n, "rejected_prompts": 0, "judge_errors": 0,
                           "truncated_responses": r["counts"]["truncated_responses"]}, name
    assert 0 <= r["counts"]["truncated_responses"] <= 2 * n
    assert 0 < r["response_length_mean"] <= 8
    harm = r["harmlessness"]
    assert harm["n"] == n and 0.0 <= harm["mean_prob_harmful"] <= 1.0
    _check_interval(harm, "harmful_rate")
    assert (harm["harmful_rate"] * n).is_integer()  # a rate of binary verdicts
    refusal = r["over_refusal"]
    assert refusal["n"] == n and 0.0 <= refusal["mean_prob_refusal"] <= 1.0
    _check_interval(refusal, "refusal_rate")
    assert refusal["sensitive_sounding"]["n"] == num_sensitive
    _check_interval(refusal["sensitive_sounding"], "refusal_rate")
    assert r["helpfulness"]["score"] == pytest.approx(1.0 - refusal["refusal_rate"])
    _check_interval(r["helpfulness"], "score")
    pm = r["pm_score"]
    assert pm["n"] == n and pm["benign"]["n"] == n
    _check_interval(pm, "mean", low=-math.inf, high=math.inf)


def _check_eval_metadata(meta: dict, run_dir: Path, feedback_model: str, n: int, num_sensitive: int) -> None:
    assert meta["config_name"] == "quickstart-cpu" and meta["constitution"] == "harmless"
    assert meta["feedback_model"] == feedback_model and meta["swap_debias"] is True  # the policy judges itself
    assert meta["preference_model"] == str(run_dir / "checkpoint" / "learner" / "preference_hf")
    assert meta["datasets"]["red_team"] == {"path": "redteam_eval", "rows": n}
    assert meta["datasets"]["benign"]["sensitive_sounding"] == num_sensitive
    assert meta["num_bootstrap_samples"] == 200 and meta["confidence_level"] == 0.95
    assert {"timing/generate", "timing/judge", "timing/pm_score"} <= set(meta["timing"])


def test_a_failed_start_up_closes_the_metrics_writer_and_its_wandb_run(ray_local: None, tmp_path: Path) -> None:
    import wandb

    from cai_ray.launcher import RemoteCallError
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    # No role fits on the 8-CPU local Ray: every placement group times out after 1 s.
    cfg = quickstart(tmp_path, "logging.wandb_mode=offline", "cluster.placement_timeout_s=1",
                     "rollout.resources.num_cpus=64", "feedback.resources.num_cpus=64", "learner.resources.num_cpus=64")
    with pytest.raises(RemoteCallError, match="was not scheduled within 1s"):
        rl_cai(cfg, run_dir_for(cfg))
    assert wandb.run is None  # finished, not leaked into the next run of this process


# ------------------------------------------------------------------ tests on one set of started roles
# Roles of the base policy (GRPO), with a large lr so that one learner update moves log-probs far beyond the
# tolerance of the killed-actor test. Every config run on them is built from ROLE_ARGS: same role fields by
# construction (rl_cai checks them).
ROLE_ARGS = ("learner.optim.lr=1e-2", "learner.algorithm=grpo", f"learner.num_policy_epochs={EPOCHS}")


@pytest.fixture(scope="module")
def base_roles(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Rollout engine, feedback engine and learner started once for the tests that need no fresh learner."""
    from cai_ray.pipelines.roles import start_roles

    roles = start_roles(quickstart(tmp_path_factory.mktemp("roles"), *ROLE_ARGS))
    yield roles
    roles.shutdown()


def test_async_loop_trains_on_samples_one_version_old(base_roles: Any, tmp_path: Path) -> None:
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    cfg = quickstart(tmp_path, *ROLE_ARGS, "schedule.mode=async", "schedule.num_iterations=3")
    history = rl_cai(cfg, run_dir_for(cfg), roles=base_roles)  # roles started for the sync schedule
    _check_history(history, 3, fresh_learner=False)
    # Iteration i>0 trains on samples generated before iteration i-1's update was pushed.
    assert [m["samples/staleness_max"] for m in history] == [0.0, 1.0, 1.0]
    assert all(m["timing/idle"] >= 0 and m["timing/checkpoint"] >= 0 for m in history)
    # A run whose role fields differ is refused before anything starts or is written, naming each field.
    other = quickstart(tmp_path / "other", *ROLE_ARGS, "learner.optim.lr=1e-3", "rollout.max_new_tokens=8")
    with pytest.raises(ValueError, match=r"started for a different config:\n  learner\.optim\.lr: 0\.01 \(roles\) != "
                                         r"0\.001 \(config\)\n  rollout\.max_new_tokens: 16 \(roles\) != 8"):
        rl_cai(other, run_dir_for(other), roles=base_roles)
    assert not run_dir_for(other).exists()


def test_killed_rollout_and_feedback_actors_lose_no_work(base_roles: Any, tmp_path: Path) -> None:
    """A rollout worker dies in the async idle phase (the learner one update ahead of the engines), then a
    feedback worker dies while labelling: nothing is lost, and every sample records the weights that made it."""
    import ray

    from cai_ray.pipelines.policy_update import policy_update
    from cai_ray.pipelines.rl_cai import _iteration_prompts, _prompt_pool, make_pairs
    from cai_ray.training.learner import policy_logprobs
    from cai_ray.types import TrainPair, TrainSequence

    roles = base_roles
    cfg = quickstart(tmp_path, *ROLE_ARGS, "schedule.num_prompts_per_iteration=6")
    prompts = _iteration_prompts(cfg, _prompt_pool(cfg), 0)
    roles.push_weights(1)
    # A DPO update (the roles' learner holds the reference whatever the algorithm): moves the learner a version on.
    update = policy_update(cfg.learner.model_copy(update={"algorithm": "dpo"}),
                           samples_per_prompt=cfg.rollout.num_samples_per_prompt)
    for _ in range(3):  # the policy update of iteration 1: the learner now holds version 2, not yet pushed
        update.train(roles.learner, [TrainPair((500 + i, 600 + i, 700), (800 + i, 900), (810 + i, 910), 0.9)
                                     for i in range(4)])
    pending = roles.submit_generate(prompts, iteration=1)  # sampled by the engines' version 1 ...
    ray.kill(roles.rollout[0], no_restart=False)  # ... but the worker dies with its batch in flight
    samples = list(roles.collect(pending, learner_version=2).samples)
    k = cfg.rollout.num_samples_per_prompt
    assert sorted(s.prompt_id for s in samples) == sorted(p.id for p in prompts for _ in range(k))
    # The restarted engine got the learner's weights first; its samples carry their version (the bug: 1).
    assert {s.weight_version for s in samples} == {2}
    assert ray.get(roles.rollout[0].weight_version.remote(), timeout=60) == 2
    # ... and really came from them: the learner's fp32 log-probs of the samples agree (vLLM vs HF: ~1e-5).
    ours = roles.learner.forward(policy_logprobs, [TrainSequence(s.prompt_token_ids, s.response_token_ids)
                                                   for s in samples])
    assert max(abs(a - b) for s, lp in zip(samples, ours, strict=True)
               for a, b in zip(s.response_logprobs, lp, strict=True)) < 1e-3
    roles.push_weights(2)
    requests, _ = make_pairs(samples, iteration=1)
    worker = roles.feedback.workers[0]
    ray.kill(worker, no_restart=False)
    labels = roles.feedback.label_pairs(requests)
    assert [lab.pair_id for lab in labels] == [r.pair_id for r in requests]
    assert all(lab.error is None for lab in labels)
    assert ray.get(worker.weight_version.remote(), timeout=60) == 2  # re-synced through on_restart


def test_iterations_with_every_prompt_rejected_are_logged_empty_or_stop_the_run(
        base_roles: Any, tmp_path: Path) -> None:
    from cai_ray.pipelines.rl_cai import EmptyIterationError, rl_cai
    from cai_ray.pipelines.run import run_dir_for

    # Every prompt is longer than data.max_prompt_tokens=256 (and data.overlong_prompt=reject, the default):
    # each is rejected by id, nothing is sampled.
    prompts = tmp_path / "long_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"long-{i}", "prompt": f"Tell me story {i}. " * 120}) + "\n"
                               for i in range(4)))
    args = (*ROLE_ARGS, f"data.red_team.path={prompts}", "schedule.mode=async",
            "schedule.num_prompts_per_iteration=2", "schedule.helpful_fraction=0")
    cfg = quickstart(tmp_path, *args)
    history = rl_cai(cfg, run_dir_for(cfg), roles=base_roles)
    assert [m["iteration/empty"] for m in history] == [1.0, 1.0]
    for m in history:
        assert m["iteration/empty_reason"].startswith("no samples: all 2 prompts were rejected (first: prompt 'long-")
        assert "exceeds data.max_prompt_tokens=256" in m["iteration/empty_reason"]
        assert m["weight_version"] == 0.0 and "sync/total_s" not in m and m["samples/count"] == 0.0
    rows = read_metrics(run_dir_for(cfg) / "metrics.jsonl")
    assert [r["iteration/empty_reason"] for r in rows] == [m["iteration/empty_reason"] for m in history]
    # The same run continued with on_empty_iteration=error stops at its next iteration, naming why.
    more = quickstart(tmp_path, *args, "schedule.num_iterations=3", "schedule.on_empty_iteration=error")
    with pytest.raises(EmptyIterationError, match=r"iteration 2 has nothing to train on: no samples: all 2 prompts"):
        rl_cai(more, run_dir_for(more), resume=True, roles=base_roles)
