"""The GPU path on one CUDA GPU, through the product's own roles (skipped without CUDA; `make gpu-check`).

Every check goes through the code a GPU cluster runs: roles started by the launcher with GPU resources,
deciding cuda/nccl from those resources and checking what they got (``backend.enter_role``), the CUDA
vLLM build, DeepSpeed on the CUDA accelerator, the weight-sync transport the backend resolves.
Tolerances are for bfloat16, the GPU default dtype (vLLM's and HF's bf16 kernels differ by ~1e-2 per
token); each check also asserts that what it compares against would have shown a missing update.

One GPU cannot check NCCL between two processes: NCCL refuses two ranks of one group on one device, so
colocated roles (fractional ``num_gpus``) sync over the gloo transport the backend picks for them. With
two or more GPUs the sync check uses whole GPUs and NCCL.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cai_ray.config import (
    ClusterConfig,
    DataConfig,
    EngineConfig,
    LearnerConfig,
    ModelConfig,
    ModelsConfig,
    ResourcesConfig,
    RolloutConfig,
    SLConfig,
    SyncConfig,
    load_config,
)
from cai_ray.types import Prompt, TrainPair, TrainSequence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

REPO = Path(__file__).parents[2]
CLUSTER = ClusterConfig(startup_timeout_s=600, step_timeout_s=300, placement_timeout_s=120)
# Several engines share one GPU: each takes a small slice (vLLM checks free memory against this at start).
ENGINE = EngineConfig(kv_cache_memory_mb=1024, gpu_memory_utilization=0.2, max_num_seqs=16, enforce_eager=True)
PROMPT = tuple(random.Random(0).randrange(40, 2000) for _ in range(240))  # > one KV block
CONTINUATION = tuple(random.Random(1).randrange(40, 2000) for _ in range(6))
BF16_TOKEN_TOL = 0.1  # |Δ log-prob| per token between vLLM and HF, both bfloat16 on CUDA


def _gpus(whole: bool) -> ResourcesConfig:
    return ResourcesConfig(num_cpus=1, num_gpus=1 if whole else 0.4)


def _hf_token_logprobs(model_path: str, state: dict[str, torch.Tensor] | None, ids: list[int],
                       start: int) -> list[float]:
    """HF transformers (the reference) on CUDA, bf16: log-prob of ``ids[t]`` for t >= ``start``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    if state is not None:
        missing, unexpected = hf.load_state_dict(state, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    hf = hf.cuda()
    with torch.no_grad():
        logits = hf(torch.tensor([ids], device="cuda")).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids))]


@pytest.fixture(scope="module")
def smollm2(smollm2_path: str) -> ModelConfig:
    return ModelConfig(name=smollm2_path, dtype="auto", max_model_len=1024)  # 'auto' is bf16 on a GPU role


