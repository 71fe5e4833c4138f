"""`posttrain report`: fake run and pipeline directories → report.html / report.md; every section present,
every number equal to the run's files, images inlined, claims judged by their rules, and (where Debian's
chromium is installed) the page rendered by a real browser with no console errors."""

import base64
import html
import json
import random
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.report import build_report
from posttrain.report.claims import CONFIRMED, NOT_CONFIRMED, NOT_MEASURED, NOT_SETTLED, check_claims, order_verdict
from posttrain.report.heldout import attach_statistics, write_outcomes
from posttrain.report.load import load_run

SECTIONS = ("summary", "comparison", "curves", "frontier", "samples", "rollout-samples", "overoptimization", "warnings", "overview")
N_PROMPTS = 256
CHROMIUM = "/usr/bin/chromium"
PPO_SPIKES, PPO_SKIPPED, PPO_NAN = (7, 13, 17), 10, 4
GRPO_SPIKES = (12,)


# ---------- fake run directories ----------

def _rows(command: str, steps: int, seed: int, spikes=(), skipped=None, nan_at=None) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for t in range(1, steps + 1):
        loss = 2.0 - 0.05 * t + rng.uniform(-0.01, 0.01) + (1.5 if t in spikes else 0.0)
        row = {"step": t, "loss": "nan" if t == nan_at else loss, "lr": 1e-5 * rng.random(), "grad_norm": rng.random(),
               "tokens_per_s": 1000 * rng.random(), "peak_mem_gb": 2 * rng.random(), "step_time_s": rng.random(),
               "skipped": 1.0 if t == skipped else 0.0}
        if command in ("dpo", "kto"):
            chosen, rejected = rng.random(), -rng.random()
            row.update({"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                        "rewards/accuracies": rng.random()})
        if command in ("ppo", "grpo"):
            row.update({"reward": 0.03 * t + rng.random() / 7, "kl/seq_k1_sum": 0.002 * t * t + rng.random() / 1000,
                        "entropy": 1.0 - 0.01 * t, "clip_ratio": rng.random() / 10})
        if command == "rm":
            row["accuracy"] = rng.random()
        rows.append(row)
    final = {"sft": {"eval/loss": rng.random()}, "rm": {"eval/accuracy": rng.random(), "eval/margin": rng.random()},
             "dpo": {"eval/loss": rng.random(), "eval/rewards/accuracies": rng.random()},
             "ppo": {"eval/reward": rng.random()}, "grpo": {"eval/reward": rng.random(), "eval/accuracy": rng.random()}}
    rows.append({"step": steps, **final[command], "final": True})
    return rows


def write_run(path: Path, command: str, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(f"command: {command}\ntrain:\n  max_steps: {rows[-1]['step']}\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _summary_entry(name: str, models: int, wall: float, seed: int) -> dict:
    rng = random.Random(seed)
    return {"name": name, "command": name, "started_from": "base" if name == "sft" else "sft/final",
            "wall_time_s": wall, "peak_mem_gb": rng.uniform(1, 9), "models_in_memory": models,
            "trainable_params": 1_234_567 + seed, "tokens_per_s": rng.uniform(100, 900),
            "heldout_accuracy": rng.random(), "mean_reward": rng.random(), "kl_to_ref": rng.random() / 10,
            "samples": [{"prompt": "What is 2+3?", "before": f"{name} before | 4", "after": f"{name} after\n5"},
                        {"prompt": "12*3 = ?", "before": "<b>37</b>", "after": "36"}]}


def _samples() -> list[dict]:
    """samples.jsonl rows of steps 1, 10 and 20: two completions of one prompt each."""
    return [{"step": step, "group": 0, "prompt": f"q{step}", "completion": f"c{step}.{k}", "rewards": {"numeric": float(k)},
             "reward": float(k), "advantage": k - 0.5, "kl": 0.0125 * step, "kl_to": "reference", "length": 3,
             "truncated": False} for step in (1, 10, 20) for k in (0, 1)]


def _outcomes(grpo_gain: int = 30) -> dict[str, list[int]]:
    """Per-prompt 0/1 answers on 256 prompts: sft right on the first 110; ppo loses 0-4 and gains 110-114; dpo is
    ppo minus prompt 5; grpo is sft plus `grpo_gain` prompts from 110 on, minus prompts 0-1."""
    sft = [int(i < 110) for i in range(N_PROMPTS)]
    ppo = [0 if i < 5 else 1 if 110 <= i < 115 else v for i, v in enumerate(sft)]
    dpo = [0 if i == 5 else v for i, v in enumerate(ppo)]
    grpo = [0 if i < 2 else 1 if 110 <= i < 110 + grpo_gain else v for i, v in enumerate(sft)]
    return {"sft": sft, "ppo": ppo, "dpo": dpo, "grpo": grpo}


def write_seed_runs(root: Path, summary: dict, ppo_delta: float = 0.2, grpo_delta: float = 0.01) -> None:
    """Seeds 1 and 2 of ppo and grpo: final accuracy the main run's ± delta (ppo's main run has none: 0.5)."""
    runs = {}
    for name, delta, spikes in (("ppo", ppo_delta, (9,)), ("grpo", grpo_delta, ())):
        main_rows = read_rows(root / name / "metrics.jsonl")
        base = main_rows[-1].get("eval/accuracy", 0.5)
        if "eval/accuracy" not in main_rows[-1]:
            main_rows[-1]["eval/accuracy"] = base
            write_run(root / name, name, main_rows)
        runs[name] = [[0, name]]
        for k, sign in ((1, 1), (2, -1)):
            rows = _rows(name, 20, 10 + k, spikes if k == 1 else ())
            rows[-1]["eval/accuracy"] = base + sign * delta
            write_run(root / f"{name}_seed{k}", name, rows)
            runs[name].append([k, f"{name}_seed{k}"])
    summary["seeds"] = {"n": 3, "runs": runs}


def make_pipeline(root: Path, dpo_wall: float = 40.25, grpo_gain: int = 30, smoke: bool = False, seeds: bool = True) -> Path:
    stage_rows = {"sft": _rows("sft", 20, 1), "rm": _rows("rm", 20, 2), "dpo": _rows("dpo", 20, 3),
                  "ppo": _rows("ppo", 20, 4, PPO_SPIKES, PPO_SKIPPED, PPO_NAN), "grpo": _rows("grpo", 20, 5, GRPO_SPIKES)}
    for name, rows in stage_rows.items():
        write_run(root / name, name, rows)
    (root / "grpo" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _samples()))
    stages = [_summary_entry("sft", 1, 20.5, 1), _summary_entry("rm", 1, 30.0, 2), _summary_entry("dpo", 2, dpo_wall, 3),
              _summary_entry("ppo", 4, 300.5, 4), _summary_entry("grpo", 3, 150.125, 5)]
    stages[-1]["kl_to_ref"] = None  # not measured by the pipeline: the report falls back to the last logged kl
    stages[3]["peak_mem_gb"], stages[4]["peak_mem_gb"] = 4.0, 2.2  # grpo 45 % below ppo
    for name, answers in _outcomes(grpo_gain).items():
        write_outcomes(root, name, [{"index": i, "prompt": f"q{i}", "completion": "", "reward": float(v), "correct": v}
                                    for i, v in enumerate(answers)])
    summary = {"model": "tiny", "task": "arithmetic", "smoke_run": smoke, "heldout_prompts": N_PROMPTS, "stages": stages}
    attach_statistics(summary, root)  # as the pipeline does: intervals and paired tests from the heldout files
    if seeds:
        write_seed_runs(root, summary)
    (root / "pipeline_summary.json").write_text(json.dumps(summary))
    rng = random.Random(9)
    points = []
    for method, scale in (("bon", 1.0), ("rl", 0.6)):
        for step, kl in enumerate((0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)):
            d = kl ** 0.5
            points.append({"kl": kl, "proxy_reward": d * scale + rng.random() / 100,
                           "gold_reward": d * (1.5 - 0.5 * d) * scale, "method": method, "step": step * 10})
    (root / "overoptimization.json").write_text(json.dumps(points))
    warnings = [{"step": 7, "stage": "ppo", "kind": "loss_spike", "message": "loss jumped 1.5 → check lr"},
                {"step": 10, "stage": "ppo", "kind": "skipped_step", "message": "non-finite gradient; update skipped"},
                {"step": 15, "stage": "grpo", "kind": "kl_blowup", "message": "kl > 0.4 <stop?>"}]
    (root / "warnings.jsonl").write_text("".join(json.dumps(w) + "\n" for w in warnings))
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A five-stage pipeline with its report built once (plotting dominates the time); tests only read it."""
    root = make_pipeline(tmp_path_factory.mktemp("report") / "pipe")
    assert build_report(root) == root / "report.html"
    return root


# ---------- parsing the report back ----------

class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.sections, self.images, self.scripts = {}, [], [], 0
        self._table, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse_html(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text())
    return parser


def md_tables(text: str) -> list[list[list[str]]]:
    """Each Markdown table as rows of cells (header first, separator dropped), escapes undone."""
    tables, current = [], None
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [html.unescape(c.strip().replace("<br>", "\n").replace("\\|", "|").replace("\\\\", "\\"))
                     for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-"} for c in cells):
                current = current if current is not None else []
                current.append(cells)
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def md_table(text: str, first_header: list[str]) -> list[list[str]]:
    return next(t for t in md_tables(text) if t[0][: len(first_header)] == first_header)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_logged(rows, key):
    for row in reversed(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return value
    return None


# ---------- tests ----------

def test_every_section_present_images_inlined_no_script(pipeline):
    path = pipeline / "report.html"
    page = parse_html(path)
    assert page.sections == list(SECTIONS)
    assert page.scripts == 0 and "http://" not in path.read_text() and "https://" not in path.read_text()
    # the summary's figure + 5 stages' curves + frontier + over-optimization, every one a real PNG inside the page
    assert len(page.images) == 8
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    md = (pipeline / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) == 8 and all((pipeline / name).read_bytes()[:4] == b"\x89PNG" for name in linked)
    for title in ("## Training curves", "## Comparison", "## Reward vs KL frontier", "## Held-out prompts",
                  "## Reward over-optimization", "## Failure-mode warnings"):
        assert title in md


def test_numbers_equal_the_metrics_files(pipeline):
    page = parse_html(pipeline / "report.html")
    md = (pipeline / "report.md").read_text()
    html_rows = page.tables["final-values"][1:]
    assert html_rows == md_table(md, ["stage", "metric", "value", "step"])[1:]
    checked = set()
    for stage, metric, value, _ in html_rows:
        expected = last_logged(read_rows(pipeline / stage / "metrics.jsonl"), metric)
        assert float(value) == expected, (stage, metric)  # exact: the printed text round-trips to the logged float
        checked.add((stage, metric))
    assert {("ppo", "kl/seq_k1_sum"), ("ppo", "reward"), ("dpo", "rewards/margins"), ("rm", "eval/accuracy"),
            ("grpo", "eval/accuracy"), ("sft", "eval/loss"), ("ppo", "clip_ratio")} <= checked


def test_comparison_table_equals_summary_with_documented_fallback(pipeline):
    page = parse_html(pipeline / "report.html")
    md = (pipeline / "report.md").read_text()
    table = page.tables["comparison"]
    assert table == md_table(md, ["stage", "command", "heldout_accuracy"])
    header, rows = table[0], {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    summary = {s["name"]: s for s in json.loads((pipeline / "pipeline_summary.json").read_text())["stages"]}
    for name, entry in summary.items():
        for field in header[2:]:
            if entry[field] is not None:
                assert type(entry[field])(rows[name][field]) == entry[field], (name, field)
    grpo_rows = read_rows(pipeline / "grpo" / "metrics.jsonl")
    assert float(rows["grpo"]["kl_to_ref"]) == last_logged(grpo_rows, "kl/seq_k1_sum")
    assert "except (from metrics.jsonl) grpo kl_to_ref: metrics.jsonl last `kl/seq_k1_sum`." in (pipeline / "report.md").read_text()


def test_samples_overoptimization_warnings_tables(pipeline):
    page = parse_html(pipeline / "report.html")
    md = (pipeline / "report.md").read_text()
    samples = page.tables["samples"]
    assert samples == md_table(md, ["stage", "prompt", "before", "after"])
    assert ["dpo", "What is 2+3?", "dpo before | 4", "dpo after\n5"] in samples
    assert ["ppo", "12*3 = ?", "<b>37</b>", "36"] in samples  # escaped as text, not markup
    assert "&lt;b&gt;37&lt;/b&gt;" in md and "<b>" not in md and "<b>" not in (pipeline / "report.html").read_text()
    points = json.loads((pipeline / "overoptimization.json").read_text())
    peaks = {r[0]: r for r in page.tables["overoptimization"][1:]}
    for method in ("bon", "rl"):
        best = max((p for p in points if p["method"] == method), key=lambda p: p["gold_reward"])
        assert best["kl"] == 2.0  # gold = d(1.5 − 0.5 d) peaks at d = 1.5, nearest grid point KL = 2
        assert [int(peaks[method][1]), float(peaks[method][2]), float(peaks[method][3]), float(peaks[method][4])] == \
               [best["step"], best["kl"], best["gold_reward"], best["proxy_reward"]]
    warnings = page.tables["warnings"]
    assert warnings[1:] == [["ppo", "7", "loss_spike", "loss jumped 1.5 → check lr"],
                            ["ppo", "10", "skipped_step", "non-finite gradient; update skipped"],
                            ["grpo", "15", "kl_blowup", "kl > 0.4 <stop?>"]]
    frontier = {(r[0], r[1]): r for r in page.tables["frontier"][1:]}
    ppo_rows = read_rows(pipeline / "ppo" / "metrics.jsonl")
    assert float(frontier[("ppo", "kl, reward over steps")][2]) == last_logged(ppo_rows, "kl/seq_k1_sum")
    assert ("sft", "final (kl_to_ref, mean_reward)") in frontier
    # grpo's kl_to_ref is null in the summary: its final point uses the same fallback as the comparison table
    assert float(frontier[("grpo", "final (kl_to_ref, mean_reward)")][2]) == last_logged(read_rows(pipeline / "grpo" / "metrics.jsonl"), "kl/seq_k1_sum")


def test_training_samples_first_and_last_steps_side_by_side(pipeline):
    page = parse_html(pipeline / "report.html")
    table = page.tables["rollout-samples-grpo"]
    assert table == md_table((pipeline / "report.md").read_text(), ["step 1: prompt"])
    assert table[0] == ["step 1: prompt", "completion", "scores", "step 20: prompt", "completion", "scores"]
    assert table[1] == ["q1", "c1.0", "numeric 0 · total 0 · adv -0.5 · KL 0.0125",
                        "q20", "c20.0", "numeric 0 · total 0 · adv -0.5 · KL 0.25"]
    assert table[2][1] == "c1.1" and table[2][4] == "c20.1" and len(table) == 3
    assert not any(k.startswith("rollout-samples-") and k != "rollout-samples-grpo" for k in page.tables)


def test_claims_confirmed_by_this_pipeline(pipeline):
    page = parse_html(pipeline / "report.html")
    claims = {r[0]: r for r in page.tables["claims"][1:]}
    assert page.tables["claims"][0][:4] == ["claim", "PPO", "DPO", "GRPO"]
    assert claims["models in memory"][1:4] == ["4", "2", "3"]
    assert {name: row[5] for name, row in claims.items()} == {"models in memory": CONFIRMED, "compute": CONFIRMED,
                                                             "stability": CONFIRMED, "GRPO best on verifiable tasks": CONFIRMED,
                                                             "DPO close to PPO": CONFIRMED,
                                                             "GRPO ~50 % less memory than PPO": CONFIRMED,
                                                             "reward hacking without a KL penalty": NOT_MEASURED}
    assert claims["GRPO ~50 % less memory than PPO"][4] == \
        "ppo: 4.00 GB, 4 models, grpo: 2.20 GB, 3 models: GRPO 45 % less (claimed 50 ± 15 %)"
    # grpo vs ppo: grpo alone right on 115-139 and 2-4 (28), ppo alone on none: exact p = 2 / 2^28
    assert "grpo − ppo: +10.9 pts" in claims["GRPO best on verifiable tasks"][4]
    assert "(28 right only by grpo, 0 only by ppo, of 256 prompts)" in claims["GRPO best on verifiable tasks"][4]
    assert "dpo − ppo: -0.4 pts" in claims["DPO close to PPO"][4]
    # ppo's final accuracy 0.5 ± 0.2 over 3 seeds (std 20 pts), grpo's ± 0.01: ppo the less stable
    assert "ppo: final accuracy 50.0 % mean, 30.0–70.0 % (min–max), std 20.0 pts over 3 seeds;" in claims["stability"][4]
    assert "grpo: final accuracy" in claims["stability"][4] and "std 1.0 pts over 3 seeds" in claims["stability"][4]
    seeds = {r[0]: r for r in page.tables["seeds"][1:]}
    assert seeds["ppo"][2:7] == ["3", "50.0 %", "30.0 %", "70.0 %", "20.0"] and set(seeds) == {"ppo", "grpo"}
    assert not any(name.endswith(("_seed1", "_seed2")) for name in claims)  # seed runs are not stages
    assert [r[0] for r in page.tables["stages"][1:]] == ["sft", "rm", "dpo", "ppo", "grpo"]


def test_claims_not_confirmed_and_not_measured(tmp_path):
    slow_dpo = make_pipeline(tmp_path / "slow", dpo_wall=400.0)
    verdicts = {c.name: c.verdict for c in check_claims(load_run(slow_dpo).stages)}
    assert verdicts["compute"] == NOT_CONFIRMED and verdicts["models in memory"] == CONFIRMED
    unseeded = {c.name: c for c in check_claims(load_run(make_pipeline(tmp_path / "one-seed", seeds=False)).stages)}
    assert unseeded["stability"].verdict == NOT_SETTLED
    assert unseeded["stability"].measured == "not settled: needs --seeds ≥ 2"
    root = make_pipeline(tmp_path / "steady-ppo", seeds=False)
    summary = json.loads((root / "pipeline_summary.json").read_text())
    write_seed_runs(root, summary, ppo_delta=0.01, grpo_delta=0.2)
    (root / "pipeline_summary.json").write_text(json.dumps(summary))
    assert {c.name: c.verdict for c in check_claims(load_run(root).stages)}["stability"] == NOT_CONFIRMED
    single = write_run(tmp_path / "one", "dpo", _rows("dpo", 8, 0))
    verdicts = {c.name: c.verdict for c in check_claims(load_run(single).stages)}
    assert verdicts.pop("stability") == NOT_SETTLED and set(verdicts.values()) == {NOT_MEASURED}


def test_headline_table_rounds_the_summary_and_leads_the_report(pipeline, capsys):
    """The first section: verdicts, then the comparison rounded for people; each cell is the summary's number."""
    from posttrain.pipeline import print_summary
    from posttrain.report.stats import mcnemar, wilson

    page = parse_html(pipeline / "report.html")
    assert page.sections[0] == "summary"
    md = (pipeline / "report.md").read_text()
    assert md.index("## Summary") < md.index("## Comparison") < md.index("## Training curves")
    table = page.tables["headline"]
    assert table == md_table(md, ["stage", "command", "held-out accuracy"])
    rows = {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    summary = {s["name"]: s for s in json.loads((pipeline / "pipeline_summary.json").read_text())["stages"]}
    answers = _outcomes()
    for name, entry in summary.items():
        row = rows[name]
        assert row["time"] == f"{entry['wall_time_s'] / 60:.1f} min" and row["memory"] == f"{entry['peak_mem_gb']:.2f} GB"
        if name not in answers:
            assert row["95 % interval"] == "—" and row["p vs SFT"] == "—"
            continue
        k = sum(answers[name])
        lo, hi = wilson(k, N_PROMPTS)
        assert row["held-out accuracy"] == f"{100 * k / N_PROMPTS:.1f} % ± {100 * (hi - lo) / 2:.1f}"
        assert row["95 % interval"] == f"{100 * lo:.1f}–{100 * hi:.1f} %"
        if name != "sft":
            b = sum(s and not x for s, x in zip(answers["sft"], answers[name]))
            c = sum(x and not s for s, x in zip(answers["sft"], answers[name]))
            assert row["right only: SFT / stage"] == f"{b} / {c}"
            p = mcnemar(b, c).p
            assert row["p vs SFT"] == ("< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}")
            assert row["vs SFT (pts, 95 % interval)"].startswith(f"{100 * (c - b) / N_PROMPTS:+.1f} [")
    assert rows["grpo"]["p vs SFT"] == "< 0.001" and rows["ppo"]["p vs SFT"] == "1.00"
    verdicts = {r[0]: r[1] for r in page.tables["verdicts"][1:]}
    assert verdicts == {r[0]: r[5] for r in page.tables["claims"][1:]}
    capsys.readouterr()
    print_summary(pipeline)  # the terminal says the same verdicts and numbers
    out = capsys.readouterr().out
    for claim, verdict in verdicts.items():
        assert f"{claim}: {verdict.upper()} — " in out
    assert rows["grpo"]["held-out accuracy"] in out and "SMOKE RUN" not in out


def test_not_settled_and_smoke_run(tmp_path, capsys):
    """GRPO a few prompts better than PPO: too few for the paired test to call it a difference."""
    from posttrain.pipeline import print_summary

    root = make_pipeline(tmp_path / "pipe", grpo_gain=7, smoke=True)  # grpo vs ppo: 5 right only by grpo, 0 by ppo: p = .0625
    verdicts = {c.name: c.verdict for c in check_claims(load_run(root).stages)}
    assert verdicts["GRPO best on verifiable tasks"] == NOT_SETTLED and verdicts["DPO close to PPO"] == CONFIRMED
    build_report(root)
    assert "SMOKE RUN" in (root / "report.md").read_text().split("## Comparison")[0]
    print_summary(root)
    assert capsys.readouterr().out.startswith("SMOKE RUN")


def test_spikes_spread_and_order_rule_by_hand():
    from posttrain.report.seeds import run_spikes, spike_steps, spread

    # rolling median of the 5 before; scale floor 0.01 x median|window| (a linear decay has MAD ~0)
    assert spike_steps([1.0, 0.9, 0.8, 0.7, 2.0, 0.6, 0.5, 0.4], upward=True) == [4]
    assert spike_steps([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], upward=True) == []
    # window [1, .9, .8, .7, .62]: median .8, MAD .1, scale .148: .5 is .3 below (< 4 x .148), 2.0 is 1.2 above
    assert spike_steps([1.0, 0.9, 0.8, 0.7, 0.62, 0.5], upward=True) == []
    assert spike_steps([1.0, 0.9, 0.8, 0.7, 0.62, 2.0], upward=True) == [5]
    assert spike_steps([0.5, 0.5, 0.5, 0.5, 0.0], upward=False) == [4]  # a reward collapse
    assert spike_steps([0.5, 0.5, 0.5, 0.5, 1.0], upward=False) == []  # a reward rise is not one
    rows = [{"step": i, "loss": v, "reward": 0.5} for i, v in enumerate([1.0, 0.9, 0.8, 0.7, 2.0, 0.6, 0.5, 0.4], 1)]
    rows[6]["reward"] = 0.0
    rows[4]["reward"] = 0.0  # the loss spike's step: counted once
    assert run_spikes(rows + [{"step": 8, "eval/accuracy": 0.5, "final": True}]) == 2
    s = spread([0.25, 0.5, 0.75])
    assert (s["n"], s["mean"], s["min"], s["max"]) == (3, 0.5, 0.25, 0.75) and s["std"] == pytest.approx(0.25)
    claimed = {"ppo": 3, "dpo": 1, "grpo": 2}
    assert order_verdict(claimed, {"ppo": 9.0, "dpo": 1.0, "grpo": 5.0}) == CONFIRMED
    assert order_verdict(claimed, {"ppo": 9.0, "dpo": 9.0}) == NOT_CONFIRMED  # a tie the claim does not make
    assert order_verdict(claimed, {"ppo": 1.0, "grpo": 2.0}) == NOT_CONFIRMED
    assert order_verdict(claimed, {"ppo": 9.0}) == NOT_MEASURED


def test_single_run_dir_without_optional_parts(tmp_path):
    run = tmp_path / "run"
    rows = _rows("grpo", 6, 3)[:-1]  # no final row, no summary, no samples, no warnings, no over-optimization
    write_run(run, "grpo", rows)
    page = parse_html(build_report(run))
    assert page.sections == list(SECTIONS)
    text = (run / "report.html").read_text()
    for note in ("no `samples`", "no overoptimization.json", "No warnings.jsonl"):
        assert note in text
    row = dict(zip(*page.tables["comparison"][:2]))
    assert row["stage"] == "run" and row["command"] == "grpo"
    assert float(row["wall_time_s"]) == sum(r["step_time_s"] for r in rows)
    assert float(row["peak_mem_gb"]) == max(r["peak_mem_gb"] for r in rows)
    assert float(row["tokens_per_s"]) == sorted(r["tokens_per_s"] for r in rows)[2]  # lower median of 6
    assert float(row["kl_to_ref"]) == rows[-1]["kl/seq_k1_sum"] and row["models_in_memory"] == "—"
    assert len(page.images) == 2  # curves + the kl/reward trajectory


def test_summary_without_stage_dirs_and_a_stage_it_does_not_name(tmp_path):
    """A pipeline still running: the summary names a stage whose directory is gone, a config-only stage exists,
    and a stage directory is not in the summary yet."""
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "pipeline_summary.json").write_text(json.dumps({"stages": [
        {"name": "sft", "command": "sft", "wall_time_s": 3.5, "models_in_memory": 1},
        {"name": "dpo", "command": "dpo", "wall_time_s": 7.25, "models_in_memory": 2}]}))
    (root / "dpo").mkdir()
    (root / "dpo" / "config.yaml").write_text("command: dpo\n")
    write_run(root / "grpo", "grpo", _rows("grpo", 3, 0))
    run = load_run(root)
    assert [(s.name, s.command, len(s.rows)) for s in run.stages] == [("sft", "sft", 0), ("dpo", "dpo", 0), ("grpo", "grpo", 4)]
    page = parse_html(build_report(root))
    assert page.sections == list(SECTIONS)
    assert [r[:6] for r in page.tables["comparison"][1:3]] == [["sft", "sft", "—", "—", "—", "3.5"],
                                                               ["dpo", "dpo", "—", "—", "—", "7.25"]]
    claims = {r[0]: r[5] for r in page.tables["claims"][1:]}
    assert claims == {"models in memory": NOT_MEASURED, "compute": NOT_CONFIRMED, "stability": NOT_SETTLED,
                      "GRPO best on verifiable tasks": NOT_MEASURED, "DPO close to PPO": NOT_MEASURED,
                      "GRPO ~50 % less memory than PPO": NOT_MEASURED, "reward hacking without a KL penalty": NOT_MEASURED}
    assert "sft: no metrics logged" in (root / "report.md").read_text()


def test_cli_report(tmp_path, capsys):
    run = write_run(tmp_path / "run", "sft", _rows("sft", 5, 0))
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.html")
    assert (tmp_path / "out" / "report.md").exists() and not (run / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_headless_chromium_renders_report(pipeline, tmp_path):
    import numpy as np
    from PIL import Image

    path, shot = pipeline / "report.html", tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--screenshot={shot}", "--window-size=1200,3000", path.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []  # no JS errors, no blocked fetches (the page's CSP would log those)
    assert shot.stat().st_size > 20_000
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    assert image.getcolors(maxcolors=256) is None  # more than 256 colours: text, tables and plots, not a blank page
    assert np.asarray(image).std() > 10


def test_close_needs_enough_prompts():
    """No discordant pair among 8 prompts: the bootstrap interval is [0, 0], but 8 prompts cannot show closeness
    (the disagreement rate could be up to z²/(8 + z²) = 32 %); among 256 (bound 1.5 %) they can."""
    from posttrain.report.claims import dpo_close_to_ppo
    from posttrain.report.load import Stage

    def stages(n):
        same = {i: int(i % 2) for i in range(n)}
        return [Stage("ppo", "ppo", None, outcomes=same), Stage("dpo", "dpo", None, outcomes=dict(same))]

    assert dpo_close_to_ppo(stages(8)).verdict == NOT_SETTLED
    assert dpo_close_to_ppo(stages(256)).verdict == CONFIRMED
