"""Reward model on a tiny Llama: > 90% held-out accuracy on cleanly separable pairs; final/ loads as a classifier."""

import random

import pytest
import torch

from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from posttrain.train.rm import bradley_terry_loss
from tiny import run_config, write_jsonl


def separable_pairs(n: int, seed: int):
    """chosen answers are made of 'a's, rejected of 'z's: a reward model only needs one feature."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 6)))
        rows.append({"prompt": f"q{q}", "chosen": "a" * rng.randint(1, 6), "rejected": "z" * rng.randint(1, 6)})
    return rows


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    import math

    expected = [-math.log(1 / (1 + math.exp(-1.0))), math.log(2.0)]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected)
    assert bradley_terry_loss(chosen, rejected, center_coef=0.5).tolist() == pytest.approx([expected[0] + 0.5 * 9, expected[1]])


def test_reward_model_separates_pairs(tmp_path, tiny_dir):
    train = write_jsonl(tmp_path / "train.jsonl", separable_pairs(96, 0))
    held = write_jsonl(tmp_path / "held.jsonl", separable_pairs(40, 1))
    cfg = run_config("rm", tmp_path / "rm", tiny_dir, train, f"data.eval_path={held}", "train.max_steps=40",
                     "train.lr=3e-3", "train.batch_size=8")
    run(cfg)
    rows = read_metrics(tmp_path / "rm")
    assert rows[-1]["eval/accuracy"] > 0.9
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")
    assert model.config.num_labels == 1
