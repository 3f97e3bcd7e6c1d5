"""Plain torch pieces of the learner: the scalar-head model, and batching of learner messages.

``ScalarHeadModel`` is a causal-LM backbone (the HF base model, without its LM head) plus one linear
layer giving a scalar per position. The preference model reads it at the last real token of each row
(``last_token_index(attention_mask)``); the PPO critic reads it at every position. It saves in HF
format: the backbone as an HF model folder, the head as ``scalar_head.safetensors`` beside it.
A multi-head PM (``axes``: one scalar head per behavioural axis on the shared backbone) also keeps
``mix``, the fixed axis weights of the aggregation rule: ``forward`` returns the mixed scalar, so every
consumer of a one-head PM (rewards, evaluation, export) works unchanged; ``forward_heads`` gives the
per-axis scalars. The axes and mix are saved in the head file.

Batches are right-padded and every mask is built from sequence lengths, never from the pad id (pad ==
eos in some tokenizers, e.g. SmolLM2, so a pad-derived mask would drop the real final eos). Token-level
tensors are "shifted": column t scores ``input_ids[:, t + 1]`` from the logits at t.

No Ray or DeepSpeed here.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from cai_ray.algorithms.common import last_token_index
from cai_ray.types import TrainPair, TrainSequence

if TYPE_CHECKING:
    from cai_ray.models import ModelRef

T = TypeVar("T")

HEAD_FILE = "scalar_head.safetensors"


# ------------------------------------------------------------------------------------- batching
@dataclass(frozen=True)
class SequenceBatch:
    """Right-padded prompt+response rows.

    ``valid`` is False on filler rows that only even out the ranks' shards: they run forward and
    backward (ZeRO-3 forwards are collectives) but their loss mask is all zero.
    """

    input_ids: Tensor  # [B, T] long; filler past each row's length
    attention_mask: Tensor  # [B, T] long; 1 on the row's real tokens
    loss_mask: Tensor  # [B, T-1] float; 1 where column t predicts a response token of a valid row
    valid: Tensor  # [B] bool

    @property
    def labels(self) -> Tensor:
        """[B, T-1] next-token targets aligned with ``loss_mask``."""
        return self.input_ids[:, 1:]

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def first_loss_column(self) -> int:
        """The first column of ``loss_mask`` that any row uses (0 when none does): no loss reads one before it."""
        return int(self.loss_mask.any(dim=0).int().argmax())  # argmax gives the first maximum, 0 for all-zero

    def rows(self, start: int, stop: int) -> SequenceBatch:
        """Rows ``start:stop``, trimmed to their longest row (token tensors keep their first columns)."""
        attention = self.attention_mask[start:stop]
        width = max(int(attention.sum(dim=-1).max()), 2) if attention.numel() else 2
        return SequenceBatch(
            input_ids=self.input_ids[start:stop, :width],
            attention_mask=attention[:, :width],
            loss_mask=self.loss_mask[start:stop, : width - 1],
            valid=self.valid[start:stop],
        )

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask, self.valid)))


def response_logits(model: Any, mb: SequenceBatch) -> tuple[Tensor, int]:
    """A causal LM's next-token logits [B, T-1-s, V] for the label columns ``s:`` of ``mb``, and ``s``.

    ``s`` is ``mb.first_loss_column``: the prompt columns before it feed no loss, so they skip the LM head
    (``logits_to_keep``). Projecting them onto the vocabulary (49k tokens on SmolLM2), then their log-softmax
    and its backward, is work whose result no loss reads. A model whose forward lacks ``logits_to_keep``
    computes every column and the unused ones are sliced off.
    """
    start = mb.first_loss_column
    hf_module = getattr(model, "module", model)  # inside a DeepSpeed engine, which passes keyword arguments on
    keep = {"logits_to_keep": mb.input_ids.shape[1] - start} if _takes_logits_to_keep(type(hf_module)) else {}
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False, **keep).logits
    return (logits if keep else logits[:, start:])[:, :-1], start


@functools.cache
def _takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def collate_token_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
                       num_valid: int | None = None) -> SequenceBatch:
    """Right-pad ``prompt + response`` rows; masks come from the lengths. Rows from ``num_valid`` on are filler."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    if any(not p for p in prompts):
        raise ValueError("every row needs at least one prompt token (the first response token is predicted from it)")
    width = max(max(len(r) for r in rows), 2)
    num = len(rows)
    num_valid = num if num_valid is None else num_valid
    input_ids = torch.full((num, width), pad_id, dtype=torch.long)
    attention = torch.zeros((num, width), dtype=torch.long)
    loss_mask = torch.zeros((num, width - 1), dtype=torch.float32)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        if i < num_valid:
            loss_mask[i, len(prompt) - 1 : len(row) - 1] = 1.0
    valid = torch.arange(num) < num_valid
    return SequenceBatch(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask, valid=valid)


