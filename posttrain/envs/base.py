"""The environment protocol: created per prompt row, it opens the conversation, then answers each assistant turn.

    env = EnvClass(**options)             # one per trajectory (G per prompt)
    messages = env.reset(record)          # the record's columns (prompt, answer, ...) -> the opening messages
    step = env.step(assistant_text)       # -> EnvStep(messages=[tool results / user reply], reward, done)

The conversation ends when a step says `done`, at `max_turns`, at the token budget, or when the policy's turn is
cut by its length limit. The trajectory's reward is the sum of the per-turn rewards (None counts 0) plus what the
run's reward functions give the last assistant message; an environment used without reward functions
(`algo.reward.functions: []`) rewards through its steps alone. Built-in environments register by name
(`@register_environment("tools")`); any other loads as `module:Class`, as reward functions do.
"""

from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from posttrain.registry import Registry


@dataclass
class EnvStep:
    """What comes after an assistant turn: `messages` ({"role": "tool" | "user", "content": ...}) to append,
    an optional `reward` for that turn, `done` to end, `info` counters summed into the metrics (env/<key>)."""

    messages: list[dict] = field(default_factory=list)
    reward: float | None = None
    done: bool = False
    info: dict = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    def reset(self, record: dict) -> list[dict]: ...

    def step(self, assistant_text: str) -> EnvStep: ...


ENVIRONMENTS = Registry("environment")
register_environment = ENVIRONMENTS.register
_BUILTIN_MODULES = ("posttrain.envs.tools",)


def load_environment(name: str) -> type:
    """The environment class `name`: a built-in one, or `module:Class` (the module importable from the run)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"algo.env.name={name!r}: cannot load {attr!r} from module {module!r}: {e}") from e
    else:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        cls = ENVIRONMENTS.lookup(name)
    if not (callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise ValueError(f"environment {name!r} must define reset(record) and step(assistant_text)")
    return cls


def guarded_calls(calls: list, timeout_s: float) -> list[tuple[object, str]]:
    """Run the zero-argument `calls` concurrently on daemon threads: (result, error) each, the error '' on success,
    the exception's type and message when it raised, 'timed out' when it still ran `timeout_s` after the start
    (then abandoned: Python cannot kill a thread, so a tool that may hang must also bound itself, as the sandbox does)."""
    boxes = [{} for _ in calls]

    def target(fn, box):
        try:
            box["result"] = fn()
        except Exception as e:  # an environment's or tool's failure is the trajectory's, never the run's
            box["error"] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=target, args=(fn, box), daemon=True) for fn, box in zip(calls, boxes)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [(b.get("result"), "timed out" if t.is_alive() else b.get("error", "")) for t, b in zip(threads, boxes)]
