"""Durability of the RL loop: the loop state, atomic checkpoint swaps and the checks a resume makes.

A checkpoint is written whole into ``checkpoint.tmp`` (its ``COMPLETE`` marker last), then swapped in:
the old checkpoint is moved aside to ``checkpoint.old``, the new one renamed in, the old one removed. A
crash at any point leaves one complete checkpoint on disk, and :func:`recover` (run before every save and
every resume) finishes or undoes the interrupted swap. A resume refuses a run folder without a
checkpoint, and a config whose training-relevant fields differ from the checkpoint's ``config.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cai_ray.config import RETIRED_KEYS
from cai_ray.redteam_archive import AttackArchive
from cai_ray.types import TrainPair

STATE_FILE = "loop_state.json"
CONFIG_FILE = "config.json"
COMPLETE = "COMPLETE"  # written last into the temp folder: only a folder holding it may be swapped in

# Keys a resumed run may change: they say how long, where and how robustly it runs, not what it learns.
# Any key ending in "timeout_s" may change too. Everything else must match the checkpoint's config.
RESUMABLE_KEYS = (
    "name", "logging", "cluster", "eval", "serve", "schedule.num_iterations", "schedule.checkpoint_every",
    "schedule.on_empty_iteration", "rollout.max_restarts", "feedback.max_restarts", "feedback.max_retries",
    "sync.transport", "sync.bucket_size_mb", "red_team.max_restarts",
)


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this run folder; the message says why and what to do."""


class LoopState:
    """What a resumed run needs besides the learner: counters, the weight version, the replay window and the
    red-team attack archive."""

    def __init__(self, iteration: int = 0, version: int = 0, replay: list[list[TrainPair]] | None = None,
                 archive: AttackArchive | None = None) -> None:
        self.iteration, self.version = iteration, version
        self.replay: list[list[TrainPair]] = replay or []
        self.archive = archive or AttackArchive()

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (token ids as lists)."""
        return {"iteration": self.iteration, "version": self.version,
                "replay": [[asdict(p) for p in window] for window in self.replay],
                "red_team_archive": self.archive.to_json()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LoopState:
        """Inverse of :meth:`to_json`."""
        replay = [[TrainPair(tuple(p["prompt_token_ids"]), tuple(p["response_a_token_ids"]),
                             tuple(p["response_b_token_ids"]), p["prob_a"],
                             tuple(p["axis_probs"]) if p.get("axis_probs") is not None else None) for p in window]
                  for window in raw["replay"]]
        # A checkpoint written before red-teaming existed has no archive: it resumes with an empty one.
        return cls(raw["iteration"], raw["version"], replay, AttackArchive.from_json(raw.get("red_team_archive", [])))


# ------------------------------------------------------------------------------------ the swap
def checkpoint_dir(run_dir: Path) -> Path:
    """The run's checkpoint folder (learner states under ``learner/``)."""
    return run_dir / "checkpoint"


def _tmp(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def _aside(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def recover(final: Path) -> None:
    """Finish or undo a swap that a crash interrupted, and remove leftovers.

    ``final`` missing means the crash came after the old checkpoint was moved aside: the complete new one
    in ``.tmp`` goes in, else the old one comes back. A ``.tmp`` beside a present ``final`` is a write that
    never finished (or never got swapped in) and ``.old`` one that was not yet removed: both are deleted.
    """
    tmp, aside = _tmp(final), _aside(final)
    if not final.exists():
        if (tmp / COMPLETE).is_file():
            tmp.rename(final)
        elif aside.is_dir():
            aside.rename(final)
    for leftover in (tmp, aside):
        if leftover.exists():
            shutil.rmtree(leftover)


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """``write(folder)`` into a temp folder, then swap it in for ``final`` (old aside -> new in -> old removed)."""
    recover(final)
    tmp, aside = _tmp(final), _aside(final)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / COMPLETE).touch()
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


def write_loop_files(folder: Path, state: LoopState, config_dump: dict[str, Any]) -> None:
    """The loop state and the config of the run, beside the learner states."""
    (folder / STATE_FILE).write_text(json.dumps(state.to_json()))
    (folder / CONFIG_FILE).write_text(json.dumps(config_dump, indent=1))


# ---------------------------------------------------------------------------------- the resume
def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (after finishing a swap a crash interrupted)."""
    recover(checkpoint_dir(run_dir))
    return (checkpoint_dir(run_dir) / STATE_FILE).is_file()


def load_for_resume(run_dir: Path, config_dump: dict[str, Any]) -> LoopState:
    """The loop state of ``run_dir``'s checkpoint, after checking that this config may continue it."""
    final = checkpoint_dir(run_dir)
    if not has_checkpoint(run_dir):
        raise ResumeError(f"--resume: no checkpoint under {final} (the run never reached its first checkpoint); "
                          "run without --resume to start from iteration 0")
    saved = json.loads((final / CONFIG_FILE).read_text())
    changed = config_differences(saved, json.loads(json.dumps(config_dump)))
    if changed:
        raise ResumeError(f"--resume: the config differs from the checkpoint's ({final / CONFIG_FILE}) in "
                          f"training-relevant fields:\n  " + "\n  ".join(changed) + "\nRestore them to resume, or "
                          "start a new run folder (logging.output_dir) without --resume. Fields that may change on "
                          f"resume: {', '.join(RESUMABLE_KEYS)}, and any *timeout_s")
    return LoopState.from_json(json.loads((final / STATE_FILE).read_text()))


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: <checkpoint value> (checkpoint) != <value> (now)"`` for each training-relevant field that differs."""
    old, new = dotted_leaves(saved), dotted_leaves(current)
    out = []
    for key in sorted(old.keys() | new.keys()):
        if _resumable(key) or old.get(key, _ABSENT) == new.get(key, _ABSENT):
            continue
        out.append(f"{key}: {_show(old.get(key, _ABSENT))} (checkpoint) != {_show(new.get(key, _ABSENT))} (now)")
    return out


_ABSENT = object()


def _show(value: Any) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value)


def _resumable(key: str) -> bool:
    return (key in RETIRED_KEYS or key.rsplit(".", 1)[-1].endswith("timeout_s")
            or any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS))


def dotted_leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (a None section is a leaf, so it differs from a set one)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= dotted_leaves(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out
