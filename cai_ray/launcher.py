"""The one place that turns plain role classes into Ray actors.

Roles are plain classes (testable in-process); here they get ``ray.remote`` options, a placement-group
bundle sized from their config (so an autoscaler can add nodes while a group is pending), restart
policy and the env of their role's backend decision (:mod:`cai_ray.backend`). Every wait has a deadline
(a :class:`~cai_ray.config.Deadline`): a dead or stuck actor becomes :class:`RemoteCallError` naming it and
the config key of the deadline it missed, never a hang.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cai_ray import run_logs
from cai_ray.backend import RoleBackend, decide
from cai_ray.config import ClusterConfig, Deadline, ResourcesConfig

T = TypeVar("T")


class RemoteCallError(RuntimeError):
    """A remote call failed or missed its deadline; the message names the actor and the call."""

    def __init__(self, message: str, failed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.failed = list(failed)  # names of the actors that failed (from get_all)


def init_ray(cluster: ClusterConfig, *, log_to_driver: bool | None = None) -> None:
    """Join ``cluster.address`` / ``RAY_ADDRESS`` if given, else start a small local Ray.

    No job-level runtime env: Ray merges it into every actor, and what an actor needs depends on its role
    (:func:`spawn` gives each its own). A ``ray job submit`` job keeps its ``working_dir`` untouched.
    ``log_to_driver``: stream the workers' output to this process; None: unless inside a quiet run
    (:mod:`cai_ray.run_logs`).
    """
    if ray.is_initialized():
        return
    if log_to_driver is None:
        log_to_driver = run_logs.is_verbose()
    level = logging.INFO if log_to_driver else logging.WARNING  # the driver's "ray" logger
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=level)
        return
    ray.init(
        address="local",  # a private cluster, never a `ray start` one that happens to run on this host
        num_cpus=cluster.num_cpus,
        include_dashboard=False,
        object_store_memory=cluster.object_store_memory_mb << 20,
        log_to_driver=log_to_driver,
        logging_level=level,
    )


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


def spawn(cls: type[T], *args: Any, role: str, resources: ResourcesConfig, pg: PlacementGroup | None = None,
          bundle_index: int = -1, max_restarts: int = 0, name: str | None = None, log_name: str | None = None,
          **kwargs: Any) -> Any:
    """Start ``cls`` as a Ray actor of ``role`` in bundle ``bundle_index`` of ``pg`` and return its handle.

    Its env comes from the role's decision (:func:`cai_ray.backend.decide`); the role's constructor checks
    what the actor got against the same decision (:func:`cai_ray.backend.enter_role`). ``log_name`` names its
    output file in a quiet run (:func:`cai_ray.run_logs.capture_actor_output`).
    """
    env = decide(role, resources).env | ({run_logs.LOG_NAME_ENV: log_name} if log_name else {})
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # callers retry explicitly so no item is done twice
        "runtime_env": {"env_vars": env},
    }
    if name:
        options["name"] = name
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index)
    return ray.remote(cls).options(**options).remote(*args, **kwargs)


def start_actors(cls: type, *, role: str, resources: ResourcesConfig, cluster: ClusterConfig, names: Sequence[str],
                 args: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]],
                 max_restarts: int = 0) -> tuple[list[Any], PlacementGroup]:
    """Start one ``cls`` actor per name in one placement group and wait until every constructor has finished.

    ``args(i)`` gives actor i's constructor (args, kwargs); each actor gets a ``resources`` bundle, placed by
    ``cluster.placement_strategy``. If the group is not scheduled, an actor fails to start or any wait misses
    its deadline, the actors already started are killed and the group released before the error propagates.
    Stop a started group with :func:`stop_actors`.
    """
    pg = reserve([bundle(resources)] * len(names), strategy=cluster.placement_strategy, timeout=cluster.placement,
                 name=role)
    actors: list[Any] = []
    try:
        for i in range(len(names)):
            a, kw = args(i)
            actors.append(spawn(cls, *a, **kw, role=role, resources=resources, pg=pg, bundle_index=i,
                                max_restarts=max_restarts, log_name=names[i]))
        wait_started(actors, names=names, decision=decide(role, resources), timeout=cluster.startup)
    except BaseException:
        stop_actors(actors, pg)
        raise
    return actors, pg


def stop_actors(actors: Sequence[Any], pg: PlacementGroup | None) -> None:
    """Kill ``actors`` (no restart) and release their placement group (None: actors outside any group)."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
    if pg is not None:
        remove_placement_group(pg)


def wait_started(actors: Sequence[Any], *, names: Sequence[str], decision: RoleBackend,
                 timeout: Deadline) -> list[dict[str, Any]]:
    """Wait until every actor's constructor has finished; record where each runs and from which code.

    One line per actor goes to the run's ``actors.log`` and the console gets one line for the role (every line
    when verbose or outside a run: :func:`cai_ray.run_logs.report_started`). A constructor that raised (a role
    mismatch, a model that does not load) fails here, naming the actor.
    """
    reports = get_all([a.__ray_call__.remote(_whereabouts) for a in actors], timeout=timeout, names=names)
    lines = [f"{name}: node {r['node_ip']} [{r['node_id'][:8]}] pid {r['pid']}, {decision.device}/"
             f"{decision.dist_backend}, {r['threads']} threads, GPU ids {r['gpu_ids'] or 'none'}, cai_ray from "
             f"{r['source']}" for name, r in zip(names, reports, strict=True)]
    run_logs.report_started(decision.role, lines, reports, device=f"{decision.device}/{decision.dist_backend}")
    return reports


def _whereabouts(_actor: Any) -> dict[str, Any]:
    """Runs inside an actor (through ``__ray_call__``): its node, process, GPUs and the code it imported."""
    import torch

    import cai_ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "threads": torch.get_num_threads(),  # set by the role's backend.apply_threads
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "source": os.path.dirname(cai_ray.__file__)}


def _reason(err: Exception) -> str:
    """One line saying why a remote call failed; for a constructor that raised, its exception line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed and lines:
        return f"its constructor raised {lines[-1].strip()}"
    return lines[0] if lines else type(err).__name__


def get(refs: Any, *, timeout: Deadline, what: str) -> Any:
    """``ray.get`` with a deadline; failures name ``what`` (e.g. 'learner rank 1: train_step') and the deadline."""
    try:
        return ray.get(refs, timeout=timeout.seconds)
    except ray.exceptions.GetTimeoutError:
        raise RemoteCallError(f"{what}: no answer within {timeout}") from None
    except ray.exceptions.RayActorError as err:
        raise RemoteCallError(f"{what}: the actor died ({type(err).__name__}: {_reason(err)}){run_logs.logs_hint()}") \
            from err
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
            errors.append(f"{names[i]}: {type(err).__name__}: {_reason(err)}{run_logs.logs_hint()}")
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
