"""`make gpu-check`: the GPU path of cai-ray on one CUDA GPU, one line per check (fits in 8 minutes).

Runs the ``gpu``-marked tests of this folder (vLLM CUDA generation + log-probs, DeepSpeed ZeRO-2/3 on
CUDA with NCCL, a weight sync from a learner rank into a GPU engine, one RL-CAI iteration on SmolLM2),
all through the product's own roles. Exit 0 when every check passed, 1 otherwise. Without CUDA it says
"no GPU" and exits 0, unless the machine has an NVIDIA GPU that this Python's torch cannot see (a CPU
build of torch): that is a failure, since nothing would be checked where something should be.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET_S = 8 * 60


class OneLinePerCheck:
    """pytest plugin: remembers each check's outcome, printed as one line each at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:  # noqa: ANN001 - pytest's TestReport
        failed_setup = report.when == "setup" and not report.passed
        if report.when != "call" and not failed_setup:
            return
        name = report.nodeid.split("::", 1)[-1]
        if report.passed:
            self.lines.append(f"PASS  {name}  ({report.duration:.0f}s)")
        elif report.skipped:
            self.lines.append(f"SKIP  {name}  ({report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''})")
        else:
            last = str(report.longrepr).strip().splitlines()[-1:] or ["?"]
            self.lines.append(f"FAIL  {name}  ({report.duration:.0f}s): {last[0][:300]}")


def main() -> int:
    """Run the checks; return the exit code."""
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is None or not torch.cuda.is_available():
        seen = f"torch {torch.__version__}" if torch is not None else "this Python (no torch)"
        if shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists():
            print(f"gpu-check: FAIL: this machine has an NVIDIA GPU but {seen} sees no CUDA; run it with the GPU "
                  "environment: make gpu-install, then make gpu-check")
            return 1
        print(f"gpu-check: no GPU ({seen} sees no CUDA device): nothing checked, exiting 0")
        return 0
    import pytest

    plugin = OneLinePerCheck()
    start = time.monotonic()
    os.environ.setdefault("WANDB_MODE", "disabled")
    rc = pytest.main([str(HERE), "-m", "gpu", "-q", "-p", "no:cacheprovider", "--timeout=420", "-o", "addopts="],
                     plugins=[plugin])
    took = time.monotonic() - start
    print(f"\ngpu-check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU), torch "
          f"{torch.__version__}:")
    for line in plugin.lines:
        print(f"  {line}")
    passed = rc == 0 and bool(plugin.lines) and all(line.startswith("PASS") for line in plugin.lines)
    in_budget = took <= BUDGET_S
    verdict = "PASS" if passed and in_budget else "FAIL" + ("" if passed else " (a check failed)") + \
        ("" if in_budget else " (over the time budget)")
    print(f"gpu-check: {verdict} in {took:.0f}s (budget {BUDGET_S}s)")
    return 0 if passed and in_budget else 1


if __name__ == "__main__":
    sys.exit(main())
