"""The DPO family: hand-computed values (math module, scalar formulas), gradient directions, numerics, registry."""

import math

import pytest
import torch

from posttrain.algos.preference import (
    PREFERENCE_LOSSES,
    PairLogps,
    log1mexp,
    needs_reference,
    preference_loss,
    register,
)

LN2 = math.log(2.0)
PAIRWISE = ["dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"]
WITH_REF = {"dpo", "cdpo", "robust", "ipo", "hinge"}

# Two pairs: (chosen, rejected, ref_chosen, ref_rejected, len_chosen, len_rejected)
ROWS = [(-5.0, -7.0, -6.0, -6.0, 4.0, 5.0), (-8.0, -6.0, -7.0, -7.0, 8.0, 3.0)]


def make(rows=ROWS, dtype=torch.float64, requires_grad=False, nll=None):
    cols = list(zip(*rows))
    t = [torch.tensor(c, dtype=dtype) for c in cols]
    for x in t[:2]:
        x.requires_grad_(requires_grad)
    return PairLogps(t[0], t[1], t[4], t[5], t[2], t[3], nll)


def neg_logsig(x):  # -log σ(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def mean(xs):
    return sum(xs) / len(xs)


def h_of(c, r, rc, rr):
    return (c - rc) - (r - rr)


# ----------------------------------------------------------------------------------------------- hand values


def test_dpo_hand_computed():
    # row 1: h = (−5+6) − (−7+6) = 2;  row 2: h = (−8+7) − (−6+7) = −2;  β = 0.5
    out = preference_loss("dpo", make(), beta=0.5)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    m = out.metrics
    assert m["rewards/chosen"].item() == pytest.approx(mean([0.5 * 1, 0.5 * -1]))
    assert m["rewards/rejected"].item() == pytest.approx(mean([0.5 * -1, 0.5 * 1]))
    assert m["rewards/margins"].item() == pytest.approx(mean([1.0, -1.0]))
    assert m["rewards/accuracies"].item() == 0.5
    assert m["logps/chosen"].item() == pytest.approx(-6.5)
    assert m["logps/rejected"].item() == pytest.approx(-6.5)


def test_rpo_nll_term_hand_computed_and_raises_the_chosen_logp():
    # NLL of the chosen completions: 5/4 and 8/8; α = 0.5 adds 0.5 * mean(1.25, 1.0) = 0.5625 to DPO's loss
    base, rpo = preference_loss("dpo", make(), beta=0.5), preference_loss("dpo", make(), beta=0.5, nll_weight=0.5)
    assert rpo.loss.item() == pytest.approx(base.loss.item() + 0.5625, abs=1e-12)
    assert rpo.metrics["nll_loss"].item() == pytest.approx(1.125)
    lp_base, lp_rpo = make(requires_grad=True), make(requires_grad=True)
    preference_loss("dpo", lp_base, beta=0.5).loss.backward()
    preference_loss("dpo", lp_rpo, beta=0.5, nll_weight=0.5).loss.backward()
    # d/d chosen_logps gains -α / (len · B): -0.5/(4·2) and -0.5/(8·2); the rejected gradient is unchanged
    extra = lp_rpo.chosen_logps.grad - lp_base.chosen_logps.grad
    assert extra.tolist() == pytest.approx([-0.0625, -0.03125])
    assert torch.equal(lp_rpo.rejected_logps.grad, lp_base.rejected_logps.grad)


