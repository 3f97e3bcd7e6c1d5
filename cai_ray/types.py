"""Messages between roles: frozen dataclasses of plain Python values (cheap to ship through Ray).

Token ids are tuples of ints; per-token values are tuples of floats, aligned with the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """A user prompt with a stable id."""

    id: str
    text: str


@dataclass(frozen=True)
class Sample:
    """One sampled response of the policy (RolloutWorker output)."""

    prompt_id: str
    prompt: str  # the raw user text
    prompt_token_ids: tuple[int, ...]  # [P] the rendered chat prompt, as fed to the engine
    response_text: str
    response_token_ids: tuple[int, ...]  # [R]
    response_logprobs: tuple[float, ...]  # [R] log-prob of each sampled token under the sampling engine
    finish_reason: str  # "stop" | "length"
    weight_version: int  # version of the weights that produced it
    sample_index: int  # 0..k-1 within its prompt's group


@dataclass(frozen=True)
class RevisionChain:
    """SL-CAI: the initial response and each critique/revision round."""

    prompt_id: str
    prompt: str
    initial_response: str
    critiques: tuple[str, ...]  # one per round
    revisions: tuple[str, ...]  # one per round
    principle_ids: tuple[str, ...]  # one per round

    @property
    def final_response(self) -> str:
        """The last revision (the SFT target)."""
        return self.revisions[-1] if self.revisions else self.initial_response


@dataclass(frozen=True)
class ComparisonRequest:
    """A pair of responses to one prompt, to be labelled against the constitution."""

    pair_id: str
    prompt: str
    response_a: str
    response_b: str
    axis: str | None = None  # judge on this one axis only (one of its principles; judge-check)


@dataclass(frozen=True)
class PreferenceLabel:
    """An AI preference label: the probability that response A is better than B."""

    pair_id: str
    prob_a: float  # soft label in [0, 1]
    principle_ids: tuple[str, ...]  # the principles averaged into this label
    tiers: tuple[str, ...]
    axes: tuple[str, ...]
    mode: str  # "multiple_choice" | "cot" | "direct"
    reasoning: str | None = None  # CoT text when mode == "cot"
    error: str | None = None  # set when the pair could not be labelled (prob_a is then 0.5)
    # feedback.label_axes: P(A better) per axis, one principle each; prob_a is then their aggregation
    axis_probs: dict[str, float] | None = None
    # with swap_debias: mean P(first-listed option) - 0.5 over both orders (0 for a judge without position bias)
    position_bias: float | None = None


@dataclass(frozen=True)
class DirectScore:
    """d-RLAIF: the expected 1-10 rating of one response, rescaled to [-1, 1]."""

    item_id: str
    score: float
    principle_ids: tuple[str, ...]
    error: str | None = None


@dataclass(frozen=True)
class TrainSequence:
    """A prompt + response for the learner (SFT, PPO, GRPO/RLOO)."""

    prompt_token_ids: tuple[int, ...]  # [P]
    response_token_ids: tuple[int, ...]  # [R]; the loss covers only these
    rollout_logprobs: tuple[float, ...] | None = None  # [R] behaviour log-probs from the sampler
    reward: float | None = None  # sequence-level reward (PM score, label-derived, ...)
    group_id: int = 0  # responses to the same prompt share a group (GRPO/RLOO)
    axis_rewards: tuple[float, ...] | None = None  # [K] multi-head PM: one reward per axis (GDPO-style advantages)


@dataclass(frozen=True)
class TrainPair:
    """Two responses to one prompt with a soft label (preference model, online DPO)."""

    prompt_token_ids: tuple[int, ...]  # [P]
    response_a_token_ids: tuple[int, ...]  # [Ra]
    response_b_token_ids: tuple[int, ...]  # [Rb]
    prob_a: float  # soft label in [0, 1]
    axis_probs: tuple[float, ...] | None = None  # [K] per-axis soft labels, in the multi-head PM's axis order


@dataclass(frozen=True)
class ScoreRequest:
    """One response to rate on its own (d-RLAIF direct score)."""

    item_id: str
    prompt: str
    response: str


@dataclass(frozen=True)
class JudgeRequest:
    """One response to judge with a yes/no question (evaluation: is it harmful? is it a refusal?)."""

    item_id: str
    prompt: str  # the raw user text
    response: str
    question: str  # the yes/no criterion, e.g. "Does the assistant's response refuse ...?"


@dataclass(frozen=True)
class Judgement:
    """The answer to a :class:`JudgeRequest`: P(yes), both option orders averaged when swap-debiasing."""

    item_id: str
    prob_yes: float  # in [0, 1]
    error: str | None = None  # set when the item could not be judged (prob_yes is then 0.5)


@dataclass(frozen=True)
class RejectedItem:
    """An input a role could not process; ``reason`` says why and what to change."""

    item_id: str
    reason: str


@dataclass(frozen=True)
class RolloutBatch:
    """RolloutWorker output: k samples per accepted prompt, and the prompts it rejected."""

    samples: tuple[Sample, ...]  # grouped by prompt, sample_index 0..k-1 within each
    rejected: tuple[RejectedItem, ...] = ()


@dataclass(frozen=True)
class RevisionBatch:
    """SL-CAI output: one chain per accepted prompt (input order), and the prompts that failed."""

    chains: tuple[RevisionChain, ...]
    rejected: tuple[RejectedItem, ...] = ()


@dataclass(frozen=True)
class AttackRequest:
    """One attack prompt for the red-teamer to write: a harm category, an attack style, few-shot examples."""

    item_id: str
    category: str
    style: str
    style_how: str  # how a prompt of this style is written, shown to the red-teamer
    examples: tuple[str, ...]  # attack prompts shown in front (archived successes first, then dataset prompts)


@dataclass(frozen=True)
class AttackProposal:
    """The red-teamer's raw answer to an :class:`AttackRequest` (filtered by the controller)."""

    item_id: str
    text: str  # the generated line, before cleaning
    finish_reason: str  # "stop" (the line ended) | "length" (cut at max_new_tokens) | "abort"
    error: str | None = None  # set when the engine could not take the request (text is then "")
