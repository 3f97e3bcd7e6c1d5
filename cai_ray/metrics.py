"""Metrics: one writer, owned by the controller. A JSONL file always; wandb when not disabled.

A resumed run rewrites the file without the rows of steps it will run again (an interrupted run may have
logged iterations after its last checkpoint), so every step has exactly one row.

``PhaseTimer`` times each phase of an iteration into ``timing/<phase>`` metrics.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cai_ray.config import LoggingConfig


Metrics = dict[str, float | str]  # numbers; a str (a reason) goes to the JSONL file only


class MetricsWriter:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors it to wandb (offline by default).

    Rows of steps >= ``first_step`` already in the file are dropped first (0: a fresh file).
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str, config_dump: dict[str, Any], *,
                 first_step: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        keep_rows_before(self.path, first_step)
        self._wandb: Any = None
        if cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, dir=str(run_dir),
                                     mode=cfg.wandb_mode, config=config_dump, reinit="finish_previous",
                                     settings=wandb.Settings(silent=not cfg.verbose))
        self._file = self.path.open("a", encoding="utf-8")  # last: nothing to close if wandb.init raised

    def log(self, step: int, metrics: Metrics) -> None:
        """Write one step's metrics (NaN/inf become null in JSON; strings are kept in JSON, not sent to wandb)."""
        clean = {k: v if isinstance(v, str) or math.isfinite(v) else None for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        """Flush and close the file and the wandb run."""
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


class PhaseTimer:
    """Accumulates wall time per named phase: ``with timer.phase("generate"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body into ``timing/<name>``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``timing/<phase>`` for each phase seen."""
        return {f"timing/{k}": v for k, v in self.seconds.items()}


def keep_rows_before(path: Path, first_step: int, *, key: str = "step") -> None:
    """Rewrite ``path`` (atomically) with only its rows whose ``key`` is below ``first_step`` (and no torn line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)[key] < first_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line a crash cut short
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` back (for tests, resume checks and reports)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
