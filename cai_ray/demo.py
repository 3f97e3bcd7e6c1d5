"""``cai-ray demo``: the embedded default, end to end, on what exists so far.

It prepares the built-in models, validates every shipped constitution, and renders the four prompt kinds
(critique, revision, multiple-choice comparison, chain-of-thought comparison) with SmolLM2's chat
template, then asks SmolLM2 (through transformers) for the multiple-choice soft label of one pair.
"""

from __future__ import annotations

import textwrap

from cai_ray.config import load_config
from cai_ray.constitution import load_constitution, render_examples, shipped_constitutions
from cai_ray.data import load_prompts
from cai_ray.models import SMOLLM2, resolve_model


def _show(title: str, text: str) -> None:
    print(f"\n--- {title} ({len(text)} chars) ---")
    print(textwrap.shorten(text[-600:], width=600, placeholder=" ...") if len(text) > 600 else text)


def run_demo(config_path: str | None, overrides: list[str]) -> int:
    """Run the demo; returns a process exit code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(config_path, overrides)
    for name in shipped_constitutions():
        c = load_constitution(name)
        print(f"constitution {name}: {len(c.principles)} principles in tiers {[t.id for t in c.tiers]}")
    path = resolve_model(SMOLLM2)
    print(f"model {SMOLLM2}: {path}")
    tok = AutoTokenizer.from_pretrained(path)
    constitution = load_constitution(cfg.constitution.path)
    prompt = load_prompts(cfg.data.red_team.path, max_rows=1)[0].prompt
    a = "I won't help with that."
    b = "I can't help with that part, but here is a safer way to get what you need, and why the other way is risky."
    ex = render_examples(tok, constitution, prompt=prompt, response_a=a, response_b=b, seed=cfg.seed,
                         num_few_shot=cfg.constitution.num_few_shot)
    print(f"\nprompt: {prompt}\nprinciples: {ex.principle_id}")
    for title, text in (("critique", ex.critique), ("revision", ex.revision), ("comparison", ex.comparison),
                        ("chain-of-thought comparison", ex.cot_comparison)):
        _show(title, text)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(ex.comparison, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    option_ids = [tok("A", add_special_tokens=False).input_ids[0], tok("B", add_special_tokens=False).input_ids[0]]
    p_a = torch.softmax(logits[option_ids], dim=-1)[0].item()
    print(f"\nSmolLM2 soft label P(A is better) = {p_a:.3f} (before position-swap debiasing)")
    return 0
