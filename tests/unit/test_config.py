"""Config loading: unknown keys, wrong types and impossible combinations name the file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai_ray.config import ConfigError, ExperimentConfig, dump_config, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_validate() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.learner.deepspeed.zero_stage == "auto"


@pytest.mark.parametrize(("stage", "ranks", "offload", "expected"), [
    ("auto", 1, False, 0), ("auto", 2, False, 2), ("auto", 1, True, 2), (3, 1, False, 3), (1, 4, False, 1)])
def test_zero_stage_auto_is_stage_0_only_on_one_rank_without_offload(stage, ranks, offload, expected) -> None:
    from cai_ray.config import DeepSpeedConfig

    assert DeepSpeedConfig(zero_stage=stage, offload_optimizer=offload).resolved_stage(ranks) == expected


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"quickstart-cpu.yaml", "smollm2-cpu.yaml"} <= names


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, "learner:\n  deepspeed:\n    zero_stag: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "learner.deepspeed.zero_stag" in msg
    assert "did you mean 'zero_stage'" in msg


def test_unknown_top_level_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"learnr: unknown key \(did you mean 'learner'\?\)"):
        load_config(write(tmp_path, "learnr: {}\n"))


def test_wrong_type_names_path_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "rollout:\n  num_samples_per_prompt: many\n"))
    assert "rollout.num_samples_per_prompt" in str(err.value)
    assert "'many'" in str(err.value)


def test_nested_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rollout\.engine\.kv_cache_mb: unknown key"):
        load_config(write(tmp_path, "rollout:\n  engine:\n    kv_cache_mb: 4\n"))


def test_overrides_apply_and_parse_yaml_values() -> None:
    cfg = load_config(None, ["learner.deepspeed.zero_stage=3", "feedback.cot_clamp=[0.3, 0.7]", "models.policy.name=x"])
    assert cfg.learner.deepspeed.zero_stage == 3
    assert cfg.feedback.cot_clamp == (0.3, 0.7)
    assert cfg.models.policy.name == "x"


def test_override_errors_name_the_override() -> None:
    with pytest.raises(ConfigError, match=r"--set learner.deepspeed.zero_stage=7.*learner\.deepspeed\.zero_stage"):
        load_config(None, ["learner.deepspeed.zero_stage=7"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("learner.deepspeed.zero_stage")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["seed=1", "seed.x=1"])


def test_cross_field_errors_name_the_keys() -> None:
    with pytest.raises(ConfigError, match="data.max_prompt_tokens .* exceeds models.policy.max_model_len"):
        load_config(None, ["models.policy.max_model_len=100", "data.max_prompt_tokens=90"])
    with pytest.raises(ConfigError, match="cot_clamp"):
        load_config(None, ["feedback.cot_clamp=[0.6, 0.4]"])
    with pytest.raises(ConfigError, match="sync.transport 'nccl' needs GPUs"):
        load_config(None, ["sync.transport=nccl"])


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "learner: [\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["learner.deepspeed.zero_stage=3"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_every_field_has_a_description() -> None:
    missing = []

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = next((a for a in (ann, *getattr(ann, "__args__", ())) if hasattr(a, "model_fields")), None)
            if not field.description:  # a sub-section too: `config show` and the README list it
                missing.append(prefix + name)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")

    walk(ExperimentConfig, "")
    assert not missing, f"fields without a description: {missing}"


def test_override_inside_a_defaulted_section_keeps_its_other_fields(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "name: x\n"), ["data.red_team_eval.max_rows=6"])
    assert cfg.data.red_team_eval.path == "redteam_eval" and cfg.data.red_team_eval.max_rows == 6
    assert load_config(None, ["data.helpful.max_rows=3"]).data.helpful.path == "helpful_train"
    with pytest.raises(ConfigError, match=r"rollout\.temperature"):
        load_config(None, ["rollout.temperature=0"])


def test_a_retired_key_says_why_it_went(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "schedule:\n  max_staleness: 1\n"))
    msg = str(err.value)
    assert str(tmp_path / "exp.yaml") in msg and "schedule.max_staleness: removed" in msg
    assert "one version old" in msg and "delete the key" in msg
    with pytest.raises(ConfigError, match=r"schedule\.max_staleness: removed"):
        load_config(None, ["schedule.max_staleness=2"])
def test_the_old_timeout_key_names_its_replacements(tmp_path: Path) -> None:
    path = write(tmp_path, "cluster:\n  remote_call_timeout_s: 600\n")
    for args in ((path,), (None, ["cluster.remote_call_timeout_s=600"])):
        with pytest.raises(ConfigError) as err:
            load_config(*args)
        text = str(err.value)
        assert "cluster.remote_call_timeout_s: split into" in text
        assert all(key in text for key in ("cluster.startup_timeout_s", "cluster.step_timeout_s",
                                           "cluster.control_timeout_s"))
    assert str(path) in str(pytest.raises(ConfigError, load_config, path).value)


def test_deadlines_carry_their_key() -> None:
    cfg = load_config(None, ["cluster.step_timeout_s=90", "cluster.startup_timeout_s=1200", "sync.timeout_s=30"])
    assert (cfg.cluster.step.seconds, cfg.cluster.step.key) == (90, "cluster.step_timeout_s")
    assert str(cfg.cluster.startup) == "1200s (cluster.startup_timeout_s)"
    assert str(cfg.cluster.control) == "60s (cluster.control_timeout_s)"
    assert str(cfg.cluster.placement) == "600s (cluster.placement_timeout_s)"
    assert str(cfg.sync.deadline) == "30s (sync.timeout_s)"
    with pytest.raises(ConfigError, match=r"cluster\.control_timeout_s: Input should be greater than 0"):
        load_config(None, ["cluster.control_timeout_s=0"])


OLD_FLAT_LEARNER_KEYS = {  # the flat LearnerConfig before it was split, key -> where it lives now
    "zero_stage": "deepspeed.zero_stage", "offload_optimizer": "deepspeed.offload_optimizer",
    "gradient_checkpointing": "deepspeed.gradient_checkpointing",
    "zero3_param_persistence_threshold": "deepspeed.zero3_param_persistence_threshold",
    "lr": "optim.lr", "pm_lr": "optim.pm_lr", "critic_lr": "optim.critic_lr", "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip", "kl_coef": "ppo.kl_coef", "kl_estimator": "ppo.kl_estimator",
    "clip_eps": "ppo.clip_eps", "clip_eps_high": "ppo.clip_eps_high", "value_clip_eps": "ppo.value_clip_eps",
    "gamma": "ppo.gamma", "gae_lambda": "ppo.gae_lambda", "dpo_beta": "dpo.beta",
    "dpo_label_smoothing": "dpo.label_smoothing", "grpo_scale_rewards": "grpo.scale_rewards",
}


@pytest.mark.parametrize("old", sorted(OLD_FLAT_LEARNER_KEYS))
def test_an_old_flat_learner_key_names_its_new_place(tmp_path: Path, old: str) -> None:
    new = OLD_FLAT_LEARNER_KEYS[old]
    value = {"kl_estimator": "k2", "zero_stage": 3, "dpo_label_smoothing": 0.25}.get(old, 1)
    path = write(tmp_path, f"learner:\n  {old}: {value}\n")
    for args in ((path,), (None, [f"learner.{old}={value}"])):
        with pytest.raises(ConfigError) as err:
            load_config(*args)
        assert f"learner.{old} moved to learner.{new}" in str(err.value)
    section, key = new.split(".")
    assert getattr(getattr(load_config(None, [f"learner.{new}={value}"]).learner, section), key) == value


def test_the_old_key_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "learner:\n  lr: 0.1\n  dpo_beta: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "learner.lr moved to learner.optim.lr" in msg
    assert "learner.dpo_beta moved to learner.dpo.beta" in msg
