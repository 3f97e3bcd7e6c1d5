"""SL-CAI's supervised stage as one Ray Train ``TorchTrainer`` run (run to completion, not step by step).

Each worker builds the policy with the learner's ``wrap`` (same ZeRO stage, offload and clipping as the
RL learner) and minimises ``sft_loss`` on the responses. The rows (``prompt``, ``response`` text) come as a
Ray Dataset (``TorchTrainer(datasets={"train": ...})``; SL-CAI passes its Parquet shards), which Ray Train
splits into equal-length streams, one per worker (``ray.train.get_dataset_shard``); each worker tokenizes its
``micro_batch_size``-row batches, shuffled locally with seed + epoch. Equal lengths give every worker the same
number of steps, so ZeRO-3's collective forwards stay in step. After each epoch the DeepSpeed state is reported as a Ray
Train checkpoint: every worker writes its state files straight into one folder under ``storage_path`` (shared
storage on a cluster), registered without an upload; a retried run (``FailureConfig``) resumes
from the last one (so does a new run in the same ``run_dir``), loading it weights-only. The last checkpoint also
holds the HF-format policy, hard-linked (or copied) to ``<run_dir>/policy``.
Simplifications: no learning-rate schedule; one checkpoint per epoch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_ray.config import ClusterConfig, LearnerConfig, ModelConfig, SLConfig
from cai_ray.models import ModelRef
from cai_ray.types import TrainSequence

if TYPE_CHECKING:
    import ray.data

HF_DIR = "hf"
TRAIN_DIR, JOB_NAME = "ray_train", "sft"  # Ray Train keeps the checkpoints in <run_dir>/ray_train/sft
PROGRESS_FILE = "progress.json"
SHUFFLE_BUFFER_ROWS = 1024  # per worker: the local shuffle of each epoch's stream


@dataclass(frozen=True)
class SFTResult:
    """Where the SFT job left its outputs."""

    policy_path: str  # HF-format policy folder (weights + tokenizer)
    checkpoint_path: str  # last Ray Train checkpoint (DeepSpeed state + HF folder)
    metrics: dict[str, float]  # rank 0's last reported metrics, with its phase seconds (timing/setup, train, ...)


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src``: hard links where both are on one filesystem (the files are never rewritten in
    place, and a link outlives Ray Train deleting the checkpoint), else a byte copy."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


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


def run_sft(data: ray.data.Dataset | Sequence[tuple[str, str]], *, model: ModelConfig, sl: SLConfig,
            learner: LearnerConfig, cluster: ClusterConfig, run_dir: str, seed: int, bucket_bytes: int) -> SFTResult:
    """Fine-tune ``model`` on ``data`` with ``sl.num_workers`` Ray Train workers; returns the HF policy folder.

    ``data`` is a Ray Dataset with ``prompt`` and ``response`` columns (read lazily, streamed to the workers), or
    (prompt, response) pairs. ``learner`` supplies the engine settings (``deepspeed``, ``optim``'s weight decay and
    grad clip); ``sl`` the job's own (epochs, lr, micro-batch, workers, retries, and each worker's ``resources``, from
    which the Ray Train backend (gloo | nccl) and the workers' env follow); ``cluster`` the placement strategy;
    ``bucket_bytes`` (``sync.bucket_size_mb``) bounds the ZeRO-3 gathers that write the HF folder. Needs a running
    Ray.
    """
    import ray.data
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cai_ray.backend import decide
    from cai_ray.launcher import bundle

    ref = ModelRef.of(model)
    dataset = data if isinstance(data, ray.data.Dataset) else ray.data.from_items(
        [{"prompt": p, "response": r} for p, r in data], override_num_blocks=1)
    num_rows = dataset.count()
    if num_rows < sl.num_workers:
        raise ValueError(f"run_sft: {num_rows} training rows for sl.num_workers={sl.num_workers} workers; every "
                         "worker needs one, so add rows or lower sl.num_workers")
    backend = decide("sft", sl.resources)
    root = Path(run_dir).resolve()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"model_ref": ref, "model": model, "sl": sl, "learner": learner, "seed": seed,
                           "bucket_bytes": bucket_bytes, "checkpoint_root": str(root / TRAIN_DIR / JOB_NAME)},
        datasets={"train": dataset.select_columns(["prompt", "response"])},
        torch_config=TorchConfig(backend=backend.dist_backend, timeout_s=int(learner.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=sl.num_workers, use_gpu=backend.device == "cuda",
                                     resources_per_worker=bundle(sl.resources),
                                     placement_strategy=cluster.placement_strategy),
        run_config=RunConfig(
            name=JOB_NAME,
            storage_path=str(root / TRAIN_DIR),
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
        _link_or_copy_tree(Path(folder) / HF_DIR, policy)
    return SFTResult(policy_path=str(policy), checkpoint_path=checkpoint.path,
                     metrics={k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)})


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (Ray Train has already formed the torch.distributed group)."""
    import datetime
    import time

    import ray.train
    import torch

    from cai_ray.backend import enter_role
    from cai_ray.training import engine as ds

    began = time.perf_counter()
    sl: SLConfig = config["sl"]
    learner: LearnerConfig = config["learner"]
    seed: int = config["seed"]
    ref: ModelRef = config["model_ref"]
    backend = enter_role("sft", sl.resources, uses_vllm=False)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend.dist_backend,
                               timeout=datetime.timedelta(seconds=learner.collective_timeout_s))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(seed)
    engine, pad_id, device = _engine(config, backend, world)
    start_epoch = _resume(engine)
    torch.manual_seed(seed + 1000 * (rank + 1))
    rows = ray.train.get_dataset_shard("train")  # this worker's stream; every worker's is equally long
    tokenizer = ref.tokenizer()
    timing = {"timing/setup": time.perf_counter() - began}
    for epoch in range(start_epoch, sl.num_epochs):
        losses, began = [], time.perf_counter()
        for batch in rows.iter_batches(batch_size=sl.micro_batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                       local_shuffle_seed=seed + epoch):
            seqs = encode_text_pairs(tokenizer, [(str(p), str(r)) for p, r in zip(batch["prompt"], batch["response"])],
                                     max_len=config["model"].max_model_len)
            losses.append(_step(engine, seqs, pad_id=pad_id, device=device))
        last = epoch == sl.num_epochs - 1
        timing["timing/train"], began = time.perf_counter() - began, time.perf_counter()
        # Written where Ray Train keeps its checkpoints, and reported without an upload: copying ~2 GB of
        # DeepSpeed state (Adam included) out of a temporary folder cost 5 s per epoch on SmolLM2. Every rank
        # writes its own state files into the one folder (storage_path is shared storage on a cluster anyway).
        folder = Path(config["checkpoint_root"]) / f"checkpoint_epoch_{epoch:04d}"
        engine.save_checkpoint(str(folder), tag="state")
        timing["timing/save_state"], began = time.perf_counter() - began, time.perf_counter()
        if last:
            ds.save_hf(engine.module, str(folder / HF_DIR), rank=rank, bucket_bytes=config["bucket_bytes"],
                       tokenizer_from=ref)
        if rank == 0:
            (folder / PROGRESS_FILE).write_text(json.dumps({"epoch": epoch}))
        timing["timing/save_hf"] = time.perf_counter() - began
        # Every rank's files are in before the checkpoint is registered. Ray Train formed the group without a
        # device, so NCCL is told each rank's GPU here rather than guessing it from the global rank.
        torch.distributed.barrier(device_ids=[device.index] if device.type == "cuda" else None)
        metrics = {"epoch": epoch, "loss/sft": sum(losses) / max(1, len(losses)), "steps": len(losses),
                   "start_epoch": start_epoch, **timing}  # start_epoch > 0: this run resumed from a checkpoint
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def _engine(config: dict[str, Any], backend: Any, world: int) -> tuple[Any, int, Any]:
    """The DeepSpeed-wrapped policy, its pad id and the device batches go to."""
    import ray.train.torch
    import torch

    from cai_ray.training import engine as ds
    from cai_ray.training.modeling import pad_id

    sl: SLConfig = config["sl"]
    learner: LearnerConfig = config["learner"]
    dtype = backend.torch_dtype(config["model"].dtype)
    module = config["model_ref"].causal_lm(dtype=dtype)
    engine = ds.wrap(module, config=ds.ds_config(learner.deepspeed, micro_batch_size=sl.micro_batch_size,
                                                 grad_clip=learner.optim.grad_clip, world_size=world, dtype=dtype),
                     lr=sl.lr, weight_decay=learner.optim.weight_decay,
                     gradient_checkpointing=learner.deepspeed.gradient_checkpointing)
    # Ray Train shows a node's workers all of their GPUs and has set each one's own as the current device.
    device = ray.train.torch.get_device() if backend.device == "cuda" else torch.device("cpu")
    return engine, pad_id(module.config), device


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


def _step(engine: Any, seqs: Sequence[TrainSequence], *, pad_id: int, device: Any) -> float:
    """One optimizer step on one micro-batch; returns its SFT loss."""
    from cai_ray.algorithms.sft import sft_loss
    from cai_ray.training.modeling import collate_sequences, response_logits

    batch = collate_sequences(seqs, pad_id=pad_id).to(device)
    logits, start = response_logits(engine, batch)  # the prompt columns before `start` skip the LM head
    loss, metrics = sft_loss(logits=logits, labels=batch.labels[:, start:], loss_mask=batch.loss_mask[:, start:])
    engine.backward(loss)
    engine.step()
    return float(metrics["loss/sft"])
