"""The answer first: the claims' verdicts and a comparison table rounded for people (`53.1 % ± 8.6`, `17.2 min`,
`3.34 GB`, `p = 0.039`), shared by the report's first section and the pipeline's terminal summary, so both say
the same. The exact values stay in the report's "Comparison" section; these are the same numbers, rounded.
"""

from __future__ import annotations

from posttrain.report.claims import check_claims
from posttrain.report.load import Run, Stage, is_number, measured

HEADLINE = ["stage", "command", "held-out accuracy", "95 % interval", "vs SFT (pts, 95 % interval)", "p vs SFT",
            "right only: SFT / stage", "KL to start", "time", "memory", "models"]
SMOKE = ("SMOKE RUN: a few steps per stage on a handful of prompts, to show that every stage and the report work; "
         "its accuracies and verdicts mean nothing.")


def pct(value) -> str:
    return f"{100 * value:.1f} %" if is_number(value) else "—"


def minutes(seconds) -> str:
    return f"{seconds / 60:.1f} min" if is_number(seconds) else "—"


def gigabytes(value) -> str:
    return f"{value:.2f} GB" if is_number(value) else "—"


def p_value(p) -> str:
    if not is_number(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def accuracy_cells(entry: dict, accuracy) -> tuple[str, str]:
    """('53.1 % ± 8.6', '44.6–61.4 %'): ± is half the Wilson interval's width (it is not symmetric near 0 or 1,
    so the interval itself is given too)."""
    ci = entry.get("heldout_accuracy_ci")
    if not (is_number(accuracy) and isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci))):
        return pct(accuracy), "—"
    return f"{100 * accuracy:.1f} % ± {100 * (ci[1] - ci[0]) / 2:.1f}", f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f} %"


def versus_cells(entry: dict) -> tuple[str, str, str]:
    vs = entry.get("vs_baseline")
    if not isinstance(vs, dict):
        return "—", "—", "—"
    lo, hi = vs["diff_ci"]
    diff = f"{100 * vs['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return diff, p_value(vs["p"]), f"{vs['baseline_only']} / {vs['stage_only']}"


def headline_row(stage: Stage) -> list[str]:
    values = {k: v for k, (v, _) in measured(stage).items()}
    acc, interval = accuracy_cells(stage.summary, values["heldout_accuracy"])
    if stage.command == "rm" and acc != "—":
        acc += " (pairwise)"  # the reward model ranks held-out pairs; it answers no prompt
    if isinstance(made := stage.summary.get("pairs"), dict):  # a data stage: what it made, not an accuracy
        acc = f"{made['train_pairs']} + {made['eval_pairs']} held-out pairs"
        interval = f"samples {pct(made['sample_accuracy'])} right"
    diff, p, discordant = versus_cells(stage.summary)
    kl = values["kl_to_ref"]
    models = values["models_in_memory"]
    return [stage.name, stage.command, acc, interval, diff, p, discordant, f"{kl:.3f}" if is_number(kl) else "—",
            minutes(values["wall_time_s"]), gigabytes(values["peak_mem_gb"]), str(int(models)) if is_number(models) else "—"]


def headline_rows(run: Run) -> list[list[str]]:
    return [headline_row(s) for s in run.stages]


def verdict_lines(run: Run) -> list[str]:
    return [f"{c.name}: {c.verdict.upper()} — {c.measured}" for c in check_claims(run.stages)]


def baseline_note(run: Run) -> str:
    base = run.header.get("baseline")
    n = run.header.get("heldout_prompts")
    if not base:
        return "No per-prompt held-out outcomes: no intervals or paired tests."
    return (f"Every stage answered the same {n} held-out prompts; accuracy ± half its 95 % Wilson interval; each stage "
            f"against {base} by McNemar's exact test on the prompts one got right and the other wrong (p < 0.05: a "
            f"real difference), with the paired-bootstrap 95 % interval of the difference in points.")


def terminal_text(run: Run) -> str:
    """The pipeline's closing summary: smoke note, verdicts, the rounded table (aligned columns)."""
    lines = [SMOKE] if run.header.get("smoke_run") else []
    lines += ["Verdicts:"] + [f"  {line}" for line in verdict_lines(run)]
    rows = [HEADLINE] + headline_rows(run)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADLINE))]
    lines += ["", baseline_note(run)]
    lines += [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
