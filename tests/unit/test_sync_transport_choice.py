"""Transport selection: one place picks gloo on CPU and NCCL on GPU; NCCL without CUDA is a clear error."""

from __future__ import annotations

import pytest
import torch

from cai_ray.backend import Backend
from cai_ray.sync import GroupSpec, StatelessGroupTransport, SyncError


def test_auto_transport_follows_the_backend() -> None:
    cpu = Backend("cpu", "gloo", "float32", "vllm-cpu", "gloo")
    gpu = Backend("cuda", "nccl", "bfloat16", "vllm", "nccl")
    assert cpu.resolve_transport("auto") == "gloo" and gpu.resolve_transport("auto") == "nccl"
    assert gpu.resolve_transport("object_store") == "object_store"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_nccl_without_cuda_is_a_clear_error() -> None:
    spec = GroupSpec("nccl", "127.0.0.1", 1, world_size=2, version=7, timeout_s=1)
    with pytest.raises(SyncError, match="transport 'nccl' needs CUDA torch with NCCL"):
        StatelessGroupTransport(spec, rank=1)
