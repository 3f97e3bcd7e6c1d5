"""``cai-ray plan``: what a run will ask the cluster for and what each role decided, before anything starts.

Per role: the stages it runs in, its actors, the resources of each, the placement-group bundles and
strategy, and its backend decision (:func:`cai_ray.backend.decide`: device, torch.distributed backend,
dtype, vLLM build) plus the tensor-parallel size of engine roles; then the weight-sync transport and
bucket size, the models the learner holds (a preference model only when the policy's reward comes from it
or ``schedule.preference_model`` asks for a monitor), each role's threads per stage, and the CPUs and GPUs
asked for. SL's roles run one after another (feedback pool, then the
rollout engine for the helpfulness samples, then the SFT job), RL's together, so a run's peak is the
larger of SL's largest role and RL's sum. Pure: reads the config only; starts no Ray, loads no model.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass, field
from typing import Any

from cai_ray.backend import RoleBackend, decide, installed_vllm, thread_mode
from cai_ray.config import PM_FREE_ALGORITHMS, ExperimentConfig, ModelConfig, ResourcesConfig
from cai_ray.launcher import bundle


@dataclass(frozen=True)
class RolePlan:
    """One role's actors, placement and backend."""

    role: str  # rollout | feedback | sft | learner | red_team
    stages: tuple[str, ...]  # ("sl",), ("rl",) or ("sl", "rl")
    num_actors: int
    resources: ResourcesConfig
    strategy: str  # placement-group strategy of the role's bundles
    backend: RoleBackend
    dtype: str  # the dtype its model loads in ('auto' resolved for this role's device)
    tensor_parallel_size: int | None  # engine roles only
    threads: str = "reserved"  # per stage: a number, 'node' (its node's cores) or 'reserved' (backend.thread_mode)

    @property
    def bundles(self) -> list[dict[str, float]]:
        """The placement-group bundles, one per actor."""
        return [bundle(self.resources)] * self.num_actors

    @property
    def totals(self) -> dict[str, float]:
        """CPUs and GPUs of all the role's actors."""
        return {"CPU": self.resources.num_cpus * self.num_actors, "GPU": self.resources.num_gpus * self.num_actors}


