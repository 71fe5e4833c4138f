"""The built-in demo task: seeded integer arithmetic with a checkable answer.

A problem is an expression such as `37 + 48 * 2` (usual precedence, every intermediate result >= 0).
The user asks "What is 37 + 48 * 2? Give the final answer as 'The answer is N.'"; the reference completion
works it out in one compact line, `48*2=96, 37+96=133. The answer is 133.` SmolLM2 tokenizes every digit
on its own, so a completion with its <|im_end|> is ~18 tokens for one operator (levels 1-2), ~29 for two
(levels 3-4) and up to 38 at level 5 (evaluate that one with max_new_tokens >= 40).
Wrong completions keep that format and make one plausible slip (MISTAKES): an off-by-one step, a forgotten
carry or borrow, left-to-right evaluation ignoring precedence, or two swapped digits; the slip propagates
through the later steps, so the line is consistent except at the slip.

Train and test never share a problem: the split of a problem is a hash of its canonical text (20% test),
so the partition holds across seeds and difficulty levels, not just within one call.

Calibration: `scripts/calibrate_arithmetic.py --batch-size 8 --budget-minutes 8` on SmolLM2-135M-Instruct
(the bundled GGUF Q4_1 weights, de-quantized), greedy accuracy on the same 100 test problems (seed 0) before
and after a short full fine-tune on train problems: AdamW lr 1e-4, 5 warm-up steps, loss on assistant tokens,
fp32, 2 threads on a CPU shared with other jobs (hence few steps in the 8-minute budget).

    level  problems                        before  after  SFT steps x batch  SFT min  eval min (both)
    1      2-digit a + b, a - b             13%     45%    23 x 8             8.5      6.3
    2      ... or 2-digit x 1-digit         12%     19%    18 x 8             8.1      7.2
    4      2 operators, + - x (37 + 48*2)    2%      4%    10 x 8             8.3      8.3

The default is level 1: 45% after the short SFT, inside the 20-60% band, the middle of it, where GRPO
groups most often mix right and wrong answers. Level 2 is the next step up if a longer SFT pushes level 1
past 60%; two operators (levels 3-5) are out of reach of a 135M model at this budget. Not single-digit:
before SFT the model is right on 13% only, so the gains of SFT and RL are measurable.
"""

from __future__ import annotations

import hashlib
import operator
import random
from dataclasses import dataclass
from typing import Callable, Literal

from posttrain.data.tasks import register_task

from posttrain.registry import Registry

Kind = Literal["sft", "preference", "unpaired", "prompts"]
Split = Literal["train", "test"]
Step = tuple[int, str, int, int]  # (left, op, right, result) of one reduction

TEST_PERCENT = 20
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
ANSWER_FORMAT = "Give the final answer as 'The answer is N.'"


@dataclass(frozen=True)
class Difficulty:
    """Which expressions a level draws; the defaults are the calibrated default level."""

    n_ops: int = 1
    """operators per expression (the worked line has this many steps)"""
    ops: str = "+-"
    """operators drawn uniformly from this string"""
    min_operand: int = 10
    """operands of + and - (and the first operand) are drawn from [min_operand, max_operand]"""
    max_operand: int = 99
    max_factor: int = 9
    """the operand right of a '*' is drawn from [2, max_factor], so products stay short enough to learn"""

    def __post_init__(self):
        if self.n_ops < 1 or not self.ops or set(self.ops) - set(_APPLY):
            raise ValueError(f"bad difficulty {self}: need n_ops >= 1 and ops drawn from '+-*'")
        if not 0 <= self.min_operand <= self.max_operand or self.max_factor < 2:
            raise ValueError(f"bad difficulty {self}: need 0 <= min_operand <= max_operand and max_factor >= 2")


LEVELS: dict[int, Difficulty] = {
    1: Difficulty(n_ops=1, ops="+-"),  # 37 + 48: 2-digit addition or subtraction
    2: Difficulty(n_ops=1, ops="+-*"),  # ... or a 2-digit by 1-digit product, 48 * 7
    3: Difficulty(n_ops=2, ops="+-"),  # 37 + 48 - 19
    4: Difficulty(n_ops=2, ops="+-*"),  # 37 + 48 * 2
    5: Difficulty(n_ops=2, ops="+-*", min_operand=100, max_operand=999),  # 374 + 481 * 2
}
DEFAULT_LEVEL = 1  # calibrated: see the module docstring


