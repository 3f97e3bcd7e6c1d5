"""Constitutions: load and validate the YAML format, sample principles, render the feedback prompts.

The prompt kinds follow Bai et al. 2022 (arXiv 2212.08073):
- critique: the conversation, then a critique request drawn from one principle;
- revision: the critique, then the matching revision request;
- comparison: a multiple-choice question "(A)/(B)" whose next token is the option letter, so a soft
  label is the normalised probability of "A" vs "B";
- CoT comparison: the same question answered after "Let's think step by step"; the answer is scored
  once the reasoning is generated.
A comparison asks its question before the options (the paper's layout) or, for per-axis labels, after them
(:data:`Layout`). Two more renderers serve the feedback model: a 1-10 rating of one response (d-RLAIF direct
scores) and a yes/no question about one response (evaluation judgements).
Everything goes through the model's chat template when it has one, else the paper's Human/Assistant format.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SHIPPED_DIR = Path(__file__).parent / "constitutions"
ANSWER_PREFIX = "The answer is: ("
COT_TRIGGER = "Let's think step by step:"
RATING_PREFIX = "The rating is: ("

Stage = Literal["critique", "comparison"]
# Where a comparison puts the principle's question. "question_first" (the paper's): question, then the options.
# "question_last": the options, then the question, so the prompts of one pair under many principles share the
# whole conversation and both responses as a prefix (vLLM's prefix cache computes it once per order); used for
# per-axis labels and the judge check.
Layout = Literal["question_first", "question_last"]


class ConstitutionError(ValueError):
    """An invalid constitution file; the message names the file, the key path and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = Field(min_length=1)


class Axis(_Strict):
    """A behavioural axis the constitution's principles target (declared once, referenced by principles)."""

    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = Field(min_length=1)


class Principle(_Strict):
    """One principle: SL-stage critique/revision requests and/or an RL-stage comparison question."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    tier: str
    axes: tuple[str, ...] = Field(min_length=1)
    critique: str | None = Field(None, min_length=1)
    revision: str | None = Field(None, min_length=1)
    comparison: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _stages(self) -> Principle:
        if (self.critique is None) != (self.revision is None):
            raise ValueError("critique and revision come as a pair: give both or neither")
        if self.critique is None and self.comparison is None:
            raise ValueError("a principle needs critique+revision, comparison, or both")
        return self


class CritiqueRevisionExample(_Strict):
    principle: str
    prompt: str
    response: str
    critique: str
    revision: str


class ComparisonExample(_Strict):
    principle: str
    prompt: str
    response_a: str
    response_b: str
    answer: Literal["A", "B"]


class CotComparisonExample(ComparisonExample):
    reasoning: str


class FewShot(_Strict):
    critique_revision: tuple[CritiqueRevisionExample, ...] = ()
    comparison: tuple[ComparisonExample, ...] = ()
    cot_comparison: tuple[CotComparisonExample, ...] = ()


class Constitution(_Strict):
    """A validated constitution. Tiers are ordered, highest priority first; axes are declared once."""

    name: str = Field(min_length=1)
    description: str = ""
    axes: tuple[Axis, ...] = Field(min_length=1)
    tiers: tuple[Tier, ...] = Field(min_length=1)
    principles: tuple[Principle, ...] = Field(min_length=1)
    few_shot: FewShot = FewShot()

    @model_validator(mode="after")
    def _references(self) -> Constitution:
        tier_ids = [t.id for t in self.tiers]
        _unique(tier_ids, "tiers")
        axis_ids = [a.id for a in self.axes]
        _unique(axis_ids, "axes")
        _unique([p.id for p in self.principles], "principles")
        by_id = {p.id: p for p in self.principles}
        for i, p in enumerate(self.principles):
            if p.tier not in tier_ids:
                raise ValueError(f"principles.{i}.tier: '{p.tier}' is not a tier id (tiers: {', '.join(tier_ids)})")
            for j, axis in enumerate(p.axes):
                if axis not in axis_ids:
                    raise ValueError(f"principles.{i}.axes.{j}: principle '{p.id}' names axis '{axis}', which the "
                                     f"constitution does not declare (declare it under the top-level axes: "
                                     f"{', '.join(axis_ids)})")
        kinds = (("critique_revision", "critique"), ("comparison", "comparison"), ("cot_comparison", "comparison"))
        for kind, needed in kinds:
            for i, ex in enumerate(getattr(self.few_shot, kind)):
                where = f"few_shot.{kind}.{i}.principle"
                principle = by_id.get(ex.principle)
                if principle is None:
                    raise ValueError(f"{where}: '{ex.principle}' is not a principle id")
                if getattr(principle, needed) is None:
                    raise ValueError(f"{where}: principle '{ex.principle}' has no {needed} text")
        return self

    # ---------------------------------------------------------------------------- principles
    def tier_rank(self, tier_id: str) -> int:
        """0 for the highest-priority tier."""
        return [t.id for t in self.tiers].index(tier_id)

    @property
    def axis_ids(self) -> tuple[str, ...]:
        """The declared axes, in declaration order."""
        return tuple(a.id for a in self.axes)

    def axis_tier_rank(self, axis: str) -> int:
        """The rank of the highest-priority tier with a comparison principle on ``axis`` (0 = highest)."""
        ranks = [self.tier_rank(p.tier) for p in self.principles if axis in p.axes and p.comparison is not None]
        if not ranks:
            raise ConstitutionError(f"constitution '{self.name}': no comparison principle targets axis '{axis}'")
        return min(ranks)

    def label_axes(self, chosen: str | list[str], tiers: list[str] | None = None) -> tuple[str, ...]:
        """The axes to label per pair (``feedback.label_axes``): ``'none'`` -> (), ``'all'`` or a list of ids.

        Each axis needs a comparison principle in ``tiers``; the error names the axis and the fix.
        """
        if chosen == "none":
            return ()
        axes = self.axis_ids if chosen == "all" else tuple(chosen)
        unknown = [a for a in axes if a not in self.axis_ids]
        if unknown:
            raise ConstitutionError(f"feedback.label_axes: {unknown} not declared by constitution '{self.name}' "
                                    f"(axes: {', '.join(self.axis_ids)})")
        pool = self.principles_for("comparison", tiers)
        bare = [a for a in axes if not any(a in p.axes for p in pool)]
        if bare:
            raise ConstitutionError(f"feedback.label_axes: constitution '{self.name}' has no comparison principle "
                                    f"for axis/axes {bare} in tiers {tiers}; list the axes explicitly or widen tiers")
        return axes

    def principles_for(self, stage: Stage, tiers: list[str] | None = None) -> list[Principle]:
        """Principles usable at ``stage`` ('critique' or 'comparison'), optionally only from ``tiers``."""
        if tiers is not None:
            unknown = sorted(set(tiers) - {t.id for t in self.tiers})
            if unknown:
                raise ConstitutionError(
                    f"constitution '{self.name}': unknown tier(s) {unknown}; known: {[t.id for t in self.tiers]}"
                )
        chosen = [p for p in self.principles if getattr(p, stage) is not None and (tiers is None or p.tier in tiers)]
        if not chosen:
            raise ConstitutionError(f"constitution '{self.name}': no {stage} principles in tiers {tiers}")
        return chosen

    def sample_principles(
        self, rng: random.Random, stage: Stage, k: int = 1, tiers: list[str] | None = None
    ) -> list[Principle]:
        """Draw ``k`` distinct principles (with replacement if fewer exist) using the caller's seeded RNG."""
        pool = self.principles_for(stage, tiers)
        return rng.sample(pool, k) if k <= len(pool) else [rng.choice(pool) for _ in range(k)]


