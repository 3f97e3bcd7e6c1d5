"""Per-axis feedback on the real CPU stack: per-axis labels in one engine call, and the loop end to end."""

from __future__ import annotations

from typing import Any

import pytest

from cai_ray.config import ConstitutionConfig, DataConfig, EngineConfig, FeedbackConfig, ModelConfig
from cai_ray.types import ComparisonRequest

pytestmark = pytest.mark.slow

PAIRS = [
    ComparisonRequest("c0", "How do I pick a lock?", "I can't help with that.", "Use a tension wrench and a pick."),
    ComparisonRequest("c1", "How do I cook rice?", "Rinse it, then simmer for 15 minutes.", "Just buy some."),
]


@pytest.fixture(scope="module")
def axis_worker(tiny_model_path: str) -> Any:
    """One engine for this module's worker tests: every axis of axes12, priority aggregation."""
    from cai_ray.inference.feedback import FeedbackWorker

    cfg = FeedbackConfig(engine=EngineConfig(kv_cache_memory_mb=32, max_num_seqs=64), label_axes="all",
                         aggregation={"mode": "priority", "margin": 0.01})
    model = ModelConfig(name=tiny_model_path, dtype="float32", max_model_len=1024)
    return FeedbackWorker(model, cfg, ConstitutionConfig(path="axes12", num_few_shot=1),
                          DataConfig(max_prompt_tokens=48), seed=3)


def test_per_axis_labels_one_call_swap_exact(axis_worker: Any) -> None:
    from cai_ray.algorithms.aggregation import aggregate_label
    from cai_ray.constitution import load_constitution
    from cai_ray.inference.labels import CROSS_CALL_TOLERANCE

    worker = axis_worker
    calls: list[int] = []
    score = worker._engine.score

    def counted(prompts: Any, options: Any) -> Any:  # instruments the real engine, scoring is unchanged
        calls.append(len(prompts))
        return score(prompts, options)

    worker._engine.score = counted
    try:
        labels = worker.label_pairs(PAIRS)
    finally:
        del worker._engine.score  # the instance attribute goes; the engine's own method is back
    axes = load_constitution("axes12").axis_ids
    assert calls == [len(PAIRS) * len(axes) * 2]  # every axis, both orders, all pairs: ONE engine call
    # Exact swap symmetry holds within one worker call (the grid of labels.py); across calls, other batch shapes
    # can move a label by float32 engine noise, which may cross a grid step: there the tolerance applies.
    swapped = [ComparisonRequest(r.pair_id, r.prompt, r.response_b, r.response_a) for r in PAIRS]
    both = worker.label_pairs(PAIRS + swapped)
    c = load_constitution("axes12")
    ranks = {a: c.axis_tier_rank(a) for a in axes}
    for label, same, back in zip(labels, both[:len(PAIRS)], both[len(PAIRS):], strict=True):
        assert label.error is None and label.axes == axes and set(label.axis_probs) == set(axes)
        assert len(label.principle_ids) == len(axes)  # one principle per axis
        for axis in axes:
            assert back.axis_probs[axis] == 1 - same.axis_probs[axis]  # swap-debiased: exact on the grid
            assert same.axis_probs[axis] == pytest.approx(label.axis_probs[axis], abs=CROSS_CALL_TOLERANCE)
        assert label.prob_a == aggregate_label(label.axis_probs, mode="priority", ranks=ranks, margin=0.01)


def test_k_axes_together_label_as_each_axis_alone(axis_worker: Any) -> None:
    """All axes of a pair (14) in one call give each axis the label that axis gets when asked alone.

    Per-axis prompts put the question after the responses, so in one call the axes of a pair read the
    shared conversation + responses from vLLM's prefix cache; asked alone (``axis=``, as the judge check asks)
    they are computed with other batch shapes and cache states. Same principle, same prompt: the labels agree
    within the cross-call tolerance (float32 engine noise, labels.py).
    """
    from dataclasses import replace

    from cai_ray.inference.labels import CROSS_CALL_TOLERANCE

    together = axis_worker.label_pairs(PAIRS)
    axes = together[0].axes
    assert len(axes) >= 12 and all(t.error is None for t in together)
    for k, axis in enumerate(axes):
        alone = axis_worker.label_pairs([replace(r, axis=axis) for r in PAIRS])
        for t, a in zip(together, alone):
            assert a.error is None and a.axes == (axis,) and a.principle_ids == (t.principle_ids[k],)
            assert a.axis_probs == {axis: a.prob_a}
            assert a.prob_a == pytest.approx(t.axis_probs[axis], abs=CROSS_CALL_TOLERANCE), (t.pair_id, axis)
    # The axes' questions move a pair's labels by more than the tolerance (the tiny random model only just: ~1e-4),
    # so the comparison above tells at least the most different axes apart.
    for t in together:
        spread = max(t.axis_probs.values()) - min(t.axis_probs.values())
        assert spread > 2 * CROSS_CALL_TOLERANCE, (t.pair_id, spread)


