"""SL-CAI's supervised stage as one Ray Train ``TorchTrainer`` run (run to completion, not step by step).

Each worker builds the policy with the learner's ``wrap`` (same ZeRO stage, offload and clipping as the
RL learner) and minimises ``sft_loss`` on the responses. A global batch is ``micro_batch_size`` rows per
worker; every worker sees the same shuffled order (seed + epoch) and takes its equal-length shard, so
ZeRO-3's collective forwards stay in step. After each epoch the DeepSpeed state is reported as a Ray
Train checkpoint (merged across workers in ``storage_path``); a retried run (``FailureConfig``) resumes
from the last one (so does a new run in the same ``run_dir``), loading it weights-only. The last checkpoint also
holds the HF-format policy, copied to ``<run_dir>/policy``.
Simplifications: no learning-rate schedule; one checkpoint per epoch.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import ClusterConfig, LearnerConfig, ModelConfig, SLConfig
from cai_ray.models import ModelRef
from cai_ray.types import TrainSequence

HF_DIR = "hf"
PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class SFTResult:
    """Where the SFT job left its outputs."""

    policy_path: str  # HF-format policy folder (weights + tokenizer)
    checkpoint_path: str  # last Ray Train checkpoint (DeepSpeed state + HF folder)
    metrics: dict[str, float]  # rank 0's last reported metrics


def encode_text_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_len: int) -> list[TrainSequence]:
    """(prompt, response) texts -> TrainSequences: chat-templated prompt, response + eos as the target.

    Rows longer than ``max_len`` keep the whole prompt and lose the response's tail.
    """
    out = []
    for prompt, response in pairs:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
        if hasattr(prompt_ids, "tolist"):
            prompt_ids = prompt_ids.tolist()
        response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        response_ids = response_ids[: max(0, max_len - len(prompt_ids))]
        if not response_ids:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room for a response within {max_len}")
        out.append(TrainSequence(prompt_token_ids=tuple(prompt_ids), response_token_ids=tuple(response_ids)))
    return out


def run_sft(data: Sequence[tuple[str, str]] | Sequence[TrainSequence], *, model: ModelConfig, sl: SLConfig,
            learner: LearnerConfig, cluster: ClusterConfig, run_dir: str, seed: int, bucket_bytes: int) -> SFTResult:
    """Fine-tune ``model`` on ``data`` with ``sl.num_workers`` Ray Train workers; returns the HF policy folder.

    ``learner`` supplies the engine settings (``deepspeed``, ``optim``'s weight decay and grad clip); ``sl`` the
    job's own (epochs, lr, micro-batch, workers, retries, and each worker's ``resources``, from which the Ray Train
    backend (gloo | nccl) and the workers' env follow); ``cluster`` the placement strategy; ``bucket_bytes``
    (``sync.bucket_size_mb``) bounds the ZeRO-3 gathers that write the HF folder. Needs a running Ray.
    """
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cai_ray.backend import decide
    from cai_ray.launcher import bundle

    ref = ModelRef.of(model)
    if data and not isinstance(data[0], TrainSequence):
        data = encode_text_pairs(ref.tokenizer(), data, max_len=model.max_model_len)  # type: ignore[arg-type]
    if not data:
        raise ValueError("run_sft: no training data")
    backend = decide("sft", sl.resources)
    root = Path(run_dir).resolve()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"data": list(data), "model_ref": ref, "model": model, "sl": sl, "learner": learner,
                           "seed": seed, "bucket_bytes": bucket_bytes},
        torch_config=TorchConfig(backend=backend.dist_backend, timeout_s=int(learner.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=sl.num_workers, use_gpu=backend.device == "cuda",
                                     resources_per_worker=bundle(sl.resources),
                                     placement_strategy=cluster.placement_strategy),
        run_config=RunConfig(
            name="sft",
            storage_path=str(root / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=sl.max_failures),
            worker_runtime_env={"env_vars": backend.env},
        ),
    )
    result = trainer.fit()
    checkpoint: Checkpoint | None = result.checkpoint
    if checkpoint is None:
        raise RuntimeError("SFT job finished without a checkpoint")
    policy = root / "policy"
    with checkpoint.as_directory() as folder:
        if policy.exists():
            shutil.rmtree(policy)
        shutil.copytree(Path(folder) / HF_DIR, policy)
    return SFTResult(policy_path=str(policy), checkpoint_path=checkpoint.path,
                     metrics={k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)})


def _engine(module: Any, sl: SLConfig, learner: LearnerConfig, *, world_size: int) -> Any:
    """The policy as a DeepSpeed engine: the learner's ``deepspeed`` and ``optim`` settings, the job's lr and batch."""
    from cai_ray.training import engine as ds

    config = ds.ds_config(learner.deepspeed, micro_batch_size=sl.micro_batch_size, grad_clip=learner.optim.grad_clip,
                          world_size=world_size, dtype=next(module.parameters()).dtype)
    return ds.wrap(module, config=config, lr=sl.lr, weight_decay=learner.optim.weight_decay,
                   gradient_checkpointing=learner.deepspeed.gradient_checkpointing)


def _resume(engine: Any) -> int:
    """The epoch to start from: 0, or the one after Ray Train's last checkpoint, whose states are loaded."""
    import ray.train

    from cai_ray.training import engine as ds

    resume = ray.train.get_checkpoint()
    if resume is None:
        return 0
    with resume.as_directory() as folder:
        ds.load_checkpoint(engine, folder, tag="state")  # weights-only: nothing is unpickled
        return json.loads((Path(folder) / PROGRESS_FILE).read_text())["epoch"] + 1


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (Ray Train has already formed the torch.distributed group)."""
    import datetime

    import ray.train
    import ray.train.torch
    import torch

    from cai_ray.algorithms.sft import sft_loss
    from cai_ray.backend import enter_role
    from cai_ray.training import engine as ds
    from cai_ray.training.modeling import collate_sequences, pad_id, shard

    sl: SLConfig = config["sl"]
    learner: LearnerConfig = config["learner"]
    model_cfg: ModelConfig = config["model"]
    data: list[TrainSequence] = config["data"]
    seed: int = config["seed"]
    backend = enter_role("sft", sl.resources, uses_vllm=False)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend.dist_backend,
                               timeout=datetime.timedelta(seconds=learner.collective_timeout_s))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(seed)
    ref: ModelRef = config["model_ref"]
    engine = _engine(ref.causal_lm(dtype=backend.torch_dtype(model_cfg.dtype)), sl, learner, world_size=world)
    pad = pad_id(engine.module.config)
    # Ray Train shows a node's workers all of their GPUs and has set each one's own as the current device.
    device = ray.train.torch.get_device() if backend.device == "cuda" else torch.device("cpu")

    start_epoch = _resume(engine)
    torch.manual_seed(seed + 1000 * (rank + 1))

    per_step = sl.micro_batch_size * world
    for epoch in range(start_epoch, sl.num_epochs):
        order = random.Random(seed + epoch).sample(range(len(data)), len(data))  # same order on every rank
        losses = []
        for start in range(0, len(order), per_step):
            mine, num_valid = shard([data[i] for i in order[start : start + per_step]], world)[rank]
            batch = collate_sequences(mine, pad_id=pad, num_valid=num_valid).to(device)
            logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            loss, metrics = sft_loss(logits=logits[:, :-1], labels=batch.labels, loss_mask=batch.loss_mask)
            engine.backward(loss if num_valid else loss * 0.0)
            engine.step()
            if num_valid:
                losses.append(metrics["loss/sft"])
        last = epoch == sl.num_epochs - 1
        with tempfile.TemporaryDirectory() as folder:
            engine.save_checkpoint(folder, tag="state")
            if last:
                ds.save_hf(engine.module, str(Path(folder) / HF_DIR), rank=rank, bucket_bytes=config["bucket_bytes"],
                           tokenizer_from=ref)
            if rank == 0:
                (Path(folder) / PROGRESS_FILE).write_text(json.dumps({"epoch": epoch}))
            metrics = {"epoch": epoch, "loss/sft": sum(losses) / max(1, len(losses)), "steps": len(losses),
                       "start_epoch": start_epoch}  # > 0: this run resumed from a checkpoint
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
