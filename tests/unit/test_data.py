"""Prompt datasets: shipped splits and bad rows reported with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.data import DatasetError, load_prompts, shipped_datasets


def test_shipped_splits_sizes_and_disjointness() -> None:
    assert {"redteam_train", "redteam_eval", "helpful_train", "helpful_eval"} <= set(shipped_datasets())
    sets = {name: load_prompts(name) for name in shipped_datasets()}
    assert len(sets["redteam_train"]) + len(sets["redteam_eval"]) >= 100
    assert len(sets["helpful_train"]) + len(sets["helpful_eval"]) >= 100
    texts = [r.prompt for rows in sets.values() for r in rows]
    assert len(texts) == len(set(texts)), "prompts repeat across splits"
    assert len({r.meta["category"] for r in sets["redteam_train"]}) >= 10
    for split in ("helpful_train", "helpful_eval"):
        flags = [r.meta["sensitive_sounding"] for r in sets[split]]
        assert sum(flags) / len(flags) >= 0.2


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": ""}\n')
    with pytest.raises(DatasetError, match=rf"{path}:2: 'prompt' must be a non-empty string"):
        load_prompts(str(path))
    path.write_text('{"id": "a", "prompt": "fine"}\n\n{"id": "b", "text": "x"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:3: no 'prompt' field \(fields: id, text\)"):
        load_prompts(str(path))
    path.write_text('{"id": "a", "prompt": "fine"}\n{oops\n')
    with pytest.raises(DatasetError, match=rf"{path}:2: not valid JSON"):
        load_prompts(str(path))
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(DatasetError, match="duplicate row id 'a'"):
        load_prompts(str(path))


def test_custom_fields_parquet_and_max_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": f"question {i}", "n": i} for i in range(5)]), path)
    rows = load_prompts(str(path), prompt_field="q", id_field=None, max_rows=3)
    assert [r.prompt for r in rows] == ["question 0", "question 1", "question 2"]
    assert [r.id for r in rows] == ["0", "1", "2"] and rows[1].meta == {"n": 1}
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n" for i in range(4)))
    assert [r.id for r in load_prompts(str(jsonl), max_rows=2)] == ["0", "1"]


def test_unknown_dataset_and_format(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a shipped name"):
        load_prompts("nope")
    bad = tmp_path / "p.csv"
    bad.write_text("prompt\nx\n")
    with pytest.raises(DatasetError, match="unsupported format '.csv'"):
        load_prompts(str(bad))
