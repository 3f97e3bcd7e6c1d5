"""`cai-ray plan`: every shipped config's roles, bundles, devices and totals, decided without a cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.cli import main
from cai_ray.config import load_config
from cai_ray.plan import make_plan

CONFIGS = Path(__file__).parents[2] / "configs"

# Per shipped config: role -> (actors, bundle, device, dist backend), then (RL GPUs, SL peak GPUs, run peak CPUs).
EXPECTED = {
    "quickstart-cpu.yaml": ({"feedback": (1, {"CPU": 1.0}, "cpu", "gloo"), "rollout": (1, {"CPU": 1.0}, "cpu", "gloo"),
                             "sft": (1, {"CPU": 1.0}, "cpu", "gloo"), "learner": (1, {"CPU": 1.0}, "cpu", "gloo")},
                            (0, 0, 3), "gloo"),
    "smollm2-cpu.yaml": ({"feedback": (1, {"CPU": 1.0}, "cpu", "gloo"), "rollout": (1, {"CPU": 1.0}, "cpu", "gloo"),
                          "sft": (1, {"CPU": 1.0}, "cpu", "gloo"), "learner": (1, {"CPU": 1.0}, "cpu", "gloo")},
                         (0, 0, 3), "gloo"),
    "gpu-7b-1node.yaml": ({"feedback": (1, {"CPU": 8.0, "GPU": 2.0}, "cuda", "nccl"),
                           "rollout": (2, {"CPU": 8.0, "GPU": 1.0}, "cuda", "nccl"),
                           "sft": (4, {"CPU": 8.0, "GPU": 1.0}, "cuda", "nccl"),
                           "learner": (4, {"CPU": 8.0, "GPU": 1.0}, "cuda", "nccl")},
                          (8, 4, 56), "nccl"),
    "gpu-70b-4node.yaml": ({"feedback": (1, {"CPU": 16.0, "GPU": 8.0}, "cuda", "nccl"),
                            "rollout": (2, {"CPU": 16.0, "GPU": 4.0}, "cuda", "nccl"),
                            "sft": (16, {"CPU": 8.0, "GPU": 1.0}, "cuda", "nccl"),
                            "learner": (16, {"CPU": 8.0, "GPU": 1.0}, "cuda", "nccl")},
                           (32, 16, 176), "nccl"),
}


def test_every_shipped_config_has_an_expected_plan() -> None:
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_plan_of_shipped_config(name: str) -> None:
    roles, (rl_gpus, sl_gpus, peak_cpus), transport = EXPECTED[name]
    plan = make_plan(load_config(CONFIGS / name))
    for role, (actors, one_bundle, device, dist) in roles.items():
        r = plan.role(role)
        assert r.num_actors == actors and r.bundles == [one_bundle] * actors, role
        assert (r.backend.device, r.backend.dist_backend) == (device, dist), role
        assert r.backend.env["DS_ACCELERATOR"] == device, role
        if device == "cuda":
            assert r.dtype == "bfloat16" and "CUDA_VISIBLE_DEVICES" not in r.backend.env, role
    totals = plan.stage_totals()
    assert totals["rl"]["GPU"] == rl_gpus and totals["sl"]["GPU"] == sl_gpus and totals["peak"]["CPU"] == peak_cpus
    assert plan.sync_transport == transport


def test_tensor_parallel_fits_each_engine_bundle_in_shipped_configs() -> None:
    for name in EXPECTED:
        plan = make_plan(load_config(CONFIGS / name))
        for r in plan.roles:
            if r.tensor_parallel_size and r.backend.device == "cuda":
                assert r.resources.num_gpus >= r.tensor_parallel_size, (name, r.role)


def test_plan_cli_prints_cuda_and_nccl_for_gpu_roles_on_a_cpu_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", str(CONFIGS / "gpu-7b-1node.yaml")]) == 0
    out = capsys.readouterr().out
    learner = next(line for line in out.splitlines() if line.startswith("learner"))
    assert "cuda" in learner and "nccl" in learner and "4 x {CPU: 8, GPU: 1}" in learner
    assert "weight sync: nccl, 1024 MiB buckets" in out and "RL 56 CPUs / 8 GPUs" in out


def test_plan_cli_json_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", str(CONFIGS / "quickstart-cpu.yaml"), "--json",
                 "--set", "learner.num_ranks=2", "--set", "sync.transport=object_store"]) == 0
    data = json.loads(capsys.readouterr().out)
    learner = next(r for r in data["roles"] if r["role"] == "learner")
    assert learner["bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}] and learner["dist_backend"] == "gloo"
    assert data["sync"] == {"transport": "object_store", "bucket_size_mb": 256, "targets": ["rollout", "feedback"]}
    assert data["totals"]["rl"] == {"CPU": 4.0, "GPU": 0.0}
    assert data["learner"]["zero"].startswith("RL learner ZeRO-2 (2 ranks), SFT ZeRO-0 (1 rank) from ")


def test_plan_of_a_mixed_layout_names_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", str(CONFIGS / "quickstart-cpu.yaml"), "--set", "learner.resources.num_gpus=1"]) == 2
    assert "sync.transport=auto cannot choose" in capsys.readouterr().err


def test_plan_lists_the_red_teamer_when_enabled() -> None:
    base = make_plan(load_config(CONFIGS / "quickstart-cpu.yaml"))
    assert "red_team" not in {r.role for r in base.roles}
    plan = make_plan(load_config(CONFIGS / "gpu-7b-1node.yaml", ["red_team.enabled=true", "red_team.num_workers=2",
                                                                "red_team.resources.num_gpus=1"]))
    r = plan.role("red_team")
    assert r.stages == ("rl",) and r.bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert (r.backend.device, r.backend.dist_backend) == ("cuda", "nccl")
    assert plan.stage_totals()["rl"]["GPU"] == 8 + 2
