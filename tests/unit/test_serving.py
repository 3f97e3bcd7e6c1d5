"""The Serve services' config checks, token reading, bearer middleware, policy source and placement decisions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cai_ray.backend import decide, serve_llm_placement
from cai_ray.config import ConfigError, ResourcesConfig, ServeConfig, is_loopback, load_config
from cai_ray.serving.auth import BearerTokenMiddleware, read_token, token_digest
from cai_ray.serving.policy import policy_source


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "my-head-node", "::"])
def test_a_non_loopback_bind_without_a_token_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match=r"serve: host .* set serve.auth_token_file or serve.auth_token_env"):
        load_config(None, [f"serve.host='{host}'"])  # quoted: '::' is YAML for a mapping


def test_auth_settings_are_checked() -> None:
    assert load_config(None, ["serve.host=0.0.0.0", "serve.auth_token_env=CAI_TOKEN"]).serve.host == "0.0.0.0"
    assert load_config(None, []).serve.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="keep one"):
        load_config(None, ["serve.auth_token_env=A", "serve.auth_token_file=/x"])
    with pytest.raises(ConfigError, match="require_auth needs"):
        load_config(None, ["serve.require_auth=true"])
    with pytest.raises(ConfigError, match=r"serve.policy.autoscalng: unknown key \(did you mean 'autoscaling'"):
        load_config(None, ["serve.policy.autoscalng.max_replicas=2"])
    with pytest.raises(ConfigError, match="min_replicas .* exceeds max_replicas"):
        load_config(None, ["serve.policy.autoscaling.min_replicas=3"])


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.4", "head.example.com"]))


def test_token_comes_from_the_file_or_variable_and_must_not_be_empty(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "token"
    secret.write_text("  s3cret\n")
    assert read_token(ServeConfig(auth_token_file=str(secret))) == "s3cret"
    monkeypatch.setenv("CAI_TOKEN", "from-env")
    assert read_token(ServeConfig(auth_token_env="CAI_TOKEN")) == "from-env"
    assert read_token(ServeConfig()) is None
    with pytest.raises(ConfigError, match="serve.auth_token_file=.*missing: no such file"):
        read_token(ServeConfig(auth_token_file=str(tmp_path / "missing")))
    monkeypatch.setenv("CAI_TOKEN", " ")
    with pytest.raises(ConfigError, match="serve.auth_token_env=CAI_TOKEN: the token is empty"):
        read_token(ServeConfig(auth_token_env="CAI_TOKEN"))


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _call(headers: list[tuple[bytes, bytes]], scope_type: str = "http") -> tuple[int | None, bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    middleware = BearerTokenMiddleware(_app, digest=token_digest("right"))
    asyncio.run(middleware({"type": scope_type, "headers": headers}, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("header,status", [
    (None, 401), (b"Bearer wrong", 401), (b"right", 401), (b"Basic right", 401), (b"Bearer ", 401),
    (b"Bearer right", 200), (b"bearer  right ", 200),
])
def test_bearer_middleware_passes_only_the_right_token(header: bytes | None, status: int) -> None:
    got, body = _call([(b"authorization", header)] if header is not None else [])
    assert got == status
    assert (b"authentication_error" in body) == (status == 401)


def test_bearer_middleware_lets_lifespan_events_through() -> None:
    assert _call([], scope_type="lifespan")[0] == 200  # the app's own handler answered


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_policy_source_prefers_the_runs_rl_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "my-run"
    sl = _folder(run / "sl" / "policy")
    assert policy_source(model=None, run_dir=str(run)) == (str(sl), "my-run-sl")
    rl = _folder(run / "checkpoint" / "learner" / "policy_hf")
    assert policy_source(model=None, run_dir=str(run)) == (str(rl), "my-run-rl")
    assert policy_source(model="tiny-random-llama", run_dir=None) == ("tiny-random-llama", "tiny-random-llama")
    assert policy_source(model=str(sl), run_dir=None) == (str(sl), "policy")
    with pytest.raises(ConfigError, match="no trained policy"):
        policy_source(model=None, run_dir=str(_folder(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="exactly one of --model M and --run-dir RUN"):
        policy_source(model="x", run_dir=str(run))


def test_serve_llm_placement_follows_the_roles_resources() -> None:
    cpu_res, gpu_res = ResourcesConfig(num_cpus=2), ResourcesConfig(num_cpus=4, num_gpus=1)
    cpu = serve_llm_placement(decide("serve_policy", cpu_res), cpu_res, tensor_parallel_size=1)
    gpu = serve_llm_placement(decide("serve_policy", gpu_res), gpu_res, tensor_parallel_size=2)
    assert cpu["accelerator_config"] == {"kind": "cpu"}
    assert cpu["placement_group_config"]["bundles"] == [{"CPU": 2}]
    assert cpu["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""
    assert gpu["accelerator_config"] == {"kind": "gpu"}
    assert gpu["placement_group_config"]["bundles"] == [{"CPU": 4, "GPU": 1}] * 2
    assert "CUDA_VISIBLE_DEVICES" not in gpu["runtime_env"]["env_vars"]
    # Serve LLM's AsyncLLM runs its engine core in its own process; the offline engines' switch stays off it.
    assert all("VLLM_ENABLE_V1_MULTIPROCESSING" not in p["runtime_env"]["env_vars"] for p in (cpu, gpu))


def _feedback_client(**service: Any) -> Any:
    """The labelling service's real FastAPI app, in-process; these requests are refused before any replica work."""
    from fastapi.testclient import TestClient

    from cai_ray.config import ExperimentConfig, FeedbackServiceConfig
    from cai_ray.serving.feedback import FeedbackArgs, http_app

    cfg = ExperimentConfig()
    digest = service.pop("digest", None)
    args = FeedbackArgs(cfg.models.policy, cfg.feedback, cfg.constitution, cfg.data,
                        FeedbackServiceConfig(**service), digest, 0)
    return TestClient(http_app(None, args))  # type: ignore[arg-type]


