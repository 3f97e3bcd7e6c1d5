"""Prompt datasets: shipped JSONL splits, user JSONL/Parquet files, or HF datasets.

Every row becomes a :class:`PromptRecord`. A bad row (not JSON, no prompt, empty prompt) is an error
that names the file and the line, so nothing is silently dropped. Batch jobs over large files use
:func:`scan_rows` instead: it keeps going past bad rows and returns each with its file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import DatasetConfig
from cai_ray.types import Prompt

SHIPPED_DIR = Path(__file__).parent / "data"
PROMPT_FIELD_FIX = "set prompt_field in the dataset config"


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. ``meta`` keeps the row's other columns (category, sensitive_sounding, ...)."""

    id: str
    prompt: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class SourceRow:
    """One usable row of :func:`scan_rows`: its id, where it came from, its text fields and its other columns."""

    id: str
    where: str  # "file:line" (JSONL) or "source row i" (Parquet, HF)
    texts: dict[str, str]  # the requested text fields, each a non-empty string
    meta: dict[str, Any]


@dataclass(frozen=True)
class BadRow:
    """A row :func:`scan_rows` skipped, with where it is and why."""

    where: str
    reason: str


def shipped_datasets() -> list[str]:
    """Names of the prompt sets shipped with the package."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.jsonl"))


def _check(row: Any, fields: Sequence[str], fix: str) -> str | None:
    """Why ``row`` cannot be used (None: it can). ``fix`` says what to do about a missing field."""
    if not isinstance(row, dict):
        return f"expected an object with a '{fields[0]}' field, got {type(row).__name__}"
    for name in fields:
        value = row.get(name)
        if value is None:
            return f"no '{name}' field (fields: {', '.join(map(str, row))}); {fix}"
        if not isinstance(value, str) or not value.strip():
            return f"'{name}' must be a non-empty string, got {value!r}"
    return None


def _source_row(row: dict[str, Any], where: str, index: int, fields: Sequence[str], id_field: str | None) -> SourceRow:
    rid = row.get(id_field) if id_field else None
    meta = {k: v for k, v in row.items() if k not in (*fields, id_field)}
    return SourceRow(id=str(rid) if rid is not None else str(index), where=where,
                     texts={name: row[name] for name in fields}, meta=meta)


def _open(path: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    """The source name and its rows as (where, row or DatasetError) of a shipped name, a file or ``hf:<id>``."""
    if path.startswith("hf:"):
        return path, ((f"{path} row {i}", row) for i, row in enumerate(_hf_rows(path)))
    file = Path(path)
    if not file.exists() and (SHIPPED_DIR / f"{path}.jsonl").is_file():
        file = SHIPPED_DIR / f"{path}.jsonl"
    if not file.is_file():
        raise DatasetError(
            f"dataset '{path}': no such file, and not a shipped name ({', '.join(shipped_datasets())}) "
            "or hf:<id>[:split]"
        )
    if file.suffix == ".jsonl":
        return str(file), _jsonl_rows(file)
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return str(file), ((f"{file} row {i}", row) for i, row in enumerate(pq.read_table(file).to_pylist()))
    raise DatasetError(f"{file}: unsupported format '{file.suffix}'; use .jsonl or .parquet")


def _hf_rows(path: str) -> list[dict[str, Any]]:
    _, _, rest = path.partition(":")
    name, _, split = rest.partition(":")
    try:
        import datasets  # optional: only for hub datasets
    except ImportError:
        raise DatasetError(f"{path}: reading HF datasets needs `pip install datasets`") from None
    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as err:  # noqa: BLE001 - hub/network failures all mean "cannot read"
        raise DatasetError(f"{path}: could not load the HF dataset ({type(err).__name__}: {err})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, DatasetError(f"not valid JSON ({err.msg} at column {err.colno})")


def _rows(path: str, fields: Sequence[str], id_field: str | None, fix: str,
          max_rows: int | None) -> Iterator[tuple[str, SourceRow | BadRow]]:
    """(source, usable row or bad row) for each row of ``path``, at most ``max_rows`` usable ones.

    A row without an id is numbered by its position among the source's rows, so fixing a bad row earlier in
    a file does not renumber the others.
    """
    source, raw = _open(path)
    seen: dict[str, str] = {}
    used = 0
    for index, (where, row) in enumerate(raw):
        problem = str(row) if isinstance(row, DatasetError) else _check(row, fields, fix)
        if problem is not None:
            yield source, BadRow(where, problem)
            continue
        record = _source_row(row, where, index, fields, id_field)
        if record.id in seen:
            yield source, BadRow(where, f"duplicate row id '{record.id}' (first at {seen[record.id]}); ids must be "
                                        "unique")
            continue
        seen[record.id] = where
        yield source, record
        used += 1
        if max_rows is not None and used >= max_rows:
            return


def scan_rows(path: str, *, fields: Sequence[str], id_field: str | None = "id", max_rows: int | None = None,
              fix: str = PROMPT_FIELD_FIX) -> tuple[list[SourceRow], list[BadRow]]:
    """The usable rows of ``path`` (a shipped name, ``.jsonl`` / ``.parquet`` file or ``hf:<id>[:split]``) whose
    ``fields`` are non-empty strings, and every skipped row (not JSON, a field missing or empty, a repeated id)
    with its file and line; ``fix`` is the hint for a missing field. Only an unreadable source raises."""
    good: list[SourceRow] = []
    bad: list[BadRow] = []
    for _, row in _rows(path, fields, id_field, fix, max_rows):
        (good if isinstance(row, SourceRow) else bad).append(row)  # type: ignore[arg-type]
    return good, bad


def load_prompts(path: str, *, prompt_field: str = "prompt", id_field: str | None = "id",
                 max_rows: int | None = None) -> list[PromptRecord]:
    """Read prompts from a shipped name, a ``.jsonl`` / ``.parquet`` file, or ``hf:<id>[:split]``.

    Raises:
        DatasetError: at the first bad row (naming its file and line), or for a source without rows.
    """
    records: list[PromptRecord] = []
    source = path
    for source, row in _rows(path, [prompt_field], id_field, PROMPT_FIELD_FIX, max_rows):
        if isinstance(row, BadRow):
            raise DatasetError(f"{row.where}: {row.reason}")
        records.append(PromptRecord(id=row.id, prompt=row.texts[prompt_field], meta=row.meta))
    if not records:
        raise DatasetError(f"{source}: no rows")
    return records


def read_dataset(ds: DatasetConfig) -> list[PromptRecord]:
    """The rows of one dataset section of the config (``data.red_team``, ``red_team.seeds``, ...)."""
    return load_prompts(ds.path, prompt_field=ds.prompt_field, id_field=ds.id_field, max_rows=ds.max_rows)


def scan_dataset(ds: DatasetConfig) -> tuple[list[SourceRow], list[BadRow]]:
    """:func:`scan_rows` of one dataset section: its prompts (text field ``"prompt"``) and its bad rows."""
    rows, bad = scan_rows(ds.path, fields=[ds.prompt_field], id_field=ds.id_field, max_rows=ds.max_rows)
    return [SourceRow(r.id, r.where, {"prompt": r.texts[ds.prompt_field]}, r.meta) for r in rows], bad


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
