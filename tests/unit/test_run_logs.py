"""Quiet by default: where start-up lines and library logs go inside and outside a run (no Ray needed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from cai_ray import run_logs
from cai_ray.backend import decide
from cai_ray.config import ResourcesConfig

LINES = ["rollout worker 0: node 10.0.0.1 [abcdef12] pid 11, cpu/gloo, 1 threads, GPU ids none, cai_ray from /x",
         "rollout worker 1: node 10.0.0.2 [12345678] pid 12, cpu/gloo, 1 threads, GPU ids none, cai_ray from /x"]
REPORTS = [{"node_id": "abcdef12", "threads": 1}, {"node_id": "12345678", "threads": 1}]


def test_a_quiet_run_logs_start_up_lines_to_a_file_and_prints_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    with run_logs.run_logging(tmp_path / "logs", verbose=False) as folder:
        assert not folder.exists()  # created by its first log, not before
        run_logs.report_started("rollout", LINES, REPORTS, device="cpu/gloo")
        run_logs.report_started("rollout", LINES[:1], REPORTS[:1], device="cpu/gloo")
        # Every actor started from here gets the run's log folder and quietness, and its own file name.
        env = decide("rollout", ResourcesConfig()).env
        assert env[run_logs.LOG_DIR_ENV] == str(folder) and env[run_logs.VERBOSE_ENV] == "0"
        assert env["VLLM_LOGGING_LEVEL"] == "WARNING"  # also on nodes whose raylets did not inherit the driver's env
    out = capsys.readouterr().out.splitlines()
    assert out == [f"rollout: 2 actors started on 2 nodes, cpu/gloo, 1 threads (details and logs: {folder})",
                   f"rollout: 1 actor started on 1 node, cpu/gloo, 1 threads (details and logs: {folder})"]
    assert (folder / run_logs.ACTORS_LOG).read_text().splitlines() == LINES + LINES[:1]


def test_verbose_and_outside_a_run_print_every_start_up_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_logs.report_started("rollout", LINES, REPORTS, device="cpu/gloo")  # no run: the console only
    assert capsys.readouterr().out.splitlines() == LINES
    with run_logs.run_logging(tmp_path / "logs", verbose=True) as folder:
        run_logs.report_started("rollout", LINES, REPORTS, device="cpu/gloo")
    assert capsys.readouterr().out.splitlines() == LINES
    assert (folder / run_logs.ACTORS_LOG).read_text().splitlines() == LINES  # the file is written either way


def test_run_logging_quiets_the_driver_libraries_and_restores_everything(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    logging.getLogger("vllm").setLevel(logging.INFO)
    before = {name: logging.getLogger(name).level for name in run_logs.LIBRARY_LOGGERS}
    with run_logs.run_logging(tmp_path / "logs", verbose=False):
        assert logging.getLogger("vllm").level == logging.WARNING
        assert logging.getLogger("deepspeed").getEffectiveLevel() >= logging.WARNING
        assert os.environ["WANDB_SILENT"] == "true" and Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).is_file()
        assert not run_logs.is_verbose() and "(its output: " in run_logs.logs_hint()
    assert {name: logging.getLogger(name).level for name in run_logs.LIBRARY_LOGGERS} == before
    assert run_logs.LOG_DIR_ENV not in os.environ and "WANDB_SILENT" not in os.environ
    assert run_logs.log_dir() is None and run_logs.is_verbose() and run_logs.logs_hint() == ""
    with run_logs.run_logging(tmp_path / "logs", verbose=True):  # verbose: the libraries keep their levels
        assert logging.getLogger("vllm").level == logging.INFO and "WANDB_SILENT" not in os.environ
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    with run_logs.run_logging(tmp_path / "logs", verbose=False):  # a level the user set stays
        assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_output_is_not_redirected_outside_an_actor(tmp_path: Path) -> None:
    with run_logs.run_logging(tmp_path / "logs", verbose=False):
        assert run_logs.capture_actor_output("rollout") is None  # this test process keeps its stdout
    assert not (tmp_path / "logs").exists()


def test_verbose_flag_sets_the_config_field(monkeypatch: pytest.MonkeyPatch) -> None:
    import cai_ray.pipelines.run
    from cai_ray.cli import main

    seen = []
    monkeypatch.setattr(cai_ray.pipelines.run, "run_experiment", lambda cfg, **_: seen.append(cfg.logging.verbose))
    quickstart = str(Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml")
    assert main(["rl", "--config", quickstart, "--verbose"]) == 0 and main(["rl", "--config", quickstart]) == 0
    assert seen == [True, False]
