"""Quiet by default, for real: a `cai-ray rl` run's console against its RUN/logs (vLLM, DeepSpeed, Ray, wandb)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[2]
QUICKSTART = REPO / "configs" / "quickstart-cpu.yaml"
# "<role> worker 0: node 192.0.2.2 [9d5c224d] pid 123, cpu/gloo, 2 threads, GPU ids none, cai_ray from /path"
STARTED = re.compile(r"^(?P<name>[\w ]+ \d+): node \S+ \[\w+\] pid \d+, cpu/gloo, \d+ threads, GPU ids none, "
                     r"cai_ray from \S+$", re.M)
VLLM_INFO = re.compile(r"\bINFO \d\d-\d\d ")  # vLLM's log format: "INFO 12-02 18:37:20 [model.py:733] ..."
VLLM_WARNING = re.compile(r"\bWARNING \d\d-\d\d .* \[\w+\.py:\d+\]")


@pytest.mark.timeout(600)
def test_a_run_prints_its_result_and_sends_engine_logs_to_the_run_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "cai_ray", "rl", "--config", str(QUICKSTART),
                           "--set", "schedule.num_iterations=1", "--set", "schedule.num_prompts_per_iteration=2",
                           "--set", "feedback.judge_check=false", "--set", "logging.wandb_mode=offline",
                           "--set", f"logging.output_dir={tmp_path}/{{name}}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=560)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-6000:]
    run, logs = tmp_path / "quickstart-cpu", tmp_path / "quickstart-cpu" / "logs"

    # The console: one line per role, the result, the run folder; none of the engines' or frameworks' lines.
    assert "RL-CAI: 1 iterations" in console and f"run folder: {run}" in console
    shown = re.escape(str(logs.relative_to(tmp_path)))  # relative to the working directory, where it is below it
    for role in ("rollout", "feedback", "learner"):
        assert re.search(rf"^{role}: 1 actor started on 1 node, cpu/gloo, \d+ threads \(details and logs: {shown}\)$",
                         console, re.M), console
    assert not VLLM_INFO.search(console) and "pid=" not in console and "wandb:" not in console, console
    assert not STARTED.search(console)
    assert len(console.splitlines()) < 15, console

    # The run folder: where each actor ran, and each actor's own output.
    started = {m["name"] for m in STARTED.finditer((logs / "actors.log").read_text())}
    assert started == {"rollout worker 0", "feedback worker 0", "learner rank 0"}
    for name in ("rollout-worker-0", "feedback-worker-0"):
        engine_log = (logs / f"{name}.log").read_text()
        assert VLLM_WARNING.search(engine_log) and not VLLM_INFO.search(engine_log), engine_log  # vLLM at WARNING
    assert "DeepSpeed" in (logs / "learner-rank-0.log").read_text()
    assert list((run / "wandb").glob("offline-run-*"))  # wandb still logged, silently


def test_ray_data_says_nothing_of_the_progress_bars_cai_ray_turns_off(tmp_path: Path) -> None:
    """A quiet run's Ray Data logging config (run_logs.QUIET_ENV) keeps the "Progress bars disabled" advice off the
    console: batch jobs turn Ray Data's own bars off while cai-ray's rows/s bar runs."""
    from cai_ray.run_logs import QUIET_ENV

    code = ("import ray, ray.data\n"
            "ray.init(num_cpus=1, include_dashboard=False)\n"
            "ray.data.DataContext.get_current().enable_progress_bars = False\n"
            "assert ray.data.range(4).take_all()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def console(extra: dict[str, str]) -> str:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, **extra},
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    assert "Progress bars disabled" in console({})  # what Ray Data says by default ...
    quiet = console({"RAY_DATA_LOGGING_CONFIG": QUIET_ENV["RAY_DATA_LOGGING_CONFIG"]})
    assert "Progress bars disabled" not in quiet, quiet  # ... and not in a quiet run
