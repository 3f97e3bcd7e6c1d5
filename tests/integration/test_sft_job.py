"""The SL-CAI SFT job: Ray Train TorchTrainer, 2 CPU workers, DeepSpeed ZeRO-3, writes an HF policy."""

from __future__ import annotations

import pytest
import torch

from cai_ray.config import ClusterConfig, LearnerConfig, ModelConfig, SLConfig

pytestmark = pytest.mark.slow


def test_sft_job_writes_a_loadable_hf_policy(ray_local, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai_ray.training.sft_job import run_sft

    data = [(f"Question {i}: what is {i} plus {i}?", f"The answer is {2 * i}.") for i in range(10)]
    result = run_sft(data, model=ModelConfig(name=tiny_model_path),
                     sl=SLConfig(num_workers=2, num_epochs=1, lr=1e-3, micro_batch_size=2, max_failures=1),
                     learner=LearnerConfig(zero_stage=3, zero3_param_persistence_threshold=0, collective_timeout_s=120),
                     cluster=ClusterConfig(), run_dir=str(tmp_path), seed=0)
    assert result.metrics["steps"] == 3  # 10 rows / (2 workers x 2 rows), the last batch half filler

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
