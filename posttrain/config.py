"""Configuration: one dataclass per component, YAML files, dotted `key=value` overrides, everyday flags.

A run's config is a `RunConfig` whose `algo` section is the dataclass of its command (registered with the command
by `posttrain.train.registry.algorithm`). Unknown keys are errors that suggest the closest key over every section
of the command; renamed keys (`rename_key`) are accepted for one release with a deprecation warning. The field
docs (`posttrain CMD --help`, `posttrain config CMD`) are the fields' comments, read by `config_docs`.

Hand-written coercion, weighed against pydantic 2 and OmegaConf structured configs on the same bad inputs: for
`train.max_steps=many` this gives `train.max_steps: expected int, got 'many'`, pydantic `1 validation error for Run
train.max_steps Input should be a valid integer, unable to parse string as an integer [type=int_parsing, ...]` and
a URL, OmegaConf `Value 'many' of type 'str' could not be converted to Integer` and 3 lines of full_key/types; for
`model.lora=3` OmegaConf says `Merge error: int is not a subclass of Lora. value: 3` (no key), and for
`train.save_step=3` pydantic `Unexpected keyword argument` (no suggestion). Both refuse inputs accepted here (`a,b`
for a list; pydantic 3 for a str, OmegaConf "3.0" for an int): one-line errors that name the key, no dependency.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.config_renames import (  # noqa: F401  (part of this module's interface)
    RENAMED_KEYS, _deprecated, _rename_tree, _renamed, current_key, rename_key, renames_for,
)
from posttrain.registry import Registry

log = logging.getLogger(__name__)


BUNDLED_ALIASES = ("smollm2", "bundled", "smollm2-135m-instruct")  # names of the bundled SmolLM2-135M-Instruct (model.name_or_path)


class ConfigError(ValueError):
    """A config file, flag or override that does not fit the schema."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2"  # "smollm2" = the bundled SmolLM2-135M-Instruct; or a folder, a .gguf file, a hub id
    dtype: str = "fp32"  # weights: fp32 | bf16
    autocast: str = "auto"  # bf16 autocast: auto (where bf16 is fast on this hardware) | bf16 | none
    gradient_checkpointing: bool = False
    compile: str = "auto"  # torch.compile each decoder layer: auto (on CUDA only; models/compiled.py) | on | off
    logprob_chunk: int = 1024  # tokens per chunk when computing log-probs from hidden states
    # frozen models (reference, reward models, judges): their weights' dtype (null = `dtype`; bf16 halves their
    # memory) and whether they wait on the CPU between uses, moved to the device only for their forward passes
    frozen_dtype: str | None = None
    offload_frozen: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    path: str = "task:arithmetic"  # a .jsonl/.json/.parquet file, a saved HF dataset folder, or task:NAME
    eval_path: str | None = None  # default for task:NAME: its test split; for files: a held-out slice
    eval_fraction: float = 0.05  # held-out slice of `path` when eval_path is not given (files only)
    num_examples: int = 2000  # records generated for task:NAME (train split)
    num_eval_examples: int = 100
    max_length: int = 512  # prompt + completion tokens
    max_prompt_length: int = 384
    overlong: str = "drop"  # drop | truncate (truncate keeps >= 1 completion token)
    group_by_length: bool = True  # batch similar lengths together to cut padding
    chat_template: str | None = None  # override; a named fallback is used when the tokenizer has none


@dataclass
class TrainConfig:
    output_dir: str = "runs/run"
    max_steps: int = 100
    max_minutes: float = 0.0  # also stop (final eval, checkpoint, export) once this much wall time has passed; 0 = off
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    # sequences packed side by side in rows with a block-diagonal mask, no padding (data/padding_free.py; sft, rm,
    # dpo and kto; the online algorithms share each prompt across its group instead: algo.share_prompt)
    padding_free: bool = False
    # > 0: an update's sequences are cut into micro-batches of at most this many tokens (rows x width) instead of
    # batch_size rows (sft, rm, dpo, kto; the RL passes count packed group rows under prompt sharing); 0 = off
    max_tokens_per_micro_batch: int = 0
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    fused_adamw: bool = True  # torch's fused AdamW kernel where it exists (CPU and CUDA; the README has its speed-up)
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    # Checkpoints without optimizer state (HF Trainer's save_only_model): a third of the size for full fine-tuning
    # with AdamW, but a run cannot resume from them (resume refuses with a clear error).
    save_only_model: bool = False
    resume: bool = False
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    progress: bool = True
    tensorboard: bool = True
    # experiment trackers beside metrics.jsonl, any of tensorboard | trackio | wandb | mlflow (posttrain/trackers.py;
    # pip install -e ".[trackers]"); each works offline: wandb in offline mode, mlflow in RUN_DIR/mlruns
    report_to: list[str] = field(default_factory=list)
    tracker_project: str = "posttrain"  # the trackers' project / experiment name; the run is named after output_dir
    # online runs (grpo, ppo, online-dpo, distill): every completion of this many prompts per step goes to
    # RUN_DIR/samples.jsonl with its per-reward scores, advantage and KL (train/samples.py); 0 = off
    samples_per_step: int = 4
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    # where models, batches, rollouts and optimizer state live: auto (cuda:LOCAL_RANK when CUDA is available, else
    # cpu) | cpu | cuda | cuda:N (devices.py)
    device: str = "auto"
    # several processes: none (whole model per rank, gradients all-reduced) | full (FSDP2 FULL_SHARD, ZeRO-3) |
    # grad_op (SHARD_GRAD_OP, ZeRO-2) | auto (from `deepspeed` or accelerate's launch config, else none); sharding.py
    sharding: str = "auto"
    deepspeed: str | None = None  # a DeepSpeed JSON: its zero_optimization.stage picks the sharding mode


