"""Run directory (or pipeline directory) → `report.html` (self-contained: PNGs inlined as base64, no JS, no
external fetch) and `report.md` with its PNGs written beside it.

Both files render the same list of sections, so their tables hold the same strings; every number is the value
in the run's files, printed by `fmt` (shortest round-trip repr): parsing a cell back gives the logged float.
Sections, the answer first: summary (the claims' verdicts, the comparison rounded for people with intervals and
paired tests against SFT, a figure of accuracy, time, KL and memory per stage: `summary.py`), the exact measured
comparison and the claims' rules (`claims.py`), training curves (+ the last logged value of each plotted
metric), reward-vs-KL frontier, held-out samples before/after each stage, the online stages' training samples
(`samples.jsonl`: first and last steps side by side), reward over-optimization
(`overoptimization.json`), failure-mode warnings (`warnings.jsonl`), and the run directories. A missing
optional part gives a one-line note in its section, never an error. Input layout: see `load.py`.
"""

from __future__ import annotations

import base64
import html
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.report import plots
from posttrain.report.claims import CLAIM_ALGOS, check_claims
from posttrain.report.load import (MEASURED_FIELDS, SUMMARY_FILE, Run, Stage, fmt, is_number, last_value, load_run,
                                   measured, series)

from posttrain.registry import Registry

REWARD_KEYS = ("reward", "rewards/mean", "reward/mean", "rewards/total")
# panel title -> the metric keys drawn in it (a panel appears when one of its keys was logged)
SEQ_KL = "kl/seq_k1_sum"  # nats per completion (k1 summed): the KL measure comparable across GRPO, PPO, online DPO
PANELS = {
    "loss": ("loss", "eval/loss"),
    "reward": REWARD_KEYS + ("eval/reward", "eval/mean_reward"),
    "rewards & margins": ("rewards/chosen", "rewards/rejected", "rewards/margins", "margin",
                          "eval/rewards/margins", "eval/margin"),
    "accuracy": ("accuracy", "rewards/accuracies", "eval/accuracy", "eval/rewards/accuracies"),
    "KL": ("kl/seq_k1_sum",),
    "entropy": ("entropy",),
    "clip ratio": ("clip_ratio",),
}
VERDICTS = ("confirmed", "not confirmed", "not settled", "not measured")
OVEROPT_KEYS = ("kl", "gold_reward", "proxy_reward")


@dataclass
class Table:
    id: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file stem of the PNG beside report.md
    png: bytes
    caption: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph) | Table | Image


SECTIONS = Registry("report section")


def section(id_: str, title: str):
    """Decorator: `fn(run) -> blocks` renders one section; sections appear in registration order."""
    return lambda fn: (SECTIONS.add(id_, (title, fn)), fn)[1]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@section("summary", "Summary: verdicts and comparison")
def summary(run: Run) -> list:
    """The answer first, rounded for people: what a reader needs before any curve (report/summary.py)."""
    from posttrain.report.summary import HEADLINE, SMOKE, baseline_note, headline_rows

    blocks = [SMOKE] if run.header.get("smoke_run") else []
    claims = check_claims(run.stages)
    blocks.append(Table("verdicts", ["claim", "verdict", "measured on this run"], [[c.name, c.verdict, c.measured] for c in claims]))
    blocks += [baseline_note(run), Table("headline", HEADLINE, headline_rows(run))]
    from posttrain.report import seeds

    if rows := seeds.table_rows(run.stages):  # `--seeds N`: what the stability verdict is judged from
        blocks += ["Stages repeated over seeds: the spread of their final held-out accuracy (each run's own eval "
                   "split) and their loss or reward spikes (posttrain/report/seeds.py).",
                   Table("seeds", seeds.TABLE_HEADER, rows)]
    points = [_glance_point(s) for s in run.stages]
    if any(p[1] is not None for p in points):
        blocks.append(Image("glance", plots.at_a_glance(points), "held-out accuracy per stage (bars: 95 % Wilson "
                            "interval), accuracy against wall time and against KL to the start model, peak memory"))
    blocks.append("Exact values, their sources and each claim's rule: the Comparison section below.")
    return blocks


