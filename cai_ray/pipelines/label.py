"""``cai-ray label``: offline AI preference labels for a file of (prompt, response_a, response_b) pairs.

The same batch job as SL-CAI (:mod:`cai_ray.pipelines.batch`): pairs in Parquet shards on a pool of
``feedback.num_workers`` feedback engines, labelled in ``feedback.label_mode`` (multiple choice, chain of
thought or direct scores) against principles sampled from the constitution, per axis under
``feedback.label_axes``. Rows that cannot be read and pairs the judge cannot label are skipped, reported with
their file and line, and counted in ``labels.json``; a re-run skips the shards already written.
"""

from __future__ import annotations

import json
from pathlib import Path

from cai_ray.config import ExperimentConfig
from cai_ray.data import scan_rows
from cai_ray.pipelines.batch import BatchResult, LabelTask, input_rows, run_batch

PAIR_FIELDS = ("prompt", "response_a", "response_b")
SUMMARY_FILE = "labels.json"


def label_pairs_file(cfg: ExperimentConfig, pairs: str, out_dir: str | Path) -> BatchResult:
    """Label every usable pair of ``pairs`` (``.jsonl`` / ``.parquet`` / ``hf:``; an ``id`` column is optional)
    into Parquet shards in ``out_dir``, plus ``out_dir/labels.json``. Needs a running Ray."""
    rows, bad = scan_rows(pairs, fields=PAIR_FIELDS, id_field="id",
                          fix=f"a pair needs the columns {', '.join(PAIR_FIELDS)} (and optionally id)")
    task = LabelTask(cfg.models.resolved_feedback(), cfg.feedback, cfg.constitution, cfg.data, cfg.seed)
    out = Path(out_dir)
    result = run_batch(task, input_rows(rows), out, num_workers=cfg.feedback.num_workers,
                       num_rows_per_shard=cfg.batch.num_rows_per_shard, bad_rows=bad, progress=cfg.logging.progress,
                       desc="labels")
    summary = result.summary() | {"pairs": pairs, "label_mode": cfg.feedback.label_mode,
                                  "label_axes": cfg.feedback.label_axes,
                                  "feedback_model": cfg.models.resolved_feedback().name,
                                  "constitution": cfg.constitution.path}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return result
