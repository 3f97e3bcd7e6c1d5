"""Prompt datasets: shipped JSONL splits, user JSONL/Parquet files, or HF datasets.

Every row becomes a :class:`PromptRecord`. A bad row (not JSON, no prompt, empty prompt) is an error
that names the file and the line, so nothing is silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import DatasetConfig
from cai_ray.types import Prompt

SHIPPED_DIR = Path(__file__).parent / "data"


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. ``meta`` keeps the row's other columns (category, sensitive_sounding, ...)."""

    id: str
    prompt: str
    meta: dict[str, Any]


def shipped_datasets() -> list[str]:
    """Names of the prompt sets shipped with the package."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.jsonl"))


def _record(row: Any, where: str, index: int, prompt_field: str, id_field: str | None) -> PromptRecord:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with a '{prompt_field}' field, got {type(row).__name__}")
    prompt = row.get(prompt_field)
    if prompt is None:
        raise DatasetError(
            f"{where}: no '{prompt_field}' field (fields: {', '.join(map(str, row))}); "
            "set prompt_field in the dataset config"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{where}: '{prompt_field}' must be a non-empty string, got {prompt!r}")
    rid = row.get(id_field) if id_field else None
    meta = {k: v for k, v in row.items() if k not in (prompt_field, id_field)}
    return PromptRecord(id=str(rid) if rid is not None else str(index), prompt=prompt, meta=meta)


def _read_jsonl(path: Path, prompt_field: str, id_field: str | None, max_rows: int | None) -> list[PromptRecord]:
    records: list[PromptRecord] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            records.append(_record(row, where, len(records), prompt_field, id_field))
            if max_rows is not None and len(records) >= max_rows:
                break
    return records


def _read_rows(rows: list[dict[str, Any]], source: str, prompt_field: str, id_field: str | None,
               max_rows: int | None) -> list[PromptRecord]:
    rows = rows[:max_rows] if max_rows is not None else rows
    return [_record(row, f"{source} row {i}", i, prompt_field, id_field) for i, row in enumerate(rows)]


def load_prompts(path: str, *, prompt_field: str = "prompt", id_field: str | None = "id",
                 max_rows: int | None = None) -> list[PromptRecord]:
    """Read prompts from a shipped name, a ``.jsonl`` / ``.parquet`` file, or ``hf:<id>[:split]``."""
    if path.startswith("hf:"):
        _, _, rest = path.partition(":")
        name, _, split = rest.partition(":")
        try:
            import datasets  # optional: only for hub datasets
        except ImportError:
            raise DatasetError(f"{path}: reading HF datasets needs `pip install datasets`") from None
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as err:  # noqa: BLE001 - hub/network failures all mean "cannot read"
            raise DatasetError(f"{path}: could not load the HF dataset ({type(err).__name__}: {err})") from None
        return _read_rows(list(ds), path, prompt_field, id_field, max_rows)
    file = Path(path)
    if not file.exists() and (SHIPPED_DIR / f"{path}.jsonl").is_file():
        file = SHIPPED_DIR / f"{path}.jsonl"
    if not file.is_file():
        raise DatasetError(
            f"dataset '{path}': no such file, and not a shipped name ({', '.join(shipped_datasets())}) "
            "or hf:<id>[:split]"
        )
    if file.suffix == ".jsonl":
        records = _read_jsonl(file, prompt_field, id_field, max_rows)
    elif file.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = _read_rows(pq.read_table(file).to_pylist(), str(file), prompt_field, id_field, max_rows)
    else:
        raise DatasetError(f"{file}: unsupported format '{file.suffix}'; use .jsonl or .parquet")
    if not records:
        raise DatasetError(f"{file}: no rows")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"{file}: duplicate row id '{dup}'; ids must be unique")
    return records


def read_dataset(ds: DatasetConfig) -> list[PromptRecord]:
    """The rows of one dataset section of the config (``data.red_team``, ``red_team.seeds``, ...)."""
    return load_prompts(ds.path, prompt_field=ds.prompt_field, id_field=ds.id_field, max_rows=ds.max_rows)


def read_prompts(ds: DatasetConfig) -> list[Prompt]:
    """The prompts (id and text) of one dataset section of the config."""
    return [Prompt(r.id, r.prompt) for r in read_dataset(ds)]


def write_jsonl(rows: list[dict[str, Any]] | list[Any], path: str | Path) -> Path:
    """Write dicts or dataclasses as JSONL (for inspection of SFT / preference data)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row if isinstance(row, dict) else asdict(row), ensure_ascii=False) + "\n")
    return out
