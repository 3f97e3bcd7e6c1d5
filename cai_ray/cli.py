"""``cai-ray`` command line: thin — parse, build, run, close."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai_ray.config import ConfigError, dump_config, load_config
from cai_ray.constitution import ConstitutionError, load_constitution
from cai_ray.data import DatasetError
from cai_ray.models import ModelNotFoundError
from cai_ray.pipelines.checkpoint import ResumeError
from cai_ray.run_logs import run_logging

USER_ERRORS = (ConfigError, ConstitutionError, DatasetError, ModelNotFoundError, ResumeError)


def _config_show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.set)), end="")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from cai_ray.plan import format_plan, make_plan

    plan = make_plan(load_config(args.config, args.set))
    print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan))
    return 0


def _constitution_validate(args: argparse.Namespace) -> int:
    failed = 0
    for ref in args.files:
        try:
            c = load_constitution(ref)
        except ConstitutionError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        n_crit = len([p for p in c.principles if p.critique])
        n_comp = len([p for p in c.principles if p.comparison])
        fs = c.few_shot
        print(f"ok {ref}: {len(c.tiers)} tiers ({' > '.join(t.id for t in c.tiers)}), {len(c.principles)} principles "
              f"({n_crit} critique/revision, {n_comp} comparison), few-shot {len(fs.critique_revision)}/"
              f"{len(fs.comparison)}/{len(fs.cot_comparison)}")
    return 1 if failed else 0


def _axes(args: argparse.Namespace) -> int:
    from cai_ray.axes_report import AxesReportError, format_trade_offs, write_axes_report

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "axes"
    try:
        report = write_axes_report(run_dir, out, window=args.window, num_samples=args.bootstrap, seed=args.seed)
    except AxesReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_trade_offs(report))
    print(f"wrote {out / 'axes.json'} and {len(report['plots'])} heatmap(s)")
    return 0


def _judge_check(args: argparse.Namespace) -> int:
    import json

    from cai_ray.inference.feedback import FeedbackWorker
    from cai_ray.judge_check import format_report, judge_check, trained_axes
    from cai_ray.pipelines.run import LOGS_DIR, run_dir_for

    cfg = load_config(args.config, args.set)
    feedback = cfg.feedback.model_copy(update={"swap_debias": True})  # both orders: position bias is measured
    out = Path(args.out) if args.out else run_dir_for(cfg) / "judge_check.json"
    with run_logging(out.parent / LOGS_DIR, verbose=cfg.logging.verbose):  # the in-process engine's logs
        worker = FeedbackWorker(cfg.models.resolved_feedback(), feedback, cfg.constitution, cfg.data, seed=cfg.seed)
        constitution = load_constitution(cfg.constitution.path)
        report = judge_check(worker.label_pairs, constitution, tiers=cfg.constitution.tiers,
                             trained_axes=trained_axes(constitution, cfg.feedback.label_axes, cfg.constitution.tiers))
    report["feedback_model"] = cfg.models.resolved_feedback().name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(format_report(report))
    if report["at_chance_trained_axes"]:
        print(f"WARNING: the judge is at chance on trained axes {report['at_chance_trained_axes']}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def _models_prepare(args: argparse.Namespace) -> int:
    from cai_ray.models import resolve_model

    for name in args.names:
        print(f"{name}: {resolve_model(name)}")
    return 0


def _run_stages(args: argparse.Namespace, *, sl: bool, rl: bool) -> int:
    from cai_ray.pipelines.run import run_experiment

    run_experiment(load_config(args.config, args.set), sl=sl, rl=rl, resume=args.resume)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cai_ray.evaluation.report import PLOT_FILE, REPORT_FILE, format_table
    from cai_ray.evaluation.run import evaluate, parse_checkpoints, run_checkpoints
    from cai_ray.pipelines.run import LOGS_DIR, run_dir_for

    cfg = load_config(args.config, args.set)
    extra = parse_checkpoints(args.checkpoint)
    run_dir = args.run_dir
    if run_dir is None and not extra and run_dir_for(cfg).is_dir():
        run_dir = str(run_dir_for(cfg))  # `cai-ray eval -c C` right after `cai-ray run -c C`
    checkpoints, preference_model = run_checkpoints(run_dir, cfg.models.policy.name) if run_dir else ({}, None)
    if not checkpoints and not extra:
        checkpoints = {"base": cfg.models.policy.name}
    clash = sorted(set(checkpoints) & set(extra))
    if clash:
        raise ConfigError(f"--checkpoint {clash[0]}=...: '{clash[0]}' is already taken by --run-dir; rename it")
    out = Path(args.out) if args.out else Path(run_dir or run_dir_for(cfg)) / "eval"
    with run_logging(out / LOGS_DIR, verbose=cfg.logging.verbose):
        report = evaluate(cfg, checkpoints | extra, out_dir=out,
                          preference_model=args.preference_model or preference_model)
    print(format_table(report))
    print(f"report: {out / REPORT_FILE}\nplot: {out / PLOT_FILE}")
    return 0


def _label(args: argparse.Namespace) -> int:
    from cai_ray.launcher import init_ray
    from cai_ray.pipelines.label import SUMMARY_FILE, label_pairs_file

    cfg = load_config(args.config, args.set)
    init_ray(cfg.cluster)
    result = label_pairs_file(cfg, args.pairs, args.out)
    print(f"labels: {len(result.files)} Parquet shards in {args.out}; summary: {Path(args.out) / SUMMARY_FILE}")
    return 0 if result.num_rows else 1


def _demo(args: argparse.Namespace) -> int:
    from cai_ray.demo import run_demo

    return run_demo(args.config, args.set)


def _bench(args: argparse.Namespace) -> int:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "benchmarks" / "run.py").is_file():
        print("error: cai-ray bench needs a source checkout (benchmarks/ is not installed with the package)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(repo))
    from benchmarks.run import main as run_bench

    argv = (["--quick"] if args.quick else []) + (["--only", args.only] if args.only else [])
    argv += [a for s in args.set for a in ("--set", s)]
    for flag, value in (("--reps", args.reps), ("--out", args.out)):
        if value is not None:
            argv += [flag, str(value)]
    suite = run_bench(argv, command=shlex.join(["cai-ray", "bench", *argv]))
    return 1 if any(p["status"] == "failed" for p in suite["parts"].values()) else 0


def _label_arguments(lab: argparse.ArgumentParser) -> None:
    lab.add_argument("--pairs", required=True, help=".jsonl / .parquet file or hf:<id>[:split] with columns prompt, "
                                                    "response_a, response_b (and optionally id)")
    lab.add_argument("--out", required=True, help="output folder: Parquet shards of labels and labels.json "
                                                  "(a re-run skips the shards already written)")
    lab.set_defaults(func=_label)


def _serve(args: argparse.Namespace) -> int:
    from cai_ray.launcher import init_ray
    from cai_ray.serving import feedback, policy
    from cai_ray.serving.service import stop_serve, wait_for_interrupt

    cfg = load_config(args.config, args.set)
    if args.action == "policy":
        built = policy.build_policy_app(cfg, model=args.model, run_dir=args.run_dir)
        deploy, what, api = policy.deploy_policy, f"'{built.model_id}'", "/v1 (OpenAI API"
    else:
        built = feedback.build_feedback_app(cfg)
        deploy, what, api = feedback.deploy_feedback, "the feedback model", "/v1/{label,judge,revise} (labelling"
    init_ray(cfg.cluster)
    try:
        service = deploy(built, cfg.serve)
        print(f"serving {what} at {service.url}{api}; "
              f"{'bearer token required' if service.authenticated else 'no token: loopback only'}); Ctrl-C stops",
              flush=True)
        wait_for_interrupt()
    except KeyboardInterrupt:  # Ctrl-C while the replicas were still starting
        print("interrupted before the service was up; stopped it", file=sys.stderr)
        return 130
    finally:
        stop_serve()
    return 0


def _with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config``, ``--set`` and ``--verbose``: what every subcommand that runs a config takes."""
    p.add_argument("--config", "-c", required=required, help="experiment YAML (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set learner.deepspeed.zero_stage=3 (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show every engine and framework log on the console (--set logging.verbose=true); "
                        "default: they go to RUN/logs/")


