"""The report's table of an online stage's training samples (`samples.jsonl`, written by train/samples.py): the
rows of its first and last logged steps side by side, so a reader sees what the policy wrote before and after
training on the prompts it was trained on, with each reward's score, the advantage and the KL."""

from __future__ import annotations

from pathlib import Path

from posttrain.report.load import Run, is_number, read_jsonl

SAMPLES_FILE = "samples.jsonl"  # train/samples.SAMPLES_FILE (not imported: that module needs torch)
MAX_ROWS = 8  # per step shown: the first completions of the step's first prompts


def read_samples(run_dir: Path | None) -> list[dict]:
    if run_dir is None or not (run_dir / SAMPLES_FILE).exists():
        return []
    return read_jsonl(run_dir / SAMPLES_FILE)


def _num(value, signed: bool = False) -> str:
    if not is_number(value):
        return "—"
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def scores_cell(row: dict) -> str:
    """'numeric 1 · total 1 · adv +0.71 · KL 0.012 · chosen': each reward's score, then what the step trained on."""
    parts = [f"{name} {_num(v)}" for name, v in (row.get("rewards") or {}).items()]
    parts += [f"total {_num(row.get('reward'))}", f"adv {_num(row.get('advantage'), signed=True)}",
              f"KL {_num(row.get('kl'))}" + (" (teacher)" if row.get("kl_to") == "teacher" else "")]
    if row.get("pair"):
        parts.append(str(row["pair"]))
    if row.get("truncated"):
        parts.append("truncated")
    return " · ".join(parts)


def first_and_last(rows: list[dict]) -> tuple[int, int, list[dict], list[dict]] | None:
    steps = sorted({r["step"] for r in rows if is_number(r.get("step"))})
    if not steps:
        return None
    first, last = steps[0], steps[-1]
    pick = lambda s: [r for r in rows if r.get("step") == s][:MAX_ROWS]  # noqa: E731
    return first, last, pick(first), pick(last)


def stage_table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows): row k of the first step beside row k of the last step."""
    found = first_and_last(rows)
    if found is None:
        return None
    first, last, a, b = found
    header = [f"step {first}: prompt", "completion", "scores", f"step {last}: prompt", "completion", "scores"]
    cells = lambda r: [str(r.get("prompt", "")), str(r.get("completion", "")), scores_cell(r)] if r else ["", "", ""]  # noqa: E731
    return header, [cells(a[k] if k < len(a) else None) + cells(b[k] if k < len(b) else None)
                    for k in range(max(len(a), len(b)))]


def section_blocks(run: Run, table) -> list:
    """The section's blocks; `table(id, header, rows)` makes a report Table (report/build.py)."""
    blocks = []
    for stage in run.stages:
        found = stage_table_rows(read_samples(stage.run_dir))
        if found is not None:
            blocks.append(f"{stage.name} ({stage.command}): its first and last logged steps' samples, side by side.")
            blocks.append(table(f"rollout-samples-{stage.name}", *found))
    if not blocks:
        return ["Not available: no stage wrote samples.jsonl (online stages do, with train.samples_per_step > 0)."]
    return ["Completions sampled during training, each with every reward function's score, the total the step "
            "trained on, its advantage and its KL to the reference (k1 summed over the completion, nats)."] + blocks
