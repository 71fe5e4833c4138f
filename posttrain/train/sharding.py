"""Sharded data parallelism: PyTorch's FSDP2 (`fully_shard`) over the trainable models of a run.

`train.sharding`:
  none      every rank holds the whole model; gradients are summed in one flat all-reduce (train/distributed.py)
  full      parameters, gradients and optimizer state sharded across ranks, each decoder layer all-gathered for
            its forward and again for its backward (FSDP FULL_SHARD, DeepSpeed ZeRO-3)
  grad_op   gradients and optimizer state sharded; a layer's parameters stay gathered from its forward to its
            backward (FSDP SHARD_GRAD_OP, ZeRO-2): less communication, more memory
A DeepSpeed JSON (`train.deepspeed`) or an `accelerate launch` FSDP/DeepSpeed config chooses the same modes
(`resolve_sharding`); DeepSpeed itself is not used.

What stays the loop's: every loss is normalized by the *global* token/sequence counts, so gradients must be
summed across ranks. FSDP averages by default, which would divide by the world size a second time; the
gradient divide factor is set to 1. Work that only rank 0 does, or that ranks do a different number of times
(held-out evaluation, sampling completions of different lengths, export), runs inside `full_params`: the
weights are all-gathered once on every rank, after which a forward pass needs no collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch

log = logging.getLogger("posttrain")

MODES = ("none", "full", "grad_op")
# accelerate's FSDP_SHARDING_STRATEGY (name or number) and DeepSpeed's zero stage -> our mode
_FSDP_STRATEGY = {"FULL_SHARD": "full", "1": "full", "SHARD_GRAD_OP": "grad_op", "2": "grad_op", "NO_SHARD": "none",
                  "3": "none", "HYBRID_SHARD": "full", "4": "full"}
_ZERO_STAGE = {0: "none", 1: "grad_op", 2: "grad_op", 3: "full"}
_DEEPSPEED_KEYS_USED = {"zero_optimization", "gradient_clipping", "train_micro_batch_size_per_gpu",
                        "gradient_accumulation_steps", "train_batch_size", "bf16", "fp16", "optimizer", "scheduler"}


def resolve_sharding(train_cfg, environ=os.environ) -> str:
    """The sharding mode from `train.sharding`, else a DeepSpeed JSON, else accelerate's launch environment."""
    if train_cfg.sharding != "auto":
        if train_cfg.sharding not in MODES:
            raise ValueError(f"train.sharding must be auto, {', '.join(MODES)}; got {train_cfg.sharding!r}")
        return train_cfg.sharding
    if train_cfg.deepspeed:
        return _zero_mode(deepspeed_stage(train_cfg.deepspeed), train_cfg.deepspeed)
    if environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        if environ.get("FSDP_VERSION") == "2":  # accelerate's FSDP2 plugin says it with reshard_after_forward
            return "full" if environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true" else "grad_op"
        strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if strategy not in _FSDP_STRATEGY:
            raise ValueError(f"FSDP_SHARDING_STRATEGY={strategy!r} from accelerate is not one of {sorted(_FSDP_STRATEGY)}")
        return _FSDP_STRATEGY[strategy]
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is not None:
            return _zero_mode(int(stage), "accelerate's DeepSpeed plugin")
        config = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        return _zero_mode(deepspeed_stage(config), config) if config else "none"
    return "none"


def deepspeed_stage(path: str) -> int:
    """`zero_optimization.stage` of a DeepSpeed JSON; the keys posttrain does not act on are named in a warning."""
    try:
        config = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"train.deepspeed: cannot read DeepSpeed config {path}: {exc}") from None
    ignored = sorted(set(config) - _DEEPSPEED_KEYS_USED)
    if ignored:
        log.warning("%s: keys without an equivalent here, ignored: %s", path, ", ".join(ignored))
    zero = config.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) and zero[key].get("device", "none") != "none":
            log.warning("%s: zero_optimization.%s is not supported; nothing is offloaded", path, key)
    return int(zero.get("stage", 0))


def _zero_mode(stage: int, source) -> str:
    if stage not in _ZERO_STAGE:
        raise ValueError(f"{source}: ZeRO stage must be 0-3, got {stage}")
    return _ZERO_STAGE[stage]


def _layer_classes(model) -> set[str]:
    """Class names of the blocks to shard one by one (transformers' `_no_split_modules`: the decoder layers)."""
    names: set[str] = set()
    for module in model.modules():  # a PPO critic wraps a transformers decoder: look inside
        names |= set(getattr(module, "_no_split_modules", None) or [])
    return names


def shard(model: torch.nn.Module, mode: str) -> list[torch.nn.Module]:
    """Apply `fully_shard` to each decoder layer; returns them (the FSDP units).

    Embeddings, final norm and output head stay whole on every rank, their gradients all-reduced with the
    others' (train/distributed.py): the losses call the decoder and the head directly (the head only on the
    positions they score, never the whole vocabulary everywhere), so a root FSDP unit's forward hook would
    never run. For SmolLM2-135M the layers are ~79 % of the weights."""
    from torch.distributed.fsdp import fully_shard

    if hasattr(model, "peft_config"):
        raise ValueError("train.sharding with LoRA is not supported: a LoRA adapter's state is small, train it with "
                         "train.sharding=none (every rank holds the frozen base once)")
    reshard = mode == "full"
    classes = _layer_classes(model)
    units = [m for m in model.modules() if m is not model and type(m).__name__ in classes]
    if not units:
        raise ValueError(f"train.sharding: found no decoder layers to shard in {type(model).__name__} "
                         "(its _no_split_modules names none of its modules)")
    for module in units:
        fully_shard(module, reshard_after_forward=reshard)
        module.posttrain_reshard_after_forward = reshard  # what `full_params` restores
        module.set_gradient_divide_factor(1.0)  # sum, not mean: the losses are normalized by global counts already
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return units


def is_sharded(model) -> bool:
    return bool(_fsdp_modules(model))


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_params(*models):
    """Every sharded model's weights gathered on every rank for the duration (a collective: all ranks enter)."""
    units = [u for m in models if m is not None for u in _fsdp_modules(m)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, "posttrain_reshard_after_forward", True), recurse=False)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm over sharded (DTensor) and whole gradients, and clipping to `max_norm`: the same
    number on every rank and the same as one process's `clip_grad_norm_`."""
    device = next((p.grad.device for p in params if p.grad is not None), params[0].device)
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    whole = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is None:
            continue
        if is_dtensor(p.grad):
            sharded += p.grad.to_local().double().pow(2).sum()
        else:
            whole += p.grad.double().pow(2).sum()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sharded)
    norm = (sharded + whole).sqrt()
    if max_norm > 0 and torch.isfinite(norm):
        coef = float((max_norm / (norm + 1e-6)).clamp(max=1.0))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm.float()


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights, on CPU, on rank 0 (a collective: all ranks call it; other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state: dict) -> None:
    """Whole weights (every rank has read them) into this rank's shards; keys absent from `state` keep their values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
