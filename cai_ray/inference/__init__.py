"""Inference plane: vLLM engines as rollout workers and the constitutional feedback pool.

Modules:
    engine     one thin wrapper over vLLM's offline engine (generate, score, load_weights).
    rollout    RolloutWorker: k samples per prompt for the RL stage, tagged with the weight version.
    feedback   FeedbackWorker (critique/revision, preference labels, direct scores, yes/no judgements) and
               start_feedback_pool.
    label_modes  the label modes (multiple choice, chain of thought, ratings) over two engine primitives
               (score options, generate), one ScoringJob per rendered prompt.
    feedback_pool  FeedbackPool (N actors, least-loaded dispatch, backpressure, retry-once after a worker dies).
    labels     the pure label math (option probabilities, swap-debiasing, clamps, expected ratings).

Roles are plain classes; :mod:`cai_ray.launcher` turns them into Ray actors.
"""
