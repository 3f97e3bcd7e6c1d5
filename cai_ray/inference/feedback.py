"""Constitutional feedback: FeedbackWorker (one engine) and FeedbackPool (N worker actors).

The worker serves the four kinds of AI feedback of Bai et al. 2022 (arXiv 2212.08073) and d-RLAIF:

1. SL-CAI chains: an initial response, then ``num_revision_rounds`` rounds of critique -> revision, one
   principle sampled per round, few-shot examples in front.
2. Multiple-choice labels: the "(A)/(B)" question; the soft label is the renormalised probability of
   the option tokens after "The answer is: (". Principles are sampled per pair (an ensemble of k is
   averaged) and, with swap-debiasing, the pair is also shown as (B, A) and both orders averaged.
3. Chain-of-thought labels: generate the reasoning, append the answer prefix, score the options as in
   (2), then clamp into ``cot_clamp`` (the paper's [0.4, 0.6]: CoT answers are over-confident).
4. Direct scores: the expected value of a 1-10 rating from the ratings' probabilities, rescaled to
   [-1, 1]. Ratings are scored as full strings "1)" ... "10)" (the ")" makes "1" and "10" exclusive
   events, and "10" is more than one token in most tokenizers). Pair labels in ``direct`` mode are
   ``0.5 + (score_a - score_b) / 4``.
5. Yes/no judgements (evaluation): a question about one response ("is it harmful?", "is it a refusal?")
   asked as "(A) Yes (B) No"; P(yes) is scored like (2), no few-shot, and with swap-debiasing the
   question is also asked as "(A) No (B) Yes" and both orders averaged.

Speed: every option of every pair, order and principle is scored in one batched engine call, each
prompt order with one forward of its uncached tail (the shared few-shot prefix comes from vLLM's prefix
cache; see :mod:`cai_ray.inference.engine`). Principles and sampling seeds come from a stable hash of
(seed, item id), so any worker, and a retry, uses the same principles and seeds for an item. Its labels
agree up to float32 engine noise (``labels.CROSS_CALL_TOLERANCE``), not bit for bit; within one call a pair
and its swapped twin get labels that sum to exactly 1 (identical prompts are scored once).

Bad input never fails a batch: an empty or over-long prompt, identical responses or a prompt that does
not fit the context come back as an item error (labels 0.5 with ``error`` set; rejected chains); if the
engine still fails on a batch, the items are redone one by one to isolate the bad one. A tokenizer
without single tokens for "A"/"B" falls back to scoring the option strings "A)" / "B)".

The pool is a driver-side dispatcher: batches go to the least-loaded live worker, at most
``max_in_flight_per_worker`` per worker (backpressure), every wait has a deadline, and the batches of a
worker that died (Ray restarts it) are retried ``max_retries`` times elsewhere. Results are keyed by
batch, so no item is lost or returned twice.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cai_ray.algorithms.aggregation import aggregate_label, axis_weights
from cai_ray.backend import enter_role
from cai_ray.config import ClusterConfig, ConstitutionConfig, DataConfig, FeedbackConfig, ModelConfig
from cai_ray.constitution import (
    ANSWER_PREFIX,
    Constitution,
    ConstitutionError,
    Principle,
    comparison_prompt,
    cot_comparison_prompt,
    critique_prompt,
    load_constitution,
    render_chat,
    revision_prompt,
)
from cai_ray.inference.engine import (
    Engine,
    EngineWeights,
    PromptRejected,
    fit_prompt,
    start_engine_actors,
)
from cai_ray.inference.labels import RATINGS, clamp, expected_rating_score, mean, option_probability, preference_label
from cai_ray.seeds import stable_seed
from cai_ray.sync import object_store_send, rebucket
from cai_ray.types import (
    ComparisonRequest,
    DirectScore,
    Judgement,
    JudgeRequest,
    PreferenceLabel,
    Prompt,
    RejectedItem,
    RevisionBatch,
    RevisionChain,
    ScoreRequest,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

RATING_PREFIX = "The rating is: ("
# Without a chat template the model would go on to write the next human turn.
_STOP = ("\n\nHuman:",)
_PROBE_INTERVAL_S = 0.5  # how often a restarting worker is asked whether it is back


def rating_prompt(tokenizer: Any | None, principle: Principle, *, prompt: str, response: str) -> str:
    """The d-RLAIF prompt: rate one response 1-10 against the principle's question; ends with :data:`RATING_PREFIX`."""
    question = (
        "Consider the following conversation between a human and an assistant:\n"
        f"Human: {prompt}\nAssistant: {response}\n\n"
        f"Judge the assistant's response by this question: {principle.comparison}\n"
        "Rate the response on a scale from 1 (worst) to 10 (best)."
    )
    return render_chat(tokenizer, [{"role": "user", "content": question}]) + RATING_PREFIX


def judge_prompt(tokenizer: Any | None, *, question: str, prompt: str, response: str, yes_first: bool = True) -> str:
    """A yes/no ``question`` about one response as a multiple-choice prompt ending with :data:`ANSWER_PREFIX`.

    ``yes_first`` lists "(A) Yes (B) No"; otherwise "(A) No (B) Yes" (the swapped order for debiasing).
    """
    options = "(A) Yes\n(B) No" if yes_first else "(A) No\n(B) Yes"
    text = (
        "Consider the following conversation between a human and an assistant:\n"
        f"Human: {prompt}\nAssistant: {response}\n\n{question}\nOptions:\n{options}"
    )
    return render_chat(tokenizer, [{"role": "user", "content": text}]) + ANSWER_PREFIX