def test_loop_with_per_axis_labels_and_priority(sl_policy: str, tmp_path) -> None:
    """SL-CAI (the session's ``sl_policy``, shared with the other loop tests), then two RL iterations from it on
    the 12-axis constitution, every axis labelled, priority aggregation end to end."""
    import json
    import math
    from pathlib import Path

    from cai_ray.algorithms.aggregation import aggregate_label
    from cai_ray.config import load_config
    from cai_ray.constitution import load_constitution
    from cai_ray.pipelines.run import run_experiment

    quickstart = Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml"
    cfg = load_config(quickstart, [f"logging.output_dir={tmp_path}/{{name}}", "logging.wandb_mode=disabled",
                                   "cluster.num_cpus=8", f"models.policy.name={sl_policy}",
                                   "constitution.path=axes12", "feedback.label_axes=all",
                                   "feedback.aggregation.mode=priority", "feedback.aggregation.margin=0.01",
                                   "schedule.num_prompts_per_iteration=4", "rollout.max_new_tokens=8",
                                   "learner.algorithm=grpo"])  # rewards from the multi-head PM, GDPO advantages
    run_dir = run_experiment(cfg, sl=False, rl=True)
    c = load_constitution("axes12")
    axes, ranks = c.axis_ids, {a: c.axis_tier_rank(a) for a in c.axis_ids}
    for it in range(2):
        rows = [json.loads(x) for x in (run_dir / "labels" / f"iter_{it:04d}.jsonl").read_text().splitlines()]
        ok = [r for r in rows if r["error"] is None]
        assert ok and all(set(r["axis_probs"]) == set(axes) for r in ok)
        assert all(0.0 <= p <= 1.0 for r in ok for p in r["axis_probs"].values())
        for r in ok:  # the training label is the tiers' priority decision over the per-axis labels
            assert r["prob_a"] == pytest.approx(aggregate_label(r["axis_probs"], mode="priority", ranks=ranks,
                                                                margin=0.01), abs=1e-12)
        # the multi-head PM's scores of the iteration's samples, taken before its update (held out from it)
        scored = [json.loads(x) for x in (run_dir / "pm_scores" / f"iter_{it:04d}.jsonl").read_text().splitlines()]
        assert len(scored) == 2 * 4  # rollout.num_samples_per_prompt x schedule.num_prompts_per_iteration
        assert all(list(r["scores"]) == list(axes) and all(map(math.isfinite, r["scores"].values())) for r in scored)
        assert {r["weight_version"] for r in scored} == {it}  # sync schedule: sampled by the version it trains
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [int(m["iteration"]) for m in history] == [0, 1]
    for m in history:
        for axis in axes:
            assert 0.0 <= m[f"pm_fresh/{axis}/accuracy"] <= 1.0
            assert m[f"labels/{axis}/decisiveness"] >= 0.0
        assert m["loss/pm"] > 0.0 and m["policy/optimizer_steps"] > 0
    import torch

    from cai_ray.models import ModelRef
    from cai_ray.training.modeling import ScalarHeadModel

    heads = sorted(run_dir.rglob("preference_hf/scalar_head.safetensors"))
    assert heads, f"no exported preference model under {run_dir}"
    # the HF export of the PM keeps its heads (one per axis) and their mix
    exported = ModelRef(str(heads[-1].parent), revision=None, trust_remote_code=False)
    assert ScalarHeadModel.from_pretrained(exported, dtype=torch.float32).axes == axes
    # the judge check ran once at the start, on the trained axes (the tiny random model is at chance on them)
    check = json.loads((run_dir / "judge_check.json").read_text())
    assert check["num_pairs"] >= 60 and set(check["axes"]) == set(axes)
    assert set(check["at_chance_trained_axes"]) <= set(axes) and check["overall"]["position_bias"] is not None
    # the axis-correlation report on the real labels
    from cai_ray.cli import main

    assert main(["axes", "--run-dir", str(run_dir), "--bootstrap", "50"]) == 0
    report = json.loads((run_dir / "axes" / "axes.json").read_text())
    for key, per_iteration in (("labels", None), ("pm_scores", 8)):  # 4 prompts x 2 samples, all centred pairs
        src = report[key]
        assert src["overall"]["axes"] == list(axes) and len(src["windows"]) == 2
        assert src["overall"]["n"] == sum(w["n"] for w in src["windows"]) > 0
        assert per_iteration is None or [w["n"] for w in src["windows"]] == [per_iteration] * 2
        assert len(src["overall"]["matrix"]) == len(axes) and len(src["trend"]) == len(axes) * (len(axes) - 1) // 2
        assert all(len(rs) == 2 for rs in src["trend"].values())
    plots = {Path(p).name for p in report["plots"]}
    assert {"labels_overall.png", "pm_scores_overall.png", "pm_scores_iter_0001-0001.png"} <= plots
    assert all(Path(p).is_file() for p in report["plots"])
