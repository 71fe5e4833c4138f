"""The built-in arithmetic task: seeded records in TRL columns, disjoint splits, plausible wrong answers."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from posttrain.data.tasks import TASKS, make_task_records, write_jsonl
from posttrain.data.tasks.arithmetic import (
    DEFAULT_LEVEL,
    LEVELS,
    MISTAKES,
    TEST_PERCENT,
    Difficulty,
    Problem,
    _forgotten_carry,
    _random_problem,
    _swap_positions,
    answer_of,
    completion_text,
    make_records,
    sample_problems,
    solve,
    split_of,
    wrong_steps,
)

KINDS = ("sft", "preference", "unpaired", "prompts")
# The whole completion format: worked steps, then the answer sentence. Both right and wrong completions match it.
LINE = re.compile(r"^(\d+[-+*]\d+=\d+, )*\d+[-+*]\d+=\d+\. The answer is (\d+)\.$")
STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+)")


def _text(value) -> str:
    """The content of a string or a one-message list."""
    if isinstance(value, list):
        assert len(value) == 1 and set(value[0]) == {"role", "content"}
        return value[0]["content"]
    return value


def _expression(prompt) -> str:
    return re.match(r"What is (.+)\? Give the final answer as 'The answer is N\.'$", _text(prompt)).group(1)


def _stated_answer(completion) -> int:
    match = LINE.match(_text(completion))
    assert match, f"completion not in the task's format: {_text(completion)!r}"
    return int(match.group(2))


# ---- problems and their solutions -------------------------------------------------------------------------------

def test_solve_hand_computed():
    problem = Problem((37, 48, 2), ("+", "*"))
    assert problem.text == "37 + 48 * 2"
    assert solve(problem) == [(48, "*", 2, 96), (37, "+", 96, 133)]
    assert completion_text(solve(problem)) == "48*2=96, 37+96=133. The answer is 133."
    assert solve(problem, precedence=False) == [(37, "+", 48, 85), (85, "*", 2, 170)]
    assert answer_of(Problem((50, 20, 3), ("-", "-"))) == 27  # left-associative: (50 - 20) - 3


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_answers_match_python_and_levels_hold(level):
    d = LEVELS[level]
    for p in sample_problems(500, "train", seed=3, difficulty=level):
        assert answer_of(p) == eval(p.text)  # Python's precedence and associativity are the reference
        assert len(p.ops) == d.n_ops and set(p.ops) <= set(d.ops)
        assert min(s[3] for s in solve(p)) >= 0
        assert d.min_operand <= p.operands[0] <= d.max_operand
        for op, value in zip(p.ops, p.operands[1:]):
            lo, hi = (2, d.max_factor) if op == "*" else (d.min_operand, d.max_operand)
            assert lo <= value <= hi


def test_problems_distinct_and_deterministic():
    a = sample_problems(2000, "train", seed=7, difficulty=4)
    assert len({p.text for p in a}) == 2000
    assert a == sample_problems(2000, "train", seed=7, difficulty=4)
    assert a != sample_problems(2000, "train", seed=8, difficulty=4)


def test_default_level_is_the_default_difficulty():
    assert LEVELS[DEFAULT_LEVEL] == Difficulty()
    assert make_records("prompts", n=20, seed=0) == make_records("prompts", n=20, seed=0, difficulty=Difficulty())


def test_level_too_small_raises():
    tiny = Difficulty(n_ops=1, ops="+", min_operand=1, max_operand=3)  # 9 problems in all
    with pytest.raises(ValueError, match="too small"):
        sample_problems(50, "train", seed=0, difficulty=tiny)


def test_bad_difficulty_and_level_rejected():
    with pytest.raises(ValueError):
        Difficulty(ops="+/")
    with pytest.raises(KeyError):
        make_records("prompts", n=1, difficulty=99)


# ---- splits -------------------------------------------------------------------------------------------------------

def test_splits_disjoint_over_seeds_and_levels():
    train, test = set(), set()
    for seed in (0, 1):
        for level in (1, 2, 3):
            train |= {p.text for p in sample_problems(1500, "train", seed, level)}
            test |= {p.text for p in sample_problems(1500, "test", seed + 10, level)}
    assert len(train) > 5000 and len(test) > 5000
    assert not train & test
    assert all(split_of(t) == "train" for t in train) and all(split_of(t) == "test" for t in test)


def test_split_fraction_is_the_documented_one():
    rng = random.Random(0)
    texts = {_random_problem(LEVELS[4], rng).text for _ in range(20_000)}
    share = sum(split_of(t) == "test" for t in texts) / len(texts)
    assert abs(share - TEST_PERCENT / 100) < 0.015


@pytest.mark.parametrize("level, n", [(1, 2000), (4, 3000)])  # level 1 has only 2,513 test problems in all
def test_records_of_splits_disjoint(level, n):
    train = {_expression(r["prompt"]) for r in make_records("prompts", "train", n=n, seed=0, difficulty=level)}
    test = {_expression(r["prompt"]) for r in make_records("prompts", "test", n=n, seed=0, difficulty=level)}
    assert len(train) == len(test) == n and not train & test


# ---- records ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_records_deterministic(kind):
    a = make_records(kind, "train", n=200, seed=5)
    assert json.dumps(a) == json.dumps(make_records(kind, "train", n=200, seed=5))
    assert json.dumps(a) != json.dumps(make_records(kind, "train", n=200, seed=6))


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_records_are_a_prefix_of_more(kind):
    """Growing n keeps the earlier records, so a small dataset is a subset of a larger one."""
    assert make_records(kind, "test", n=300, seed=0) == make_records(kind, "test", n=700, seed=0)[:300]


def _check_user(prompt, conversational):
    if conversational:
        assert isinstance(prompt, list) and [m["role"] for m in prompt] == ["user"]
    else:
        assert isinstance(prompt, str)
    return eval(_expression(prompt))


def _check_assistant(completion, conversational):
    if conversational:
        assert isinstance(completion, list) and [m["role"] for m in completion] == ["assistant"]
    else:
        assert isinstance(completion, str)
    return _stated_answer(completion)


@pytest.mark.parametrize("conversational", [True, False])
def test_sft_columns_and_answers(conversational):
    for r in make_records("sft", "train", n=300, seed=1, conversational=conversational):
        if conversational:
            assert set(r) == {"messages"}
            user, assistant = r["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            truth, completion = eval(_expression(user["content"])), assistant["content"]
        else:
            assert set(r) == {"prompt", "completion"} and isinstance(r["prompt"], str)
            truth, completion = eval(_expression(r["prompt"])), r["completion"]
        assert _stated_answer(completion) == truth
        assert completion.endswith(f"The answer is {truth}.")


@pytest.mark.parametrize("conversational", [True, False])
def test_preference_rejected_is_wrong_in_the_same_format(conversational):
    for r in make_records("preference", "train", n=500, seed=2, conversational=conversational):
        assert set(r) == {"prompt", "chosen", "rejected"}
        truth = _check_user(r["prompt"], conversational)
        assert _check_assistant(r["chosen"], conversational) == truth
        wrong = _check_assistant(r["rejected"], conversational)
        assert wrong != truth and wrong >= 0
        chosen_steps, rejected_steps = STEP.findall(_text(r["chosen"])), STEP.findall(_text(r["rejected"]))
        assert len(chosen_steps) == len(rejected_steps)
        assert int(rejected_steps[-1][3]) == wrong  # the line agrees with its own stated answer


def test_rejected_makes_one_slip_and_propagates_it():
    """Each wrong line has at most one arithmetically false step (none for a precedence slip)."""
    for r in make_records("preference", "test", n=500, seed=3):
        steps = STEP.findall(_text(r["rejected"]))
        false = [s for s in steps if eval(f"{s[0]}{s[1]}{s[2]}") != int(s[3])]
        assert len(false) <= 1


def test_every_mistake_kind_is_used():
    rng = random.Random(0)
    truth_and_wrong = [(answer_of(p), wrong_steps(p, rng)) for p in sample_problems(400, "train", 0, difficulty=4)]
    used = Counter(name for _, (name, _) in truth_and_wrong)
    assert set(used) == set(MISTAKES) and min(used.values()) >= 10, used
    assert all(steps[-1][3] != truth for truth, (_, steps) in truth_and_wrong)


def test_mistakes_hand_computed():
    assert _forgotten_carry((37, "+", 96, 133)) == 123  # 7+6 carries into the tens
    assert _forgotten_carry((52, "-", 17, 35)) == 45  # 2-7 borrows from the tens
    assert _forgotten_carry((48, "*", 2, 96)) == 86  # 8*2 carries 1 into the tens
    assert _forgotten_carry((61, "+", 46, 107)) == 107  # only the top column carries: not a plausible slip
    assert _forgotten_carry((21, "+", 34, 55)) == 55
    assert _swap_positions(540) == [0, 1]
    assert _swap_positions(105) == [1]  # 015 would have a leading zero
    assert _swap_positions(77) == []
    precedence = MISTAKES["precedence"](Problem((71, 51, 7), ("+", "*")), random.Random(0))
    assert completion_text(precedence) == "71+51=122, 122*7=854. The answer is 854."


@pytest.mark.parametrize("n", [100, 101])
def test_unpaired_labels_balanced(n):
    records = make_records("unpaired", "train", n=n, seed=4)
    labels = [r["label"] for r in records]
    assert all(isinstance(x, bool) for x in labels)
    assert sum(labels) == (n + 1) // 2
    for k in range(1, n + 1):  # every prefix is balanced too
        assert abs(2 * sum(labels[:k]) - k) <= 1
    for r in records:
        assert set(r) == {"prompt", "completion", "label"}
        truth = _check_user(r["prompt"], True)
        assert (_check_assistant(r["completion"], True) == truth) == r["label"]


def test_prompts_answer_is_the_number_as_a_string():
    for r in make_records("prompts", "test", n=300, seed=0, conversational=False):
        assert set(r) == {"prompt", "answer"} and isinstance(r["answer"], str)
        assert re.fullmatch(r"\d+", r["answer"]) and int(r["answer"]) == eval(_expression(r["prompt"]))


def test_same_seed_gives_same_problems_in_every_kind():
    prompts = [_expression(r["prompt"]) for r in make_records("prompts", "train", n=50, seed=9)]
    sft = [_expression(r["messages"][0]["content"]) for r in make_records("sft", "train", n=50, seed=9)]
    assert prompts == sft


# ---- registry and I/O ---------------------------------------------------------------------------------------------

def test_registry_and_jsonl_round_trip(tmp_path):
    assert TASKS["arithmetic"] is make_records
    with pytest.raises(KeyError, match="arithmetic"):
        make_task_records("nope", kind="sft")
    with pytest.raises(KeyError, match="prompts"):
        make_records("ppo", n=1)
    records = make_task_records("arithmetic", kind="preference", split="test", n=20, seed=0)
    path = write_jsonl(records, tmp_path / "sub" / "pairs.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert not list(path.parent.glob(".tmp-*"))


@pytest.mark.parametrize("kind", KINDS)
def test_records_pass_the_data_validators(kind):
    from posttrain.data.formats import load_dataset_records

    records = load_dataset_records("task:arithmetic", kind, split="test", n=30, seed=0)
    assert len(records) == 30
