"""Constitutions: shipped files validate, malformed ones fail precisely, rendering is deterministic."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from cai_ray.constitution import (
    ANSWER_PREFIX,
    COT_TRIGGER,
    Constitution,
    ConstitutionError,
    comparison_prompt,
    cot_comparison_prompt,
    critique_prompt,
    load_constitution,
    render_chat,
    revision_prompt,
    shipped_constitutions,
)

SHIPPED = shipped_constitutions()


def test_ships_the_required_constitutions() -> None:
    assert {"harmless", "priority", "persona_plainspoken"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_constitution_validates(name: str) -> None:
    c = load_constitution(name)
    assert c.principles_for("critique") and c.principles_for("comparison")


def test_harmless_has_enough_principles() -> None:
    c = load_constitution("harmless")
    assert len(c.principles_for("critique")) >= 16
    assert len(c.principles_for("comparison")) >= 16


def test_priority_has_four_ordered_tiers_with_principles() -> None:
    c = load_constitution("priority")
    assert [t.id for t in c.tiers] == ["broadly_safe", "broadly_ethical", "guidelines", "helpful"]
    for tier in c.tiers:
        assert c.principles_for("comparison", tiers=[tier.id])
    assert c.tier_rank("broadly_safe") == 0


def test_axes_are_the_constitutions_own() -> None:
    c = load_constitution("axes12")
    assert len(c.axis_ids) >= 12
    wanted = {"honesty", "harmlessness", "helpfulness", "verbosity", "tone", "evasiveness", "sycophancy"}
    assert wanted <= set(c.axis_ids)
    # every declared axis has a comparison principle, so per-axis labelling can cover all of them
    for axis in c.axis_ids:
        assert [p for p in c.principles_for("comparison") if axis in p.axes], axis
    assert c.axis_tier_rank("harmlessness") == 0 and c.axis_tier_rank("verbosity") == 3


def test_undeclared_axes_are_fine_when_declared(tmp_path: Path) -> None:
    def mutate(t: dict) -> None:
        t["axes"].append({"id": "whimsy", "description": "Playful."})
        t["principles"][0]["axes"] = ["whimsy"]

    c = load_constitution(_broken(tmp_path, mutate))
    assert "whimsy" in c.axis_ids and c.principles[0].axes == ("whimsy",)


def _broken(tmp_path: Path, mutate) -> Path:
    tree = yaml.safe_load(load_constitution.__globals__["resolve_path"]("priority").read_text())
    mutate(tree)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t["principles"][2].update(tier="nope"), r"principles\.2\.tier: 'nope' is not a tier id"),
        (lambda t: t["principles"][1].update(colour="red"), r"principles\.1\.colour: unknown key"),
        (lambda t: t["principles"][0].pop("revision"), r"principles\.0: critique and revision come as a pair"),
        (lambda t: t["principles"][3].update(axes=["vibes"]),
         r"principles\.3\.axes\.0: principle '[a-z-]+' names axis 'vibes', which the constitution does not declare"),
        (lambda t: t.pop("axes"), r"axes: Field required"),
        (lambda t: t["axes"].append(dict(t["axes"][0])), r"axes\.\d+\.id: duplicate id"),
        (lambda t: t["principles"].append(dict(t["principles"][0])), r"duplicate id"),
        (lambda t: t["few_shot"]["comparison"][0].update(answer="C"), r"few_shot\.comparison\.0\.answer"),
        (lambda t: t["few_shot"]["comparison"][0].update(principle="ghost"), r"'ghost' is not a principle id"),
        (lambda t: t.pop("tiers"), r"tiers: Field required"),
    ],
)
def test_malformed_constitution_fails_precisely(tmp_path: Path, mutate, expected: str) -> None:
    path = _broken(tmp_path, mutate)
    with pytest.raises(ConstitutionError, match=expected) as err:
        load_constitution(path)
    assert str(path) in str(err.value)


def test_missing_and_unknown_references() -> None:
    with pytest.raises(ConstitutionError, match="not a shipped name"):
        load_constitution("no-such-constitution")
    with pytest.raises(ConstitutionError, match="unknown tier"):
        load_constitution("priority").principles_for("comparison", tiers=["mystery"])


def test_sampling_is_seeded() -> None:
    c = load_constitution("harmless")
    draw = lambda seed: [p.id for p in c.sample_principles(random.Random(seed), "comparison", k=3)]  # noqa: E731
    assert draw(7) == draw(7)
    assert len(set(draw(7))) == 3
    assert any(draw(7) != draw(s) for s in range(8, 12))


def test_tier_filter_restricts_sampling() -> None:
    c = load_constitution("priority")
    rng = random.Random(0)
    for _ in range(20):
        assert c.sample_principles(rng, "critique", tiers=["helpful"])[0].tier == "helpful"


def test_render_without_chat_template_uses_human_assistant() -> None:
    text = render_chat(None, [{"role": "user", "content": "hi"}])
    assert text == "Human: hi\n\nAssistant:"


def _render_all_kinds(tok: object, c: Constitution, *, seed: int) -> dict[str, str]:
    """The four prompt kinds for one prompt, with principles drawn from ``seed`` (as the feedback worker does)."""
    rng = random.Random(seed)
    crit, comp = c.sample_principles(rng, "critique")[0], c.sample_principles(rng, "comparison")[0]
    kw = dict(prompt="How do I pick a lock?", num_few_shot=1)
    pair = dict(response_a="Here is how.", response_b="I can't help.")
    return {"principle_id": f"{crit.id} / {comp.id}",
            "critique": critique_prompt(tok, c, crit, response=pair["response_a"], **kw),
            "revision": revision_prompt(tok, c, crit, response=pair["response_a"], critique="(a critique)", **kw),
            "comparison": comparison_prompt(tok, c, comp, **pair, **kw),
            "cot_comparison": cot_comparison_prompt(tok, c, comp, **pair, **kw)}


def test_rendering_is_deterministic_with_chat_template(tiny_model_path: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    c = load_constitution("harmless")
    first = _render_all_kinds(tok, c, seed=3)
    assert first == _render_all_kinds(tok, c, seed=3)
    assert first["comparison"].endswith(ANSWER_PREFIX)
    assert first["cot_comparison"].endswith(COT_TRIGGER)
    assert "<|im_start|>user" in first["critique"] and first["critique"].endswith("Critique:")
    assert "(A) Here is how." in first["comparison"] and "(B) I can't help." in first["comparison"]
    # A few-shot transcript precedes the real conversation.
    assert first["critique"].count("Critique request:") == 2
    assert any(_render_all_kinds(tok, c, seed=s)["principle_id"] != first["principle_id"] for s in range(4, 9))


@pytest.mark.parametrize("render", [comparison_prompt, cot_comparison_prompt])
def test_question_last_layout_shares_the_responses_across_principles(render: object) -> None:
    """Per-axis labels: two principles' prompts for one pair share everything up to the question (vLLM's prefix
    cache then computes the responses once per order); the paper's layout shares only up to the human turn."""
    import os

    c = load_constitution("axes12")
    first, second = [p for p in c.principles if p.comparison][:2]
    pair = dict(prompt="How do I pick a lock?", response_a="Here is how.", response_b="I can't help.",
                num_few_shot=1)

    def shared(layout: str) -> str:
        texts = [render(None, c, p, layout=layout, **pair) for p in (first, second)]  # type: ignore[operator]
        return os.path.commonprefix(texts)

    last, paper = shared("question_last"), shared("question_first")
    assert "Human: How do I pick a lock?\n\nOptions:\n(A) Here is how.\n(B) I can't help.\n\n" in last
    assert "Here is how." not in paper.split("Human: How do I pick a lock?")[-1]
    assert len(last) > len(paper)
    question_last = render(None, c, first, layout="question_last", **pair)  # type: ignore[operator]
    assert question_last.index(first.comparison) > question_last.index("(B) I can't help.")
    # The few-shot examples take the same layout as the question they demonstrate.
    assert question_last.count("Options:") == 2 and paper.count("Options:") == 1
