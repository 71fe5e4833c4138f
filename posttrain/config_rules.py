"""The rules a config's values must follow, one line each (key, the commands it applies to, the check, the
message), checked by `validate` at the end of `load_config`: a value out of range is one `ConfigError` naming the
key and the value, before anything is written or loaded."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from posttrain.config import BUNDLED_ALIASES, ConfigError, RunConfig

# ---- values -------------------------------------------------------------------------------------------------------

def _at_least(n):
    return lambda v, cfg: v >= n


def _choice(*options):
    return lambda v, cfg: v in options


_ALL: tuple[str, ...] = ()  # a rule for every command that has the key

# (dotted key, commands (empty: all), ok(value, cfg), what the value must be or a function of the value saying what
# is wrong with it). A value that type-checks but means nothing, or would fail later as a torch or peft error far
# from its key, or after minutes of training (an unknown policy checked only once an example is long), is refused
# here, before anything is loaded or written. A rule whose key the command lacks (algo.sampling for sft) is skipped.
RULES: list[tuple[str, tuple[str, ...], Any, Any]] = [
    ("train.max_steps", _ALL, _at_least(0), "must be >= 0 (0 trains nothing: the starting model is evaluated, exported)"),
    ("train.batch_size", _ALL, _at_least(1), "must be at least 1 (sequences per micro-batch)"),
    ("train.grad_accum", _ALL, _at_least(1), "must be at least 1 (micro-batches per optimizer step)"),
    ("train.max_tokens_per_micro_batch", _ALL, _at_least(0), "must be >= 0 (tokens per micro-batch; 0 = off)"),
    ("algo.loss_agg", ("sft",), lambda v, cfg: not cfg.train.padding_free or v == "token-mean",
     "must be token-mean with train.padding_free=true (a packed row holds several sequences)"),
    ("train.lr", _ALL, lambda v, cfg: 0 <= v < float("inf"), "must be a finite number >= 0"),
    ("train.warmup_steps", _ALL, _at_least(0), "must be >= 0 (0 = no warmup)"),
    ("train.weight_decay", _ALL, lambda v, cfg: 0 <= v < float("inf"), "must be a finite number >= 0"),
    ("train.adam_beta1", _ALL, lambda v, cfg: 0 <= v < 1, "must be in [0, 1)"),
    ("train.adam_beta2", _ALL, lambda v, cfg: 0 <= v < 1, "must be in [0, 1)"),
    ("train.max_minutes", _ALL, _at_least(0), "must be >= 0 (0 = no time limit)"),
    ("train.eval_every", _ALL, _at_least(0), "must be >= 0 (0 = only at the end)"),
    ("train.save_every", _ALL, _at_least(0), "must be >= 0 (0 = only at the end)"),
    ("train.report_to", _ALL, lambda v, cfg: all(n in ("tensorboard", "trackio", "wandb", "mlflow") for n in v),
     "must list trackers among tensorboard, trackio, wandb, mlflow"),
    ("train.schedule", _ALL, _choice("cosine", "linear", "constant"), "must be cosine, linear or constant"),
    ("train.output_dir", _ALL, lambda v, cfg: _file_in_the_way(v) is None,
     lambda v: f"{_file_in_the_way(v)!r} is a file, not a directory (--output-dir)"),
    ("model.name_or_path", _ALL, lambda v, cfg: model_path_problem(v) is None,
     lambda v: f"{model_path_problem(v)} (--model)"),
    ("model.compile", _ALL, _choice("auto", "on", "off"), "must be auto, on or off"),
    ("model.lora.r", _ALL, _at_least(1), "must be at least 1 (the adapter's rank)"),
    ("model.lora.dropout", _ALL, lambda v, cfg: 0 <= v < 1, "must be in [0, 1)"),
    ("data.overlong", _ALL, _choice("drop", "truncate"), "must be drop or truncate"),
    ("data.eval_fraction", _ALL, lambda v, cfg: 0 <= v < 1, "must be in [0, 1) (1 would hold out every record)"),
    ("data.max_length", _ALL, _at_least(1), "must be at least 1 (tokens)"),
    ("data.max_prompt_length", _ALL, _at_least(1), "must be at least 1 (tokens)"),
    ("algo.sampling.prompts_per_step", _ALL, _at_least(1), "must be at least 1"),
    ("algo.sampling.num_generations", _ALL, _at_least(1), "must be at least 1 (completions per prompt)"),
    ("algo.sampling.num_generations", ("grpo",), _at_least(2), "must be at least 2 for grpo: advantages are relative "
     "to the prompt's group, so with 1 completion every advantage is 0 and nothing is learned"),
    ("algo.sampling.num_generations", ("online-dpo",), _at_least(2), "must be at least 2 for online-dpo: a pair is "
     "the best and the worst of a prompt's completions"),
    ("algo.reward.combine", _ALL, _choice("sum", "per_function"), "must be sum or per_function (GDPO)"),
    ("algo.sampling.max_new_tokens", _ALL, _at_least(1), "must be at least 1"),
]


def validate(cfg: RunConfig) -> None:
    """Apply RULES: the first value that breaks one is a ConfigError naming the key and the value."""
    for key, commands, ok, must in RULES:
        if commands and cfg.command not in commands:
            continue
        found, value = _get_dotted(cfg, key)
        if found and value is not None and not ok(value, cfg):
            raise ConfigError(f"{key}={value!r}: {must(value) if callable(must) else must}")


def _get_dotted(cfg: Any, dotted: str) -> tuple[bool, Any]:
    node = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return False, None
        node = getattr(node, part)
    return True, node


def _file_in_the_way(path: str) -> str | None:
    """The existing non-directory at `path` or above it, which would stop the run directory being made."""
    p = Path(path).expanduser()
    for candidate in (p, *p.parents):
        if candidate.exists():
            return None if candidate.is_dir() else str(candidate)
    return None


# the hub's repo id rule (huggingface_hub.utils.validate_repo_id), without importing it: [namespace/]name
_REPO_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", re.ASCII)


def model_path_problem(name: str) -> str | None:
    """Why `name` can name no model (None when it can): not the bundled model, no such file or folder, and not
    shaped like a hub id either (transformers would fail with a repo-id error that names neither key nor flag)."""
    if name.lower() in BUNDLED_ALIASES or Path(name).expanduser().exists():
        return None
    if Path(name).suffix == ".gguf":
        return "no such GGUF file"
    if not _REPO_ID.fullmatch(name) or "--" in name or ".." in name or name.endswith(".git"):
        return "no such file or folder, and not a hub id (namespace/name)"
    return None


