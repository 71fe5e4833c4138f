"""KTO: hand-computed values (math module), the z_ref clamp, gradient directions, mismatched KL pairs (KTO pairs matched with themselves: TRL #1911)."""

import math

import pytest
import torch

from posttrain.algos.kto import kto_loss, mismatched_indices


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def t(xs, dtype=torch.float64, **kw):
    return torch.tensor(xs, dtype=dtype, **kw)


POLICY = [-10.0, -12.0, -7.0, -20.0]
REF = [-11.0, -11.0, -9.0, -18.0]  # r = [1, -1, 2, -2]
DESIRABLE = [True, False, True, False]
KL_POLICY = [-15.0, -14.0, -13.0, -16.0]
KL_REF = [-16.0, -15.0, -13.5, -15.0]  # differences [1, 1, 0.5, -1] -> mean 0.375


def test_kto_hand_computed():
    beta, wd, wu, z = 0.5, 1.5, 0.7, 0.375
    r = [1.0, -1.0, 2.0, -2.0]
    expected = [
        wd * (1 - sig(beta * (r[0] - z))),
        wu * (1 - sig(beta * (z - r[1]))),
        wd * (1 - sig(beta * (r[2] - z))),
        wu * (1 - sig(beta * (z - r[3]))),
    ]
    out = kto_loss(t(POLICY), t(REF), torch.tensor(DESIRABLE), t(KL_POLICY), t(KL_REF), beta, wd, wu)
    assert out.loss.item() == pytest.approx(sum(expected) / 4, abs=1e-12)
    assert out.metrics["kto/z_ref"].item() == pytest.approx(z)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.5 * 1.5)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(0.5 * -1.5)
    assert out.metrics["rewards/margins"].item() == pytest.approx(1.5)


def test_z_ref_clamped_at_zero_and_detached():
    beta = 0.1
    kl_policy = t([-16.0, -16.0, -16.0, -16.0], requires_grad=True)
    kl_ref = t([-15.0, -15.5, -14.0, -15.0])  # mean difference −1.125 < 0 → z_ref = 0
    r = [1.0, -1.0, 2.0, -2.0]
    expected = [1 - sig(beta * x) if d else 1 - sig(-beta * x) for x, d in zip(r, DESIRABLE)]
    out = kto_loss(t(POLICY), t(REF), torch.tensor(DESIRABLE), kl_policy, kl_ref, beta)
    assert out.metrics["kto/z_ref"].item() == 0.0
    assert out.loss.item() == pytest.approx(sum(expected) / 4, abs=1e-12)
    assert not out.loss.requires_grad  # nothing but kl_policy needed grad, and z_ref is detached


def test_gradient_directions():
    policy = t(POLICY, requires_grad=True)
    kl_policy = t(KL_POLICY, requires_grad=True)
    kto_loss(policy, t(REF), torch.tensor(DESIRABLE), kl_policy, t(KL_REF)).loss.backward()
    desirable = torch.tensor(DESIRABLE)
    assert (policy.grad[desirable] < 0).all() and (policy.grad[~desirable] > 0).all()
    assert kl_policy.grad is None  # no gradient through the reference point


def test_one_sided_batches_skip_missing_metrics():
    out = kto_loss(t(POLICY), t(REF), torch.ones(4, dtype=torch.bool), t(KL_POLICY), t(KL_REF))
    assert "rewards/chosen" in out.metrics and "rewards/rejected" not in out.metrics
    assert "rewards/margins" not in out.metrics
    out = kto_loss(t(POLICY), t(REF), torch.zeros(4, dtype=torch.bool), t(KL_POLICY), t(KL_REF))
    assert "rewards/rejected" in out.metrics and "rewards/chosen" not in out.metrics
    assert all(torch.isfinite(v) for v in out.metrics.values()) and torch.isfinite(out.loss)


def test_bf16_inputs_match_float64():
    def run(dtype):
        return kto_loss(t(POLICY, dtype), t(REF, dtype), torch.tensor(DESIRABLE), t(KL_POLICY, dtype), t(KL_REF, dtype))

    lo, hi = run(torch.bfloat16), run(torch.float64)
    assert lo.loss.dtype == torch.float32
    assert lo.loss.item() == pytest.approx(hi.loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------- mismatched pairs


@pytest.mark.parametrize("batch_size", range(2, 10))
def test_mismatched_indices_is_a_derangement(batch_size):
    for seed in range(40):
        idx = mismatched_indices(batch_size, torch.Generator().manual_seed(seed))
        assert idx.dtype == torch.long and idx.shape == (batch_size,)
        assert sorted(idx.tolist()) == list(range(batch_size))  # a permutation: every completion used once
        assert (idx != torch.arange(batch_size)).all()


def test_mismatched_indices_uses_the_generator():
    shifts = {int(mismatched_indices(7, torch.Generator().manual_seed(s))[0]) for s in range(40)}
    assert len(shifts) > 1
    a = mismatched_indices(7, torch.Generator().manual_seed(3))
    assert torch.equal(a, mismatched_indices(7, torch.Generator().manual_seed(3)))


def test_mismatched_indices_batch_of_one_and_zero():
    assert mismatched_indices(1).tolist() == [0]
    with pytest.raises(ValueError):
        mismatched_indices(0)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_kl_term_finite_at_small_batches(batch_size):
    # KL completions gathered through mismatched_indices, as a trainer would do
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(batch_size, generator=g, dtype=torch.float64) * 5 - 20
    ref = policy + torch.randn(batch_size, generator=g, dtype=torch.float64)
    idx = mismatched_indices(batch_size, g)
    policy.requires_grad_(True)
    desirable = torch.arange(batch_size) % 2 == 0
    out = kto_loss(policy, ref, desirable, policy.detach()[idx] - 1.0, ref[idx])
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(policy.grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
