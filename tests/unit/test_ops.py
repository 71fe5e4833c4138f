"""Hand-computed checks of the shared tensor helpers (posttrain/ops.py)."""

import math

import pytest
import torch

from posttrain.ops import IGNORE_INDEX, agg_loss, hidden_logprobs, masked_mean, shift_labels, token_logprobs, whiten


def test_shift_labels_by_hand():
    labels = torch.tensor([[5, 6, 7, 8], [IGNORE_INDEX, 1, 2, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[6, 7, 8, -100], [1, 2, -100, -100]]


def test_masked_mean_by_hand_and_empty_mask():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 3.0]
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_whiten_has_zero_mean_unit_var_on_mask():
    torch.manual_seed(0)
    x, m = torch.randn(4, 6) * 3 + 2, torch.ones(4, 6)
    m[0, 3:] = 0
    w = whiten(x, m)
    assert masked_mean(w, m).abs().item() < 1e-6
    sel = w[m.bool()]
    assert sel.var().item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_logprobs_equal_naive(dtype, chunk):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 40) * 4).to(dtype)
    labels = torch.randint(0, 40, (3, 5))
    labels[0, :2] = IGNORE_INDEX
    naive = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    naive = naive * (labels != IGNORE_INDEX)
    got, ent = token_logprobs(logits, labels, chunk_size=chunk, with_entropy=True)
    assert torch.allclose(got, naive, atol=1e-5)
    p = torch.softmax(logits.float(), -1)
    naive_ent = -(p * torch.log_softmax(logits.float(), -1)).sum(-1) * (labels != IGNORE_INDEX)
    assert torch.allclose(ent, naive_ent, atol=1e-4)


def test_hidden_logprobs_values_and_gradients_equal_naive():
    torch.manual_seed(1)
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False)
    labels = torch.randint(0, 30, (2, 7))
    labels[1, :3] = IGNORE_INDEX
    got = hidden_logprobs(hidden, head, labels, chunk_size=4)
    naive = torch.log_softmax(head(hidden), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != IGNORE_INDEX)
    assert torch.allclose(got, naive, atol=1e-6)
    g_got = torch.autograd.grad(got.sum(), [hidden, head.weight])
    g_naive = torch.autograd.grad(naive.sum(), [hidden, head.weight])
    for a, b in zip(g_got, g_naive):
        assert torch.allclose(a, b, atol=1e-6)
    # ignored positions get exactly zero gradient
    assert g_got[0][1, :3].abs().max().item() == 0.0


def test_hidden_logprobs_temperature_divides_logits():
    torch.manual_seed(2)
    hidden, head = torch.randn(1, 4, 8), torch.nn.Linear(8, 12, bias=False)
    labels = torch.randint(0, 12, (1, 4))
    got = hidden_logprobs(hidden, head, labels, temperature=0.6)
    naive = torch.log_softmax(head(hidden) / 0.6, -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(got, naive, atol=1e-6)


def test_agg_loss_modes_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert agg_loss(per_token, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert agg_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert agg_loss(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert agg_loss(per_token, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))
    # the whole accumulated batch's counts override the micro-batch's own
    assert agg_loss(per_token, mask, "token-mean", num_tokens=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        agg_loss(per_token, mask, "mean")
    assert math.isfinite(agg_loss(per_token, torch.zeros_like(mask), "token-mean").item())
