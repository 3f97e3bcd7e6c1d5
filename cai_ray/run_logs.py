"""Quiet by default: engine and framework logs go to the run folder; the console keeps what the user needs.

A run (``cai-ray sl | rl | run | demo | eval``) enters :func:`run_logging` once, in the driver. Unless
``logging.verbose`` (``--verbose``) is set:

- Ray does not stream its workers' output to the driver (``log_to_driver=False`` in
  :func:`cai_ray.launcher.init_ray`);
- every role's actor logs vLLM and transformers at WARNING and sends its own stdout and stderr (those warnings,
  DeepSpeed, Ray Train, tracebacks) to ``<log dir>/<actor name>.log`` from its first line of role code on
  (:func:`capture_actor_output`, called by :func:`cai_ray.backend.enter_role`); what a worker prints before
  that (Ray's own start-up) stays in Ray's worker logs, ``<ray temp dir>/session_latest/logs``;
- where each actor runs (node, pid, device, threads, code) goes to ``<log dir>/actors.log``, and one line per
  role to the console (:func:`report_started`);
- the driver's library loggers (Ray, Ray Train / Data, vLLM, transformers, DeepSpeed, ...) show warnings and
  errors only (Ray Data's progress lines go to Ray's ``ray-data.log``), and wandb is silent.

The console keeps cai-ray's progress bars, phase timings, warnings and results. With ``verbose`` everything
is shown as Ray and the libraries print it (the start-up lines too, besides ``actors.log``). A level the user
set in the environment (``VLLM_LOGGING_LEVEL``, ...) is kept. The settings reach the actors as environment
variables, passed to every actor by :func:`cai_ray.backend.actor_env`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOG_DIR_ENV = "CAI_RAY_LOG_DIR"  # the run's log folder (absolute); unset: no run logging (in-process use, tests)
VERBOSE_ENV = "CAI_RAY_VERBOSE"  # "1": everything on the console, nothing redirected
LOG_NAME_ENV = "CAI_RAY_LOG_NAME"  # one actor's name (its log file), set per actor by the launcher
ACTORS_LOG = "actors.log"
# Driver-side loggers that speak at INFO about their internals; quiet runs keep their warnings and errors.
LIBRARY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "ray.serve", "vllm", "transformers", "deepspeed",
                   "DeepSpeed", "torch", "huggingface_hub", "datasets", "filelock", "urllib3", "wandb")
# Set while a quiet run lasts, unless already set (a user's own choice wins); read by the libraries at import or
# use. The log levels also reach every actor (backend.actor_env passes them through).
QUIET_ENV = {"WANDB_SILENT": "true", "VLLM_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "warning",
             # Ray Data configures its logger when imported: its console handler at WARNING.
             "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).parent / "assets" / "ray_data_logging.yaml")}
LEVEL_ENV = ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY")
_started_lock = threading.Lock()  # roles start in parallel threads; their blocks of lines must not interleave


def log_dir() -> Path | None:
    """This run's log folder, or None outside a run (:func:`run_logging` not entered)."""
    value = os.environ.get(LOG_DIR_ENV)
    return Path(value) if value else None


def is_verbose() -> bool:
    """Whether everything goes to the console: ``logging.verbose``, or no run logging at all (in-process use)."""
    return os.environ.get(VERBOSE_ENV) == "1" or log_dir() is None


@contextmanager
def run_logging(folder: Path, *, verbose: bool) -> Iterator[Path]:
    """Route logs for one run into ``folder`` while the block runs; everything is restored after it.

    The folder is created by its first log (a command that fails before starting anything leaves none).
    Yields it as an absolute path: actors on other nodes get the same path (a shared filesystem puts
    every log in one place; elsewhere each node keeps its actors' logs at that path, if it may write there).
    """
    folder = folder.resolve()
    quiet = {} if verbose else {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    env = {LOG_DIR_ENV: str(folder), VERBOSE_ENV: "1" if verbose else "0"} | quiet
    saved_env = {key: os.environ.get(key) for key in env}
    saved_levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    os.environ.update(env)
    if not verbose:
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield folder
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "actor"


def capture_actor_output(role: str) -> Path | None:
    """In a role's Ray actor during a quiet run: send this process's stdout and stderr to its log file.

    The file is ``<log dir>/<actor name>.log`` (``<role>-<pid>.log`` for an actor the launcher did not name),
    appended to, so a restarted actor continues its own file. Returns the file, or None when nothing was
    redirected: not in an actor, no run logging, verbose, or a node that cannot write the run's log folder
    (its output then stays in Ray's worker log on that node).
    """
    import ray

    folder = log_dir()
    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    if folder is None or is_verbose() or not in_actor:
        return None
    path = folder / f"{_slug(os.environ.get(LOG_NAME_ENV) or f'{role}-{os.getpid()}')}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    # File descriptors, not sys.stdout: what C++ code (oneDNN, gloo) and child processes write follows too.
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter on the console)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def report_started(role: str, lines: Sequence[str], reports: Sequence[dict[str, Any]], *, device: str) -> None:
    """Record where a role's actors run: every line into ``actors.log``, the console gets one line (all: verbose)."""
    folder = log_dir()
    with _started_lock:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / ACTORS_LOG).open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
        if folder is None or is_verbose():
            for line in lines:
                print(line, flush=True)
            return
        nodes = len({r["node_id"] for r in reports})
        threads = sorted({r["threads"] for r in reports})
        print(f"{role}: {len(reports)} actor{'s' if len(reports) != 1 else ''} started on {nodes} "
              f"node{'s' if nodes != 1 else ''}, {device}, {'/'.join(map(str, threads))} threads "
              f"(details and logs: {shown_path(folder)})", flush=True)


def logs_hint() -> str:
    """A sentence pointing at the actors' logs, for errors about an actor (empty outside a quiet run)."""
    folder = log_dir()
    return "" if folder is None or is_verbose() else f" (its output: {shown_path(folder)}/)"