def _glance_point(stage: Stage) -> tuple:
    values = {k: v for k, (v, _) in measured(stage).items()}
    num = lambda v: v if is_number(v) else None  # noqa: E731
    ci = stage.summary.get("heldout_accuracy_ci")
    ci = tuple(ci) if isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci)) else None
    wall = num(values["wall_time_s"])
    # a reward model's accuracy is pairwise (chosen above rejected), not its answers': not on the same axis
    accuracy = None if stage.command == "rm" else num(values["heldout_accuracy"])
    return (stage.name, accuracy, ci, wall / 60 if wall is not None else None,
            num(values["kl_to_ref"]), num(values["peak_mem_gb"]))


def overview(run: Run) -> list:
    blocks = [f"Run directory: {run.root.resolve()}"]
    blocks += [f"{key}: {fmt(value)}" for key, value in run.header.items()]
    rows = [[s.name, s.command, fmt(s.summary.get("started_from")), str(sum(not r.get("final") for r in s.rows)),
             fmt(last_value(s.rows, "step")[0]), str(s.run_dir) if s.run_dir else "—"] for s in run.stages]
    blocks.append(Table("stages", ["stage", "command", "started_from", "logged steps", "last step", "run dir"], rows))
    if run.warnings:
        blocks.append(f"{len(run.warnings)} failure-mode warnings: see the Warnings section.")
    return blocks


def _panels(stage: Stage) -> list[tuple[str, list]]:
    panels = []
    for title, keys in PANELS.items():
        curves = [(key, *series(stage.rows, key)) for key in keys]
        curves = [c for c in curves if c[1]]
        if curves:
            panels.append((title, curves))
    return panels


def _plotted_keys(stage: Stage) -> list[str]:
    keys = [c[0] for _, curves in _panels(stage) for c in curves]
    return keys + sorted({k for r in stage.rows for k in r if k.startswith("eval/") and k not in keys})


@section("comparison", "Comparison: measured on this run vs the usual claims")
def comparison(run: Run) -> list:
    rows, notes = [], []
    for stage in run.stages:
        values = measured(stage)
        rows.append([stage.name, stage.command] + [fmt(values[n][0]) for n in MEASURED_FIELDS])
        notes += [f"{stage.name} {name}: {src}" for name, (v, src) in values.items()
                  if v is not None and src != SUMMARY_FILE]
    blocks = [
        f"— means not measured. Every value is from {SUMMARY_FILE}"
        + (", except (from metrics.jsonl) " + "; ".join(notes) + "." if notes else "."),
        Table("comparison", ["stage", "command", *MEASURED_FIELDS], rows),
        "Claims of the usual table, each checked by its rule (posttrain/report/claims.py): "
        "confirmed / not confirmed when this run orders the algorithms as claimed or not; not measured when "
        "fewer than two of PPO, DPO, GRPO have the measurement; a quality claim is decided by McNemar's paired test "
        "on the same held-out prompts (p < 0.05), and not settled when the test cannot tell the stages apart.",
    ]
    claims = [[c.name, *(c.claimed[a] for a in CLAIM_ALGOS), c.measured, c.verdict, c.rule]
              for c in check_claims(run.stages)]
    header = ["claim", *(a.upper() for a in CLAIM_ALGOS), "measured on this run", "verdict", "rule"]
    blocks.append(Table("claims", header, claims))
    return blocks


