"""Iterated online RL-CAI (RLAIF), Bai et al. 2022 §4 with the §6.1 "iterated online" idea.

Each iteration:
  1. sample prompts; the policy samples k responses per prompt on the vLLM rollout engines;
  2. pair the responses; the feedback pool labels each pair against a principle of the constitution;
  3. append the fresh labels to the preference data (a replay window of older iterations is kept);
  4. measure the preference model's accuracy on the fresh labels *before* updating it (the
     distribution-shift signal the online loop exists to fix), then update it;
  5. update the policy: online DPO straight from the labels, or PPO / GRPO / RLOO / REINFORCE++ with the
     preference model's score as reward (KL to the reference inside the learner);
  6. push the new weights into the engines; log; checkpoint every N iterations.
Schedules: ``sync`` runs the phases in order; ``async`` generates iteration i+1 while iteration i is
labelled and trained, and drops samples more than ``max_staleness`` weight versions old.
Simplification: the preference model is scored on the policy's own samples, one pair per two samples.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cai_ray.algorithms.preference import preference_loss
from cai_ray.config import ExperimentConfig
from cai_ray.data import load_prompts, write_jsonl
from cai_ray.inference.engine import stable_seed
from cai_ray.metrics import MetricsWriter, PhaseTimer
from cai_ray.pipelines.roles import PendingRollout, Roles, start_roles
from cai_ray.types import ComparisonRequest, PreferenceLabel, Prompt, Sample, TrainPair, TrainSequence

STATE_FILE = "loop_state.json"


# ----------------------------------------------------------------------------------- the loop
def rl_cai(cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False) -> list[dict[str, float]]:
    """Run ``cfg.schedule.num_iterations`` RL-CAI iterations; returns each iteration's metrics."""
    pool = _prompt_pool(cfg)
    num_iterations, overlap = cfg.schedule.num_iterations, cfg.schedule.mode == "async"
    writer = MetricsWriter(cfg.logging, run_dir, cfg.name, cfg.model_dump(mode="json"))
    roles = start_roles(cfg)
    try:
        state = resume_from_checkpoint(roles, run_dir) if resume else LoopState()
        history: list[dict[str, float]] = []
        bar = tqdm(total=num_iterations, initial=state.iteration, desc="RL-CAI", unit="iter",
                   disable=not cfg.logging.progress)
        pending: PendingRollout | None = None
        for it in range(state.iteration, num_iterations):
            timer = PhaseTimer()
            with timer.phase("generate"):
                samples = roles.collect(pending or roles.submit_generate(_iteration_prompts(cfg, pool, it), it))
            # async: the next batch is sampled with the current weights while this one is labelled and trained
            pending = roles.submit_generate(_iteration_prompts(cfg, pool, it + 1), it + 1) \
                if overlap and it + 1 < num_iterations else None
            samples, dropped = drop_stale(samples, current_version=state.version,
                                          max_staleness=cfg.schedule.max_staleness)
            with timer.phase("label"):
                requests, pairs = make_pairs(samples, iteration=it)
                labels = roles.feedback.label_pairs(requests)
            fresh = [pair_for_training(p, lab) for p, lab in zip(pairs, labels, strict=True) if lab.error is None]
            with timer.phase("pm_update"):
                pm_before = preference_accuracy(roles.learner.pm_scores(_flatten(fresh)), fresh) if fresh else {}
                state.replay = (state.replay + [fresh])[-cfg.schedule.replay_window:]
                pm_metrics = update_preference_model(roles, [p for window in state.replay for p in window],
                                                     epochs=cfg.learner.num_pm_epochs)
            with timer.phase("policy_update"):
                policy_metrics = update_policy(roles, cfg, samples, fresh)
            with timer.phase("idle"):
                if pending is not None:
                    roles.finish(pending)  # an engine must be done generating to join the weight sync
            state.version += 1
            with timer.phase("sync"):
                sync_metrics = roles.push_weights(state.version)
            state.iteration, state.dropped_stale = it + 1, state.dropped_stale + dropped
            with timer.phase("checkpoint"):
                write_jsonl([asdict(lab) for lab in labels], run_dir / "labels" / f"iter_{it:04d}.jsonl")
                if state.iteration % cfg.schedule.checkpoint_every == 0 or state.iteration == num_iterations:
                    save_checkpoint(roles, state, run_dir, cfg)
            metrics = {"iteration": float(it), "weight_version": float(state.version),
                       "samples/dropped_stale": float(dropped), "samples/dropped_stale_total": float(state.dropped_stale),
                       **sample_stats(samples), **label_stats(labels), **pm_before, **pm_metrics, **policy_metrics,
                       **sync_metrics, **timer.metrics()}
            writer.log(it, metrics)
            history.append(metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                            pm_acc=f"{metrics.get('pm_fresh/accuracy', float('nan')):.2f}")
            bar.update()
        return history
    finally:
        roles.shutdown()
        writer.close()


