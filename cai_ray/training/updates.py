"""One plain update function per algorithm, run on every learner rank by ``LearnerGroup.update(fn, items)``.

Each is ``fn(worker, shard, num_valid, *, <its own sub-config>, ...)``; the controller binds the keywords once
(``functools.partial``) where the loop is built, and the group ships the bound function to the ranks. The
losses are the pure functions of :mod:`cai_ray.algorithms`; this module only turns a shard into their tensors.

- :func:`pm`: Bradley-Terry with soft labels (one head, or one loss per axis head, averaged).
- :func:`dpo`: soft-label sigmoid DPO against the frozen reference (``learner.dpo``).
- :func:`ppo`: per-token reward = PM reward at the last token - kl_coef * KL(policy || reference); GAE over the
  critic; clipped policy and value losses (``learner.ppo``).
- :func:`group`: the same clipped objective without a critic, the advantages from an estimator passed in:
  :func:`grpo` / :func:`rloo` (group baselines, a k3 KL-to-reference loss term; per-axis rewards are
  normalised per axis first, GDPO) or :func:`reinforce_pp` (KL in the per-token reward, batch-whitened returns).

The policy updates compute "old" log-probs (and values, rewards, advantages) once, then make ``num_epochs``
optimizer steps; the sampler's log-probs only feed ``policy/rollout_logprob_diff``. Each reports the engines'
optimizer-step counters (``policy/optimizer_steps``, ``critic/optimizer_steps``).
Simplification: advantages are whitened per rank, not across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cai_ray.algorithms.aggregation import decoupled_group_advantages
from cai_ray.algorithms.common import masked_mean, masked_whiten, sequence_logprobs
from cai_ray.algorithms.critic_free import (
    broadcast_sequence_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from cai_ray.algorithms.dpo import dpo_loss
from cai_ray.algorithms.ppo import (
    KLEstimator,
    gae_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
)
from cai_ray.algorithms.preference import preference_loss
from cai_ray.config import DPOConfig, PPOConfig
from cai_ray.training.learner import LearnerWorker, Metrics, scores, token_logprobs, values
from cai_ray.training.modeling import (
    SequenceBatch,
    collate_pairs,
    last_token_heads,
    pair_axis_probs,
    response_values,
)
from cai_ray.training.modeling import group_size as find_group_size
from cai_ray.types import TrainPair, TrainSequence

KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}  # learner.ppo.kl_estimator


# ----------------------------------------------------------------------------- preference model
def pm(worker: LearnerWorker, pairs: Sequence[TrainPair], num_valid: int) -> Metrics:
    """One optimizer step of the Bradley-Terry loss on soft labels."""

    def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
        batch, prob_a = collate_pairs(pairs[start:stop], pad_id=worker.pad_id,
                                      num_valid=max(0, min(num_valid - start, stop - start)))
        batch = batch.to(worker.device)
        k = stop - start
        valid = batch.valid[:k]
        if worker.roles.pm_axes:
            return _axis_pm_loss(worker, pairs[start:stop], batch, valid)
        rewards = scores(worker.preference, batch)
        if not valid.any():
            return rewards.sum() * 0.0, {}, 0
        loss, metrics = preference_loss(reward_a=rewards[:k][valid], reward_b=rewards[k:][valid],
                                        prob_a=prob_a.to(worker.device)[valid])
        return loss, metrics, int(valid.sum())

    return worker.train_step(worker.preference, num_items=len(pairs), num_valid=num_valid, loss_fn=loss_fn)


def _axis_pm_loss(worker: LearnerWorker, pairs: Sequence[TrainPair], batch: SequenceBatch,
                  valid: Tensor) -> tuple[Tensor, Metrics, int]:
    """Multi-head PM: each head's Bradley-Terry loss on its axis's soft labels, averaged over the axes."""
    k, axes = len(pairs), worker.roles.pm_axes
    heads = last_token_heads(worker.preference.module.forward_heads(batch.input_ids, batch.attention_mask),
                             batch.attention_mask)  # [2k, K]
    if not valid.any():  # filler still runs backward (a collective under ZeRO-3)
        return heads.sum() * 0.0, {}, 0
    targets = pair_axis_probs(pairs, len(axes)).to(worker.device)[valid]
    losses, metrics = [], {}
    for j, axis in enumerate(axes):
        loss, m = preference_loss(reward_a=heads[:k, j][valid], reward_b=heads[k:, j][valid], prob_a=targets[:, j])
        losses.append(loss)
        metrics |= {f"pm/{axis}/{name.removeprefix('pm/')}": v for name, v in m.items() if name != "loss/pm"}
        metrics[f"loss/pm/{axis}"] = m["loss/pm"]
    loss = torch.stack(losses).mean()
    return loss, metrics | {"loss/pm": float(loss.detach())}, int(valid.sum())


# ------------------------------------------------------------------------------------------ DPO
def dpo(worker: LearnerWorker, pairs: Sequence[TrainPair], num_valid: int, *, cfg: DPOConfig,
        num_epochs: int) -> Metrics:
    """``num_epochs`` optimizer steps of soft-label sigmoid DPO against the frozen reference."""

    def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
        batch, prob_a = collate_pairs(pairs[start:stop], pad_id=worker.pad_id,
                                      num_valid=max(0, min(num_valid - start, stop - start)))
        batch = batch.to(worker.device)
        k = stop - start
        logps = sequence_logprobs(token_logprobs(worker.policy, batch), batch.loss_mask)
        with torch.no_grad():
            ref = sequence_logprobs(token_logprobs(worker.reference, batch), batch.loss_mask)
        valid = batch.valid[:k]
        if not valid.any():
            return logps.sum() * 0.0, {}, 0
        loss, metrics = dpo_loss(policy_logps_a=logps[:k][valid], policy_logps_b=logps[k:][valid],
                                 ref_logps_a=ref[:k][valid], ref_logps_b=ref[k:][valid],
                                 prob_a=prob_a.to(worker.device)[valid], beta=cfg.beta,
                                 label_smoothing=cfg.label_smoothing)
        return loss, metrics, int(valid.sum())

    metrics: Metrics = {}
    for _ in range(num_epochs):
        metrics = worker.train_step(worker.policy, num_items=len(pairs), num_valid=num_valid, loss_fn=loss_fn)
    return metrics | worker.optimizer_steps()


# ---------------------------------------------------------------------------------- rollouts
@dataclass(frozen=True)
class Rollout:
    """A shard of scored rollouts with the tensors every policy update starts from (computed once)."""

    seqs: Sequence[TrainSequence]
    batch: SequenceBatch
    old: Tensor  # [B, T-1] policy log-probs before the update
    ref: Tensor  # [B, T-1] reference log-probs
    rewards: Tensor  # [B] sequence rewards (filler rows: 0)
    mix: tuple[float, ...]  # the PM's axis weights (empty: one head)


def rollout(worker: LearnerWorker, seqs: Sequence[TrainSequence], num_valid: int) -> Rollout:
    """Old and reference log-probs of a shard, and its rewards (set by the controller from the PM's scores)."""
    missing = [i for i, s in enumerate(seqs[:num_valid]) if s.reward is None]
    if missing:  # before the first collective, so that a rank with all its rewards is not left waiting for long
        raise ValueError(f"sequences {missing[:5]} have no reward; score them first (learner.pm_scores)")
    batch = worker.sequences(seqs, num_valid)
    rewards = torch.tensor([s.reward if s.reward is not None else 0.0 for s in seqs], dtype=torch.float32)
    return Rollout(seqs, batch, worker.per_token(token_logprobs, worker.policy, batch),
                   worker.per_token(token_logprobs, worker.reference, batch), rewards,
                   worker.roles.pm_mix if worker.roles.pm_axes else ())


def _rollout_stats(r: Rollout) -> Metrics:
    mask = r.batch.loss_mask
    metrics = {"kl/mean": float(masked_mean(r.old - r.ref, mask))}
    if all(s.rollout_logprobs is not None for s in r.seqs):
        sampled = response_values(r.batch, r.seqs, [s.rollout_logprobs for s in r.seqs])
        metrics["policy/rollout_logprob_diff"] = float(masked_mean((r.old - sampled).abs(), mask))
    return metrics


def _kl_rewards(r: Rollout, cfg: PPOConfig) -> Tensor:
    """[B, T-1] per-token rewards: -kl_coef * KL (``cfg.kl_estimator``) plus the sequence reward at the end."""
    return kl_penalized_rewards(sequence_rewards=r.rewards, logprobs=r.old, ref_logprobs=r.ref,
                                mask=r.batch.loss_mask, kl_coef=cfg.kl_coef,
                                kl_estimator=KL_ESTIMATORS[cfg.kl_estimator])


def _policy_step(worker: LearnerWorker, r: Rollout, cfg: PPOConfig, *, advantages: Tensor,
                 kl_ref: Tensor | None) -> Metrics:
    """One optimizer step of the clipped objective (+ a k3 KL-to-reference term when ``kl_ref`` is given)."""
    batch = r.batch

    def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
        mb = batch.rows(start, stop).to(worker.device)
        cols = (slice(start, stop), slice(0, mb.loss_mask.shape[1]))
        logps = token_logprobs(worker.policy, mb)
        loss, metrics = policy_loss(logprobs=logps, old_logprobs=r.old[cols].to(worker.device),
                                    advantages=advantages[cols].to(worker.device), mask=mb.loss_mask,
                                    clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high)
        if kl_ref is not None:
            kl = masked_mean(kl_k3(logps, kl_ref[cols].to(worker.device)), mb.loss_mask)
            loss = loss + cfg.kl_coef * kl
            metrics["kl/policy_ref"] = float(kl.detach())
        return loss, metrics, int(mb.valid.sum())

    return worker.train_step(worker.policy, num_items=batch.num_rows, num_valid=int(batch.valid.sum()),
                             loss_fn=loss_fn)


def _value_step(worker: LearnerWorker, batch: SequenceBatch, cfg: PPOConfig, *, old_values: Tensor,
                returns: Tensor) -> Metrics:
    def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
        mb = batch.rows(start, stop).to(worker.device)
        cols = (slice(start, stop), slice(0, mb.loss_mask.shape[1]))
        loss, metrics = value_loss(values=values(worker.critic, mb), old_values=old_values[cols].to(worker.device),
                                   returns=returns[cols].to(worker.device), mask=mb.loss_mask,
                                   clip_eps=cfg.value_clip_eps)
        return loss, metrics, int(mb.valid.sum())

    return worker.train_step(worker.critic, num_items=batch.num_rows, num_valid=int(batch.valid.sum()),
                             loss_fn=loss_fn)


# ------------------------------------------------------------------------------------------ PPO
def ppo(worker: LearnerWorker, seqs: Sequence[TrainSequence], num_valid: int, *, cfg: PPOConfig,
        num_epochs: int) -> Metrics:
    """PPO on fixed rollouts: KL-penalised PM rewards, GAE over the critic, clipped policy + value losses."""
    r = rollout(worker, seqs, num_valid)
    old_values = worker.per_token(values, worker.critic, r.batch)
    advantages, returns = gae_advantages(rewards=_kl_rewards(r, cfg), values=old_values, mask=r.batch.loss_mask,
                                         gamma=cfg.gamma, lam=cfg.gae_lambda)
    advantages = masked_whiten(advantages, r.batch.loss_mask)
    metrics = _rollout_stats(r)
    for _ in range(num_epochs):
        metrics |= _policy_step(worker, r, cfg, advantages=advantages, kl_ref=None)
        metrics |= _value_step(worker, r.batch, cfg, old_values=old_values, returns=returns)
    return metrics | worker.optimizer_steps()


# ---------------------------------------------------------------------------------- critic-free
# An advantage estimator: (rollout, samples per prompt or None (found from the rollout), cfg) ->
# ([B, T-1] advantages, the reference log-probs of a KL loss term or None).
Estimator = Callable[[Rollout, int | None, PPOConfig], tuple[Tensor, Tensor | None]]


def group(worker: LearnerWorker, seqs: Sequence[TrainSequence], num_valid: int, *, cfg: PPOConfig,
          estimator: Estimator, num_epochs: int, samples_per_prompt: int | None = None) -> Metrics:
    """The clipped objective with critic-free advantages from ``estimator`` (:func:`grpo`, :func:`rloo`,
    :func:`reinforce_pp`); ``num_epochs`` optimizer steps.

    Groups are contiguous runs of ``group_id`` of ``samples_per_prompt`` rows (found from ``seqs`` when None;
    pass it when filler copies of a group may sit next to the real one).
    """
    r = rollout(worker, seqs, num_valid)
    advantages, kl_ref = estimator(r, samples_per_prompt, cfg)
    metrics = _rollout_stats(r)
    for _ in range(num_epochs):
        metrics |= _policy_step(worker, r, cfg, advantages=advantages, kl_ref=kl_ref)
    return metrics | worker.optimizer_steps()


def _group_baseline(r: Rollout, group_size: int, *, kind: str,
                    one_axis: Callable[[Tensor, int], Tensor]) -> Tensor:
    """[B, T-1] group-baseline advantages; with per-axis rewards each axis is normalised in its group (GDPO)."""
    if r.mix and all(s.axis_rewards is not None for s in r.seqs):
        axis_rewards = torch.tensor([list(s.axis_rewards or ()) for s in r.seqs], dtype=torch.float32)
        seq_adv = decoupled_group_advantages(axis_rewards, torch.tensor(r.mix, dtype=torch.float32),
                                             group_size=group_size, estimator=kind)  # type: ignore[arg-type]
    else:
        seq_adv = one_axis(r.rewards, group_size)
    return broadcast_sequence_advantages(seq_adv, r.batch.loss_mask)


def grpo(r: Rollout, group_size: int | None, cfg: PPOConfig, *, scale_rewards: bool) -> tuple[Tensor, Tensor | None]:
    """GRPO: group z-scores (``scale_rewards=False``: mean-centred only, Dr. GRPO), KL as a loss term."""
    adv = _group_baseline(r, group_size or find_group_size(r.seqs), kind="grpo",
                          one_axis=lambda rewards, k: grpo_advantages(rewards=rewards, group_size=k,
                                                                      scale=scale_rewards))
    return adv, r.ref


def rloo(r: Rollout, group_size: int | None, cfg: PPOConfig) -> tuple[Tensor, Tensor | None]:
    """RLOO: leave-one-out group baselines, KL as a loss term."""
    adv = _group_baseline(r, group_size or find_group_size(r.seqs), kind="rloo",
                          one_axis=lambda rewards, k: rloo_advantages(rewards=rewards, group_size=k))
    return adv, r.ref


def reinforce_pp(r: Rollout, group_size: int | None, cfg: PPOConfig) -> tuple[Tensor, Tensor | None]:
    """REINFORCE++: KL in the per-token reward, discounted returns whitened over the batch; no KL loss term."""
    return reinforce_pp_advantages(token_rewards=_kl_rewards(r, cfg), mask=r.batch.loss_mask, gamma=cfg.gamma), None
