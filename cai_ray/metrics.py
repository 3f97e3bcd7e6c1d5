"""Metrics: one writer, owned by the controller. A JSONL file always; wandb when not disabled.

``PhaseTimer`` times each phase of an iteration into ``timing/<phase>`` metrics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cai_ray.config import LoggingConfig


class MetricsWriter:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors it to wandb (offline by default)."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_name: str, config_dump: dict[str, Any]) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb: Any = None
        if cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, dir=str(run_dir),
                                     mode=cfg.wandb_mode, config=config_dump, reinit="finish_previous")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one step's metrics (NaN/inf become null in JSON)."""
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` back (for tests, resume checks and reports)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