# ------------------------------------------------------------------------------------ phases
def make_pairs(samples: Sequence[Sample], *, iteration: int) -> tuple[list[ComparisonRequest], list[tuple[Sample, Sample]]]:
    """Pair consecutive samples of the same prompt: (0,1), (2,3), ...; an odd one out is unused."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.prompt_id, []).append(s)
    requests, pairs = [], []
    for pid, group in groups.items():
        group.sort(key=lambda s: s.sample_index)
        for j in range(0, len(group) - 1, 2):
            a, b = group[j], group[j + 1]
            requests.append(ComparisonRequest(f"it{iteration}/{pid}/{j}", a.prompt, a.response_text, b.response_text))
            pairs.append((a, b))
    return requests, pairs


def pair_for_training(pair: tuple[Sample, Sample], label: PreferenceLabel) -> TrainPair:
    """A labelled pair as the learner's input."""
    a, b = pair
    return TrainPair(a.prompt_token_ids, a.response_token_ids, b.response_token_ids, label.prob_a)


def drop_stale(samples: Sequence[Sample], *, current_version: int, max_staleness: int) -> tuple[list[Sample], int]:
    """Keep samples at most ``max_staleness`` versions behind ``current_version``; returns (kept, dropped)."""
    kept = [s for s in samples if current_version - s.weight_version <= max_staleness]
    return kept, len(samples) - len(kept)


def preference_accuracy(scores: Sequence[float], pairs: Sequence[TrainPair]) -> dict[str, float]:
    """The preference model's accuracy / loss on labelled pairs, from its scores of [a0, b0, a1, b1, ...]."""
    if not pairs:
        return {}
    r = torch.tensor(scores, dtype=torch.float32).view(-1, 2)
    _, metrics = preference_loss(reward_a=r[:, 0], reward_b=r[:, 1],
                                 prob_a=torch.tensor([p.prob_a for p in pairs], dtype=torch.float32))
    # "loss/pm" -> "pm_fresh/loss", "pm/accuracy" -> "pm_fresh/accuracy", ...
    return {k.replace("loss/pm", "pm/loss").replace("pm/", "pm_fresh/", 1): v for k, v in metrics.items()}


def update_preference_model(roles: Roles, pairs: Sequence[TrainPair], *, epochs: int) -> dict[str, float]:
    """``epochs`` passes over fresh + replayed labels, one optimizer step per pass."""
    metrics: dict[str, float] = {}
    for _ in range(epochs if pairs else 0):
        metrics = roles.learner.pm_step(list(pairs))
    return metrics


def update_policy(roles: Roles, cfg: ExperimentConfig, samples: Sequence[Sample],
                  pairs: Sequence[TrainPair]) -> dict[str, float]:
    """One policy update with the configured algorithm; returns its metrics plus the PM reward."""
    algorithm = cfg.learner.algorithm
    seqs = [TrainSequence(s.prompt_token_ids, s.response_token_ids, s.response_logprobs,
                          group_id=_group_ids(samples)[s.prompt_id]) for s in samples]
    rewards = roles.learner.pm_scores(seqs) if seqs else []
    out = {"reward/mean": _mean(rewards), "reward/std": _std(rewards)}
    for _ in range(cfg.learner.num_policy_epochs):
        if algorithm == "dpo":
            out |= roles.learner.dpo_step(list(pairs)) if pairs else {}
            continue
        scored = [TrainSequence(s.prompt_token_ids, s.response_token_ids, s.rollout_logprobs, r, s.group_id)
                  for s, r in zip(seqs, rewards, strict=True)]
        if algorithm == "ppo":
            out |= roles.learner.ppo_step(scored)
        else:
            out |= roles.learner.critic_free_step(_whole_groups(scored, cfg.rollout.num_samples_per_prompt),
                                                  algorithm)
    return out


def sample_stats(samples: Sequence[Sample]) -> dict[str, float]:
    """Response length and truncation rate."""
    lengths = [len(s.response_token_ids) for s in samples]
    return {"samples/count": float(len(samples)), "response/length_mean": _mean(lengths),
            "response/truncated_frac": _mean([float(s.finish_reason == "length") for s in samples])}


