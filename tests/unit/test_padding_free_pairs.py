"""Padding-free DPO and KTO batches: pairs (or sequences) packed side by side give the padded batch's summed
log-probs and gradients (to 1e-5 in fp32), with and without the shared prompt; a packed DPO run trains like the
padded one."""

import pytest
import torch

from posttrain.data.chat import Encoded
from posttrain.data.preference import PairItem, pair_batch
from posttrain.models.forward import sequence_logps
from posttrain.ops import IGNORE_INDEX
from posttrain.train.kto import KTOItem, kto_batch
from tiny import run_config, sum_pair_rows, tiny_model_dir, write_jsonl

from test_padding_free import PAD, llama


def pairs(seed=0, n=6):
    """Pairs with a common prompt of 2-8 tokens and tails of 1-9: lengths vary, so packing removes padding."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    out = []
    for i in range(n):
        prompt = torch.randint(1, 64, (rand(2, 9),), generator=g).tolist()
        tails = [torch.randint(1, 64, (rand(1, 10),), generator=g).tolist() for _ in range(2)]
        chosen, rejected = (Encoded(prompt + t, [IGNORE_INDEX] * len(prompt) + t) for t in tails)
        out.append(PairItem(i, chosen, rejected))
    return out


def _sums_and_grads(model, batch):
    model.zero_grad()
    sums, counts = sequence_logps(model, batch)
    (sums * torch.linspace(0.5, 1.5, len(sums))).sum().backward()  # a weight per sequence: errors can't cancel
    return sums.detach(), counts, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_pairs_equal_padded(attn, share_prompt):
    model, items = llama(attn), pairs()
    padded = pair_batch(items, PAD, "train", share_prompt)
    packed = pair_batch(items, PAD, "train", share_prompt, padding_free=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows
    assert packed["padding_fraction"] < padded["padding_fraction"]
    want, got = _sums_and_grads(model, padded), _sums_and_grads(model, packed)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1])  # the same tokens counted per sequence
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_kto_rows_equal_padded():
    model = llama()
    items = [KTOItem(i, p.chosen, p.rejected, i % 2 == 0, -1) for i, p in enumerate(pairs(1, n=12))]
    padded, packed = kto_batch(items, PAD, "train"), kto_batch(items, PAD, "train", padding_free=True)
    assert packed["num_seqs"] == padded["num_seqs"] == len(items)
    for key in (None, "kl"):
        a, b = (padded, packed) if key is None else (padded[key], packed[key])
        assert b["input_ids"].shape[0] < a["input_ids"].shape[0]
        want, got = _sums_and_grads(model, a), _sums_and_grads(model, b)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
        for x, y in zip(got[2], want[2]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("command", ["dpo", "kto", "rm"])
def test_padding_free_and_token_budget_runs_train_like_the_padded_one(tmp_path, command):
    """Packed rows, micro-batches cut by a token budget (about two pairs each here, against grad_accum 2 batches
    of 4), and both: the same losses as the padded run, step by step."""
    from posttrain.metrics import read_metrics
    from posttrain.train import registry

    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", sum_pair_rows(24))
    losses = {}
    budget = "train.max_tokens_per_micro_batch=128"
    variants = {"padded": [], "packed": ["train.padding_free=true"], "budget": [budget],
                "packed_budget": ["train.padding_free=true", budget]}
    for name, extra in variants.items():
        registry.run(run_config(command, tmp_path / name, model_dir, data, "train.batch_size=4", "train.grad_accum=2",
                                "train.max_steps=4", "train.lr=1e-3", "train.eval_every=0", *extra))
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r and "eval/loss" not in r]
    for name in variants:
        assert len(losses[name]) == 4, name
        assert losses[name] == pytest.approx(losses["padded"], abs=1e-5), name


def test_token_budget_groups_cut_an_update_by_padded_cost():
    from types import SimpleNamespace

    from posttrain.train.common import pair_cost, token_budget_groups

    cfg = SimpleNamespace(train=SimpleNamespace(max_tokens_per_micro_batch=100))
    pairs = [(10, 30), (20, 20), (5, 6), (25, 10), (12, 12)]  # costs 60, 40, 12, 50, 24
    groups = token_budget_groups([pairs[:3], pairs[3:]], lambda p: pair_cost(*p), cfg)
    assert sorted(p for g in groups for p in g) == sorted(pairs)  # every pair once
    for g in groups:  # rows x the group's longest within the budget
        assert len(g) * max(pair_cost(*p) for p in g) <= 100 or len(g) == 1
    assert [len(g) for g in groups] == [1, 2, 2]  # 60 | 50 40 | 24 12
    cfg.train.max_tokens_per_micro_batch = 0
    assert token_budget_groups([pairs[:3], pairs[3:]], lambda p: pair_cost(*p), cfg) == [pairs[:3], pairs[3:]]
