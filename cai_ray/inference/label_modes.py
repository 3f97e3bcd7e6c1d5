"""The label modes as small functions over two engine primitives: score options, and generate.

:class:`Primitives` owns the engine calls. ``score`` returns, for each rendered prompt, the log-probs of
given option continuations, all prompts in one batched engine call (identical prompts scored once);
``generate`` samples one seeded continuation per prompt. Both return an item's error in its place instead
of failing the batch (:func:`_isolated`). On them:

- :func:`multiple_choice`: P(first-listed option) of each :class:`ScoringJob` (the "(A)/(B)" question; a
  yes/no judgement is the same question with "(A) Yes (B) No");
- :func:`chain_of_thought`: generate the reasoning, append :data:`ANSWER_PREFIX`, then as multiple choice;
- :func:`ratings`: the expected 1-10 rating of each prompt, rescaled to [-1, 1] (d-RLAIF direct scores).

:func:`by_item` then gathers one request's job scores (its first error wins) and :func:`pair_label` /
:func:`position_bias` turn them into a soft label (``labels.preference_label``: swap-debiased, exact on its
grid). A tokenizer without single tokens for "A"/"B" falls back to scoring the strings "A)" / "B)".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from cai_ray.constitution import ANSWER_PREFIX
from cai_ray.inference.engine import Engine, PromptRejected
from cai_ray.inference.labels import RATINGS, clamp, expected_rating_score, mean, option_probability, preference_label

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

# Without a chat template the model would go on to write the next human turn.
STOP = ("\n\nHuman:",)


@dataclass(frozen=True)
class ScoringJob:
    """One rendered prompt to score: request ``item`` of a batch, under its ``principle``-th principle, in one order."""

    item: int  # index of the request in its batch
    item_id: str  # the request's id (error messages, sampling seeds)
    principle: int  # index into the request's principles (0 for a yes/no judgement)
    swapped: bool  # the swapped order: the pair shown as (B, A); a judgement's options as "(A) No (B) Yes"
    prompt: str  # the rendered prompt


@dataclass
class ItemScores:
    """One request's job scores in job order: P(first listed) per principle, the two orders apart."""

    ab: list[float] = field(default_factory=list)  # shown as (A, B)
    ba: list[float] = field(default_factory=list)  # shown as (B, A); empty without swap-debiasing
    error: Exception | None = None  # the first job that failed


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


def error_text(err: Exception) -> str:
    """An item error as its label's ``error`` text."""
    return str(err) if isinstance(err, PromptRejected) else f"engine failed: {type(err).__name__}: {err}"


class Primitives:
    """The two engine primitives every label mode is built from; each returns an item's error in its place."""

    def __init__(self, engine: Engine, *, temperature: float) -> None:
        self.engine = engine
        self.temperature = temperature  # sampling temperature of critiques, revisions and CoT
        self.options = list(option_continuations(engine.encode))  # "A", "B"
        self.ratings = [engine.encode(f"{r})") for r in RATINGS]  # "1)" ... "10)": exclusive events

    def score(self, texts: Sequence[tuple[str, str]], options: Sequence[list[int]]) -> list[list[float] | Exception]:
        """Log-probs of each of ``options`` after each (item id, rendered prompt), in one engine call."""
        results = self._encode_all(texts, max(len(o) for o in options))
        # Identical prompts (a pair and its swapped twin in one call) are scored once, so their labels come from
        # the same floats and label(B, A) == 1 - label(A, B) exactly within one call (see labels.py).
        unique = list(dict.fromkeys(tuple(ids) for ids in results if not isinstance(ids, Exception)))
        scores = dict(zip(unique, _isolated(
            lambda batch: self.engine.score([list(ids) for ids in batch], [list(options)] * len(batch)), unique)))
        return [ids if isinstance(ids, Exception) else scores[tuple(ids)] for ids in results]

    def generate(self, texts: Sequence[tuple[str, str]], seeds: Sequence[int], max_new_tokens: int,
                 stop: Sequence[str] = STOP) -> list[str | Exception]:
        """One sampled continuation (stripped text) per (item id, rendered prompt), or the item's error."""
        results: list = self._encode_all(texts, 1)  # generation is cut to the context that is left
        jobs = [(i, ids) for i, ids in enumerate(results) if not isinstance(ids, Exception)]
        outs = _isolated(
            lambda batch: [c[0].text.strip() for c in self.engine.generate(
                [ids for _, ids in batch], n=1, max_new_tokens=max_new_tokens, temperature=self.temperature,
                seeds=[seeds[i] for i, _ in batch], stop=stop)],
            jobs,
        )
        for (i, _), out in zip(jobs, outs):
            results[i] = out
        return results

    def _encode_all(self, texts: Sequence[tuple[str, str]], room: int) -> list[list[int] | Exception]:
        """Token ids of each (item id, rendered prompt) leaving ``room`` tokens of context, or its PromptRejected."""
        encoded: list[list[int] | Exception] = []
        limit = self.engine.max_model_len
        for item_id, text in texts:
            ids = self.engine.encode(text)
            if len(ids) + room > limit:
                encoded.append(PromptRejected(
                    f"item '{item_id}': feedback prompt of {len(ids)} tokens + {room} new tokens exceeds "
                    f"max_model_len={limit}; lower constitution.num_few_shot, shorten the responses, or raise the "
                    "feedback model's max_model_len"))
            else:
                encoded.append(ids)
        return encoded


