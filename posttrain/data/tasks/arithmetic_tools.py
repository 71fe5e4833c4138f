"""`task:arithmetic_tools`: multiplication a 135M model cannot do in its head, with a calculator it can call.

"What is 347 * 862? Give the final answer as 'The answer is N.'" The demonstration (kind `sft`) calls the
calculator, reads its result and reports it, in TRL's message format:

    system     the calculator's description and the <tool_call> format (`data/tool_format.py`)
    user       the question
    assistant  content "" + tool_calls [{type: function, function: {name: calculator, arguments: {expression}}}]
    tool       299114
    assistant  The answer is 299114.

Kind `prompts` gives the question (a user turn) and its `answer`: the `tools` environment (`posttrain/envs/`)
adds the same system turn when it opens a trajectory, so RL sees the prompt SFT trained on. Evaluating the same
records without an environment asks the model to answer without the tool. Train and test problems never meet
(the split is a hash of the problem, as in `task:arithmetic`).
"""

from __future__ import annotations

import hashlib
import random

from posttrain.data.tasks import register_task
from posttrain.data.tasks.arithmetic import ANSWER_FORMAT
from posttrain.data.tool_format import CALCULATOR, with_tool_system_prompt

TEST_PERCENT = 20


def _split_of(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"tools:{text}".encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def problems(n: int, split: str, seed: int, digits: int = 3) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs of `digits`-digit factors in `split`, a pure function of its arguments."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    rng, seen, out = random.Random(f"arithmetic_tools:{seed}:{split}:{digits}"), set(), []
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) not in seen and _split_of(f"{a} * {b}") == split:
            seen.add((a, b))
            out.append((a, b))
    return out


def question(a: int, b: int) -> str:
    return f"What is {a} * {b}? {ANSWER_FORMAT}"


def demonstration(a: int, b: int) -> list[dict]:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}}
    return with_tool_system_prompt([{"role": "user", "content": question(a, b)}], [CALCULATOR]) + [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "calculator", "content": str(a * b)},
        {"role": "assistant", "content": f"The answer is {a * b}."},
    ]


@register_task("arithmetic_tools")
def make_records(kind: str, split: str = "train", n: int = 1000, seed: int = 0, digits: int = 3, **_) -> list[dict]:
    """Records of `kind` (sft: tool-use demonstrations; prompts: question + answer) for n problems of `split`."""
    if kind == "sft":
        return [{"messages": demonstration(a, b)} for a, b in problems(n, split, seed, digits)]
    if kind == "prompts":
        return [{"prompt": [{"role": "user", "content": question(a, b)}], "answer": str(a * b)}
                for a, b in problems(n, split, seed, digits)]
    raise KeyError(f"task arithmetic_tools has kinds 'sft' and 'prompts', not {kind!r}")
