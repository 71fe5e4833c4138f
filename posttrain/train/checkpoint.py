"""Checkpoints that are complete or absent: written to a temporary folder, then renamed into place.

A checkpoint holds what a bit-identical resume needs: the trainable weights of every module (safetensors),
optimizer and scheduler state, RNG states, the data position and the algorithm's own state (JSON).
Loading uses safetensors and `torch.load(weights_only=True)` only, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch

from posttrain.train import sharding

STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters (LoRA adapters, or all weights), each storage once (tied weights share one)."""
    seen, state = set(), {}
    for name, param in module.named_parameters():
        if param.requires_grad and param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            state[name] = param.detach().contiguous().cpu()
    return state


def rng_state() -> dict:
    import numpy as np

    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_sharded(modules: dict, optimizer, only_model: bool) -> dict:
    """Whole weights and optimizer state of sharded modules, on rank 0 (a collective: every rank calls it)."""
    out = {"modules": {}, "optimizer": None}
    for name, module in modules.items():
        full = sharding.full_state_dict(module)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        out["modules"][name] = {k: v.contiguous() for k, v in full.items() if k in trainable}
    if not only_model:
        out["optimizer"] = sharding.full_optimizer_state(torch.nn.ModuleDict(modules), optimizer)
    return out


def save_checkpoint(ckpt_root: Path, step: int, modules: dict, optimizer, scheduler, trainer_state: dict, keep: int = 2,
                    only_model: bool = False, gathered: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically and prune all but the newest `keep` complete ones.

    A write that fails (a full disk: OSError from Python, SafetensorError from safetensors, RuntimeError from
    torch.save) removes its temporary folder and re-raises; the checkpoints already there are untouched.
    Temporaries left by a process that was killed while writing are removed here.
    `only_model` leaves out optim.pt (optimizer, scheduler and RNG state): such a checkpoint cannot be resumed.
    `gathered`: the whole weights and optimizer state of sharded modules (`gather_sharded`), written instead.
    """
    from safetensors.torch import save_file

    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(ckpt_root)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for name, module in modules.items():
            save_file(gathered["modules"][name] if gathered else trainable_state(module), str(tmp / f"{name}.safetensors"))
        if not only_model:
            optim = gathered["optimizer"] if gathered else optimizer.state_dict()
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "optim.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / "COMPLETE").write_text(str(step))
        _fsync_dir(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        exc.add_note(f"checkpoint {final} was not written; the earlier checkpoints in {ckpt_root} are intact")
        raise
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, its COMPLETE marker first: a kill midway leaves it incomplete, never half-there."""
    (path / "COMPLETE").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale_temporaries(ckpt_root: Path) -> None:
    """Remove `.tmp-step-N-PID` folders whose writer is gone (killed mid-write); a live writer's are kept."""
    for tmp in ckpt_root.glob(".tmp-step-*-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def _fsync_dir(path: Path) -> None:
    """fsync the files of `path` and `path` itself (so a rename into it survives a power cut)."""
    for child in path.iterdir() if path.is_dir() else []:
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temporaries are ignored)."""
    if not ckpt_root.exists():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "COMPLETE").exists()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, modules: dict, optimizer, scheduler, sharded: bool = False) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the trainer state. With `sharded`
    modules every rank reads the whole state and keeps its shard."""
    from safetensors.torch import load_file

    if not (path / "optim.pt").exists():
        raise RuntimeError(f"{path} holds no optimizer state (written with train.save_only_model=true), so the run "
                           "cannot resume from it; start afresh with train.resume=false or from its weights")

    for name, module in modules.items():
        state = load_file(str(path / f"{name}.safetensors"), device="cpu")
        missing = set(state) - {n for n, _ in module.named_parameters()}
        if missing:
            raise RuntimeError(f"{path}: checkpoint has weights the model lacks: {sorted(missing)[:5]}")
        if sharded:
            sharding.load_full_state_dict(module, state)
            continue
        params = dict(module.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
    try:
        # read onto the host: a checkpoint written on a GPU resumes on a CPU-only machine and the reverse; the
        # optimizer's load_state_dict then casts every state tensor to its parameter's device (and dtype)
        blob = torch.load(path / "optim.pt", weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors and plain containers
        raise RuntimeError(f"{path / 'optim.pt'}: refused to load, it is not a plain tensor file "
                           f"({str(exc).splitlines()[0]})") from None
    if sharded:
        sharding.load_full_optimizer_state(torch.nn.ModuleDict(modules), optimizer, blob["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / "trainer_state.json").read_text())
