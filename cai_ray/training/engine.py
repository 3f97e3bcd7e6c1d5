"""DeepSpeed plumbing for the learner: process-group set-up, the ds_config builder and ``wrap``.

``wrap`` is the one function that turns a plain ``torch.nn.Module`` into a DeepSpeed engine. Its order:

1. gradient checkpointing is switched on in the module (HF ``gradient_checkpointing_enable``) if asked;
2. a client AdamW is built over the trainable parameters: ``torch.optim.AdamW``, or DeepSpeedCPUAdam under
   ZeRO-Offload when its op builds (else torch AdamW, allowed by ``zero_force_ds_cpu_optimizer=false``);
3. ``deepspeed.initialize`` partitions parameters (ZeRO-3), gradients (ZeRO-2/3) and optimizer state
   (ZeRO-1/2/3), and moves optimizer state to CPU when ``offload_optimizer`` is set.

A frozen model (the reference) gets no optimizer: under ZeRO-3 it is still a DeepSpeed engine (its
parameters are partitioned and every forward is a collective); under stage 0-2 it stays a plain module.
Gradient accumulation is driven by the caller (``set_gradient_accumulation_boundary``), so the ds_config
always says ``gradient_accumulation_steps = 1``.

Resuming unpickles nothing: DeepSpeed's ``load_checkpoint`` would unpickle its state files (it turns torch's
weights-only mode off), so :func:`load_checkpoint` first checks every state file for types outside DeepSpeed's own few (naming the
file), then runs DeepSpeed's loader with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which torch honours over an
explicit ``weights_only=False``; the variable is set only for the duration of the load.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cai_ray.config import DeepSpeedConfig
from cai_ray.models import ModelRef

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- process group


def node_ip() -> str:
    """An address of this host that other nodes can reach (no packet is sent); 127.0.0.1 without a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def open_store(world_size: int, *, timeout_s: float) -> tuple[torch.distributed.TCPStore, str, int]:
    """Rank 0: start the rendezvous store on a free port (port 0: the OS picks, so no bind race)."""
    host = node_ip()
    store = torch.distributed.TCPStore(
        host, 0, world_size, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )
    return store, host, store.port


def init_distributed(*, backend: str, rank: int, world_size: int, master_addr: str, master_port: int,
                     timeout_s: float, store: torch.distributed.TCPStore | None = None) -> None:
    """Join the torch.distributed group (gloo on CPU, nccl on GPU) and register it with DeepSpeed.

    Rank 0 passes the store it opened; the others connect to ``master_addr:master_port``. The env vars
    DeepSpeed reads are set too. ``LOCAL_RANK`` is 0: Ray gives each rank its own visible GPU.
    """
    import deepspeed

    os.environ.update({
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
    })
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = torch.distributed.TCPStore(master_addr, master_port, world_size, False, timeout)
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(0)
        # Bound to the group, so NCCL never guesses a rank's GPU (and barriers need no device_ids).
        device_id = torch.device("cuda", 0)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                         device_id=device_id)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


# ------------------------------------------------------------------------------------- ds_config


def ds_config(deepspeed: DeepSpeedConfig, *, micro_batch_size: int, grad_clip: float, world_size: int,
              dtype: torch.dtype, trainable: bool = True) -> dict[str, Any]:
    """The DeepSpeed config for one model of the learner (or the SFT job).

    The stage is ``deepspeed.resolved_stage(world_size)``. ``trainable=False`` gives the config of a frozen
    model: ZeRO-3 stays ZeRO-3 (partitioned weights), anything else becomes stage 0 (a replicated copy; no
    optimizer state to shard).
    """
    stage = deepspeed.resolved_stage(world_size)
    stage = stage if trainable or stage == 3 else 0
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = deepspeed.zero3_param_persistence_threshold
    if trainable and deepspeed.offload_optimizer and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if trainable:
        config["gradient_clipping"] = grad_clip
    return config


def wrap(module: torch.nn.Module, *, config: dict[str, Any], lr: float | None, weight_decay: float = 0.0,
         gradient_checkpointing: bool = False) -> Any:
    """Wrap a plain module in DeepSpeed (see the module docstring for the order). ``lr=None``: frozen.

    Returns a ``DeepSpeedEngine``; a frozen module outside ZeRO-3 is returned as is, in eval mode.
    """
    import deepspeed

    if lr is None:
        module.requires_grad_(False)
        module.eval()
        if config["zero_optimization"]["stage"] != 3:
            from deepspeed.accelerator import get_accelerator

            return module.to(get_accelerator().current_device_name())
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()
        return engine
    if gradient_checkpointing and hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = _adamw(params, lr=lr, weight_decay=weight_decay,
                       offloaded="offload_optimizer" in config["zero_optimization"])
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # A world of one has nothing to reduce, yet DeepSpeed 0.19 still flattens every gradient, all-reduces
        # it and copies it back (0.5-0.9 s of each SmolLM2 step here). Its own switch for "no reduction".
        engine.enable_backward_allreduce = False
    engine.train()
    return engine


