"""Rule-based rewards: ``numeric``, ``math`` (math-verify), ``format``, ``length_penalty``, ``soft_overlong``.

Each is a plain reward function ``fn(prompts, completions, **columns) -> list[float]``; options are keyword-only
and bound by ``load_reward(name, **options)``. Unused columns are accepted and ignored (``**_``).

Masking: a reward that cannot be computed for a reason that is not the completion's fault returns NaN for
that sample ("masked"): here, a gold answer that cannot be parsed (math answer verification: Math-Verify #14: never rewarded, never 0).
The trainer drops masked samples from the loss and counts them in ``rewards/<name>/masked``.
"""

from __future__ import annotations

import math
import re
import threading
from fractions import Fraction

from posttrain.rewards.registry import register_reward

# A number as people write it: 1,234.5 | -3 | .5 | 3/4 | 1e-3; unicode minus accepted.
_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*[-+]?\d+(?:\.\d+)?)?"
    r"|(?<![\w.])[-+]?\.\d+"
)
_FRAC = re.compile(r"(-?)\\[dt]?frac\{\s*([-+]?[\d.,]+)\s*\}\{\s*([-+]?[\d.,]+)\s*\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]*)", re.IGNORECASE)
DEFAULT_FORMAT = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1:i]
    return None


def extract_answer(text: str) -> str:
    """The span that holds the final answer: ``<answer>X</answer>``, ``\\boxed{X}``, ``#### X``,
    ``answer is X`` (last occurrence of the first kind found, in that order), else the whole text."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return found[-1]
    return text


def parse_number(text: str, last: bool = True) -> float | None:
    """The last (or first) number of ``text`` as a float: commas in thousands, negatives, decimals,
    fractions ``3/4`` and ``\\frac{3}{4}``. None when there is none."""
    text = text.replace("\u2212", "-").replace("$", " ")
    text = _FRAC.sub(lambda m: f" {m.group(1)}{m.group(2)}/{m.group(3)} ", text)
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    token = re.sub(r"\s+", "", matches[-1] if last else matches[0]).replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(Fraction(num) / Fraction(den)) if float(den) != 0 else None
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(completion: str) -> float | None:
    """The final numeric answer of a completion: the first number of an explicit answer span, else the last
    number of the text."""
    span = extract_answer(completion)
    return parse_number(span, last=span is completion)


@register_reward("numeric")
def numeric(prompts, completions, answer, *, tolerance: float = 1e-6, **_) -> list[float]:
    """1.0 when the completion's final number equals ``answer`` within ``tolerance`` (relative and absolute),
    else 0.0; NaN (masked) when the gold answer has no number (it may be a GSM8K solution ending in ``#### X``)."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_value = float(gold) if isinstance(gold, (int, float)) else extract_number(str(gold))
        if gold_value is None or math.isnan(gold_value):
            rewards.append(math.nan)
            continue
        pred = extract_number(completion)
        ok = pred is not None and math.isclose(pred, gold_value, rel_tol=tolerance, abs_tol=tolerance)
        rewards.append(float(ok))
    return rewards


def parse_gold(gold, timeout: int | None = None) -> list:
    """math-verify's parse of a gold answer. A bare answer (no ``$`` and no ``\\boxed``) is wrapped in
    ``$...$`` first, otherwise math-verify reads ``2\\pi`` as 2 and ``\\sqrt{2}`` as nothing."""
    from math_verify import parse  # lazy: sympy-heavy

    text = str(gold).strip()
    if "$" not in text and "\\boxed" not in text and "\\(" not in text and "\\[" not in text:
        parsed = parse(f"${text}$", extraction_mode="first_match", parsing_timeout=timeout)
        if parsed:
            return parsed
    return parse(text, extraction_mode="first_match", parsing_timeout=timeout)


@register_reward("math")
def math_equal(prompts, completions, answer, **_) -> list[float]:
    """1.0 when math-verify finds the completion's answer equivalent to ``answer`` (``1/2`` = ``0.5`` =
    ``\\frac{1}{2}``; ``x=2`` = ``2``), else 0.0; NaN (masked) when the gold answer cannot be parsed.

    math-verify times out with ``signal.alarm``, which only works in the main thread; elsewhere (the reward
    runner's worker threads) its timeouts are off and the runner's per-sample timeout bounds the call.
    """
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_parsed = parse_gold(gold, timeout)
        if not gold_parsed:
            rewards.append(math.nan)
            continue
        pred = parse(completion, parsing_timeout=timeout)
        rewards.append(float(bool(pred) and verify(gold_parsed, pred, timeout_seconds=timeout)))
    return rewards


@register_reward("format")
def format_reward(prompts, completions, *, pattern: str = DEFAULT_FORMAT, **_) -> list[float]:
    """1.0 when the whole completion matches ``pattern`` (default: ``<think>…</think>`` then
    ``<answer>…</answer>`` and nothing else; ``.`` matches newlines), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    return [float(regex.fullmatch(c) is not None) for c in completions]


def _lengths(completions, unit: str, tokenizer, completion_lengths) -> list[int]:
    """Lengths in characters, or in tokens: the generator's exact counts when the trainer passes the
    ``completion_lengths`` column, else the tokenizer's count without special tokens."""
    if unit == "chars":
        return [len(c) for c in completions]
    if unit != "tokens":
        raise ValueError(f"unit must be 'chars' or 'tokens', got {unit!r}")
    if completion_lengths is not None:
        return [int(n) for n in completion_lengths]
    if tokenizer is None:
        raise ValueError("unit='tokens' needs the completion_lengths column or a tokenizer")
    return [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]


@register_reward("length_penalty")
def length_penalty(prompts, completions, *, target: int = 1000, coef: float = 0.001, unit: str = "chars",
                   tokenizer=None, completion_lengths=None, **_) -> list[float]:
    """``-coef * max(0, L - target)``: nothing up to ``target``, then linear in the excess length L."""
    lengths = _lengths(completions, unit, tokenizer, completion_lengths)
    return [-coef * max(0, n - target) for n in lengths]


@register_reward("soft_overlong")
def soft_overlong(prompts, completions, *, max_length: int = 4096, cache_length: int = 512, unit: str = "tokens",
                  tokenizer=None, completion_lengths=None, **_) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), L = completion length:
    0 for L <= L_max - L_cache; ((L_max - L_cache) - L) / L_cache, from 0 down to -1, up to L_max; -1 beyond."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    free = max_length - cache_length
    lengths = _lengths(completions, unit, tokenizer, completion_lengths)
    return [max(-1.0, min(0.0, (free - n) / cache_length)) for n in lengths]