# ------------------------------------------------------------------------------------------ modes
def multiple_choice(primitives: Primitives, jobs: Sequence[ScoringJob]) -> list[float | Exception]:
    """P(first-listed option) of each job's prompt (ending with :data:`ANSWER_PREFIX`), in one scoring call."""
    scores = primitives.score([(j.item_id, j.prompt) for j in jobs], primitives.options)
    return [s if isinstance(s, Exception) else option_probability(*s) for s in scores]


def chain_of_thought(primitives: Primitives, jobs: Sequence[ScoringJob], *, seeds: Sequence[int],
                     max_new_tokens: int) -> tuple[list[float | Exception], list[str]]:
    """Generate each job's reasoning (one seed per job), then score the answer after it as :func:`multiple_choice`.

    Returns the scores and the reasoning texts, aligned with ``jobs``. A request whose reasoning failed for any
    of its jobs is not scored: all its jobs carry that (first) generation error.
    """
    thoughts = primitives.generate([(j.item_id, j.prompt) for j in jobs], seeds, max_new_tokens,
                                   stop=(ANSWER_PREFIX, *STOP))
    failed: dict[int, Exception] = {}
    for job, thought in zip(jobs, thoughts):
        if isinstance(thought, Exception):
            failed.setdefault(job.item, thought)
    answers = [replace(j, prompt=f"{j.prompt} {t}\n{ANSWER_PREFIX}") for j, t in zip(jobs, thoughts)
               if j.item not in failed]
    scored = iter(multiple_choice(primitives, answers))
    scores = [failed[j.item] if j.item in failed else next(scored) for j in jobs]
    return scores, [t if isinstance(t, str) else "" for t in thoughts]


def ratings(primitives: Primitives, jobs: Sequence[ScoringJob]) -> list[float | Exception]:
    """d-RLAIF: the expected 1-10 rating of each job's prompt (ending with a rating prefix), rescaled to [-1, 1]."""
    scores = primitives.score([(j.item_id, j.prompt) for j in jobs], primitives.ratings)
    return [s if isinstance(s, Exception) else expected_rating_score(s) for s in scores]


# ------------------------------------------------------------------------------------------ labels
def by_item(jobs: Sequence[ScoringJob], scores: Sequence[float | Exception]) -> dict[int, ItemScores]:
    """The scores of each request (by batch index), principles in job order; its first error, if any."""
    out: dict[int, ItemScores] = {}
    for job, score in zip(jobs, scores):
        item = out.setdefault(job.item, ItemScores())
        if isinstance(score, Exception):
            item.error = item.error or score
        else:
            (item.ba if job.swapped else item.ab).append(score)
    return out


def pair_label(scores: ItemScores, *, band: tuple[float, float] | None,
               principles: Sequence[int] | None = None) -> float:
    """The soft label from ``principles`` (indices; all if None), swap-debiased when both orders were scored.

    ``band``: the CoT clamp (``feedback.cot_clamp``), None for plain multiple choice.
    """
    ks = range(len(scores.ab)) if principles is None else principles
    prob = preference_label([scores.ab[k] for k in ks], [scores.ba[k] for k in ks] if scores.ba else None)
    return prob if band is None else clamp(prob, band)


def position_bias(scores: ItemScores) -> float | None:
    """Mean P(first-listed option) over both orders, minus 0.5 (None without swap-debiasing)."""
    if not scores.ba:
        return None
    return mean([(ab + ba) / 2 - 0.5 for ab, ba in zip(scores.ab, scores.ba)])
