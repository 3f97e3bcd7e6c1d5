"""One rank of the learner: policy, frozen reference, preference model and critic as DeepSpeed engines.

A plain class (``LearnerGroup`` makes it a Ray actor, one per rank) with a small surface: set-up, the
forward and training helpers the algorithms are written with, weight export and checkpoints. What a step
*does* is a plain function shipped in by the group (``LearnerGroup.update(fn, items)`` calls
``fn(worker, shard, num_valid)`` on every rank): the policy and PM updates in :mod:`cai_ray.training.updates`,
the scoring passes below (:func:`policy_logprobs`, :func:`pm_scores`, :func:`pm_axis_scores`).

Every step is a collective under ZeRO-3 (forwards and gathers), so all ranks run it together, each on its own
shard of the same length (``modeling.shard``; filler rows carry no loss). :meth:`LearnerWorker.train_step`
turns a shard into micro-batches of ``micro_batch_size`` rows, accumulates their gradients and takes one
optimizer step. Simplification: DeepSpeed averages gradients over ranks with equal weight per rank.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from cai_ray.algorithms.common import gather_token_logprobs
from cai_ray.backend import RoleBackend, enter_role
from cai_ray.config import LearnerConfig, ModelConfig, ModelsConfig
from cai_ray.models import ModelRef
from cai_ray.sync import GroupSpec, ObjectStoreBucket, StatelessGroupTransport, SyncTimings, object_store_send
from cai_ray.training import engine as ds
from cai_ray.training.modeling import (
    ScalarHeadModel,
    SequenceBatch,
    collate_sequences,
    last_token_heads,
    last_token_scores,
    micro_batches,
    pad_id,
    response_logits,
    response_rows,
)
from cai_ray.types import TrainSequence

Metrics = dict[str, float]
LossFn = Callable[[int, int], tuple[Tensor, Metrics, int]]  # (start, stop) -> (loss, metrics, valid items)
R = TypeVar("R")


@dataclass(frozen=True)
class LearnerRoles:
    """Which models a learner holds besides the policy."""

    reference: bool = True  # frozen copy for KL / DPO
    preference_model: bool = False  # scalar-head PM, trained with updates.pm
    critic: bool = False  # PPO value model
    pm_axes: tuple[str, ...] = ()  # feedback.label_axes: one PM head per axis (empty: one head)
    pm_mix: tuple[float, ...] = ()  # the aggregation rule's axis weights that mix the heads into the reward


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
        self.pad_id = 0  # set from the policy's HF config in setup

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
        loader = _Loader(self.cfg, self.backend, self.world_size, self.refs)
        optim = self.cfg.optim
        self.policy = loader.wrap(loader.causal_lm("policy", self.models.policy), lr=optim.lr)
        self.pad_id = pad_id(self.policy.module.config)
        if self.roles.reference:
            self.reference = loader.wrap(loader.causal_lm("reference", self.models.resolved_reference()), lr=None)
        if self.roles.preference_model:
            self.preference = loader.wrap(loader.preference_model(self.models.resolved_preference(), self.roles),
                                          lr=optim.pm_lr)
        if self.roles.critic:
            self.critic = loader.wrap(loader.scalar("critic", self.models.resolved_preference()), lr=optim.critic_lr)
        torch.manual_seed(self.seed + 1000 * (self.rank + 1))
        return self.ping()

    def ping(self) -> dict[str, Any]:
        """Who and where this rank is."""
        return {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "ip": ds.node_ip()}

    def run(self, fn: Callable[[LearnerWorker, Sequence[Any], int], R], items: Sequence[Any], num_valid: int) -> R:
        """``fn(self, items, num_valid)``: the group's way in for an update or a scoring pass on this rank's shard."""
        return fn(self, items, num_valid)

    # ------------------------------------------------------------------------ forward / train
    def sequences(self, seqs: Sequence[TrainSequence], num_valid: int) -> SequenceBatch:
        """``seqs`` as one right-padded batch; rows past ``num_valid`` are filler."""
        return collate_sequences(seqs, pad_id=self.pad_id, num_valid=num_valid)

    @torch.no_grad()
    def per_token(self, fn: Callable[[Any, SequenceBatch], Tensor], model: Any, batch: SequenceBatch) -> Tensor:
        """Run ``fn`` micro-batch by micro-batch without grad and assemble [B, T-1] (zeros past each row)."""
        out = torch.zeros(batch.loss_mask.shape, dtype=torch.float32)
        for start, stop in micro_batches(batch.num_rows, self.cfg.micro_batch_size):
            mb = batch.rows(start, stop)
            out[start:stop, : mb.loss_mask.shape[1]] = fn(model, mb.to(self.device)).float().cpu()
        return out

    def train_step(self, engine: Any, *, num_items: int, num_valid: int, loss_fn: LossFn) -> Metrics:
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

    def optimizer_steps(self) -> Metrics:
        """Optimizer steps each trainable policy-side engine has taken so far (restored by a resume)."""
        engines = {"policy": self.policy, "critic": self.critic}
        return {f"{name}/optimizer_steps": float(e.global_steps) for name, e in engines.items() if e is not None}

    # ------------------------------------------------------------------------------ weight sync
    def open_sync_store(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: host one weight sync's rendezvous store (learner rank 0 + every engine) on a free port."""
        self._sync_store, host, port = ds.open_store(world_size, timeout_s=timeout_s)
        return host, port

    def send_weights(self, spec: GroupSpec, bucket_bytes: int) -> SyncTimings | None:
        """Every rank runs the gathers; rank 0 broadcasts each bucket to the engines as it is gathered."""
        buckets = ds.gathered_buckets(self.policy.module, bucket_bytes=bucket_bytes, rank=self.rank)
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
        buckets = ds.gathered_buckets(self.policy.module, bucket_bytes=bucket_bytes, rank=self.rank)
        try:
            return object_store_send(buckets) if self.rank == 0 else None
        finally:
            for _ in buckets:  # keep the gathers of all ranks in step (see send_weights)
                pass

    # ------------------------------------------------------------------------------ checkpoints
    def _trainable(self) -> dict[str, Any]:
        engines = {"policy": self.policy, "preference": self.preference, "critic": self.critic}
        return {name: e for name, e in engines.items() if e is not None}

    def save_checkpoint(self, path: str, bucket_bytes: int) -> None:
        """DeepSpeed states (exact resume) for every trainable model, HF folders of the policy and PM, RNG."""
        root = Path(path)
        for name, engine in self._trainable().items():
            engine.save_checkpoint(str(root / name), tag="state")
        for name, engine in (("policy", self.policy), ("preference", self.preference)):
            if engine is not None:
                ds.save_hf(engine.module, str(root / f"{name}_hf"), rank=self.rank, bucket_bytes=bucket_bytes,
                           tokenizer_from=self.refs[name])
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


