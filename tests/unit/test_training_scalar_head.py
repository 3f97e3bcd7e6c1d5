"""ScalarHeadModel on tiny-random-llama: last-token reads ignore padding, and HF save/load round-trips."""

from __future__ import annotations

import torch

from cai_ray.models import ModelRef
from cai_ray.training.modeling import HEAD_FILE, ScalarHeadModel, collate_sequences, last_token_scores
from cai_ray.types import TrainSequence


def test_score_ignores_right_padding_even_when_pad_is_eos(tiny_model_path, tmp_path):
    torch.manual_seed(0)
    model = ScalarHeadModel.from_backbone(ModelRef(tiny_model_path, None, False), dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    short = TrainSequence(prompt_token_ids=(5, 6, 7), response_token_ids=(8, eos))
    long = TrainSequence(prompt_token_ids=(5, 6, 7), response_token_ids=(8, 9, 10, 11, 12, eos))
    with torch.no_grad():
        alone = collate_sequences([short], pad_id=eos)
        together = collate_sequences([short, long], pad_id=eos)  # short is padded with eos
        s_alone = last_token_scores(model(alone.input_ids, alone.attention_mask), alone.attention_mask)
        s_together = last_token_scores(model(together.input_ids, together.attention_mask), together.attention_mask)
    torch.testing.assert_close(s_alone[0], s_together[0], atol=1e-5, rtol=1e-5)

    model.save_pretrained(str(tmp_path / "pm"))
    assert (tmp_path / "pm" / HEAD_FILE).is_file() and (tmp_path / "pm" / "config.json").is_file()
    assert ScalarHeadModel.is_saved_at(str(tmp_path / "pm"))
    loaded = ScalarHeadModel.from_pretrained(ModelRef(str(tmp_path / "pm"), None, False), dtype=torch.float32).eval()
    with torch.no_grad():
        again = last_token_scores(loaded(together.input_ids, together.attention_mask), together.attention_mask)
    torch.testing.assert_close(again, s_together, atol=1e-6, rtol=1e-6)
