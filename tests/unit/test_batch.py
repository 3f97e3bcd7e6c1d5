"""Batch jobs: tolerant reading (bad rows with file and line), and what makes a written shard count on a re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.config import ConstitutionConfig, DataConfig, FeedbackConfig, ModelConfig
from cai_ray.data import scan_rows
from cai_ray.pipelines.batch import ReviseTask, _fingerprint, _is_done, _Shard, _task_key


def test_scan_rows_skips_bad_rows_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "prompt": "p", "response_a": "x", "response_b": "y"}),
        "{broken",
        json.dumps({"id": "b", "prompt": "p", "response_a": "x"}),
        "",
        json.dumps({"id": "a", "prompt": "q", "response_a": "x", "response_b": "y"}),
        json.dumps({"prompt": "r", "response_a": "", "response_b": "y"}),
        json.dumps({"prompt": "s", "response_a": "x", "response_b": "y", "extra": 1}),
    ]) + "\n")
    rows, bad = scan_rows(str(path), fields=("prompt", "response_a", "response_b"), fix="add the column")
    assert [(r.id, r.where, r.meta) for r in rows] == [("a", f"{path}:1", {}), ("5", f"{path}:7", {"extra": 1})]
    assert [b.where for b in bad] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "not valid JSON" in bad[0].reason
    assert "no 'response_b' field" in bad[1].reason and bad[1].reason.endswith("; add the column")
    assert f"duplicate row id 'a' (first at {path}:1)" in bad[2].reason
    assert "'response_a' must be a non-empty string" in bad[3].reason


def _task(**feedback: object) -> ReviseTask:
    return ReviseTask(ModelConfig(name="some/hub-id"), FeedbackConfig(**feedback), ConstitutionConfig(), DataConfig(),
                      seed=0)


def test_a_shard_is_redone_only_when_its_inputs_or_output_settings_change() -> None:
    rows = [{"id": "1", "where": "f:1", "prompt": "hello"}]
    key = _task_key(_task())
    assert _task_key(_task(num_workers=4, batch_size=2, max_restarts=0)) == key  # how work is spread: same outputs
    assert _task_key(_task(critique_max_new_tokens=7)) != key
    assert _fingerprint(key, rows) == _fingerprint(key, [{**rows[0], "where": "g:9"}])  # the file moved
    assert _fingerprint(key, rows) != _fingerprint(key, [{**rows[0], "prompt": "hello!"}])


def test_is_done_needs_a_matching_manifest_and_its_file(tmp_path: Path) -> None:
    shard = _Shard(3, [], "abc")
    assert not _is_done(tmp_path, shard)
    (tmp_path / "part-00003.json").write_text(json.dumps({"fingerprint": "abc", "file": "part-00003.parquet"}))
    assert not _is_done(tmp_path, shard)  # the manifest names a file that is not there
    (tmp_path / "part-00003.parquet").write_bytes(b"x")
    assert _is_done(tmp_path, shard)
    assert not _is_done(tmp_path, _Shard(3, [], "other"))
    (tmp_path / "part-00003.json").write_text("{cut off")
    assert not _is_done(tmp_path, shard)
    (tmp_path / "part-00003.json").write_text(json.dumps({"fingerprint": "abc", "file": None}))
    assert _is_done(tmp_path, shard)  # every input rejected: nothing to write, still done


def test_the_engine_pool_dataset_is_built_without_deprecation_warnings(ray_local: None, tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    import warnings

    from cai_ray.pipelines.batch import _shard_dataset

    rows = [{"id": "1", "where": "f:1", "prompt": "hello"}]
    shard = _Shard(0, rows, _fingerprint(_task_key(_task()), rows))
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _shard_dataset(_task(), [shard], tmp_path, num_workers=1)  # lazy: builds the plan, runs nothing
    # Ray points its API deprecations at the caller's line; its own internal ones (DataContext fields) stay its own.
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in seen
            if issubclass(w.category, DeprecationWarning) and "cai_ray" in w.filename]
    assert not ours
    console = capfd.readouterr().err  # Ray Data logs some of its deprecations to the console instead
    assert "deprecated" not in console, console
