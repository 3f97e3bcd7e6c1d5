"""Algorithm layer of cai-ray: pure tensor functions for losses and advantage estimators.

Modules:
    common       masked reductions, whitening, token/sequence log-probabilities.
    sft          supervised fine-tuning (masked token NLL) for SL-CAI.
    preference   Bradley-Terry preference-model loss with soft AI-feedback labels.
    ppo          GAE, KL estimators and penalties, clipped policy/value losses.
    critic_free  GRPO, RLOO and REINFORCE++ advantages (no value model).
    dpo          sigmoid DPO with soft labels and label smoothing.

Everything here is a pure function of tensors: no state, and no ray, deepspeed, vllm or
transformers imports. Losses return ``(loss, metrics)`` with namespaced metric keys.
"""
