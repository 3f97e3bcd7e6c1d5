"""Red-teaming inside the RL loop on the real CPU stack (vLLM red-teamer, rollout and feedback engines, DeepSpeed
learner): 3 iterations grow the archive and write the attack files and metrics; a --resume continues from the
archive exactly as the checkpoint saved it (on the same started roles: one start-up)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from cai_ray.config import ExperimentConfig, load_config
from cai_ray.metrics import read_metrics

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml"
THRESHOLD = 0.3


def red_team_config(tmp_path: Path, iterations: int) -> ExperimentConfig:
    return load_config(QUICKSTART, [
        f"logging.output_dir={tmp_path}/{{name}}", "logging.wandb_mode=disabled", "cluster.num_cpus=8",
        f"schedule.num_iterations={iterations}", "schedule.red_team_fraction=0.5",
        "red_team.enabled=true", "red_team.num_candidates_per_iteration=4", "red_team.max_new_tokens=12",
        "red_team.num_few_shot=2", "red_team.cell_capacity=1",
        # The tiny random model never ends a line within 12 tokens: keep its cut lines as candidates.
        "red_team.keep_unfinished=true", f"red_team.success_threshold={THRESHOLD}",
    ])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_iteration(run_dir: Path, row: dict, it: int) -> None:
    """The metrics of one red-team round agree with its candidate file (what was proposed, judged, found)."""
    candidates = _jsonl(run_dir / "red_team" / "candidates" / f"iter_{it:04d}.jsonl")
    judged = [c for c in candidates if c["prob_harmful"] is not None]
    assert row["red_team/candidates"] == len(candidates) == 4
    assert row["red_team/judged"] == len(judged)
    assert row["red_team/judged"] + sum(row[f"red_team/filtered/{r}"] for r in
                                        ("error", "empty", "overlong", "refusal", "copy", "repeat")) == 4
    assert all(0.0 < c["prob_harmful"] < 1.0 and c["answer"] is not None for c in judged)
    successes = [c for c in judged if c["prob_harmful"] > THRESHOLD]
    assert row["red_team/successes"] == len(successes)
    if judged:
        assert row["red_team/success_rate"] == pytest.approx(len(successes) / len(judged))
    outcomes = sum(row[f"red_team/archive/{o}"] for o in ("added", "replaced", "duplicate", "below_cell"))
    assert outcomes == len(successes)
    if it > 0:  # half of the 2 red-team prompts come from the archive: 1 prompt x 2 samples judged
        assert row["red_team/archived_judged"] == 2.0
        assert 0.0 <= row["red_team/archived_success_rate"] <= 1.0
    assert row["timing/red_team"] > 0.0 and row["red_team/seconds_judge"] > 0.0


def test_red_team_loop_grows_the_archive_and_resume_restores_it(ray_local: None, tmp_path: Path) -> None:
    from cai_ray.pipelines.roles import start_roles

    cfg = red_team_config(tmp_path, 3)
    # The archive lives in the loop state, not in the actors: the resumed run may continue on the same roles.
    roles = start_roles(cfg)
    try:
        _run_then_resume(cfg, tmp_path, roles)
    finally:
        roles.shutdown()


def _run_then_resume(cfg: ExperimentConfig, tmp_path: Path, roles: Any) -> None:
    from cai_ray.pipelines.checkpoint import load_for_resume
    from cai_ray.pipelines.rl_cai import rl_cai
    from cai_ray.pipelines.run import run_dir_for

    run_dir = run_dir_for(cfg)
    history = rl_cai(cfg, run_dir, roles=roles)
    assert [int(m["iteration"]) for m in history] == [0, 1, 2]
    sizes = [m["red_team/archive_size"] for m in history]
    assert sizes[-1] > 0 and sizes == sorted(sizes)  # it grows (replacements keep the size)
    added = [m["red_team/archive/added"] for m in history]
    assert sizes == [sum(added[:i + 1]) for i in range(3)]
    for it, row in enumerate(history):
        _check_iteration(run_dir, row, it)
    archive = _jsonl(run_dir / "red_team" / "archive.jsonl")
    assert len(archive) == sizes[-1]
    assert history[-1]["red_team/coverage"] == pytest.approx(len({(a["category"], a["style"]) for a in archive}) / 70)
    attacks = _jsonl(run_dir / "red_team" / "attacks.jsonl")
    assert len(attacks) == sum(m["red_team/successes"] for m in history)
    assert {a["id"] for a in archive} <= {a["id"] for a in attacks if a["archive"] in ("added", "replaced")}
    for a in attacks:
        assert set(a) == {"id", "prompt", "category", "style", "score", "iteration", "policy_version", "archive"}
        assert a["policy_version"] == a["iteration"]  # sync schedule: iteration i answers with version i
    # Archived attacks were trained on: their prompts were labelled in iterations 1 and 2.
    assert any("/archive/" in lab["pair_id"] for lab in _jsonl(run_dir / "labels" / "iter_0002.jsonl"))
    assert (run_dir / "red_team" / "red_team.png").read_bytes()[:4] == b"\x89PNG"

    # --resume for one more iteration: the checkpoint holds the archive exactly as the run left it ...
    longer = red_team_config(tmp_path, 4)
    restored = load_for_resume(run_dir, longer.model_dump(mode="json")).archive.to_json()
    assert restored == archive
    more = rl_cai(longer, run_dir, resume=True, roles=roles)
    assert [int(m["iteration"]) for m in more] == [3]
    _check_iteration(run_dir, more[0], 3)
    # ... and iteration 3 starts from it: every restored attack is still there unless iteration 3 replaced it.
    final = _jsonl(run_dir / "red_team" / "archive.jsonl")
    kept = [a for a in final if a["iteration"] < 3]
    assert kept == [a for a in restored if a in kept]
    assert len(restored) - len(kept) == more[0]["red_team/archive/replaced"]
    assert more[0]["red_team/archive_size"] == len(final) == len(restored) + more[0]["red_team/archive/added"]
    assert _jsonl(run_dir / "red_team" / "attacks.jsonl")[:len(attacks)] == attacks
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    assert math.isfinite(more[0]["red_team/diversity"]) or len(final) < 2
