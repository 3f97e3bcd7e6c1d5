"""One rank of the learner: policy, frozen reference, preference model and critic as DeepSpeed engines.

A plain class (``LearnerGroup`` makes it a Ray actor, one per rank). Every verb method is a collective
under ZeRO-3 (forwards and gathers), so all ranks must call it together, each with its own shard of the
same length (``modeling.shard``; filler rows carry no loss). A step turns its shard into micro-batches
of ``micro_batch_size`` rows, accumulates their gradients and takes one optimizer step per engine; the
policy updates (``dpo_step``, ``ppo_step``, ``critic_free_step``) are the one place that makes
``num_policy_epochs`` such passes, after computing "old" log-probs, rewards and advantages once. Each
reports its engines' optimizer-step counters (``policy/optimizer_steps``, ``critic/optimizer_steps``).

Algorithms (pure losses from ``cai_ray.algorithms``):
- SFT: token NLL on responses.  PM: Bradley-Terry with soft labels.  DPO: sigmoid DPO against the reference.
- PPO: per-token reward = PM reward at the last token - kl_coef * KL(policy || reference); GAE over the
  critic; clipped policy and value losses. ``old`` log-probs are recomputed by the learner before the
  update (the sampler's log-probs only feed the ``policy/rollout_logprob_diff`` metric).
- Critic-free: GRPO / RLOO group baselines with a k3 KL-to-reference loss term; REINFORCE++ with the KL in
  the per-token reward and batch-whitened returns.
Simplifications: advantages are whitened per rank (not across ranks); DeepSpeed averages gradients over
ranks with equal weight per rank.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cai_ray.algorithms.common import gather_token_logprobs, masked_mean, masked_whiten, sequence_logprobs
from cai_ray.algorithms.critic_free import (
    broadcast_sequence_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from cai_ray.algorithms.dpo import dpo_loss
from cai_ray.algorithms.ppo import gae_advantages, kl_k1, kl_k3, kl_penalized_rewards, policy_loss, value_loss
from cai_ray.algorithms.preference import preference_loss
from cai_ray.algorithms.aggregation import decoupled_group_advantages
from cai_ray.algorithms.sft import sft_loss
from cai_ray.backend import enter_role
from cai_ray.config import LearnerConfig, ModelConfig, ModelsConfig
from cai_ray.models import ModelRef
from cai_ray.sync import GroupSpec, ObjectStoreBucket, StatelessGroupTransport, SyncTimings, object_store_send
from cai_ray.training import engine as ds
from cai_ray.training.modeling import (
    ScalarHeadModel,
    SequenceBatch,
    collate_pairs,
    collate_sequences,
    last_token_heads,
    last_token_scores,
    pair_axis_probs,
    micro_batches,
    response_rows,
    response_values,
)
from cai_ray.training.modeling import (
    group_size as find_group_size,
)
from cai_ray.types import TrainPair, TrainSequence

Metrics = dict[str, float]
KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}
CRITIC_FREE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


@dataclass(frozen=True)
class LearnerRoles:
    """Which models a learner holds besides the policy."""

    reference: bool = True  # frozen copy for KL / DPO
    preference_model: bool = False  # scalar-head PM, trained with pm_step
    critic: bool = False  # PPO value model
    pm_axes: tuple[str, ...] = ()  # feedback.label_axes: one PM head per axis (empty: one head)
    pm_mix: tuple[float, ...] = ()  # the aggregation rule's axis weights that mix the heads into the reward

    @classmethod
    def for_algorithm(cls, algorithm: str) -> LearnerRoles:
        """DPO needs only the reference; PPO and the critic-free methods score with a PM; PPO adds a critic."""
        return cls(reference=True, preference_model=algorithm != "dpo", critic=algorithm == "ppo")


class LearnerWorker:
    """One data-parallel rank. Construct cheaply, then ``open_rendezvous`` (rank 0) and ``setup`` (all)."""

    def __init__(self, *, rank: int, world_size: int, learner: LearnerConfig, models: ModelsConfig, seed: int,
                 roles: LearnerRoles) -> None:
        self.rank, self.world_size = rank, world_size
        self.cfg, self.models, self.seed, self.roles = learner, models, seed, roles
        self.backend = enter_role("learner", learner.resources, uses_vllm=False)
        self._store: torch.distributed.TCPStore | None = None
        self._sync_store: torch.distributed.TCPStore | None = None  # rank 0: the current weight sync's store
        self.policy: Any = None
        self.reference: Any = None
        self.preference: Any = None
        self.critic: Any = None
        self.refs: dict[str, ModelRef] = {}  # role -> where its model came from (its tokenizer is saved along)
        self.device = torch.device("cuda" if self.backend.device == "cuda" else "cpu")
        self.pad_id = 0

    # ---------------------------------------------------------------------------------- set-up
    def open_rendezvous(self) -> tuple[str, int]:
        """Rank 0: open the rendezvous store on a free port; returns (address, port) for the others."""
        self._store, addr, port = ds.open_store(self.world_size, timeout_s=self.cfg.collective_timeout_s)
        return addr, port

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the process group, then load and wrap every model (identical initial weights on all ranks)."""
        ds.init_distributed(backend=self.backend.dist_backend, rank=self.rank, world_size=self.world_size,
                            master_addr=master_addr, master_port=master_port,
                            timeout_s=self.cfg.collective_timeout_s, store=self._store)
        torch.manual_seed(self.seed)  # same fresh heads on every rank
        policy_cfg = self.models.policy
        self.policy = self._wrap(self._causal_lm("policy", policy_cfg), lr=self.cfg.lr)
        self.pad_id = _pad_id(self.policy.module.config)
        if self.roles.reference:
            self.reference = self._wrap(self._causal_lm("reference", self.models.resolved_reference()), lr=None)
        if self.roles.preference_model:
            self.preference = self._wrap(self._preference_model(), lr=self.cfg.pm_lr)
        if self.roles.critic:
            self.critic = self._wrap(self._scalar("critic", self.models.resolved_preference()), lr=self.cfg.critic_lr)
        torch.manual_seed(self.seed + 1000 * (self.rank + 1))
        return self.ping()

    def _dtype(self, model: ModelConfig) -> torch.dtype:
        return self.backend.torch_dtype(model.dtype)

    def _resolve(self, role: str, model: ModelConfig) -> ModelRef:
        self.refs[role] = ModelRef.of(model)
        return self.refs[role]

    def _causal_lm(self, role: str, model: ModelConfig) -> torch.nn.Module:
        return self._resolve(role, model).causal_lm(dtype=self._dtype(model))

    def _scalar(self, role: str, model: ModelConfig) -> ScalarHeadModel:
        """A saved scalar-head folder loads with its head; a plain LM folder gets a fresh head."""
        ref = self._resolve(role, model)
        if ScalarHeadModel.is_saved_at(ref.path):
            return ScalarHeadModel.from_pretrained(ref, dtype=self._dtype(model))
        return ScalarHeadModel.from_backbone(ref, dtype=self._dtype(model))

    def _preference_model(self) -> ScalarHeadModel:
        """The PM: one head, or one per ``roles.pm_axes``; a saved PM must have those same axes."""
        model = self.models.resolved_preference()
        ref = self._resolve("preference", model)
        if not ScalarHeadModel.is_saved_at(ref.path):
            return ScalarHeadModel.from_backbone(ref, dtype=self._dtype(model), axes=self.roles.pm_axes,
                                                 mix=self.roles.pm_mix)
        pm = ScalarHeadModel.from_pretrained(ref, dtype=self._dtype(model))
        if pm.axes != self.roles.pm_axes:
            raise ValueError(f"preference model {ref.path} has heads for axes {list(pm.axes)} but this run labels "
                             f"{list(self.roles.pm_axes)}; set feedback.label_axes to match, or start a fresh PM")
        pm.mix.copy_(torch.tensor(self.roles.pm_mix or [1.0]))  # this run's aggregation rule mixes the heads
        return pm

    def _wrap(self, module: torch.nn.Module, *, lr: float | None) -> Any:
        config = ds.ds_config(self.cfg, world_size=self.world_size, dtype=next(module.parameters()).dtype,
                              trainable=lr is not None)
        return ds.wrap(module, config=config, lr=lr, weight_decay=self.cfg.weight_decay,
                       gradient_checkpointing=self.cfg.gradient_checkpointing)

    def ping(self) -> dict[str, Any]:
        """Who and where this rank is."""
        return {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "ip": ds.node_ip()}

    # ------------------------------------------------------------------------------- forwards
    def _token_logprobs(self, model: Any, mb: SequenceBatch) -> Tensor:
        """[B, T-1] log-prob of each next token."""
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        return gather_token_logprobs(logits[:, :-1], mb.labels)

    def _values(self, model: Any, mb: SequenceBatch) -> Tensor:
        """[B, T-1] critic values of the state before each next token."""
        return model(mb.input_ids, mb.attention_mask)[:, :-1]

    def _scores(self, model: Any, mb: SequenceBatch) -> Tensor:
        """[B] scalar at each row's last real token."""
        return last_token_scores(model(mb.input_ids, mb.attention_mask), mb.attention_mask)

    @torch.no_grad()
    def _per_token(self, fn: Callable[[Any, SequenceBatch], Tensor], model: Any, batch: SequenceBatch) -> Tensor:
        """Run ``fn`` micro-batch by micro-batch without grad and assemble [B, T-1] (zeros past each row)."""
        out = torch.zeros(batch.loss_mask.shape, dtype=torch.float32)
        for start, stop in micro_batches(batch.num_rows, self.cfg.micro_batch_size):
            mb = batch.rows(start, stop)
            out[start:stop, : mb.loss_mask.shape[1]] = fn(model, mb.to(self.device)).float().cpu()
        return out

    def _train(self, engine: Any, *, num_items: int, num_valid: int,
               loss_fn: Callable[[int, int], tuple[Tensor, Metrics, int]]) -> Metrics:
        """Accumulate gradients over micro-batches of ``num_items`` items and take one optimizer step.

        ``loss_fn(start, stop)`` returns (mean loss over the micro-batch's valid items, metrics, number of
        valid items); each loss is weighted by its share of the shard's ``num_valid`` items, so the step
        optimises the shard mean. A micro-batch of filler still runs backward (a collective), with zero loss.
        """
        spans = micro_batches(num_items, self.cfg.micro_batch_size)
        totals: dict[str, float] = {}
        for i, (start, stop) in enumerate(spans):
            engine.set_gradient_accumulation_boundary(i == len(spans) - 1)
            loss, metrics, weight = loss_fn(start, stop)
            engine.backward(loss * (weight / num_valid) if weight else loss * 0.0)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * weight
        engine.step()
        return {k: v / num_valid for k, v in totals.items()} if num_valid else {}

    # ------------------------------------------------------------------------------------ SFT
    def sft_step(self, seqs: Sequence[TrainSequence], num_valid: int | None = None) -> Metrics:
        """One optimizer step of masked-token NLL on the responses."""
        n = len(seqs) if num_valid is None else num_valid
        batch = collate_sequences(seqs, pad_id=self.pad_id, num_valid=n)

        def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
            mb = batch.rows(start, stop).to(self.device)
            logits = self.policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
            loss, metrics = sft_loss(logits=logits[:, :-1], labels=mb.labels, loss_mask=mb.loss_mask)
            return loss, metrics, int(mb.valid.sum())

        return self._train(self.policy, num_items=batch.num_rows, num_valid=n, loss_fn=loss_fn)

    # ------------------------------------------------------------------------- preference model
    def pm_step(self, pairs: Sequence[TrainPair], num_valid: int | None = None) -> Metrics:
        """One optimizer step of the Bradley-Terry loss on soft labels."""
        n = len(pairs) if num_valid is None else num_valid

        def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
            batch, prob_a = collate_pairs(pairs[start:stop], pad_id=self.pad_id,
                                          num_valid=max(0, min(n - start, stop - start)))
            batch = batch.to(self.device)
            k = stop - start
            valid = batch.valid[:k]
            if self.roles.pm_axes:
                return self._axis_pm_loss(pairs[start:stop], batch, valid)
            scores = self._scores(self.preference, batch)
            if not valid.any():
                return scores.sum() * 0.0, {}, 0
            loss, metrics = preference_loss(reward_a=scores[:k][valid], reward_b=scores[k:][valid],
                                            prob_a=prob_a.to(self.device)[valid])
            return loss, metrics, int(valid.sum())

        return self._train(self.preference, num_items=len(pairs), num_valid=n, loss_fn=loss_fn)

    def _axis_pm_loss(self, pairs: Sequence[TrainPair], batch: SequenceBatch,
                      valid: Tensor) -> tuple[Tensor, Metrics, int]:
        """Multi-head PM: each head's Bradley-Terry loss on its axis's soft labels, averaged over the axes."""
        k, axes = len(pairs), self.roles.pm_axes
        heads = last_token_heads(self.preference.module.forward_heads(batch.input_ids, batch.attention_mask),
                                 batch.attention_mask)  # [2k, K]
        if not valid.any():  # filler still runs backward (a collective under ZeRO-3)
            return heads.sum() * 0.0, {}, 0
        targets = pair_axis_probs(pairs, len(axes)).to(self.device)[valid]
        losses, metrics = [], {}
        for j, axis in enumerate(axes):
            loss, m = preference_loss(reward_a=heads[:k, j][valid], reward_b=heads[k:, j][valid],
                                      prob_a=targets[:, j])
            losses.append(loss)
            metrics |= {f"pm/{axis}/{name.removeprefix('pm/')}": v for name, v in m.items() if name != "loss/pm"}
            metrics[f"loss/pm/{axis}"] = m["loss/pm"]
        loss = torch.stack(losses).mean()
        return loss, metrics | {"loss/pm": float(loss.detach())}, int(valid.sum())

    @torch.no_grad()
    def pm_axis_scores(self, seqs: Sequence[TrainSequence], num_valid: int | None = None) -> list[list[float]]:
        """Per-axis head scores [K] of each (valid) sequence (multi-head PM)."""
        n = len(seqs) if num_valid is None else num_valid
        batch = collate_sequences(seqs, pad_id=self.pad_id, num_valid=n)
        out: list[list[float]] = []
        for start, stop in micro_batches(batch.num_rows, self.cfg.micro_batch_size):
            mb = batch.rows(start, stop).to(self.device)
            heads = self.preference.module.forward_heads(mb.input_ids, mb.attention_mask)
            out += last_token_heads(heads, mb.attention_mask).float().cpu().tolist()
        return out[:n]

    @torch.no_grad()
    def pm_scores(self, seqs: Sequence[TrainSequence], num_valid: int | None = None) -> list[float]:
        """Preference-model reward of each (valid) sequence."""
        n = len(seqs) if num_valid is None else num_valid
        batch = collate_sequences(seqs, pad_id=self.pad_id, num_valid=n)
        out: list[float] = []
        for start, stop in micro_batches(batch.num_rows, self.cfg.micro_batch_size):
            out += self._scores(self.preference, batch.rows(start, stop).to(self.device)).float().cpu().tolist()
        return out[:n]

    # ------------------------------------------------------------------------------------ DPO
    def dpo_step(self, pairs: Sequence[TrainPair], num_valid: int | None = None) -> Metrics:
        """``num_policy_epochs`` optimizer steps of soft-label sigmoid DPO against the frozen reference."""
        n = len(pairs) if num_valid is None else num_valid

        def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
            batch, prob_a = collate_pairs(pairs[start:stop], pad_id=self.pad_id,
                                          num_valid=max(0, min(n - start, stop - start)))
            batch = batch.to(self.device)
            k = stop - start
            logps = sequence_logprobs(self._token_logprobs(self.policy, batch), batch.loss_mask)
            with torch.no_grad():
                ref = sequence_logprobs(self._token_logprobs(self.reference, batch), batch.loss_mask)
            valid = batch.valid[:k]
            if not valid.any():
                return logps.sum() * 0.0, {}, 0
            loss, metrics = dpo_loss(policy_logps_a=logps[:k][valid], policy_logps_b=logps[k:][valid],
                                     ref_logps_a=ref[:k][valid], ref_logps_b=ref[k:][valid],
                                     prob_a=prob_a.to(self.device)[valid], beta=self.cfg.dpo_beta,
                                     label_smoothing=self.cfg.dpo_label_smoothing)
            return loss, metrics, int(valid.sum())

        metrics: Metrics = {}
        for _ in range(self.cfg.num_policy_epochs):
            metrics = self._train(self.policy, num_items=len(pairs), num_valid=n, loss_fn=loss_fn)
        return metrics | self._optimizer_steps()

    def _optimizer_steps(self) -> Metrics:
        """Optimizer steps each trainable policy-side engine has taken so far (restored by a resume)."""
        engines = {"policy": self.policy, "critic": self.critic}
        return {f"{name}/optimizer_steps": float(e.global_steps) for name, e in engines.items() if e is not None}

    # ---------------------------------------------------------------------------------- log-probs
    @torch.no_grad()
    def policy_logprobs(self, seqs: Sequence[TrainSequence], num_valid: int | None = None) -> list[tuple[float, ...]]:
        """Per-response-token log-probs under the current policy, for each valid sequence."""
        batch = collate_sequences(seqs, pad_id=self.pad_id, num_valid=num_valid)
        return response_rows(self._per_token(self._token_logprobs, self.policy, batch), batch)

    # ------------------------------------------------------------------------------------ PPO
    def _policy_update(self, batch: SequenceBatch, *, old: Tensor, advantages: Tensor,
                       kl_ref: Tensor | None) -> Metrics:
        """One optimizer step of the clipped objective (+ k3 KL-to-reference term when ``ref`` is given)."""

        def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
            mb = batch.rows(start, stop).to(self.device)
            width = mb.loss_mask.shape[1]
            cols = (slice(start, stop), slice(0, width))
            logps = self._token_logprobs(self.policy, mb)
            loss, metrics = policy_loss(logprobs=logps, old_logprobs=old[cols].to(self.device),
                                        advantages=advantages[cols].to(self.device), mask=mb.loss_mask,
                                        clip_eps=self.cfg.clip_eps, clip_eps_high=self.cfg.clip_eps_high)
            if kl_ref is not None:
                kl = masked_mean(kl_k3(logps, kl_ref[cols].to(self.device)), mb.loss_mask)
                loss = loss + self.cfg.kl_coef * kl
                metrics["kl/policy_ref"] = float(kl.detach())
            return loss, metrics, int(mb.valid.sum())

        return self._train(self.policy, num_items=batch.num_rows, num_valid=int(batch.valid.sum()), loss_fn=loss_fn)

    def _value_update(self, batch: SequenceBatch, *, old_values: Tensor, returns: Tensor) -> Metrics:
        def loss_fn(start: int, stop: int) -> tuple[Tensor, Metrics, int]:
            mb = batch.rows(start, stop).to(self.device)
            cols = (slice(start, stop), slice(0, mb.loss_mask.shape[1]))
            values = self._values(self.critic, mb)
            loss, metrics = value_loss(values=values, old_values=old_values[cols].to(self.device),
                                       returns=returns[cols].to(self.device), mask=mb.loss_mask,
                                       clip_eps=self.cfg.value_clip_eps)
            return loss, metrics, int(mb.valid.sum())

        return self._train(self.critic, num_items=batch.num_rows, num_valid=int(batch.valid.sum()), loss_fn=loss_fn)

    def _rollout_stats(self, seqs: Sequence[TrainSequence], batch: SequenceBatch, old: Tensor,
                       ref: Tensor) -> Metrics:
        kl = masked_mean(old - ref, batch.loss_mask)
        metrics = {"kl/mean": float(kl)}
        if all(s.rollout_logprobs is not None for s in seqs):
            rollout = response_values(batch, seqs, [s.rollout_logprobs for s in seqs])
            metrics["policy/rollout_logprob_diff"] = float(masked_mean((old - rollout).abs(), batch.loss_mask))
        return metrics

    def _rewards(self, seqs: Sequence[TrainSequence], num: int) -> Tensor:
        missing = [i for i, s in enumerate(seqs[:num]) if s.reward is None]
        if missing:
            raise ValueError(f"sequences {missing[:5]} have no reward; score them first (pm_scores)")
        return torch.tensor([s.reward if s.reward is not None else 0.0 for s in seqs], dtype=torch.float32)

    def ppo_step(self, seqs: Sequence[TrainSequence], num_valid: int | None = None) -> Metrics:
        """PPO on fixed rollouts: KL-penalised PM rewards, GAE over the critic, clipped policy + value losses.

        Old log-probs, values and advantages are computed once; then ``num_policy_epochs`` optimizer steps each.
        """
        n = len(seqs) if num_valid is None else num_valid
        batch = collate_sequences(seqs, pad_id=self.pad_id, num_valid=n)
        old = self._per_token(self._token_logprobs, self.policy, batch)
        ref = self._per_token(self._token_logprobs, self.reference, batch)
        old_values = self._per_token(self._values, self.critic, batch)
        rewards = kl_penalized_rewards(sequence_rewards=self._rewards(seqs, n), logprobs=old, ref_logprobs=ref,
                                       mask=batch.loss_mask, kl_coef=self.cfg.kl_coef,
                                       kl_estimator=KL_ESTIMATORS[self.cfg.kl_estimator])
        advantages, returns = gae_advantages(rewards=rewards, values=old_values, mask=batch.loss_mask,
                                             gamma=self.cfg.gamma, lam=self.cfg.gae_lambda)
        advantages = masked_whiten(advantages, batch.loss_mask)
        metrics = self._rollout_stats(seqs, batch, old, ref)
        for _ in range(self.cfg.num_policy_epochs):
            metrics |= self._policy_update(batch, old=old, advantages=advantages, kl_ref=None)
            metrics |= self._value_update(batch, old_values=old_values, returns=returns)
        return metrics | self._optimizer_steps()

    # --------------------------------------------------------------------------- critic-free
    def critic_free_step(self, seqs: Sequence[TrainSequence], estimator: str, num_valid: int | None = None,
                         samples_per_prompt: int | None = None) -> Metrics:
        """GRPO / RLOO (group baselines, KL as a loss term) or REINFORCE++ (KL in the reward).

        GRPO/RLOO groups are contiguous runs of ``group_id`` of ``samples_per_prompt`` rows (found from
        ``seqs`` when None; pass it when filler copies of a group may sit next to the real one). Old log-probs
        and advantages are computed once; then ``num_policy_epochs`` optimizer steps.
        """
        if estimator not in CRITIC_FREE_ESTIMATORS:
            raise ValueError(f"estimator {estimator!r}: expected one of {CRITIC_FREE_ESTIMATORS}")
        n = len(seqs) if num_valid is None else num_valid
        batch = collate_sequences(seqs, pad_id=self.pad_id, num_valid=n)
        old = self._per_token(self._token_logprobs, self.policy, batch)
        ref = self._per_token(self._token_logprobs, self.reference, batch)
        rewards = self._rewards(seqs, n)
        if estimator == "reinforce_pp":
            token_rewards = kl_penalized_rewards(sequence_rewards=rewards, logprobs=old, ref_logprobs=ref,
                                                 mask=batch.loss_mask, kl_coef=self.cfg.kl_coef,
                                                 kl_estimator=KL_ESTIMATORS[self.cfg.kl_estimator])
            advantages = reinforce_pp_advantages(token_rewards=token_rewards, mask=batch.loss_mask,
                                                 gamma=self.cfg.gamma)
            kl_ref = None
        else:
            k = samples_per_prompt or find_group_size(seqs)
            if self.roles.pm_axes and all(s.axis_rewards is not None for s in seqs):
                # per-axis rewards: each axis normalised within its group before the weighted sum (GDPO)
                seq_adv = decoupled_group_advantages(
                    torch.tensor([list(s.axis_rewards) for s in seqs], dtype=torch.float32),  # type: ignore[arg-type]
                    torch.tensor(self.roles.pm_mix, dtype=torch.float32), group_size=k, estimator=estimator)
            else:
                seq_adv = (grpo_advantages(rewards=rewards, group_size=k, scale=self.cfg.grpo_scale_rewards)
                           if estimator == "grpo" else rloo_advantages(rewards=rewards, group_size=k))
            advantages = broadcast_sequence_advantages(seq_adv, batch.loss_mask)
            kl_ref = ref
        metrics = self._rollout_stats(seqs, batch, old, ref)
        for _ in range(self.cfg.num_policy_epochs):
            metrics |= self._policy_update(batch, old=old, advantages=advantages, kl_ref=kl_ref)
        return metrics | self._optimizer_steps()

    # ---------------------------------------------------------------------------- weights out
    def export_weights(self, bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
        """Yield the policy's (HF name, tensor) pairs bucket by bucket on rank 0 (nothing elsewhere).

        A collective under ZeRO-3: every rank must run this generator to its end together.
        """
        for bucket in ds.gathered_buckets(self.policy.module, bucket_bytes=bucket_bytes, rank=self.rank):
            if self.rank == 0:
                yield bucket

    # ------------------------------------------------------------------------------ weight sync
    def open_sync_store(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: host one weight sync's rendezvous store (learner rank 0 + every engine) on a free port."""
        self._sync_store, host, port = ds.open_store(world_size, timeout_s=timeout_s)
        return host, port

    def send_weights(self, spec: GroupSpec, bucket_bytes: int) -> SyncTimings | None:
        """Every rank runs the gathers; rank 0 broadcasts each bucket to the engines as it is gathered."""
        buckets = self.export_weights(bucket_bytes)
        try:
            if self.rank == 0:
                return StatelessGroupTransport(spec, 0, self._sync_store).send(buckets)
            return None
        finally:
            # Every rank drives the ZeRO-3 gathers to the end, also when rank 0's transfer failed part-way:
            # otherwise the other ranks would wait in a gather forever and the learner would be lost.
            for _ in buckets:
                pass
            self._sync_store = None

    def put_weights(self, bucket_bytes: int) -> tuple[list[ObjectStoreBucket], SyncTimings] | None:
        """Every rank runs the gathers; rank 0 puts each bucket into Ray's object store."""
        buckets = self.export_weights(bucket_bytes)
        try:
            return object_store_send(buckets) if self.rank == 0 else None
        finally:
            for _ in buckets:  # keep the gathers of all ranks in step (see send_weights)
                pass

    # ------------------------------------------------------------------------------ checkpoints
    def _trainable(self) -> dict[str, Any]:
        engines = {"policy": self.policy, "preference": self.preference, "critic": self.critic}
        return {name: e for name, e in engines.items() if e is not None}

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed states (exact resume) for every trainable model, HF folders of the policy and PM, RNG."""
        root = Path(path)
        for name, engine in self._trainable().items():
            engine.save_checkpoint(str(root / name), tag="state")
        ds.save_hf(self.policy.module, str(root / "policy_hf"), rank=self.rank, tokenizer_from=self.refs["policy"])
        if self.preference is not None:
            ds.save_hf(self.preference.module, str(root / "preference_hf"), rank=self.rank,
                       tokenizer_from=self.refs["preference"])
        (root / "rng").mkdir(parents=True, exist_ok=True)
        _save_rng_state(root / "rng" / f"rank{self.rank}")
        torch.distributed.barrier()

    def load_checkpoint(self, path: str) -> None:
        """Restore what :meth:`save_checkpoint` wrote (same ZeRO stage and number of ranks)."""
        root = Path(path)
        engines = self._trainable()
        for name in engines:  # every file first, so that all ranks refuse before any collective
            ds.check_weights_only(root / name / "state")
        for name, engine in engines.items():
            ds.load_checkpoint(engine, root / name, tag="state")  # weights-only: nothing is unpickled
        _load_rng_state(root / "rng" / f"rank{self.rank}")


def _pad_id(config: Any) -> int:
    """Filler id for padding positions; any valid id works because masks come from lengths."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _save_rng_state(stem: Path) -> None:
    """RNG states without pickle: torch generators as safetensors, Python's and NumPy's as JSON."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, f"{stem}.safetensors")
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    stem.with_suffix(".json").write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }))


def _load_rng_state(stem: Path) -> None:
    """Restore what :func:`_save_rng_state` wrote."""
    import json

    import numpy as np
    from safetensors.torch import load_file

    tensors = load_file(f"{stem}.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    raw = json.loads(stem.with_suffix(".json").read_text())
    version, internal, gauss = raw["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = raw["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
