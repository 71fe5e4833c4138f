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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.registry import Registry

log = logging.getLogger(__name__)


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


# ---- renamed keys ---------------------------------------------------------------------------------------------------

# old dotted key -> new dotted key; either may be a field or a whole section (`algo.reference` -> `algo.ref`) and they
# may sit in different sections. Saved configs and scripts keep working for one release after a rename; the module
# that moved the field registers it with `rename_key` next to the field.
RENAMED_KEYS: dict[str, str] = {}
_COMMAND_RENAMES: dict[str, dict[str, str]] = {}  # renames that hold for some commands only (algo.beta of GRPO ...)


def rename_key(old: str, new: str, commands: tuple[str, ...] = ()) -> None:
    """Accept the dotted key (or section) `old` as `new` for one release, with a deprecation warning; `commands`
    limits the rename to those commands (another command may still use `old` as it is: DPO's algo.beta)."""
    if old == new:
        raise ValueError(f"config key {old!r} cannot be renamed to itself")
    for table in ([_COMMAND_RENAMES.setdefault(c, {}) for c in commands] or [RENAMED_KEYS]):
        if table.get(old, new) != new:
            raise ValueError(f"config key {old!r} is already renamed to {table[old]!r}; refusing {new!r}")
        table[old] = new


def current_key(dotted: str, command: str | None = None) -> str:
    """The name `dotted` has now for `command` (itself unless it was renamed)."""
    return _renamed(dotted, renames_for(command))[0]


def renames_for(command: str | None) -> dict[str, str]:
    """The renamed keys that hold for `command`: every command's, then its own."""
    return {**RENAMED_KEYS, **_COMMAND_RENAMES.get(command or "", {})}


def _renamed(dotted: str, renames: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(the current name of `dotted`, the deprecated key it went through or None): the longest renamed key that
    is `dotted` or a section above it is replaced, repeatedly, so chains of renames resolve (a cycle stops)."""
    renames = RENAMED_KEYS if renames is None else renames
    used, seen = None, set()
    while dotted not in seen:
        seen.add(dotted)
        parts = dotted.split(".")
        sections = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]  # longest first
        old = next((key for key in sections if key in renames), None)
        if old is None:
            break
        dotted, used = ".".join([renames[old], *parts[old.count(".") + 1:]]), used or old
    return dotted, used


def _deprecated(old: str, warned: set[str], renames: dict[str, str] | None = None) -> None:
    if old not in warned:  # once per old key and config, however many of its fields the config sets
        warned.add(old)
        log.warning("config key %r is deprecated; use %r (the old name goes in the next release)",
                    old, _renamed(old, renames)[0])


def _rename_tree(tree: dict, warned: set[str], renames: dict[str, str] | None = None) -> None:
    """Move the renamed keys a config file uses to their new places. Sections first, so that a renamed field
    inside a renamed section is found where the section moved."""
    renames = RENAMED_KEYS if renames is None else renames
    for old in sorted(renames, key=lambda k: k.count(".")):
        *parents, leaf = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        new = _renamed(old, renames)[0]
        if _has_dotted(tree, new):
            raise ConfigError(f"config keys {old!r} and {new!r} are both set; {old!r} is the old name of {new!r}")
        set_dotted(tree, new, node.pop(leaf))
        _deprecated(old, warned, renames)


def _has_dotted(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


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
    validate(cfg)
    return cfg


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
    ("train.lr", _ALL, lambda v, cfg: 0 <= v < float("inf"), "must be a finite number >= 0"),
    ("train.warmup_steps", _ALL, _at_least(0), "must be >= 0 (0 = no warmup)"),
    ("train.weight_decay", _ALL, lambda v, cfg: 0 <= v < float("inf"), "must be a finite number >= 0"),
    ("train.adam_beta1", _ALL, lambda v, cfg: 0 <= v < 1, "must be in [0, 1)"),
    ("train.adam_beta2", _ALL, lambda v, cfg: 0 <= v < 1, "must be in [0, 1)"),
    ("train.max_minutes", _ALL, _at_least(0), "must be >= 0 (0 = no time limit)"),
    ("train.eval_every", _ALL, _at_least(0), "must be >= 0 (0 = only at the end)"),
    ("train.save_every", _ALL, _at_least(0), "must be >= 0 (0 = only at the end)"),
    ("train.schedule", _ALL, _choice("cosine", "linear", "constant"), "must be cosine, linear or constant"),
    ("train.output_dir", _ALL, lambda v, cfg: _file_in_the_way(v) is None,
     lambda v: f"{_file_in_the_way(v)!r} is a file, not a directory (--output-dir)"),
    ("model.name_or_path", _ALL, lambda v, cfg: model_path_problem(v) is None,
     lambda v: f"{model_path_problem(v)} (--model)"),
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
    from posttrain.models.loading import BUNDLED_ALIASES  # light: loading imports torch and transformers lazily

    if name.lower() in BUNDLED_ALIASES or Path(name).expanduser().exists():
        return None
    if Path(name).suffix == ".gguf":
        return "no such GGUF file"
    if not _REPO_ID.fullmatch(name) or "--" in name or ".." in name or name.endswith(".git"):
        return "no such file or folder, and not a hub id (namespace/name)"
    return None


def save_config(cfg: RunConfig, out_dir: str | Path) -> Path:
    out = Path(out_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    return out