@typing.runtime_checkable
class AlgoSection(typing.Protocol):
    """A command's `algo` section: a dataclass of its hyper-parameters (SFTConfig, GRPOConfig ...), registered with
    the command by `posttrain.train.registry.algorithm`."""

    __dataclass_fields__: dict


@dataclass
class RunConfig:
    command: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgoSection | None = None  # the command's own dataclass (ALGO_SECTIONS), built by load_config


ALGO_SECTIONS = Registry("algo section")  # command -> the dataclass of its `algo` section


def register_algo_section(command: str, cls: type) -> None:
    """Called by the algorithm/command decorators (posttrain.train.registry), not by hand."""
    ALGO_SECTIONS.add(command, cls)


def config_sections(command: str) -> list[tuple[str, type]]:
    """(section, dataclass) of a command's config: model, data, train, then its algo section if it has one."""
    sections = [(name, typ) for name, typ in _field_types(RunConfig).items() if dataclasses.is_dataclass(typ)]
    algo = ALGO_SECTIONS.get(command)
    return sections + ([("algo", algo)] if algo is not None else [])


def config_keys(command: str) -> list[str]:
    """Every dotted key of a command's config, sections included (`model.lora` and `model.lora.r`)."""
    keys = ["command"]
    for name, cls in config_sections(command):
        keys += [name, *_dotted_keys(cls, name)]
    return keys


# ---- validation -----------------------------------------------------------------------------------------------------

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dotted_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, typ in _field_types(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        keys += [key, *(_dotted_keys(typ, key) if dataclasses.is_dataclass(typ) else ())]
    return keys


def _similarity(a: str, b: str) -> float:
    """difflib's ratio raised for a shared start (Jaro-Winkler's prefix bonus): a typo usually keeps the first
    letters, and plain ratio puts `save_step` nearer `max_steps` than `save_every`."""
    ratio = difflib.SequenceMatcher(None, a, b).ratio()
    return ratio + 0.1 * min(len(os.path.commonprefix([a, b])), 4) * (1 - ratio)


def _path_similarity(a: str, b: str) -> float:
    """Of two dotted keys after their shared leading sections (a shared `train.` says nothing about the typo)."""
    pa, pb = a.split("."), b.split(".")
    while len(pa) > 1 and len(pb) > 1 and pa[0] == pb[0]:
        pa, pb = pa[1:], pb[1:]
    return _similarity(".".join(pa), ".".join(pb))


def _closest(path: str, keys) -> str:
    """` (did you mean X?)` for an unknown dotted key: the nearest key of the whole run by leaf name (`loss_type`
    finds `algo.loss_type`) or by path (`model.lora_r` finds `model.lora.r`). A key in another section needs the
    stronger match; X is a bare name when it sits in the same section."""
    parent, _, leaf = path.rpartition(".")
    best, best_score = None, (0.0, 0.0)
    for key in keys:
        key_parent, _, key_leaf = key.rpartition(".")
        if path.startswith(key + "."):  # a section above the typo
            continue
        by_path = _path_similarity(path, key)
        score = (max(_similarity(leaf, key_leaf), by_path), by_path)
        if score[0] >= (0.6 if key_parent == parent else 0.8) and score > best_score:
            best, best_score = key, score
    if best is None:
        return ""
    best_parent, _, best_leaf = best.rpartition(".")
    return f" (did you mean {(best_leaf if best_parent == parent else best)!r}?)"


def _coerce(value: Any, typ: Any, where: str, keys: list[str] | None = None) -> Any:
    """Turn a YAML/CLI value into the annotated type, with an error that names the key."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        return build(typ, _mapping(value, where), where, keys)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None: "null" and "none" from the command line
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, next(a for a in typing.get_args(typ) if a is not type(None)), where, keys)
    if origin in (list, tuple):
        return _sequence(value, typ, where)
    if typ is dict or origin is dict:
        return _mapping(value, where)
    if typ in (bool, int, float, str):
        return _scalar(value, typ, where)
    return value


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _sequence(value: Any, typ: Any, where: str) -> list | tuple:
    if isinstance(value, str):  # from the command line: "a,b" or a YAML list "[1, 2]"
        value = _yaml(value, where) if value.strip().startswith("[") else [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    (inner, *_) = typing.get_args(typ) or (Any,)
    items = [_coerce(v, inner, where) for v in value]
    return tuple(items) if typing.get_origin(typ) is tuple else items


def _scalar(value: Any, typ: type, where: str) -> Any:
    if isinstance(value, (list, tuple, dict)):  # str() or bool() of a list would pass silently
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    if typ is str:
        return str(value)
    if typ is bool:
        text = str(value).lower() if isinstance(value, str) else None
        if text is None:
            return bool(value)
        if text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:  # an int also from "3.0" or 3.0 (YAML reads 1e3 as a string, and scripts write 1000.0) ...
        if typ is int and not isinstance(value, bool) and float(value).is_integer():
            return int(float(value))
        if typ is int and isinstance(value, float):  # ... but not from 2.5: int(2.5) would silently be 2
            raise ValueError
        return typ(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None


def build(cls, values: dict, where: str = "", keys: list[str] | None = None):
    """A dataclass from a (partial) mapping; an unknown key raises with the closest of `keys` (every dotted key
    of the run; default: those of `cls`)."""
    types_ = _field_types(cls)
    keys = keys if keys is not None else _dotted_keys(cls, where)
    kwargs = {}
    for key, value in (values or {}).items():
        path = f"{where}.{key}" if where else str(key)
        if key not in types_:
            raise ConfigError(f"unknown config key {path!r}{_closest(path, keys)}")
        if dataclasses.is_dataclass(types_[key]):  # a section: the given keys over the section's own defaults
            section = build(types_[key], _mapping(value, path), path, keys)
            given = {k: getattr(section, k) for k in value}
            kwargs[key] = dataclasses.replace(_default_of(cls, key, types_[key]), **given)
        else:
            kwargs[key] = _coerce(value, types_[key], path, keys)
    return cls(**kwargs)


def _default_of(cls, name: str, typ):
    """The default of field `name`: a config may give a section other defaults than its class's (PPO samples one
    completion per prompt), which the keys a user sets must not reset."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default if f.default is not dataclasses.MISSING else typ()


