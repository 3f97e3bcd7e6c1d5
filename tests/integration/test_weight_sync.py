"""Weight sync on the real CPU stack: a 2-rank ZeRO-3 learner -> 2 rollout engines + 1 feedback engine.

The check that matters: after learner steps and a sync, each engine's log-probs on a prompt longer than
one KV block (so a stale prefix cache would show) match an HF model built from the learner's exported
weights; without the sync the same check fails. The first test checks a rollout actor's own verbs on the
engines' initial weights (it shares this module's actors rather than start one more engine).
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

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
    RolloutConfig,
    SyncConfig,
)
from cai_ray.sync import SyncError, WeightSync
from cai_ray.types import TrainPair

pytestmark = pytest.mark.slow

CLUSTER = ClusterConfig(startup_timeout_s=180, step_timeout_s=180, placement_timeout_s=60)
ENGINE = EngineConfig(kv_cache_memory_mb=32, max_num_seqs=8)
PROMPT = tuple(random.Random(0).randrange(40, 2000) for _ in range(240))  # > one KV block
CONTINUATION = tuple(random.Random(1).randrange(40, 2000) for _ in range(6))


@pytest.fixture(scope="module")
def setup(ray_local: None, tiny_model_path: str):
    from concurrent.futures import ThreadPoolExecutor

    from cai_ray.inference.feedback import start_feedback_pool
    from cai_ray.inference.rollout import start_rollout_workers
    from cai_ray.pipelines.roles import shutdown_all
    from cai_ray.training.group import LearnerGroup
    from cai_ray.training.learner import LearnerRoles

    model = ModelConfig(name=tiny_model_path, dtype="float32", max_model_len=512)
    learner_cfg = LearnerConfig(num_ranks=2, micro_batch_size=4, collective_timeout_s=60, optim={"lr": 5e-3},
                                deepspeed={"zero_stage": 3, "zero3_param_persistence_threshold": 0})
    # The three start-ups mostly wait on their actors (imports, engine and DeepSpeed init): overlap them.
    with ThreadPoolExecutor(max_workers=3) as threads:
        futures = [
            threads.submit(LearnerGroup, learner_cfg, ModelsConfig(policy=model), CLUSTER, seed=0,
                           roles=LearnerRoles(reference=True)),  # the reference: DPO steps change the policy
            threads.submit(start_rollout_workers, model, RolloutConfig(num_workers=2, engine=ENGINE, max_restarts=2,
                                                                       resources=ResourcesConfig(num_cpus=1)),
                           DataConfig(max_prompt_tokens=256), CLUSTER, seed=0),
            threads.submit(start_feedback_pool, model, FeedbackConfig(num_workers=1, engine=ENGINE),
                           ConstitutionConfig(), DataConfig(max_prompt_tokens=256), CLUSTER),
        ]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < len(futures):
        shutdown_all(started)
        raise next(f.exception() for f in futures if f.exception() is not None)
    group, rollout, pool = started
    targets = [(f"rollout worker {i}", w) for i, w in enumerate(rollout.workers)]
    targets.append(("feedback worker 0", pool.workers[0]))
    yield group, targets, model
    shutdown_all([pool, rollout, group])


def _engine_logprob(actor) -> float:
    import ray

    fn = lambda self, p, c: self._engine.score([p], [[c]])[0][0]  # noqa: E731 - runs inside the actor
    return ray.get(actor.__ray_call__.remote(fn, PROMPT, CONTINUATION), timeout=120)


def _hf_logprob(group, model_path: str) -> float:
    from transformers import AutoModelForCausalLM

    from cai_ray.launcher import get_all
    from cai_ray.sync import object_store_receive

    # The learner's policy as the object-store transport ships it: every rank gathers, rank 0 puts.
    sent = get_all([rank.put_weights.remote(1 << 20) for rank in group.actors], timeout=CLUSTER.step,
                   names=group.names)
    named, _ = object_store_receive(sent[0][0], timeout_s=60)
    state = {name: t.clone() for name, t in named}
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.tensor([PROMPT + CONTINUATION])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[0, :-1].float(), dim=-1)
    positions = range(len(PROMPT) - 1, len(PROMPT) + len(CONTINUATION) - 1)
    return float(sum(logprobs[t, ids[0, t + 1]] for t in positions))


def _train(group, steps: int = 2) -> None:
    """``steps`` optimizer steps of the product's DPO update (any update that moves the policy would do)."""
    from functools import partial

    from cai_ray.config import DPOConfig
    from cai_ray.training.updates import dpo

    rng = random.Random(len(PROMPT))
    pairs = [TrainPair(PROMPT[:20], tuple(rng.randrange(40, 2000) for _ in range(8)),
                       tuple(rng.randrange(40, 2000) for _ in range(8)), 0.9) for _ in range(4)]
    for _ in range(steps):
        group.update(partial(dpo, cfg=DPOConfig(), num_epochs=1), pairs)


