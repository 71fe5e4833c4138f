"""`posttrain pipeline CONFIG` and `posttrain demo`: stages declared in YAML, run one after another.

Each stage runs in its own process (so its peak memory and wall time are its own), starts from the model of
an earlier stage (`from: sft`), may name an earlier stage's model as its reward model (`reward_model: rm`),
may take an earlier `pairs` stage's preference pairs as its data (`data_from: pairs`: its
pairs.jsonl to train on, eval_pairs.jsonl held out), and is skipped when its `DONE` marker exists; an interrupted stage resumes from its newest checkpoint.
After each stage the pipeline measures it on held-out prompts and writes `pipeline_summary.json`, then the
report (`posttrain.report`).

    output_dir: runs/demo
    model: smollm2
    data: task:arithmetic
    eval: {prompts: 64, max_new_tokens: 48, rewards: [numeric]}
    defaults: {model.autocast: bf16}          # dotted overrides for every stage
    stages:
      - {name: sft, command: sft, overrides: {train.max_steps: 100}}
      - {name: rm, command: rm, from: sft}
      - {name: ppo, command: ppo, from: sft, reward_model: rm}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.config import ConfigError

ANALYSIS_COMMANDS = ("overopt",)
DATA_COMMANDS = ("pairs",)  # stages that write data for later ones (`data_from`) and train no model
SEED_COMMANDS = ("ppo", "grpo", "online-dpo", "distill")  # the RL stages `--seeds N` repeats
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # packaged with posttrain


@dataclass
class Stage:
    name: str
    command: str
    start: str | None = None  # earlier stage whose final/ model this one starts from
    reward_model: str | None = None  # earlier stage whose final/ is the reward model
    data: str | None = None
    overrides: dict = field(default_factory=dict)
    data_from: str | None = None  # earlier `pairs` stage whose pairs.jsonl / eval_pairs.jsonl are this stage's data


@dataclass
class Pipeline:
    output_dir: str
    model: str
    data: str
    stages: list[Stage]
    defaults: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    smoke: bool = False  # a run too short for its accuracies to mean anything (demo --quick): said in every output


def load_pipeline(path: str | Path, overrides: dict | None = None) -> Pipeline:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    raw.update(overrides or {})
    known = {"output_dir", "model", "data", "stages", "defaults", "eval", "smoke"}
    if unknown := set(raw) - known:
        raise ConfigError(f"{path}: unknown pipeline keys {sorted(unknown)}; expected {sorted(known)}")
    stages, names = [], {}
    for i, s in enumerate(raw.get("stages") or []):
        extra = set(s) - {"name", "command", "from", "reward_model", "data", "data_from", "overrides"}
        if extra or "command" not in s:
            raise ConfigError(f"{path}: stage {i}: needs 'command'; unknown keys {sorted(extra)}")
        stage = Stage(s.get("name", s["command"]), s["command"], s.get("from"), s.get("reward_model"), s.get("data"),
                      s.get("overrides") or {}, s.get("data_from"))
        for ref in (stage.start, stage.reward_model, stage.data_from):
            if ref is not None and ref not in names:
                raise ConfigError(f"{path}: stage {stage.name!r} refers to {ref!r}, which is not an earlier stage")
        if stage.data_from is not None and names[stage.data_from] not in DATA_COMMANDS:
            raise ConfigError(f"{path}: stage {stage.name!r}: data_from {stage.data_from!r} is a "
                              f"{names[stage.data_from]!r} stage; it must be one of {list(DATA_COMMANDS)}")
        names[stage.name] = stage.command
        stages.append(stage)
    if not stages:
        raise ConfigError(f"{path}: no stages")
    return Pipeline(raw.get("output_dir", "runs/pipeline"), raw.get("model", "smollm2"), raw.get("data", "task:arithmetic"),
                    stages, raw.get("defaults") or {}, raw.get("eval") or {}, bool(raw.get("smoke", False)))


def stage_argv(p: Pipeline, stage: Stage, out: Path) -> list[str]:
    """The `posttrain COMMAND key=value ...` line of a stage (written to the stage dir for reproduction)."""
    model = str(out / stage.start / "final") if stage.start else p.model
    if stage.command in DATA_COMMANDS:  # not a training command: its own flags, no training defaults
        flags = {"model": model, "data": stage.data or p.data, "output_dir": str(out / stage.name), **stage.overrides}
        return [stage.command] + [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    pairs = {"model.name_or_path": model, "data.path": stage.data or p.data, "train.output_dir": str(out / stage.name),
             "train.resume": True, **p.defaults}
    if stage.data_from:  # every held-out pair is evaluated: they are few and they are the point
        source = out / stage.data_from
        pairs.update({"data.path": str(source / "pairs.jsonl"), "data.eval_path": str(source / "eval_pairs.jsonl"),
                      "data.num_eval_examples": 100_000})
    pairs.update(stage.overrides)
    if stage.reward_model:  # the key under its name for this command (algo.reward.model for the online ones)
        from posttrain.config import current_key
        from posttrain.train import registry

        registry.get(stage.command)  # its module registers the command's renamed keys
        pairs[current_key("algo.reward_model", stage.command)] = str(out / stage.reward_model / "final")
    return [stage.command] + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in pairs.items()]


def run_stage(p: Pipeline, stage: Stage, out: Path) -> dict:
    """Run one stage in a child process; returns its wall time. Skipped when already DONE."""
    stage_dir = out / stage.name
    if (stage_dir / "DONE").exists():
        print(f"[pipeline] {stage.name}: done already, skipped")
        return json.loads((stage_dir / "DONE").read_text())
    stage_dir.mkdir(parents=True, exist_ok=True)
    argv = stage_argv(p, stage, out)
    (stage_dir / "command.txt").write_text("posttrain " + " ".join(argv) + "\n")
    print(f"[pipeline] {stage.name}: posttrain {' '.join(argv[:1])} ... (log: {stage_dir / 'stage.log'})", flush=True)
    start = time.perf_counter()
    with open(stage_dir / "stage.log", "a") as log:
        code = subprocess.call([sys.executable, "-m", "posttrain.cli", *argv], stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"[pipeline] stage {stage.name!r} failed (exit {code}); see {stage_dir / 'stage.log'}. "
                         "Re-run the pipeline to resume it.")
    info = {"wall_time_s": time.perf_counter() - start}
    (stage_dir / "DONE").write_text(json.dumps(info))
    return info


def _metrics_summary(stage_dir: Path) -> dict:
    from posttrain.metrics import read_metrics

    rows = read_metrics(stage_dir) if (stage_dir / "metrics.jsonl").exists() else []
    train = [r for r in rows if "loss" in r]
    pick = lambda key, f: f([r[key] for r in train if isinstance(r.get(key), (int, float))] or [float("nan")])  # noqa: E731
    first = next((r for r in rows if "params/trainable" in r), {})
    return {
        "peak_mem_gb": pick("peak_mem_gb", max), "tokens_per_s": pick("tokens_per_s", lambda v: sum(v) / len(v)),
        "models_in_memory": pick("models_in_memory", max) if any("models_in_memory" in r for r in train) else 1,
        "trainable_params": first.get("params/trainable"), "steps": len(train),
        "final_eval": {k: v for k, v in rows[-1].items() if k.startswith("eval/")} if rows else {},
    }


def measure_stage(p: Pipeline, stage: Stage | None, out: Path, records) -> dict:
    """Pipeline summary entry for a stage (or for the starting model when stage is None). The per-prompt
    outcomes go to `heldout_<stage>.jsonl` (the paired tests' input), not into the summary."""
    from posttrain.stage_eval import evaluate_stage

    ev = p.eval
    rewards = list(ev.get("rewards", ["numeric"]))
    if stage is None:
        path = _resolve(p.model)
        res = _keep_outcomes(out, "base", evaluate_stage(path, None, records, rewards, max_new_tokens=ev.get("max_new_tokens", 48)))
        return {"name": "base", "command": "none", "started_from": None, "path": path, **res}
    stage_dir = out / stage.name
    entry = {"name": stage.name, "command": stage.command, "started_from": stage.start or "base",
             **json.loads((stage_dir / "DONE").read_text()), **_metrics_summary(stage_dir)}
    if stage.command == "rm":
        entry["heldout_accuracy"] = entry["final_eval"].get("eval/accuracy")
        return entry
    if stage.command in ANALYSIS_COMMANDS:  # measures other stages; trains nothing
        return entry
    if stage.command in DATA_COMMANDS:
        return {**entry, "pairs": json.loads((stage_dir / "pairs_summary.json").read_text())}
    start = str(out / stage.start / "final") if stage.start else _resolve(p.model)
    res = evaluate_stage(str(stage_dir / "final"), start, records, rewards, max_new_tokens=ev.get("max_new_tokens", 48),
                         kl_prompts=ev.get("kl_prompts", 32))
    return {**entry, **_keep_outcomes(out, stage.name, res)}


def _keep_outcomes(out: Path, name: str, res: dict) -> dict:
    from posttrain.report.heldout import write_outcomes

    write_outcomes(out, name, res.pop("outcomes", []))
    return res


def _resolve(model: str) -> str:
    from posttrain.models.loading import resolve_model_path

    return resolve_model_path(model)


def seed_stages(p: Pipeline, seeds: int) -> list[tuple[Stage, Stage, int]]:
    """(seed run, its stage, seed) for seeds 1 … seeds−1 of every RL stage: the same stage with `train.seed = k` in
    `<stage>_seed<k>/` (seed 0 is the stage itself)."""
    return [(Stage(f"{s.name}_seed{k}", s.command, s.start, s.reward_model, s.data, {**s.overrides, "train.seed": k}, s.data_from), s, k)
            for s in p.stages if s.command in SEED_COMMANDS for k in range(1, seeds)]


def run_pipeline(p: Pipeline, seeds: int = 1) -> Path:
    from posttrain.data.formats import load_dataset_records
    from posttrain.pipeline_progress import Progress, planned_steps
    from posttrain.report.heldout import attach_statistics

    out = Path(p.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "pipeline_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"stages": []}
    done = {s["name"] for s in summary["stages"]}
    records = load_dataset_records(p.data, "prompts", "test", n=p.eval.get("prompts", 64))[: p.eval.get("prompts", 64)]
    summary["smoke_run"] = p.smoke
    summary["heldout_prompts"] = len(records)  # every stage answers these same prompts: the tests are paired
    if p.smoke:
        from posttrain.report.summary import SMOKE

        print(f"[pipeline] {SMOKE}", flush=True)
    start = time.perf_counter()
    if "base" not in done:
        summary["stages"].append(measure_stage(p, None, out, records))
    repeats = seed_stages(p, seeds)
    progress = Progress([(s.name, planned_steps(p.defaults, s.overrides)) for s in p.stages + [r for r, _, _ in repeats]])
    for stage in p.stages:
        print(progress.line(stage.name, stage.command), flush=True)
        began = time.perf_counter()
        info = run_stage(p, stage, out)
        if stage.name not in done:
            summary["stages"].append(measure_stage(p, stage, out, records))
        progress.finished(stage.name, max(info["wall_time_s"], time.perf_counter() - began))
        attach_statistics(summary, out)
        summary_path.write_text(json.dumps(summary, indent=1, default=str))
    for repeat, _, _ in repeats:  # after every main stage: the table's answer comes first
        print(progress.line(repeat.name, repeat.command), flush=True)
        progress.finished(repeat.name, run_stage(p, repeat, out)["wall_time_s"])
    if repeats:
        runs = {s.name: [(0, s.name)] for _, s, _ in repeats}
        for repeat, stage, k in repeats:
            runs[stage.name].append((k, repeat.name))
        summary["seeds"] = {"n": seeds, "runs": runs}
    summary["wall_time_s"] = summary.get("wall_time_s", 0.0) + time.perf_counter() - start
    summary_path.write_text(json.dumps(summary, indent=1, default=str))
    _attach_samples(summary)
    summary_path.write_text(json.dumps(summary, indent=1, default=str))
    return out


def _attach_samples(summary: dict) -> None:
    """`samples` per stage: the same held-out prompts answered by the stage's start model and by the stage."""
    by_name = {s["name"]: s for s in summary["stages"]}
    for s in summary["stages"]:
        before = by_name.get(s.get("started_from") or "", {})
        if "answers" in s and "answers" in before:
            s["samples"] = [{"prompt": q, "before": b, "after": a} for q, b, a in zip(s["prompts"], before["answers"], s["answers"])]


def print_summary(out: Path) -> None:
    """The report's first section as text: smoke note, the claims' verdicts, the rounded comparison table."""
    from posttrain.report.load import load_run
    from posttrain.report.summary import terminal_text

    print(terminal_text(load_run(out)))


def _finish(out: Path) -> int:
    try:
        from posttrain.report import build_report

        path = build_report(out)
        print(f"[pipeline] report: {path}")
    except ImportError as exc:  # the report module is optional for a bare pipeline run
        print(f"[pipeline] report not built: {exc}")
    print_summary(out)
    return 0


def add_arguments(p) -> None:
    p.add_argument("config", help="pipeline YAML")
    p.add_argument("--output-dir", dest="output_dir")
    _seeds_argument(p)
    p.set_defaults(func=lambda a: _finish(run_pipeline(load_pipeline(a.config, {"output_dir": a.output_dir} if a.output_dir else None),
                                                       a.seeds)))


def _seeds_argument(p) -> None:
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help=f"run each RL stage ({', '.join(SEED_COMMANDS)}) over N seeds (seed 0 is the main run; the "
                        "others in OUTPUT_DIR/<stage>_seed<k>/): the report gives the spread of final accuracy and "
                        "the spikes per algorithm, and the stability claim is judged from them (it needs N >= 2)")


def add_demo_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="the under-5-minute variant")
    p.add_argument("--overopt", action="store_true", help="the reward over-optimization experiment (configs/overopt.yaml)")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--model", help="start model (default: the bundled SmolLM2-135M-Instruct)")
    _seeds_argument(p)

    def demo(a) -> int:
        config = CONFIG_DIR / ("overopt.yaml" if a.overopt else "demo_quick.yaml" if a.quick else "demo.yaml")
        over = {k: v for k, v in {"output_dir": a.output_dir, "model": a.model}.items() if v}
        return _finish(run_pipeline(load_pipeline(config, over), a.seeds))

    p.set_defaults(func=demo)
