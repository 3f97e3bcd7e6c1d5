"""Inference-plane benchmark: the cost of our roles over calling vLLM directly, in one run.

1. Rollout tokens/s: a RolloutWorker Ray actor vs the same vLLM engine (same engine arguments, same
   pre-tokenized prompts, same per-request seeds, so the same tokens) called directly in this process.
   Target: actor >= 0.95x direct.
2. Labels/s: the FeedbackPool (multiple-choice, swap-debiased, one principle per pair) vs
   (a) naive scoring, one ``generate(max_tokens=1)`` call per option, pair after pair, and
   (b) raw vLLM ``prompt_logprobs`` scoring of every (pair, order, option) sequence in one batched call.
   Both baselines render the same prompts with the same principles, on an engine with the same
   arguments, and their labels are checked against the pool's. Target: pool >= 1.5x naive.
3. Labels/s along K behavioural axes (``feedback.label_axes``, constitution ``axes12``): the same pairs labelled
   on 1, 4 and 12 axes by three pools (one worker each, otherwise configured alike). Per-axis prompts put the
   question after the responses, so a pair's K axes share the responses as a cached prefix; the claim is that
   K axes cost well under K times one axis. Reported: labels/s per K, the ratio to one axis, and the cost per
   axis relative to one axis (``(rate_1 / rate_K) / K``); a PNG shows them. ``--mode axes`` runs only this.

Every measurement alternates (A B A B ...) after a warm-up, with this process at the actors' niceness
(Ray runs workers at nice 15; on a shared machine a nice-0 baseline would win on priority alone). Each
repetition uses fresh pairs so the prefix cache only helps with what real labelling shares (the
constitution's few-shot prefix). JSON goes to ``benchmarks/results/`` with the machine, package
versions, the command and every repetition.

    python -m benchmarks.bench_inference [--quick] [--reps 5] [--pairs 48] [--mode all|axes] [--config C] [--set KEY=VALUE ...]

The work comes from the config (default the quickstart): model and dtype (``models.policy``), prompts per
repetition (``schedule.num_prompts_per_iteration``), samples and length (``rollout.*``), threads per engine
(``rollout.resources``), the pool's batching (``feedback.*``), ``seed``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    alternate,
    bench_config,
    bench_parser,
    command_line,
    figure,
    match_actor_niceness,
    summary,
    write_result,
)


# The work, as config values over --config (default the quickstart): one engine per side, 1 CPU thread each.
DEFAULTS = ("schedule.num_prompts_per_iteration=32", "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=32",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.num_workers=1", "rollout.resources.num_cpus=1",
            "feedback.num_workers=1", "feedback.resources.num_cpus=1", "feedback.batch_size=16",
            "feedback.max_in_flight_per_worker=2", "feedback.label_mode=multiple_choice",
            "feedback.num_principles_per_label=1", "feedback.swap_debias=true", "cluster.object_store_memory_mb=512")
QUICK = ("schedule.num_prompts_per_iteration=4", "rollout.num_samples_per_prompt=2", "rollout.max_new_tokens=8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, reps=5)
    p.add_argument("--pairs", type=int, default=48, help="pairs labelled per repetition")
    p.add_argument("--niceness", choices=["match", "keep"], default="match",
                   help="match: run this process at the actors' niceness (Ray starts workers at nice 15), so the "
                        "in-process baselines get no scheduling edge on a shared machine; keep: leave it")
    p.add_argument("--mode", choices=["all", "axes"], default="all",
                   help="all: rollout, labels and per-axis labels; axes: only labels/s on 1, 4 and 12 axes")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.pairs = 1, 4
    args.cfg = bench_config(args, DEFAULTS, QUICK)
    return args


def rates(runs: list[tuple[float, float]]) -> dict[str, Any]:
    per_s = [units / seconds for seconds, units in runs]
    return {"seconds": [s for s, _ in runs], "units": [u for _, u in runs], "per_s": per_s, "summary": summary(per_s)}


def median_ratio(ours: list[tuple[float, float]], base: list[tuple[float, float]]) -> float:
    """Median over repetitions of (our rate / baseline rate), paired by repetition."""
    return statistics.median((u1 / s1) / (u2 / s2) for (s1, u1), (s2, u2) in zip(ours, base))


AXIS_COUNTS = (1, 4, 12)  # the K: one axis, a few, and every axis of axes12


def sample_pairs(llm: Any, tokenizer: Any, records: Sequence[Any], args: argparse.Namespace, *, max_new_tokens: int,
                 seed: int) -> list[Any]:
    """Real responses to label: 4 sampled once per prompt, cut into 2 pairs per prompt (fresh pairs per repetition)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cai_ray.constitution import render_chat
    from cai_ray.types import ComparisonRequest, Prompt

    source = [Prompt(r.id, r.prompt) for r in records]
    src_ids = [tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": p.text}]),
                                add_special_tokens=False) for p in source]
    need_prompts = -(-args.pairs * (args.reps + 1) // 2)  # 2 pairs per prompt
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in src_ids[:need_prompts]],
                        SamplingParams(n=4, temperature=1.0, max_tokens=max_new_tokens, seed=seed + 1),
                        use_tqdm=False)
    all_pairs = [ComparisonRequest(f"{p.id}-{j}", p.text, o.outputs[a].text, o.outputs[b].text)
                 for p, o in zip(source, outs) for j, (a, b) in enumerate([(0, 1), (2, 3)])]
    if len(all_pairs) < args.pairs * (args.reps + 1):
        raise SystemExit(f"only {len(all_pairs)} pairs available; lower --pairs or --reps")
    return all_pairs


