"""Reward registry: built-ins by name, ``module:function`` imported only when named, helpful errors."""

import sys
import textwrap

import pytest

from posttrain.rewards.registry import REWARDS, load_reward, register_reward

BUILTINS = {"numeric", "math", "format", "length_penalty", "soft_overlong", "code"}


def test_builtins_are_registered_by_name():
    load_reward("numeric")
    assert BUILTINS <= set(REWARDS)
    assert load_reward("format")(["q"], ["<think>a</think><answer>1</answer>"]) == [1.0]


def test_options_are_bound_and_checked():
    numeric = load_reward("numeric", tolerance=0.1)
    assert numeric(["q"], ["3.05"], answer=["3"]) == [1.0]
    assert numeric.__name__ == "numeric"
    with pytest.raises(ValueError, match="did you mean 'tolerance'"):
        load_reward("numeric", tolerence=0.1)


def test_unknown_name_lists_the_builtins_and_the_closest_match():
    with pytest.raises(ValueError) as err:
        load_reward("numerc")
    message = str(err.value)
    assert "Did you mean 'numeric'?" in message
    assert all(name in message for name in BUILTINS)


def test_register_refuses_a_second_function_under_the_same_name():
    @register_reward("_test_only_reward")
    def first(prompts, completions, **_):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="already registered"):
        register_reward("_test_only_reward")(lambda p, c, **_: [])
    del REWARDS["_test_only_reward"]


def test_module_function_is_imported_only_when_named(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_probe.py").write_text(textwrap.dedent("""
        IMPORTED = True
        def exclamations(prompts, completions, **_):
            return [float(c.count("!")) for c in completions]
        def scaled(prompts, completions, *, factor=1.0, **_):
            return [factor * len(c) for c in completions]
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards_probe", None)
    load_reward("numeric")
    with pytest.raises(ValueError):
        load_reward("exclamations")  # a bare name never searches user modules
    assert "my_rewards_probe" not in sys.modules
    fn = load_reward("my_rewards_probe:exclamations")
    assert "my_rewards_probe" in sys.modules
    assert fn(["q", "q"], ["hi!!", "no"]) == [2.0, 0.0]
    assert load_reward("my_rewards_probe:scaled", factor=2.0)(["q"], ["abc"]) == [6.0]
    with pytest.raises(ValueError, match="has no attribute"):
        load_reward("my_rewards_probe:missing")
    with pytest.raises(ValueError, match="not callable"):
        load_reward("my_rewards_probe:NOT_CALLABLE")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward("no_such_module_xyz:fn")
    sys.modules.pop("my_rewards_probe", None)
