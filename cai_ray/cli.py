"""``cai-ray`` command line: thin — parse, build, run, close."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cai_ray.config import ConfigError, dump_config, load_config
from cai_ray.constitution import ConstitutionError, load_constitution
from cai_ray.data import DatasetError
from cai_ray.models import ModelNotFoundError

USER_ERRORS = (ConfigError, ConstitutionError, DatasetError, ModelNotFoundError)


def _config_show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.set)), end="")
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


def _models_prepare(args: argparse.Namespace) -> int:
    from cai_ray.models import resolve_model

    for name in args.names:
        print(f"{name}: {resolve_model(name)}")
    return 0


def _run_stages(args: argparse.Namespace, *, sl: bool, rl: bool) -> int:
    from cai_ray.pipelines.run import run_experiment

    run_experiment(load_config(args.config, args.set), sl=sl, rl=rl, resume=args.resume)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cai_ray.demo import run_demo

    return run_demo(args.config, args.set)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="cai-ray", description="Constitutional AI on Ray, vLLM and DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", "-c", required=required, help="experiment YAML (see configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set learner.zero_stage=3 (repeatable)")

    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print the fully resolved config")
    show.add_argument("config", nargs="?", help="experiment YAML (defaults if omitted)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=_config_show)

    con = sub.add_parser("constitution", help="work with constitutions").add_subparsers(dest="action", required=True)
    val = con.add_parser("validate", help="validate constitution YAML files")
    val.add_argument("files", nargs="+", help="paths or shipped names")
    val.set_defaults(func=_constitution_validate)

    mod = sub.add_parser("models", help="built-in models").add_subparsers(dest="action", required=True)
    prep = mod.add_parser("prepare", help="generate/convert built-in models into the cache")
    prep.add_argument("names", nargs="+", help="tiny-random-llama, smollm2-135m-instruct, a folder or hub id")
    prep.set_defaults(func=_models_prepare)

    for name, helptext, stages in (("sl", "SL-CAI: critique -> revision -> SFT", (True, False)),
                                   ("rl", "iterated online RL-CAI", (False, True)),
                                   ("run", "SL-CAI, then RL-CAI from the SL policy", (True, True))):
        p = sub.add_parser(name, help=helptext)
        with_config(p)
        p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
        p.set_defaults(func=lambda a, st=stages: _run_stages(a, sl=st[0], rl=st[1]))

    demo = sub.add_parser("demo", help="run the embedded default end to end")
    with_config(demo, required=False)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cai-ray`` and ``python -m cai_ray``."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
