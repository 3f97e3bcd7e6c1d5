"""Pure phase helpers of the RL loop: what makes an iteration empty, and what an empty iteration does."""

from __future__ import annotations

import pytest

from cai_ray.pipelines.rl_cai import (
    EmptyIterationError,
    empty_iteration,
    nothing_to_train,
    sample_stats,
)
from cai_ray.config import LearnerConfig
from cai_ray.pipelines.policy_update import PolicyUpdate, policy_update, preference_accuracy
from cai_ray.types import PreferenceLabel, RejectedItem, RolloutBatch, Sample, TrainPair


def _sample(prompt_id: str, index: int, version: int = 0) -> Sample:
    return Sample(prompt_id, "p", (1, 2), "r", (3,), (-0.5,), "stop", version, index)


def _label(error: str | None = None) -> PreferenceLabel:
    return PreferenceLabel("x", 0.5, (), (), (), "multiple_choice", error=error)


PAIR = TrainPair((1,), (2,), (3,), 0.6)


def _update(algorithm: str, samples_per_prompt: int) -> PolicyUpdate:
    return policy_update(LearnerConfig(algorithm=algorithm), samples_per_prompt=samples_per_prompt)


def test_every_prompt_rejected_is_empty_for_every_algorithm() -> None:
    batch = RolloutBatch((), (RejectedItem("a", "prompt 'a': 300 tokens exceeds data.max_prompt_tokens=4"),
                              RejectedItem("b", "prompt 'b': too long")))
    for algorithm in ("dpo", "ppo", "grpo", "rloo", "reinforce_pp"):
        reason = nothing_to_train(batch, [], [], update=_update(algorithm, 2))
        assert reason == ("no samples: all 2 prompts were rejected "
                          "(first: prompt 'a': 300 tokens exceeds data.max_prompt_tokens=4)")


def test_every_label_errored_is_empty_for_dpo_only() -> None:
    batch = RolloutBatch((_sample("a", 0), _sample("a", 1)))
    labels = [_label("feedback worker 0: the actor died; gave up after 2 attempts")]
    reason = nothing_to_train(batch, labels, [], update=_update("dpo", 2))
    assert reason == "no labelled pair for DPO: 1 of 1 labels errored (first: feedback worker 0: the actor died; " \
                     "gave up after 2 attempts)"
    for algorithm in ("ppo", "grpo", "reinforce_pp"):  # these train on the samples with PM rewards
        assert nothing_to_train(batch, labels, [], update=_update(algorithm, 2)) is None
    assert nothing_to_train(batch, [_label()], [PAIR], update=_update("dpo", 2)) is None


def test_only_partial_groups_is_empty_for_grpo_and_rloo() -> None:
    batch = RolloutBatch((_sample("a", 0), _sample("a", 1), _sample("b", 0)))
    assert nothing_to_train(batch, [], [], update=_update("grpo", 3)) == \
        "no prompt has all 3 samples that grpo needs as a group"
    assert nothing_to_train(batch, [], [], update=_update("rloo", 3)) is not None
    assert nothing_to_train(batch, [], [], update=_update("grpo", 2)) is None  # prompt a is whole
    assert nothing_to_train(batch, [], [], update=_update("reinforce_pp", 3)) is None


def test_an_empty_iteration_is_logged_with_its_reason_or_stops_the_run() -> None:
    assert empty_iteration(3, "no samples: all 4 prompts were rejected", policy="skip") == {
        "iteration/empty": 1.0, "iteration/empty_reason": "no samples: all 4 prompts were rejected"}
    with pytest.raises(EmptyIterationError, match=r"iteration 3 has nothing to train on: no samples: all 4 prompts "
                                                   r"were rejected\. .*schedule\.on_empty_iteration=skip"):
        empty_iteration(3, "no samples: all 4 prompts were rejected", policy="error")


def test_staleness_is_counted_against_the_version_being_trained() -> None:
    samples = [_sample("a", 0, version=2), _sample("a", 1, version=3)]
    assert sample_stats(samples, current_version=3)["samples/staleness_max"] == 1.0
    assert sample_stats([], current_version=5)["samples/staleness_max"] == 0.0


def test_preference_accuracy_on_fresh_labels_reports_calibration() -> None:
    # scores [a0, b0, a1, b1] = [1, 0, 0, 1]: P(a better) = sigmoid(1) on pair 0 (label 1), sigmoid(-1) on pair 1
    # (label 0); both miss by e = 1 - sigmoid(1) = 0.2689414 in different bins: ECE = e, Brier = e^2.
    pairs = [TrainPair((1,), (2,), (3,), 1.0), TrainPair((1,), (2,), (3,), 0.0)]
    metrics = preference_accuracy([1.0, 0.0, 0.0, 1.0], pairs)
    assert metrics["pm_fresh/accuracy"] == 1.0
    assert metrics["pm_fresh/ece"] == pytest.approx(0.2689414, abs=1e-6)
    assert metrics["pm_fresh/brier"] == pytest.approx(0.2689414 ** 2, abs=1e-6)
    assert preference_accuracy([], []) == {}


def test_each_policy_update_gets_only_its_own_sub_config() -> None:
    from cai_ray.training import updates

    learner = LearnerConfig(num_policy_epochs=3, ppo={"kl_coef": 0.2}, dpo={"beta": 0.3}, grpo={"scale_rewards": False})
    dpo = policy_update(learner.model_copy(update={"algorithm": "dpo"}), samples_per_prompt=2)
    assert (dpo.fn.func, dpo.fn.keywords, dpo.from_labels) == (updates.dpo, {"cfg": learner.dpo, "num_epochs": 3}, True)
    ppo = policy_update(learner.model_copy(update={"algorithm": "ppo"}), samples_per_prompt=2)
    assert (ppo.fn.func, ppo.fn.keywords) == (updates.ppo, {"cfg": learner.ppo, "num_epochs": 3})
    for name, whole in (("grpo", True), ("rloo", True), ("reinforce_pp", False)):
        update = policy_update(learner.model_copy(update={"algorithm": name}), samples_per_prompt=4)
        assert update.fn.func is updates.group and update.fn.keywords["cfg"] is learner.ppo
        assert (update.whole_groups, update.from_labels, update.samples_per_prompt) == (whole, False, 4)
    grpo = policy_update(learner.model_copy(update={"algorithm": "grpo"}), samples_per_prompt=2).fn.keywords["estimator"]
    assert (grpo.func, grpo.keywords) == (updates.grpo, {"scale_rewards": False})  # Dr. GRPO from learner.grpo


def test_a_policy_update_refuses_unscored_sequences_before_the_fan_out() -> None:
    from cai_ray.types import TrainSequence

    unscored = [TrainSequence((1,), (2,), reward=1.0), TrainSequence((1,), (3,))]
    with pytest.raises(ValueError, match=r"sequences \[1\] have no reward"):
        _update("ppo", 2).train(None, unscored)  # type: ignore[arg-type] - raises before it touches the learner