def _inspect_commands(sub: Any) -> None:
    """config, plan, constitution, models: look before running."""
    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print the fully resolved config")
    show.add_argument("config", nargs="?", help="experiment YAML (defaults if omitted)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=_config_show)

    plan = sub.add_parser("plan", help="dry run: each role's actors, placement, device and backend; what the run "
                                       "asks the cluster for (no cluster, no model)")
    _with_config(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=_plan)

    con = sub.add_parser("constitution", help="work with constitutions").add_subparsers(dest="action", required=True)
    val = con.add_parser("validate", help="validate constitution YAML files")
    val.add_argument("files", nargs="+", help="paths or shipped names")
    val.set_defaults(func=_constitution_validate)

    mod = sub.add_parser("models", help="built-in models").add_subparsers(dest="action", required=True)
    prep = mod.add_parser("prepare", help="generate/convert built-in models into the cache")
    prep.add_argument("names", nargs="+", help="tiny-random-llama, smollm2-135m-instruct, a folder or hub id")
    prep.set_defaults(func=_models_prepare)


def _run_commands(sub: Any) -> None:
    """sl, rl, run, eval, label: the stages and batch jobs."""
    for name, helptext, stages in (("sl", "SL-CAI: critique -> revision -> SFT", (True, False)),
                                   ("rl", "iterated online RL-CAI", (False, True)),
                                   ("run", "SL-CAI, then RL-CAI from the SL policy", (True, True))):
        p = sub.add_parser(name, help=helptext)
        _with_config(p)
        p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
        p.set_defaults(func=lambda a, st=stages: _run_stages(a, sl=st[0], rl=st[1]))

    ev = sub.add_parser("eval", help="harmlessness, over-refusal and win-rates of policy checkpoints")
    _with_config(ev)
    ev.add_argument("--checkpoint", action="append", default=[], metavar="NAME=MODEL",
                    help="a policy to evaluate: HF folder, hub id or built-in name (repeatable, in order)")
    ev.add_argument("--run-dir", help="add the run's checkpoints: base (the config's policy), sl, rl, and its "
                                      "preference model (default: the config's run folder, if it exists and no "
                                      "--checkpoint is given)")
    ev.add_argument("--preference-model", help="a saved preference-model folder to score responses with")
    ev.add_argument("--out", help="output folder for eval.json / eval.png (default: RUN/eval)")
    ev.set_defaults(func=_eval)

    lab = sub.add_parser("label", help="offline AI preference labels for a file of (prompt, response_a, "
                                       "response_b) pairs, as a Ray Data batch job")
    _with_config(lab)
    _label_arguments(lab)


def _tool_commands(sub: Any) -> None:
    """bench, axes, judge-check."""
    bench = sub.add_parser("bench", help="throughput benchmark suite (JSON + PNG under benchmarks/results/)")
    bench.add_argument("--quick", action="store_true", help="smoke every part with tiny sizes (numbers not quoted)")
    bench.add_argument("--only", default=None,
                       help="comma-separated parts (default all): inference, learner, sync, loop, scaling, peer")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value in every part, e.g. --set models.policy.name=tiny-random-llama "
                            "(repeatable; default: each part's own)")
    bench.add_argument("--reps", type=int, default=None, help="repetitions for every part (default: each part's own)")
    bench.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    bench.set_defaults(func=_bench)

    axes = sub.add_parser("axes", help="correlations of a run's per-axis labels: trade-offs, JSON + heatmaps")
    axes.add_argument("--run-dir", required=True, help="an RL run folder labelled with feedback.label_axes")
    axes.add_argument("--window", type=int, default=1, help="iterations per window (default 1)")
    axes.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per correlation")
    axes.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    axes.add_argument("--out", help="output folder (default: RUN/axes)")
    axes.set_defaults(func=_axes)

    jc = sub.add_parser("judge-check", help="the feedback model's accuracy per axis on the shipped calibration set")
    _with_config(jc)
    jc.add_argument("--out", help="JSON output (default: RUN/judge_check.json)")
    jc.set_defaults(func=_judge_check)


