"""SL-CAI, Bai et al. 2022 §3: critique -> revision -> supervised fine-tuning, as Ray Data batch jobs.

Red-team prompts get an initial response from the feedback model (the policy itself by default: self-
critique), then ``feedback.num_revision_rounds`` rounds of (critique request, revision request) with one
principle sampled per round and few-shot transcripts in front. This runs as a Ray Data job
(:mod:`cai_ray.pipelines.batch`) on a pool of ``feedback.num_workers`` engine actors, streaming Parquet
shards into ``sl/revisions/``; the policy's own responses to helpfulness prompts (``sl.helpful_mix_ratio`` of
the rows) follow the same way on ``rollout.num_workers`` engines into ``sl/helpful/``. A re-run skips the
shards already written. Bad input rows (not JSON, no prompt, an over-long prompt) are skipped, reported with
their file and line, and counted in ``sl/sl_data.json``. The Ray Train SFT job then reads the shards as a Ray
Dataset.
Simplification: the helpfulness responses come from the policy, not a separate helpful-only model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_ray.backend import layout_threads
from cai_ray.config import DatasetConfig, ExperimentConfig
from cai_ray.data import BadRow, SourceRow, scan_dataset
from cai_ray.pipelines.batch import BatchResult, GenerateTask, ReviseTask, input_rows, run_batch
from cai_ray.seeds import stable_seed

if TYPE_CHECKING:
    import ray.data

SUMMARY_FILE = "sl_data.json"
SFT_COLUMNS = ("source", "prompt_id", "prompt", "response")  # what the SFT job reads of both kinds of shard
DRIVER_READ_BYTES = 64 << 20  # SFT shards smaller than this in all are read by the driver (see sft_dataset)


@dataclass(frozen=True)
class SLData:
    """The SFT rows of an SL-CAI run: revisions of red-team prompts and helpfulness samples, as Parquet shards."""

    revisions: BatchResult
    helpful: BatchResult | None

    @property
    def files(self) -> list[str]:
        """Every Parquet shard of SFT rows."""
        return self.revisions.files + (self.helpful.files if self.helpful else [])

    @property
    def num_rows(self) -> int:
        """SFT rows in all shards."""
        return self.revisions.num_rows + (self.helpful.num_rows if self.helpful else 0)


def sl_cai(cfg: ExperimentConfig, run_dir: Path) -> str:
    """Run SL-CAI; returns the HF folder of the fine-tuned policy. Needs a running Ray."""
    from cai_ray.training.sft_job import run_sft

    cfg = layout_threads(cfg, "sl")  # its roles run one after another: each may use the whole node
    out = run_dir / "sl"
    data = generate_sl_data(cfg, out)
    result = run_sft(sft_dataset(data.files), model=cfg.models.policy, sl=cfg.sl, learner=cfg.learner, cluster=cfg.cluster,
                     run_dir=str(out), seed=cfg.seed,
                     bucket_bytes=cfg.sync.bucket_size_mb << 20)
    return result.policy_path


def sft_dataset(files: list[str], *, driver_read_bytes: int = DRIVER_READ_BYTES) -> ray.data.Dataset:
    """The SFT rows of ``files`` (Parquet shards) as a Ray Dataset, one block per shard.

    Shards totalling under ``driver_read_bytes`` are read here with pyarrow: Ray Data 2.60's ``read_parquet``
    starts a pool of footer-reading actors on every call (6-12 s before the first row on 2 cores, for 16 rows).
    Larger data is read by ``read_parquet``'s tasks across the cluster.
    """
    import pyarrow.parquet as pq
    import ray.data

    if sum(Path(f).stat().st_size for f in files) < driver_read_bytes:
        return ray.data.from_arrow([pq.read_table(f, columns=list(SFT_COLUMNS)) for f in files])
    return ray.data.read_parquet(files, override_num_blocks=len(files)).select_columns(list(SFT_COLUMNS))


def generate_sl_data(cfg: ExperimentConfig, out: Path) -> SLData:
    """The revision and helpfulness shards in ``out`` (``revisions/``, ``helpful/``) and ``out/sl_data.json``.

    Raises:
        RuntimeError: no prompt gave a training row (the summary file says why for each).
    """
    red, bad_red = sample_rows(cfg.data.red_team, cfg.sl.num_red_team_prompts, seed=cfg.seed, stream="sl-prompts")
    revise = ReviseTask(cfg.models.resolved_feedback(), cfg.feedback, cfg.constitution, cfg.data, cfg.seed)
    revisions = run_batch(revise, input_rows(red), out / "revisions", num_workers=cfg.feedback.num_workers,
                          num_rows_per_shard=cfg.batch.num_rows_per_shard, bad_rows=bad_red,
                          progress=cfg.logging.progress, desc="SL-CAI revisions")
    ratio = cfg.sl.helpful_mix_ratio
    helpful_rows, bad_helpful = sample_rows(cfg.data.helpful, None, seed=cfg.seed, stream="sl-helpful-prompts")
    num_helpful = len(helpful_rows) if ratio >= 1 else min(len(helpful_rows),
                                                            round(revisions.num_rows * ratio / (1 - ratio)))
    helpful = None
    if num_helpful:
        generate = GenerateTask(cfg.models.policy, cfg.rollout, cfg.data, stable_seed(cfg.seed, "sl-helpful"))
        helpful = run_batch(generate, input_rows(helpful_rows[:num_helpful]), out / "helpful",
                            num_workers=cfg.rollout.num_workers, num_rows_per_shard=cfg.batch.num_rows_per_shard,
                            bad_rows=bad_helpful, progress=cfg.logging.progress, desc="SL-CAI helpful samples")
    data = SLData(revisions, helpful)
    summary: dict[str, Any] = {"revisions": revisions.summary(), "helpful": helpful.summary() if helpful else None,
                               "num_rows": data.num_rows}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if not data.num_rows:
        raise RuntimeError(f"SL-CAI produced no training rows; every prompt was skipped (see {out / SUMMARY_FILE})")
    return data


def sample_rows(ds: DatasetConfig, num: int | None, *, seed: int, stream: str) -> tuple[list[SourceRow], list[BadRow]]:
    """A seeded random sample of ``num`` usable rows of ``ds`` (all of them, shuffled, when None) and its bad rows."""
    rows, bad = scan_dataset(ds)
    rng = random.Random(stable_seed(seed, stream))
    return rng.sample(rows, len(rows) if num is None else min(num, len(rows))), bad