def measure_axes(args: argparse.Namespace, model: Any, feedback: Any, data: Any, cluster: Any, seed: int,
                 pairs_for: Any) -> dict[str, Any]:
    """Labels/s for K = 1, 4, 12 axes of ``axes12``: one pool per K (one worker each), the same pairs, alternated.

    A label is one pair labelled on all K axes (each axis one principle, both orders). Also checks that the axes
    the K share get the same labels (to the cross-call tolerance) whatever K.
    """
    from cai_ray.config import ConstitutionConfig
    from cai_ray.constitution import load_constitution
    from cai_ray.inference.feedback import start_feedback_pool

    constitution = ConstitutionConfig(path="axes12", num_few_shot=args.cfg.constitution.num_few_shot)
    axes = load_constitution(constitution.path).axis_ids
    pools: dict[int, Any] = {}
    labels: dict[int, dict[str, dict[str, float]]] = {k: {} for k in AXIS_COUNTS}
    errors = {k: 0 for k in AXIS_COUNTS}
    try:
        for k in AXIS_COUNTS:
            cfg = type(feedback).model_validate(feedback.model_dump() | {"label_axes": list(axes[:k])})
            pools[k] = start_feedback_pool(model, cfg, constitution, data, cluster, seed=seed)

        def side(k: int) -> Any:
            def run(rep: int) -> float:
                for label in pools[k].label_pairs(pairs_for(rep)):
                    errors[k] += label.error is not None
                    labels[k][label.pair_id] = label.axis_probs or {}
                return args.pairs
            return run

        runs = alternate({f"{k}_axes": side(k) for k in AXIS_COUNTS}, args.reps)
    finally:
        for pool in pools.values():
            pool.shutdown()
    rate = {k: rates(runs[f"{k}_axes"]) for k in AXIS_COUNTS}
    ratio = {k: median_ratio(runs[f"{k}_axes"], runs["1_axes"]) for k in AXIS_COUNTS}
    shared = [abs(labels[k][pid][a] - labels[1][pid][a]) for k in AXIS_COUNTS[1:] for pid in labels[1]
              for a in labels[1][pid] if labels[k].get(pid)]
    return {
        "unit": "pairs labelled on all K axes (one principle per axis, both orders)",
        "constitution": constitution.path, "axis_counts": list(AXIS_COUNTS), "axes": list(axes),
        "rate": {str(k): rate[k] for k in AXIS_COUNTS},
        "axis_labels_per_s_median": {str(k): k * rate[k]["summary"]["median"] for k in AXIS_COUNTS},
        "median_ratio_vs_1_axis": {str(k): ratio[k] for k in AXIS_COUNTS},
        # 1.0: an axis costs what one axis alone costs (K times the work); well under 1: the K axes share work.
        "cost_per_axis_vs_1_axis": {str(k): 1.0 / (ratio[k] * k) for k in AXIS_COUNTS},
        "item_errors": {str(k): errors[k] for k in AXIS_COUNTS},
        "max_abs_diff_shared_axes_vs_1_axis": max(shared, default=0.0),
    }


