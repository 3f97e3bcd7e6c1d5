"""RolloutWorker: samples k responses per prompt from the policy for the RL stage.

Each prompt goes through the model's chat template, then the prompt-length policy (keep the last
``data.max_prompt_tokens`` tokens, or reject the prompt by id). Sampling uses the rollout config's
temperature / top-p / length and a per-prompt seed derived from the caller's seed and the prompt id,
so a batch is reproducible whichever worker serves it. Every sample carries the weight version that
produced it (the loop logs how far behind the trained version they are).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cai_ray.backend import enter_role
from cai_ray.config import ClusterConfig, DataConfig, ModelConfig, RolloutConfig
from cai_ray.constitution import render_chat
from cai_ray.inference.engine import (
    Engine,
    EngineWeights,
    PromptRejected,
    fit_prompt,
    start_engine_actors,
)
from cai_ray.seeds import stable_seed
from cai_ray.types import Prompt, RejectedItem, RolloutBatch, Sample

if TYPE_CHECKING:
    pass


class RolloutWorker(EngineWeights):
    """One policy engine. A plain class; :func:`start_rollout_workers` makes it a Ray actor."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig, data: DataConfig, *, seed: int) -> None:
        backend = enter_role("rollout", rollout.resources, uses_vllm=True)
        self._engine = Engine(model, rollout.engine, backend=backend, seed=seed)
        self._rollout = rollout
        # The prompt must leave room for at least one new token.
        self._max_prompt_tokens = min(data.max_prompt_tokens, model.max_model_len - 1)
        self._overlong = data.overlong_prompt

    def generate(self, prompts: Sequence[Prompt], *, seed: int, num_samples: int | None = None) -> RolloutBatch:
        """Sample responses per prompt in one batched engine call.

        ``num_samples`` responses per prompt, ``rollout.num_samples_per_prompt`` when None (evaluation asks
        for 1: vLLM refuses more than one greedy sample per prompt).
        """
        accepted: list[tuple[Prompt, list[int]]] = []
        rejected: list[RejectedItem] = []
        for prompt in prompts:
            try:
                accepted.append((prompt, self._prompt_ids(prompt)))
            except PromptRejected as err:
                rejected.append(RejectedItem(prompt.id, str(err)))
        cfg = self._rollout
        version = self._engine.version  # weights cannot change during this call (actors run one call at a time)
        outputs = self._engine.generate(
            [ids for _, ids in accepted], n=num_samples or cfg.num_samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            seeds=[stable_seed(seed, p.id) for p, _ in accepted],
        ) if accepted else []
        samples = [
            Sample(prompt_id=prompt.id, prompt=prompt.text, prompt_token_ids=tuple(ids), response_text=c.text,
                   response_token_ids=c.token_ids, response_logprobs=c.logprobs, finish_reason=c.finish_reason,
                   weight_version=version, sample_index=k)
            for (prompt, ids), completions in zip(accepted, outputs)
            for k, c in enumerate(completions)
        ]
        return RolloutBatch(samples=tuple(samples), rejected=tuple(rejected))

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if not prompt.text.strip():
            raise PromptRejected(f"prompt '{prompt.id}': empty prompt")
        text = render_chat(self._engine.tokenizer, [{"role": "user", "content": prompt.text}])
        return fit_prompt(self._engine.encode(text), max_tokens=self._max_prompt_tokens, overlong=self._overlong,
                          prompt_id=prompt.id)


@dataclass
class RolloutWorkers:
    """The rollout actors and their placement group."""

    workers: list[Any]
    placement_group: Any

    def shutdown(self) -> None:
        """Kill the actors and release their placement group."""
        from cai_ray.launcher import stop_actors

        stop_actors(self.workers, self.placement_group)


def start_rollout_workers(model: ModelConfig, rollout: RolloutConfig, data: DataConfig, cluster: ClusterConfig,
                          *, seed: int) -> RolloutWorkers:
    """Start ``rollout.num_workers`` RolloutWorker actors in one placement group and wait until they are up.

    Each actor's bundle is ``rollout.resources``; a pending group is what asks an autoscaler for nodes.
    Tensor parallelism runs inside the actor, so its bundle must hold that many GPUs.
    """
    workers, pg = start_engine_actors(
        RolloutWorker, role="rollout", num_workers=rollout.num_workers, engine=rollout.engine,
        resources=rollout.resources, cluster=cluster, max_restarts=rollout.max_restarts,
        args=lambda i: ((model, rollout, data), {"seed": stable_seed(seed, "rollout-engine", i)}))
    return RolloutWorkers(workers, pg)