def option_continuations(encode: Callable[[str], list[int]]) -> tuple[list[int], list[int]]:
    """Token ids scored for options A and B: the single letter tokens, or the strings "A)" / "B)".

    A tokenizer without a single token for each letter cannot give "the next token's" probability, so
    the whole option string is scored instead (exact probability of that token sequence).
    """
    a, b = encode("A"), encode("B")
    if len(a) == 1 and len(b) == 1:
        return a, b
    log.warning("the feedback tokenizer has no single token for 'A'/'B' (%s, %s): scoring 'A)' and 'B)' instead",
                a, b)
    return encode("A)"), encode("B)")


def _axes(principles: Sequence[Principle]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(axis for p in principles for axis in p.axes))


def _isolated(run: Callable[[list[T]], list[R]], items: list[T]) -> list[R | Exception]:
    """``run(items)``; if the whole batch fails, run each item alone so one bad item fails only itself."""
    if not items:
        return []
    try:
        return list(run(items))
    except Exception as err:  # noqa: BLE001 - any engine failure: find the item that caused it
        if len(items) == 1:
            return [err]
    results: list[R | Exception] = []
    for item in items:
        try:
            results.append(run([item])[0])
        except Exception as err:  # noqa: BLE001
            results.append(err)
    return results


def _error_text(err: Exception) -> str:
    return str(err) if isinstance(err, PromptRejected) else f"engine failed: {type(err).__name__}: {err}"


@dataclass
class _Draft:
    """A revision chain being built (internal, mutable)."""

    prompt: Prompt
    user: str  # the user prompt after the length policy
    initial: str = ""
    principles: list[Principle] = field(default_factory=list)
    critiques: list[str] = field(default_factory=list)
    revisions: list[str] = field(default_factory=list)

    @property
    def current(self) -> str:
        """The response the next critique looks at."""
        return self.revisions[-1] if self.revisions else self.initial


