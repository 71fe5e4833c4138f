"""Reading run directories and pipeline directories for the report (the README's contract). No plotting, no HTML.

A run directory holds `config.yaml` (its `command` names the algorithm), `metrics.jsonl` (one row per logged
step; the last row may carry `"final": true` and `eval/...` keys) and `final/`. A pipeline directory holds one
run directory per stage plus `pipeline_summary.json`:

    {
      "stages": [                          # in the order the stages ran
        {
          "name": "dpo",                   # the stage's sub-directory (or give "run_dir", relative to the pipeline dir)
          "command": "dpo",                # sft | rm | dpo | kto | ppo | grpo | online-dpo
          "started_from": "sft/final",     # the policy (or base model) the stage started from
          "wall_time_s": 41.2,             # wall-clock seconds of the whole stage, model loading included
          "peak_mem_gb": 3.1,              # peak accelerator memory (RSS high-water mark on CPU), GiB
          "models_in_memory": 2,           # model copies held at once: policy, reference, reward model, critic
          "trainable_params": 1234567,     # int
          "tokens_per_s": 812.5,           # training throughput of the stage
          "heldout_accuracy": 0.62,        # on the pipeline's held-out prompts after the stage
          "mean_reward": 0.58,             # mean reward on the held-out prompts after the stage
          "kl_to_ref": 0.031,              # KL(policy ‖ reference) on the held-out prompts after the stage
          "samples": [{"prompt": "...", "before": "...", "after": "..."}]   # same prompts, before/after
        }
      ],
      "seeds": {"n": 3, "runs": {"grpo": [[0, "grpo"], [1, "grpo_seed1"], [2, "grpo_seed2"]]}},  # --seeds N:
                                           # each RL stage's runs per seed (their directories are not stages)
      ...                                  # any other top-level scalars (model, task, ...) go in the header
    }

Every field except `name` may be absent or null, meaning "not measured". The pipeline adds the held-out
statistics (`heldout_n`, `heldout_correct`, `heldout_accuracy_ci`, `vs_baseline`: report/heldout.py) and writes
`heldout_<stage>.jsonl` beside the summary (per-prompt 0/1 outcomes). An online stage's directory may hold
`samples.jsonl` (train/samples.py; report/rollout_samples.py reads it). Optional files, at the top level or
in a stage directory: `overoptimization.json` (a list of {kl, proxy_reward, gold_reward, method, step}) and
`warnings.jsonl` (rows {step, stage, kind, message}).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SUMMARY_FILE = "pipeline_summary.json"
OVEROPT_FILE = "overoptimization.json"
WARNINGS_FILE = "warnings.jsonl"

# Fields of a stage in the comparison table, in column order.
MEASURED_FIELDS = (
    "heldout_accuracy", "mean_reward", "kl_to_ref", "wall_time_s", "peak_mem_gb",
    "models_in_memory", "trainable_params", "tokens_per_s",
)


@dataclass
class Stage:
    name: str
    command: str
    run_dir: Path | None
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl, in file order
    summary: dict = field(default_factory=dict)  # this stage's entry of pipeline_summary.json
    config: dict = field(default_factory=dict)
    outcomes: dict | None = None  # heldout_<name>.jsonl of a pipeline: {prompt index: 1 | 0 | None}; None: no file
    seed_runs: list = field(default_factory=list)  # [(seed, metrics rows)] over `--seeds` (seed 0: this run); report/seeds.py


@dataclass
class Run:
    root: Path
    stages: list[Stage]
    header: dict  # top-level scalars of pipeline_summary.json
    overoptimization: list[dict]
    warnings: list[dict]


def fmt(value) -> str:
    """Exact text of a logged value: floats by their shortest round-trip repr, so parsing gives the same float."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
    return rows


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() or (path / "config.yaml").exists()


def _load_stage(name: str, run_dir: Path | None, summary: dict) -> Stage:
    rows = read_jsonl(run_dir / "metrics.jsonl") if run_dir and (run_dir / "metrics.jsonl").exists() else []
    config = _read_yaml(run_dir / "config.yaml") if run_dir else {}
    command = summary.get("command") or config.get("command") or name
    return Stage(name=name, command=str(command), run_dir=run_dir, rows=rows, summary=summary, config=config)


def _summary_stages(root: Path) -> tuple[list[dict], dict]:
    path = root / SUMMARY_FILE
    if not path.exists():
        return [], {}
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return [e for e in data if isinstance(e, dict) and e.get("name")], {}
    entries = data.get("stages", [])
    header = {k: v for k, v in data.items() if k != "stages" and not isinstance(v, (dict, list))}
    return [e for e in entries if isinstance(e, dict) and e.get("name")], header


def _stages(root: Path) -> tuple[list[Stage], dict]:
    stages, header = _stages_only(root)
    from posttrain.report.heldout import read_outcomes

    for stage in stages:
        stage.outcomes = read_outcomes(root, stage.name)
    return stages, header


def _seed_dirs(root: Path) -> dict[str, list[tuple[int, str]]]:
    """`seeds.runs` of pipeline_summary.json: stage name -> [(seed, directory name)], seed 0 the stage's own."""
    path = root / SUMMARY_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    runs = (data.get("seeds") or {}).get("runs", {}) if isinstance(data, dict) else {}
    return {name: [(int(seed), str(d)) for seed, d in pairs] for name, pairs in runs.items()}