def plot_axes(axes: dict[str, Any], path: Path, *, title: str) -> None:
    """Labels/s per K with the "K times one axis" line, and the cost per axis relative to one axis."""
    ks = axes["axis_counts"]
    med = [axes["rate"][str(k)]["summary"]["median"] for k in ks]
    low = [m - axes["rate"][str(k)]["summary"]["min"] for k, m in zip(ks, med)]
    high = [axes["rate"][str(k)]["summary"]["max"] - m for k, m in zip(ks, med)]
    with figure(path, figsize=(9, 4), ncols=2) as (left, right):
        left.bar([str(k) for k in ks], med, yerr=[low, high], capsize=4, label="measured (median, min-max)")
        left.plot([str(k) for k in ks], [med[0] / k for k in ks], "r--o", label="if K axes cost K x one axis")
        left.set_xlabel("axes labelled per pair (K)")
        left.set_ylabel("labels/s (pairs on all K axes)")
        left.legend(fontsize=7)
        cost = [axes["cost_per_axis_vs_1_axis"][str(k)] for k in ks]
        right.bar([str(k) for k in ks], cost, color="tab:green")
        right.axhline(1.0, color="red", linestyle="--", label="no sharing (K x one axis)")
        right.set_xlabel("axes labelled per pair (K)")
        right.set_ylabel("cost per axis / cost of one axis")
        right.legend(fontsize=7)
        left.figure.suptitle(title, fontsize=9)