def test_vllm_cuda_generation_and_logprobs(ray_local: None, smollm2: ModelConfig) -> None:
    import ray

    from cai_ray.inference.rollout import start_rollout_workers

    rollout = RolloutConfig(num_workers=1, num_samples_per_prompt=2, max_new_tokens=16, temperature=1.0,
                            engine=ENGINE, resources=_gpus(whole=False))
    fleet = start_rollout_workers(smollm2, rollout, DataConfig(max_prompt_tokens=256), CLUSTER, seed=0)
    try:
        batch = ray.get(fleet.workers[0].generate.remote([Prompt("p0", "How do I boil an egg?")], seed=1),
                        timeout=300)
    finally:
        fleet.shutdown()
    assert len(batch.samples) == 2  # the actor started: it had the CUDA vLLM build and a GPU (enter_role)
    for s in batch.samples:
        ids = list(s.prompt_token_ids + s.response_token_ids)
        ref = _hf_token_logprobs(smollm2.name, None, ids, len(s.prompt_token_ids))
        diffs = [abs(a - b) for a, b in zip(s.response_logprobs, ref, strict=True)]
        assert max(diffs) < BF16_TOKEN_TOL * 5 and sum(diffs) / len(diffs) < BF16_TOKEN_TOL, diffs


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cuda_with_nccl(ray_local: None, tiny_model_path: str, stage: int) -> None:
    from cai_ray import launcher
    from cai_ray.training.group import LearnerGroup
    from cai_ray.training.learner import LearnerRoles

    from cai_ray.pipelines.policy_update import policy_update
    from cai_ray.training.learner import policy_logprobs

    def devices(worker: Any) -> dict[str, str]:
        """Inside a learner actor (a closure, so Ray ships it by value: the actor cannot import this test module):
        DeepSpeed's accelerator, the process group's backend, where and in which dtype the policy lives."""
        from deepspeed.accelerator import get_accelerator

        param = next(worker.policy.module.parameters())
        return {"accelerator": get_accelerator().device_name(), "process_group": torch.distributed.get_backend(),
                "param_device": param.device.type, "dtype": str(param.dtype).removeprefix("torch.")}

    learner = LearnerConfig(num_ranks=1, micro_batch_size=4, collective_timeout_s=120, deepspeed={"zero_stage": stage},
                            optim={"lr": 1e-3}, resources=_gpus(whole=True))
    group = LearnerGroup(learner, ModelsConfig(policy=ModelConfig(name=tiny_model_path)), CLUSTER, seed=0,
                         roles=LearnerRoles(reference=True))
    try:
        [where] = launcher.get_all([a.__ray_call__.remote(devices) for a in group.actors], timeout=CLUSTER.step,
                                   names=["learner rank 0: devices"])
        assert where == {"accelerator": "cuda", "process_group": "nccl", "param_device": "cuda", "dtype": "bfloat16"}
        prompt, good, bad = tuple(range(40, 60)), tuple(range(100, 110)), tuple(range(300, 310))
        pairs = [TrainPair(prompt, good, bad, 1.0) for _ in range(4)]
        seqs = [TrainSequence(prompt, good), TrainSequence(prompt, bad)]
        before = [sum(row) for row in group.forward(policy_logprobs, seqs)]
        dpo = policy_update(learner, samples_per_prompt=2)
        losses = [dpo.train(group, pairs)["loss/dpo"] for _ in range(3)]
        after = [sum(row) for row in group.forward(policy_logprobs, seqs)]
    finally:
        group.shutdown()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert after[0] - after[1] > before[0] - before[1]  # the preferred continuation gained on the other


def test_sft_job_on_cuda_resumes_from_its_checkpoint(ray_local: None, tiny_model_path: str, tmp_path: Path) -> None:
    from safetensors import safe_open

    from cai_ray.training.sft_job import run_sft

    # One Ray Train worker on a whole GPU (use_gpu, nccl), ZeRO-2, dtype 'auto': the worker decides bf16 on CUDA.
    data = [(f"Question {i}: what is {i} plus {i}?", f"The answer is {2 * i}.") for i in range(8)]
    sl = SLConfig(num_workers=1, num_epochs=1, lr=2e-3, micro_batch_size=4, max_failures=0, resources=_gpus(whole=True))
    learner = LearnerConfig(deepspeed={"zero_stage": 2}, collective_timeout_s=120)
    model = ModelConfig(name=tiny_model_path, dtype="auto", max_model_len=256)

    def sft(epochs: int) -> Any:
        return run_sft(data, model=model, sl=sl.model_copy(update={"num_epochs": epochs}), learner=learner,
                       cluster=CLUSTER, run_dir=str(tmp_path), seed=0, bucket_bytes=1 << 20)

    first, more = sft(1), sft(3)  # the second run resumes after epoch 0 from the CUDA checkpoint, weights-only
    assert first.metrics["steps"] == 2 and (more.metrics["start_epoch"], more.metrics["epoch"]) == (1, 2)
    assert more.metrics["loss/sft"] < first.metrics["loss/sft"]  # training went on from the resumed state
    dtypes = set()
    for shard in Path(more.policy_path).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    assert dtypes == {"BF16"}, dtypes  # the policy was trained on the GPU in bf16, not silently on the CPU


@pytest.fixture  # function scope: its GPU share must be free again for the RL iteration below
def learner_and_engine(ray_local: None, tiny_model_path: str) -> Iterator[tuple[Any, Any, ModelConfig, bool]]:
    from cai_ray.inference.rollout import start_rollout_workers
    from cai_ray.training.group import LearnerGroup
    from cai_ray.training.learner import LearnerRoles

    whole = torch.cuda.device_count() >= 2  # NCCL needs the two peers on different GPUs
    model = ModelConfig(name=tiny_model_path, max_model_len=512)
    learner = LearnerConfig(num_ranks=1, micro_batch_size=4, collective_timeout_s=120, optim={"lr": 5e-3},
                            deepspeed={"zero_stage": 3, "zero3_param_persistence_threshold": 0}, resources=_gpus(whole))
    group = LearnerGroup(learner, ModelsConfig(policy=model), CLUSTER, seed=0, roles=LearnerRoles(reference=True))
    fleet = start_rollout_workers(model, RolloutConfig(num_workers=1, engine=ENGINE, resources=_gpus(whole)),
                                  DataConfig(max_prompt_tokens=256), CLUSTER, seed=0)
    yield group, fleet.workers[0], model, whole
    fleet.shutdown()
    group.shutdown()