PAIR = {"pair_id": "p", "prompt": "q", "response_a": "a", "response_b": "b"}


@pytest.mark.parametrize("body,field,msg", [
    ({"pairs": [{k: v for k, v in PAIR.items() if k != "response_b"}]}, "pairs.0.response_b", "Field required"),
    ({"pairs": [PAIR | {"respnse_c": "x"}]}, "pairs.0.respnse_c", "Extra inputs are not permitted"),
    ({"pairs": [PAIR | {"prompt": 3}]}, "pairs.0.prompt", "Input should be a valid string"),
    ({"pairs": []}, "pairs", "at least 1 item"),
    ({"pair": [PAIR]}, "pairs", "Field required"),
])
def test_a_bad_label_body_is_a_422_naming_the_field(body: dict[str, Any], field: str, msg: str) -> None:
    response = _feedback_client().post("/v1/label", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert field in error["fields"] and msg in error["message"] and field in error["message"]


def test_too_many_items_or_duplicate_ids_are_refused_before_the_engine() -> None:
    client = _feedback_client(max_items_per_request=2)
    response = client.post("/v1/label", json={"pairs": [PAIR] * 3})
    assert response.status_code == 422 and "max_items_per_request=2" in response.json()["error"]["message"]
    response = client.post("/v1/revise", json={"prompts": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]})
    assert response.status_code == 422 and "'x' appears more than once" in response.json()["error"]["message"]


def test_a_body_over_the_limit_is_a_413_declared_or_streamed() -> None:
    client = _feedback_client(max_body_bytes=1024)
    big = {"pairs": [PAIR | {"prompt": "x" * 2000}]}
    response = client.post("/v1/label", json=big)
    assert response.status_code == 413 and "serve.feedback.max_body_bytes" in response.json()["error"]["message"]

    def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(4):
            yield b" " * 400

    response = client.post("/v1/label", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    # Under the limit the body reaches validation (and its own 422).
    assert client.post("/v1/label", json={"pairs": []}).status_code == 422


def test_the_labelling_routes_need_the_token_when_one_is_configured() -> None:
    client = _feedback_client(digest=token_digest("right"))
    assert client.post("/v1/label", json={"pairs": []}).status_code == 401
    assert client.post("/v1/label", json={"pairs": []}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/label", json={"pairs": []}, headers={"Authorization": "Bearer right"}).status_code == 422


def test_serve_backend_needs_a_fixed_feedback_model() -> None:
    with pytest.raises(ConfigError, match="feedback.backend=serve labels with a fixed model"):
        load_config(None, ["feedback.backend=serve"])
    cfg = load_config(None, ["feedback.backend=serve", "models.feedback.name=tiny-random-llama"])
    assert [role for role, _ in cfg.sync_targets()] == ["rollout"]
    assert load_config(None, ["feedback.backend=serve", "sync.sync_feedback_engines=false"]).feedback.backend == "serve"
