"""The reference π_ref, one abstraction for every algorithm: a table of log-probs computed once (offline losses),
or a model run per batch (`ModelReference`: a frozen copy, or the LoRA policy with its adapter switched off).

For the offline losses (DPO family, KTO) it is computed once, before training, and kept on disk.

The dataset is fixed and π_ref is frozen, so log π_ref(y | x) of every sequence a run scores is a constant. One
no-grad pass before the first update computes the sums for the examples the run will visit (and the eval split) and
stores them in the run directory as `reference_logps.safetensors`, keyed by example index; training then holds one
model in memory. The file carries a fingerprint of the reference (weights, dtype, autocast) and a hash of each
column's token ids and labels: a resumed run reuses what matches and computes only what is missing.

Which model is the reference (reference not frozen or wrong: TRL #1652). We adopt: **the reference is the initial policy**, unless `ref_model`
names another checkpoint.
  1. `ref_model` set: that checkpoint, loaded frozen for the pass only and freed before training.
  2. a LoRA policy whose adapter is still zero (a fresh one, B = 0): the base with the adapter switched off
     (`adapter_disabled`): the same numbers as the initial policy, and the reference the README promises.
  3. otherwise the policy itself, before its first update. Full fine-tuning: the policy holds the very weights a
     frozen copy would load, so no second copy is loaded at all. A LoRA policy that starts from a trained
     (non-zero) adapter: the reference is that initial policy, adapter on, not the bare base.
With `precompute_ref=False` the reference runs on every micro-batch instead (`ModelReference`): case 2 switches the
adapter off per batch (one model); cases 1 and 3 keep a frozen model next to the policy (two models).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.chat import Encoded
from posttrain.data.collate import BatchOrder, pad_encoded
from posttrain.devices import module_device, to_device
from posttrain.models.forward import sequence_logps
from posttrain.models.loading import adapter_disabled, autocast_context, frozen_on, load_frozen_lm, resolve_model_path

log = logging.getLogger("posttrain")
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class RefColumn:
    """One group of sequences the reference scores (e.g. the train split's chosen completions).

    items[i] is the sequence of example i; needed lists the indices this run will look up (None = all).
    shares_prompt_with names a column whose item i has the same prompt: the two are scored in one row
    (`shared_prefix.pack_pairs`), the prompt encoded once.
    """

    items: list[Encoded]
    needed: list[int] | None = None
    shares_prompt_with: str | None = None


@torch.no_grad()
def score_sequences(model, items: list[Encoded], pad_id: int, batch_size: int, model_cfg) -> torch.Tensor:
    """Summed completion log-probs (N,) fp32 of `items` under `model`; batches are sorted by length to cut padding."""
    was_training = model.training
    model.eval()
    device = module_device(model)
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    out = torch.empty(len(items), dtype=torch.float32, device="cpu")  # the table is kept on the host
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        with autocast_context(model_cfg, device.type):
            sums, _ = sequence_logps(model, to_device(pad_encoded([items[i] for i in idx], pad_id), device), model_cfg.logprob_chunk)
        out[idx] = sums.float().cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def score_shared_prompt_pairs(model, pairs: list[tuple[Encoded, Encoded]], pad_id: int, batch_size: int, model_cfg):
    """score_sequences for (first, second) pairs that share a prompt, one row per pair -> (N,), (N,) fp32."""
    from posttrain.data.packing import pack_pairs

    was_training = model.training
    model.eval()
    device = module_device(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    firsts, seconds = torch.empty(len(pairs), device="cpu"), torch.empty(len(pairs), device="cpu")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        with autocast_context(model_cfg, device.type):
            packed = to_device(pack_pairs([pairs[i] for i in idx], pad_id), device)
            sums, _ = sequence_logps(model, packed, model_cfg.logprob_chunk)
        firsts[idx], seconds[idx] = sums[: len(idx)].float().cpu(), sums[len(idx):].float().cpu()
    model.train(was_training)
    return firsts, seconds


def planned_indices(order: BatchOrder, n_batches: int) -> list[int]:
    """Example indices that the first `n_batches` batches of a fresh copy of `order` visit (a whole epoch: all)."""
    if n_batches >= order.batches_per_epoch:
        return list(range(len(order.lengths)))
    fresh = BatchOrder(order.lengths, order.batch_size, order.seed, order.group_by_length, order.drop_last)
    return sorted({i for _ in range(n_batches) for i in fresh.next()})


# ---- which model is the reference ----------------------------------------------------------------------------------

def _has_zero_adapter(policy) -> bool:
    lora_b = [p for name, p in policy.named_parameters() if "lora_B" in name]
    return hasattr(policy, "disable_adapter") and bool(lora_b) and all(not p.detach().any() for p in lora_b)


def reference_source(policy, ref_model: str | None) -> str:
    """'ref_model', 'adapter_off' or 'initial_policy' (see the module docstring)."""
    if ref_model:
        return "ref_model"
    return "adapter_off" if _has_zero_adapter(policy) else "initial_policy"


def _param_fingerprint(model) -> str:
    """A cheap fingerprint of the weights: per tensor its name, shape, float64 sum and ~4k strided values."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
            digest.update(f"{name}{tuple(p.shape)}{float(flat.sum(dtype=torch.float64))!r}".encode() + sample)
    return digest.hexdigest()


def _file_fingerprint(name_or_path: str) -> str:
    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        return name_or_path
    files = sorted(f for f in path.iterdir() if f.suffix in (".json", ".safetensors", ".bin", ".gguf"))
    return json.dumps([str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def model_identity(policy, model_cfg, ref_model: str | None) -> str:
    """What the stored numbers depend on besides the data: the reference's weights and the compute settings."""
    source = reference_source(policy, ref_model)
    weights = _file_fingerprint(ref_model) if source == "ref_model" else _param_fingerprint(policy)
    blob = json.dumps([source, weights, model_cfg.dtype, model_cfg.autocast])
    return hashlib.sha256(blob.encode()).hexdigest()


def data_hash(items: list[Encoded]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.input_ids, item.labels]).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _loaded(policy, model_cfg, ref_model):
    frozen = load_frozen_lm(model_cfg, resolve_model_path(ref_model), module_device(policy))
    try:
        with frozen_on(frozen, module_device(policy)):
            yield frozen
    finally:
        del frozen
        gc.collect()


@contextlib.contextmanager
def _adapter_off(policy, model_cfg, ref_model):
    with adapter_disabled(policy):
        yield policy


@contextlib.contextmanager
def _as_is(policy, model_cfg, ref_model):
    yield policy


# How each source is run once, for the precompute pass (a loaded checkpoint is freed when the pass ends) ...
SCORING = {"ref_model": _loaded, "adapter_off": _adapter_off, "initial_policy": _as_is}
# ... and what is kept for every step when precompute_ref=False (None: the policy with its adapter switched off).
LIVE = {
    "ref_model": lambda policy, model_cfg, ref_model: load_frozen_lm(model_cfg, resolve_model_path(ref_model), module_device(policy)),
    "adapter_off": lambda policy, model_cfg, ref_model: None,
    "initial_policy": lambda policy, model_cfg, ref_model: _frozen_copy(policy, model_cfg),
}


def _frozen_copy(policy, model_cfg):
    """The initial policy kept as a frozen model (on the CPU between uses with `model.offload_frozen`)."""
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    return frozen.to("cpu") if model_cfg.offload_frozen else frozen


def scoring_model(policy, model_cfg, ref_model: str | None):
    """The reference as a model to run for as long as the `with` lasts."""
    return SCORING[reference_source(policy, ref_model)](policy, model_cfg, ref_model)


# ---- the stored table ----------------------------------------------------------------------------------------------

def _read_table(path: Path, identity: str) -> dict[str, tuple[str, dict[int, float]]]:
    """{column: (data hash, {index: logp})} from `path`; empty when absent or written for another reference."""
    if not path.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("model") != identity:
            log.warning("%s was computed for another reference model or settings; recomputing it", path)
            return {}
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    columns = {key[len("data/"):] for key in meta if key.startswith("data/")}
    return {
        col: (meta[f"data/{col}"], dict(zip(tensors[f"{col}/index"].tolist(), tensors[f"{col}/logps"].tolist())))
        for col in columns
    }


def _write_table(path: Path, identity: str, table: dict[str, tuple[str, dict[int, float]]]) -> None:
    from safetensors.torch import save_file

    tensors, meta = {}, {"model": identity, "format": "1"}
    for col, (digest, values) in table.items():
        keys = sorted(values)
        tensors[f"{col}/index"] = torch.tensor(keys, dtype=torch.int64, device="cpu")
        tensors[f"{col}/logps"] = torch.tensor([values[k] for k in keys], dtype=torch.float32, device="cpu")
        meta[f"data/{col}"] = digest
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


# ---- the two ways of serving reference log-probs to a loss ---------------------------------------------------------

class PrecomputedReference:
    """Looks up stored sums by batch["ref_keys"]: one (column, example index) per row of the batch."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def logps(self, batch: dict) -> torch.Tensor:
        values = torch.stack([self.tables[col][i] for col, i in batch["ref_keys"]])
        if torch.isnan(values).any():
            missing = [key for key, v in zip(batch["ref_keys"], values.tolist()) if v != v]
            raise RuntimeError(f"reference log-probs of {missing[:3]} were not precomputed")
        return values.to(batch["input_ids"].device, non_blocking=True)


class ModelReference:
    """The reference as a model run on every batch: a frozen copy (`frozen`: a loaded checkpoint or the initial
    policy, on the device or offloaded to the host between uses), or — `frozen` None — the LoRA policy itself with
    its adapter switched off, no copy. Offline losses call `logps(batch)`; online ones run `scoring(device)`."""

    def __init__(self, policy, frozen=None, model_cfg=None):
        self.policy, self.model, self.model_cfg = policy, frozen, model_cfg

    @property
    def copies(self) -> int:
        """Models it adds to memory besides the policy."""
        return 0 if self.model is None else 1

    @contextlib.contextmanager
    def scoring(self, device: torch.device):
        """The module whose forward pass is the reference, on `device`, for the duration."""
        with adapter_disabled(self.policy) if self.model is None else frozen_on(self.model, device) as model:
            yield model

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        """Summed completion log-probs (R,) fp32 of a padded or shared-prompt batch."""
        device = batch["input_ids"].device
        with self.scoring(device) as model, autocast_context(self.model_cfg, device.type):
            sums, _ = sequence_logps(model, batch, self.model_cfg.logprob_chunk)
        return sums.float()


def live_reference(policy, model_cfg, ref_model: str | None) -> ModelReference:
    """The reference for precompute_ref=False, from the source `reference_source` picks."""
    return ModelReference(policy, LIVE[reference_source(policy, ref_model)](policy, model_cfg, ref_model), model_cfg)


def precompute(policy, cfg, columns: dict[str, RefColumn], pad_id: int, ref_model: str | None):
    """Load what the run directory holds, score what is missing, save; -> (PrecomputedReference, metrics)."""
    start = time.perf_counter()
    path = Path(cfg.train.output_dir) / REFERENCE_FILE
    identity = model_identity(policy, cfg.model, ref_model)
    stored = _read_table(path, identity)
    table, todo = {}, {}
    for col, spec in columns.items():
        digest = data_hash(spec.items)
        values = stored[col][1] if col in stored and stored[col][0] == digest else {}
        needed = range(len(spec.items)) if spec.needed is None else spec.needed
        todo[col] = [i for i in needed if i not in values]
        table[col] = (digest, dict(values))
    computed = sum(map(len, todo.values()))
    if computed:
        with scoring_model(policy, cfg.model, ref_model) as model:
            _score_missing(model, columns, todo, table, pad_id, cfg)
        del model  # a loaded ref_model must not outlive the pass
    if computed or set(stored) != set(table):
        _write_table(path, identity, table)
    dense = {}
    for col, (_, values) in table.items():
        dense[col] = torch.full((len(columns[col].items),), float("nan"), device="cpu")
        if values:
            index = torch.tensor(list(values), dtype=torch.long, device="cpu")
            dense[col][index] = torch.tensor(list(values.values()), dtype=torch.float32, device="cpu")
    needed_total = sum(len(s.items) if s.needed is None else len(s.needed) for s in columns.values())
    metrics = {
        "reference/computed": computed, "reference/reused": needed_total - computed,
        "reference/seconds": time.perf_counter() - start,
    }
    return PrecomputedReference(dense), metrics


def _score_missing(model, columns: dict[str, RefColumn], todo: dict[str, list[int]], table: dict, pad_id: int, cfg) -> None:
    """Score todo[col] of every column into table[col]; indices missing from a column and its prompt partner go
    through one shared-prompt row each, the rest through rows of their own."""
    from posttrain.models.shared_prefix import supports_shared_prefix

    batch_size = 2 * cfg.train.batch_size
    for col in todo:
        partner = columns[col].shares_prompt_with
        if partner in todo and supports_shared_prefix(model):
            both = sorted(set(todo[col]) & set(todo[partner]))
            pairs = [(columns[col].items[i], columns[partner].items[i]) for i in both]
            firsts, seconds = score_shared_prompt_pairs(model, pairs, pad_id, batch_size, cfg.model)
            table[col][1].update(zip(both, firsts.tolist()))
            table[partner][1].update(zip(both, seconds.tolist()))
            done = set(both)
            todo[col] = [i for i in todo[col] if i not in done]
            todo[partner] = [i for i in todo[partner] if i not in done]
        sums = score_sequences(model, [columns[col].items[i] for i in todo[col]], pad_id, batch_size, cfg.model)
        table[col][1].update(zip(todo[col], sums.tolist()))


def build_reference(policy, cfg, columns: dict[str, RefColumn], pad_id: int, ref_model: str | None, precompute_ref: bool):
    """The reference for a loss that needs one -> (reference with .logps(batch), metrics logged once)."""
    if precompute_ref:
        ref, metrics = precompute(policy, cfg, columns, pad_id, ref_model)
        return ref, {**metrics, "models_in_memory": 1}
    live = live_reference(policy, cfg.model, ref_model)
    return live, {"models_in_memory": 1 + live.copies}
