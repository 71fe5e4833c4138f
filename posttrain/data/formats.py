"""Reading datasets from JSONL, JSON, Parquet, saved HF datasets or built-in tasks, and validating their columns.

Every record keeps where it came from (file and line or row), so a bad record is reported as
`data.jsonl:17: field 'chosen': expected a string or a list of messages, got int` — never a traceback.
Column names follow TRL so datasets move both ways (DESIGN.md §3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A dataset problem, with the file, line/row and field it concerns."""


@dataclass
class Record:
    data: dict
    where: str  # "file:line" or "file[row]" or "task:NAME[i]"


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, f"{path}:{lineno}"))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of records (or {{'data': [...]}})")
    out = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}[{i}]: expected an object, got {type(item).__name__}")
        out.append(Record(item, f"{path}[{i}]"))
    return out


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [Record(row, f"{path}[row {i}]") for i, row in enumerate(rows)]


def _read_hf_dataset(path: Path, split: str | None) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        ds = ds[split]
    return [Record(dict(row), f"{path}[row {i}]") for i, row in enumerate(ds)]


READERS: dict[str, Callable[[Path], list[Record]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def read_records(spec: str, split: str = "train", task_kind: str = "sft", n: int = 1000, seed: int = 0) -> list[Record]:
    """Records from a file, a saved HF dataset folder or `task:NAME` (a built-in generator)."""
    if spec.startswith("task:"):
        from posttrain.data.tasks import make_task_records

        rows = make_task_records(spec[5:], kind=task_kind, split=split, n=n, seed=seed)
        return [Record(r, f"{spec}[{split} {i}]") for i, r in enumerate(rows)]
    path = Path(spec)
    if path.is_dir():
        return _read_hf_dataset(path, None)
    if not path.exists():
        raise DataError(f"{spec}: no such file or folder")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{spec}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet or a saved HF dataset")
    records = reader(path)
    if not records:
        raise DataError(f"{spec}: the dataset is empty")
    return records


# ---- validation -------------------------------------------------------------------------------------------------

def _check_text(value: Any, where: str, name: str, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {name!r}: empty string")


def _check_messages(value: Any, where: str, name: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r}: expected a non-empty list of {{role, content}} messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: field '{name}[{i}]': expected an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: field '{name}[{i}].role': unknown role {msg['role']!r}; expected one of {ROLES}")
        _check_text(msg["content"], where, f"{name}[{i}].content", allow_empty=msg["role"] == "system")


def _check_text_or_messages(value: Any, where: str, name: str) -> None:
    if isinstance(value, list):
        _check_messages(value, where, name)
    elif isinstance(value, str):
        _check_text(value, where, name)
    else:
        raise DataError(f"{where}: field {name!r}: expected a string or a list of messages, got {type(value).__name__}")


def _require(record: Record, names: tuple[str, ...], kind: str) -> None:
    import difflib

    for name in names:
        if name not in record.data:
            hint = difflib.get_close_matches(name, list(record.data), n=1, cutoff=0.6)
            extra = f" (found {hint[0]!r}: misspelt?)" if hint else f" (columns: {sorted(record.data)})"
            raise DataError(f"{record.where}: missing field {name!r} for {kind} data{extra}")


def validate_sft(record: Record) -> None:
    if "messages" in record.data:
        _check_messages(record.data["messages"], record.where, "messages")
        if not any(m["role"] == "assistant" for m in record.data["messages"]):
            raise DataError(f"{record.where}: field 'messages': no assistant message to learn from")
        return
    _require(record, ("prompt", "completion"), "SFT")
    _check_text_or_messages(record.data["prompt"], record.where, "prompt")
    _check_text_or_messages(record.data["completion"], record.where, "completion")


def validate_preference(record: Record) -> None:
    _require(record, ("prompt", "chosen", "rejected"), "preference")
    for name in ("prompt", "chosen", "rejected"):
        _check_text_or_messages(record.data[name], record.where, name)


def validate_unpaired(record: Record) -> None:
    _require(record, ("prompt", "completion", "label"), "unpaired feedback")
    _check_text_or_messages(record.data["prompt"], record.where, "prompt")
    _check_text_or_messages(record.data["completion"], record.where, "completion")
    if not isinstance(record.data["label"], bool):
        raise DataError(f"{record.where}: field 'label': expected true/false, got {record.data['label']!r}")


def validate_prompts(record: Record) -> None:
    _require(record, ("prompt",), "prompt")
    _check_text_or_messages(record.data["prompt"], record.where, "prompt")


VALIDATORS: dict[str, Callable[[Record], None]] = {
    "sft": validate_sft,
    "preference": validate_preference,
    "unpaired": validate_unpaired,
    "prompts": validate_prompts,
}


def load_dataset_records(spec: str, kind: str, split: str = "train", n: int = 1000, seed: int = 0) -> list[Record]:
    """Read and validate every record of `kind` (sft | preference | unpaired | prompts)."""
    records = read_records(spec, split=split, task_kind=kind, n=n, seed=seed)
    check = VALIDATORS[kind]
    for record in records:
        check(record)
    return records
