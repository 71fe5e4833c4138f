"""Names that select code: one small registry type behind every `@register_...` decorator.

A `Registry` is a dict (so `name in R`, `R[name]`, `sorted(R)` work) with a decorator that adds an entry and
refuses a second, different entry under the same name (a module imported twice by another path re-registers
the same function: that is allowed), and a `lookup` whose error lists the known names.
"""

from __future__ import annotations

from typing import Any, Callable


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # "KL estimator", "rollout engine": how errors name an entry

    def add(self, name: str, value: Any) -> Any:
        old = self.get(name)
        if old is not None and old is not value and _qualname(old) != _qualname(value):
            raise ValueError(f"{self.kind} {name!r} is already registered ({_qualname(old)}); refusing {_qualname(value)}")
        self[name] = value
        return value

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: `@R.register("name")` over a function or class adds it under `name` and returns it."""
        return lambda obj: self.add(name, obj)

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}")
        return self[name]


def _qualname(obj: Any) -> str:
    target = getattr(obj, "fn", obj)  # specs that wrap a function compare by it
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