def _unique(ids: list[str], where: str) -> None:
    seen: set[str] = set()
    for i, x in enumerate(ids):
        if x in seen:
            raise ValueError(f"{where}.{i}.id: duplicate id '{x}'")
        seen.add(x)


def shipped_constitutions() -> list[str]:
    """Names of the constitutions shipped with the package."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def resolve_path(ref: str) -> Path:
    """A file path, or the name of a shipped constitution."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = SHIPPED_DIR / f"{ref}.yaml"
    if shipped.is_file():
        return shipped
    raise ConstitutionError(
        f"constitution '{ref}': no such file, and not a shipped name ({', '.join(shipped_constitutions())})"
    )


def load_constitution(ref: str | Path) -> Constitution:
    """Load and validate a constitution from a YAML path or shipped name."""
    path = resolve_path(str(ref))
    if not path.is_file():
        raise ConstitutionError(f"{path}: constitution file not found")
    try:
        tree: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConstitutionError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConstitutionError(f"{path}: the top level must be a mapping with name, tiers, principles")
    try:
        return Constitution.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (see constitutions/README.md for the format)"
            lines.append(f"{path}: {loc + ': ' if loc else ''}{msg}")
        raise ConstitutionError("invalid constitution:\n  " + "\n  ".join(lines)) from None


# ---------------------------------------------------------------------------------- rendering
Message = dict[str, str]