# ------------------------------------------------------------------------------------ forwards
def token_logprobs(model: Any, mb: SequenceBatch) -> Tensor:
    """[B, T-1] log-prob of each next token; 0 in the columns before ``mb.first_loss_column`` (never computed,
    and outside every row's loss mask)."""
    logits, start = response_logits(model, mb)
    return torch.nn.functional.pad(gather_token_logprobs(logits, mb.labels[:, start:]), (start, 0))


def values(model: Any, mb: SequenceBatch) -> Tensor:
    """[B, T-1] critic values of the state before each next token."""
    return model(mb.input_ids, mb.attention_mask)[:, :-1]


def scores(model: Any, mb: SequenceBatch) -> Tensor:
    """[B] scalar at each row's last real token."""
    return last_token_scores(model(mb.input_ids, mb.attention_mask), mb.attention_mask)


# ------------------------------------------------------------------------------ scoring passes
@torch.no_grad()
def policy_logprobs(worker: LearnerWorker, seqs: Sequence[TrainSequence], num_valid: int) -> list[tuple[float, ...]]:
    """Per-response-token log-probs under the current policy, for each valid sequence."""
    batch = worker.sequences(seqs, num_valid)
    return response_rows(worker.per_token(token_logprobs, worker.policy, batch), batch)


