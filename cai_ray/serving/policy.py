"""``cai-ray serve policy``: a policy (built-in, folder, hub id, or a run's latest checkpoint) behind an
OpenAI-compatible API on Ray Serve LLM.

The application is what ``ray.serve.llm.build_openai_app`` composes — one ``LLMServer`` deployment per model
(``build_llm_deployment``) behind an ``OpenAiIngress`` (``make_fastapi_ingress``) — built here from the same
public pieces because ``build_openai_app`` makes its FastAPI app internally and offers no place for middleware:
the ingress app gets :class:`~cai_ray.serving.auth.BearerTokenMiddleware` when a token is configured. Where the
engine runs (CPU or GPU bundles) is decided by :func:`cai_ray.backend.serve_llm_placement` from
``serve.policy.resources``; chat requests are rendered with the model's own chat template by vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.backend import decide, serve_llm_placement
from cai_ray.config import ConfigError, ExperimentConfig, ModelConfig, PolicyServiceConfig, ServeConfig
from cai_ray.inference.engine import engine_args
from cai_ray.models import builtin_names, resolve_model
from cai_ray.serving.service import Service, auth_digest, run_app, start_proxy

APP_NAME = "policy"


def policy_source(*, model: str | None, run_dir: str | None) -> tuple[str, str]:
    """``(model reference, default model id)`` of ``--model M`` or ``--run-dir RUN`` (the run's latest policy:
    the RL checkpoint's ``policy_hf``, else the SL policy).

    Raises:
        ConfigError: neither or both given, or the run folder holds no trained policy.
    """
    from cai_ray.evaluation.run import run_checkpoints

    if (model is None) == (run_dir is None):
        raise ConfigError("cai-ray serve policy: give exactly one of --model M and --run-dir RUN")
    if model is not None:
        name = model if model in builtin_names() or not Path(model).expanduser().exists() else Path(model).name
        return model, name
    found, _ = run_checkpoints(run_dir, base_model="")
    stage = next((s for s in ("rl", "sl") if s in found), None)
    if stage is None:
        raise ConfigError(f"--run-dir {run_dir}: no trained policy (looked for checkpoint/learner/policy_hf and "
                          "sl/policy); run `cai-ray run` first, or serve a model with --model")
    return found[stage], f"{Path(run_dir).resolve().name}-{stage}"


def llm_config(model: ModelConfig, service: PolicyServiceConfig, *, model_id: str, seed: int) -> Any:
    """The ``ray.serve.llm.LLMConfig`` of one policy: its source, engine, placement and replicas."""
    from ray.serve.llm import LLMConfig

    backend = decide("serve_policy", service.resources)
    kwargs = engine_args(model, service.engine, backend=backend, seed=seed)
    source = kwargs.pop("model")  # Serve LLM takes the model from model_loading_config
    scaling = service.autoscaling
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        engine_kwargs=kwargs,
        deployment_config={"autoscaling_config": {"min_replicas": scaling.min_replicas,
                                                  "max_replicas": scaling.max_replicas,
                                                  "target_ongoing_requests": scaling.target_ongoing_requests}},
        **serve_llm_placement(backend, service.resources, tensor_parallel_size=service.engine.tensor_parallel_size),
    )


def openai_app(config: Any, *, digest: str | None) -> Any:
    """The OpenAI-compatible Serve application of one ``LLMConfig``, behind the bearer check when ``digest``."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init as openai_fastapi_app
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from cai_ray.serving.auth import BearerTokenMiddleware

    app = openai_fastapi_app()  # Serve LLM's own app: its OpenAI-style error bodies, request ids and metrics
    if digest is not None:
        app.add_middleware(BearerTokenMiddleware, digest=digest)  # added last, so it runs first
    ingress = make_fastapi_ingress(OpenAiIngress, app=app)
    options = OpenAiIngress.get_deployment_options([config])
    # The ingress only routes requests to the engine replicas. Serve's default of one logical CPU for it does not
    # fit beside the engine's bundle on a small node (2 cores: the replica waits forever), so it asks for none.
    options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    return serve.deployment(ingress, **options).bind(
        llm_deployments={config.model_id: build_llm_deployment(config)},
        model_cards={config.model_id: to_model_metadata(config.model_id, config)},
        lora_paths={},
    )


@dataclass(frozen=True)
class PolicyApp:
    """A policy application, built but not yet deployed."""

    app: Any  # ray.serve Application
    model_id: str
    digest: str | None  # of the bearer token; None: no token configured


def build_policy_app(cfg: ExperimentConfig, *, model: str | None = None, run_dir: str | None = None) -> PolicyApp:
    """The application serving ``--model`` / ``--run-dir``'s policy (no Ray needed: bad input fails first).

    The served model keeps ``models.policy``'s dtype, context length and trust setting; its name is
    ``serve.policy.model_id`` or the default of :func:`policy_source`.
    """
    ref, default_id = policy_source(model=model, run_dir=run_dir)
    path = resolve_model(ref, revision=cfg.models.policy.revision)
    revision = None if Path(path).is_dir() else cfg.models.policy.revision  # a hub revision means nothing locally
    served = cfg.models.policy.model_copy(update={"name": path, "revision": revision})
    model_id = cfg.serve.policy.model_id or default_id
    config = llm_config(served, cfg.serve.policy, model_id=model_id, seed=cfg.seed)
    digest = auth_digest(cfg.serve)
    return PolicyApp(openai_app(config, digest=digest), model_id, digest)


def deploy_policy(policy: PolicyApp, serve_cfg: ServeConfig) -> Service:
    """Start Serve's proxy and deploy ``policy`` at ``/`` (OpenAI clients use ``<url>/v1``); returns once it
    answers."""
    start_proxy(serve_cfg)
    return run_app(policy.app, name=APP_NAME, route_prefix="/", serve_cfg=serve_cfg,
                   authenticated=policy.digest is not None)