def _attach_seed_runs(root: Path, stages: list[Stage], seeds: dict[str, list[tuple[int, str]]]) -> None:
    for stage in stages:
        for seed, name in seeds.get(stage.name, []):
            path = root / name / "metrics.jsonl"
            if path.exists():
                stage.seed_runs.append((seed, read_jsonl(path)))


def _stages_only(root: Path) -> tuple[list[Stage], dict]:
    entries, header = _summary_stages(root)
    if not entries and _is_run_dir(root):
        return [_load_stage(root.name, root, {})], header
    seeds = _seed_dirs(root)
    stages, seen = [], {(root / d).resolve() for pairs in seeds.values() for _, d in pairs}  # seed runs: no stages
    for entry in entries:
        run_dir = root / str(entry.get("run_dir", entry["name"]))
        stages.append(_load_stage(str(entry["name"]), run_dir if run_dir.is_dir() else None, entry))
        seen.add(run_dir.resolve())
    # stage directories the summary does not name (a pipeline still running, or no summary yet)
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and _is_run_dir(p) and p.resolve() not in seen):
        stages.append(_load_stage(sub.name, sub, {}))
    _attach_seed_runs(root, stages, seeds)
    return stages, header


def _optional(root: Path, stages: list[Stage], name: str, reader) -> list[dict]:
    """Rows of `name` at the top level and in every stage directory; rows without a stage get the directory's."""
    places = [(root, None)] + [(s.run_dir, s.name) for s in stages if s.run_dir and s.run_dir != root]
    out = []
    for folder, stage in places:
        if (folder / name).exists():
            for row in reader(folder / name):
                out.append({"stage": stage, **row} if stage and "stage" not in row else row)
    return out


def _read_json_list(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return [p for p in (data if isinstance(data, list) else data.get("points", [])) if isinstance(p, dict)]


def load_run(path: str | Path) -> Run:
    """A single run directory or a pipeline directory, with its optional parts (absent ones are empty)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    stages, header = _stages(root)
    if not stages:
        raise FileNotFoundError(f"{root}: no metrics.jsonl, config.yaml or {SUMMARY_FILE} here or in sub-directories")
    return Run(
        root=root, stages=stages, header=header,
        overoptimization=_optional(root, stages, OVEROPT_FILE, _read_json_list),
        warnings=_optional(root, stages, WARNINGS_FILE, read_jsonl),
    )


def last_value(rows: list[dict], key: str) -> tuple[float | None, int | None]:
    """The last numeric value logged under `key` and its step."""
    for row in reversed(rows):
        if is_number(row.get(key)):
            return row[key], row.get("step")
    return None, None


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows where `key` is a finite number."""
    pairs = [(row.get("step"), row[key]) for row in rows if is_number(row.get(key)) and is_number(row.get("step"))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _first_final(rows: list[dict], keys: tuple[str, ...]):
    for key in keys:
        value, _ = last_value([r for r in rows if r.get("final")] or rows[-1:], key)
        if value is not None:
            return value, f"metrics.jsonl final `{key}`"
    return None, None


# Where a measured field comes from when pipeline_summary.json lacks it. Each rule returns a value that is
# in metrics.jsonl as written (or the plain sum of `step_time_s`), so the report cannot drift from the files.
FALLBACKS = {
    "heldout_accuracy": lambda rows: _first_final(rows, ("eval/accuracy", "eval/rewards/accuracies")),
    "mean_reward": lambda rows: _first_final(rows, ("eval/reward", "eval/mean_reward", "eval/rewards/mean")),
    "kl_to_ref": lambda rows: _with_source(last_value(rows, "kl/seq_k1_sum")[0], "metrics.jsonl last `kl/seq_k1_sum`"),
    "wall_time_s": lambda rows: _with_source(_sum(rows, "step_time_s"), "metrics.jsonl sum of `step_time_s`"),
    "peak_mem_gb": lambda rows: _with_source(max(series(rows, "peak_mem_gb")[1], default=None),
                                             "metrics.jsonl max `peak_mem_gb`"),
    "tokens_per_s": lambda rows: _with_source(_lower_median(series(rows, "tokens_per_s")[1]),
                                              "metrics.jsonl lower median `tokens_per_s`"),
}


def _with_source(value, source: str):
    return (value, source) if value is not None else (None, None)


def _sum(rows: list[dict], key: str):
    values = series(rows, key)[1]
    return sum(values) if values else None


def _lower_median(values: list):
    """The lower median: always one of the logged values, never an average of two."""
    return sorted(values)[(len(values) - 1) // 2] if values else None


def measured(stage: Stage) -> dict[str, tuple[object, str | None]]:
    """field -> (value, source) for the comparison table; value None means not measured."""
    out = {}
    for name in MEASURED_FIELDS:
        value = stage.summary.get(name)
        if value is not None:
            out[name] = (value, SUMMARY_FILE)
        elif name in FALLBACKS and stage.rows:
            out[name] = FALLBACKS[name](stage.rows)
        else:
            out[name] = (None, None)
    return out