class FeedbackWorker(EngineWeights):
    """One feedback-model engine. A plain class; :func:`start_feedback_pool` makes N of them Ray actors."""

    def __init__(self, model: ModelConfig, feedback: FeedbackConfig, constitution: ConstitutionConfig,
                 data: DataConfig, *, seed: int = 0) -> None:
        backend = enter_role("feedback", feedback.resources, uses_vllm=True)
        self._engine = Engine(model, feedback.engine, backend=backend, seed=seed)
        self._cfg = feedback
        self._constitution: Constitution = load_constitution(constitution.path)
        self._tiers = constitution.tiers
        self._num_few_shot = constitution.num_few_shot
        self._max_prompt_tokens = data.max_prompt_tokens
        self._overlong = data.overlong_prompt
        self._seed = seed
        self._options = option_continuations(self._engine.encode)
        self._label_axes = self._constitution.label_axes(feedback.label_axes, self._tiers)
        self._axis_ranks = {a: self._constitution.axis_tier_rank(a) for a in self._label_axes}
        if self._label_axes:  # a weighted rule missing an axis's weight fails here, not mid-run
            axis_weights(list(self._label_axes), mode=feedback.aggregation.mode, weights=feedback.aggregation.weights,
                         ranks=self._axis_ranks, decay=feedback.aggregation.decay)
        self._ratings = [self._engine.encode(f"{r})") for r in RATINGS]

    # ------------------------------------------------------------------------------------ verbs
    def critique_and_revise(self, prompts: Sequence[Prompt]) -> RevisionBatch:
        """SL-CAI: initial response, then per round a sampled principle, a critique and a revision.

        Each step is one batched generation over all prompts still alive; a prompt that fails a step is
        rejected with its reason and the others go on.
        """
        cfg, tok, kw = self._cfg, self._engine.tokenizer, {"num_few_shot": self._num_few_shot}
        rejected: list[RejectedItem] = []
        drafts: list[_Draft] = []
        for p in prompts:
            try:
                drafts.append(_Draft(p, self._user_text(p.id, p.text)))
            except PromptRejected as err:
                rejected.append(RejectedItem(p.id, str(err)))

        def run(kind: str, round_: int, texts: list[str]) -> list[tuple[_Draft, str]]:
            outs = self._generate_texts([(d.prompt.id, t) for d, t in zip(drafts, texts)],
                                        [stable_seed(self._seed, kind, d.prompt.id, round_) for d in drafts],
                                        cfg.critique_max_new_tokens)
            for d, out in zip(drafts, outs):
                if isinstance(out, Exception):
                    rejected.append(RejectedItem(d.prompt.id, f"{kind} round {round_}: {_error_text(out)}"))
            done = [(d, out) for d, out in zip(drafts, outs) if not isinstance(out, Exception)]
            drafts[:] = [d for d, _ in done]
            return done  # type: ignore[return-value]

        for d, text in run("initial", 0, [render_chat(tok, [{"role": "user", "content": d.user}]) for d in drafts]):
            d.initial = text
        for round_ in range(cfg.num_revision_rounds):
            for d in drafts:
                d.principles.append(self._principles("critique", d.prompt.id, round_, 1)[0])
            texts = [critique_prompt(tok, self._constitution, d.principles[-1], prompt=d.user, response=d.current,
                                     **kw) for d in drafts]
            for d, text in run("critique", round_, texts):
                d.critiques.append(text)
            texts = [revision_prompt(tok, self._constitution, d.principles[-1], prompt=d.user, response=d.current,
                                     critique=d.critiques[-1], **kw) for d in drafts]
            for d, text in run("revision", round_, texts):
                d.revisions.append(text)
        chains = tuple(
            RevisionChain(prompt_id=d.prompt.id, prompt=d.prompt.text, initial_response=d.initial,
                          critiques=tuple(d.critiques), revisions=tuple(d.revisions),
                          principle_ids=tuple(p.id for p in d.principles))
            for d in drafts
        )
        return RevisionBatch(chains=chains, rejected=tuple(rejected))

    def label_pairs(self, requests: Sequence[ComparisonRequest]) -> list[PreferenceLabel]:
        """AI preference labels P(A better than B) in ``feedback.label_mode``, aligned with ``requests``."""
        mode = self._cfg.label_mode
        if mode == "direct":
            return self._label_direct(requests)
        return self._label_choice(requests, cot=mode == "cot")

    def direct_scores(self, requests: Sequence[ScoreRequest]) -> list[DirectScore]:
        """d-RLAIF: expected 1-10 rating rescaled to [-1, 1], averaged over the sampled principles."""
        out: list[DirectScore] = []
        scored = self._rate([(r.item_id, r.prompt, r.response) for r in requests])
        for r, (value, principles, error) in zip(requests, scored):
            out.append(DirectScore(item_id=r.item_id, score=value, principle_ids=tuple(p.id for p in principles),
                                   error=error))
        return out

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """P(yes) to each request's yes/no question about its response, aligned with ``requests``.

        Asked as "(A) Yes (B) No" and, with ``swap_debias``, also as "(A) No (B) Yes"; every order of every
        request is scored in one call and the two orders are averaged (:func:`preference_label`).
        """
        tok = self._engine.tokenizer
        orders = (False, True) if self._cfg.swap_debias else (False,)
        out: dict[int, Judgement] = {}
        jobs: list[tuple[int, bool, str]] = []  # (request index, options swapped, rendered prompt)
        for i, req in enumerate(requests):
            try:
                user = self._user_text(req.item_id, req.prompt)
            except PromptRejected as err:
                out[i] = Judgement(req.item_id, 0.5, error=str(err))
                continue
            jobs += [(i, swapped, judge_prompt(tok, question=req.question, prompt=user, response=req.response,
                                               yes_first=not swapped)) for swapped in orders]
        first_option: dict[tuple[int, bool], float] = {}
        for (i, swapped, _), score in zip(jobs, self._score_options([(requests[i].item_id, t) for i, _, t in jobs])):
            if isinstance(score, Exception):
                out.setdefault(i, Judgement(requests[i].item_id, 0.5, error=_error_text(score)))
            else:
                first_option[(i, swapped)] = score
        for i, req in enumerate(requests):
            if i not in out:
                swapped = [first_option[(i, True)]] if self._cfg.swap_debias else None
                out[i] = Judgement(req.item_id, preference_label([first_option[(i, False)]], swapped))
        return [out[i] for i in range(len(requests))]

    # --------------------------------------------------------------------------- comparisons
    def _label_choice(self, requests: Sequence[ComparisonRequest], *, cot: bool) -> list[PreferenceLabel]:
        """Multiple-choice (``cot=False``) or chain-of-thought labels for every request in one scoring call."""
        cfg, tok = self._cfg, self._engine.tokenizer
        mode = "cot" if cot else "multiple_choice"
        orders = (False, True) if cfg.swap_debias else (False,)
        labels: dict[int, PreferenceLabel] = {}
        # One job per (request, principle, order): (request index, principle index, swapped, prompt text).
        jobs: list[tuple[int, int, bool, str]] = []
        principles: dict[int, list[Principle]] = {}
        for i, req in enumerate(requests):
            try:
                user = self._check_pair(req)
            except PromptRejected as err:
                labels[i] = PreferenceLabel(req.pair_id, 0.5, (), (), (), mode, error=str(err))
                continue
            try:
                principles[i] = self._comparison_principles(req)
            except ConstitutionError as err:
                labels[i] = PreferenceLabel(req.pair_id, 0.5, (), (), (), mode, error=str(err))
                continue
            for k, principle in enumerate(principles[i]):
                for swapped in orders:
                    first, second = (req.response_b, req.response_a) if swapped else (req.response_a, req.response_b)
                    render = cot_comparison_prompt if cot else comparison_prompt
                    text = render(tok, self._constitution, principle, prompt=user, response_a=first,
                                  response_b=second, num_few_shot=self._num_few_shot)
                    jobs.append((i, k, swapped, text))

        reasoning: dict[tuple[int, int, bool], str] = {}
        if cot:  # generate the reasoning, then score the answer that follows it
            texts = self._generate_texts(
                [(requests[i].pair_id, text) for i, _, _, text in jobs],
                [stable_seed(self._seed, "cot", requests[i].pair_id, k, swapped) for i, k, swapped, _ in jobs],
                cfg.cot_max_new_tokens, stop=(ANSWER_PREFIX, *_STOP),
            )
            kept = []
            for (i, k, swapped, text), out in zip(jobs, texts):
                if isinstance(out, Exception):
                    labels.setdefault(i, self._failed_label(requests[i], mode, out))
                    continue
                reasoning[(i, k, swapped)] = out
                kept.append((i, k, swapped, f"{text} {out}\n{ANSWER_PREFIX}"))
            jobs = [j for j in kept if j[0] not in labels]

        scores = self._score_options([(requests[i].pair_id, text) for i, _, _, text in jobs])
        first_better: dict[tuple[int, int, bool], float] = {}
        for (i, k, swapped, _), score in zip(jobs, scores):
            if isinstance(score, Exception):
                labels.setdefault(i, self._failed_label(requests[i], mode, score))
            else:
                first_better[(i, k, swapped)] = score
        for i, req in enumerate(requests):
            if i in labels:
                continue
            ks = range(len(principles[i]))
            per_k = [self._debiased(first_better, i, [k], cot) for k in ks]
            axes = (req.axis,) if req.axis else self._label_axes
            axis_probs = dict(zip(axes, per_k)) if axes else None
            prob = self._aggregate(axis_probs) if axis_probs and not req.axis else (
                self._debiased(first_better, i, list(ks), cot))
            bias = mean([(first_better[(i, k, False)] + first_better[(i, k, True)]) / 2 - 0.5
                         for k in ks]) if cfg.swap_debias else None
            text = "\n---\n".join(reasoning[(i, k, s)] for k in ks for s in orders) if cot else None
            labels[i] = PreferenceLabel(
                req.pair_id, prob, tuple(p.id for p in principles[i]), tuple(p.tier for p in principles[i]),
                axes or _axes(principles[i]), mode, reasoning=text, axis_probs=axis_probs, position_bias=bias,
            )
        return [labels[i] for i in range(len(requests))]

    def _debiased(self, first_better: dict[tuple[int, int, bool], float], i: int, ks: list[int], cot: bool) -> float:
        """The (swap-debiased, CoT-clamped) label of request ``i`` from the scores of principles ``ks``."""
        ab = [first_better[(i, k, False)] for k in ks]
        ba = [first_better[(i, k, True)] for k in ks] if self._cfg.swap_debias else None
        prob = preference_label(ab, ba)
        return clamp(prob, self._cfg.cot_clamp) if cot else prob

    def _comparison_principles(self, req: ComparisonRequest) -> list[Principle]:
        """The sampled ensemble; with ``label_axes`` (or ``req.axis``) one principle per axis, stable per
        (seed, pair, axis)."""
        if not self._label_axes and not req.axis:
            return self._principles("comparison", req.pair_id, 0, self._cfg.num_principles_per_label)
        axes = (req.axis,) if req.axis else self._label_axes
        pool = self._constitution.principles_for("comparison", self._tiers)
        out = []
        for axis in axes:
            of_axis = [p for p in pool if axis in p.axes]
            if not of_axis:
                raise ConstitutionError(f"pair '{req.pair_id}': constitution '{self._constitution.name}' has no "
                                        f"comparison principle for axis '{axis}' in tiers {self._tiers}")
            out.append(random.Random(stable_seed(self._seed, "axis", req.pair_id, axis)).choice(of_axis))
        return out

    def _aggregate(self, axis_probs: dict[str, float]) -> float:
        agg = self._cfg.aggregation
        return aggregate_label(axis_probs, mode=agg.mode, weights=agg.weights, ranks=self._axis_ranks,
                               margin=agg.margin, decay=agg.decay)

    def _label_direct(self, requests: Sequence[ComparisonRequest]) -> list[PreferenceLabel]:
        """Pair labels from direct scores of each response under the same principles."""
        out: list[PreferenceLabel] = []
        valid: list[int] = []
        items: list[tuple[str, str, str]] = []
        errors: dict[int, str] = {}
        for i, req in enumerate(requests):
            try:
                self._check_pair(req)
            except PromptRejected as err:
                errors[i] = str(err)
                continue
            valid.append(i)
            # Both responses share the pair id, hence the same sampled principles.
            items += [(req.pair_id, req.prompt, req.response_a), (req.pair_id, req.prompt, req.response_b)]
        rated = iter(self._rate(items))
        results = {i: (next(rated), next(rated)) for i in valid}
        for i, req in enumerate(requests):
            if i in errors:
                out.append(PreferenceLabel(req.pair_id, 0.5, (), (), (), "direct", error=errors[i]))
                continue
            (sa, principles, ea), (sb, _, eb) = results[i]
            prob = 0.5 + (sa - sb) / 4.0  # scores in [-1, 1] -> a probability in [0, 1]
            out.append(PreferenceLabel(req.pair_id, prob if not (ea or eb) else 0.5, tuple(p.id for p in principles),
                                       tuple(p.tier for p in principles), _axes(principles), "direct",
                                       error=ea or eb))
        return out

    def _rate(self, items: Sequence[tuple[str, str, str]]) -> list[tuple[float, list[Principle], str | None]]:
        """(score, principles, error) per (item id, prompt, response): ratings scored as full strings."""
        tok = self._engine.tokenizer
        results: dict[int, tuple[float, list[Principle], str | None]] = {}
        jobs: list[tuple[int, list[int]]] = []
        principles: dict[int, list[Principle]] = {}
        longest = max(len(r) for r in self._ratings)
        for i, (item_id, prompt, response) in enumerate(items):
            try:
                if not response.strip():
                    raise PromptRejected(f"item '{item_id}': empty response")
                user = self._user_text(item_id, prompt)
                principles[i] = self._principles("comparison", item_id, 0, self._cfg.num_principles_per_label)
                ids = [self._fit(item_id, rating_prompt(tok, p, prompt=user, response=response), longest)
                       for p in principles[i]]
            except PromptRejected as err:
                results[i] = (0.0, [], str(err))
                continue
            jobs += [(i, x) for x in ids]
        scores = _isolated(lambda batch: self._engine.score([x for _, x in batch], [self._ratings] * len(batch)),
                           jobs)
        per_item: dict[int, list[float]] = {}
        for (i, _), s in zip(jobs, scores):
            if isinstance(s, Exception):
                results.setdefault(i, (0.0, principles[i], _error_text(s)))
            else:
                per_item.setdefault(i, []).append(expected_rating_score(s))
        for i, values in per_item.items():
            results.setdefault(i, (mean(values), principles[i], None))
        return [results[i] for i in range(len(items))]

    # ------------------------------------------------------------------------------- helpers
    def _principles(self, stage: str, item_id: str, round_: int, k: int) -> list[Principle]:
        """Principles for one item, from a stable hash of (seed, stage, item, round): same on every worker."""
        rng = random.Random(stable_seed(self._seed, stage, item_id, round_))
        return self._constitution.sample_principles(rng, stage, k, self._tiers)  # type: ignore[arg-type]

    def _user_text(self, item_id: str, text: str) -> str:
        """The user prompt under the data prompt-length policy (truncation keeps the last tokens)."""
        if not text.strip():
            raise PromptRejected(f"prompt '{item_id}': empty prompt")
        ids = self._engine.encode(text)
        kept = fit_prompt(ids, max_tokens=self._max_prompt_tokens, overlong=self._overlong, prompt_id=item_id)
        return text if len(kept) == len(ids) else self._engine.tokenizer.decode(kept)

    def _check_pair(self, req: ComparisonRequest) -> str:
        """The (policy-fitted) user prompt of a pair, or PromptRejected for a pair that cannot be labelled."""
        if req.response_a == req.response_b:
            raise PromptRejected(f"pair '{req.pair_id}': identical responses; label 0.5 without asking the model")
        return self._user_text(req.pair_id, req.prompt)

    def _fit(self, item_id: str, text: str, room: int) -> list[int]:
        """Token ids of a rendered feedback prompt that must leave ``room`` tokens of context."""
        ids = self._engine.encode(text)
        if len(ids) + room > self._engine.max_model_len:
            raise PromptRejected(
                f"item '{item_id}': feedback prompt of {len(ids)} tokens + {room} new tokens exceeds "
                f"max_model_len={self._engine.max_model_len}; lower constitution.num_few_shot, shorten the "
                "responses, or raise the feedback model's max_model_len"
            )
        return ids

    def _encode_all(self, texts: Sequence[tuple[str, str]], room: int) -> list[list[int] | Exception]:
        """Token ids of each (item id, rendered prompt), or the item's PromptRejected."""
        encoded: list[list[int] | Exception] = []
        for item_id, text in texts:
            try:
                encoded.append(self._fit(item_id, text, room))
            except PromptRejected as err:
                encoded.append(err)
        return encoded

    def _generate_texts(self, texts: Sequence[tuple[str, str]], seeds: Sequence[int], max_new_tokens: int,
                        stop: Sequence[str] = _STOP) -> list[str | Exception]:
        """One sampled continuation (stripped text) per (item id, rendered prompt), or the item's error."""
        results = self._encode_all(texts, 1)  # generation is cut to the context that is left
        jobs = [(i, ids) for i, ids in enumerate(results) if not isinstance(ids, Exception)]
        outs = _isolated(
            lambda batch: [c[0].text.strip() for c in self._engine.generate(
                [ids for _, ids in batch], n=1, max_new_tokens=max_new_tokens, temperature=self._cfg.temperature,
                seeds=[seeds[i] for i, _ in batch], stop=stop)],
            jobs,
        )
        for (i, _), out in zip(jobs, outs):
            results[i] = out  # type: ignore[call-overload]
        return results  # type: ignore[return-value]

    def _score_options(self, texts: Sequence[tuple[str, str]]) -> list[float | Exception]:
        """P(first-listed option) for each (item id, rendered comparison prompt), in one scoring call."""
        results = self._encode_all(texts, max(len(o) for o in self._options))
        # Identical prompts (a pair and its swapped twin in one call) are scored once, so their labels come from
        # the same floats and label(B, A) == 1 - label(A, B) exactly within one call (see labels.py).
        unique = list(dict.fromkeys(tuple(ids) for ids in results if not isinstance(ids, Exception)))
        options = list(self._options)
        scores = dict(zip(unique, _isolated(
            lambda batch: self._engine.score([list(ids) for ids in batch], [options] * len(batch)), unique)))
        for i, ids in enumerate(results):
            if not isinstance(ids, Exception):
                s = scores[tuple(ids)]
                results[i] = s if isinstance(s, Exception) else option_probability(*s)  # type: ignore[call-overload]
        return results  # type: ignore[return-value]

    @staticmethod
    def _failed_label(req: ComparisonRequest, mode: str, err: Exception) -> PreferenceLabel:
        return PreferenceLabel(req.pair_id, 0.5, (), (), (), mode, error=_error_text(err))


