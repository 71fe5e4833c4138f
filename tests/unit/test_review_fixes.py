"""Regression tests for a code review: a GGUF cache folder that is the same in every process, rollout chunks by
field name, and an LLM judge that sees the conversation (roles included) rather than flattened text."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import posttrain
from posttrain.models import bundled, loading
from posttrain.rewards import model_rewards
from posttrain.rewards.model_rewards import LLMJudgeReward
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFGenerator
from posttrain.types import Rollout
from tiny import tiny_llama, tiny_tokenizer

REPO = Path(posttrain.__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# GGUF cache folder

# Runs resolve_model_path in a fresh interpreter with the conversion replaced by writing config.json; prints the
# folder and whether this process converted.
_RESOLVE = """
import sys
from pathlib import Path
from posttrain.models import bundled, loading
converted = []
def fake(src, out):
    converted.append(1)
    Path(out).mkdir(parents=True)
    (Path(out) / "config.json").write_text("{}")
bundled.convert_gguf = fake
print(loading.resolve_model_path(sys.argv[1]), len(converted))
"""


def _fake_convert(calls):
    def convert(src, out):
        calls.append(Path(out))
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        return Path(out)
    return convert


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    path = tmp_path / "weights" / "model.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF not really")
    return path


def _resolve_in_subprocess(path: Path, hash_seed: str) -> tuple[str, int]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", _RESOLVE, str(path)], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_gguf_cache_folder_is_the_same_under_different_hash_seeds(gguf):
    first, converted_first = _resolve_in_subprocess(gguf, "1")
    second, converted_second = _resolve_in_subprocess(gguf, "2")
    assert first == second
    assert (converted_first, converted_second) == (1, 0)  # the second run reuses the first run's conversion
    assert Path(first) == loading.gguf_cache_dir(gguf)


def test_gguf_is_converted_once_and_again_when_the_file_changes(gguf, monkeypatch):
    calls = []
    monkeypatch.setattr(bundled, "convert_gguf", _fake_convert(calls))
    out = loading.resolve_model_path(str(gguf))
    assert loading.resolve_model_path(str(gguf)) == out and len(calls) == 1
    assert Path(out).parent == bundled.posttrain_home() / "models" and Path(out).name.startswith("model.Q4-")
    gguf.write_bytes(b"GGUF replaced by a bigger file")  # new size (and mtime): not the converted weights
    assert loading.resolve_model_path(str(gguf)) != out and len(calls) == 2


# ---------------------------------------------------------------------------------------------------------------
# rollout chunks


def test_hf_generate_chunk_returns_a_rollout_by_field():
    tok = tiny_tokenizer()
    generator = HFGenerator(tiny_llama(), tok.pad_token_id)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    prompts = [[5, 6, 7], [8, 9]]
    with torch.inference_mode():
        chunk = generator._generate_chunk(prompts, params, 3, torch.Generator().manual_seed(0), None)
    assert isinstance(chunk, Rollout)
    assert chunk.prompt_ids.shape == chunk.prompt_mask.shape == (6, 3)
    assert chunk.completion_ids.shape == chunk.completion_mask.shape == chunk.logprobs.shape
    assert chunk.truncated.shape == (6,) and chunk.group.tolist() == [0, 0, 0, 1, 1, 1]
    whole = generator.generate(prompts, SamplingParams(max_new_tokens=4, batch_size=1), num_samples=3, seed=0)
    assert whole.group.tolist() == [0, 0, 0, 1, 1, 1]  # chunk-local groups become global ones


# ---------------------------------------------------------------------------------------------------------------
# LLM judge: the prompt's roles reach the question

CONVERSATION = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}]


def _judge(template: str, chat_template: bool = True) -> LLMJudgeReward:
    """A judge on the tiny Llama; its character-level tokenizer gets whole-word yes/no tokens to read."""
    tok = tiny_tokenizer()
    tok.add_tokens(["yes", "no"])
    if not chat_template:
        tok.chat_template = None
    return LLMJudgeReward(tiny_llama(vocab_size=len(tok)), tok, template)


def _judge_questions(monkeypatch, judge, *args, **columns) -> list[str]:
    """The texts the judge tokenizes (its question, inside the judge's own template when it has one)."""
    seen = []
    encode = model_rewards._encode

    def capture(tokenizer, texts, *rest, **kw):
        seen.extend(texts)
        return encode(tokenizer, texts, *rest, **kw)

    monkeypatch.setattr(model_rewards, "_encode", capture)
    scores = judge(*args, **columns)
    assert len(scores) == len(seen)
    return seen


def test_judge_sees_a_conversation_with_its_roles(monkeypatch):
    """With a chat template too, the inner conversation is "role: content" lines inside the judge's own user turn:
    the template's turn markers there would close that turn early."""
    judge = _judge("{prompt}")
    tok = judge.tokenizer
    flattened = "Be terse.\nWhat is 2+2?"  # what the trainers pass as `prompts`
    [text] = _judge_questions(monkeypatch, judge, [flattened], ["4"], raw_prompt=[CONVERSATION])
    inner = "system: Be terse.\nuser: What is 2+2?"
    assert text == tok.apply_chat_template([{"role": "user", "content": inner}], tokenize=False,
                                           add_generation_prompt=True)
    assert text.count("<|im_end|>") == 1  # only the judge's own user turn is closed


def test_judge_without_a_chat_template_writes_role_lines(monkeypatch):
    judge = _judge("Q: {prompt}\nA: {completion}\nCorrect?", chat_template=False)
    [text] = _judge_questions(monkeypatch, judge, ["Be terse.\nWhat is 2+2?"], ["4"], raw_prompt=[CONVERSATION])
    assert text == "Q: system: Be terse.\nuser: What is 2+2?\nA: 4\nCorrect?"


def test_judge_string_prompts_are_used_as_they_are(monkeypatch):
    judge = _judge("{prompt}|{completion}|{gold}", chat_template=False)
    texts = _judge_questions(monkeypatch, judge, ["a", "b"], ["x", "y"], raw_prompt=["a", "b"], gold=["1", "2"])
    assert texts == ["a|x|1", "b|y|2"]
    assert _judge_questions(monkeypatch, judge, ["a"], ["x"], gold=["1"])[-1] == "a|x|1"  # no raw_prompt: `prompts`
