"""The one training loop. Every algorithm plugs in through the small `Algorithm` protocol below.

One loop step = one iteration of the algorithm: it asks the algorithm for its optimizer updates (SFT: one
update of `grad_accum` micro-batches; GRPO/PPO: a rollout, then several updates over it), runs them with
gradient accumulation normalized by the whole update's token/sequence counts, clips, skips non-finite
steps, logs, evaluates and checkpoints. Resuming restores everything, so a resumed run logs the same metrics.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from posttrain.config import TrainConfig
from posttrain.devices import to_device
from posttrain.metrics import MetricsLogger, memory_metrics
from posttrain.train import checkpoint as ckpt
from posttrain.train import distributed, sharding
from posttrain.train.model_card import write_model_card
from posttrain.train.samples import SampleWriter, drop_rows_after
from posttrain.train.stopping import CtrlC, progress_bar


log = logging.getLogger("posttrain")


class NonFiniteLossError(RuntimeError):
    """Raised after `max_bad_steps` consecutive non-finite losses or gradients."""


@dataclass
class Iteration:
    """What an algorithm hands the loop for one step: updates (each a list of micro-batches) and metrics."""

    updates: list[list[Any]]
    metrics: dict = field(default_factory=dict)


class Algorithm(Protocol):
    """What the loop asks of an algorithm (`common.DatasetAlgorithm` gives the defaults)."""

    device: torch.device  # where its models live: the loop moves every micro-batch there before `loss`
    model: torch.nn.Module  # the trained model `export` writes (gathered first when sharded)
    monitor: Any  # failure-mode monitor (train/monitors.FailureMonitor) or None
    def early_stop(self) -> bool: ...  # after an update: skip this iteration's remaining updates (PPO's target_kl)
    def modules(self) -> dict[str, torch.nn.Module]: ...  # trained and checkpointed modules by name
    def next_iteration(self, step: int) -> Iteration: ...
    def totals(self, update: list[Any]) -> dict: ...  # counts over the whole accumulated update
    def loss(self, micro: Any, totals: dict): ...  # -> LossOutput
    def state_dict(self) -> dict: ...  # data position and any algorithm state
    def load_state_dict(self, state: dict) -> None: ...
    def evaluate(self) -> dict: ...
    def export(self, out_dir: Path, state_dict: dict | None = None) -> None: ...  # state_dict: gathered weights
    updates_per_step: int


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_scheduler(optimizer, cfg: TrainConfig, total_updates: int):
    """Linear warmup, then cosine or linear decay to 0 (or constant)."""
    if cfg.schedule not in ("cosine", "linear", "constant"):  # up front: not after a warmup's worth of training
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, linear or constant")

    def factor(update: int) -> float:
        if update < cfg.warmup_steps:
            return (update + 1) / (cfg.warmup_steps + 1)
        progress = (update - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps)
        progress = min(progress, 1.0)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return 1.0 - progress
        if cfg.schedule == "constant":
            return 1.0
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, linear or constant")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (floating-point tensors on CPU or CUDA): one pass over each tensor
    instead of a dozen (the README has the measured step times); TRL (transformers' adamw_torch_fused default)
    already fuses. Its state is created on each parameter's device."""
    fused = cfg.fused_adamw and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    # sharded (DTensor) and whole parameters in separate groups: a fused kernel call takes one kind only
    groups = [g for g in ([p for p in params if sharding.is_dtensor(p)], [p for p in params if not sharding.is_dtensor(p)]) if g]
    return torch.optim.AdamW([{"params": g} for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None)


def _shard(algo: Algorithm, cfg: TrainConfig) -> list[torch.nn.Module]:
    """The trained modules sharded per `train.sharding` when several processes run (sharding.py); [] otherwise."""
    mode = sharding.resolve_sharding(cfg)
    if mode == "none":
        return []
    if not distributed.context().enabled:
        log.info("train.sharding=%s has no effect in a single process", mode)
        return []
    modules = [m for m in algo.modules().values() if any(p.requires_grad for p in m.parameters())]
    for module in modules:
        sharding.shard(module, mode)
    return modules


def _params(algo: Algorithm) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for module in algo.modules().values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return params


def _run_update(algo, update, params, cfg: TrainConfig, device: torch.device) -> tuple[dict, bool]:
    """Forward/backward every micro-batch of one optimizer update; returns (metrics, finite).

    Counts are summed over processes first, so every loss is normalized by the whole global update; gradients
    are then summed over processes. A non-finite loss skips its backward but not the collective calls, so
    ranks stay in step. Counts come from the host-side micro-batches; each is moved to `device` for its loss.
    """
    totals = distributed.sum_counts(algo.totals(update))
    sharded = any(sharding.is_dtensor(p) for p in params)
    if sharded:
        update = _same_number_of_passes(update)
    sums: dict = {}  # per key: a running sum (a 0-d float64 tensor while on the device)
    seen: dict[str, int] = {}  # per key: a metric absent from some micro-batches (e.g. KTO's one-sided ones) averages over the rest
    loss_sum = None
    for micro in update:
        out = algo.loss(to_device(micro, device), totals) if micro is not None else _zero_pass(algo, to_device(update[0], device), totals)
        # always backward: a non-finite loss makes the update's loss sum non-finite, so the step is skipped and its
        # gradients zeroed below; no host sync here (and a sharded backward is a collective every rank must join)
        out.loss.backward()
        if micro is None:
            continue
        loss_sum = _accumulate(loss_sum, out.loss)
        for key, value in out.metrics.items():
            sums[key] = _accumulate(sums.get(key), value)
            seen[key] = seen.get(key, 0) + 1
    distributed.all_reduce_gradients([p for p in params if not sharding.is_dtensor(p)])  # sharded ones: in backward
    if sharded:
        grad_norm = sharding.clip_grad_norm(params, cfg.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    loss_total, grad_norm, *values = _to_host([0.0 if loss_sum is None else loss_sum, grad_norm, *sums.values()])
    sums = dict(zip(sums, values))
    finite = distributed.all_ranks(math.isfinite(loss_total) and math.isfinite(grad_norm))
    if not finite:
        return {"loss": float("nan")}, False
    metrics = {key: value / seen[key] for key, value in sums.items()}
    metrics.update(loss=loss_total, grad_norm=grad_norm, tokens=totals.get("tokens", 0))
    return metrics, True


def _accumulate(total, value):
    """total + value, summed in float64 after rounding to fp32 (what reading each value to the host did), kept on
    the device: the update's numbers cross to the host once, in `_to_host`."""
    value = value.detach().float().double() if torch.is_tensor(value) else float(value)
    return value if total is None else total + value


def _to_host(values: list) -> list[float]:
    """Python floats of a list of numbers and 0-d tensors, with one device-to-host copy for all the tensors."""
    tensors = [v.reshape(()).double() for v in values if torch.is_tensor(v)]
    host = iter(torch.stack(tensors).tolist() if tensors else [])
    return [next(host) if torch.is_tensor(v) else float(v) for v in values]


def _same_number_of_passes(update: list) -> list:
    """Sharded weights are gathered inside every forward and backward, so every rank must run as many as the rank
    with the most micro-batches: the others add passes (None) that contribute zero gradient."""
    most = distributed.max_over_ranks(len(update))
    if most and not update:
        raise RuntimeError("train.sharding: this rank has no micro-batch in an update where another rank has some")
    return list(update) + [None] * (most - len(update))


def _zero_pass(algo, micro, totals):
    """A forward and backward through the same modules that changes no gradient (loss x 0)."""
    out = algo.loss(micro, totals)
    return type(out)(out.loss * 0.0, {})


def _mean_rows(rows: list[dict]) -> dict:
    keys = {k for row in rows for k in row}
    out = {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
    out["tokens"] = sum(r.get("tokens", 0) for r in rows)
    return out


class Trainer:
    """Runs an Algorithm under a TrainConfig, writing the run directory of the README's contract."""

    def __init__(self, algo: Algorithm, cfg: TrainConfig):
        self.algo, self.cfg = algo, cfg
        self.device = algo.device
        self.is_main = distributed.context().is_main  # only rank 0 writes files
        self.out_dir = Path(cfg.output_dir)
        self.sharded = _shard(algo, cfg)  # before the optimizer: sharding replaces the parameters
        self.params = _params(algo)
        self.optimizer = make_optimizer(self.params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, cfg.max_steps * max(1, algo.updates_per_step))
        self.step, self.bad_in_a_row = 0, 0
        self.monitor = algo.monitor  # failure-mode monitors (online algorithms; None elsewhere)
        self._step_start, self._applied = None, False  # what a Ctrl-C in the middle of a step rolls back to
        self.samples = SampleWriter(algo, self.out_dir, cfg.samples_per_step, self.is_main)  # samples.jsonl (online)

    def _state(self) -> dict:
        state = {"step": self.step, "algo": self.algo.state_dict(), "bad_in_a_row": self.bad_in_a_row}
        if self.monitor is not None:
            state["monitor"] = self.monitor.state_dict()
        return state

    def save(self) -> Path | None:
        path = None
        gathered = ckpt.gather_sharded(self.algo.modules(), self.optimizer, self.cfg.save_only_model) if self.sharded else None
        if self.is_main:
            path = ckpt.save_checkpoint(
                self.out_dir / "checkpoints", self.step, self.algo.modules(), self.optimizer, self.scheduler,
                self._state(), keep=self.cfg.keep_checkpoints, only_model=self.cfg.save_only_model, gathered=gathered,
            )
        distributed.barrier()
        return path

    def evaluate(self) -> dict:
        """Evaluation runs on rank 0; every rank receives its numbers."""
        with sharding.full_params(*self.sharded):  # rank 0 alone runs forwards: no collective may be inside them
            result = self.algo.evaluate() if self.is_main else None
        return distributed.broadcast_object(result) or {}

    def maybe_resume(self) -> bool:
        found = ckpt.list_checkpoints(self.out_dir / "checkpoints") if self.cfg.resume else []
        if not found:
            return False
        state = ckpt.load_checkpoint(found[-1], self.algo.modules(), self.optimizer, self.scheduler, bool(self.sharded))
        self.step, self.bad_in_a_row = state["step"], state.get("bad_in_a_row", 0)
        self.algo.load_state_dict(state["algo"])
        if self.monitor is not None and "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
        if self.is_main:  # warnings of steps past the checkpoint: the replayed steps raise them again
            drop_rows_after(self.out_dir / "warnings.jsonl", self.step)
        return True

    def _watch(self, step: int, metrics: dict) -> None:
        """Failure-mode alerts: logged as warnings with their step, kept in warnings.jsonl and the metrics."""
        if self.monitor is None:
            return
        for alert in self.monitor.observe(step, metrics):
            metrics[f"alerts/{alert.kind}"] = 1.0
            if self.is_main:
                log.warning("step %d: %s: %s", step, alert.kind, alert.message)
                with open(self.out_dir / "warnings.jsonl", "a") as f:
                    f.write(json.dumps(alert.as_dict()) + "\n")

    def _one_step(self) -> dict:
        start = time.perf_counter()
        self._step_start, self._applied = copy.deepcopy(self.algo.state_dict()), False
        iteration = self.algo.next_iteration(self.step + 1)
        self.samples.write(self.step + 1, self.algo)
        rows = []
        for update in iteration.updates:
            self.optimizer.zero_grad(set_to_none=True)
            metrics, finite = _run_update(self.algo, update, self.params, self.cfg, self.device)
            if not finite:
                self.bad_in_a_row += 1
                self.optimizer.zero_grad(set_to_none=True)
                if self.bad_in_a_row >= self.cfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"step {self.step + 1}: {self.bad_in_a_row} non-finite losses or gradients in a row; "
                        "stopping (lower the learning rate, use fp32, or inspect the data)"
                    )
                rows.append({"skipped": 1.0})
                continue
            if rows and distributed.any_rank(self.algo.early_stop()):
                break  # PPO's trust region: this minibatch saw the policy past target_kl, so it is not applied
            self.optimizer.step()
            self._applied = True
            self.scheduler.step()
            self.bad_in_a_row = 0
            rows.append(metrics)
        self.step += 1
        # each rank's loss is its share of the globally normalized loss: shares add up, other metrics average
        out = distributed.mean_metrics({**_mean_rows(rows), **iteration.metrics}, summed=("tokens", "loss"))
        elapsed = time.perf_counter() - start
        out.update(lr=self.scheduler.get_last_lr()[0], step_time_s=elapsed, **memory_metrics(self.device))
        out["tokens_per_s"] = out.pop("tokens", 0) / max(elapsed, 1e-9)
        out["skipped"] = sum(r.get("skipped", 0.0) for r in rows)
        out["updates"] = float(len(rows))
        return out

    def _save_interrupted(self, mid_step: bool) -> Path | None:
        """The checkpoint a Ctrl-C leaves holds finished steps only. Interrupted mid-step (a second Ctrl-C, or a
        KeyboardInterrupt raised by code), the step is rolled back if none of its updates was applied yet; if one
        was, the newest checkpoint already on disk stands."""
        if mid_step and self._applied:
            found = ckpt.list_checkpoints(self.out_dir / "checkpoints")
            return found[-1] if found else None
        if mid_step and self._step_start is not None:
            self.algo.load_state_dict(self._step_start)
        return self.save()

    def fit(self) -> dict:
        seed_everything(self.cfg.seed)
        resumed = self.maybe_resume()
        self.samples.resume(self.step)  # samples past the checkpoint (all of them on a fresh start) are written again
        logger = MetricsLogger(self.out_dir, self.cfg.tensorboard, resume_step=self.step if resumed else None, enabled=self.is_main,
                               report_to=self.cfg.report_to, project=self.cfg.tracker_project)
        bar = progress_bar(self.cfg, self.step, self.is_main)
        last: dict = {}
        trainable = sum(p.numel() for p in self.params)
        once = {"params/trainable": trainable, "params/total": sum(p.numel() for m in self.algo.modules().values() for p in m.parameters()),
                "processes": distributed.context().world, "sharded_modules": len(self.sharded)}
        stop = CtrlC.install()
        try:
            deadline = time.monotonic() + 60 * self.cfg.max_minutes if self.cfg.max_minutes > 0 else math.inf
            while self.step < self.cfg.max_steps and not stop.requested:
                if deadline < math.inf and distributed.any_rank(time.monotonic() > deadline):
                    log.warning("train.max_minutes=%s reached at step %d", self.cfg.max_minutes, self.step)
                    break
                metrics = self._one_step()
                at = self.step
                if self.cfg.eval_every and at % self.cfg.eval_every == 0 and at < self.cfg.max_steps:
                    metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                self._watch(at, metrics)
                if at % max(1, self.cfg.log_every) == 0 or at == self.cfg.max_steps:
                    last = logger.log(at, {**metrics, **once})
                    once = {}
                if self.cfg.save_every and at % self.cfg.save_every == 0 and at < self.cfg.max_steps:
                    self.save()
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
            if stop.requested and self.step < self.cfg.max_steps:
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            # Ctrl-C: keep the work done so far; `--resume` continues from here.
            path = self._save_interrupted(mid_step=stop.count != 1)
            bar.close()
            logger.close()
            raise SystemExit(f"interrupted at step {self.step}; checkpoint saved to {path}") from None
        finally:
            stop.uninstall()
        bar.close()
        final_eval = {f"eval/{k}": v for k, v in self.evaluate().items()}
        if final_eval:
            last = logger.log(self.step, {**final_eval, "final": True})
        self.save()
        weights = sharding.full_state_dict(self.algo.model) if sharding.is_sharded(self.algo.model) else None
        if self.is_main:
            self.algo.export(self.out_dir / "final", state_dict=weights)
            write_model_card(self.out_dir)  # after the final eval row: the card quotes it
        logger.close()
        return last