@section("curves", "Training curves")
def curves(run: Run) -> list:
    blocks, rows = [], []
    for stage in run.stages:
        panels = _panels(stage)
        if not panels:
            blocks.append(f"{stage.name}: no metrics logged (no metrics.jsonl).")
            continue
        marks = sorted({w["step"] for w in run.warnings if w.get("stage") == stage.name and is_number(w.get("step"))})
        png = plots.training_curves(f"{stage.name} ({stage.command})", panels, marks)
        caption = f"{stage.name}: training curves" + (" (dashed red lines: steps with a warning)" if marks else "")
        blocks.append(Image(f"curves_{_safe(stage.name)}", png, caption))
        for key in _plotted_keys(stage):
            value, step = last_value(stage.rows, key)
            rows.append([stage.name, key, fmt(value), fmt(step)])
    if rows:
        blocks.append("Last logged value of each metric above, as written in metrics.jsonl:")
        blocks.append(Table("final-values", ["stage", "metric", "value", "step"], rows))
    return blocks


def _trajectory(stage: Stage):
    for key in REWARD_KEYS:
        pairs = [(r[SEQ_KL], r[key]) for r in stage.rows
                 if not r.get("final") and is_number(r.get(SEQ_KL)) and is_number(r.get(key))]
        if pairs:
            return key, pairs
    return None, []


@section("frontier", "Reward vs KL frontier")
def frontier(run: Run) -> list:
    trajectories, finals, rows = [], [], []
    for stage in run.stages:
        key, pairs = _trajectory(stage)
        if pairs:
            trajectories.append((stage.name, [p[0] for p in pairs], [p[1] for p in pairs]))
            rows.append([stage.name, f"kl, {key} over steps", fmt(pairs[-1][0]), fmt(pairs[-1][1])])
        values = measured(stage)
        kl, reward = values["kl_to_ref"][0], values["mean_reward"][0]
        if is_number(kl) and is_number(reward):
            finals.append((stage.name, kl, reward))
            rows.append([stage.name, "final (kl_to_ref, mean_reward)", fmt(kl), fmt(reward)])
    if not rows:
        return ["Not available: no stage logged both `kl` and a reward, "
                "and no stage has both kl_to_ref and mean_reward."]
    png = plots.frontier(trajectories, finals)
    return [Image("frontier", png, "reward vs KL: lines over steps (circle: first step), stars the final points"),
            Table("frontier", ["stage", "point", "kl", "reward"], rows)]


@section("samples", "Held-out prompts before and after each stage")
def samples(run: Run) -> list:
    rows = [[s.name, str(x.get("prompt", "")), str(x.get("before", "")), str(x.get("after", ""))]
            for s in run.stages for x in s.summary.get("samples") or [] if isinstance(x, dict)]
    if not rows:
        return ["Not available: pipeline_summary.json holds no `samples`."]
    return [Table("samples", ["stage", "prompt", "before", "after"], rows)]


@section("rollout-samples", "Training samples: first and last steps")
def rollout_samples(run: Run) -> list:
    from posttrain.report.rollout_samples import section_blocks

    return section_blocks(run, Table)


def _overopt_by_method(points: list[dict]) -> dict[str, list[dict]]:
    by_method: dict[str, list[dict]] = {}
    for p in points:
        if is_number(p.get("kl")) and is_number(p.get("proxy_reward")) and is_number(p.get("gold_reward")):
            by_method.setdefault(str(p.get("method", "—")), []).append(p)
    return {m: sorted(ps, key=lambda p: p["kl"]) for m, ps in by_method.items()}


@section("overoptimization", "Reward over-optimization (proxy vs gold)")
def overoptimization(run: Run) -> list:
    by_method = _overopt_by_method(run.overoptimization)
    if not by_method:
        return ["Not available: no overoptimization.json in this run."]
    curves, peaks, rows = {}, {}, []
    for method, pts in by_method.items():
        curves[method] = ([p["kl"] for p in pts], [p["proxy_reward"] for p in pts], [p["gold_reward"] for p in pts])
        peak, last = max(pts, key=lambda p: p["gold_reward"]), pts[-1]
        peaks[method] = (peak["kl"], peak["gold_reward"])
        rows.append([method, fmt(peak.get("step"))] + [fmt(p[k]) for p in (peak, last) for k in OVEROPT_KEYS])
    header = ["method", "peak step"] + [f"{at} {k}" for at in ("peak", "last") for k in OVEROPT_KEYS]
    return [
        "Gao et al. 2022: as the policy moves away from its start, the proxy (trained) reward keeps rising while "
        "the gold reward rises, peaks and falls. The x axis is √KL-scaled, where their gold curve is a parabola.",
        Image("overoptimization", plots.overoptimization(curves, peaks),
              "proxy (dashed) and gold (solid) reward vs KL; star: the gold peak"),
        Table("overoptimization", header, rows),
    ]


