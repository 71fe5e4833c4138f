"""Stability over seeds (`posttrain demo --seeds N`): the spread of each repeated stage's final accuracy and its
count of loss or reward spikes, from the seed runs' own metrics.jsonl. No torch.

The pipeline runs each RL stage again with `train.seed = k` for k = 1 … N−1 (in `<stage>_seed<k>/`; seed 0 is
the main run) and lists the directories in `pipeline_summary.json` under `seeds`. For every run:
- final accuracy: `eval/accuracy` (or `eval/<verifier>/accuracy`) of its final metrics row (the run's own held-out split, the same prompts for
  every seed; the pipeline's larger held-out set is measured for seed 0 only, so it is not mixed in here);
- spikes (`spikes`): a logged step whose loss is above, or whose reward is below, the median of the WINDOW
  steps before it by more than SPIKE_K robust standard deviations of those steps (1.4826 × their median absolute
  deviation, never below SPIKE_FLOOR × their median |value| nor ABS_FLOOR). Only the harmful direction counts:
  a falling loss or a rising reward is what training is for. A step that spikes in both counts once.
"""

from __future__ import annotations

import math
import statistics

WINDOW = 5  # steps of the rolling median (a step needs MIN_WINDOW earlier steps to be judged)
MIN_WINDOW = 3
SPIKE_K = 4.0
SPIKE_FLOOR = 0.01  # relative floor of the scale: a flat or linear stretch has MAD 0
ABS_FLOOR = 1e-3
REWARD_KEYS = ("reward", "rewards/mean")
ACCURACY_KEYS = ("eval/accuracy", "eval/rewards/accuracies")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def spike_steps(values: list[float], upward: bool) -> list[int]:
    """Indices of the values that deviate (up when `upward`, else down) from the rolling median of the WINDOW
    values before them by more than SPIKE_K robust standard deviations."""
    out = []
    for t in range(MIN_WINDOW, len(values)):
        window = values[max(0, t - WINDOW): t]
        center = statistics.median(window)
        mad = statistics.median(abs(v - center) for v in window)
        scale = max(1.4826 * mad, SPIKE_FLOOR * statistics.median(abs(v) for v in window), ABS_FLOOR)
        deviation = values[t] - center if upward else center - values[t]
        if deviation > SPIKE_K * scale:
            out.append(t)
    return out


def run_spikes(rows: list[dict]) -> int:
    """Steps of a run with a loss spike (up) or a reward spike (down), each step counted once."""
    train = [r for r in rows if not r.get("final")]
    steps: set = set()
    for key, upward in (("loss", True), *((k, False) for k in REWARD_KEYS)):
        logged = [(r.get("step"), r[key]) for r in train if _finite(r.get(key))]
        steps |= {logged[i][0] for i in spike_steps([v for _, v in logged], upward)}
        if key != "loss" and logged:
            break  # the first reward key logged stands for the reward
    return len(steps)


def final_accuracy(rows: list[dict]) -> float | None:
    """The final row's `eval/accuracy`, else its first verifier's `eval/<reward>/accuracy` (what the online
    algorithms' held-out evaluation logs per reward function)."""
    finals = [r for r in rows if r.get("final")] or rows[-1:]
    for row in reversed(finals):
        keys = [k for k in ACCURACY_KEYS if k in row] + sorted(k for k in row if k.startswith("eval/") and
                                                                k.endswith("/accuracy") and k not in ACCURACY_KEYS)
        for key in keys:
            if _finite(row.get(key)):
                return float(row[key])
    return None


def spread(values: list[float]) -> dict:
    """mean, min, max and the sample standard deviation (n − 1; 0 for one value) of `values`."""
    return {"n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def seed_summary(runs: list[tuple[int, list[dict]]]) -> dict | None:
    """{seeds, accuracy: spread | None, spikes (all runs), spikes_per_run, steps} of one stage's seed runs;
    None for fewer than two runs (one run has no spread)."""
    if len(runs) < 2:
        return None
    accuracies = [a for a in (final_accuracy(rows) for _, rows in runs) if a is not None]
    spikes = [run_spikes(rows) for _, rows in runs]
    return {"seeds": [s for s, _ in runs], "accuracy": spread(accuracies) if len(accuracies) > 1 else None,
            "spikes": sum(spikes), "spikes_per_run": sum(spikes) / len(runs),
            "steps": sum(sum(1 for r in rows if not r.get("final") and "loss" in r) for _, rows in runs)}


def describe(s: dict) -> str:
    """'final accuracy 45.3 % mean, 40.6–50.0 % (min–max), std 4.7 pts over 3 seeds; 2 spikes in 24 steps'."""
    acc = s["accuracy"]
    n = len(s["seeds"])
    head = (f"final accuracy {100 * acc['mean']:.1f} % mean, {100 * acc['min']:.1f}–{100 * acc['max']:.1f} % "
            f"(min–max), std {100 * acc['std']:.1f} pts over {n} seeds") if acc else f"no final accuracy ({n} seeds)"
    return f"{head}; {s['spikes']} spikes in {s['steps']} steps"


TABLE_HEADER = ["stage", "command", "seeds", "final accuracy: mean", "min", "max", "std (pts)", "spikes", "steps"]


def table_rows(stages) -> list[list[str]]:
    """One row per stage repeated over seeds (report/load.Stage with `seed_runs`)."""
    rows = []
    for stage in stages:
        s = seed_summary(stage.seed_runs)
        if s is None:
            continue
        acc = s["accuracy"]
        cells = [f"{100 * acc[k]:.1f} %" for k in ("mean", "min", "max")] + [f"{100 * acc['std']:.1f}"] if acc else ["—"] * 4
        rows.append([stage.name, stage.command, str(len(s["seeds"])), *cells, str(s["spikes"]), str(s["steps"])])
    return rows
