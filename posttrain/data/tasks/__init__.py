"""Built-in tasks by name: generators of seeded, verifiable datasets in the TRL columns of the README's contract.

A task is a function `make_records(kind, split, n, seed, **options) -> list[dict]` with
kind in {"sft", "preference", "unpaired", "prompts"}; `task:NAME` in a data path resolves here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from posttrain.registry import Registry

MakeRecords = Callable[..., list[dict]]
TASKS = Registry("task")
register_task = TASKS.register


def make_task_records(
    name: str, kind: str, split: str = "train", n: int = 1000, seed: int = 0, **options
) -> list[dict]:
    """Records of the built-in task `name` (see TASKS)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name](kind=kind, split=split, n=n, seed=seed, **options)


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# Imported last: the task modules register themselves with the decorator defined above.
from posttrain.data.tasks import arithmetic, arithmetic_tools  # noqa: E402,F401
