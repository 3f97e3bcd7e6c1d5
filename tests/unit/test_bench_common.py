"""The benchmarks' one argument set: their work from a config and --set overrides, in a fixed order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is not installed with the package

from benchmarks.common import QUICKSTART, bench_config, bench_parser, figure  # noqa: E402


def test_defaults_then_quick_then_set_then_what_the_measurement_fixes() -> None:
    p = bench_parser("doc line\nmore", reps=3, warmup=1, warmup_help="first iterations left out")
    defaults, quick = ("rollout.max_new_tokens=32", "seed=5"), ("rollout.max_new_tokens=8",)
    fixed = ("schedule.mode=async",)

    args = p.parse_args([])
    assert (args.config, args.reps, args.warmup, args.quick) == (str(QUICKSTART), 3, 1, False)
    cfg = bench_config(args, defaults, quick, fixed)
    assert (cfg.rollout.max_new_tokens, cfg.seed, cfg.schedule.mode, cfg.name) == (32, 5, "async", "quickstart-cpu")

    args = p.parse_args(["--quick", "--set", "seed=7", "--set", "schedule.mode=sync", "--reps", "2"])
    cfg = bench_config(args, defaults, quick, fixed)
    assert (cfg.rollout.max_new_tokens, cfg.seed, cfg.schedule.mode, args.reps) == (8, 7, "async", 2)


def test_a_bad_override_names_the_key() -> None:
    args = bench_parser("doc", reps=1).parse_args(["--set", "rollout.max_new_tokenz=3"])
    assert not hasattr(args, "warmup")  # only the benchmarks that have a warm-up take --warmup
    with pytest.raises(SystemExit, match=r"rollout.max_new_tokenz: unknown key \(did you mean 'max_new_tokens'\?\)"):
        bench_config(args)


def test_figure_writes_a_png(tmp_path: Path) -> None:
    with figure(tmp_path / "x.png", figsize=(4, 3), ncols=2) as (left, right):
        left.plot([0, 1], [1, 0])
        right.bar(["a"], [1.0])
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
