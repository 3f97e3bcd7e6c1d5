"""LearnerGroup on the real stack: 2 ranks, gloo, DeepSpeed on CPU, tiny-random-llama.

One ZeRO-3 group (every parameter sharded) holding policy, reference, preference model and critic is
shared by the tests of this module, in file order; the last test kills a rank.
"""

from __future__ import annotations

import random

import pytest
import torch

from functools import partial

from cai_ray.config import ClusterConfig, LearnerConfig, ModelsConfig
from cai_ray.launcher import RemoteCallError
from cai_ray.pipelines.policy_update import PolicyUpdate, policy_update
from cai_ray.training import updates
from cai_ray.training.learner import LearnerRoles, pm_scores, policy_logprobs
from cai_ray.types import Sample, TrainPair, TrainSequence

pytestmark = pytest.mark.slow

CFG = LearnerConfig(num_ranks=2, micro_batch_size=4, collective_timeout_s=60, num_policy_epochs=2,
                    deepspeed={"zero_stage": 3, "zero3_param_persistence_threshold": 0},
                    optim={"lr": 1e-3, "pm_lr": 1e-3, "critic_lr": 1e-3}, ppo={"kl_coef": 0.01})
DPO_STEP = partial(updates.dpo, cfg=CFG.dpo, num_epochs=1)  # one optimizer step of the product's DPO update
CLUSTER = ClusterConfig(startup_timeout_s=120, step_timeout_s=120)
BUCKET = 1 << 20  # sync.bucket_size_mb's role: the gathers that write the HF folders
GOOD, BAD = range(100, 112), range(300, 312)  # small pools: every token is seen in training


@pytest.fixture(scope="module")
def group(ray_local, tiny_model_path):
    from cai_ray.training.group import LearnerGroup

    g = LearnerGroup(CFG, ModelsConfig(), CLUSTER, seed=0, roles=LearnerRoles(reference=True, preference_model=True,
                                                                              critic=True))
    yield g
    g.shutdown()


def _tokens(rng: random.Random, pool: range, lo: int, hi: int) -> tuple[int, ...]:
    return tuple(rng.choice(pool) for _ in range(rng.randint(lo, hi)))


def _prompt(rng: random.Random) -> tuple[int, ...]:
    return _tokens(rng, range(500, 1500), 3, 6)


def _seqs() -> list[TrainSequence]:
    rng = random.Random(1)
    return [TrainSequence(prompt_token_ids=_prompt(rng), response_token_ids=_tokens(rng, GOOD, 2, 7)) for _ in range(7)]


def _update(algorithm: str, samples_per_prompt: int = 2) -> PolicyUpdate:
    return policy_update(CFG.model_copy(update={"algorithm": algorithm}), samples_per_prompt=samples_per_prompt)


def _rollouts(seed: int, num_prompts: int = 4, k: int = 2) -> list[TrainSequence]:
    """k samples per prompt; sample 0 of each group gets reward +1, the others -1."""
    rng = random.Random(seed)
    out = []
    for g in range(num_prompts):
        prompt = _prompt(rng)
        for i in range(k):
            out.append(TrainSequence(prompt_token_ids=prompt, response_token_ids=_tokens(rng, range(500, 1500), 4, 4),
                                     reward=1.0 if i == 0 else -1.0, group_id=g))
    return out