@dataclass(frozen=True)
class Plan:
    """Every role of a run, its weight sync and what it asks the cluster for."""

    name: str
    roles: tuple[RolePlan, ...]
    sync_transport: str
    sync_bucket_size_mb: int
    sync_targets: tuple[str, ...]
    here: dict[str, str | None] = field(default_factory=dict)  # what this machine has installed
    learner_models: tuple[str, ...] = ("policy", "reference")  # what the RL learner holds and trains
    preference_model: str = ""  # why the learner does or does not hold a PM (schedule.preference_model)
    zero: str = ""  # the ZeRO stage of the RL learner and the SFT job (learner.deepspeed.zero_stage resolved)

    def role(self, name: str) -> RolePlan:
        """The plan of role ``name``."""
        return next(r for r in self.roles if r.role == name)

    def stage_totals(self) -> dict[str, dict[str, float]]:
        """CPUs/GPUs per stage (SL: its largest role, as they run in turn; RL: the sum) and the run's peak."""
        sl = [r.totals for r in self.roles if "sl" in r.stages]
        rl = [r.totals for r in self.roles if "rl" in r.stages]
        out = {"sl": {k: max((t[k] for t in sl), default=0.0) for k in ("CPU", "GPU")},
               "rl": {k: sum(t[k] for t in rl) for k in ("CPU", "GPU")}}
        out["peak"] = {k: max(out["sl"][k], out["rl"][k]) for k in ("CPU", "GPU")}
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``cai-ray plan --json``."""
        roles = [{"role": r.role, "stages": list(r.stages), "num_actors": r.num_actors,
                  "resources": r.resources.model_dump(), "bundles": r.bundles, "strategy": r.strategy,
                  **{k: v for k, v in asdict(r.backend).items() if k != "role"}, "dtype": r.dtype,
                  "tensor_parallel_size": r.tensor_parallel_size, "threads": r.threads} for r in self.roles]
        return {"name": self.name, "roles": roles,
                "learner": {"models": list(self.learner_models), "preference_model": self.preference_model,
                            "zero": self.zero},
                "sync": {"transport": self.sync_transport, "bucket_size_mb": self.sync_bucket_size_mb,
                         "targets": list(self.sync_targets)},
                "totals": self.stage_totals(), "here": self.here}


def make_plan(cfg: ExperimentConfig) -> Plan:
    """The plan of ``cfg`` (SL + RL, as ``cai-ray run`` runs them)."""
    strategy = cfg.cluster.placement_strategy
    models = cfg.models

    def role(name: str, stages: tuple[str, ...], num: int, res: ResourcesConfig, model: ModelConfig,
             tp: int | None) -> RolePlan:
        backend = decide(name, res)
        threads = " / ".join(f"{stage}: {thread_mode(res, runs_alone=stage == 'sl' or cfg.schedule.mode == 'sync')}"
                             for stage in stages)
        return RolePlan(name, stages, num, res, strategy, backend, backend.resolve_dtype(model.dtype), tp, threads)

    rollout_stages = ("sl", "rl") if cfg.sl.helpful_mix_ratio > 0 else ("rl",)  # SL samples helpful answers
    roles = (
        role("feedback", ("sl", "rl"), cfg.feedback.num_workers, cfg.feedback.resources, models.resolved_feedback(),
             cfg.feedback.engine.tensor_parallel_size),
        role("rollout", rollout_stages, cfg.rollout.num_workers, cfg.rollout.resources, models.policy,
             cfg.rollout.engine.tensor_parallel_size),
        role("sft", ("sl",), cfg.sl.num_workers, cfg.sl.resources, models.policy, None),
        role("learner", ("rl",), cfg.learner.num_ranks, cfg.learner.resources, models.policy, None),
    )
    if cfg.red_team.enabled:  # its engines sit beside the others through every RL iteration
        roles += (role("red_team", ("rl",), cfg.red_team.num_workers, cfg.red_team.resources,
                       cfg.red_team.model or models.policy, cfg.red_team.engine.tensor_parallel_size),)
    return Plan(cfg.name, roles, cfg.resolved_sync_transport(), cfg.sync.bucket_size_mb,
                tuple(name for name, _ in cfg.sync_targets()), _installed_here(), *_learner_models(cfg), _zero(cfg))


def _zero(cfg: ExperimentConfig) -> str:
    """The ZeRO stage the RL learner and the SFT job run ('auto' resolved for their number of ranks)."""
    ds = cfg.learner.deepspeed
    parts = [f"{who} ZeRO-{ds.resolved_stage(n)} ({n} rank{'s' if n > 1 else ''})"
             for who, n in (("RL learner", cfg.learner.num_ranks), ("SFT", cfg.sl.num_workers))]
    return ", ".join(parts) + (" from learner.deepspeed.zero_stage=auto" if ds.zero_stage == "auto" else "")


def _learner_models(cfg: ExperimentConfig) -> tuple[tuple[str, ...], str]:
    """The models the RL learner holds, and why it holds a preference model or not."""
    algorithm, choice = cfg.learner.algorithm, cfg.schedule.preference_model
    models = ("policy", "reference") + (("preference model",) if cfg.uses_preference_model() else ()) \
        + (("critic",) if algorithm == "ppo" else ())
    if algorithm not in PM_FREE_ALGORITHMS:
        why = f"trained and scored: {algorithm}'s reward"
    elif choice == "monitor":
        why = f"trained and scored as a monitor only ({algorithm} learns from the labels; schedule.preference_model=monitor)"
    else:
        why = f"none: {algorithm} learns from the labels (schedule.preference_model=monitor adds one as a monitor)"
    return models, why


def _installed_here() -> dict[str, str | None]:
    try:
        torch_version: str | None = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"vllm": installed_vllm(), "torch": torch_version}


def format_plan(plan: Plan) -> str:
    """The plan as a table for people."""
    head = ("role", "stages", "actors", "per actor", "bundles", "device", "dist", "dtype", "vLLM", "TP", "threads")
    rows = [head]
    for r in plan.roles:
        per = f"{r.resources.num_cpus:g} CPU" + (f", {r.resources.num_gpus:g} GPU" if r.resources.num_gpus else "")
        rows.append((r.role, "+".join(r.stages), str(r.num_actors), per,
                     f"{r.num_actors} x {_bundle_text(r.bundles[0])} {r.strategy}", r.backend.device,
                     r.backend.dist_backend, r.dtype, r.backend.vllm_build if r.tensor_parallel_size else "-",
                     str(r.tensor_parallel_size or "-"), r.threads))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"plan for {plan.name}"] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"weight sync: {plan.sync_transport}, {plan.sync_bucket_size_mb} MiB buckets, learner rank 0 -> "
                 f"{', '.join(plan.sync_targets)}")
    lines.append(f"learner holds: {', '.join(plan.learner_models)}; preference model: {plan.preference_model}")
    lines.append(f"DeepSpeed: {plan.zero}")
    lines.append("threads: 'node' = the cores of the actor's node shared by its role's actors there (a phase that "
                 "runs alone), 'reserved' = ceil(num_cpus) (phases that overlap)")
    t = plan.stage_totals()
    lines.append(f"asks the cluster for: SL {_res_text(t['sl'])} at most at once (its roles run in turn); "
                 f"RL {_res_text(t['rl'])} together; peak {_res_text(t['peak'])}")
    gpu_roles = [r.role for r in plan.roles if r.backend.device == "cuda"]
    if gpu_roles and plan.here.get("vllm") != "vllm":
        lines.append(f"note: this machine has {plan.here.get('vllm') or 'no vLLM'} (torch {plan.here.get('torch')}); "
                     f"the nodes that run {', '.join(gpu_roles)} need cai-ray[gpu]. Each actor checks at start.")
    return "\n".join(lines)


def _bundle_text(b: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}"


def _res_text(t: dict[str, float]) -> str:
    return f"{t['CPU']:g} CPUs / {t['GPU']:g} GPUs"
