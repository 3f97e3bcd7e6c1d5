"""The one place that turns plain role classes into Ray actors.

Roles are plain classes (testable in-process); here they get ``ray.remote`` options, a placement-group
bundle sized from their config (so an autoscaler can add nodes while a group is pending), restart
policy and the environment from :mod:`cai_ray.backend`. Every wait has a deadline (a
:class:`~cai_ray.config.Deadline`): a dead or stuck actor becomes :class:`RemoteCallError` naming it and the
config key of the deadline it missed, never a hang.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cai_ray.backend import actor_env
from cai_ray.config import ClusterConfig, Deadline, ResourcesConfig

T = TypeVar("T")


class RemoteCallError(RuntimeError):
    """A remote call failed or missed its deadline; the message names the actor and the call."""

    def __init__(self, message: str, failed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.failed = list(failed)  # names of the actors that failed (from get_all)


def init_ray(cluster: ClusterConfig) -> None:
    """Join ``cluster.address`` / ``RAY_ADDRESS`` if given, else start a small local Ray."""
    if ray.is_initialized():
        return
    env = {"env_vars": actor_env("cpu" if not _cuda() else "cuda")}
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    ray.init(
        address="local",  # a private cluster, never a `ray start` one that happens to run on this host
        num_cpus=cluster.num_cpus,
        include_dashboard=False,
        object_store_memory=cluster.object_store_memory_mb << 20,
        runtime_env=env,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bundle(resources: ResourcesConfig) -> dict[str, float]:
    """A placement-group bundle for one actor."""
    b = {"CPU": resources.num_cpus}
    if resources.num_gpus:
        b["GPU"] = resources.num_gpus
    return b


def reserve(bundles: Sequence[dict[str, float]], *, strategy: str, timeout: Deadline, name: str) -> PlacementGroup:
    """Create a placement group and wait for it; a pending group is what asks the autoscaler for nodes."""
    pg = placement_group(list(bundles), strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout.seconds)
    if not ready:
        remove_placement_group(pg)
        raise RemoteCallError(
            f"placement group '{name}' ({list(bundles)}, {strategy}) was not scheduled within {timeout}: "
            "the cluster lacks these resources; lower the role's resources/num_workers or add nodes"
        )
    return pg


def spawn(cls: type[T], *args: Any, resources: ResourcesConfig, pg: PlacementGroup | None = None,
          bundle_index: int = -1, max_restarts: int = 0, name: str | None = None, **kwargs: Any) -> Any:
    """Start ``cls`` as a Ray actor in bundle ``bundle_index`` of ``pg`` and return its handle."""
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # callers retry explicitly so no item is done twice
        "runtime_env": {"env_vars": actor_env("cuda" if resources.num_gpus else "cpu")},
    }
    if name:
        options["name"] = name
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index)
    return ray.remote(cls).options(**options).remote(*args, **kwargs)


def get(refs: Any, *, timeout: Deadline, what: str) -> Any:
    """``ray.get`` with a deadline; failures name ``what`` (e.g. 'learner rank 1: train_step') and the deadline."""
    try:
        return ray.get(refs, timeout=timeout.seconds)
    except ray.exceptions.GetTimeoutError:
        raise RemoteCallError(f"{what}: no answer within {timeout}") from None
    except ray.exceptions.RayActorError as err:
        raise RemoteCallError(f"{what}: the actor died ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    except ray.exceptions.RayTaskError as err:
        raise RemoteCallError(f"{what}: failed: {err.cause!r}") from err


def get_all(refs: Sequence[Any], *, timeout: Deadline, names: Sequence[str], left_s: float | None = None) -> list[Any]:
    """Wait for one call per actor with one shared deadline; the error names each actor that failed.

    ``left_s``: the part of ``timeout`` not yet used up by the caller (default: all of it).
    """
    results: list[Any] = [None] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    wait_s = timeout.seconds if left_s is None else max(0.0, left_s)
    ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
    failed = [pending[r] for r in not_ready]
    errors = [f"{names[pending[r]]}: no answer within {timeout}" for r in not_ready]
    for ref in ready:
        i = pending[ref]
        try:
            results[i] = ray.get(ref, timeout=0)
        except ray.exceptions.RayTaskError as err:  # the remote code raised: its own message says what is wrong
            failed.append(i)
            errors.append(f"{names[i]}: failed: {type(err.cause).__name__}: {err.cause}")
        except ray.exceptions.RayActorError as err:
            failed.append(i)
            errors.append(f"{names[i]}: {type(err).__name__}: {str(err).splitlines()[0]}")
    if errors:
        raise RemoteCallError("; ".join(errors), failed=[names[i] for i in sorted(failed)])
    return results


def wait_restarted(actor: Any, *, timeout: Deadline, what: str) -> None:
    """Wait until Ray has restarted ``actor`` (calls to a restarting actor fail at once, so poll)."""
    deadline = time.monotonic() + timeout.seconds
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        except ray.exceptions.GetTimeoutError:
            break
        except ray.exceptions.RayActorError as err:
            raise RemoteCallError(f"{what}: did not come back ({type(err).__name__}); no restarts left?") from err
    raise RemoteCallError(f"{what}: not restarted within {timeout}")