def _pairs(seed: int, n: int) -> list[TrainPair]:
    """Good-vs-bad responses in random order, soft labels 0.8 / 0.2 toward the good one."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        good, bad = _tokens(rng, GOOD, 3, 6), _tokens(rng, BAD, 3, 6)
        a_good = rng.random() < 0.5
        a, b = (good, bad) if a_good else (bad, good)
        pairs.append(TrainPair(prompt_token_ids=_prompt(rng), response_a_token_ids=a, response_b_token_ids=b,
                               prob_a=0.8 if a_good else 0.2))
    return pairs


def _seq_logprob_change(group, seqs, step) -> list[float]:
    before = group.forward(policy_logprobs, seqs)
    step()
    after = group.forward(policy_logprobs, seqs)
    return [sum(a) - sum(b) for a, b in zip(after, before, strict=True)]


def test_zero0_and_zero3_loss_trajectories_agree(group):
    from cai_ray.training.group import LearnerGroup

    pairs = _pairs(1, 7)  # 7 pairs: rank 1 gets a filler pair; 2 micro-batches per rank
    zero0_cfg = CFG.model_copy(update={"deepspeed": CFG.deepspeed.model_copy(update={"zero_stage": 0})})
    zero0 = LearnerGroup(zero0_cfg, ModelsConfig(), CLUSTER, seed=0, roles=LearnerRoles(reference=True))
    try:
        losses0 = [zero0.update(DPO_STEP, pairs)["loss/dpo"] for _ in range(3)]
    finally:
        zero0.shutdown()
    losses3 = [group.update(DPO_STEP, pairs)["loss/dpo"] for _ in range(3)]
    assert losses0[2] < losses0[0]
    assert losses3 == pytest.approx(losses0, rel=1e-4)


def test_preference_model_fits_separable_soft_labels(group):
    train, held_out = _pairs(2, 24), _pairs(3, 16)
    for _ in range(15):
        metrics = group.update(updates.pm, train)
    assert metrics["pm/accuracy"] > 0.9
    seqs = [TrainSequence(prompt_token_ids=p.prompt_token_ids, response_token_ids=r)
            for p in held_out for r in (p.response_a_token_ids, p.response_b_token_ids)]
    scores = group.forward(pm_scores, seqs)
    correct = [(scores[2 * i] > scores[2 * i + 1]) == (p.prob_a > 0.5) for i, p in enumerate(held_out)]
    assert sum(correct) / len(correct) > 0.9


def test_dpo_loss_decreases_on_fixed_batch(group):
    pairs = _pairs(4, 8)
    losses = [_update("dpo").train(group, pairs)["loss/dpo"] for _ in range(4)]
    assert losses[-1] < losses[0]


def test_ppo_update_raises_logprob_of_higher_advantage_sequences(group):
    seqs = _rollouts(5)

    def step():
        for _ in range(2):
            metrics = _update("ppo").train(group, seqs)
        assert {"loss/policy", "loss/value", "kl/mean"} <= metrics.keys()

    change = _seq_logprob_change(group, seqs, step)
    up = [c for c, s in zip(change, seqs, strict=True) if s.reward > 0]
    down = [c for c, s in zip(change, seqs, strict=True) if s.reward < 0]
    assert sum(up) / len(up) > sum(down) / len(down)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_update_raises_logprob_of_higher_advantage_sequences(group, estimator):
    seqs = _rollouts(6, num_prompts=3, k=3)  # 3 groups over 2 ranks: whole groups per rank, one filler group
    change = _seq_logprob_change(group, seqs, lambda: _update(estimator, 3).train(group, seqs))
    up = [c for c, s in zip(change, seqs, strict=True) if s.reward > 0]
    down = [c for c, s in zip(change, seqs, strict=True) if s.reward < 0]
    assert sum(up) / len(up) > sum(down) / len(down)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "dpo"])
def test_a_policy_update_takes_num_policy_epochs_optimizer_steps(group, algorithm):
    """The controller's policy update and the learner count epochs in one place: E steps per update, not E**2."""
    samples = [Sample(f"p{s.group_id}", "x", s.prompt_token_ids, "", s.response_token_ids,
                      tuple(-1.0 for _ in s.response_token_ids), "stop", 0, i % 2)
               for i, s in enumerate(_rollouts(8, num_prompts=2, k=2))]
    pairs = _pairs(9, 2)
    update = _update(algorithm)
    steps = [update(group, samples, pairs) for _ in range(2)]
    assert steps[1]["policy/optimizer_steps"] - steps[0]["policy/optimizer_steps"] == CFG.num_policy_epochs == 2
    if algorithm == "ppo":  # the critic steps with the policy, once per epoch
        assert steps[1]["critic/optimizer_steps"] - steps[0]["critic/optimizer_steps"] == 2