def _serve_commands(sub: Any) -> None:
    """serve policy | feedback, and demo."""
    srv = sub.add_parser("serve", help="Ray Serve services (see the serve config section)").add_subparsers(
        dest="action", required=True)
    sp = srv.add_parser("policy", help="a policy behind an OpenAI-compatible API (/v1/chat/completions, ...)")
    _with_config(sp, required=False)
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="built-in name, HF folder or hub id")
    which.add_argument("--run-dir", help="a run folder: serves its latest policy (RL checkpoint, else SL)")
    sp.set_defaults(func=_serve)
    sf = srv.add_parser("feedback", help="the feedback model as a labelling service (/feedback/v1/label, judge, "
                                         "revise)")
    _with_config(sf)
    sf.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="run the embedded default end to end")
    _with_config(demo, required=False)
    demo.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="cai-ray", description="Constitutional AI on Ray, vLLM and DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_inspect_commands, _run_commands, _tool_commands, _serve_commands):
        add(sub)
    return parser


def source_removed_message() -> str | None:
    """Why a lazy import of cai-ray's own code failed, if its folder was deleted under this process."""
    here = Path(__file__).resolve().parent
    try:
        os.getcwd()
        cwd_gone = False
    except FileNotFoundError:
        cwd_gone = True
    if not cwd_gone and (here / "cli.py").is_file():
        return None
    return (f"the cai_ray code this process runs ({here}) was deleted while it ran. Under `ray job submit "
            "--working-dir`, each raylet unpacks the job's working_dir in its Ray temp dir; several raylets on one "
            "host share the head's temp dir unless started with their own `--temp-dir`, and a second raylet "
            "re-extracts the folder the driver runs from. Start every raylet on a host with its own --temp-dir.")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cai-ray`` and ``python -m cai_ray``."""
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        args.set.append("logging.verbose=true")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        reason = source_removed_message() if (err.name or "").startswith("cai_ray") else None
        if reason is None:
            raise
        print(f"error: {err}: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