# ------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result (also written as JSON under ``--out``, its path in ``result["json"]``)."""
    args = parse_args(argv)
    cfg = args.cfg
    from cai_ray.backend import decide, resolve_threads

    threads = resolve_threads(cfg.rollout.resources, node_cores=os.cpu_count() or 1, peers=1)  # each engine's
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import ray
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cai_ray.constitution import comparison_prompt, load_constitution, render_chat
    from cai_ray.data import load_prompts
    from cai_ray.inference.engine import engine_args
    from cai_ray.seeds import stable_seed
    from cai_ray.inference.feedback import start_feedback_pool
    from cai_ray.inference.label_modes import option_continuations
    from cai_ray.inference.labels import option_probability, preference_label
    from cai_ray.inference.rollout import start_rollout_workers
    from cai_ray.launcher import init_ray
    from cai_ray.types import ComparisonRequest, Prompt

    # The pool labels with the policy: the baselines score on the direct engine, which runs the policy.
    model, rollout, feedback, constitution_cfg, data = cfg.models.policy, cfg.rollout, cfg.feedback, cfg.constitution, \
        cfg.data
    engine, seed, num_prompts = rollout.engine, cfg.seed, cfg.schedule.num_prompts_per_iteration
    num_samples, max_new_tokens = rollout.num_samples_per_prompt, rollout.max_new_tokens
    # Three engines on this node: the rollout actor, the feedback actor and the direct one.
    cluster = cfg.cluster.model_copy(update={"num_cpus": max(cfg.cluster.num_cpus or 0, 3 * threads)})
    init_ray(cluster)

    # The direct engine: exactly the arguments the rollout actor's engine gets.
    llm = LLM(**engine_args(model, engine, backend=decide("rollout", rollout.resources),
                            seed=stable_seed(seed, "rollout-engine", 0)))
    tokenizer = llm.get_tokenizer()
    constitution = load_constitution(constitution_cfg.path)
    records = load_prompts("redteam_train") + load_prompts("helpful_train")
    prompts = [Prompt(r.id, r.prompt) for r in records[:num_prompts]]
    prompt_ids = [tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": p.text}]),
                                   add_special_tokens=False) for p in prompts]

    if args.mode == "axes":  # per-axis labels only: no rollout actor, no in-process baseline
        all_axis_pairs = sample_pairs(llm, tokenizer, records, args, max_new_tokens=max_new_tokens, seed=seed)
        result = {"settings": settings(args, threads),
                  "axes": measure_axes(args, model, feedback, data, cluster, seed,
                                       lambda rep: pairs_of(all_axis_pairs, rep, args.pairs))}
        return finish(result, args, argv)
    fleet = start_rollout_workers(model, rollout, data, cluster, seed=seed)
    workers = fleet.workers
    pool = start_feedback_pool(model, feedback, constitution_cfg, data, cluster, seed=seed)
    if args.niceness == "match":
        niceness = match_actor_niceness(workers[0])
    else:
        niceness = {"actors": ray.get(workers[0].__ray_call__.remote(lambda self: os.nice(0)), timeout=60),
                    "baselines": os.nice(0)}
    try:
        # ------------------------------------------------------------------------------ rollout
        def actor_side(rep: int) -> float:
            batch = ray.get(workers[0].generate.remote(prompts, seed=rep), timeout=cluster.step_timeout_s)
            return sum(len(s.response_token_ids) for s in batch.samples)

        def direct_side(rep: int) -> float:
            params = [SamplingParams(n=num_samples, temperature=rollout.temperature, top_p=rollout.top_p, logprobs=0,
                                     max_tokens=min(max_new_tokens, model.max_model_len - len(ids)),
                                     seed=stable_seed(rep, p.id)) for p, ids in zip(prompts, prompt_ids)]
            outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        rollout_runs = alternate({"actor": actor_side, "direct": direct_side}, args.reps)
        same_tokens = [u for _, u in rollout_runs["actor"]] == [u for _, u in rollout_runs["direct"]]

        # ------------------------------------------------------------------------------- labels
        all_pairs = sample_pairs(llm, tokenizer, records, args, max_new_tokens=max_new_tokens, seed=seed)

        def pairs_for(rep: int) -> list[ComparisonRequest]:
            return pairs_of(all_pairs, rep, args.pairs)

        option_a, option_b = option_continuations(lambda s: tokenizer.encode(s, add_special_tokens=False))
        assert len(option_a) == len(option_b) == 1, "baselines assume single-token options"
        labels: dict[str, dict[str, float]] = {"pool": {}, "naive": {}, "raw": {}}

        def rendered(req: ComparisonRequest) -> list[list[int]]:
            # The pool worker's principle draw for this pair, then both presentation orders.
            rng = random.Random(stable_seed(seed, "comparison", req.pair_id, 0))
            [principle] = constitution.sample_principles(rng, "comparison", 1, constitution_cfg.tiers)
            texts = [comparison_prompt(tokenizer, constitution, principle, prompt=req.prompt, response_a=x,
                                       response_b=y, num_few_shot=constitution_cfg.num_few_shot)
                     for x, y in ((req.response_a, req.response_b), (req.response_b, req.response_a))]
            return [tokenizer.encode(t, add_special_tokens=False) for t in texts]

        def pool_side(rep: int) -> float:
            for label in pool.label_pairs(pairs_for(rep)):
                labels["pool"][label.pair_id] = label.prob_a
            return args.pairs

        def naive_side(rep: int) -> float:
            for req in pairs_for(rep):
                first = []
                for ids in rendered(req):
                    logprobs = []
                    for option in (option_a[0], option_b[0]):  # one generate per option
                        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                           SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[option]),
                                           use_tqdm=False)
                        logprobs.append(out[0].outputs[0].logprobs[0][option].logprob)
                    first.append(option_probability(*logprobs))
                labels["naive"][req.pair_id] = preference_label([first[0]], [first[1]])
            return args.pairs

        def raw_side(rep: int) -> float:
            reqs = pairs_for(rep)
            seqs = [ids + [opt] for req in reqs for ids in rendered(req) for opt in (option_a[0], option_b[0])]
            outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs],
                                SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
            lps = [o.prompt_logprobs[-1][s[-1]].logprob for o, s in zip(outs, seqs)]
            for i, req in enumerate(reqs):
                a_ab, b_ab, a_ba, b_ba = lps[4 * i: 4 * i + 4]
                labels["raw"][req.pair_id] = preference_label([option_probability(a_ab, b_ab)],
                                                              [option_probability(a_ba, b_ba)])
            return args.pairs

        label_runs = alternate({"pool": pool_side, "naive": naive_side, "raw": raw_side}, args.reps)

        def max_diff(other: str) -> float:
            return max(abs(labels["pool"][k] - labels[other][k]) for k in labels["pool"])

        result: dict[str, Any] = {
            "settings": settings(args, threads) | {"niceness": niceness},
            "rollout": {
                "unit": "generated tokens",
                "actor": rates(rollout_runs["actor"]),
                "direct": rates(rollout_runs["direct"]),
                "same_tokens_generated": same_tokens,
                "median_ratio_actor_vs_direct": median_ratio(rollout_runs["actor"], rollout_runs["direct"]),
                "target": 0.95,
            },
            "labels": {
                "unit": "labelled pairs (both orders)",
                "pool": rates(label_runs["pool"]),
                "naive_generate_per_option": rates(label_runs["naive"]),
                "raw_vllm_prompt_logprobs": rates(label_runs["raw"]),
                "median_ratio_pool_vs_naive": median_ratio(label_runs["pool"], label_runs["naive"]),
                "median_ratio_pool_vs_raw": median_ratio(label_runs["pool"], label_runs["raw"]),
                "target_vs_naive": 1.5,
                "max_abs_label_diff_vs_naive": max_diff("naive"),
                "max_abs_label_diff_vs_raw": max_diff("raw"),
            },
        }
    finally:
        pool.shutdown()
        fleet.shutdown()

    result["axes"] = measure_axes(args, model, feedback, data, cluster, seed, pairs_for)
    return finish(result, args, argv)


