"""Renamed config keys: an old dotted key (or section) accepted as its new name for one release, with one
deprecation warning per old key; a rename may hold for some commands only (GRPO's `algo.beta` is `algo.kl.beta`,
DPO's stays `algo.beta`). `posttrain.config.load_config` applies them to files, flags and overrides."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("posttrain.config")

# ---- renamed keys ---------------------------------------------------------------------------------------------------

# old dotted key -> new dotted key; either may be a field or a whole section (`algo.reference` -> `algo.ref`) and they
# may sit in different sections. Saved configs and scripts keep working for one release after a rename; the module
# that moved the field registers it with `rename_key` next to the field.
RENAMED_KEYS: dict[str, str] = {}
_COMMAND_RENAMES: dict[str, dict[str, str]] = {}  # renames that hold for some commands only (algo.beta of GRPO ...)


def rename_key(old: str, new: str, commands: tuple[str, ...] = ()) -> None:
    """Accept the dotted key (or section) `old` as `new` for one release, with a deprecation warning; `commands`
    limits the rename to those commands (another command may still use `old` as it is: DPO's algo.beta)."""
    if old == new:
        raise ValueError(f"config key {old!r} cannot be renamed to itself")
    for table in ([_COMMAND_RENAMES.setdefault(c, {}) for c in commands] or [RENAMED_KEYS]):
        if table.get(old, new) != new:
            raise ValueError(f"config key {old!r} is already renamed to {table[old]!r}; refusing {new!r}")
        table[old] = new


def current_key(dotted: str, command: str | None = None) -> str:
    """The name `dotted` has now for `command` (itself unless it was renamed)."""
    return _renamed(dotted, renames_for(command))[0]


def renames_for(command: str | None) -> dict[str, str]:
    """The renamed keys that hold for `command`: every command's, then its own."""
    return {**RENAMED_KEYS, **_COMMAND_RENAMES.get(command or "", {})}


def _renamed(dotted: str, renames: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(the current name of `dotted`, the deprecated key it went through or None): the longest renamed key that
    is `dotted` or a section above it is replaced, repeatedly, so chains of renames resolve (a cycle stops)."""
    renames = RENAMED_KEYS if renames is None else renames
    used, seen = None, set()
    while dotted not in seen:
        seen.add(dotted)
        parts = dotted.split(".")
        sections = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]  # longest first
        old = next((key for key in sections if key in renames), None)
        if old is None:
            break
        dotted, used = ".".join([renames[old], *parts[old.count(".") + 1:]]), used or old
    return dotted, used


def _deprecated(old: str, warned: set[str], renames: dict[str, str] | None = None) -> None:
    if old not in warned:  # once per old key and config, however many of its fields the config sets
        warned.add(old)
        log.warning("config key %r is deprecated; use %r (the old name goes in the next release)",
                    old, _renamed(old, renames)[0])


def _rename_tree(tree: dict, warned: set[str], renames: dict[str, str] | None = None) -> None:
    """Move the renamed keys a config file uses to their new places. Sections first, so that a renamed field
    inside a renamed section is found where the section moved."""
    from posttrain.config import ConfigError, set_dotted  # here, not at the top: posttrain.config imports this module

    renames = RENAMED_KEYS if renames is None else renames
    for old in sorted(renames, key=lambda k: k.count(".")):
        *parents, leaf = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        new = _renamed(old, renames)[0]
        if _has_dotted(tree, new):
            raise ConfigError(f"config keys {old!r} and {new!r} are both set; {old!r} is the old name of {new!r}")
        set_dotted(tree, new, node.pop(leaf))
        _deprecated(old, warned, renames)


def _has_dotted(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True