@section("warnings", "Failure-mode warnings")
def warnings_section(run: Run) -> list:
    if not run.warnings:
        return ["No warnings.jsonl in this run."]
    counts = Counter(str(w.get("kind", "—")) for w in run.warnings)
    rows = [[fmt(w.get("stage")), fmt(w.get("step")), str(w.get("kind", "—")), str(w.get("message", ""))]
            for w in run.warnings]
    return ["Counts: " + ", ".join(f"{kind} × {n}" for kind, n in counts.most_common()),
            Table("warnings", ["stage", "step", "kind", "message"], rows)]


SECTIONS.add("overview", ("Run directories", overview))  # registered last: the report leads with the answer


def build_sections(run: Run) -> list[Section]:
    return [Section(id_, title, fn(run)) for id_, (title, fn) in SECTIONS.items()]


CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;max-width:1250px;margin:1.5em auto;padding:0 1em;color:#222}
div.wide{overflow-x:auto}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:1.8em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.8em 0;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top;white-space:pre-wrap;text-align:left}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}
td.v-confirmed{background:#d9f2d9!important}td.v-not-confirmed{background:#f9d6d5!important}td.v-not-measured{color:#777}td.v-not-settled{background:#fdf1cf!important}
img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}figcaption{font-size:12px;color:#555}
"""
# the page needs nothing from outside itself; the policy makes any accidental fetch fail loudly
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _html_cell(tag: str, text: str) -> str:
    cls = f' class="v-{text.replace(" ", "-")}"' if tag == "td" and text in VERDICTS else ""
    body = html.escape(text)
    if tag == "th":  # long field names may wrap after "_" or "/" so wide tables fit the page
        body = body.replace("_", "_<wbr>").replace("/", "/<wbr>")
    return f"<{tag}{cls}>{body}</{tag}>"


def _html_block(block) -> str:
    if isinstance(block, Table):
        head = "".join(_html_cell("th", h) for h in block.header)
        body = "".join("<tr>" + "".join(_html_cell("td", c) for c in row) + "</tr>" for row in block.rows)
        table = f'<table id="{block.id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        return f'<div class="wide">{table}</div>'
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return (f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    return f"<p>{html.escape(block)}</p>"


def render_html(title: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>\n' + "\n".join(map(_html_block, s.blocks))
                     + "</section>" for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")


def _md_cell(text: str) -> str:
    """GFM table cell: model outputs are shown as text, never as HTML; newlines become <br>."""
    text = html.escape(text, quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def _md_block(block) -> str:
    if isinstance(block, Table):
        lines = ["| " + " | ".join(map(_md_cell, block.header)) + " |", "|" + "---|" * len(block.header)]
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Image):
        return f"![{block.caption}]({image_file(block)})"
    return block


def image_file(image: Image) -> str:
    return f"report_{image.name}.png"


def render_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f'<a id="{s.id}"></a>\n## {s.title}')
        parts += [_md_block(b) for b in s.blocks]
    return "\n\n".join(parts) + "\n"


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.html, report.md and its report_*.png into `out_dir` (default: the run directory);
    return the path of report.html."""
    run = load_run(run_dir)
    sections = build_sections(run)
    title = f"posttrain report — {run.root.resolve().name}"
    out = Path(out_dir) if out_dir else run.root
    out.mkdir(parents=True, exist_ok=True)
    for block in (b for s in sections for b in s.blocks if isinstance(b, Image)):
        (out / image_file(block)).write_bytes(block.png)
    (out / "report.md").write_text(render_markdown(title, sections))
    path = out / "report.html"
    path.write_text(render_html(title, sections))
    return path
