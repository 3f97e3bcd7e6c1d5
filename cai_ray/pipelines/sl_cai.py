"""SL-CAI, Bai et al. 2022 §3: critique -> revision -> supervised fine-tuning.

Red-team prompts get an initial response from the feedback model (the policy itself by default: self-
critique), then ``feedback.num_revision_rounds`` rounds of (critique request, revision request) with one
principle sampled per round and few-shot transcripts in front. The final revisions, mixed with the
policy's own responses to helpfulness prompts (``sl.helpful_mix_ratio`` of the rows), form the SFT set,
saved as JSONL (whole chains, for inspection) and Parquet (Ray Data) before the Ray Train SFT job.
Simplification: the helpfulness responses come from the policy, not a separate helpful-only model.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

from cai_ray.backend import layout_threads
from cai_ray.config import ExperimentConfig
from cai_ray.data import read_prompts, write_jsonl
from cai_ray.seeds import stable_seed
from cai_ray.types import Prompt


def sl_cai(cfg: ExperimentConfig, run_dir: Path) -> str:
    """Run SL-CAI; returns the HF folder of the fine-tuned policy."""
    import ray

    from cai_ray.inference.feedback import start_feedback_pool
    from cai_ray.training.sft_job import run_sft

    cfg = layout_threads(cfg, "sl")  # its roles run one after another: each may use the whole node
    out = run_dir / "sl"
    red, helpful = _prompts(cfg)
    pool = start_feedback_pool(cfg.models.resolved_feedback(), cfg.feedback, cfg.constitution, cfg.data, cfg.cluster,
                               seed=cfg.seed)
    try:
        revised = pool.critique_and_revise(red)
    finally:
        pool.shutdown()  # free the engine's memory before training
    chains = [c for c in revised.chains if c.final_response.strip()]
    ratio = cfg.sl.helpful_mix_ratio
    num_helpful = min(len(helpful), round(len(chains) * ratio / (1 - ratio))) if ratio < 1 else len(helpful)
    rows = [{"source": "revision", "prompt": c.prompt, "response": c.final_response, **asdict(c)} for c in chains]
    if num_helpful:
        rows += [{"source": "helpful", "prompt": s.prompt, "response": s.response_text, "prompt_id": s.prompt_id}
                 for s in _helpful_samples(cfg, helpful[:num_helpful])]
    if not rows:
        raise RuntimeError(f"SL-CAI produced no training rows; rejected prompts: {revised.rejected}")
    write_jsonl(rows, out / "sft_data.jsonl")
    write_jsonl([asdict(r) for r in revised.rejected], out / "rejected.jsonl")
    ray.data.from_items([{"prompt": r["prompt"], "response": r["response"], "source": r["source"]} for r in rows]) \
        .write_parquet(str((out / "sft_data.parquet").resolve()))
    result = run_sft([(r["prompt"], r["response"]) for r in rows], model=cfg.models.policy, sl=cfg.sl,
                     learner=cfg.learner, cluster=cfg.cluster, run_dir=str(out), seed=cfg.seed,
                     bucket_bytes=cfg.sync.bucket_size_mb << 20)
    return result.policy_path


def _prompts(cfg: ExperimentConfig) -> tuple[list[Prompt], list[Prompt]]:
    rng = random.Random(stable_seed(cfg.seed, "sl-prompts"))
    red, helpful = read_prompts(cfg.data.red_team), read_prompts(cfg.data.helpful)
    return rng.sample(red, min(cfg.sl.num_red_team_prompts, len(red))), rng.sample(helpful, len(helpful))


def _helpful_samples(cfg: ExperimentConfig, prompts: list[Prompt]) -> list:
    """The policy's first sample for each helpfulness prompt."""
    from cai_ray.inference.rollout import start_rollout_workers
    from cai_ray.launcher import get

    fleet = start_rollout_workers(cfg.models.policy, cfg.rollout, cfg.data, cfg.cluster, seed=cfg.seed)
    try:
        batch = get(fleet.workers[0].generate.remote(prompts, seed=stable_seed(cfg.seed, "sl-helpful")),
                    timeout=cfg.cluster.step, what="rollout worker 0: generate")
    finally:
        fleet.shutdown()
    return [s for s in batch.samples if s.sample_index == 0]
