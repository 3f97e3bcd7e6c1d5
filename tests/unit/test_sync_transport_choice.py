"""Transport selection follows the learner's and the engines' resources; NCCL without CUDA is a clear error."""

from __future__ import annotations

import pytest
import torch

from cai_ray.backend import decide, resolve_sync_transport
from cai_ray.config import ConfigError, ResourcesConfig, load_config
from cai_ray.sync import GroupSpec, StatelessGroupTransport, SyncError

CPU, GPU, HALF = ResourcesConfig(num_gpus=0), ResourcesConfig(num_gpus=1), ResourcesConfig(num_gpus=0.5)


def transport(choice: str, learner: ResourcesConfig, *engines: ResourcesConfig) -> str:
    return resolve_sync_transport(choice, learner=decide("learner", learner),
                                  engines=[decide(f"engine{i}", r) for i, r in enumerate(engines)])


def test_auto_is_gloo_on_cpu_and_nccl_on_whole_gpus() -> None:
    assert transport("auto", CPU, CPU, CPU) == "gloo"
    assert transport("auto", GPU, GPU, ResourcesConfig(num_gpus=2)) == "nccl"


def test_auto_with_colocated_fractional_gpus_is_gloo_and_explicit_nccl_is_refused() -> None:
    # NCCL refuses two ranks of one group on one GPU, which is what fractional num_gpus share.
    assert transport("auto", HALF, HALF) == "gloo"
    with pytest.raises(ValueError, match=r"needs whole GPUs.*learner, engine0.*sync.transport=gloo"):
        transport("nccl", HALF, HALF)


def test_mixed_layout_is_an_error_for_auto_and_nccl_but_gloo_and_object_store_are_a_choice() -> None:
    with pytest.raises(ValueError, match=r"mixed layout \(GPU: learner; CPU: engine0\).*sync.transport=gloo"):
        transport("auto", GPU, CPU)
    with pytest.raises(ValueError, match=r"'nccl' needs GPUs on both sides, but engine0 ask for none"):
        transport("nccl", GPU, CPU)
    assert transport("gloo", GPU, CPU) == "gloo"
    assert transport("object_store", CPU, GPU) == "object_store"


def test_config_rejects_a_mixed_auto_layout_naming_the_keys() -> None:
    with pytest.raises(ConfigError, match=r"sync.transport=auto cannot choose.*rollout.resources.num_gpus"):
        load_config(None, ["learner.resources.num_gpus=1"])
    cfg = load_config(None, ["learner.resources.num_gpus=1", "sync.transport=object_store"])
    assert cfg.resolved_sync_transport() == "object_store"
    # A separate feedback model gets no weights, so its CPU engine does not make the layout mixed.
    cfg = load_config(None, ["learner.resources.num_gpus=1", "rollout.resources.num_gpus=1",
                             "models.feedback.name=tiny-random-llama"])
    assert cfg.resolved_sync_transport() == "nccl"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_nccl_without_cuda_is_a_clear_error() -> None:
    spec = GroupSpec("nccl", "127.0.0.1", 1, world_size=2, version=7, timeout_s=1)
    with pytest.raises(SyncError, match="transport 'nccl' needs CUDA torch with NCCL"):
        StatelessGroupTransport(spec, rank=1)
