"""Per-prompt held-out outcomes of a pipeline's stages (`heldout_<stage>.jsonl`) and the statistics drawn from
them: each stage's accuracy with its Wilson interval, and each stage against the baseline (SFT) on the same
prompts: McNemar's test, the paired-bootstrap interval of the difference, the discordant counts.

The pipeline calls `attach_statistics` after every stage, so `pipeline_summary.json` carries these numbers; the
report reads the same files for the claims that compare two algorithms (`compare_stages`).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.report.stats import LEVEL, accuracy_with_interval, compare_paired

BASELINE = "sft"  # the stage every other is compared with when one has this name; else the first measured stage
RESAMPLES, SEED = 2000, 0  # the paired bootstrap's draws and seed: the same files always give the same interval


def heldout_file(root: Path, stage: str) -> Path:
    return Path(root) / f"heldout_{stage}.jsonl"


def write_outcomes(root: Path, stage: str, outcomes: list[dict]) -> Path:
    path = heldout_file(root, stage)
    path.write_text("".join(json.dumps(row) + "\n" for row in outcomes))
    return path


def read_outcomes(root: Path, stage: str) -> dict[int, int | None] | None:
    """{prompt index: 1 | 0 | None (masked)} of a stage, or None when it has no file (an rm or analysis stage)."""
    path = heldout_file(root, stage)
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["index"]): r.get("correct") for r in rows}


def _paired(a: dict[int, int | None], b: dict[int, int | None]) -> tuple[list[int], list[int]]:
    """The two stages' outcomes on the prompts both answered with a defined verdict, in prompt order."""
    keys = sorted(k for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None)
    return [a[k] for k in keys], [b[k] for k in keys]


def compare_stages(root: Path, first: str, second: str) -> dict | None:
    """`second` against `first` (compare_paired's keys), or None when either has no per-prompt outcomes."""
    a, b = read_outcomes(root, first), read_outcomes(root, second)
    if a is None or b is None:
        return None
    xs, ys = _paired(a, b)
    return compare_paired(xs, ys, RESAMPLES, SEED) if xs else None


def baseline_of(names: list[str], outcomes: dict[str, dict | None]) -> str | None:
    """The stage named `sft` when it has outcomes, else the first stage after `base` that has them."""
    measured = [n for n in names if outcomes.get(n) is not None]
    if BASELINE in measured:
        return BASELINE
    return next((n for n in measured if n != "base"), None)


def _vs_baseline(baseline: str, entry_outcomes: dict, base_outcomes: dict) -> dict | None:
    xs, ys = _paired(base_outcomes, entry_outcomes)
    if not xs:
        return None
    c = compare_paired(xs, ys, RESAMPLES, SEED)
    return {"baseline": baseline, "n": c["n"], "diff": c["diff"], "diff_ci": [c["diff_lo"], c["diff_hi"]],
            "baseline_only": c["first_only"], "stage_only": c["second_only"], "p": c["p"], "p_exact": c["p_exact"],
            "chi2": c["chi2"], "p_chi2": c["p_chi2"], "test": c["test"]}


def attach_statistics(summary: dict, root: Path) -> None:
    """Add to every stage entry with a heldout file: heldout_n, heldout_correct, heldout_accuracy (recomputed
    from the file, so the two never disagree), heldout_accuracy_ci [lo, hi] (Wilson) and, for every stage but
    the baseline, `vs_baseline`; the summary gets `baseline` and `statistics` (what the numbers are)."""
    entries = summary.get("stages", [])
    outcomes = {e["name"]: read_outcomes(root, e["name"]) for e in entries}
    # a reward that is not 0/1 leaves every `correct` None: no accuracy, no interval, no paired test
    outcomes = {name: got if got and any(v is not None for v in got.values()) else None for name, got in outcomes.items()}
    baseline = baseline_of([e["name"] for e in entries], outcomes)
    for entry in entries:
        got = outcomes.get(entry["name"])
        if got is None:
            continue
        acc = accuracy_with_interval([v for _, v in sorted(got.items()) if v is not None])
        entry.update(heldout_n=acc["n"], heldout_correct=acc["correct"], heldout_accuracy=acc["accuracy"],
                     heldout_accuracy_ci=[acc["lo"], acc["hi"]])
        if baseline is not None and entry["name"] != baseline:
            entry["vs_baseline"] = _vs_baseline(baseline, got, outcomes[baseline])
    summary["baseline"] = baseline
    summary["statistics"] = {
        "level": LEVEL, "accuracy_interval": "Wilson score", "paired_test": "McNemar, exact binomial on the discordant pairs",
        "difference_interval": f"paired percentile bootstrap over prompts, {RESAMPLES} resamples, seed {SEED}",
        "outcomes": "heldout_<stage>.jsonl: one row per held-out prompt, correct 1/0 under the verifier",
    }
