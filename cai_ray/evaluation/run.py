"""The evaluation's order of phases: generate per checkpoint, judge, score with the preference model, report.

Each phase runs in actors started for it and stopped after it (a Ray Data batch job of rollout engines per
checkpoint, one feedback pool, one learner group for the preference model), so the driver loads no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_ray.config import ConfigError, ExperimentConfig, ModelConfig
from cai_ray.evaluation.items import (
    HARMFUL_QUESTION,
    REFUSAL_QUESTION,
    Comparison,
    EvalPrompt,
    Judged,
    Response,
    comparison_pairs,
    eval_prompts,
    pair_up,
)
from cai_ray.evaluation.report import checkpoint_entry, win_rate_entry, write_report
from cai_ray.evaluation.stats import Bootstrap
from cai_ray.models import ModelRef
from cai_ray.seeds import stable_seed
from cai_ray.types import RejectedItem, TrainSequence

Pairs = dict[tuple[str, str], list[Comparison]]  # (A, B) -> B's response against A's, per shared prompt


def parse_checkpoints(texts: Sequence[str]) -> dict[str, str]:
    """``NAME=MODEL`` flags as an ordered ``{name: model reference}``; errors name the bad flag."""
    out: dict[str, str] = {}
    for text in texts:
        name, sep, ref = text.partition("=")
        if not sep or not name.strip() or not ref.strip():
            raise ConfigError(f"--checkpoint {text!r}: expected NAME=MODEL, e.g. --checkpoint sl=runs/x/sl/policy")
        if name.strip() in out:
            raise ConfigError(f"--checkpoint {text!r}: the name '{name.strip()}' is given twice")
        out[name.strip()] = ref.strip()
    return out


def run_checkpoints(run_dir: str | Path, base_model: str) -> tuple[dict[str, str], str | None]:
    """The checkpoints of a run folder and its preference model.

    ``base`` is ``base_model`` (the config's policy); ``sl`` is ``sl/policy`` and ``rl`` is
    ``checkpoint/learner/policy_hf`` when present; the preference model is
    ``checkpoint/learner/preference_hf`` when present (written by ``LearnerWorker.save_checkpoint``).
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"--run-dir {root}: no such folder")
    found = {"base": base_model}
    for name, sub in (("sl", root / "sl" / "policy"), ("rl", root / "checkpoint" / "learner" / "policy_hf")):
        if (sub / "config.json").is_file():
            found[name] = str(sub)
    pm = root / "checkpoint" / "learner" / "preference_hf"
    return found, (str(pm) if (pm / "config.json").is_file() else None)


def evaluate(cfg: ExperimentConfig, checkpoints: dict[str, str], *, out_dir: str | Path,
             preference_model: str | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoints`` ({name: model reference}, in order); write the report, items and plot.

    Writes ``eval.json`` (the returned report), ``eval_items.jsonl`` (every response with its judgement)
    and ``eval.png`` into ``out_dir``.
    """
    from cai_ray.launcher import init_ray
    from cai_ray.metrics import PhaseTimer

    if not checkpoints:
        raise ConfigError("nothing to evaluate: give --checkpoint NAME=MODEL or --run-dir RUN")
    models = {name: _checkpoint_model(cfg, ref) for name, ref in checkpoints.items()}
    refs = {name: ModelRef.of(m) for name, m in models.items()}  # fail fast on a bad reference
    prompts = eval_prompts(cfg.data, sensitive_field=cfg.eval.sensitive_field)
    pairs = comparison_pairs(list(models), cfg.eval.win_rate_baseline)
    init_ray(cfg.cluster)
    timer = PhaseTimer()
    with timer.phase("generate"):
        answers = {name: _generate(cfg, name, model, prompts, Path(out_dir)) for name, model in models.items()}
    responses = [r for rs, _ in answers.values() for r in rs]
    with timer.phase("judge"):
        probs, compared = _judge(cfg, responses, {(a, b): pair_up(answers[a][0], answers[b][0]) for a, b in pairs})
    scores: list[float | None] = [None] * len(responses)
    if preference_model is not None:
        with timer.phase("pm_score"):
            scores = list(score_with_preference_model(cfg, preference_model, responses, checkpoints=refs.values()))
    judged = [Judged(r, p, s) for r, p, s in zip(responses, probs, scores, strict=True)]
    boot = Bootstrap(cfg.eval.num_bootstrap_samples, cfg.seed, 1.0 - cfg.eval.confidence_level)
    report: dict[str, Any] = {"checkpoints": {
        name: {"model": refs[name].path} | checkpoint_entry(
            [j for j in judged if j.response.checkpoint == name], prompts=prompts, rejected=rejected,
            threshold=cfg.eval.decision_threshold, boot=boot, with_pm=preference_model is not None)
        for name, (_, rejected) in answers.items()
    }}
    report["win_rates"] = [win_rate_entry(a, b, compared[a, b], boot=boot) for a, b in pairs]
    report["metadata"] = _metadata(cfg, prompts, preference_model) | {"timing": timer.metrics()}
    write_report(report, judged, out_dir)
    return report


def _checkpoint_model(cfg: ExperimentConfig, ref: str) -> ModelConfig:
    """The policy's model config with ``ref`` as its weights (the policy's hub revision applies only to itself)."""
    policy = cfg.models.policy
    return policy.model_copy(update={"name": ref, "revision": policy.revision if ref == policy.name else None})


def _generate(cfg: ExperimentConfig, name: str, model: ModelConfig, prompts: Sequence[EvalPrompt],
              out_dir: Path) -> tuple[list[Response], list[RejectedItem]]:
    """One response per prompt from ``model``, in prompt order: a Ray Data batch job on ``rollout.num_workers``
    engines (:mod:`cai_ray.pipelines.batch`), its shards in ``out_dir/generations/<name>`` (a re-run with the same
    weights and settings reuses them)."""
    from cai_ray.pipelines.batch import GenerateTask, read_samples, run_batch

    rollout = cfg.rollout.model_copy(update={"temperature": cfg.eval.temperature,
                                             "max_new_tokens": cfg.eval.max_new_tokens})
    # The same sampling seeds for every checkpoint.
    task = GenerateTask(model, rollout, cfg.data, stable_seed(cfg.seed, "eval"), source=name)
    rows = [{"id": p.id, "where": p.id, "prompt": p.text} for p in prompts]
    result = run_batch(task, rows, out_dir / "generations" / name, num_workers=rollout.num_workers,
                       num_rows_per_shard=cfg.batch.num_rows_per_shard, progress=cfg.logging.progress,
                       desc=f"eval generate {name}")
    by_id = {s.prompt_id: s for s in read_samples(result.files)}
    responses = [Response(name, p, by_id[p.id]) for p in prompts if p.id in by_id]
    return responses, [RejectedItem(r["id"], r["reason"]) for r in result.rejected]


def _judge(cfg: ExperimentConfig, responses: Sequence[Response], pairs: Pairs) -> tuple[list[float | None], Pairs]:
    """P(yes) per response (None where the judge failed) and every pair's comparisons with P(B better)."""
    from cai_ray.inference.feedback import start_feedback_pool

    pool = start_feedback_pool(cfg.models.resolved_feedback(), cfg.feedback, cfg.constitution, cfg.data, cfg.cluster,
                               seed=cfg.seed)
    try:
        judgements = {j.item_id: j for j in pool.judge([r.judge_request() for r in responses])}
        asked = [c for cs in pairs.values() for c in cs if not c.tie]
        labels = {lab.pair_id: lab for lab in pool.label_pairs([c.request() for c in asked])}
    finally:
        pool.shutdown()
    probs = [None if judgements[r.item_id].error else judgements[r.item_id].prob_yes for r in responses]

    def labelled(c: Comparison) -> Comparison:
        label = labels[c.pair_id]
        return Comparison(c.a, c.b, None if label.error else 1.0 - label.prob_a)

    return probs, {key: [c if c.tie else labelled(c) for c in cs] for key, cs in pairs.items()}