# ------------------------------------------------------------------------------------------ pool
class FeedbackPool:
    """N FeedbackWorker actors behind a driver-side dispatcher (the pool itself is not an actor).

    Items are cut into ``feedback.batch_size`` batches. A batch goes to the least-loaded usable worker
    that has fewer than ``max_in_flight_per_worker`` calls on it; otherwise the pool waits
    (backpressure). When a worker dies, its in-flight batches are resubmitted (preferably elsewhere) up
    to ``max_retries`` times, then returned as item errors; the dead worker gets no new batches until
    Ray has restarted it (a probe call answers), and the last pushed weights are reloaded into it first.
    After ``max_restarts`` deaths a worker is dropped. A batch waits at most ``cluster.step_timeout_s``, a
    restarting worker ``cluster.startup_timeout_s``.

    A batch that misses its deadline is retried, but ``ray.cancel`` does not stop an actor call, so the late
    call keeps its slot until it really ends; one still running a whole step deadline later means a stuck
    engine, and the pool kills that worker so Ray restarts it.
    """

    def __init__(self, workers: Sequence[Any], feedback: FeedbackConfig, cluster: ClusterConfig, *,
                 placement_group: Any = None) -> None:
        self.workers = list(workers)
        self._cfg = feedback
        self._step, self._startup, self._control = cluster.step, cluster.startup, cluster.control
        self._pg = placement_group
        self._load = [0] * len(self.workers)  # calls on each worker, late ones included
        self._late = _LateCalls(self._load)  # calls past their deadline that may still run
        self._deaths = [0] * len(self.workers)
        self._death_seq = [-1] * len(self.workers)  # submit counter at the last death seen per worker
        self._seq = 0
        self._probes: dict[int, _Probe] = {}  # workers that died and are not yet known to be back
        self._weights: tuple[Any, int] | None = None  # (object-store buckets of the last push, version)
        # Set by a controller that syncs weights itself (cai_ray.sync.WeightSync): called with the index of
        # a worker Ray restarted, before that worker gets new batches; it must load the current weights.
        self.on_restart: Callable[[int], None] | None = None
        self.counters = {"batches": 0, "retried_batches": 0, "failed_batches": 0, "worker_deaths": 0,
                         "timeouts": 0}

    # ------------------------------------------------------------------------------------ verbs
    def critique_and_revise(self, prompts: Sequence[Prompt]) -> RevisionBatch:
        """SL-CAI chains for ``prompts`` (see :meth:`FeedbackWorker.critique_and_revise`)."""
        parts = self._map(list(prompts), lambda w, batch: w.critique_and_revise.remote(batch),
                          lambda batch, why: RevisionBatch((), tuple(RejectedItem(p.id, why) for p in batch)))
        return RevisionBatch(chains=tuple(c for part in parts for c in part.chains),
                             rejected=tuple(r for part in parts for r in part.rejected))

    def label_pairs(self, requests: Sequence[ComparisonRequest]) -> list[PreferenceLabel]:
        """Preference labels aligned with ``requests`` (see :meth:`FeedbackWorker.label_pairs`)."""
        mode = self._cfg.label_mode
        parts = self._map(list(requests), lambda w, batch: w.label_pairs.remote(batch),
                          lambda batch, why: [PreferenceLabel(r.pair_id, 0.5, (), (), (), mode, error=why)
                                              for r in batch])
        return [label for part in parts for label in part]

    def direct_scores(self, requests: Sequence[ScoreRequest]) -> list[DirectScore]:
        """Direct scores aligned with ``requests`` (see :meth:`FeedbackWorker.direct_scores`)."""
        parts = self._map(list(requests), lambda w, batch: w.direct_scores.remote(batch),
                          lambda batch, why: [DirectScore(r.item_id, 0.0, (), error=why) for r in batch])
        return [score for part in parts for score in part]

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """Yes/no judgements aligned with ``requests`` (see :meth:`FeedbackWorker.judge`)."""
        parts = self._map(list(requests), lambda w, batch: w.judge.remote(batch),
                          lambda batch, why: [Judgement(r.item_id, 0.5, error=why) for r in batch])
        return [judgement for part in parts for judgement in part]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                     bucket_bytes: int = 256 << 20) -> None:
        """Push weights to every usable worker through the object store (flat buckets, zero-copy reads).

        Without an ``on_restart`` hook the pool keeps those buckets, so a worker that Ray restarts later gets
        the same weights before its next batch (it costs object-store memory of one model).
        """
        from cai_ray.launcher import get_all

        buckets, _ = object_store_send(rebucket(named_tensors, bucket_bytes))
        live = [w for w in range(len(self.workers)) if self._deaths[w] <= self._cfg.max_restarts]
        get_all([self.workers[w].receive_weights_object_store.remote(buckets, version, self._step.seconds)
                 for w in live], timeout=self._step, names=[f"feedback worker {w}: load_weights" for w in live])
        self._weights = (buckets, version)

    def weight_versions(self) -> list[int]:
        """The weight version of each worker."""
        from cai_ray.launcher import get_all

        return get_all([w.weight_version.remote() for w in self.workers], timeout=self._control,
                       names=[f"feedback worker {i}: weight_version" for i in range(len(self.workers))])

    def wait_for_workers(self) -> list[int]:
        """Wait until no worker is restarting (each within the start-up deadline); returns the usable workers."""
        self._map([], lambda w, batch: None, lambda batch, why: None, until_recovered=True)
        return [w for w in range(len(self.workers)) if self._deaths[w] <= self._cfg.max_restarts]

    def in_flight(self) -> list[int]:
        """Calls on each worker, late ones still running included (for monitoring)."""
        return list(self._load)

    def shutdown(self) -> None:
        """Kill the workers and release their placement group."""
        from cai_ray.launcher import stop_actors

        stop_actors(self.workers, self._pg)
        self._late.calls.clear()

    # ------------------------------------------------------------------------------ dispatch
    def _map(self, items: list[T], call: Callable[[Any, list[T]], Any], failed: Callable[[list[T], str], R], *,
             until_recovered: bool = False) -> list[R]:
        """Run ``call(worker, batch)`` over all batches of ``items``; results in input order.

        Restarting workers are probed along the way; ``until_recovered`` also waits for all of them.
        """
        import ray

        run = _Run([items[i:i + self._cfg.batch_size] for i in range(0, len(items), self._cfg.batch_size)],
                   failed, self._cfg.max_retries, self.counters)
        in_flight: dict[Any, tuple[int, int, float, int]] = {}  # ref -> (worker, batch, deadline, seq)
        while run.queue or in_flight or (until_recovered and self._probes):
            self._late.reap(self._worker_died)
            self._dispatch(run, call, in_flight)
            if run.queue and not in_flight and not self._probes and not self._late.calls:
                run.fail_queued(f"all {len(self.workers)} feedback workers are gone "
                                f"(feedback.max_restarts={self._cfg.max_restarts})")
                break
            self._launch_probes()
            probe_refs = {p.ref: w for w, p in self._probes.items() if p.ref is not None}
            deadline = min([d for _, _, d, _ in in_flight.values()]
                           + [p.deadline if p.ref is not None else p.retry_at for p in self._probes.values()]
                           + [late.kill_at for late in self._late.calls.values()], default=0.0)
            timeout = max(0.0, deadline - time.monotonic())
            waitable = [*in_flight, *probe_refs, *self._late.calls]
            ready = ray.wait(waitable, num_returns=1, timeout=timeout)[0] if waitable else []
            if not waitable:  # only restarting workers, none with a probe out: wait for the next probe time
                time.sleep(timeout)
            for ref in ready:
                if ref in probe_refs:
                    self._probe_done(probe_refs[ref], ref)
                elif ref in in_flight:
                    self._collect(ref, in_flight.pop(ref), run)
            self._late.reap(self._worker_died, ready)
            self._expire(in_flight, run)
        return run.ordered()

    def _dispatch(self, run: _Run, call: Callable[[Any, list[Any]], Any],
                  in_flight: dict[Any, tuple[int, int, float, int]]) -> None:
        """Send queued batches to workers with a free slot."""
        while run.queue:
            w = self._pick(avoid=run.last_worker[run.queue[0]])
            if w is None:
                return
            b = run.queue.popleft()
            self._seq += 1
            in_flight[call(self.workers[w], run.batches[b])] = (w, b, time.monotonic() + self._step.seconds,
                                                                self._seq)
            self._load[w] += 1
            run.last_worker[b] = w

    def _collect(self, ref: Any, entry: tuple[int, int, float, int], run: _Run) -> None:
        """Record the outcome of a finished call."""
        import ray

        w, b, _, seq = entry
        self._load[w] -= 1
        try:
            run.results[b] = ray.get(ref, timeout=self._step.seconds)
        except ray.exceptions.RayActorError as err:
            self._worker_died(w, seq)
            run.retry_or_fail(b, f"feedback worker {w} died ({type(err).__name__})")
        except ray.exceptions.RayTaskError as err:  # a bug in the worker: deterministic, so no retry
            run.fail(b, f"feedback worker {w} failed: {err.cause!r}")
        except Exception as err:  # noqa: BLE001 - lost object, cancelled, ...: worth one more try
            run.retry_or_fail(b, f"feedback worker {w}: {type(err).__name__}: {err}")

    def _expire(self, in_flight: dict[Any, tuple[int, int, float, int]], run: _Run) -> None:
        """Retry calls past their deadline (they stay late, holding their slot); kill stuck workers and probes."""
        import ray

        now = time.monotonic()
        for ref, (w, b, deadline_b, seq) in list(in_flight.items()):
            if deadline_b <= now:
                del in_flight[ref]
                self.counters["timeouts"] += 1
                # Ray 2.60 runs a cancelled actor call anyway (even one still queued); its ref resolves when it
                # ends, and that is when the slot is freed. Its answer is dropped.
                ray.cancel(ref)
                self._late.calls[ref] = _Late(w, seq, kill_at=now + self._step.seconds)
                run.retry_or_fail(b, f"feedback worker {w}: no answer within {self._step}")
        for w in self._late.overdue(now, restart_s=self._startup.seconds):
            log.warning("feedback worker %d still runs a call %s past its deadline; restarting it", w, self._step)
            ray.kill(self.workers[w], no_restart=False)  # its calls now end with RayActorError
        for w, probe in list(self._probes.items()):
            if probe.deadline <= now:
                del self._probes[w]
                if probe.ref is not None:
                    ray.cancel(probe.ref)
                log.warning("feedback worker %d did not come back within %s; the pool stops using it",
                            w, self._startup)
                self._deaths[w] = self._cfg.max_restarts + 1

    def _pick(self, *, avoid: int | None) -> int | None:
        """The least-loaded usable worker with room, preferring one other than ``avoid`` (a retry's last worker)."""
        cap = self._cfg.max_in_flight_per_worker
        free = [w for w in range(len(self.workers))
                if self._deaths[w] <= self._cfg.max_restarts and w not in self._probes and self._load[w] < cap]
        if not free:
            return None
        preferred = [w for w in free if w != avoid] or free
        return min(preferred, key=lambda w: (self._load[w], w))

    def _worker_died(self, w: int, seq: int) -> None:
        """Count a death once (all batches in flight at that moment fail together) and start probing."""
        if seq <= self._death_seq[w]:
            return  # submitted before the death already counted
        self._death_seq[w] = self._seq
        self._deaths[w] += 1
        self.counters["worker_deaths"] += 1
        if self._deaths[w] > self._cfg.max_restarts:
            log.warning("feedback worker %d died %d times; the pool stops using it", w, self._deaths[w])
            self._probes.pop(w, None)
            return
        self._probes[w] = _Probe(deadline=time.monotonic() + self._startup.seconds)

    def _launch_probes(self) -> None:
        """Send the due probes: the restarted actor's first call reloads the last pushed weights (if any)."""
        now = time.monotonic()
        for w, probe in self._probes.items():
            if probe.ref is None and probe.retry_at <= now:
                worker = self.workers[w]
                replay = self._weights is not None and self.on_restart is None
                probe.ref = (worker.receive_weights_object_store.remote(*self._weights, self._startup.seconds)
                             if replay else worker.weight_version.remote())

    def _probe_done(self, w: int, ref: Any) -> None:
        import ray

        probe = self._probes[w]
        try:
            ray.get(ref, timeout=self._startup.seconds)
        except ray.exceptions.ActorUnavailableError:  # still restarting: ask again shortly
            probe.ref, probe.retry_at = None, time.monotonic() + _PROBE_INTERVAL_S
            return
        except ray.exceptions.RayActorError:  # died again while restarting
            del self._probes[w]
            self._worker_died(w, self._seq + 1)
            return
        except Exception as err:  # noqa: BLE001 - e.g. the weight reload failed: do not use a stale engine
            log.warning("feedback worker %d did not recover (%s); the pool stops using it", w, err)
            self._deaths[w] = self._cfg.max_restarts + 1
        else:
            if self.on_restart is not None:
                try:
                    self.on_restart(w)
                except Exception as err:  # noqa: BLE001 - a worker that cannot get current weights is not used
                    log.warning("feedback worker %d could not reload weights (%s); the pool stops using it", w, err)
                    self._deaths[w] = self._cfg.max_restarts + 1
        del self._probes[w]