@pytest.mark.parametrize("name", ["dpo", "cdpo"])
def test_cdpo_label_smoothing_hand_computed(name):
    beta, eps = 0.3, 0.2
    hs = [h_of(*r[:4]) for r in ROWS]
    expected = mean([(1 - eps) * neg_logsig(beta * h) + eps * neg_logsig(-beta * h) for h in hs])
    out = preference_loss(name, make(), beta=beta, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_robust_hand_computed_and_limits():
    beta, eps = 0.3, 0.2
    per_row = [((1 - eps) * neg_logsig(beta * h_of(*r[:4])) - eps * neg_logsig(-beta * h_of(*r[:4]))) / (1 - 2 * eps)
               for r in ROWS]
    assert preference_loss("robust", make(), beta=beta, label_smoothing=eps).loss.item() == pytest.approx(
        mean(per_row), abs=1e-12)
    # ε = 0 is plain DPO; ε ≥ 0.5 has no unbiased estimator
    assert preference_loss("robust", make(), beta=beta).loss.item() == pytest.approx(
        preference_loss("dpo", make(), beta=beta).loss.item(), abs=1e-15)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("robust", make(), label_smoothing=0.5)


def test_ipo_hand_computed_length_averaged():
    beta = 0.5  # target 1/(2β) = 1
    # row 1: (−5+6)/4 − (−7+6)/5 = 0.25 + 0.2 = 0.45;  row 2: (−8+7)/8 − (−6+7)/3 = −0.125 − 1/3
    h1, h2 = 0.45, -0.125 - 1 / 3
    expected = mean([(h1 - 1) ** 2, (h2 - 1) ** 2])
    out = preference_loss("ipo", make(), beta=beta)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(mean([0.5 * 0.25, 0.5 * -0.125]))


def test_hinge_hand_computed():
    beta = 0.75  # row 1: 1 − 0.75·2 < 0 → 0;  row 2: 1 − 0.75·(−2) = 2.5
    assert preference_loss("hinge", make(), beta=beta).loss.item() == pytest.approx((0.0 + 2.5) / 2, abs=1e-12)


def test_simpo_hand_computed():
    beta, gamma = 2.0, 0.5
    # row 1: 2·(−5/4) − 2·(−7/5) − 0.5 = −2.5 + 2.8 − 0.5 = −0.2;  row 2: 2·(−1) − 2·(−2) − 0.5 = 1.5
    expected = mean([neg_logsig(-0.2), neg_logsig(1.5)])
    out = preference_loss("simpo", make(), beta=beta, simpo_gamma=gamma)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(mean([-2.5, -2.0]))
    assert out.metrics["rewards/rejected"].item() == pytest.approx(mean([-2.8, -4.0]))
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_simpo_is_length_normalized():
    doubled = [(2 * c, 2 * r, rc, rr, 2 * lc, 2 * lr) for c, r, rc, rr, lc, lr in ROWS]
    a = preference_loss("simpo", make(), beta=2.0).loss.item()
    b = preference_loss("simpo", make(doubled), beta=2.0).loss.item()
    assert a == pytest.approx(b, abs=1e-12)


def log_odds(avg):
    return avg - math.log(1 - math.exp(avg))


def test_orpo_hand_computed():
    lam = 0.25
    per_row, ratios = [], []
    for c, r, _, _, lc, lr in ROWS:
        lor = log_odds(c / lc) - log_odds(r / lr)
        ratios.append(lor)
        per_row.append(-c / lc + lam * neg_logsig(lor))
    out = preference_loss("orpo", make(), orpo_lambda=lam)
    assert out.loss.item() == pytest.approx(mean(per_row), abs=1e-12)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(mean(ratios), abs=1e-12)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(mean([-neg_logsig(x) for x in ratios]), abs=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(mean([5 / 4, 1.0]))
    assert out.metrics["rewards/chosen"].item() == pytest.approx(lam * mean([-5 / 4, -1.0]))
    # an explicit chosen_nll replaces the derived one
    nll = torch.tensor([3.0, 4.0], dtype=torch.float64)
    out2 = preference_loss("orpo", make(nll=nll), orpo_lambda=lam)
    assert out2.loss.item() == pytest.approx(mean(per_row) - mean([5 / 4, 1.0]) + 3.5, abs=1e-12)


def test_orpo_equal_probabilities():
    lam = 0.3  # both completions average −0.5 per token
    rows = [(-2.0, -1.5, 0.0, 0.0, 4.0, 3.0)]
    out = preference_loss("orpo", make(rows), orpo_lambda=lam)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(0.0, abs=1e-12)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(-LN2, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.5 + lam * LN2, abs=1e-12)


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", PAIRWISE)
def test_gradient_directions(name):
    # policy == reference, so IPO sits below its target and hinge is active
    rows = [(-5.0, -7.0, -5.0, -7.0, 4.0, 5.0), (-8.0, -6.0, -8.0, -6.0, 8.0, 3.0)]
    lp = make(rows, requires_grad=True)
    preference_loss(name, lp, beta=0.5, label_smoothing=0.1 if name in ("cdpo", "robust") else 0.0).loss.backward()
    assert (lp.chosen_logps.grad < 0).all(), lp.chosen_logps.grad
    assert (lp.rejected_logps.grad > 0).all(), lp.rejected_logps.grad


def test_dpo_at_reference_is_exactly_ln2():
    rows = [(-3.0, -9.0, -3.0, -9.0, 2.0, 6.0), (-0.5, -40.0, -0.5, -40.0, 1.0, 30.0)]
    assert preference_loss("dpo", make(rows)).loss.item() == LN2
    assert preference_loss("dpo", make(rows, dtype=torch.float32)).loss == torch.tensor(LN2, dtype=torch.float32)


@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust", "ipo", "hinge", "simpo"])
def test_degenerate_pairs_zero_gradient(name):
    # chosen == rejected: one sequence scored twice; its gradients through both sides must cancel (degenerate pairs: OpenRLHF #364)
    x = torch.tensor([-4.0, -12.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-5.0, -10.0], dtype=torch.float64)
    n = torch.tensor([3.0, 7.0], dtype=torch.float64)
    out = preference_loss(name, PairLogps(x, x, n, n, ref, ref), label_smoothing=0.1 if name != "dpo" else 0.0)
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    if name in ("dpo", "cdpo", "robust"):
        assert out.loss.item() == pytest.approx(LN2, abs=1e-15)


# ----------------------------------------------------------------------------------------------- numerics


def _loss_and_grads(name, rows, dtype):
    lp = make(rows, dtype=dtype, requires_grad=True)
    out = preference_loss(name, lp, beta=0.1)
    out.loss.backward()
    return out.loss.double(), lp.chosen_logps.grad.double(), lp.rejected_logps.grad.double()


NEAR_ZERO = [(-1e-3, -0.05, -2e-3, -0.04, 3.0, 2.0), (-0.25, -1e-4, -0.2, -3e-4, 5.0, 1.0)]
NEAR_1E4 = [(-9000.0, -10000.0, -9500.0, -9800.0, 900.0, 1000.0), (-10000.0, -100.0, -9990.0, -300.0, 1000.0, 50.0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [NEAR_ZERO, NEAR_1E4], ids=["near0", "near-1e4"])
@pytest.mark.parametrize("name", PAIRWISE)
def test_low_precision_and_extremes_match_float64(name, rows, dtype):
    # the float64 reference runs on the same values after rounding to `dtype`
    rounded = [tuple(torch.tensor(v, dtype=dtype).double().item() for v in row) for row in rows]
    loss, gc, gr = _loss_and_grads(name, rows, dtype)
    loss64, gc64, gr64 = _loss_and_grads(name, rounded, torch.float64)
    for got, want in ((loss, loss64), (gc, gc64), (gr, gr64)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("name", PAIRWISE)
def test_huge_margins_are_finite(name):
    # βh = ±1000: log(sigmoid(.)) would give -inf here, logsigmoid does not
    rows = [(-1e-4, -1e4, -1e4, -1e-4, 1.0, 1.0), (-1e4, -1e-4, -1e-4, -1e4, 1.0, 1.0)]
    lp = make(rows, dtype=torch.float32, requires_grad=True)
    out = preference_loss(name, lp, beta=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lp.chosen_logps.grad).all()
    assert torch.isfinite(lp.rejected_logps.grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("x", [-1e-7, -1e-4, -0.5, -0.7, -1.0, -30.0, -1e4])
def test_log1mexp_fp32_matches_math(x):
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    y = log1mexp(xt)
    y.backward()
    x32 = xt.item()  # the fp32-rounded input
    # relative precision at both ends: at x = -30 the answer is ~ -9e-14, which log(1 - e^x) in fp32 rounds to 0
    assert y.item() == pytest.approx(math.log(-math.expm1(x32)), rel=1e-3, abs=0)
    assert xt.grad.item() == pytest.approx(math.exp(x32) / math.expm1(x32), rel=1e-5)  # d/dx = e^x / (e^x - 1)


def test_orpo_average_logp_of_zero_is_finite():
    lp = make([(0.0, -1.0, 0.0, 0.0, 3.0, 3.0)], dtype=torch.float32, requires_grad=True)
    out = preference_loss("orpo", lp)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lp.chosen_logps.grad).all()


# ----------------------------------------------------------------------------------------------- registry, API


def test_registry_and_needs_reference():
    assert set(PAIRWISE) <= set(PREFERENCE_LOSSES)
    for name in PAIRWISE:
        assert needs_reference(name) == (name in WITH_REF)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="dpo.*ipo.*simpo"):
        preference_loss("dpoo", make())
    with pytest.raises(ValueError, match="orpo"):
        needs_reference("nope")


def test_register_twice_raises():
    with pytest.raises(ValueError, match="twice"):
        register("dpo", needs_reference=True)(lambda lp, hp: None)


def test_missing_reference_raises_and_reference_free_ignores_it():
    lp = make()
    lp.ref_chosen_logps = lp.ref_rejected_logps = None
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss("dpo", lp)
    assert torch.isfinite(preference_loss("simpo", lp).loss)
    assert torch.isfinite(preference_loss("orpo", lp).loss)


@pytest.mark.parametrize("name", PAIRWISE)
def test_metrics_are_detached_scalars(name):
    out = preference_loss(name, make(requires_grad=True))
    assert out.loss.requires_grad and out.loss.dim() == 0
    expected = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"}
    assert expected <= set(out.metrics)
    for v in out.metrics.values():
        assert not v.requires_grad and v.dim() == 0