def test_weight_sync_from_a_learner_rank_into_a_gpu_engine(learner_and_engine: tuple[Any, Any, ModelConfig, bool],
                                                          tiny_model_path: str) -> None:
    import ray

    from cai_ray.backend import decide, resolve_sync_transport
    from cai_ray.sync import WeightSync

    group, engine, model, whole = learner_and_engine
    resources = _gpus(whole)
    transport = resolve_sync_transport("auto", learner=decide("learner", resources),
                                       engines=[decide("rollout", resources)])
    assert transport == ("nccl" if whole else "gloo")
    from functools import partial

    from cai_ray import launcher
    from cai_ray.config import DPOConfig
    from cai_ray.sync import object_store_receive
    from cai_ray.training.updates import dpo

    rng = random.Random(2)
    pairs = [TrainPair(PROMPT[:20], tuple(rng.randrange(40, 2000) for _ in range(8)),
                       tuple(rng.randrange(40, 2000) for _ in range(8)), 0.9) for _ in range(4)]
    for _ in range(2):
        group.update(partial(dpo, cfg=DPOConfig(), num_epochs=1), pairs)
    [(buckets, _)] = launcher.get_all([a.put_weights.remote(1 << 20) for a in group.actors], timeout=CLUSTER.step,
                                      names=["learner rank 0: put_weights"])
    state = {name: t.clone() for name, t in object_store_receive(buckets, timeout_s=120)[0]}
    expected = sum(_hf_token_logprobs(tiny_model_path, state, list(PROMPT + CONTINUATION), len(PROMPT)))

    def score(actor: Any) -> float:
        fn = lambda self, p, c: self._engine.score([p], [[c]])[0][0]  # noqa: E731 - runs inside the actor
        return ray.get(actor.__ray_call__.remote(fn, PROMPT, CONTINUATION), timeout=120)

    stale = score(engine)
    tol = BF16_TOKEN_TOL * len(CONTINUATION)
    assert abs(stale - expected) > 2 * tol, "the check cannot see a missing sync"
    metrics = WeightSync(SyncConfig(bucket_size_mb=1, timeout_s=120), group, [("rollout worker 0", engine)],
                         transport=transport, grace=CLUSTER.control).push(1)
    assert metrics["sync/num_buckets"] > 1 and ray.get(engine.weight_version.remote(), timeout=60) == 1
    assert abs(score(engine) - expected) < tol


def test_one_rl_cai_iteration_on_smollm2(ray_local: None, smollm2_path: str, tmp_path: Path) -> None:
    from cai_ray.metrics import read_metrics
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    # Every role on the one GPU (fractions), bf16; the learner and the engines sync over what auto picks.
    cfg = load_config(REPO / "configs" / "smollm2-cpu.yaml", [
        f"models.policy.name={smollm2_path}", "models.policy.dtype=auto", "schedule.num_iterations=1",
        "rollout.resources.num_gpus=0.2", "feedback.resources.num_gpus=0.2", "learner.resources.num_gpus=0.4",
        "rollout.engine.gpu_memory_utilization=0.2", "feedback.engine.gpu_memory_utilization=0.2",
        "rollout.engine.kv_cache_memory_mb=1024", "feedback.engine.kv_cache_memory_mb=1024",
        f"logging.output_dir={tmp_path}", "logging.wandb_mode=disabled", "cluster.step_timeout_s=300"])
    assert cfg.resolved_sync_transport() == "gloo"
    history = rl_cai(cfg, run_dir_for(cfg))
    [row] = read_metrics(run_dir_for(cfg) / "metrics.jsonl")
    assert len(history) == 1 and row["weight_version"] == 1 and row["labels/count"] > 0
    assert math.isfinite(row["reward/mean"])
