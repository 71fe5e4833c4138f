"""Rule-based rewards: numeric extraction, math-verify equivalence (math answer verification: Math-Verify #14), format, length penalties."""

import math
import threading

import pytest

from posttrain.rewards.verifiers import (
    extract_answer,
    format_reward,
    length_penalty,
    math_equal,
    numeric,
    parse_number,
    soft_overlong,
)

NUMERIC_CASES = [  # (completion, gold, reward)
    ("The answer is 1,234.", "1234", 1.0),
    ("so we get\n#### -5", -5, 1.0),
    ("half of it: x = 3/4", "0.75", 1.0),
    ("<answer>0.5</answer>", "1/2", 1.0),
    ("Thus $\\boxed{\\frac{3}{4}}$.", 0.75, 1.0),
    ("First 5 then 7", "7", 1.0),  # no marker: the last number
    ("First 5 then 7", "5", 0.0),
    ("The answer is 5. Later I also computed 7.", "5", 1.0),  # an explicit answer wins over the last number
    ("The answer is: -3.5 degrees", "-3.5", 1.0),
    ("it is 3.5", "-3.5", 0.0),
    ("0.3333333", "1/3", 1.0),  # within the default tolerance 1e-6
    ("0.33", "1/3", 0.0),
    ("I don't know", "4", 0.0),
    ("costs $1,000,000.50 in total", "1000000.5", 1.0),
    ("5-3", "3", 1.0),  # "-3" inside "5-3" is a subtraction, not a negative number
    ("Natalia sold 48/2 = 24 clips", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 0.0),  # GSM8K-style gold
    ("so 48 + 24 = 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
]


@pytest.mark.parametrize("completion,gold,expected", NUMERIC_CASES)
def test_numeric(completion, gold, expected):
    assert numeric(["q"], [completion], answer=[gold]) == [expected]


def test_numeric_tolerance_and_masked_gold():
    assert numeric(["q"], ["0.33"], answer=["1/3"], tolerance=0.01) == [1.0]
    masked = numeric(["q", "q"], ["4", "4"], answer=["n/a", "4"])
    assert math.isnan(masked[0]) and masked[1] == 1.0


def test_parse_number_and_extract_answer():
    assert parse_number("-1,234.5") == -1234.5
    assert parse_number("\u22122") == -2.0  # unicode minus
    assert parse_number("\\dfrac{1}{8}") == 0.125
    assert parse_number("1e-3 and 2") == 2.0 and parse_number("1e-3 and 2", last=False) == 0.001
    assert parse_number("x/0 = 1/0") is None
    assert extract_answer("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"  # nested braces
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"


MATH_PAIRS = [  # (gold, completion, equivalent)
    ("1/2", "0.5", True),
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "The answer is $\\frac{1}{2}$", True),
    ("x=2", "2", True),
    ("2", "$x = 2$", True),
    ("1,234", "1234", True),
    ("2\\pi", "$2\\pi$", True),
    ("\\sqrt{2}", "$\\sqrt{2}$", True),
    ("x^2+1", "$1 + x^2$", True),
    ("\\{1,2\\}", "$\\{2,1\\}$", True),
    ("3", "\\boxed{3.0}", True),
    ("1/2", "0.25", False),
    ("3", "\\boxed{4}", False),
    ("(1,2)", "$(2,1)$", False),
    ("2\\pi", "$2$", False),
    ("72", "I cannot solve this.", False),
]


@pytest.mark.parametrize("gold,completion,equivalent", MATH_PAIRS)
def test_math_equivalence_table(gold, completion, equivalent):
    assert math_equal(["q"], [completion], answer=[gold]) == [float(equivalent)]


@pytest.mark.parametrize("gold", ["", "\\boxed{}", "$$"])
def test_math_unparseable_gold_is_masked_never_rewarded(gold):
    rewards = math_equal(["q", "q"], ["", "\\boxed{3}"], answer=[gold, gold])
    assert all(math.isnan(r) for r in rewards)


def test_math_runs_outside_the_main_thread():
    """math-verify's signal-based timeouts fail in threads; the reward turns them off there."""
    out = []
    worker = threading.Thread(target=lambda: out.append(math_equal(["q"], ["\\boxed{0.5}"], answer=["1/2"])))
    worker.start()
    worker.join(30)
    assert out == [[1.0]]


def test_format_reward():
    good = "<think>step 1\nstep 2</think>\n<answer>4</answer>"
    bad = ["<answer>4</answer>", "<think>x</think><answer>4</answer> trailing", "<think>x</think>"]
    assert format_reward(["q"] * 4, [good, *bad]) == [1.0, 0.0, 0.0, 0.0]
    assert format_reward(["q", "q"], ["Answer: 3", "3"], pattern=r"Answer: \d+") == [1.0, 0.0]


def test_length_penalty_is_linear_beyond_the_target():
    completions = ["a" * 5, "a" * 10, "a" * 30]
    assert length_penalty(["q"] * 3, completions, target=10, coef=0.5) == [0.0, 0.0, -10.0]


def test_soft_overlong_follows_dapo():
    # L_max = 100, L_cache = 20: 0 up to 80, linear to -1 at 100, -1 beyond
    lengths = [10, 80, 85, 90, 100, 150]
    out = soft_overlong(["q"] * 6, ["c"] * 6, max_length=100, cache_length=20, completion_lengths=lengths)
    assert out == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])


def test_token_lengths_from_a_tokenizer_or_the_column():
    class WordTokenizer:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": text.split()}

    completions = ["one two three", "one"]
    assert length_penalty(["q", "q"], completions, target=1, coef=1.0, unit="tokens",
                          tokenizer=WordTokenizer()) == [-2.0, 0.0]
    assert length_penalty(["q", "q"], completions, target=1, coef=1.0, unit="tokens",
                          completion_lengths=[4, 1]) == [-3.0, 0.0]
    with pytest.raises(ValueError, match="completion_lengths column or a tokenizer"):
        length_penalty(["q"], ["x"], unit="tokens")
    with pytest.raises(ValueError, match="cache_length"):
        soft_overlong(["q"], ["x"], max_length=10, cache_length=20, unit="chars")
