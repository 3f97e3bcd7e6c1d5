"""The SL-CAI SFT job: Ray Train TorchTrainer, 2 CPU workers, DeepSpeed ZeRO-3, writes an HF policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cai_ray.config import ClusterConfig, LearnerConfig, ModelConfig, SLConfig, SyncConfig

pytestmark = pytest.mark.slow


SL = SLConfig(num_workers=2, num_epochs=1, lr=1e-3, micro_batch_size=2, max_failures=1)
LEARNER = LearnerConfig(deepspeed={"zero_stage": 3, "zero3_param_persistence_threshold": 0}, collective_timeout_s=120)
BUCKET = SyncConfig().bucket_size_mb << 20
DATA = [(f"Question {i}: what is {i} plus {i}?", f"The answer is {2 * i}.") for i in range(10)]


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted state file in a run folder would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)


def test_sft_job_writes_a_loadable_hf_policy(ray_local, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai_ray.training.sft_job import run_sft

    result = run_sft(DATA, model=ModelConfig(name=tiny_model_path), sl=SL, learner=LEARNER, cluster=ClusterConfig(),
                     run_dir=str(tmp_path), seed=0, bucket_bytes=BUCKET)
    assert result.metrics["steps"] == 3  # 10 rows / (2 workers x 2 rows), the last batch half filler
    assert result.metrics["start_epoch"] == 0
    phases = ("timing/setup", "timing/train", "timing/save_state", "timing/save_hf")
    assert all(result.metrics[k] > 0 for k in phases)  # where the job's time went, for the run's summary

    tuned = AutoModelForCausalLM.from_pretrained(result.policy_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.policy_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Question 3: what is 3 plus 3?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    target = tokenizer.encode("The answer is 6.", add_special_tokens=False) + [tokenizer.eos_token_id]
    full = torch.tensor([list(ids) + target])

    def nll(model) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=full).logits[0, :-1], -1)
        picked = logp[torch.arange(full.shape[1] - 1), full[0, 1:]][len(ids) - 1:]
        return float(-picked.mean())

    assert nll(tuned) < nll(base)  # it learned the responses

    # A new run in the same folder with one more epoch resumes from the last checkpoint, loaded weights-only.
    more = run_sft(DATA, model=ModelConfig(name=tiny_model_path), sl=SL.model_copy(update={"num_epochs": 2}),
                   learner=LEARNER, cluster=ClusterConfig(), run_dir=str(tmp_path), seed=0, bucket_bytes=BUCKET)
    assert (more.metrics["start_epoch"], more.metrics["epoch"], more.metrics["steps"]) == (1, 1, 3)
    # Both ranks wrote straight into Ray Train's storage, which keeps only the newest checkpoint.
    kept = sorted(p.name for p in (tmp_path / "ray_train" / "sft").glob("checkpoint_epoch_*"))
    assert kept == ["checkpoint_epoch_0001"] and Path(more.checkpoint_path).name == kept[0]

    # A state file replaced by one that would run code is refused, by name, and runs nothing.
    marker = tmp_path / "code-ran"
    [optim] = sorted(Path(more.checkpoint_path, "state").glob("*rank_1*optim_states.pt"))
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, optim)
    with pytest.raises(Exception) as refused:
        run_sft(DATA, model=ModelConfig(name=tiny_model_path),
                sl=SL.model_copy(update={"num_epochs": 3, "max_failures": 0}), learner=LEARNER,
                cluster=ClusterConfig(), run_dir=str(tmp_path), seed=0, bucket_bytes=BUCKET)
    assert f"{optim.name}: refusing to load it" in _chain(refused.value) and "posix.system" in _chain(refused.value)
    assert not marker.exists()


def _chain(err: BaseException | None) -> str:
    """The messages of an exception and its causes (Ray Train wraps the workers' errors)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)