def label_stats(labels: Sequence[PreferenceLabel]) -> dict[str, float]:
    """Mean soft label, mean binary entropy (a collapsed judge has entropy near 0 or near log 2), errors."""
    ok = [lab.prob_a for lab in labels if lab.error is None]
    ent = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0 for p in ok]
    return {"labels/count": float(len(ok)), "labels/errors": float(len(labels) - len(ok)),
            "labels/prob_a_mean": _mean(ok), "labels/entropy": _mean(ent)}


# ---------------------------------------------------------------------------------- durability
class LoopState:
    """What a resumed run needs besides the learner: counters, versions and the replay window."""

    def __init__(self, iteration: int = 0, version: int = 0, dropped_stale: int = 0,
                 replay: list[list[TrainPair]] | None = None) -> None:
        self.iteration, self.version, self.dropped_stale = iteration, version, dropped_stale
        self.replay: list[list[TrainPair]] = replay or []

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (token ids as lists)."""
        return {"iteration": self.iteration, "version": self.version, "dropped_stale": self.dropped_stale,
                "replay": [[asdict(p) for p in window] for window in self.replay]}

    @classmethod
    def load(cls, run_dir: Path) -> LoopState:
        """The state of the last checkpoint under ``run_dir`` (a fresh state if there is none)."""
        path = _ckpt_dir(run_dir) / STATE_FILE
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        replay = [[TrainPair(tuple(p["prompt_token_ids"]), tuple(p["response_a_token_ids"]),
                             tuple(p["response_b_token_ids"]), p["prob_a"]) for p in window] for window in raw["replay"]]
        return cls(raw["iteration"], raw["version"], raw["dropped_stale"], replay)


def resume_from_checkpoint(roles: Roles, run_dir: Path) -> LoopState:
    """Restore the learner and loop state of ``run_dir``'s last checkpoint and push its weights to the engines."""
    state = LoopState.load(run_dir)
    if state.iteration > 0:
        roles.learner.load_checkpoint(str(_ckpt_dir(run_dir) / "learner"))
        roles.push_weights(state.version)
    return state


def save_checkpoint(roles: Roles, state: LoopState, run_dir: Path, cfg: ExperimentConfig) -> None:
    """Learner states + loop state + config, written to a temp folder then swapped in (never half-written)."""
    final = _ckpt_dir(run_dir)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    roles.learner.save_checkpoint(str(tmp / "learner"))
    (tmp / STATE_FILE).write_text(json.dumps(state.to_json()))
    (tmp / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


# -------------------------------------------------------------------------------------- helpers
def _prompt_pool(cfg: ExperimentConfig) -> dict[str, list[Prompt]]:
    def read(ds: Any) -> list[Prompt]:
        return [Prompt(r.id, r.prompt) for r in load_prompts(ds.path, prompt_field=ds.prompt_field,
                                                              id_field=ds.id_field, max_rows=ds.max_rows)]

    return {"red_team": read(cfg.data.red_team), "helpful": read(cfg.data.helpful)}


def _iteration_prompts(cfg: ExperimentConfig, pool: dict[str, list[Prompt]], iteration: int) -> list[Prompt]:
    """The iteration's prompts, a pure function of (seed, iteration) so a resumed run draws the same ones."""
    rng = random.Random(stable_seed(cfg.seed, "prompts", iteration))
    n = cfg.schedule.num_prompts_per_iteration
    n_helpful = round(n * cfg.schedule.helpful_fraction)
    picked = rng.sample(pool["red_team"], min(n - n_helpful, len(pool["red_team"])))
    picked += rng.sample(pool["helpful"], min(n_helpful, len(pool["helpful"])))
    return picked


def _flatten(pairs: Sequence[TrainPair]) -> list[TrainSequence]:
    out = []
    for p in pairs:
        out.append(TrainSequence(p.prompt_token_ids, p.response_a_token_ids))
        out.append(TrainSequence(p.prompt_token_ids, p.response_b_token_ids))
    return out


def _group_ids(samples: Sequence[Sample]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for s in samples:
        ids.setdefault(s.prompt_id, len(ids))
    return ids


def _whole_groups(seqs: Sequence[TrainSequence], k: int) -> list[TrainSequence]:
    """GRPO / RLOO need complete groups of k; staleness drops or rejections can leave partial ones."""
    counts: dict[int, int] = {}
    for s in seqs:
        counts[s.group_id] = counts.get(s.group_id, 0) + 1
    return [s for s in seqs if counts[s.group_id] == k]


def _ckpt_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoint"


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