def get_difficulty(difficulty: Difficulty | int | str) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    level = int(difficulty)
    if level not in LEVELS:
        raise KeyError(f"unknown arithmetic level {difficulty!r}; levels: {sorted(LEVELS)}")
    return LEVELS[level]


# ---- problems ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def text(self) -> str:
        """The canonical string (what the split hash and de-duplication see), e.g. '37 + 48 * 2'."""
        parts = [str(self.operands[0])]
        for op, value in zip(self.ops, self.operands[1:]):
            parts += [op, str(value)]
        return " ".join(parts)


def solve(
    problem: Problem, precedence: bool = True, corrupt: tuple[int, Callable[[Step], int]] | None = None
) -> list[Step]:
    """Reduce the expression one operator at a time ('*' first when `precedence`), left to right.

    corrupt = (k, fn) replaces the result of step k by fn(step); later steps use the corrupted value,
    which is how a single slip propagates through a worked line.
    """
    values, ops = list(problem.operands), list(problem.ops)
    steps: list[Step] = []
    while ops:
        i = ops.index("*") if precedence and "*" in ops else 0
        a, op, b = values[i], ops[i], values[i + 1]
        result = _APPLY[op](a, b)
        if corrupt is not None and corrupt[0] == len(steps):
            result = corrupt[1]((a, op, b, result))
        steps.append((a, op, b, result))
        values[i : i + 2] = [result]
        del ops[i]
    return steps


def answer_of(problem: Problem) -> int:
    return solve(problem)[-1][3]


def split_of(text: str) -> Split:
    """'test' for TEST_PERCENT% of canonical problem strings, by hash: disjoint by construction."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _random_problem(d: Difficulty, rng: random.Random) -> Problem:
    ops = tuple(rng.choice(d.ops) for _ in range(d.n_ops))
    operands = [rng.randint(d.min_operand, d.max_operand)]
    for op in ops:
        operands.append(rng.randint(2, d.max_factor) if op == "*" else rng.randint(d.min_operand, d.max_operand))
    return Problem(tuple(operands), ops)


def sample_problems(
    n: int, split: Split, seed: int, difficulty: Difficulty | int | str = DEFAULT_LEVEL
) -> list[Problem]:
    """n distinct problems of one split, a pure function of (split, seed, difficulty): n only cuts a stream."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = get_difficulty(difficulty)
    rng = random.Random(f"arithmetic:{seed}:{split}:{d}")
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(200 * n + 10_000):
        if len(out) == n:
            return out
        problem = _random_problem(d, rng)
        text = problem.text
        if text in seen or split_of(text) != split or min(s[3] for s in solve(problem)) < 0:
            continue
        seen.add(text)
        out.append(problem)
    if len(out) == n:
        return out
    raise ValueError(f"found only {len(out)} distinct {split} problems at {d}; the level is too small for n={n}")


# ---- worked lines and plausible mistakes ------------------------------------------------------------------------

def completion_text(steps: list[Step]) -> str:
    """'48*2=96, 37+96=133. The answer is 133.' — compact, because every token costs CPU time."""
    work = ", ".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)
    return f"{work}. The answer is {steps[-1][3]}."


def question(problem: Problem) -> str:
    return f"What is {problem.text}? {ANSWER_FORMAT}"


Mistake = Callable[[Problem, random.Random], "list[Step] | None"]
MISTAKES = Registry("arithmetic mistake")
_mistake = MISTAKES.register


def _forgotten_carry(step: Step) -> int:
    """The step's result with its lowest carry (or borrow) forgotten; the true result when there is none.

    Only carries between columns count: dropping the carry out of the top column (61+46=7) is not plausible.
    """
    a, op, b, result = step
    if op == "*":
        return result - 10 * ((a % 10) * (b % 10) // 10)  # the units column's carry into the tens
    place = 1
    while place * 10 <= max(a, b):
        da, db = a // place % 10, b // place % 10
        if op == "+" and da + db >= 10:
            return result - 10 * place
        if op == "-" and da < db:
            return result + 10 * place
        place *= 10
    return result


def _swap_positions(value: int) -> list[int]:
    """Positions i where swapping digits i, i+1 changes the number and makes no leading zero."""
    digits = str(value)
    return [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1] and (i > 0 or digits[1] != "0")]


def _swap_digits(value: int, rng: random.Random) -> int:
    digits, i = str(value), rng.choice(_swap_positions(value))
    return int(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :])