def collate_sequences(seqs: Sequence[TrainSequence], *, pad_id: int, num_valid: int | None = None) -> SequenceBatch:
    """One row per sequence; the loss covers the response tokens."""
    return collate_token_rows([s.prompt_token_ids for s in seqs], [s.response_token_ids for s in seqs],
                              pad_id=pad_id, num_valid=num_valid)


def collate_pairs(pairs: Sequence[TrainPair], *, pad_id: int,
                  num_valid: int | None = None) -> tuple[SequenceBatch, Tensor]:
    """Rows ``[a_0 .. a_{B-1}, b_0 .. b_{B-1}]`` (one forward for both sides) and ``prob_a`` [B]."""
    n = len(pairs)
    num_valid = n if num_valid is None else num_valid
    prompts = [p.prompt_token_ids for p in pairs] * 2
    responses = [p.response_a_token_ids for p in pairs] + [p.response_b_token_ids for p in pairs]
    batch = collate_token_rows(prompts, responses, pad_id=pad_id)
    valid = torch.arange(n) < num_valid
    valid2 = torch.cat([valid, valid])
    batch = replace(batch, loss_mask=batch.loss_mask * valid2.unsqueeze(-1), valid=valid2)
    return batch, torch.tensor([p.prob_a for p in pairs], dtype=torch.float32)


def pair_axis_probs(pairs: Sequence[TrainPair], num_axes: int) -> Tensor:
    """[B, K] per-axis soft labels of ``pairs`` (each must carry ``num_axes`` of them)."""
    bad = [i for i, p in enumerate(pairs) if p.axis_probs is None or len(p.axis_probs) != num_axes]
    if bad:
        raise ValueError(f"pairs {bad[:5]} carry no per-axis labels for the {num_axes}-head preference model; "
                         "label with feedback.label_axes set to the PM's axes")
    return torch.tensor([list(p.axis_probs) for p in pairs], dtype=torch.float32)  # type: ignore[arg-type]


