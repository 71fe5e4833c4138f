"""Several processes (and machines) through torch.distributed, launched by `accelerate launch`, `torchrun` or
`posttrain ... --num-processes N`.

Data parallelism with exact semantics: every rank computes the gradient of its share of the global batch
with the loss normalized by the *global* token/sequence counts (all-reduced before the losses run), and the
gradients are summed across ranks in one flat all-reduce. The update therefore equals the single-process
update on the same global batch, for every loss-aggregation mode (accumulation normalized per micro-batch: transformers PR #34191) — the property DDP's
gradient averaging loses when ranks hold different numbers of tokens (the property of PyTorch issue reports
and of transformers PR #34191). Only rank 0 writes files.

Each rank trains on its own device (`posttrain.devices`: `cuda:LOCAL_RANK` under `train.device=auto|cuda`); the
backend follows it: NCCL when the tensors are on CUDA, gloo on the CPU. Counts and flags travel as tensors on
the backend's device (NCCL accepts CUDA tensors only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from posttrain import devices


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"  # nccl | gloo once a process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


_CONTEXT: DistContext | None = None


def context() -> DistContext:
    """The process's place in the job, initialising the process group once when launched with several."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        backend = "none"
        if world > 1:
            if not torch.distributed.is_initialized():
                device = devices.current()  # the run selected it (setup_run) before asking for the context
                devices.prepare(device)
                torch.distributed.init_process_group(backend=devices.backend_for(device))
            backend = torch.distributed.get_backend()
        _CONTEXT = DistContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), backend)
    return _CONTEXT


def _collective_device() -> torch.device:
    """Where small tensors for collectives live: the rank's GPU under NCCL, else the CPU."""
    return devices.current() if context().backend == "nccl" else torch.device("cpu")


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients across ranks in one flat buffer (losses are already normalized by global counts)."""
    ctx = context()
    if not ctx.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def sum_counts(counts: dict) -> dict:
    """Numeric totals (token and sequence counts) summed over ranks."""
    ctx = context()
    if not ctx.enabled or not counts:
        return counts
    keys = [k for k, v in counts.items() if isinstance(v, (int, float))]
    t = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return {**counts, **{k: (int(v) if isinstance(counts[k], int) else float(v)) for k, v in zip(keys, t.tolist())}}


def mean_metrics(metrics: dict, summed: tuple[str, ...] = ("tokens",)) -> dict:
    """Numeric metrics averaged over the ranks that report them (`summed` counts are added)."""
    ctx = context()
    if not ctx.enabled:
        return metrics
    gathered: list = [None] * ctx.world
    torch.distributed.all_gather_object(gathered, metrics)
    out = dict(metrics)
    for key in {k for m in gathered for k in m}:
        values = [m[key] for m in gathered if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
        if values:
            out[key] = sum(values) if key in summed else sum(values) / len(values)
    return out


def all_ranks(flag: bool) -> bool:
    """True only if `flag` is true on every rank."""
    if not context().enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def max_over_ranks(value: int) -> int:
    if not context().enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    return not all_ranks(not flag)


def shutdown() -> None:
    """End this process's process group, if it has one, before the interpreter exits: a gloo group left alive
    at exit can abort the process in its static destructors ("terminate called without an active exception",
    seen on a rank that had finished and exported)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank past its last collective before any tears down: rank 0 hosts the TCP store the others use
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if context().enabled:
        torch.distributed.barrier()


def broadcast_object(obj):
    """Rank 0's object on every rank (e.g. evaluation results computed on rank 0 only)."""
    if not context().enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def launch(argv: list[str], num_processes: int) -> int:
    """Re-run this command under torch.distributed's launcher with `num_processes` local processes."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
           "-m", "posttrain.cli", *argv]
    return subprocess.call(cmd)