@dataclass
class _Run:
    """The batches of one :meth:`FeedbackPool._map` call: what is queued, done, and how often each failed."""

    batches: list[list[Any]]
    failed: Callable[[list[Any], str], Any]  # the item-error result of a batch that gave up
    max_retries: int
    counters: dict[str, int]  # the pool's counters
    results: dict[int, Any] = field(default_factory=dict)
    queue: deque[int] = field(default_factory=deque)
    failures: list[int] = field(default_factory=list)
    last_worker: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queue.extend(range(len(self.batches)))
        self.failures = [0] * len(self.batches)
        self.last_worker = [None] * len(self.batches)
        self.counters["batches"] += len(self.batches)

    def retry_or_fail(self, b: int, why: str) -> None:
        """Queue batch ``b`` again (first: it has waited longest), or give up after ``max_retries``."""
        self.failures[b] += 1
        if self.failures[b] <= self.max_retries:
            self.counters["retried_batches"] += 1
            self.queue.appendleft(b)
        else:
            self.fail(b, f"{why}; gave up after {self.failures[b]} attempts")

    def fail(self, b: int, why: str) -> None:
        """Batch ``b`` ends as item errors."""
        self.counters["failed_batches"] += 1
        self.results[b] = self.failed(self.batches[b], why)

    def fail_queued(self, why: str) -> None:
        """Every queued batch ends as item errors."""
        while self.queue:
            self.fail(self.queue.popleft(), why)

    def ordered(self) -> list[Any]:
        """Results in batch order."""
        return [self.results[b] for b in range(len(self.batches))]