@torch.no_grad()
def pm_scores(worker: LearnerWorker, seqs: Sequence[TrainSequence], num_valid: int) -> list[float]:
    """Preference-model reward of each (valid) sequence."""
    batch = worker.sequences(seqs, num_valid)
    out: list[float] = []
    for start, stop in micro_batches(batch.num_rows, worker.cfg.micro_batch_size):
        out += scores(worker.preference, batch.rows(start, stop).to(worker.device)).float().cpu().tolist()
    return out[:num_valid]


@torch.no_grad()
def pm_axis_scores(worker: LearnerWorker, seqs: Sequence[TrainSequence], num_valid: int) -> list[list[float]]:
    """Per-axis head scores [K] of each (valid) sequence (multi-head PM)."""
    batch = worker.sequences(seqs, num_valid)
    out: list[list[float]] = []
    for start, stop in micro_batches(batch.num_rows, worker.cfg.micro_batch_size):
        mb = batch.rows(start, stop).to(worker.device)
        heads = worker.preference.module.forward_heads(mb.input_ids, mb.attention_mask)
        out += last_token_heads(heads, mb.attention_mask).float().cpu().tolist()
    return out[:num_valid]


# -------------------------------------------------------------------------------- model loading
@dataclass
class _Loader:
    """Loads a role's model (recording where it came from in ``refs``) and wraps it in DeepSpeed."""

    cfg: LearnerConfig
    backend: RoleBackend
    world_size: int
    refs: dict[str, ModelRef]

    def _resolve(self, role: str, model: ModelConfig) -> tuple[ModelRef, torch.dtype]:
        self.refs[role] = ModelRef.of(model)
        return self.refs[role], self.backend.torch_dtype(model.dtype)

    def causal_lm(self, role: str, model: ModelConfig) -> torch.nn.Module:
        ref, dtype = self._resolve(role, model)
        return ref.causal_lm(dtype=dtype)

    def scalar(self, role: str, model: ModelConfig) -> ScalarHeadModel:
        """A saved scalar-head folder loads with its head; a plain LM folder gets a fresh head."""
        ref, dtype = self._resolve(role, model)
        if ScalarHeadModel.is_saved_at(ref.path):
            return ScalarHeadModel.from_pretrained(ref, dtype=dtype)
        return ScalarHeadModel.from_backbone(ref, dtype=dtype)

    def preference_model(self, model: ModelConfig, roles: LearnerRoles) -> ScalarHeadModel:
        """The PM: one head, or one per ``roles.pm_axes``; a saved PM must have those same axes."""
        ref, dtype = self._resolve("preference", model)
        if not ScalarHeadModel.is_saved_at(ref.path):
            return ScalarHeadModel.from_backbone(ref, dtype=dtype, axes=roles.pm_axes, mix=roles.pm_mix)
        pm = ScalarHeadModel.from_pretrained(ref, dtype=dtype)
        if pm.axes != roles.pm_axes:
            raise ValueError(f"preference model {ref.path} has heads for axes {list(pm.axes)} but this run labels "
                             f"{list(roles.pm_axes)}; set feedback.label_axes to match, or start a fresh PM")
        pm.mix.copy_(torch.tensor(roles.pm_mix or [1.0]))  # this run's aggregation rule mixes the heads
        return pm

    def wrap(self, module: torch.nn.Module, *, lr: float | None) -> Any:
        """A DeepSpeed engine (``lr=None``: frozen) with the learner's ``deepspeed`` and ``optim`` settings."""
        config = ds.ds_config(self.cfg.deepspeed, micro_batch_size=self.cfg.micro_batch_size,
                              grad_clip=self.cfg.optim.grad_clip, world_size=self.world_size,
                              dtype=next(module.parameters()).dtype, trainable=lr is not None)
        return ds.wrap(module, config=config, lr=lr, weight_decay=self.cfg.optim.weight_decay,
                       gradient_checkpointing=self.cfg.deepspeed.gradient_checkpointing)


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