@_mistake("off_by_one")
def _off_by_one(problem: Problem, rng: random.Random) -> list[Step]:
    delta = rng.choice((-1, 1))
    return solve(problem, corrupt=(rng.randrange(len(problem.ops)), lambda s: s[3] + delta))


@_mistake("carry")
def _carry(problem: Problem, rng: random.Random) -> list[Step] | None:
    candidates = [k for k, step in enumerate(solve(problem)) if _forgotten_carry(step) != step[3]]
    return solve(problem, corrupt=(rng.choice(candidates), _forgotten_carry)) if candidates else None


@_mistake("precedence")
def _precedence(problem: Problem, rng: random.Random) -> list[Step]:
    return solve(problem, precedence=False)


@_mistake("digit_swap")
def _digit_swap(problem: Problem, rng: random.Random) -> list[Step] | None:
    candidates = [k for k, step in enumerate(solve(problem)) if _swap_positions(step[3])]
    return solve(problem, corrupt=(rng.choice(candidates), lambda s: _swap_digits(s[3], rng))) if candidates else None


def wrong_steps(problem: Problem, rng: random.Random) -> tuple[str, list[Step]]:
    """(mistake name, worked line) with one plausible slip; the final answer is wrong and >= 0 like true ones."""
    truth = answer_of(problem)
    names = sorted(MISTAKES)
    rng.shuffle(names)
    for name in names:
        steps = MISTAKES[name](problem, rng)
        if steps is not None and steps[-1][3] != truth and min(s[3] for s in steps) >= 0:
            return name, steps
    return "off_by_one", solve(problem, corrupt=(len(problem.ops) - 1, lambda s: s[3] + 1))  # wrong and >= 0


# ---- records in TRL columns -------------------------------------------------------------------------------------

def _user(text: str, conversational: bool):
    return [{"role": "user", "content": text}] if conversational else text


def _assistant(text: str, conversational: bool):
    return [{"role": "assistant", "content": text}] if conversational else text


Builder = Callable[[Problem, int, random.Random, bool], dict]
BUILDERS = Registry("record builder")
_builder = BUILDERS.register


@_builder("sft")
def _sft(problem: Problem, i: int, rng: random.Random, conversational: bool) -> dict:
    q, a = question(problem), completion_text(solve(problem))
    if conversational:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    return {"prompt": q, "completion": a}


@_builder("preference")
def _preference(problem: Problem, i: int, rng: random.Random, conversational: bool) -> dict:
    return {
        "prompt": _user(question(problem), conversational),
        "chosen": _assistant(completion_text(solve(problem)), conversational),
        "rejected": _assistant(completion_text(wrong_steps(problem, rng)[1]), conversational),
    }


@_builder("unpaired")
def _unpaired(problem: Problem, i: int, rng: random.Random, conversational: bool) -> dict:
    # Alternating labels over randomly ordered problems: balanced in every prefix, independent of the problem.
    good = i % 2 == 0
    steps = solve(problem) if good else wrong_steps(problem, rng)[1]
    return {
        "prompt": _user(question(problem), conversational),
        "completion": _assistant(completion_text(steps), conversational),
        "label": good,
    }


@_builder("prompts")
def _prompts(problem: Problem, i: int, rng: random.Random, conversational: bool) -> dict:
    return {"prompt": _user(question(problem), conversational), "answer": str(answer_of(problem))}


@register_task("arithmetic")
def make_records(
    kind: Kind,
    split: Split = "train",
    n: int = 1000,
    seed: int = 0,
    difficulty: Difficulty | int | str = DEFAULT_LEVEL,
    conversational: bool = True,
) -> list[dict]:
    """n records of `kind` for distinct problems of `split`; the same arguments always give the same records.

    conversational=True gives TRL's conversational columns (message lists: `messages` for SFT, user-message
    `prompt` and assistant-message `chosen`/`rejected`/`completion`); False gives plain strings
    (`prompt` + `completion` for SFT).
    """
    if kind not in BUILDERS:
        raise KeyError(f"unknown record kind {kind!r}; kinds: {sorted(BUILDERS)}")
    problems = sample_problems(n, split, seed, difficulty)
    rng = random.Random(f"arithmetic-mistakes:{seed}:{split}:{kind}")
    return [BUILDERS[kind](p, i, rng, conversational) for i, p in enumerate(problems)]
