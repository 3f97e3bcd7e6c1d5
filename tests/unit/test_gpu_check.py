"""`make gpu-check` without CUDA: says "no GPU" and passes, unless a GPU is there that torch cannot see."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "gpu" / "gpu_check.py"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA paths")


def _gpu_check():  # noqa: ANN202 - the script as a module
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_and_exits_0(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    monkeypatch.setattr(gpu_check, "Path", lambda p: Path("/nonexistent") / Path(p).name)
    assert gpu_check.main() == 0
    assert "gpu-check: no GPU" in capsys.readouterr().out


def test_a_gpu_that_torch_cannot_see_is_a_failure(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert gpu_check.main() == 1
    assert "make gpu-install" in capsys.readouterr().out
