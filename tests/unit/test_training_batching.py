"""Pure batching helpers of the learner: masks from lengths (pad == eos safe), shards, groups, ds_config."""

from __future__ import annotations

import pytest
import torch

from cai_ray.config import DeepSpeedConfig
from cai_ray.training.engine import ds_config
from cai_ray.training.modeling import (
    collate_pairs,
    collate_sequences,
    group_size,
    last_token_scores,
    micro_batches,
    pad_id,
    response_rows,
    response_values,
    shard,
)
from cai_ray.types import TrainPair, TrainSequence

EOS = 2  # also the pad id below, as in SmolLM2


def _seq(prompt, response, group_id=0):
    return TrainSequence(prompt_token_ids=tuple(prompt), response_token_ids=tuple(response), group_id=group_id)


def test_masks_come_from_lengths_when_pad_is_eos():
    seqs = [_seq([5, 6, 7], [8, EOS]), _seq([5], [EOS, EOS, 9, EOS])]
    batch = collate_sequences(seqs, pad_id=EOS)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, EOS], [5, EOS, EOS, 9, EOS]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # Column t predicts token t + 1; the loss covers exactly the response, final eos included.
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch.labels[batch.loss_mask.bool()].tolist() == [8, EOS, EOS, EOS, 9, EOS]


def test_right_padding_with_eos_filler_keeps_real_eos():
    seqs = [_seq([5, 6], [EOS]), _seq([5, 6, 7, 8], [9, 10, EOS])]
    batch = collate_sequences(seqs, pad_id=EOS)
    assert batch.input_ids[0].tolist() == [5, 6, EOS, EOS, EOS, EOS, EOS]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch.loss_mask[0].tolist() == [0, 1, 0, 0, 0, 0]
    values = torch.arange(7.0).repeat(2, 1)
    assert last_token_scores(values, batch.attention_mask).tolist() == [2.0, 6.0]


def test_filler_rows_have_no_loss():
    seqs = [_seq([5], [6, 7]), _seq([5, 6], [7])]
    batch = collate_sequences(seqs, pad_id=0, num_valid=1)
    assert batch.valid.tolist() == [True, False]
    assert batch.loss_mask[1].sum() == 0 and batch.attention_mask[1].sum() == 3


def test_pairs_stack_a_then_b():
    pairs = [TrainPair((5, 6), (7,), (8, 9), 0.75), TrainPair((5,), (7, 7, 7), (8,), 0.25)]
    batch, prob_a = collate_pairs(pairs, pad_id=EOS, num_valid=1)
    assert batch.num_rows == 4
    assert batch.input_ids[0, :3].tolist() == [5, 6, 7] and batch.input_ids[2, :4].tolist() == [5, 6, 8, 9]
    assert batch.valid.tolist() == [True, False, True, False]
    assert batch.loss_mask[1].sum() == 0 and batch.loss_mask[3].sum() == 0
    assert batch.loss_mask[2].sum() == 2
    assert prob_a.tolist() == [0.75, 0.25]


def test_rows_trim_to_longest_and_stay_aligned():
    seqs = [_seq([5], [6]), _seq([5, 6, 7], [8, 9, 10])]
    batch = collate_sequences(seqs, pad_id=0)
    first = batch.rows(0, 1)
    assert first.input_ids.shape == (1, 2) and first.loss_mask.shape == (1, 1)
    assert batch.rows(0, 2).input_ids.shape == (2, 6)


def test_response_values_round_trip():
    seqs = [_seq([5, 6], [7, 8]), _seq([5], [9])]
    batch = collate_sequences(seqs, pad_id=0)
    placed = response_values(batch, seqs, [(-1.0, -2.0), (-3.0,)])
    assert placed.tolist() == [[0.0, -1.0, -2.0], [-3.0, 0.0, 0.0]]
    assert response_rows(placed, batch) == [(-1.0, -2.0), (-3.0,)]
    with pytest.raises(ValueError, match="values for"):
        response_values(batch, seqs, [(-1.0,), (-3.0,)])


def test_shard_gives_equal_lengths_and_counts_filler():
    parts = shard(list(range(5)), 2)
    assert parts == [([0, 1, 2], 3), ([3, 4, 4], 2)]
    assert shard([1], 2) == [([1], 1), ([1], 0)]
    assert shard(list(range(6)), 4, unit=2) == [([0, 1], 2), ([2, 3], 2), ([4, 5], 2), ([4, 5], 0)]
    with pytest.raises(ValueError, match="whole units"):
        shard(list(range(5)), 2, unit=2)


def test_group_size_validates_groups():
    assert group_size([_seq([1], [2], g) for g in (0, 0, 1, 1)]) == 2
    with pytest.raises(ValueError, match="not contiguous"):
        group_size([_seq([1], [2], g) for g in (0, 1, 0, 1)])
    with pytest.raises(ValueError, match="different sizes"):
        group_size([_seq([1], [2], g) for g in (0, 0, 1)])


def test_micro_batches_cover_rows():
    assert micro_batches(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_ds_config_frozen_and_offload():
    cfg = DeepSpeedConfig(zero_stage=2, offload_optimizer=True)
    train = ds_config(cfg, micro_batch_size=3, grad_clip=0.5, world_size=2, dtype=torch.float32)
    assert train["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert train["train_batch_size"] == 6 and train["gradient_clipping"] == 0.5
    frozen = ds_config(cfg, micro_batch_size=3, grad_clip=0.5, world_size=2, dtype=torch.float32, trainable=False)
    assert frozen["zero_optimization"] == {"stage": 0} and "gradient_clipping" not in frozen
    z3 = ds_config(DeepSpeedConfig(zero_stage=3, zero3_param_persistence_threshold=0), micro_batch_size=4,
                   grad_clip=1.0, world_size=2, dtype=torch.bfloat16, trainable=False)
    assert z3["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert z3["bf16"] == {"enabled": True}
    auto = DeepSpeedConfig()  # zero_stage 'auto': stage 0 on one rank, 2 on two
    assert ds_config(auto, micro_batch_size=4, grad_clip=1.0, world_size=1,
                     dtype=torch.float32)["zero_optimization"] == {"stage": 0}
    assert ds_config(auto, micro_batch_size=4, grad_clip=1.0, world_size=2,
                     dtype=torch.float32)["zero_optimization"] == {"stage": 2}


def test_one_pad_id_rule_from_the_model_config():
    from types import SimpleNamespace

    assert pad_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=[7, 8])) == 7  # a list of eos ids: the first
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=[])) == 0
    assert pad_id(SimpleNamespace()) == 0
