"""Constitutional feedback: FeedbackWorker (one engine) and :func:`start_feedback_pool` (N of them as actors).

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

Per-axis labels (``feedback.label_axes``, and the judge check's one-axis requests) ask the principle's
question *after* the two responses (``constitution.Layout``): the prompts of one pair on K axes then share
the conversation and both responses as a prefix, and vLLM computes each order's prefix once, not K times.

Bad input never fails a batch: an empty or over-long prompt, identical responses or a prompt that does
not fit the context come back as an item error (labels 0.5 with ``error`` set; rejected chains); if the
engine still fails on a batch, the items are redone one by one to isolate the bad one. A tokenizer
without single tokens for "A"/"B" falls back to scoring the option strings "A)" / "B)".

The label modes are small functions over two primitives (:mod:`cai_ray.inference.label_modes`); the pool
that spreads batches over N of these workers is :mod:`cai_ray.inference.feedback_pool`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from cai_ray.algorithms.aggregation import aggregate_label, axis_weights
from cai_ray.backend import enter_role
from cai_ray.config import ClusterConfig, ConstitutionConfig, DataConfig, FeedbackConfig, ModelConfig
from cai_ray.constitution import (
    Constitution,
    ConstitutionError,
    Principle,
    comparison_prompt,
    cot_comparison_prompt,
    critique_prompt,
    judge_prompt,
    load_constitution,
    rating_prompt,
    render_chat,
    revision_prompt,
)
from cai_ray.inference.engine import Engine, EngineWeights, PromptRejected, fit_prompt, start_engine_actors
from cai_ray.inference.feedback_pool import FeedbackPool
from cai_ray.inference.label_modes import (
    ItemScores,
    Primitives,
    ScoringJob,
    by_item,
    chain_of_thought,
    error_text,
    multiple_choice,
    pair_label,
    position_bias,
    ratings,
)
from cai_ray.inference.labels import mean
from cai_ray.seeds import stable_seed
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


def _axes(principles: Sequence[Principle]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(axis for p in principles for axis in p.axes))


def _failed(req: ComparisonRequest, mode: str, error: str) -> PreferenceLabel:
    return PreferenceLabel(req.pair_id, 0.5, (), (), (), mode, error=error)


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
        self._primitives = Primitives(self._engine, temperature=feedback.temperature)
        self._label_axes = self._constitution.label_axes(feedback.label_axes, self._tiers)
        self._axis_ranks = {a: self._constitution.axis_tier_rank(a) for a in self._label_axes}
        if self._label_axes:  # a weighted rule missing an axis's weight fails here, not mid-run
            axis_weights(list(self._label_axes), mode=feedback.aggregation.mode, weights=feedback.aggregation.weights,
                         ranks=self._axis_ranks, decay=feedback.aggregation.decay)

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
            outs = self._primitives.generate([(d.prompt.id, t) for d, t in zip(drafts, texts)],
                                             [stable_seed(self._seed, kind, d.prompt.id, round_) for d in drafts],
                                             cfg.critique_max_new_tokens)
            for d, out in zip(drafts, outs):
                if isinstance(out, Exception):
                    rejected.append(RejectedItem(d.prompt.id, f"{kind} round {round_}: {error_text(out)}"))
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
        labels: dict[int, PreferenceLabel] = {}  # requests that could not be asked, by batch index
        jobs, principles = self._comparison_jobs(requests, mode, labels)
        thoughts: list[str] = []
        if mode == "cot":
            seeds = [stable_seed(self._seed, "cot", j.item_id, j.principle, j.swapped) for j in jobs]
            scores, thoughts = chain_of_thought(self._primitives, jobs, seeds=seeds,
                                                max_new_tokens=self._cfg.cot_max_new_tokens)
        else:
            scores = multiple_choice(self._primitives, jobs)
        per_item = by_item(jobs, scores)
        reasoning: dict[int, list[str]] = {}
        for job, thought in zip(jobs, thoughts):
            reasoning.setdefault(job.item, []).append(thought)
        for i, req in enumerate(requests):
            if i not in labels:
                text = "\n---\n".join(reasoning[i]) if mode == "cot" else None
                labels[i] = self._choice_label(req, mode, principles[i], per_item[i], text)
        return [labels[i] for i in range(len(requests))]

    def direct_scores(self, requests: Sequence[ScoreRequest]) -> list[DirectScore]:
        """d-RLAIF: expected 1-10 rating rescaled to [-1, 1], averaged over the sampled principles."""
        scored = self._rate([(r.item_id, r.prompt, r.response) for r in requests])
        return [DirectScore(item_id=r.item_id, score=value, principle_ids=tuple(p.id for p in principles), error=error)
                for r, (value, principles, error) in zip(requests, scored)]

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """P(yes) to each request's yes/no question about its response, aligned with ``requests``.

        Asked as "(A) Yes (B) No" and, with ``swap_debias``, also as "(A) No (B) Yes"; every order of every
        request is scored in one call and the two orders are averaged (:func:`label_modes.pair_label`).
        """
        tok = self._engine.tokenizer
        orders = (False, True) if self._cfg.swap_debias else (False,)
        out: dict[int, Judgement] = {}
        jobs: list[ScoringJob] = []
        for i, req in enumerate(requests):
            try:
                user = self._user_text(req.item_id, req.prompt)
            except PromptRejected as err:
                out[i] = Judgement(req.item_id, 0.5, error=str(err))
                continue
            jobs += [ScoringJob(i, req.item_id, 0, swapped, judge_prompt(
                tok, question=req.question, prompt=user, response=req.response, yes_first=not swapped))
                for swapped in orders]
        per_item = by_item(jobs, multiple_choice(self._primitives, jobs))
        for i, req in enumerate(requests):
            if i not in out:
                scores = per_item[i]
                out[i] = (Judgement(req.item_id, 0.5, error=error_text(scores.error)) if scores.error else
                          Judgement(req.item_id, pair_label(scores, band=None)))
        return [out[i] for i in range(len(requests))]

    # --------------------------------------------------------------------------- comparisons
    def _comparison_jobs(self, requests: Sequence[ComparisonRequest], mode: str, labels: dict[int, PreferenceLabel],
                         ) -> tuple[list[ScoringJob], dict[int, list[Principle]]]:
        """One job per (request, principle, order) and each request's principles; a request that cannot be
        asked gets its error label in ``labels`` instead."""
        tok, orders = self._engine.tokenizer, ((False, True) if self._cfg.swap_debias else (False,))
        render = cot_comparison_prompt if mode == "cot" else comparison_prompt
        jobs: list[ScoringJob] = []
        principles: dict[int, list[Principle]] = {}
        for i, req in enumerate(requests):
            try:
                user = self._check_pair(req)
                principles[i] = self._comparison_principles(req)
            except (PromptRejected, ConstitutionError) as err:
                labels[i] = _failed(req, mode, str(err))
                continue
            # Per-axis: the question after the responses, so the K axes' prompts of a pair share them as a prefix.
            layout = "question_last" if req.axis or self._label_axes else "question_first"
            for k, principle in enumerate(principles[i]):
                for swapped in orders:
                    first, second = (req.response_b, req.response_a) if swapped else (req.response_a, req.response_b)
                    text = render(tok, self._constitution, principle, prompt=user, response_a=first,
                                  response_b=second, num_few_shot=self._num_few_shot, layout=layout)
                    jobs.append(ScoringJob(i, req.pair_id, k, swapped, text))
        return jobs, principles

    def _choice_label(self, req: ComparisonRequest, mode: str, principles: list[Principle], scores: ItemScores,
                      reasoning: str | None) -> PreferenceLabel:
        """The label of one request from its scores: per axis (one principle each) and aggregated, or the
        ensemble's mean."""
        if scores.error is not None:
            return _failed(req, mode, error_text(scores.error))
        band = self._cfg.cot_clamp if mode == "cot" else None  # CoT answers are over-confident
        axes = (req.axis,) if req.axis else self._label_axes
        axis_probs = {a: pair_label(scores, band=band, principles=[k]) for k, a in enumerate(axes)} or None
        if axis_probs and not req.axis:
            agg = self._cfg.aggregation
            prob = aggregate_label(axis_probs, mode=agg.mode, weights=agg.weights, ranks=self._axis_ranks,
                                   margin=agg.margin, decay=agg.decay)
        else:
            prob = pair_label(scores, band=band)
        return PreferenceLabel(req.pair_id, prob, tuple(p.id for p in principles), tuple(p.tier for p in principles),
                               axes or _axes(principles), mode, reasoning=reasoning, axis_probs=axis_probs,
                               position_bias=position_bias(scores))

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

    def _label_direct(self, requests: Sequence[ComparisonRequest]) -> list[PreferenceLabel]:
        """Pair labels from direct scores of each response under the same principles."""
        out: list[PreferenceLabel] = []
        items: list[tuple[str, str, str]] = []
        errors: dict[int, str] = {}
        for i, req in enumerate(requests):
            try:
                self._check_pair(req)
            except PromptRejected as err:
                errors[i] = str(err)
                continue
            # Both responses share the pair id, hence the same sampled principles.
            items += [(req.pair_id, req.prompt, req.response_a), (req.pair_id, req.prompt, req.response_b)]
        rated = iter(self._rate(items))
        for i, req in enumerate(requests):
            if i in errors:
                out.append(_failed(req, "direct", errors[i]))
                continue
            (sa, principles, ea), (sb, _, eb) = next(rated), next(rated)
            prob = 0.5 + (sa - sb) / 4.0  # scores in [-1, 1] -> a probability in [0, 1]
            out.append(PreferenceLabel(req.pair_id, prob if not (ea or eb) else 0.5, tuple(p.id for p in principles),
                                       tuple(p.tier for p in principles), _axes(principles), "direct",
                                       error=ea or eb))
        return out

    def _rate(self, items: Sequence[tuple[str, str, str]]) -> list[tuple[float, list[Principle], str | None]]:
        """(score, principles, error) per (item id, prompt, response); an item that fails reports no principles."""
        tok = self._engine.tokenizer
        results: dict[int, tuple[float, list[Principle], str | None]] = {}
        jobs: list[ScoringJob] = []
        principles: dict[int, list[Principle]] = {}
        for i, (item_id, prompt, response) in enumerate(items):
            try:
                if not response.strip():
                    raise PromptRejected(f"item '{item_id}': empty response")
                user = self._user_text(item_id, prompt)
            except PromptRejected as err:
                results[i] = (0.0, [], str(err))
                continue
            principles[i] = self._principles("comparison", item_id, 0, self._cfg.num_principles_per_label)
            jobs += [ScoringJob(i, item_id, k, False, rating_prompt(tok, p, prompt=user, response=response))
                     for k, p in enumerate(principles[i])]
        for i, scores in by_item(jobs, ratings(self._primitives, jobs)).items():
            results[i] = ((0.0, [], error_text(scores.error)) if scores.error else
                          (mean(scores.ab), principles[i], None))
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