def _adamw(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float,
           offloaded: bool) -> torch.optim.Optimizer:
    """torch AdamW; with ZeRO-Offload DeepSpeed's vectorised CPU Adam (JIT-built once, ~50 s) when it builds."""
    if offloaded:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        except Exception as err:  # noqa: BLE001 - no compiler / headers: fall back, slower but correct
            logger.warning("DeepSpeedCPUAdam unavailable (%s: %s); ZeRO-Offload uses torch AdamW",
                           type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# ------------------------------------------------------------------------------ gathered weights


def gathered_buckets(module: torch.nn.Module, *, bucket_bytes: int,
                     rank: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Walk ``module``'s parameters bucket by bucket, each bucket gathered whole (ZeRO-3) for a moment.

    A collective under ZeRO-3: every rank must drive this generator to the end in step. Rank 0 gets
    ``(name, cpu tensor)`` copies of each bucket; other ranks get empty lists. At most one bucket is
    gathered at a time; outside ZeRO-3 the gather is a no-op.
    """
    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for name, param in module.named_parameters():
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield _gather(bucket, rank)
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield _gather(bucket, rank)


def _gather(bucket: list[tuple[str, torch.nn.Parameter]], rank: int) -> list[tuple[str, torch.Tensor]]:
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
        if rank != 0:
            return []
        return [(name, p.detach().to("cpu", copy=True)) for name, p in bucket]


def gathered_state_dict(module: torch.nn.Module, *, rank: int, bucket_bytes: int) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (empty elsewhere); a collective under ZeRO-3."""
    state: dict[str, torch.Tensor] = {}
    for bucket in gathered_buckets(module, bucket_bytes=bucket_bytes, rank=rank):
        state.update(bucket)
    return state


def save_hf(module: torch.nn.Module, path: str, *, rank: int, bucket_bytes: int,
            tokenizer_from: ModelRef | None = None) -> None:
    """Write ``module`` (an HF model or ScalarHeadModel) as an HF folder on rank 0; collective under ZeRO-3.

    ``bucket_bytes`` (``sync.bucket_size_mb``) bounds how much of the model is gathered whole at a time.
    """
    state = gathered_state_dict(module, rank=rank, bucket_bytes=bucket_bytes)
    if rank != 0:
        return
    module.save_pretrained(path, state_dict=state)
    if tokenizer_from is not None:
        tokenizer_from.tokenizer().save_pretrained(path)


# ------------------------------------------------------------------------------ weights-only resume
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded without unpickling arbitrary objects; the message names it."""


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's own types in its state files (0.19.8, ZeRO 0-3, with and without offload; measured with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``). cai-ray passes DeepSpeed no lr scheduler and no
    client state, so nothing else is in them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_weights_only(folder: str | Path) -> None:
    """Refuse (naming the file) any DeepSpeed state file in ``folder`` a weights-only load would not accept.

    Reads the pickles' opcodes without running them. Raises :class:`CheckpointError`, or FileNotFoundError
    when ``folder`` holds no state file.
    """
    files = sorted(Path(folder).glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed state files (*.pt) in {folder}")
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for file in files:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
            except Exception as err:  # noqa: BLE001 - not a torch.save zip (e.g. a bare pickle): refuse it
                raise CheckpointError(f"{file}: not a torch.save checkpoint ({type(err).__name__}: {err}); "
                                      "refusing to load it") from None
            if unsafe:
                raise CheckpointError(
                    f"{file}: refusing to load it: it needs {sorted(unsafe)}, which a weights-only load does not "
                    "allow (cai-ray's DeepSpeed saves never contain them; the file was replaced or tampered with)")


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every ``torch.load`` of this process is weights-only, DeepSpeed's own types allowed."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def load_checkpoint(engine: Any, folder: str | Path, *, tag: str) -> None:
    """``engine.load_checkpoint(folder, tag)`` with every state file checked, then loaded weights-only."""
    check_weights_only(Path(folder) / tag)
    try:
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(str(folder), tag=tag)
    except pickle.UnpicklingError as err:  # a type the scan cannot see (built at unpickling time)
        raise CheckpointError(f"{Path(folder) / tag}: refusing a state file that is not weights-only: "
                              f"{str(err).splitlines()[0][:300]}") from None
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint with tag '{tag}' under {folder}")
