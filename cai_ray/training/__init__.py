"""The learner plane: DeepSpeed engines for policy, reference, preference model and critic.

Modules:
    engine     process-group set-up, the ds_config builder and ``wrap`` (the one DeepSpeed wrapping step).
    modeling   plain torch: ``ScalarHeadModel`` (PM / critic) and length-based batching of learner messages.
    learner    ``LearnerWorker``: one rank (set-up, forward and train helpers, weight export, checkpoints) and
               the scoring passes (policy_logprobs, pm_scores, pm_axis_scores).
    updates    one plain update function per algorithm (pm, dpo, ppo, group with an estimator passed in).
    group      ``LearnerGroup``: the ranks as Ray actors; ships a function to every rank (update, forward)
               with its shard and waits with deadlines.
    sft_job    SL-CAI's supervised stage as a Ray Train ``TorchTrainer`` run.

Imports stay lazy: ``import cai_ray.training`` does not import DeepSpeed or Ray.
"""