# ---- files, overrides -----------------------------------------------------------------------------------------------

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _yaml(text: str, where: str, is_file: bool = False) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(exc, where, is_file)) from None


def _yaml_error(exc: yaml.YAMLError, where: str, is_file: bool) -> str:
    """One line: `file:line:column: not valid YAML: problem` (an override: the column in its value). PyYAML's own
    text spans lines, quotes "<unicode string>" and draws a caret."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return f"{where}: not valid YAML: {' '.join(str(exc).split())}"
    if "'\\t'" in problem:  # PyYAML's "found character '\t' that cannot start any token"
        problem += " (YAML indents with spaces, never tabs)"
    if is_file:
        return f"{where}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    return f"{where}: not valid YAML: {problem} (at character {mark.column + 1} of the value)"


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=1e-5)")
    key, raw = text.split("=", 1)
    value = _yaml(raw, f"override {text!r}") if raw else ""
    return key.strip(), value


def _read_file(path: str) -> dict:
    with open(path) as fh:
        tree = _yaml(fh.read(), path, is_file=True) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the config file must be a YAML mapping")
    return tree


def load_config(command: str, path: str | None = None, overrides: list[str] = (), flags: dict | None = None) -> RunConfig:
    """File < flags < key=value overrides (old names of renamed keys moved to the new ones), then validated into a
    RunConfig whose `algo` matches the command."""
    warned: set[str] = set()
    renames = renames_for(command)
    tree = _read_file(path) if path else {}
    tree.pop("command", None)  # the command line names the command (a run's saved config.yaml carries it too)
    _rename_tree(tree, warned, renames)
    for dotted, value in (flags or {}).items():
        if value is not None:  # the flag table is code, not the user's words: no warning for it
            set_dotted(tree, _renamed(dotted, renames)[0], value)
    for text in overrides:
        dotted, value = parse_override(text)
        dotted, old = _renamed(dotted, renames)
        if old is not None:
            _deprecated(old, warned, renames)
        set_dotted(tree, dotted, value)
    keys = config_keys(command)
    algo_tree = tree.pop("algo", {}) or {}
    cfg = build(RunConfig, tree, "", keys)
    cfg.command = command
    algo_cls = ALGO_SECTIONS.get(command)
    if algo_cls is not None:
        cfg.algo = build(algo_cls, _mapping(algo_tree, "algo"), "algo", keys)
    elif algo_tree:
        raise ConfigError(f"command {command!r} takes no 'algo' section")
    from posttrain.config_rules import validate  # the value rules: their own module (a table, not the parser)

    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, out_dir: str | Path) -> Path:
    out = Path(out_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    return out
