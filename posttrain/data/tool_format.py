"""The text format of tool calls, shared by the data (SFT on tool conversations) and the environments.

An assistant calls a tool by writing, anywhere in its turn, one block per call (the Hermes/Qwen convention, which
the chat templates of Qwen2.5 and Hermes render for `tool_calls` themselves):

    <tool_call>{"name": "calculator", "arguments": {"expression": "347 * 862"}}</tool_call>

TRL's message format (an assistant message with `tool_calls: [{"type": "function", "function": {"name": ...,
"arguments": {...}}}]`, then `{"role": "tool", "content": ...}` messages) is rendered into that text before
templating (`tool_calls_as_text`), so SFT trains on exactly the text the rollout parser reads back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass
class ToolCall:
    """A parsed call; `error` is set (and name may be empty) when the block is not a valid call."""

    name: str
    arguments: dict = field(default_factory=dict)
    error: str = ""


def format_tool_call(name: str, arguments: dict) -> str:
    return OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CLOSE


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every <tool_call> block of `text`, in order. A block that is not a JSON object with a string `name` and an
    object `arguments` (a JSON string holding an object is accepted, as OpenAI sends it) is a ToolCall with
    `error`: the environment answers it with the error, so the policy learns the format."""
    calls = []
    for body in _CALL.findall(text):
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", error=f"tool call is not valid JSON: {e.msg}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall("", error='tool call must be {"name": ..., "arguments": {...}}'))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], error="tool call arguments must be an object"))
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls


def tool_calls_as_text(messages: list[dict]) -> list[dict]:
    """Messages with each assistant message's `tool_calls` (TRL / OpenAI format) appended to its content as
    <tool_call> blocks; other messages unchanged. Tool messages keep the `tool` role."""
    out = []
    for msg in messages:
        calls = msg.get("tool_calls") if msg.get("role") == "assistant" else None
        if not calls:
            out.append(msg)
            continue
        blocks = []
        for call in calls:
            fn = call.get("function", call)
            args = fn.get("arguments", {})
            blocks.append(format_tool_call(fn["name"], json.loads(args) if isinstance(args, str) else args))
        content = (msg.get("content") or "").rstrip()
        text = "\n".join(([content] if content else []) + blocks)
        out.append({k: v for k, v in msg.items() if k != "tool_calls"} | {"content": text})
    return out


@dataclass(frozen=True)
class ToolSpec:
    """What the policy is told about a tool: its name, what it does, its arguments ({name: description})."""

    name: str
    description: str
    parameters: dict


CALCULATOR = ToolSpec("calculator", "evaluates an arithmetic expression (+ - * / // % ** and parentheses) exactly",
                      {"expression": "the expression, e.g. 347 * 862"})
PYTHON = ToolSpec("python", "runs a Python program in a sandbox and returns what it prints",
                  {"code": "the program; print() what you need"})
BUILTIN_SPECS = {spec.name: spec for spec in (CALCULATOR, PYTHON)}


def tools_system_prompt(specs: list[ToolSpec]) -> str:
    """The tool descriptions and the call format, as one system message's text (every chat template renders a
    system turn, so this works for templates without a native `tools` argument)."""
    lines = ["You can call tools. To call one, write", format_tool_call("NAME", {"ARGUMENT": "VALUE"}),
             "and its result comes back in a tool message. Tools:"]
    for spec in specs:
        args = ", ".join(f"{k}: {v}" for k, v in spec.parameters.items())
        lines.append(f"- {spec.name}({args}): {spec.description}")
    return "\n".join(lines)


def with_tool_system_prompt(messages: list[dict], specs: list[ToolSpec]) -> list[dict]:
    """`messages` opened by the tool descriptions: a new system turn, or added after an existing one's text."""
    text = tools_system_prompt(specs)
    if messages and messages[0].get("role") == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}".strip()}] + messages[1:]
    return [{"role": "system", "content": text}] + list(messages)
