"""The thread layout and the ZeRO stage change speed, not results: labels and DPO losses before and after.

Two feedback pools and two one-rank learners on tiny-random-llama (float32), started together: one of each as
every actor ran before (``resources.num_threads=1``, the learner at ZeRO-2), one as a sync phase runs now
(``node``: every core of this machine; the learner at ``zero_stage: auto``, stage 0 on one rank, which skips
DeepSpeed's gradient all-reduce). The same
comparison requests must get the same labels, and the same DPO batch the same losses over two steps, within
float32 tolerances.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cai_ray.config import (
    ClusterConfig,
    ConstitutionConfig,
    DataConfig,
    EngineConfig,
    FeedbackConfig,
    LearnerConfig,
    ModelConfig,
    ModelsConfig,
    ResourcesConfig,
)
from cai_ray.types import ComparisonRequest, TrainPair

pytestmark = pytest.mark.slow

CLUSTER = ClusterConfig(startup_timeout_s=240, step_timeout_s=180, placement_timeout_s=120)
LAYOUTS = {"one thread": 1, "node": "node"}  # name -> resources.num_threads
ZERO = {"one thread": 2, "node": "auto"}  # name -> learner.deepspeed.zero_stage (auto: 0 on one rank)
LOSS_TOLERANCE = 1e-5  # float32 reductions in another order: a few ulps of a loss near log 2


def _requests() -> list[ComparisonRequest]:
    return [ComparisonRequest(f"c{i}", f"Question {i}: how do I open a locked door?", f"Answer {i}: call a locksmith.",
                              f"Answer {i}: kick it in {i} times.") for i in range(6)]


def _pairs() -> list[TrainPair]:
    rng = random.Random(3)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(100, 1500) for _ in range(n))

    return [TrainPair(tokens(rng.randint(3, 8)), tokens(rng.randint(2, 9)), tokens(rng.randint(2, 9)),
                      prob_a=rng.random()) for _ in range(6)]


def _threads(actor: Any) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()), timeout=60)


def _zero_stage(actor: Any) -> tuple[int, bool]:
    """The policy engine's ZeRO stage and whether its backward all-reduces the gradients."""
    import ray

    return ray.get(actor.__ray_call__.remote(
        lambda self: (int(self.policy.zero_optimization_stage()), bool(self.policy.enable_backward_allreduce))),
        timeout=60)


def _start(model: ModelConfig, threads: int | str, zero_stage: int | str) -> tuple[Any, Any]:
    from cai_ray.inference.feedback import start_feedback_pool
    from cai_ray.training.group import LearnerGroup
    from cai_ray.training.learner import LearnerRoles

    resources = ResourcesConfig(num_cpus=1, num_threads=threads)
    feedback = FeedbackConfig(num_workers=1, batch_size=8, engine=EngineConfig(kv_cache_memory_mb=32, max_num_seqs=32),
                              judge_check=False, resources=resources)
    learner = LearnerConfig(num_ranks=1, micro_batch_size=2, collective_timeout_s=120,
                            deepspeed={"zero_stage": zero_stage},
                            optim={"lr": 1e-3}, resources=resources)
    pool = start_feedback_pool(model, feedback, ConstitutionConfig(path="harmless"), DataConfig(max_prompt_tokens=200),
                               CLUSTER, seed=5)
    try:
        return pool, LearnerGroup(learner, ModelsConfig(policy=model), CLUSTER, seed=0,
                                  roles=LearnerRoles(reference=True))
    except BaseException:
        pool.shutdown()
        raise


def test_labels_and_dpo_losses_do_not_depend_on_threads_or_zero_stage(ray_local: None, tiny_model_path: str) -> None:
    from cai_ray.pipelines.policy_update import policy_update

    model = ModelConfig(name=tiny_model_path, dtype="float32", max_model_len=512)
    with ThreadPoolExecutor(max_workers=2) as threads:  # start-ups mostly wait: overlap them
        started = dict(zip(LAYOUTS, threads.map(lambda n: _start(model, LAYOUTS[n], ZERO[n]), LAYOUTS)))
    try:
        cores = len(os.sched_getaffinity(0))
        got = {name: (_threads(pool.workers[0]), _threads(group.actors[0]), *_zero_stage(group.actors[0]))
               for name, (pool, group) in started.items()}
        # Stage 0 on one rank skips DeepSpeed's gradient all-reduce (nothing to reduce): the losses must not move.
        assert got == {"one thread": (1, 1, 2, True), "node": (cores, cores, 0, False)}
        labels = {name: pool.label_pairs(_requests()) for name, (pool, _) in started.items()}
        dpo = policy_update(LearnerConfig(algorithm="dpo"), samples_per_prompt=2)
        losses = {name: [dpo.train(group, _pairs())["loss/dpo"] for _ in range(2)]
                  for name, (_, group) in started.items()}
    finally:
        for pool, group in started.values():
            pool.shutdown()
            group.shutdown()
    from cai_ray.inference.labels import CROSS_CALL_TOLERANCE

    one, node = labels["one thread"], labels["node"]
    assert all(label.error is None for label in one + node)
    assert [x.principle_ids for x in one] == [x.principle_ids for x in node]
    for a, b in zip(one, node, strict=True):
        assert b.prob_a == pytest.approx(a.prob_a, abs=CROSS_CALL_TOLERANCE)
    assert losses["one thread"][1] != pytest.approx(losses["one thread"][0], abs=1e-4)  # the step changed the policy
    assert losses["node"] == pytest.approx(losses["one thread"], abs=LOSS_TOLERANCE)