def test_rollout_actor_tags_weight_version(setup) -> None:
    """A RolloutWorker actor in its placement group: samples tagged with its version, weights loaded through Ray.

    First in this module: it needs the engines' initial weights, and gives rollout worker 0 back the same ones.
    """
    import ray
    from safetensors.torch import load_file

    from cai_ray.types import Prompt

    _, targets, model = setup
    worker = targets[0][1]
    prompts = [Prompt("p0", "How do I cook rice?"), Prompt("p1", "How do I pick a lock?"), Prompt("p2", "Hi!")]
    first = ray.get(worker.generate.remote(prompts, seed=1), timeout=120)
    assert len(first.samples) == 6 and {s.weight_version for s in first.samples} == {0}
    weights = load_file(f"{model.name}/model.safetensors")
    ray.get(worker.load_weights.remote(list(weights.items()), 4), timeout=120)
    assert ray.get(worker.weight_version.remote(), timeout=60) == 4
    after = ray.get(worker.generate.remote(prompts, seed=1), timeout=120)
    assert {s.weight_version for s in after.samples} == {4}
    assert [s.response_token_ids for s in after.samples] == [s.response_token_ids for s in first.samples]


def test_gloo_sync_makes_every_engine_match_the_learner_three_times(setup) -> None:
    group, targets, model = setup
    sync = WeightSync(SyncConfig(transport="gloo", bucket_size_mb=1, timeout_s=60), group, targets, transport="gloo",
                      grace=CLUSTER.control)
    for version in (1, 2, 3):
        _train(group)
        expected = _hf_logprob(group, model.name)
        stale = [_engine_logprob(actor) for _, actor in targets]
        assert all(abs(s - expected) > 1e-3 for s in stale), "the check cannot see a missing sync"
        metrics = sync.push(version)
        assert metrics["sync/num_engines"] == 3.0 and metrics["sync/num_buckets"] > 1
        for name, actor in targets:
            assert abs(_engine_logprob(actor) - expected) < 1e-4, name
            assert actor.weight_version.remote is not None
        import ray

        assert ray.get([a.weight_version.remote() for _, a in targets]) == [version] * 3


def test_object_store_sync_matches_too(setup) -> None:
    group, targets, model = setup
    _train(group, steps=1)
    expected = _hf_logprob(group, model.name)
    WeightSync(SyncConfig(transport="object_store", timeout_s=60), group, targets, transport="object_store",
               grace=CLUSTER.control).push(10)
    for name, actor in targets:
        assert abs(_engine_logprob(actor) - expected) < 1e-4, name


def test_killed_receiver_is_a_clear_error_and_the_next_sync_succeeds(setup) -> None:
    import ray

    from cai_ray.launcher import wait_restarted

    group, targets, model = setup
    timeout_s = 20.0
    sync = WeightSync(SyncConfig(transport="gloo", bucket_size_mb=1, timeout_s=timeout_s), group, targets,
                      transport="gloo", grace=CLUSTER.control)
    sync.bucket_bytes = 64 << 10  # many small buckets: the kill lands mid-transfer
    _train(group, steps=1)
    victim_name, victim = targets[1]
    outcome: dict[str, object] = {}

    def push() -> None:
        start = time.monotonic()
        try:
            sync.push(20)
        except SyncError as err:
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - start

    # Keep the victim busy so the sync starts, the others join, and the victim dies before it can. A call that
    # waits for the kill, not a generation: on a fast machine 16 generations on the tiny model ended within 0.3 s.
    def wait_for_the_kill(worker: object) -> None:  # a closure: Ray ships it by value to the actor
        time.sleep(300)

    busy = victim.__ray_call__.remote(wait_for_the_kill)
    thread = threading.Thread(target=push)
    thread.start()
    time.sleep(0.3)
    ray.kill(victim, no_restart=False)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(busy, timeout=60)
    thread.join(timeout=timeout_s + 90)
    assert not thread.is_alive(), "the sync hung"
    assert isinstance(outcome.get("error"), SyncError), outcome
    assert victim_name in str(outcome["error"])
    assert outcome["seconds"] < timeout_s + 60
    # The survivors never loaded anything: they still serve their previous, complete version.
    survivors = [a for n, a in targets if n != victim_name]
    assert ray.get([a.weight_version.remote() for a in survivors], timeout=60) == [10, 10]
    wait_restarted(victim, timeout=CLUSTER.startup, what=victim_name)
    expected = _hf_logprob(group, model.name)
    sync.push(21)
    for name, actor in targets:
        assert abs(_engine_logprob(actor) - expected) < 1e-4, name