def score_with_preference_model(cfg: ExperimentConfig, path: str, responses: Sequence[Response], *,
                                checkpoints: Sequence[ModelRef]) -> list[float]:
    """The preference model's score of each response's prompt + response, in a learner group of its own.

    Scores the token ids as sampled (the chat-templated prompt and the response, eos included) with the
    learner's own ``pm_scores``, exactly as rollouts are scored in training; so every checkpoint must share
    the PM's tokenizer. The PM's heads and their mix are the saved ones.
    """
    from cai_ray.training.group import LearnerGroup
    from cai_ray.training.learner import LearnerRoles, pm_scores
    from cai_ray.training.modeling import ScalarHeadModel

    if not ScalarHeadModel.is_saved_at(path):
        raise ConfigError(f"--preference-model {path}: not a saved preference model (no scalar_head.safetensors)")
    pm_model = cfg.models.resolved_preference().model_copy(update={"name": path, "revision": None})
    vocab = ModelRef.of(pm_model).tokenizer().get_vocab()
    for ref in checkpoints:
        if ref.tokenizer().get_vocab() != vocab:
            raise ConfigError(f"--preference-model {path}: its tokenizer differs from checkpoint {ref.path}'s; the "
                              "preference model scores the checkpoints' token ids, so they must share a tokenizer")
    axes, mix = ScalarHeadModel.saved_heads(path)
    roles = LearnerRoles(reference=False, preference_model=True, critic=False, pm_axes=axes, pm_mix=mix)
    group = LearnerGroup(cfg.learner, cfg.models.model_copy(update={"preference": pm_model}), cfg.cluster,
                         seed=cfg.seed, roles=roles)
    try:
        return group.forward(pm_scores, [TrainSequence(r.sample.prompt_token_ids, r.sample.response_token_ids)
                                         for r in responses])
    finally:
        group.shutdown()


def _metadata(cfg: ExperimentConfig, prompts: Sequence[EvalPrompt], preference_model: str | None) -> dict[str, Any]:
    ev = cfg.eval
    return {
        "config_name": cfg.name, "seed": cfg.seed,
        "feedback_model": cfg.models.resolved_feedback().name, "constitution": cfg.constitution.path,
        "label_mode": cfg.feedback.label_mode, "swap_debias": cfg.feedback.swap_debias,
        "preference_model": preference_model,
        "datasets": {
            "red_team": {"path": cfg.data.red_team_eval.path, "rows": sum(p.red_team for p in prompts)},
            "benign": {"path": cfg.data.helpful_eval.path, "rows": sum(not p.red_team for p in prompts),
                       "sensitive_sounding": sum(p.sensitive for p in prompts)},
        },
        "questions": {"harmful": HARMFUL_QUESTION, "refusal": REFUSAL_QUESTION},
        "temperature": ev.temperature, "max_new_tokens": ev.max_new_tokens,
        "decision_threshold": ev.decision_threshold, "win_rate_baseline": ev.win_rate_baseline,
        "num_bootstrap_samples": ev.num_bootstrap_samples, "confidence_level": ev.confidence_level,
    }
