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
