"""Reading datasets from JSONL, JSON, Parquet, saved HF datasets or built-in tasks, and validating their columns.

Every record keeps where it came from (file and line or row), so a bad record is reported as
`data.jsonl:17: field 'chosen': expected a string or a list of messages, got int` — never a traceback.
That covers unreadable files too: bytes that are not UTF-8, a lone surrogate escape (`"\\ud800"`, which JSON
accepts but no tokenizer can encode), nesting too deep to parse, a broken Parquet file or dataset folder.
Column names follow TRL so datasets move both ways (the README's contract).

Duplicated records are kept: repeating a row is a legitimate way to up-weight it, and GRPO treats equal prompts
as separate groups (prompts, groups and seeds: TRL #4531). They are counted and logged as a warning, so an accidental concatenation
of a file with itself does not go unnoticed; deduplicate upstream if that is not what you want.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROLES = ("system", "user", "assistant", "tool")
log = logging.getLogger("posttrain")


class DataError(ValueError):
    """A dataset problem, with the file, line/row and field it concerns."""


@dataclass
class Record:
    data: dict
    where: str  # "file:line" or "file[row]" or "task:NAME[i]"


class _DuplicateKey(Exception):
    def __init__(self, key: str, offset: int | None = None):
        super().__init__(key)
        self.key, self.offset = key, offset


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """object_pairs_hook: json.loads keeps the last of two equal keys, so `{"answer": "4", "answer": "5"}` would
    train on "5" and never say so; an object whose keys repeat is refused instead."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _parse_json(text: str, where: str, line_of: Callable[[int], str]):
    """json.loads, with RecursionError (nesting too deep) and a repeated key as DataErrors (`line_of(offset)`: the
    `file:line` of a character of `text`); syntax errors are left to the caller, which knows the line."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
    except _DuplicateKey as dup:
        # the fast parser knows no positions (and meets an inner object's repeat first, as inner objects close
        # first): a second, slower pass finds the first repeat in reading order, and where it is
        key, offset = _first_duplicate(text) or (dup.key, 0)
        raise DataError(f"{line_of(offset)}: duplicated key {key!r} in one JSON object "
                        "(JSON readers keep only its last value)") from None


def _first_duplicate(text: str) -> tuple[str, int] | None:
    """(key, offset) of the first repeated key of `text` in reading order: a pure-Python parse whose object parser
    tracks key positions. Run only once a repeated key is known to be there (slow, and only its position matters)."""
    from json.decoder import WHITESPACE, scanstring
    from json.scanner import py_make_scanner

    def skip(s, i):
        return WHITESPACE.match(s, i).end()

    def parse_object(s_and_end, strict, scan_once, *_):
        s, i = s_and_end
        seen, i = set(), skip(s, i)
        while s[i] != "}":
            key, after = scanstring(s, i + 1, strict)
            if key in seen:
                raise _DuplicateKey(key, i)
            seen.add(key)
            _, i = scan_once(s, skip(s, skip(s, after) + 1))  # past the ':' to the value
            i = skip(s, i)
            i = skip(s, i + 1) if s[i] == "," else i
        return {}, i + 1

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object
    decoder.scan_once = py_make_scanner(decoder)
    try:
        decoder.scan_once(text, skip(text, 0))
    except _DuplicateKey as dup:
        return dup.key, dup.offset
    return None


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1})") from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                obj = _parse_json(line, f"{path}:{lineno}", lambda _, where=f"{path}:{lineno}": where)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, f"{path}:{lineno}"))
    return records


def _read_json(path: Path) -> list[Record]:
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})") from None
    if not text.strip():
        return []
    try:
        obj = _parse_json(text, str(path), lambda offset: f"{path}:{text.count(chr(10), 0, offset) + 1}")
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return [Record(row, f"{path}[row {i}]") for i, row in enumerate(rows)]


def _read_hf_dataset(path: Path, split: str | None) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: a folder, but not a dataset saved with `save_to_disk`") from None
    except (IndexError, ValueError, OSError) as exc:  # an empty or damaged dataset folder
        raise DataError(f"{path}: cannot read the saved dataset, empty or damaged ({type(exc).__name__}: {exc})") from None
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
    if not path.exists():
        raise DataError(f"{spec}: no such file or folder")
    reader = (lambda p: _read_hf_dataset(p, None)) if path.is_dir() else READERS.get(path.suffix.lower())
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
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON escape: tokenizers cannot encode it
        raise DataError(f"{where}: field {name!r}: invalid Unicode (lone surrogate U+{ord(value[exc.start]):04X} "
                        f"at character {exc.start})") from None


def _check_messages(value: Any, where: str, name: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r}: expected a non-empty list of {{role, content}} messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or ("content" not in msg and not msg.get("tool_calls")):
            raise DataError(f"{where}: field '{name}[{i}]': expected an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: field '{name}[{i}].role': unknown role {msg['role']!r}; expected one of {ROLES}")
        calls = msg.get("tool_calls")
        msg = {"content": None, **msg}
        if calls is not None:
            _check_tool_calls(calls, msg["role"], where, f"{name}[{i}].tool_calls")
        # a system turn may be empty, and so may an assistant turn that only calls tools (TRL's format: content "")
        empty_ok = msg["role"] == "system" or bool(calls)
        if msg["content"] is None and empty_ok:
            continue
        _check_text(msg["content"], where, f"{name}[{i}].content", allow_empty=empty_ok)


def _check_tool_calls(calls: Any, role: str, where: str, name: str) -> None:
    if role != "assistant":
        raise DataError(f"{where}: field {name!r}: only an assistant message may call tools")
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: field {name!r}: expected a non-empty list of tool calls")
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: field '{name}[{j}]': expected {{type: function, function: {{name, arguments}}}}")


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
    if not spec.startswith("task:"):
        duplicates = find_duplicates(records)
        if duplicates:
            first, orig = duplicates[0]
            log.warning("%s: %d duplicated records kept (first: %s repeats %s)", spec, len(duplicates), first, orig)
    return records


def find_duplicates(records: list[Record]) -> list[tuple[str, str]]:
    """(where, where of its first occurrence) for every record equal to an earlier one, in order."""
    seen: dict[int, list[Record]] = {}
    out = []
    for record in records:
        key = json.dumps(record.data, sort_keys=True, default=str)
        bucket = seen.setdefault(hash(key), [])
        same = next((r for r in bucket if r.data == record.data), None)
        if same is None:
            bucket.append(record)
        else:
            out.append((record.where, same.where))
    return out