def render_chat(tokenizer: Any | None, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
    """Render messages with the tokenizer's chat template, or the paper's Human/Assistant format."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = []
    for m in messages:
        role = {"user": "Human", "assistant": "Assistant", "system": "System"}[m["role"]]
        parts.append(f"\n\n{role}: {m['content']}")
    if add_generation_prompt:
        parts.append("\n\nAssistant:")
    return "".join(parts).lstrip()


def _critique_turns(prompt: str, response: str, principle: Principle, critique: str | None,
                    revision: str | None) -> list[Message]:
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response},
             {"role": "user", "content": f"Critique request: {principle.critique}"}]
    if critique is not None:
        turns.append({"role": "assistant", "content": f"Critique: {critique}"})
        turns.append({"role": "user", "content": f"Revision request: {principle.revision}"})
    if revision is not None:
        turns.append({"role": "assistant", "content": f"Revision: {revision}"})
    return turns


def _few_shot_critiques(constitution: Constitution, num_few_shot: int) -> list[Message]:
    by_id = {p.id: p for p in constitution.principles}
    turns: list[Message] = []
    for ex in constitution.few_shot.critique_revision[:num_few_shot]:
        turns += _critique_turns(ex.prompt, ex.response, by_id[ex.principle], ex.critique, ex.revision)
    return turns


def critique_prompt(tokenizer: Any | None, constitution: Constitution, principle: Principle, *, prompt: str,
                    response: str, num_few_shot: int) -> str:
    """The prompt whose continuation is the critique of ``response`` under ``principle``.

    ``num_few_shot`` is ``constitution.num_few_shot`` of the config: the worked examples put in front.
    """
    turns = _few_shot_critiques(constitution, num_few_shot) + _critique_turns(prompt, response, principle, None, None)
    return render_chat(tokenizer, turns) + "Critique:"


def revision_prompt(tokenizer: Any | None, constitution: Constitution, principle: Principle, *, prompt: str,
                    response: str, critique: str, num_few_shot: int) -> str:
    """The prompt whose continuation is the revised response (``num_few_shot`` as in :func:`critique_prompt`)."""
    turns = _few_shot_critiques(constitution, num_few_shot)
    turns += _critique_turns(prompt, response, principle, critique, None)
    return render_chat(tokenizer, turns) + "Revision:"


_CONVERSATION = "Consider the following conversation between a human and an assistant:\n"


def _question(prompt: str, principle: Principle, response_a: str, response_b: str, layout: Layout) -> str:
    options = f"Options:\n(A) {response_a}\n(B) {response_b}"
    if layout == "question_last":
        return f"{_CONVERSATION}Human: {prompt}\n\n{options}\n\n{principle.comparison}"
    return f"{_CONVERSATION}Human: {prompt}\n\n{principle.comparison}\n{options}"


def _comparison_few_shot(constitution: Constitution, num_few_shot: int, *, layout: Layout,
                         reasoning: bool) -> list[Message]:
    by_id = {p.id: p for p in constitution.principles}
    examples = constitution.few_shot.cot_comparison if reasoning else constitution.few_shot.comparison
    turns: list[Message] = []
    for ex in examples[:num_few_shot]:
        question = _question(ex.prompt, by_id[ex.principle], ex.response_a, ex.response_b, layout)
        thought = f"{COT_TRIGGER} {ex.reasoning}\n" if reasoning else ""
        turns.append({"role": "user", "content": question})
        turns.append({"role": "assistant", "content": f"{thought}{ANSWER_PREFIX}{ex.answer})"})
    return turns


def comparison_prompt(tokenizer: Any | None, constitution: Constitution, principle: Principle, *, prompt: str,
                      response_a: str, response_b: str, num_few_shot: int,
                      layout: Layout = "question_first") -> str:
    """The multiple-choice prompt; its next token is the option letter ("A" or "B").

    ``num_few_shot`` is ``constitution.num_few_shot`` of the config. ``layout``: see :data:`Layout`.
    """
    turns = _comparison_few_shot(constitution, num_few_shot, layout=layout, reasoning=False)
    turns.append({"role": "user", "content": _question(prompt, principle, response_a, response_b, layout)})
    return render_chat(tokenizer, turns) + ANSWER_PREFIX


def cot_comparison_prompt(tokenizer: Any | None, constitution: Constitution, principle: Principle, *, prompt: str,
                          response_a: str, response_b: str, num_few_shot: int,
                          layout: Layout = "question_first") -> str:
    """The chain-of-thought prompt; generate the reasoning, then append :data:`ANSWER_PREFIX` and score.

    ``num_few_shot`` and ``layout`` as in :func:`comparison_prompt`.
    """
    turns = _comparison_few_shot(constitution, num_few_shot, layout=layout, reasoning=True)
    turns.append({"role": "user", "content": _question(prompt, principle, response_a, response_b, layout)})
    return render_chat(tokenizer, turns) + COT_TRIGGER


def rating_prompt(tokenizer: Any | None, principle: Principle, *, prompt: str, response: str) -> str:
    """The d-RLAIF prompt: rate one response 1-10 against the principle's question; ends with :data:`RATING_PREFIX`."""
    question = (
        f"{_CONVERSATION}Human: {prompt}\nAssistant: {response}\n\n"
        f"Judge the assistant's response by this question: {principle.comparison}\n"
        "Rate the response on a scale from 1 (worst) to 10 (best)."
    )
    return render_chat(tokenizer, [{"role": "user", "content": question}]) + RATING_PREFIX


def judge_prompt(tokenizer: Any | None, *, question: str, prompt: str, response: str, yes_first: bool = True) -> str:
    """A yes/no ``question`` about one response as a multiple-choice prompt ending with :data:`ANSWER_PREFIX`.

    ``yes_first`` lists "(A) Yes (B) No"; otherwise "(A) No (B) Yes" (the swapped order for debiasing).
    """
    options = "(A) Yes\n(B) No" if yes_first else "(A) No\n(B) Yes"
    text = f"{_CONVERSATION}Human: {prompt}\nAssistant: {response}\n\n{question}\nOptions:\n{options}"
    return render_chat(tokenizer, [{"role": "user", "content": text}]) + ANSWER_PREFIX