def test_save_load_then_next_steps_match_uninterrupted_run(group, tmp_path):
    from transformers import AutoModelForCausalLM

    from cai_ray.models import ModelRef
    from cai_ray.training.modeling import ScalarHeadModel, collate_sequences, last_token_scores

    seqs, pairs, more = _seqs(), _pairs(10, 6), _pairs(11, 5)
    logprobs_at_save, scores_at_save = group.forward(policy_logprobs, seqs), group.forward(pm_scores, seqs)
    group.save_checkpoint(str(tmp_path), bucket_bytes=BUCKET)

    def steps() -> list[float]:  # the policy's and the PM's optimizer states both carry over
        return [group.update(DPO_STEP, pairs)["loss/dpo"], group.update(updates.pm, pairs)["loss/pm"],
                group.update(DPO_STEP, more)["loss/dpo"], group.update(updates.pm, more)["loss/pm"]]

    uninterrupted = steps()
    group.load_checkpoint(str(tmp_path))
    resumed = steps()
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)

    # The HF folders hold the weights at save time.
    policy = AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy_hf"), dtype=torch.float32).eval()
    assert _flat(_hf_logprobs(policy, seqs)) == pytest.approx(_flat(logprobs_at_save), abs=1e-4)
    pm = ScalarHeadModel.from_pretrained(ModelRef(str(tmp_path / "preference_hf"), None, False),
                                         dtype=torch.float32).eval()
    batch = collate_sequences(seqs, pad_id=0)
    with torch.no_grad():
        scores = last_token_scores(pm(batch.input_ids, batch.attention_mask), batch.attention_mask)
    assert scores.tolist() == pytest.approx(scores_at_save, abs=1e-4)


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted state file in a run folder would do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_state_file_that_would_run_code(group, tmp_path):
    group.save_checkpoint(str(tmp_path), bucket_bytes=BUCKET)
    marker = tmp_path / "code-ran"
    [optim] = sorted((tmp_path / "preference" / "state").glob("*rank_1*optim_states.pt"))
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, optim)
    with pytest.raises(RemoteCallError, match=rf"load_checkpoint.*{optim}: refusing to load it.*posix\.system"):
        group.load_checkpoint(str(tmp_path))
    assert not marker.exists()
    # Every rank refused before DeepSpeed read anything, so the group still trains.
    assert group.update(DPO_STEP, _pairs(12, 4))["loss/dpo"] > 0


def _flat(rows) -> list[float]:
    return [x for row in rows for x in row]


def _hf_logprobs(model, seqs) -> list[tuple[float, ...]]:
    """Flattened per-token response log-probs, one sequence at a time (no padding at all)."""
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.prompt_token_ids + s.response_token_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            out.append(tuple(logp[torch.arange(len(targets)), targets][len(s.prompt_token_ids) - 1:].tolist()))
    return out


def test_exported_weights_reproduce_learner_logprobs(group, tiny_model_path):
    """What the object-store weight sync ships (every rank gathers, rank 0 puts) is the learner's policy."""
    from transformers import AutoModelForCausalLM

    from cai_ray.launcher import get_all
    from cai_ray.sync import object_store_receive

    bucket_bytes = 300_000
    sent = get_all([rank.put_weights.remote(bucket_bytes) for rank in group.actors], timeout=CLUSTER.step,
                   names=group.names)
    assert sent[1] is None  # only rank 0 puts
    refs, _ = sent[0]
    assert len(refs) > 1
    buckets = [object_store_receive([ref], timeout_s=60)[0] for ref in refs]  # as gathered, bucket by bucket
    for bucket in buckets:  # a bucket exceeds the budget only when it is one big tensor
        assert len(bucket) == 1 or sum(t.numel() * t.element_size() for _, t in bucket) <= bucket_bytes
    state = {name: tensor for bucket in buckets for name, tensor in bucket}
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    seqs = _seqs()
    learner = group.forward(policy_logprobs, seqs)
    hf = _hf_logprobs(fresh, seqs)
    assert [len(r) for r in hf] == [len(r) for r in learner]
    assert _flat(hf) == pytest.approx(_flat(learner), abs=1e-5)


def test_dead_rank_is_an_error_naming_it(group):
    import ray

    ray.kill(group.actors[1], no_restart=True)
    with pytest.raises(RemoteCallError, match="learner rank 1"):
        group.update(DPO_STEP, _pairs(13, 4))
