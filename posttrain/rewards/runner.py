"""Run several reward functions over a batch: per-sample timeouts, error policy, weighted total, metrics.

``RewardRunner([(name, fn, weight), ...])(prompts, completions, **columns)`` calls each function once per
sample (``fn([p], [c], col=[v])``) on a pool of daemon threads, so one sample that raises or hangs is
attributed to its index and cannot hold the batch beyond ``timeout_s``. A function marked ``fn.batched = True``
(a reward model on a GPU) is called once on the whole batch, its timeout covering the whole call.

Python cannot kill a thread: a call that overruns is abandoned (its daemon thread runs on, and its late result
is ignored) and a fresh thread takes its slot. Rewards that may hang on untrusted input should bound themselves
in a subprocess, as the ``code`` reward does.

NaN from a reward means "masked" (see ``registry``); it propagates to the weighted total, so a sample masked by
any weighted reward is masked as a whole, and is left out of ``mean``/``std`` and counted in ``masked``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

ON_ERROR = ("raise", "zero")


class RewardError(RuntimeError):
    """A reward function raised, timed out, or returned the wrong number of values."""


@dataclass
class RewardBatch:
    """``total[i] = sum_k weight_k * per_fn[name_k][i]``; ``errors[name]`` counts samples zeroed by on_error."""

    total: list[float]
    per_fn: dict[str, list[float]]
    errors: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``rewards/<name>/{mean,std,errors,masked}`` and ``rewards/total/{mean,std,masked}`` (std: ddof 0)."""
        out = {}
        for name, values in [*self.per_fn.items(), ("total", self.total)]:
            mean, std, masked = nan_stats(values)
            out |= {f"rewards/{name}/mean": mean, f"rewards/{name}/std": std, f"rewards/{name}/masked": masked}
            if name in self.errors:
                out[f"rewards/{name}/errors"] = float(self.errors[name])
        return out


def nan_stats(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, population std, number of NaNs) over the non-NaN values; NaN mean/std when all are NaN."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan, float(len(values))
    mean = sum(kept) / len(kept)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept)), float(len(values) - len(kept))


def combine(per_fn: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    """Weighted sum per sample; weight-0 rewards are logged only and cannot mask the total."""
    used = [name for name in per_fn if weights[name] != 0]
    n = len(next(iter(per_fn.values()))) if per_fn else 0
    return [sum(weights[name] * per_fn[name][i] for name in used) for i in range(n)]


def ensemble(fns: Sequence[Callable], k: float = 0.0) -> Callable:
    """One reward from several (e.g. reward models): per sample ``mean - k * std`` over the members
    (population std), the pessimistic ensemble of Coste et al. 2024 ("Reward Model Ensembles Help Mitigate
    Overoptimization", uncertainty-weighted optimisation) when k > 0. NaN from any member masks the sample."""
    if not fns:
        raise ValueError("ensemble needs at least one reward function")

    def reward(prompts, completions, **columns):
        scores = [list(map(float, fn(prompts, completions, **columns))) for fn in fns]  # (F, B)
        out = []
        for column in zip(*scores, strict=True):
            if any(math.isnan(v) for v in column):
                out.append(math.nan)
                continue
            mean = sum(column) / len(column)
            out.append(mean - k * math.sqrt(sum((v - mean) ** 2 for v in column) / len(column)))
        return out

    reward.batched = any(getattr(fn, "batched", False) for fn in fns)
    reward.__name__ = f"ensemble_of_{len(fns)}"
    return reward


class RewardRunner:
    """Calls ``fns`` (``(name, fn, weight)`` triples) on a batch; see the module docstring."""

    def __init__(self, fns, num_workers: int = 2, timeout_s: float = 60.0, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        names = [name for name, _, _ in fns]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError("num_workers must be >= 1 and timeout_s > 0")
        self.fns = [(name, fn, float(weight)) for name, fn, weight in fns]
        self.num_workers, self.timeout_s, self.on_error = num_workers, timeout_s, on_error

    def __call__(self, prompts: list, completions: list, **columns) -> RewardBatch:
        n = len(prompts)
        if len(completions) != n or any(len(v) != n for v in columns.values()):
            raise ValueError("prompts, completions and every column must have the same length")
        tasks = []
        for name, fn, _ in self.fns:
            if getattr(fn, "batched", False):
                tasks.append(((name, None), _call(fn, prompts, completions, columns, n)))
            else:
                for i in range(n):
                    cols = {key: [values[i]] for key, values in columns.items()}
                    tasks.append(((name, i), _call(fn, [prompts[i]], [completions[i]], cols, 1)))
        results, failures = self._run(tasks)
        per_fn = {name: [math.nan] * n for name, _, _ in self.fns}
        errors = {name: 0 for name, _, _ in self.fns}
        for (name, i), values in results.items():
            per_fn[name][slice(None) if i is None else slice(i, i + 1)] = values
        for (name, i), err in failures.items():
            errors[name] += n if i is None else 1
            per_fn[name][slice(None) if i is None else slice(i, i + 1)] = [0.0] * (n if i is None else 1)
        return RewardBatch(combine(per_fn, {name: w for name, _, w in self.fns}), per_fn, errors)

    def _fail(self, key, err: BaseException) -> RewardError:
        name, i = key
        where = "the whole batch" if i is None else f"sample {i}"
        return RewardError(f"reward {name!r} failed on {where}: {type(err).__name__}: {err}")

    def _run(self, tasks):
        """Run ``(key, call)`` tasks on at most ``num_workers`` daemon threads, each within ``timeout_s``."""
        done: queue.Queue = queue.Queue()
        pending, running = deque(tasks), {}
        results, failures = {}, {}
        while pending or running:
            while pending and len(running) < self.num_workers:
                key, call = pending.popleft()
                running[key] = time.monotonic() + self.timeout_s
                threading.Thread(target=_worker, args=(key, call, done), daemon=True, name=f"reward-{key}").start()
            try:
                key, ok, value = done.get(timeout=max(0.0, min(running.values()) - time.monotonic()))
            except queue.Empty:
                now = time.monotonic()
                for key in [k for k, deadline in running.items() if deadline <= now]:
                    del running[key]  # abandoned: its thread runs on, its result will be ignored
                    failures[key] = TimeoutError(f"no result within {self.timeout_s} s")
                    if self.on_error == "raise":
                        raise self._fail(key, failures[key])
                continue
            if running.pop(key, None) is None:
                continue  # arrived after its timeout
            if ok:
                results[key] = value
                continue
            failures[key] = value
            if self.on_error == "raise":
                raise self._fail(key, value) from value
        return results, failures


def _call(fn, prompts, completions, columns, n):
    def call():
        values = fn(prompts, completions, **columns)
        if len(values) != n:
            raise RewardError(f"returned {len(values)} values for {n} samples")
        return [float(v) for v in values]

    return call


def _worker(key, call, done: queue.Queue) -> None:
    try:
        done.put((key, True, call()))
    except BaseException as e:  # reported to the caller, who applies on_error
        done.put((key, False, e))
