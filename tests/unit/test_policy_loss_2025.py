"""GSPO, GSPO-token, CISPO, SAPO and GMPO in float64 against per-sequence / per-token loops written from each
paper's equation, values and gradients; plus the properties that set them apart (CISPO keeps the gradient of
clipped tokens, SAPO's slope is 1 on-policy, GSPO-token's gradient equals GSPO's for sequence advantages)."""

import math

import pytest
import torch

from posttrain.algos.policy_loss import POLICY_LOSSES, actor_loss



@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.3).requires_grad_(True)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0])
    return logp, old, adv, mask


def grad_of(loss, logp):
    (g,) = torch.autograd.grad(loss, logp)
    return g


def test_gspo_equals_its_equation_per_sequence():
    """Zheng et al. 2025 eq. 5-7: s_i = exp(mean_t log r), loss = mean_i -min(s_i A_i, clip(s_i) A_i)."""
    logp, old, adv, mask = batch()
    eps_l, eps_h = 0.05, 0.08
    out = POLICY_LOSSES.lookup("gspo")(logp, old, adv, mask, clip_low=eps_l, clip_high=eps_h)
    expected = 0.0
    for i in range(4):
        n = int(mask[i].sum())
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n)) / n)
        expected = expected + (-torch.minimum(s * adv[i], s.clamp(1 - eps_l, 1 + eps_h) * adv[i])) / 4
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(grad_of(out.loss, logp), grad_of(expected, logp))


def test_gspo_token_value_is_the_sequence_ratio_and_gradient_matches_gspo():
    """eq. 13-14: with one advantage per sequence and seq-mean-token-mean, GSPO-token's gradient is GSPO's."""
    logp, old, adv, mask = batch(1)
    kw = dict(clip_low=10.0, clip_high=10.0)  # no clipping: compare the unclipped objectives
    seq = POLICY_LOSSES.lookup("gspo")(logp, old, adv, mask, **kw)
    tok = POLICY_LOSSES.lookup("gspo_token")(logp, old, adv, mask, agg_mode="seq-mean-token-mean", **kw)
    torch.testing.assert_close(tok.loss, seq.loss)
    torch.testing.assert_close(grad_of(tok.loss, logp), grad_of(seq.loss, logp))
    # a token-level advantage: each token's gradient is -A_t s_i / (n_i B) (times the token's own d log pi)
    adv_t = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    tok = POLICY_LOSSES.lookup("gspo_token")(logp, old, adv_t, mask, agg_mode="seq-mean-token-mean", **kw)
    n = mask.sum(-1, keepdim=True)
    s = torch.exp(((logp - old) * mask).sum(-1, keepdim=True) / n).detach()
    torch.testing.assert_close(grad_of(tok.loss, logp), -adv_t * s * mask / (n * 4))


def test_cispo_detached_clipped_weight_times_log_pi():
    """MiniMax-M1 eq. 4: per token -sg(clip(r, 0, 1 + eps_high)) A log pi; gradient -w A on every token."""
    logp, old, adv, mask = batch(3)
    with torch.no_grad():
        logp[0, 0] = old[0, 0] + 1.0  # r = e: clipped to 1.2, yet the token keeps its gradient
    out = POLICY_LOSSES.lookup("cispo")(logp, old, adv, mask, clip_high=0.2)
    w = torch.exp(logp - old).clamp(max=1.2).detach()
    expected = (-(w * adv[:, None] * logp) * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss, expected)
    g = grad_of(out.loss, logp)
    torch.testing.assert_close(g, -(w * adv[:, None]) * mask / mask.sum())
    assert g[0, 0] == pytest.approx(-1.2 * 1.5 / float(mask.sum()))  # PPO's clip would give 0 here (A > 0, r > 1.2)
    clip = POLICY_LOSSES.lookup("clip")(logp, old, adv, mask)
    assert grad_of(clip.loss, logp)[0, 0] == 0


def test_sapo_soft_gate_values_and_unit_slope_on_policy():
    """Wu et al. 2025: g(r, tau) = sigmoid(tau (r - 1)) 4 / tau, tau by the advantage's sign; dg/dr = 1 at r = 1."""
    logp, old, adv, mask = batch(4)
    out = POLICY_LOSSES.lookup("sapo")(logp, old, adv, mask, sapo_tau_pos=1.0, sapo_tau_neg=1.05)
    expected, count = 0.0, 0
    for i in range(4):
        tau = 1.0 if adv[i] > 0 else 1.05
        for t in range(6):
            if mask[i, t]:
                r = torch.exp(logp[i, t] - old[i, t])
                expected = expected - torch.sigmoid(tau * (r - 1)) * 4 / tau * adv[i]
                count += 1
    torch.testing.assert_close(out.loss, expected / count)
    torch.testing.assert_close(grad_of(out.loss, logp), grad_of(expected / count, logp))
    # on-policy (r = 1) the gradient is exactly the vanilla policy gradient -A / N
    on = old.clone().requires_grad_(True)
    g = grad_of(POLICY_LOSSES.lookup("sapo")(on, old, adv, mask).loss, on)
    torch.testing.assert_close(g, -adv[:, None].expand(4, 6) * mask / mask.sum())


def test_gmpo_geometric_mean_with_sign_aware_log_clip():
    """Zhao et al. 2025 eq. 4: loss_i = -A_i exp(mean_t sgn(A) min(sgn(A) log r_t, sgn(A) clip(log r_t, -e, e)))."""
    logp, old, adv, mask = batch(5)
    with torch.no_grad():
        logp[0, 1] = old[0, 1] + 0.9  # beyond e = 0.4 with A > 0: clipped
        logp[1, 0] = old[1, 0] - 0.9  # below -e with A < 0: clipped
    e = 0.4
    out = POLICY_LOSSES.lookup("gmpo")(logp, old, adv, mask, clip_low=e, clip_high=e)
    expected = 0.0
    for i in range(4):
        sgn = math.copysign(1.0, float(adv[i]))
        terms = [sgn * torch.minimum(sgn * (logp[i, t] - old[i, t]), sgn * (logp[i, t] - old[i, t]).clamp(-e, e))
                 for t in range(6) if mask[i, t]]
        expected = expected - adv[i] * torch.exp(sum(terms) / len(terms)) / 4
    torch.testing.assert_close(out.loss, expected)
    g = grad_of(out.loss, logp)
    torch.testing.assert_close(g, grad_of(expected, logp))
    assert g[0, 1] == 0 and g[1, 0] == 0  # the clipped tokens


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "cispo", "sapo", "gmpo"])
def test_each_loss_through_actor_loss_on_policy_is_the_policy_gradient_direction(name):
    """At pi = pi_old every loss's gradient points along -A grad log pi (same sign per token) and equal
    advantages of 0 give zero gradient: the common ground of all of them."""
    _, old, adv, mask = batch(6)
    on = old.clone().requires_grad_(True)
    out = actor_loss(name, on, old, adv, mask, clip_low=0.2, clip_high=0.2)
    g = grad_of(out.loss, on)
    sign = torch.sign(-adv)[:, None].expand(4, 6)
    assert torch.all((torch.sign(g) == sign) | (mask == 0))
    assert {"policy_loss", "clip_ratio", "approx_kl", "ratio_mean"} <= set(out.metrics)
    zero = actor_loss(name, on, old, torch.zeros(4), mask)
    assert torch.all(grad_of(zero.loss, on) == 0)
