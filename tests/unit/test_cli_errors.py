"""The CLI turns a lazy import that fails because its code folder vanished into an error that says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai_ray import cli


def _missing_module(_args: object) -> int:
    raise ModuleNotFoundError("No module named 'cai_ray.training.sft_job'", name="cai_ray.training.sft_job")


def test_import_failure_after_the_working_dir_was_deleted_names_the_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # What a second raylet sharing the head's temp dir does to a `ray job submit` driver's folder.
    gone = tmp_path / "_ray_pkg_0123"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    monkeypatch.setattr(cli, "_plan", _missing_module)
    assert cli.main(["plan", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "No module named 'cai_ray.training.sft_job'" in err and "own --temp-dir" in err


def test_other_import_failures_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_plan", _missing_module)  # the working dir is intact: a real bug, not hidden
    with pytest.raises(ModuleNotFoundError):
        cli.main(["plan", "--config", "x.yaml"])