class _LateCalls:
    """Calls past their deadline that may still run: each keeps its worker's slot in ``load`` until it ends.

    (``ray.cancel`` does not stop an actor call: measured on Ray 2.60, even a still-queued one runs, and its
    ref resolves only when the call ends.)
    """

    def __init__(self, load: list[int]) -> None:
        self.load = load  # the pool's per-worker call counts (shared)
        self.calls: dict[Any, _Late] = {}

    def reap(self, on_death: Callable[[int, int], None], ready: Sequence[Any] | None = None) -> None:
        """Free the slots of late calls that have ended (of ``ready``, or any); one ended by its actor's death
        is reported as ``on_death(worker, seq)``."""
        import ray

        if ready is None:
            ready = ray.wait(list(self.calls), num_returns=len(self.calls), timeout=0)[0] if self.calls else []
        for ref in [r for r in ready if r in self.calls]:
            late = self.calls.pop(ref)
            self.load[late.worker] -= 1
            died = late.killed  # a killed call may still end as "cancelled"
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                died = True
            except Exception:  # noqa: BLE001, S110 - cancelled or failed: its batch was already retried
                pass
            if died:
                on_death(late.worker, late.seq)

    def overdue(self, now: float, *, restart_s: float) -> list[int]:
        """Workers to restart: a late call of theirs still runs at its ``kill_at``.

        A call still not ended ``restart_s`` after its worker was killed is given up on (its slot freed).
        """
        stuck = []
        for ref, late in list(self.calls.items()):
            if late.kill_at > now:
                continue
            if late.killed:
                del self.calls[ref]
                self.load[late.worker] -= 1
            else:
                late.killed, late.kill_at = True, now + restart_s
                stuck.append(late.worker)
        return sorted(set(stuck))


