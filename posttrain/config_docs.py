"""The config keys documented from their own source: `posttrain CMD --help` and `posttrain config CMD`.

A field's doc is the comment lines just above it (no blank line between) and the comment that ends its line,
read with `tokenize` (so a `#` inside a string is not a comment). A comment block under a field that starts
with one of the values its trailing comment lists (`... | policy | shared` then `# shared: ...`) continues that
field's doc rather than opening the next field's. A field takes the doc of the nearest class in the MRO that
documents it: PPOConfig redefines `num_generations` with a new default only, and OnlineConfig's doc applies.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import re
import shutil
import textwrap
import tokenize
import typing
from functools import lru_cache
from typing import NamedTuple

import yaml

from posttrain.config import config_sections, renames_for


class FieldDoc(NamedTuple):
    key: str  # dotted: model.lora.r
    type: str  # as annotated: "str | None"
    default: str  # as YAML writes it (what a key=value override or a config file takes)
    doc: str


def describe_fields(cls, prefix: str = "", defaults=None) -> list[FieldDoc]:
    """Every field of a dataclass in field order, nested dataclasses (`model.lora.*`) expanded in place. `defaults`:
    the instance whose values are the defaults (a section's own default, e.g. PPO's one sample per prompt)."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(hints[f.name]):  # a subsection, as config.build reads it
            out += describe_fields(hints[f.name], key, default)
            continue
        out.append(FieldDoc(key, _type_of(f), yaml_value(default), field_doc(cls, f.name)))
    return out


def field_doc(cls, name: str) -> str:
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}) and _class_docs(klass).get(name):
            return _class_docs(klass)[name]
    return ""


def _type_of(f: dataclasses.Field) -> str:
    annotation = f.type  # a string under `from __future__ import annotations`, as written
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def yaml_value(value) -> str:
    """One value in YAML flow style: `1.0e-05`, `null`, `[q_proj, k_proj]`, `'3'` (a string that reads as a number)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


@lru_cache(maxsize=None)
def _class_docs(cls) -> dict[str, str]:
    """{field: doc} for the fields that `cls` itself annotates."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined in a REPL or a string: no docs
        return {}
    comments, code = {}, set()  # line -> comment text; lines holding code
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    docs, prev = {}, None  # prev: (name, last line, trailing comment) of the field just before
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            prev = None
            continue
        trailing = " ".join(comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n in code)
        first = node.lineno
        while first - 1 in comments and first - 1 not in code:
            first -= 1
        above = [comments[n] for n in range(first, node.lineno)]
        if above and prev and prev[1] == first - 1 and _continues(above[0], prev[2]):
            docs[prev[0]] = "; ".join([docs[prev[0]], " ".join(above)])
            above = []
        docs[node.target.id] = " ".join([*above, trailing]).strip()
        prev = (node.target.id, node.end_lineno, trailing)
    return docs


def _continues(comment: str, trailing: str) -> bool:
    """Whether a comment line `word: ...` explains `word`, one of the values listed by the field above it."""
    m = re.match(r"([\w-]+):", comment)
    return bool(m and trailing and re.search(rf"(^|\|)\s*{re.escape(m[1])}\b", trailing))


# ---- rendering ------------------------------------------------------------------------------------------------------

def command_fields(command: str) -> list[tuple[str, list[FieldDoc]]]:
    """(section, its keys) of a command's config; its module must be imported (registry.get)."""
    return [(name, describe_fields(cls, name)) for name, cls in config_sections(command)]


def help_epilog(command: str, width: int | None = None) -> str:
    """Every config key of a command, one line each: key, type, default, doc (cut to the width, or under the key in
    a narrow terminal; the full docs are in `posttrain config CMD`)."""
    width = width or shutil.get_terminal_size((120, 24)).columns - 2  # not a terminal: 120 columns
    sections = command_fields(command)
    rows = [f for _, fields in sections for f in fields]
    kw = max(len(f.key) for f in rows)
    tw = min(max(len(f.type) for f in rows), 12)
    dw = min(max(len(f.default) for f in rows), 16)
    lines = ["config keys, set in CONFIG.yaml or as key=value",
             f"(`posttrain config {command}` writes them all as YAML, with their whole docs):"]
    for name, fields in sections:
        lines.append(f"\n{name}:")
        for f in fields:
            head = f"  {f.key:<{kw}}  {f.type:<{tw}}  {f.default:<{dw}}"
            if len(head) > width:  # a long default in a narrow terminal: cut (whole in `posttrain config`)
                head = head[: width - 1] + "…"
            if not f.doc:
                lines.append(head.rstrip())
            elif width - len(head) - 2 >= 32:
                lines.append(f"{head}  {_cut(f.doc, width - len(head) - 2)}".rstrip())
            else:  # a narrow terminal: the doc under its key rather than cut to a few words
                lines += [head.rstrip(), f"      {_cut(f.doc, width - 6)}"]
    renamed = [(old, new) for old, new in renames_for(command).items()
               if any(f.key == new or f.key.startswith(new + ".") for f in rows)]
    if renamed:
        lines.append("\nrenamed keys (the old name works until the next release):")
        lines += [f"  {old} -> {new}" for old, new in renamed]
    return "\n".join(lines)


def _cut(text: str, room: int) -> str:
    """`text` in `room` columns, cut after a whole word and marked (not textwrap.shorten: it splits `leave-one-out`)."""
    if len(text) <= room:
        return text
    head = text[:max(room, 12) - 2]
    return (head.rsplit(" ", 1)[0] if " " in head else head).rstrip(" ,;:(|") + " …"


def default_yaml(command: str, help_text: str = "") -> str:
    """The command's full default config as YAML, each key's doc as a comment; `posttrain CMD FILE` reads it back
    (no `command:` key: load_config ignores one, and the command line picks the command)."""
    lines = [f"# posttrain {command}: {help_text}" if help_text else f"# posttrain {command}",
             f"# all keys at their defaults; run: posttrain {command} THIS.yaml [key=value ...]"]
    for name, fields in command_fields(command):
        lines.append(f"\n{name}:")
        opened = [name]
        for f in fields:
            *parents, leaf = f.key.split(".")
            common = len(os.path.commonprefix([opened, parents]))  # sections already open (lists, not strings)
            lines += [f"{'  ' * i}{part}:" for i, part in enumerate(parents[common:], common)]
            opened = parents
            lines += _yaml_entry("  " * len(parents), leaf, f)
    return "\n".join(lines) + "\n"


def _yaml_entry(indent: str, leaf: str, f: FieldDoc) -> list[str]:
    """`key: value  # doc` when it fits in 118 columns, else the doc wrapped in comment lines above the key."""
    line = f"{indent}{leaf}: {f.default}"
    if not f.doc:
        return [line]
    if len(line) + len(f.doc) + 4 <= 118:
        return [f"{line}  # {f.doc}"]
    return [*textwrap.wrap(f.doc, 118, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "), line]
