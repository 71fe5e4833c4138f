"""The algorithms and commands, each declared once by a decorator on its own class or function:

    @algorithm("grpo", config=GRPOConfig, help="GRPO / Dr. GRPO / RLOO / DAPO with verifiable rewards")
    class GRPO(OnlineBase): ...

That one line makes `posttrain grpo` a command (its `--help`, its `algo.*` section, its everyday flags), lets
`load_config("grpo", ...)` build its config, and lets `run(cfg)` train it on the one loop. Adding an algorithm
touches its own file only: `discover()` finds the decorators by reading the source of `posttrain/train/*.py`
and `posttrain/*.py` (no import, so `posttrain --help` stays fast), and a command's module is imported when the
command runs.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from posttrain.config import RunConfig, register_algo_section
from posttrain.registry import Registry

ALGORITHMS = Registry("command")
_SCANNED = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent)  # posttrain/train, posttrain
_DECORATORS = ("algorithm", "command")


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    config: type  # the dataclass of its `algo` section
    help: str
    cls: type | None = None  # an Algorithm for the one loop ...
    runner: Callable[[RunConfig], dict] | None = None  # ... or a command that runs its own way (overopt)

    @property
    def fn(self):  # what the registry compares when a module is imported twice
        return self.cls or self.runner


def _registering(name: str, config: type, help: str, field: str):
    def deco(obj):
        ALGORITHMS.add(name, AlgorithmSpec(name, config, help, **{field: obj}))
        register_algo_section(name, config)
        return obj

    return deco


def algorithm(name: str, config: type, help: str):
    """Class decorator: the Algorithm trained by `posttrain NAME`, with its config dataclass and one-line help."""
    return _registering(name, config, help, "cls")


def command(name: str, config: type, help: str):
    """Function decorator: `fn(RunConfig) -> dict` run by `posttrain NAME` (a command that is not a training loop)."""
    return _registering(name, config, help, "runner")


@lru_cache(maxsize=1)
def discover() -> dict[str, tuple[str, str]]:
    """{command: (module, help)} from the decorators in the source files, in file order."""
    found: dict[str, tuple[str, str]] = {}
    for folder in _SCANNED:
        package = "posttrain" if folder.name == "posttrain" else "posttrain.train"
        for path in sorted(folder.glob("*.py")):
            for name, help_text in _decorated(path):
                found[name] = (f"{package}.{path.stem}", help_text)
    return found


def _decorated(path: Path):
    source = path.read_text()
    if not any(f"@{d}(" in source for d in _DECORATORS):
        return
    for node in ast.walk(ast.parse(source)):
        for deco in getattr(node, "decorator_list", []):
            if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) in _DECORATORS and deco.args:
                help_kw = next((k.value for k in deco.keywords if k.arg == "help"), None)
                yield ast.literal_eval(deco.args[0]), ast.literal_eval(help_kw) if help_kw is not None else ""


def get(name: str) -> AlgorithmSpec:
    """The spec of command `name`, its module imported (which registers it)."""
    if name not in ALGORITHMS:
        module = discover().get(name, (None,))[0]
        if module is None:
            raise KeyError(f"unknown command {name!r}; choose one of {sorted(discover())}")
        importlib.import_module(module)
    return ALGORITHMS.lookup(name)


def build(cfg: RunConfig):
    """The Algorithm of `cfg.command`, constructed from the config."""
    return get(cfg.command).cls(cfg)


def run(cfg: RunConfig) -> dict:
    """`posttrain CMD`: set up the run directory, train on the one loop (or run the command), return the last
    logged metrics."""
    from posttrain.train import common
    from posttrain.train.loop import Trainer

    spec = get(cfg.command)
    if spec.runner is not None:
        return spec.runner(cfg)
    common.setup_run(cfg)
    return Trainer(spec.cls(cfg), cfg.train).fit()
