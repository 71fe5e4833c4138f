"""Reward functions by name: ``REWARDS`` (filled by ``@register_reward``) and ``load_reward``.

A reward function is a plain callable ``fn(prompts, completions, **columns) -> list[float]`` (the README's contract);
columns are the extra dataset columns as lists (``answer``, ``tests`` ...). NaN means "masked": the reward
could not be computed for a reason that is not the completion's fault (unparseable gold answer, sandbox failure).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from typing import Callable

from posttrain.registry import Registry

RewardFn = Callable[..., list]
REWARDS = Registry("reward")
_BUILTIN_MODULES = ("posttrain.rewards.verifiers", "posttrain.rewards.sandbox")


register_reward = REWARDS.register  # `@register_reward(name)`: `fn` loadable as `load_reward(name)`


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:  # light modules: heavy dependencies are imported inside the functions
        importlib.import_module(module)


def _from_module(spec: str) -> RewardFn:
    """Import ``module:function``: only ever the module the spec names, never a scan."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward spec {spec!r}: expected a built-in name or 'module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward spec {spec!r}: {attr!r} is not callable")
    return obj


def _check_options(spec: str, fn, kwargs: dict) -> None:
    """Options must be keyword parameters of ``fn``: a typo fails here, not silently as an unused column."""
    params = inspect.signature(fn).parameters
    known = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or (p.default is not p.empty)}
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"reward {spec!r} has no option {key!r} (options: {sorted(known)}){hint}")


def load_reward(spec: str, **kwargs) -> RewardFn:
    """A reward function from a built-in name (``"numeric"``) or ``"module:function"``.

    ``kwargs`` are the function's keyword options (e.g. ``tolerance=1e-3``), bound with ``functools.partial``;
    the result keeps the plain-callable contract. A ``module:function`` spec imports exactly that module.
    """
    if ":" in spec:
        fn = _from_module(spec)
    else:
        _load_builtins()
        if spec not in REWARDS:
            close = difflib.get_close_matches(spec, sorted(REWARDS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown reward {spec!r}. Built-in rewards: {sorted(REWARDS)}; or give "
                             f"'module:function'.{hint}")
        fn = REWARDS[spec]
    if not kwargs:
        return fn
    _check_options(spec, fn, kwargs)
    bound = functools.partial(fn, **kwargs)
    bound.__name__ = getattr(fn, "__name__", spec)
    return bound
