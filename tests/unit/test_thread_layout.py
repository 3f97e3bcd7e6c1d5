"""Threads follow the layout (cai_ray.backend) and the preference model joins the loop only when needed."""

from __future__ import annotations

import pytest

from cai_ray.backend import layout_threads, resolve_threads, thread_mode
from cai_ray.config import ConfigError, ExperimentConfig, ResourcesConfig, load_config
from cai_ray.plan import format_plan, make_plan


def test_auto_threads_use_the_node_only_where_the_phase_runs_alone() -> None:
    cpu = ResourcesConfig(num_cpus=1)
    assert thread_mode(cpu, runs_alone=True) == "node"
    assert thread_mode(cpu, runs_alone=False) == "reserved"
    assert thread_mode(ResourcesConfig(num_cpus=1, num_gpus=1), runs_alone=True) == "reserved"  # GPU roles
    assert thread_mode(ResourcesConfig(num_threads=3), runs_alone=False) == 3  # explicit wins


@pytest.mark.parametrize(("mode", "cores", "peers", "want"), [
    ("node", 2, 1, 2), ("node", 8, 2, 4), ("node", 2, 4, 1), ("reserved", 8, 1, 1), ("auto", 8, 1, 1), (5, 2, 1, 5),
])
def test_resolve_threads(mode: int | str, cores: int, peers: int, want: int) -> None:
    res = ResourcesConfig(num_cpus=1, num_threads=mode)
    assert resolve_threads(res, node_cores=cores, peers=peers) == want


def test_resolve_threads_rounds_reserved_cpus_up() -> None:
    assert resolve_threads(ResourcesConfig(num_cpus=1.5, num_threads="reserved"), node_cores=8, peers=1) == 2
    assert resolve_threads(ResourcesConfig(num_cpus=0, num_threads="reserved"), node_cores=8, peers=1) == 1


def test_layout_threads_by_stage_and_schedule() -> None:
    sync = ExperimentConfig()
    rl = layout_threads(sync, "rl")
    assert [rl.rollout.resources.num_threads, rl.feedback.resources.num_threads,
            rl.learner.resources.num_threads] == ["node"] * 3
    assert sync.rollout.resources.num_threads == "auto"  # a copy: the run's own config is left as written
    asyn = layout_threads(load_config(None, ["schedule.mode=async", "learner.resources.num_threads=2"]), "rl")
    assert [asyn.rollout.resources.num_threads, asyn.feedback.resources.num_threads,
            asyn.learner.resources.num_threads] == ["reserved", "reserved", 2]
    sl = layout_threads(load_config(None, ["schedule.mode=async"]), "sl")  # SL's roles always take turns
    assert [sl.feedback.resources.num_threads, sl.rollout.resources.num_threads,
            sl.sl.resources.num_threads] == ["node"] * 3


def test_bad_thread_count_names_the_key() -> None:
    with pytest.raises(ConfigError, match="rollout.resources"):
        load_config(None, ["rollout.resources.num_threads=0"])
    with pytest.raises(ConfigError, match="learner.resources.num_threads"):
        load_config(None, ["learner.resources.num_threads=all"])


def test_preference_model_only_where_the_reward_comes_from_it() -> None:
    assert not load_config(None, ["learner.algorithm=dpo"]).uses_preference_model()
    assert load_config(None, ["learner.algorithm=dpo", "schedule.preference_model=monitor"]).uses_preference_model()
    for algorithm in ("ppo", "grpo", "rloo", "reinforce_pp"):
        assert load_config(None, [f"learner.algorithm={algorithm}"]).uses_preference_model()


def test_plan_shows_the_learner_models_and_threads() -> None:
    text = format_plan(make_plan(load_config(None, ["learner.algorithm=dpo"])))
    assert "learner holds: policy, reference; preference model: none" in text
    assert "rl: node" in text
    plan = make_plan(load_config(None, ["learner.algorithm=dpo", "schedule.preference_model=monitor",
                                        "schedule.mode=async"]))
    assert plan.to_json()["learner"]["models"] == ["policy", "reference", "preference model"]
    assert "monitor" in plan.to_json()["learner"]["preference_model"]
    assert plan.role("learner").threads == "rl: reserved"
    assert plan.role("feedback").threads == "sl: node / rl: reserved"
