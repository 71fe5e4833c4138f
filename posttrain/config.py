"""Configuration: one dataclass per component, YAML files, dotted `key=value` overrides, everyday flags.

A run's config is a `RunConfig` whose `algo` section is the dataclass of its command (registered in ALGO_CONFIGS
by the module that implements it). Unknown keys are errors that suggest the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


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
    fused_adamw: bool = True  # torch's fused AdamW kernel where it exists (10x faster step on CPU)
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


@dataclass
class RunConfig:
    command: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: Any = None


ALGO_CONFIGS: dict[str, type] = {}


def register_algo_config(command: str):
    """Class decorator: the dataclass of hyper-parameters for `posttrain COMMAND`."""

    def wrap(cls):
        ALGO_CONFIGS[command] = cls
        return cls

    return wrap


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, with an error that names the key."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(typ, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        (inner, *_) = typing.get_args(typ) or (Any,)
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if typ in (int, float):
        try:
            return typ(float(value)) if typ is int and float(value).is_integer() else typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if typ is str:
        return str(value)
    return value


def build(cls, values: dict, where: str = ""):
    """A dataclass from a (partial) mapping; unknown keys raise with the closest valid one."""
    types = _field_types(cls)
    kwargs = {}
    for key, value in (values or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in types:
            raise ConfigError(f"unknown config key {path!r}{_closest(key, types)}")
        kwargs[key] = _coerce(value, types[key], path)
    return cls(**kwargs)


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


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=1e-5)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    return key.strip(), value


def load_config(command: str, path: str | None = None, overrides: list[str] = (), flags: dict | None = None) -> RunConfig:
    """File < flags < key=value overrides, then validated into a RunConfig whose `algo` matches the command."""
    tree: dict = {}
    if path:
        with open(path) as fh:
            tree = yaml.safe_load(fh) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the config file must be a YAML mapping")
    tree.pop("command", None)
    for dotted, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, dotted, value)
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    algo_tree = tree.pop("algo", {}) or {}
    cfg = build(RunConfig, tree)
    cfg.command = command
    algo_cls = ALGO_CONFIGS.get(command)
    if algo_cls is not None:
        cfg.algo = build(algo_cls, algo_tree, "algo")
    elif algo_tree:
        raise ConfigError(f"command {command!r} takes no 'algo' section")
    return cfg


def save_config(cfg: RunConfig, out_dir: str | Path) -> Path:
    out = Path(out_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    return out
