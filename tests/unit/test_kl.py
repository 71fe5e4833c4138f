import math

import pytest
import torch

from posttrain.algos.kl import KL_CONTROLLERS, AdaptiveKLController, FixedKLController, kl_estimate


def test_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref_logp = torch.tensor([-2.0, -1.0, -0.5])  # log r = -1, +1, 0
    torch.testing.assert_close(kl_estimate(logp, ref_logp, "k1"), torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(kl_estimate(logp, ref_logp, "k2"), torch.tensor([0.5, 0.5, 0.0]))
    k3 = torch.tensor([math.exp(-1) - 1 + 1, math.e - 1 - 1, 0.0])
    torch.testing.assert_close(kl_estimate(logp, ref_logp, "k3"), k3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_k2_k3_nonnegative_and_finite_at_extremes(dtype):
    gen = torch.Generator().manual_seed(0)
    logp = torch.cat([-torch.rand(1000, generator=gen) * 30, torch.tensor([0.0, -1e4, -1e-3, 0.0])]).to(dtype)
    ref = torch.cat([-torch.rand(1000, generator=gen) * 30, torch.tensor([-1e4, 0.0, 0.0, -1e-3])]).to(dtype)
    for kind in ("k1", "k2", "k3"):
        kl = kl_estimate(logp, ref, kind)
        assert kl.dtype == torch.float32 and torch.isfinite(kl).all()
        if kind != "k1":
            assert (kl >= 0).all()
    # inside the clamp range the result equals a float64 computation on the same (rounded) inputs
    inside = (ref.double() - logp.double()).abs() < 20
    exact = torch.expm1(ref.double() - logp.double()) - (ref.double() - logp.double())
    torch.testing.assert_close(kl_estimate(logp, ref, "k3")[inside].double(), exact[inside], rtol=1e-5, atol=1e-6)


def test_monte_carlo_mean_matches_exact_kl():
    pi = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.10, 0.15, 0.25, 0.20, 0.20, 0.10], dtype=torch.float64)
    exact = (pi * (pi / ref).log()).sum().item()  # KL(pi || ref) = 0.2306...
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref_logp = pi.log()[tokens], ref.log()[tokens]
    for kind in ("k1", "k3"):
        assert abs(kl_estimate(logp, ref_logp, kind).mean().item() - exact) < 1e-2, kind
    # k2 is biased: its mean is not the KL here, which is why it is never the default
    assert abs(kl_estimate(logp, ref_logp, "k2").mean().item() - exact) > 1e-2
    # argument order matters: swapped, k1 estimates -KL, the sign bug this test exists for
    assert abs(kl_estimate(ref_logp, logp, "k1").mean().item() + exact) < 1e-2


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_policy_equal_to_reference_gives_zero_kl_and_zero_gradient(kind):
    logits = torch.randn(6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    logp_all = torch.log_softmax(logits, -1)
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 2, 2])
    logp, ref_logp = logp_all[tokens], logp_all.detach()[tokens]
    kl = kl_estimate(logp, ref_logp, kind)
    assert (kl == 0).all()
    if kind == "k1":
        # k1's per-token gradient is 1; it vanishes in expectation over pi: sum_x pi(x) grad log pi(x) = 0
        (logp_all.exp().detach() * kl_estimate(logp_all, logp_all.detach(), kind)).sum().backward()
        torch.testing.assert_close(logits.grad, torch.zeros(6), atol=1e-7, rtol=0)
    else:
        kl.sum().backward()
        assert (logits.grad == 0).all()


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


def test_adaptive_controller_moves_by_hand_computed_amount():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    assert ctl.update(current_kl=8.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))  # err 1/3 -> 0.2
    assert ctl.value > 0.1
    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    assert ctl.update(5.0, 256) == pytest.approx(0.1 * (1 - (1 / 6) * 256 / 10_000))  # unclipped error -1/6
    assert ctl.value < 0.1
    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    assert ctl.update(0.0, 256) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000))  # err -1 -> -0.2
    assert AdaptiveKLController(0.1, 6.0, 10_000).update(6.0, 256) == pytest.approx(0.1)


def test_controllers_state_dict_roundtrip_and_registry():
    ctl = KL_CONTROLLERS["adaptive"](0.05, 1.0, 100)
    for kl in (3.0, 2.0, 0.1):
        ctl.update(kl, 10)
    resumed = AdaptiveKLController(0.05, 1.0, 100)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    assert resumed.update(1.5, 10) == ctl.update(1.5, 10)
    fixed = KL_CONTROLLERS["fixed"](0.04)
    assert isinstance(fixed, FixedKLController) and fixed.update(100.0, 1000) == 0.04 == fixed.value
