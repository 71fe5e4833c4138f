"""The one device of a process: resolved once from `train.device`, then passed down explicitly.

`train.device`:
  auto     `cuda:LOCAL_RANK` when CUDA is available, else the CPU
  cpu      the CPU, even where a GPU exists
  cuda     `cuda:LOCAL_RANK` (one GPU per rank under torchrun / accelerate / --num-processes)
  cuda:N   that GPU (a single process)
Asking for a GPU where none is visible is a `DeviceError` with one line that says why, not a traceback from
deep inside a forward pass.

What is decided per device type, and where: bf16 autocast (`models/loading.wants_bf16`), TF32 for fp32 matmuls
(`prepare`), the SDPA kernel (the CPU-only math-backend switch in `models/loading.bf16_autocast`), the fused
AdamW kernel (`train/loop.make_optimizer`) and the collective backend (`backend_for`: NCCL with CUDA tensors,
gloo with CPU ones).
"""

from __future__ import annotations

import os
from typing import Any

import torch


class DeviceError(RuntimeError):
    """A `train.device` that this machine cannot provide."""


_SELECTED: torch.device | None = None


def _cuda_missing_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"torch {torch.__version__} has CUDA {torch.version.cuda} but torch.cuda.is_available() is False (no visible GPU or driver)"


def resolve(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch.device that `spec` (auto | cpu | cuda | cuda:N) means in this process; refuses what is absent."""
    spec = (spec or "auto").strip().lower()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if spec in ("auto", "cuda") or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"train.device={spec}: {_cuda_missing_reason()}; use train.device=cpu or auto")
        count = torch.cuda.device_count()
        # one GPU per rank: cuda:LOCAL_RANK, or cuda:0 when the launcher shows each rank only its own GPU
        # (CUDA_VISIBLE_DEVICES per rank, as SLURM and vLLM-colocated set-ups do)
        index = _index(spec) if spec.startswith("cuda:") else (0 if count == 1 else local_rank)
        if index >= count:
            raise DeviceError(f"train.device={spec}: GPU {index} asked for, {count} visible "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return torch.device("cuda", index)
    raise DeviceError(f"train.device={spec!r}: use auto, cpu, cuda or cuda:N")


def _index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise DeviceError(f"train.device={spec!r}: the GPU index must be a number (cuda:0)") from None


def check_launch(spec: str, num_processes: int) -> None:
    """Refuse, before any process starts, a device that is absent or a GPU count short of the processes asked
    for (each rank takes `cuda:LOCAL_RANK`)."""
    device = resolve(spec, local_rank=0)
    if device.type == "cuda" and num_processes > 1 and torch.cuda.device_count() < num_processes:
        raise DeviceError(f"train.device={spec}: {num_processes} processes need one GPU each, "
                          f"{torch.cuda.device_count()} visible")
    if num_processes > 1 and spec.startswith("cuda:"):
        raise DeviceError(f"train.device={spec} names one GPU for {num_processes} processes; use cuda or auto "
                          "(each rank takes cuda:LOCAL_RANK)")


def prepare(device: torch.device) -> None:
    """Per-process set-up for `device`: the rank's current GPU (so NCCL and the caching allocator use it) and
    TF32 tensor cores for fp32 matmuls and convolutions (a ~10-bit mantissa product with fp32 accumulation,
    what every GPU trainer enables); on every device, a host allocator that reuses freed memory
    (`host_memory.tune_host_allocator`)."""
    from posttrain.host_memory import tune_host_allocator

    tune_host_allocator()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (the portable switch across versions)
        torch.backends.cudnn.allow_tf32 = True


def select(spec: str = "auto") -> torch.device:
    """Resolve `spec`, prepare it and remember it as this process's device (what `current` returns)."""
    global _SELECTED
    device = resolve(spec)
    prepare(device)
    _SELECTED = device
    return device


def current() -> torch.device:
    """This process's device: the one `select` chose, else what `auto` resolves to."""
    return _SELECTED if _SELECTED is not None else resolve("auto")


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for collectives on tensors of `device`."""
    return "nccl" if device.type == "cuda" else "gloo"


def to_device(obj: Any, device: torch.device | str | None = None, non_blocking: bool = True) -> Any:
    """Tensors inside dicts, lists and tuples moved to `device`; other values untouched. `None` means torch's
    default device: the CPU normally, and in the device tests the `meta` device, so a caller that forgot to
    say where a batch goes produces tensors that cannot meet the model's weights."""
    device = torch.get_default_device() if device is None else device
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking and obj.device.type == "cpu")
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
