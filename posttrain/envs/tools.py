"""The built-in tools (a calculator, Python in the sandbox) and `tools`, the environment that runs them.

`tools` opens each conversation with the tools' descriptions (a system turn, `data/tool_format.py`), then
answers every assistant turn that holds <tool_call> blocks with one tool message per call; a turn without a call
is the final answer and ends the conversation (the run's reward functions score it). A call to an unknown tool,
with bad arguments, or that fails gets an `error: ...` result (counted in env/tool_errors), so the policy can
learn from it; a call over `tool_timeout_s` is abandoned with `error: timed out` (env/tool_timeouts).
"""

from __future__ import annotations

import ast
import operator

from posttrain.data.chat import as_messages
from posttrain.data.tool_format import BUILTIN_SPECS, parse_tool_calls, with_tool_system_prompt
from posttrain.envs.base import EnvStep, guarded_calls, register_environment
from posttrain.registry import Registry

TOOLS = Registry("tool")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT, MAX_DIGITS = 64, 200  # a calculator answers in microseconds: no 9**9**9


@TOOLS.register("calculator")
def calculator(expression: str) -> str:
    """Exact arithmetic on integers and decimals; an integral result is written without a fraction."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent over {MAX_EXPONENT}")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    value = ev(ast.parse(str(expression).replace("^", "**"), mode="eval"))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(round(value, 10) if isinstance(value, float) else value)
    if len(text) > MAX_DIGITS:
        raise ValueError("result too long")
    return text


@TOOLS.register("python")
def python(code: str, timeout_s: float = 5.0) -> str:
    """The program's output, run in the `code` reward's sandbox (`rewards/sandbox.py`: separate processes,
    namespaces, rlimits, seccomp where the machine allows); a failure reports its status and output."""
    from posttrain.rewards.sandbox import SandboxConfig, run_tests

    result = run_tests(str(code), "assert True", SandboxConfig(timeout_s=timeout_s))
    output = result.output.strip()
    if result.status == "passed":
        return output or "(no output)"
    return f"error: {result.status}: {(output or result.detail)[-500:]}"


@register_environment("tools")
class ToolEnvironment:
    """options: tools (names in TOOLS, default [calculator]), tool_timeout_s, max_calls_per_turn."""

    def __init__(self, tools=("calculator",), tool_timeout_s: float = 10.0, max_calls_per_turn: int = 4):
        unknown = [t for t in tools if t not in TOOLS or t not in BUILTIN_SPECS]
        if unknown:
            raise ValueError(f"unknown tool(s) {unknown}; built-in tools: {sorted(TOOLS)}")
        self.tools, self.timeout_s, self.max_calls = list(tools), float(tool_timeout_s), int(max_calls_per_turn)

    def reset(self, record: dict) -> list[dict]:
        return with_tool_system_prompt(as_messages(record["prompt"]), [BUILTIN_SPECS[t] for t in self.tools])

    def step(self, assistant_text: str) -> EnvStep:
        calls = parse_tool_calls(assistant_text)
        if not calls:
            return EnvStep(done=True)
        info = {"tool_calls": float(len(calls)), "tool_errors": 0.0, "tool_timeouts": 0.0}
        results = []
        for call in calls[: self.max_calls]:
            text = self._run(call, info)
            results.append({"role": "tool", "name": call.name, "content": text})
        if len(calls) > self.max_calls:
            info["tool_errors"] += len(calls) - self.max_calls
            results.append({"role": "tool", "content": f"error: at most {self.max_calls} tool calls per turn"})
        return EnvStep(messages=results, info=info)

    def _run(self, call, info: dict) -> str:
        error = call.error or (None if call.name in self.tools else f"unknown tool {call.name!r}; "
                               f"available: {', '.join(self.tools)}")
        result = None
        if not error:
            (result, error), = guarded_calls([lambda: TOOLS[call.name](**call.arguments)], self.timeout_s)
            info["tool_timeouts"] += error == "timed out"
        if error:
            info["tool_errors"] += 1
            return f"error: {error}"
        return str(result)
