"""The RL loop's durability as pure functions: the checkpoint swap (with crashes between its steps), the
resume checks (no checkpoint, a changed config), metrics rows after a resume, and shutting down all roles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.config import ExperimentConfig, load_config
from cai_ray.metrics import MetricsWriter, read_metrics
from cai_ray.pipelines.checkpoint import (
    COMPLETE,
    STATE_FILE,
    LoopState,
    ResumeError,
    checkpoint_dir,
    config_differences,
    has_checkpoint,
    load_for_resume,
    recover,
    write_atomically,
    write_loop_files,
)
from cai_ray.pipelines.roles import role_mismatches, shutdown_all
from cai_ray.types import TrainPair


def _writer(iteration: int, cfg: ExperimentConfig):  # noqa: ANN202 - the write callback
    def write(folder: Path) -> None:
        (folder / "learner").mkdir()
        (folder / "learner" / "weights.bin").write_text(f"weights after {iteration}")
        write_loop_files(folder, LoopState(iteration, iteration), cfg.model_dump(mode="json"))

    return write


def _iteration_on_disk(run_dir: Path) -> int:
    return json.loads((checkpoint_dir(run_dir) / STATE_FILE).read_text())["iteration"]


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint."))


def test_swap_replaces_the_old_checkpoint_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    write_atomically(checkpoint_dir(tmp_path), _writer(1, cfg))
    write_atomically(checkpoint_dir(tmp_path), _writer(2, cfg))
    assert _iteration_on_disk(tmp_path) == 2
    assert (checkpoint_dir(tmp_path) / "learner" / "weights.bin").read_text() == "weights after 2"
    assert _leftovers(tmp_path) == []


def test_a_crash_while_writing_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    write_atomically(checkpoint_dir(tmp_path), _writer(1, cfg))

    def crash(folder: Path) -> None:
        (folder / "learner").mkdir()
        raise KeyboardInterrupt  # killed half-way through the learner states

    with pytest.raises(KeyboardInterrupt):
        write_atomically(checkpoint_dir(tmp_path), crash)
    assert _iteration_on_disk(tmp_path) == 1
    assert has_checkpoint(tmp_path) and _leftovers(tmp_path) == []  # the half-written .tmp is gone
    write_atomically(checkpoint_dir(tmp_path), _writer(2, cfg))  # the next save works too
    assert _iteration_on_disk(tmp_path) == 2


@pytest.mark.parametrize("crash_after", ["written", "old_aside", "new_in"])
def test_a_crash_between_swap_steps_leaves_one_complete_checkpoint(tmp_path: Path, crash_after: str) -> None:
    """Build the disk state each crash point leaves (old at iteration 1, new at 2) and recover from it."""
    cfg = ExperimentConfig()
    final = checkpoint_dir(tmp_path)
    write_atomically(final, _writer(1, cfg))
    tmp, aside = final.with_name("checkpoint.tmp"), final.with_name("checkpoint.old")
    tmp.mkdir()
    _writer(2, cfg)(tmp)
    (tmp / COMPLETE).touch()
    if crash_after in ("old_aside", "new_in"):
        final.rename(aside)
    if crash_after == "new_in":
        tmp.rename(final)
    recover(final)
    # Not yet swapped: the old one stays (the new one is discarded); swap begun: the new one is finished in.
    assert _iteration_on_disk(tmp_path) == (1 if crash_after == "written" else 2)
    assert _leftovers(tmp_path) == []


def test_recover_brings_the_old_checkpoint_back_when_the_new_one_is_incomplete(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    final = checkpoint_dir(tmp_path)
    write_atomically(final, _writer(1, cfg))
    final.rename(final.with_name("checkpoint.old"))
    final.with_name("checkpoint.tmp").mkdir()  # no COMPLETE marker: never finished
    assert has_checkpoint(tmp_path) and _iteration_on_disk(tmp_path) == 1
    assert _leftovers(tmp_path) == []


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="no checkpoint under .*checkpoint.*run without --resume"):
        load_for_resume(tmp_path, ExperimentConfig().model_dump(mode="json"))


def test_resume_loads_the_state_and_allows_run_length_logging_cluster_and_timeouts(tmp_path: Path) -> None:
    cfg = load_config(None, ["schedule.num_iterations=2"])
    pair = TrainPair((1, 2), (3,), (4, 5), 0.75)
    state = LoopState(2, 3, [[pair]])

    def write(folder: Path) -> None:
        write_loop_files(folder, state, cfg.model_dump(mode="json"))

    write_atomically(checkpoint_dir(tmp_path), write)
    later = load_config(None, ["schedule.num_iterations=5", "schedule.checkpoint_every=2", "logging.wandb_mode=online",
                               "cluster.num_cpus=4", "sync.timeout_s=60", "cluster.placement_timeout_s=9",
                               "name=renamed"])
    loaded = load_for_resume(tmp_path, later.model_dump(mode="json"))
    assert (loaded.iteration, loaded.version, loaded.replay) == (2, 3, [[pair]])


def test_resume_with_a_changed_training_field_names_each_difference(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    write_atomically(checkpoint_dir(tmp_path), _writer(1, cfg))
    changed = load_config(None, ["learner.optim.lr=0.5", "rollout.temperature=0.5", "seed=7"])
    with pytest.raises(ResumeError) as err:
        load_for_resume(tmp_path, changed.model_dump(mode="json"))
    msg = str(err.value)
    assert "learner.optim.lr: 1e-05 (checkpoint) != 0.5 (now)" in msg
    assert "rollout.temperature: 1.0 (checkpoint) != 0.5 (now)" in msg
    assert "seed: 0 (checkpoint) != 7 (now)" in msg
    assert "config.json" in msg and "schedule.num_iterations" in msg  # where, and what may change


def test_config_differences_cover_models_constitution_data_and_sections_set_or_unset() -> None:
    base = ExperimentConfig().model_dump(mode="json")
    other = load_config(None, ["models.policy.name=other", "constitution.path=priority",
                               "data.max_prompt_tokens=128", "models.feedback.name=judge"]).model_dump(mode="json")
    keys = [line.split(":")[0] for line in config_differences(base, other)]
    assert "models.policy.name" in keys and "constitution.path" in keys and "data.max_prompt_tokens" in keys
    assert "models.feedback" in keys and "models.feedback.name" in keys  # None in the checkpoint, a model now
    assert config_differences(base, json.loads(json.dumps(base))) == []
    # A key a later version retired is no difference (an old checkpoint may still hold it).
    old = json.loads(json.dumps(base))
    old["schedule"]["max_staleness"] = 1
    assert config_differences(old, base) == []


def test_metrics_after_a_resume_have_one_row_per_step(tmp_path: Path) -> None:
    logging_cfg = ExperimentConfig().logging.model_copy(update={"wandb_mode": "disabled"})
    first = MetricsWriter(logging_cfg, tmp_path, "x", {}, first_step=0)
    for step in range(3):  # iterations 0-2 logged; the last checkpoint was after iteration 1
        first.log(step, {"iteration": float(step), "run": 1.0})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "ti')  # the crash cut the last line short
    resumed = MetricsWriter(logging_cfg, tmp_path, "x", {}, first_step=2)
    for step in (2, 3):
        resumed.log(step, {"iteration": float(step), "run": 2.0, "iteration/empty_reason": "why"})
    resumed.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["run"]) for r in rows] == [(0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0)]
    assert rows[-1]["iteration/empty_reason"] == "why"
    fresh = MetricsWriter(logging_cfg, tmp_path, "x", {}, first_step=0)  # a new run in the folder starts clean
    fresh.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


class _Role:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def shutdown(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} would not stop")


def test_shutdown_all_stops_every_role_then_raises_the_first_failure() -> None:
    log: list[str] = []
    roles = [_Role("rollout", log, fail=True), _Role("feedback", log), _Role("learner", log, fail=True)]
    with pytest.raises(RuntimeError, match="rollout would not stop"):
        shutdown_all(roles)
    assert log == ["rollout", "feedback", "learner"]
    shutdown_all([_Role("a", log)])  # nothing failed: no error


def test_roles_fit_a_run_that_agrees_on_every_role_field() -> None:
    started_for = load_config(None, ["learner.algorithm=dpo", "schedule.preference_model=monitor"])
    # Loop-only fields (schedule, prompt sets, logging, eval) are no difference; nor is the schedule's thread layout.
    same_roles = load_config(None, ["learner.algorithm=dpo", "schedule.preference_model=monitor", "schedule.mode=async",
                                    "schedule.num_iterations=9", "data.red_team.path=/elsewhere.jsonl",
                                    "logging.wandb_mode=disabled", "eval.max_new_tokens=3"])
    assert role_mismatches(started_for, same_roles) == []
    other = load_config(None, ["learner.algorithm=dpo", "learner.optim.lr=0.5", "data.max_prompt_tokens=64",
                               "rollout.resources.num_threads=2", "red_team.enabled=true"])
    lines = role_mismatches(started_for, other)
    keys = {line.split(":")[0] for line in lines}
    assert {"data.max_prompt_tokens", "learner.holds_preference_model", "learner.optim.lr", "red_team.enabled",
            "rollout.resources.num_threads"} <= keys
    assert all(k.startswith("red_team.") for k in keys - {"data.max_prompt_tokens", "learner.holds_preference_model",
                                                          "learner.optim.lr", "rollout.resources.num_threads"})
    assert "learner.optim.lr: 1e-05 (roles) != 0.5 (config)" in lines