def settings(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """The settings every measurement shares (recorded in the JSON)."""
    cfg = args.cfg
    model, rollout, feedback = cfg.models.policy, cfg.rollout, cfg.feedback
    return {"mode": args.mode, "model": model.name, "dtype": model.dtype, "reps": args.reps,
            "prompts": cfg.schedule.num_prompts_per_iteration, "samples_per_prompt": rollout.num_samples_per_prompt,
            "max_new_tokens": rollout.max_new_tokens, "pairs_per_rep": args.pairs, "threads_per_engine": threads,
            "seed": cfg.seed, "engine": rollout.engine.model_dump(), "feedback_workers": feedback.num_workers,
            "feedback_batch_size": feedback.batch_size}


def pairs_of(all_pairs: Sequence[Any], rep: int, n: int) -> list[Any]:
    """Repetition ``rep``'s ``n`` fresh pairs (rep -1 is the warm-up)."""
    start = (rep + 1) * n
    return list(all_pairs[start:start + n])


def finish(result: dict[str, Any], args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """Write the JSON (its path in ``result["json"]``) and the per-axis PNG next to it; print the ratios."""
    path = write_result("inference", result, quick=args.quick, out_dir=Path(args.out),
                        command=command_line("benchmarks.bench_inference", argv))
    s = result["settings"]
    plot_axes(result["axes"], path.with_suffix(".png"),
              title=f"labels/s along K axes (axes12, {s['model']}, {s['pairs_per_rep']} pairs per rep, "
                    f"{s['threads_per_engine']} thread(s) per engine)")
    result["json"] = str(path)
    if "rollout" in result:
        r, lab = result["rollout"], result["labels"]
        print(f"rollout tokens/s actor/direct median ratio {r['median_ratio_actor_vs_direct']:.3f} (target >= 0.95)")
        print(f"labels/s pool/naive median ratio {lab['median_ratio_pool_vs_naive']:.2f} (target >= 1.5), "
              f"pool/raw {lab['median_ratio_pool_vs_raw']:.2f}")
    ax = result["axes"]
    print("labels/s along K axes: " + ", ".join(
        f"K={k}: {ax['rate'][str(k)]['summary']['median']:.1f}/s (x{ax['median_ratio_vs_1_axis'][str(k)]:.2f} of one "
        f"axis, cost per axis {ax['cost_per_axis_vs_1_axis'][str(k)]:.2f})" for k in ax["axis_counts"]))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
