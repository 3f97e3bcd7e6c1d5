"""Multi-head preference model: one head per axis on a shared backbone, mixed reward, save/load round-trip."""

from __future__ import annotations

import pytest
import torch

from cai_ray.models import ModelRef
from cai_ray.training.modeling import (
    ScalarHeadModel,
    collate_sequences,
    last_token_heads,
    last_token_scores,
    pair_axis_probs,
)
from cai_ray.types import TrainPair, TrainSequence

AXES = ("harmlessness", "honesty", "verbosity")
MIX = (0.5, 0.3, 0.2)


def test_heads_mix_and_round_trip(tiny_model_path: str, tmp_path) -> None:
    torch.manual_seed(0)
    tiny = ModelRef(tiny_model_path, None, False)
    model = ScalarHeadModel.from_backbone(tiny, dtype=torch.float32, axes=AXES, mix=MIX).eval()
    batch = collate_sequences([TrainSequence((5, 6, 7), (8, 9)), TrainSequence((5, 6), (8, 9, 10, 11))], pad_id=0)
    with torch.no_grad():
        heads = last_token_heads(model.forward_heads(batch.input_ids, batch.attention_mask), batch.attention_mask)
        mixed = last_token_scores(model(batch.input_ids, batch.attention_mask), batch.attention_mask)
    assert heads.shape == (2, 3)
    assert not torch.allclose(heads[:, 0], heads[:, 1])  # distinct heads on the shared backbone
    torch.testing.assert_close(mixed, heads @ torch.tensor(MIX), atol=1e-5, rtol=1e-5)

    model.save_pretrained(str(tmp_path / "pm"))
    loaded = ScalarHeadModel.from_pretrained(ModelRef(str(tmp_path / "pm"), None, False), dtype=torch.float32).eval()
    assert loaded.axes == AXES and loaded.mix.tolist() == pytest.approx(MIX)
    with torch.no_grad():
        again = last_token_scores(loaded(batch.input_ids, batch.attention_mask), batch.attention_mask)
    torch.testing.assert_close(again, mixed, atol=1e-6, rtol=1e-6)


def test_one_head_model_is_unchanged_and_pair_labels_are_checked(tiny_model_path: str) -> None:
    tiny = ModelRef(tiny_model_path, None, False)
    model = ScalarHeadModel.from_backbone(tiny, dtype=torch.float32)
    assert model.axes == () and model.head.out_features == 1
    with pytest.raises(ValueError, match="one mix weight each"):
        ScalarHeadModel.from_backbone(tiny, dtype=torch.float32, axes=AXES, mix=(1.0,))
    pairs = [TrainPair((1,), (2,), (3,), 0.7, (0.9, 0.2, 0.5)), TrainPair((1,), (2,), (3,), 0.5)]
    torch.testing.assert_close(pair_axis_probs(pairs[:1], 3), torch.tensor([[0.9, 0.2, 0.5]]))
    with pytest.raises(ValueError, match=r"pairs \[1\] carry no per-axis labels for the 3-head"):
        pair_axis_probs(pairs, 3)


def test_replay_window_keeps_per_axis_labels_across_resume() -> None:
    import json

    from cai_ray.pipelines.checkpoint import LoopState

    pairs = [TrainPair((1, 2), (3,), (4, 5), 0.75, (0.9, 0.25)), TrainPair((1,), (2,), (3,), 0.5)]
    back = LoopState.from_json(json.loads(json.dumps(LoopState(1, 1, [pairs]).to_json())))
    assert back.replay == [pairs]  # tuples restored, None stays None
