"""The RL loop's feedback role with ``feedback.backend: serve``: the labelling service, called over HTTP.

:class:`FeedbackServiceClient` has the pool's verbs the loop calls (``label_pairs``, ``judge``, ``shutdown``):
items go in chunks of ``feedback.batch_size``, several chunks in flight at once (the service batches them
across requests and replicas), each with the ``cluster.step_timeout_s`` deadline and ``feedback.max_retries``
retries on a connection failure or a 5xx. A 4xx is the caller's bug and raises at once, naming the route
and the service's message. With ``feedback.service_url`` unset, :func:`start_feedback_client` deploys the
service in the run's own cluster first and removes it at shutdown; with a URL it uses a shared fleet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, TypeVar

from cai_ray.config import ExperimentConfig
from cai_ray.serving.auth import read_token
from cai_ray.types import ComparisonRequest, Judgement, JudgeRequest, PreferenceLabel

T = TypeVar("T")


class FeedbackServiceError(RuntimeError):
    """The labelling service refused a request or could not be reached."""


def _from_json(cls: type[T], row: dict[str, Any]) -> T:
    """A frozen dataclass of :mod:`cai_ray.types` from its JSON form (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})


class FeedbackServiceClient:
    """Labels and judgements from the labelling service at ``url``."""

    def __init__(self, url: str, *, token: str | None, chunk_size: int, num_in_flight: int, timeout_s: float,
                 max_retries: int, on_shutdown: Callable[[], None] | None = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(headers=headers, timeout=timeout_s)
        self._chunk, self._retries = chunk_size, max_retries
        self._threads = ThreadPoolExecutor(max_workers=num_in_flight, thread_name_prefix="feedback-http")
        self._on_shutdown = on_shutdown
        self.workers: list[Any] = []  # no engines of its own to push weights into

    def label_pairs(self, requests: Sequence[ComparisonRequest]) -> list[PreferenceLabel]:
        """AI preference labels, aligned with ``requests``."""
        rows = self._each("label", "pairs", "labels", [asdict(r) for r in requests])
        return [_from_json(PreferenceLabel, r) for r in rows]

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """P(yes) judgements, aligned with ``requests``."""
        return [_from_json(Judgement, r) for r in self._each("judge", "items", "judgements",
                                                             [asdict(r) for r in requests])]

    def shutdown(self) -> None:
        """Close the connections; remove the service if this run deployed it."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._http.close()
        if self._on_shutdown is not None:
            self._on_shutdown()

    def _each(self, route: str, field: str, answer: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        chunks = [items[i:i + self._chunk] for i in range(0, len(items), self._chunk)]
        results = self._threads.map(lambda chunk: self._post(route, {field: chunk})[answer], chunks)
        return [row for chunk in results for row in chunk]

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        where = f"{self.url}/v1/{route}"
        for attempt in range(self._retries + 1):
            try:
                response = self._http.post(where, json=body)
            except httpx.HTTPError as err:
                why = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 500:
                    break
                why = f"HTTP {response.status_code}: {response.text[:300]}"
            if attempt == self._retries:
                raise FeedbackServiceError(f"labelling service {where}: {why} (after {attempt + 1} tries; "
                                           "feedback.max_retries, cluster.step_timeout_s)")
        if response.status_code != 200:
            raise FeedbackServiceError(f"labelling service {where} refused the request: HTTP {response.status_code} "
                                       f"{response.text[:500]}")
        return response.json()


def start_feedback_client(cfg: ExperimentConfig) -> FeedbackServiceClient:
    """The loop's feedback role for ``feedback.backend: serve``: the service at ``feedback.service_url``, or one
    deployed now in the connected cluster (removed again at shutdown)."""
    from ray import serve

    from cai_ray.serving.feedback import APP_NAME, build_feedback_app, deploy_feedback

    url, on_shutdown = cfg.feedback.service_url, None
    if url is None:
        url = deploy_feedback(build_feedback_app(cfg), cfg.serve).url
        on_shutdown = lambda: serve.delete(APP_NAME)  # noqa: E731 - the run's own service goes with the run
    fb, replicas = cfg.feedback, cfg.serve.feedback.autoscaling.max_replicas
    return FeedbackServiceClient(url, token=read_token(cfg.serve), chunk_size=fb.batch_size,
                                 num_in_flight=fb.max_in_flight_per_worker * replicas,
                                 timeout_s=cfg.cluster.step_timeout_s, max_retries=fb.max_retries,
                                 on_shutdown=on_shutdown)