def response_values(batch: SequenceBatch, seqs: Sequence[TrainSequence],
                    values: Sequence[Sequence[float] | None]) -> Tensor:
    """Place per-response-token values (e.g. rollout log-probs) at their shifted columns: [B, T-1], 0 elsewhere."""
    out = torch.zeros(batch.loss_mask.shape, dtype=torch.float32)
    for i, (seq, row) in enumerate(zip(seqs, values, strict=True)):
        if row is None:
            continue
        if len(row) != len(seq.response_token_ids):
            raise ValueError(f"row {i}: {len(row)} values for {len(seq.response_token_ids)} response tokens")
        start = len(seq.prompt_token_ids) - 1
        out[i, start : start + len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def response_rows(token_values: Tensor, batch: SequenceBatch) -> list[tuple[float, ...]]:
    """Inverse of :func:`response_values` for valid rows: per-row tuples of the masked columns."""
    out = []
    for i in range(batch.num_rows):
        if batch.valid[i]:
            out.append(tuple(token_values[i][batch.loss_mask[i].bool()].tolist()))
    return out


def pad_id(config: Any) -> int:
    """The filler id of padding positions, from the model's HF config: its pad token, else its (first) eos token,
    else 0. Any valid id works, since masks come from lengths; the learner and the SFT job use this one rule."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def micro_batches(num_rows: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``size`` rows."""
    return [(s, min(s + size, num_rows)) for s in range(0, num_rows, size)]


def shard(items: Sequence[T], num_shards: int, *, unit: int = 1) -> list[tuple[list[T], int]]:
    """Split ``items`` into ``num_shards`` contiguous slices of equal length, whole ``unit``s each.

    Returns ``(items, num_valid)`` per shard. Short slices are filled up with copies of the last unit
    of ``items`` (real rows, so shapes stay realistic); their rows are filler (index >= num_valid).
    Equal lengths matter: every rank must run the same number of collective forwards.
    """
    if unit < 1 or len(items) % unit:
        raise ValueError(f"{len(items)} items do not split into whole units of {unit}")
    if not items:
        raise ValueError("nothing to shard")
    units = [list(items[i : i + unit]) for i in range(0, len(items), unit)]
    per_shard = math.ceil(len(units) / num_shards)
    out = []
    for k in range(num_shards):
        mine = units[k * per_shard : (k + 1) * per_shard]
        num_valid = len(mine) * unit
        mine = mine + [units[-1]] * (per_shard - len(mine))
        out.append(([x for u in mine for x in u], num_valid))
    return out


def group_size(seqs: Sequence[TrainSequence]) -> int:
    """The common size of the contiguous ``group_id`` runs (GRPO/RLOO groups); raises if they differ."""
    sizes, ids = [], []
    for seq in seqs:
        if ids and ids[-1] == seq.group_id:
            sizes[-1] += 1
        else:
            if seq.group_id in ids:
                raise ValueError(f"group {seq.group_id} is not contiguous; put a prompt's samples next to each other")
            ids.append(seq.group_id)
            sizes.append(1)
    if len(set(sizes)) != 1:
        raise ValueError(f"groups have different sizes {sorted(set(sizes))}; every prompt needs the same k samples")
    return sizes[0]


# --------------------------------------------------------------------------------- scalar head
class ScalarHeadModel(nn.Module):
    """HF base model + ``Linear(hidden, K)``: a scalar per position, K = 1 or one per axis (PM and critic)."""

    def __init__(self, backbone: nn.Module, *, axes: Sequence[str] = (), mix: Sequence[float] = ()) -> None:
        super().__init__()
        if len(axes) != len(mix) or len(set(axes)) != len(axes):
            raise ValueError(f"a multi-head model needs distinct axes and one mix weight each; got {axes}, {mix}")
        self.backbone = backbone
        self.axes = tuple(axes)
        hidden = backbone.config.hidden_size
        dtype = next(backbone.parameters()).dtype
        self.head = nn.Linear(hidden, max(1, len(axes)), dtype=dtype)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        # fixed weights, not trained and not in the DeepSpeed state: saved in the head file
        self.register_buffer("mix", torch.tensor(list(mix) or [1.0], dtype=torch.float32), persistent=False)

    @property
    def config(self):  # the backbone's HF config (DeepSpeed and HF helpers look for it)
        return self.backbone.config

    @classmethod
    def from_backbone(cls, ref: ModelRef, *, dtype: torch.dtype, axes: Sequence[str] = (),
                      mix: Sequence[float] = ()) -> ScalarHeadModel:
        """A fresh head (one per axis when ``axes`` is given) on the base model of an HF causal-LM folder."""
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a causal-LM folder's unused lm_head is expected, not news
        try:
            backbone = ref.base_model(dtype=dtype)
        finally:
            hf_logging.set_verbosity(level)
        return cls(backbone, axes=axes, mix=mix)

    @classmethod
    def from_pretrained(cls, ref: ModelRef, *, dtype: torch.dtype) -> ScalarHeadModel:
        """Load a folder written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        head_file = Path(ref.path) / HEAD_FILE
        if not head_file.is_file():
            raise FileNotFoundError(f"{ref.path} has no {HEAD_FILE}; use ScalarHeadModel.from_backbone for a plain LM")
        axes, mix = cls.saved_heads(ref.path)
        state = {k: v for k, v in load_file(str(head_file)).items() if k != "mix"}
        model = cls.from_backbone(ref, dtype=dtype, axes=axes, mix=mix)
        model.head.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        return model

    @staticmethod
    def saved_heads(path: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """The axes of the heads saved at ``path`` and their mix weights (both empty for a one-head model)."""
        from safetensors import safe_open

        with safe_open(str(Path(path) / HEAD_FILE), framework="pt") as f:
            meta = f.metadata() or {}
            mix = tuple(f.get_tensor("mix").tolist()) if "mix" in f.keys() else ()
        return tuple(json.loads(meta.get("axes", "[]"))), mix

    @staticmethod
    def is_saved_at(path: str) -> bool:
        """Whether ``path`` holds a saved scalar head (else it is a plain LM folder)."""
        return (Path(path) / HEAD_FILE).is_file()

    def save_pretrained(self, path: str, *, state_dict: dict[str, Tensor] | None = None) -> None:
        """Backbone as an HF folder, head as ``scalar_head.safetensors``. ``state_dict``: full (gathered) weights."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        head = {k.removeprefix("head."): v.contiguous() for k, v in state.items() if k.startswith("head.")}
        if self.axes:
            head["mix"] = self.mix.detach().cpu().contiguous()
        Path(path).mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, state_dict=backbone)
        save_file(head, str(Path(path) / HEAD_FILE), metadata={"axes": json.dumps(list(self.axes))})

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward_heads(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] ids and mask -> [B, T, K] float32 scalars, one per head."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, T] ids and mask -> [B, T] float32 scalars (one per position; multi-head: mixed by ``mix``)."""
        return self.mix_heads(self.forward_heads(input_ids, attention_mask))

    def mix_heads(self, heads: Tensor) -> Tensor:
        """[..., K] per-head scalars -> [...] the aggregated scalar."""
        return (heads * self.mix.to(heads.device)).sum(dim=-1)


def last_token_heads(values: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, T, K] per-position, per-head scalars -> [B, K], read at each row's last real token."""
    index = last_token_index(attention_mask).view(-1, 1, 1).expand(-1, 1, values.shape[-1])
    return values.gather(1, index).squeeze(1)


def last_token_scores(values: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, T] per-position scalars -> [B], read at each row's last real token."""
    return values.gather(-1, last_token_index(attention_mask).unsqueeze(-1)).squeeze(-1)
