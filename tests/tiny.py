"""Tiny models and tokenizers built by the tests themselves (no hub, no files): a 2-layer Llama and a
character-level tokenizer with ChatML special tokens, where pad == eos like SmolLM2's."""

from __future__ import annotations

import string

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = sorted(set(string.printable))


def tiny_tokenizer(pad_is_eos: bool = True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from posttrain.data.chat import CHATML_TEMPLATE

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_llama(vocab_size: int | None = None, seed: int = 0, layers: int = 2, hidden: int = 32):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(SPECIALS) + len(CHARS), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=2, eos_token_id=3, pad_token_id=3, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def tiny_model_dir(path, seed: int = 0, pad_is_eos: bool = True) -> str:
    """Save a tiny Llama + tokenizer as a normal HF checkpoint folder and return its path."""
    model, tok = tiny_llama(seed=seed), tiny_tokenizer(pad_is_eos)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_config(command: str, out_dir, model_dir: str, data: str, *overrides: str):
    """A RunConfig for a quick tiny-model run: fp32, no TensorBoard, no progress bar."""
    from posttrain.config import load_config
    from posttrain.train import registry

    registry.get(command)  # imports the command's module: registers its algo section
    base = ["model.autocast=none", "train.tensorboard=false", "train.progress=false", "data.eval_fraction=0.1"]
    return load_config(command, None, base + list(overrides), {
        "model.name_or_path": model_dir, "data.path": data, "train.output_dir": str(out_dir)})


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def addition_sft_rows(n: int = 64):
    return [{"messages": [{"role": "user", "content": f"{i % 10}+{i % 7}"}, {"role": "assistant", "content": str(i % 10 + i % 7)}]}
            for i in range(n)]


def vowel_reward(prompts, completions, **_):
    """A trivially learnable dense reward: the share of vowels in the completion (0 for an empty one)."""
    return [sum(ch in "aeiou" for ch in c) / len(c) if c else 0.0 for c in completions]


def prompt_rows(n: int = 32):
    return [{"prompt": f"say {i}", "answer": str(i)} for i in range(n)]


def vowel_reward_on_odd_prompts(prompts, completions, **_):
    """`vowel_reward` for prompts ending in an odd digit, a constant 0.5 otherwise: half the groups have zero
    variance, so half the rows of a GRPO rollout have advantage 0."""
    dense = vowel_reward(prompts, completions)
    return [r if p.rstrip()[-1] in "13579" else 0.5 for p, r in zip(prompts, dense)]


def constant_reward(prompts, completions, **_):
    """The same reward for every completion: every GRPO group has zero variance."""
    return [0.5] * len(completions)


def sum_pair_rows(n: int = 24, wrong_by=lambda rng: 1) -> list[dict]:
    """Preference pairs on sums: a right ("ok S") and a wrong ("no S+k") answer, seeded."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append({"prompt": f"{a}+{b}=", "chosen": f"ok {a + b}", "rejected": f"no {a + b + wrong_by(rng)}"})
    return rows


def first_code_even(prompts, completions, **_):
    """A 0/1 label a random tiny model's samples split about evenly on: 1 when the completion's first character has
    an even code point. Stands in for a verifier where the tiny model never answers right (on-policy pairs need both)."""
    return [1.0 if c and ord(c[0]) % 2 == 0 else 0.0 for c in completions]
