"""Padding-free batches: packed rows give the padded batch's log-probs, SFT loss and gradients (to 1e-5 in
fp32), on a RoPE model and an absolute-position one; first-fit packing and the token budget follow their rules;
an SFT run with packing and a token budget trains like the padded one."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from posttrain.data.chat import Encoded
from posttrain.data.padding_free import first_fit_rows, pack_documents, packed_micro_batches, token_budget_batches
from posttrain.ops import IGNORE_INDEX
from posttrain.train.common import padded_sft_batch
from posttrain.train.sft import sft_loss

PAD = 0


def llama(attn="sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, initializer_range=0.2)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()  # no dropout


def items(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))  # loss on the completion only
    return out


def test_first_fit_decreasing_rows():
    rows = first_fit_rows([5, 9, 3, 7, 2, 4], 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert rows == [[1], [3, 2], [0, 5], [4]] or all(sum([5, 9, 3, 7, 2, 4][i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 30 tokens in rows of 10: 3 is the bound, FFD reaches 4 here ([9], [7 3], [5 4], [2])
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_rows([11], 10)


def test_pack_documents_layout():
    seqs = [Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8, 9], [8, 9])]
    b = pack_documents(seqs, PAD, width=6)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, PAD]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert b["documents"].tolist() == [[0, 0, 0, 1, 1, -1]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]  # no label across documents
    assert b["num_seqs"] == 2 and b["padding_fraction"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("make", [llama, lambda: llama("eager"), gpt2], ids=["llama-sdpa", "llama-eager", "gpt2"])
def test_packed_sft_loss_and_gradients_equal_padded(make):
    model = make()
    seqs = items()
    totals_of = lambda b: {"num_tokens": int((b["labels"][:, 1:] != IGNORE_INDEX).sum()), "num_seqs": len(seqs)}  # noqa: E731
    padded = padded_sft_batch(seqs, PAD)
    packed = pack_documents(seqs, PAD)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows: padding removed
    assert totals_of(packed)["num_tokens"] == totals_of(padded)["num_tokens"]
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = sft_loss(model, batch, totals_of(batch)).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=0)
    for g_packed, g_padded in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(g_packed, g_padded, atol=1e-5, rtol=1e-4)


def test_token_budget_batches_respect_the_budget():
    lengths = [12, 3, 7, 7, 30, 5, 9, 1]
    micro = token_budget_batches(lengths, 24)
    assert sorted(i for m in micro for i in m) == list(range(len(lengths)))
    for m in micro:
        assert len(m) * max(lengths[i] for i in m) <= 24 or len(m) == 1  # the 30 alone, over budget
    assert [4] in micro


def test_packed_micro_batches_by_budget_and_by_parts():
    lengths = [12, 3, 7, 7, 10, 5, 9, 1]
    by_budget = packed_micro_batches(lengths, 12, max_tokens=24)
    assert all(len(rows) <= 2 for rows in by_budget)
    assert sorted(i for rows in by_budget for r in rows for i in r) == list(range(8))
    assert len(packed_micro_batches(lengths, 12, parts=2)) == 2


def test_sft_run_padding_free_with_token_budget_matches_padded(tmp_path):
    """The same SFT run with packed rows and token-budget micro-batches: the same losses as padded micro-batches
    (fp32, one process; the gradient is normalized by the update's tokens either way)."""
    import json

    from posttrain.train import registry
    from tiny import addition_sft_rows, run_config, tiny_model_dir, write_jsonl

    model_dir = tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(48))
    runs = {}
    for name, extra in (("padded", []), ("packed", ["train.padding_free=true", "train.max_tokens_per_micro_batch=64"])):
        registry.run(run_config("sft", tmp_path / name, model_dir, data, "train.batch_size=4", "train.grad_accum=2",
                                "train.max_steps=4", "train.lr=1e-3", "data.eval_fraction=0.0", *extra))
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = [r for r in map(json.loads, lines) if "loss" in r and "padding_fraction" in r]
    assert len(runs["padded"]) == len(runs["packed"]) == 4
    for a, b in zip(runs["padded"], runs["packed"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_packed_reward_scores_and_gradients_equal_padded():
    """RM: each of the 2B sequences scored at its own last token in a packed batch = the padded batch's scores."""
    from transformers import LlamaForSequenceClassification

    from posttrain.data.preference import pad_pair_ids
    from posttrain.models.forward import pair_scores
    from posttrain.train.rm import bradley_terry_loss, packed_pairs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, num_labels=1, pad_token_id=PAD)
    model = LlamaForSequenceClassification(cfg)
    seqs = [x.input_ids for x in items(seed=3, n=12)]
    pairs = list(zip(seqs[:6], seqs[6:]))
    results = []
    for batch in (pad_pair_ids(pairs, PAD), packed_pairs(pairs, PAD)):
        model.zero_grad()
        chosen, rejected = pair_scores(model, batch)
        bradley_terry_loss(chosen, rejected).mean().backward()
        results.append((chosen.detach(), rejected.detach(), model.score.weight.grad.clone()))
    assert packed_pairs(pairs, PAD)["input_ids"].shape[0] < 12  # fewer rows than the padded batch's
    for packed, padded in zip(results[1], results[0]):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
