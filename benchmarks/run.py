"""``cai-ray bench``: the throughput suite in one command, every ratio measured in the same run, vs its target.

Parts (each a module with ``main(argv) -> dict`` that also writes its own JSON / PNG under the results folder):
  inference  rollout tokens/s through the actors vs vLLM called directly; labels/s pool vs naive (and raw vLLM)
  learner    learner tokens/s: LearnerGroup vs a plain DeepSpeed loop
  sync       weight-sync effective bandwidth per transport vs one flat broadcast
  loop       RL-CAI iteration time by phase, sync vs async schedule, and the async target
  scaling    throughput vs number of rollout / feedback workers on a multi-node topology on one machine
  peer       cai-ray vs TRL's online DPO with an LLM-judge reward (needs the ``bench`` extra)
Each part runs in its own process (``python -c`` calling its ``main``): one Ray per process (scaling starts a
multi-node one), fresh memory and niceness per part, and one failing part does not stop the others.
The runner writes ``<results>/<YYYY-MM-DD>-<host>[-quick].json`` (machine, packages, the command, every part's
full result or why it is missing, a table of ratios vs targets) and ``...-ratios.png``. ``--set`` overrides
(config values, as every part takes its work from a config: :func:`benchmarks.common.bench_parser`) and
``--reps`` go to every part; unset, each part keeps its own defaults. Numbers from ``--quick`` are smoke only.

    python -m benchmarks.run [--quick] [--only loop,scaling] [--set models.policy.name=tiny-random-llama] [--reps 3]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, figure, machine_info, versions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PARTS = {"inference": "benchmarks.bench_inference", "learner": "benchmarks.bench_learner",
         "sync": "benchmarks.bench_sync", "loop": "benchmarks.bench_loop", "scaling": "benchmarks.bench_scaling",
         "peer": "benchmarks.bench_peer"}
# A part needs these importable, else it is skipped with the reason (never a made-up number).
REQUIRES = {"peer": ("trl", "TRL is not installed: pip install -e '.[bench]'")}
_CHILD = "import sys; from benchmarks.run import run_part_here; run_part_here(sys.argv[1], sys.argv[2], sys.argv[3:])"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke every part with tiny sizes; numbers are not quoted")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run ({', '.join(PARTS)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every part, e.g. --set models.policy.name=tiny-random-llama "
                        "(repeatable; default: each part's own)")
    p.add_argument("--reps", type=int, default=None, help="repetitions for every part (default: each part's own)")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR})")
    p.add_argument("--part-timeout", type=float, default=3600.0, help="seconds before a part is stopped")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


# ------------------------------------------------------------------------------------ one part
def run_part_here(module: str, result_file: str, argv: list[str]) -> None:
    """Child-process entry: run ``module.main(argv)`` and write its result dict to ``result_file``."""
    sys.argv = ["-m", module, *argv]  # a part that records ``python + sys.argv`` then records its own command
    result = importlib.import_module(module).main(argv)
    Path(result_file).write_text(json.dumps(result, default=str))


def run_part(part: str, argv: list[str], *, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run one part in a child process, streaming its output; its status, seconds and result (or the error)."""
    module = PARTS[part]
    needs = REQUIRES.get(part)
    if importlib.util.find_spec(module) is None:
        return {"status": "skipped", "module": module, "note": f"{module} does not exist yet"}
    if needs and importlib.util.find_spec(needs[0]) is None:
        return {"status": "skipped", "module": module, "note": needs[1]}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with tempfile.TemporaryDirectory(prefix=f"cai-ray-bench-{part}-") as tmp:
        result_file = Path(tmp) / "result.json"
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, module, str(result_file), *argv], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                print(f"[{part}] {line}", end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and the Ray processes it started
            rc = None
        reader.join(timeout=10)
        seconds = time.perf_counter() - start
        base = {"module": module, "argv": argv, "command": shlex.join([sys.executable, "-m", module, *argv]),
                "seconds": round(seconds, 1)}
        if rc == 0 and result_file.is_file():
            return {"status": "ok", **base, "result": json.loads(result_file.read_text())}
    why = f"no result within {timeout_s:.0f}s" if rc is None else f"exit code {rc}"
    return {"status": "failed", **base, "note": why, "output_tail": list(tail)}


# ------------------------------------------------------------------------------------ the table
def _row(part: str, metric: str, value: float | None, *, target: float | None = None, better: str = "higher",
         note: str = "") -> dict[str, Any]:
    met = None if target is None or value is None else (value >= target if better == "higher" else value <= target)
    return {"part": part, "metric": metric, "value": value, "target": target, "better": better, "met": met,
            "note": note}


def _rows_inference(r: dict[str, Any]) -> list[dict[str, Any]]:
    axes = r["axes"]
    return [_row("inference", "rollout tokens/s: actors vs vLLM direct", r["rollout"]["median_ratio_actor_vs_direct"],
                 target=r["rollout"]["target"]),
            _row("inference", "labels/s: pool vs naive (generate per option)",
                 r["labels"]["median_ratio_pool_vs_naive"], target=r["labels"]["target_vs_naive"]),
            _row("inference", "labels/s: pool vs raw vLLM prompt_logprobs", r["labels"]["median_ratio_pool_vs_raw"]),
            *[_row("inference", f"cost per axis, {k} axes vs 1 (1.0: K x one axis)",
                   axes["cost_per_axis_vs_1_axis"][str(k)], better="lower") for k in axes["axis_counts"][1:]]]


def _rows_learner(r: dict[str, Any]) -> list[dict[str, Any]]:
    c = r["config"]
    return [_row("learner", f"learner tokens/s: group vs plain DeepSpeed (ZeRO-{c['zero_stage']}, "
                            f"{c['num_ranks']} ranks)", r["median_ratio"], target=0.9)]


def _rows_sync(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [_row("sync", f"weight-sync bandwidth: {t} vs one flat broadcast", x["ratio_vs_flat_broadcast"],
                 target=x.get("target"), note=f"{r['num_bytes'] / 1e6:.0f} MB to {r['engines']} engines")
            for t, x in r["transports"].items()]


def _rows_loop(r: dict[str, Any]) -> list[dict[str, Any]]:
    t = r["async_target"]
    return [_row("loop", "iteration time: async / sync", r["median_ratio_async_vs_sync"], better="lower"),
            _row("loop", "async iteration / max(generate, train)", t["ratio_to_max"], target=t["target"],
                 better="lower", note=f"generate {t['generate_s']:.3f}s, train {t['train_s']:.3f}s, "
                                      f"async {t['async_iteration_s']:.3f}s")]


def _rows_scaling(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows, cores = [], r["bound"]["usable_cores"]
    for role, unit in (("rollout", "tokens/s"), ("feedback", "labels/s")):
        points = r[role]["points"]
        base_n = points[0]["workers"]
        for p in points[1:]:
            rows.append(_row("scaling", f"{role} {unit}: {p['workers']} vs {base_n} workers",
                             p[f"speedup_vs_{base_n}"],
                             note=f"ideal {min(p['workers'], cores) / min(base_n, cores):.1f} on {cores} cores"))
    return rows


def _rows_peer(r: dict[str, Any]) -> list[dict[str, Any]]:
    faster = r["faster_trl_variant"]
    return [_row("peer", f"iteration time: cai-ray {s} / TRL online DPO ({faster})", x["vs_faster_trl"],
                 better="lower", note=f"without pm_update: {x['without_pm_update_vs_faster_trl']:.2f}")
            for s, x in r["ratios"].items()]


ROWS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "inference": _rows_inference, "learner": _rows_learner, "sync": _rows_sync, "loop": _rows_loop,
    "scaling": _rows_scaling, "peer": _rows_peer}


def table(parts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ratio of every part, with its target (None: reported, no target set)."""
    rows = []
    for part, out in parts.items():
        if out["status"] != "ok":
            rows.append(_row(part, "(not measured)", None, note=f"{out['status']}: {out['note']}"))
            continue
        try:
            rows += ROWS[part](out["result"])
        except (KeyError, TypeError, IndexError) as err:  # a part whose JSON changed shape: say so, keep going
            rows.append(_row(part, "(result not understood)", None, note=f"{type(err).__name__}: {err}"))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'part':<10} {'metric':<62} {'ratio':>7}  {'target':<8} {'met':<4} note"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        target = "-" if r["target"] is None else f"{'>=' if r['better'] == 'higher' else '<='}{r['target']}"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"{r['part']:<10} {r['metric']:<62} {value:>7}  {target:<8} {met:<4} {r['note']}")
    return "\n".join(lines)


def plot_ratios(rows: list[dict[str, Any]], path: Path, *, quick: bool) -> None:
    """Horizontal bars of every ratio (log scale), its target as a tick, parity at 1."""
    rows = [r for r in rows if r["value"] is not None and r["value"] > 0]
    if not rows:
        return
    with figure(path, figsize=(12, 0.45 * len(rows) + 1.5)) as ax:
        _plot_rows(ax, rows, quick=quick)


def _plot_rows(ax: Any, rows: list[dict[str, Any]], *, quick: bool) -> None:
    ys = list(range(len(rows)))[::-1]
    colours = ["tab:green" if r["met"] else "tab:red" if r["met"] is False else "tab:grey" for r in rows]
    ax.barh(ys, [r["value"] for r in rows], color=colours)
    for y, r in zip(ys, rows):
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(r["value"], y, f" {r['value']:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['part']}: {r['metric']} ({r['better']} is better)" for r in rows], fontsize=7)
    ax.set_xlabel("ratio (log scale). Black tick: target. Green: met, red: missed, grey: no target", fontsize=8)
    ax.set_title("cai-ray bench" + (" --quick (smoke only: do not quote)" if quick else ""), fontsize=9)


# ---------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None, *, command: str | None = None) -> dict[str, Any]:
    """Run the selected parts; returns (and writes) the suite result. ``command`` is recorded as given."""
    args = parse_args(argv)
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    # PYTHONPATH: Ray workers (started from the part's process) can then import classes a part defines.
    env = os.environ | {"CAI_RAY_BENCH_RESULTS": str(out_dir.resolve()),
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    common = (["--quick"] if args.quick else []) + [a for s in args.set for a in ("--set", s)] + (
        ["--reps", str(args.reps)] if args.reps is not None else [])
    start = datetime.datetime.now(datetime.timezone.utc)
    parts: dict[str, dict[str, Any]] = {}
    for part in args.parts:
        print(f"=== {part} ===", flush=True)
        parts[part] = run_part(part, list(common), env=env, timeout_s=args.part_timeout)
        print(f"=== {part}: {parts[part]['status']} {parts[part].get('note', '')}", flush=True)

    rows = table(parts)
    host = socket.gethostname().split(".")[0]
    stem = f"{start.date().isoformat()}-{host}{'-quick' if args.quick else ''}"
    path = out_dir / f"{stem}.json"
    plot_path = out_dir / f"{stem}-ratios.png"
    plot_ratios(rows, plot_path, quick=args.quick)
    suite = {
        "suite": "cai-ray bench", "quick": args.quick,
        "note": "--quick numbers are smoke only: do not quote them" if args.quick else "",
        "timestamp": start.isoformat(timespec="seconds"),
        "command": command or shlex.join([sys.executable, "-m", "benchmarks.run",
                                          *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(), "packages": versions(),
        "settings": {"parts": args.parts, "overrides": args.set or "each part's defaults",
                     "reps": args.reps if args.reps is not None else "each part's default"},
        "table": rows,
        "plots": [str(plot_path)] + [str(Path(p["result"]["json"]).with_suffix(".png")) for p in parts.values()
                                     if p["status"] == "ok" and "json" in p["result"]
                                     and Path(p["result"]["json"]).with_suffix(".png").is_file()],
        "parts": parts,
    }
    path.write_text(json.dumps(suite, indent=1, default=str) + "\n")
    print(format_table(rows))
    print(f"wrote {path} and {plot_path}")
    suite["json"] = str(path)
    return suite


if __name__ == "__main__":
    sys.exit(0 if all(p["status"] != "failed" for p in main()["parts"].values()) else 1)