@dataclass
class _Late:
    """A call past its deadline that may still run on its worker: it holds the worker's slot until it ends."""

    worker: int
    seq: int
    kill_at: float  # still running then: the worker is stuck and is restarted (after that: given up on)
    killed: bool = False


@dataclass
class _Probe:
    """A worker that died: when to give up on it, and the probe call out (None while waiting to retry)."""

    deadline: float
    ref: Any = None
    retry_at: float = 0.0


def start_feedback_pool(model: ModelConfig, feedback: FeedbackConfig, constitution: ConstitutionConfig,
                        data: DataConfig, cluster: ClusterConfig, *, seed: int = 0) -> FeedbackPool:
    """Start ``feedback.num_workers`` FeedbackWorker actors in one placement group; wait until they are up.

    All workers share ``seed``, so any worker (or a retry) draws the same principles and sampling seeds for an
    item (labels equal within ``labels.CROSS_CALL_TOLERANCE``).
    """
    workers, pg = start_engine_actors(
        FeedbackWorker, role="feedback", num_workers=feedback.num_workers, engine=feedback.engine,
        resources=feedback.resources, cluster=cluster, max_restarts=feedback.max_restarts,
        args=lambda i: ((model, feedback, constitution, data), {"seed": seed}))
    return FeedbackPool(workers, feedback, cluster, placement_group=pg)
