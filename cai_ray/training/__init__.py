"""The learner plane: DeepSpeed engines for policy, reference, preference model and critic.

Modules:
    engine     process-group set-up, the ds_config builder and ``wrap`` (the one DeepSpeed wrapping step).
    modeling   plain torch: ``ScalarHeadModel`` (PM / critic) and length-based batching of learner messages.
    learner    ``LearnerWorker``: one rank, verb methods (sft_step, pm_step, dpo_step, ppo_step, ...).
    group      ``LearnerGroup``: the ranks as Ray actors; fans every call out and waits with deadlines.
    sft_job    SL-CAI's supervised stage as a Ray Train ``TorchTrainer`` run.

Imports stay lazy: ``import cai_ray.training`` does not import DeepSpeed or Ray.
"""
