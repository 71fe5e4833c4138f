"""On-policy distillation's losses (algos/distill.py) in float64 against hand-computed values and loops."""

import math

import pytest
import torch

from posttrain.algos.distill import generalized_jsd, reverse_kl_advantages


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_reverse_kl_advantages_are_minus_the_log_ratio_on_the_mask():
    """A_t = -(log pi_S(y_t) - log pi_T(y_t)), 0 outside the mask, no gradient (GKD beta = 1, one-sample estimate)."""
    student = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = reverse_kl_advantages(student, teacher, mask)
    assert torch.allclose(adv, torch.tensor([[0.5, -1.0, 0.0]], dtype=torch.float64))
    assert not adv.requires_grad


def test_reverse_kl_estimate_is_unbiased_for_the_exact_kl():
    """E_{y ~ S}[log S(y) - log T(y)] = KL(S || T): minus the mean advantage over many samples approaches it."""
    gen = torch.Generator().manual_seed(0)
    s = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    y = torch.multinomial(s, 200_000, replacement=True, generator=gen)[None]
    adv = reverse_kl_advantages(s.log()[y], t.log()[y], torch.ones_like(y, dtype=torch.float64))
    assert abs(-adv.mean().item() - _kl(s.tolist(), t.tolist())) < 5e-3


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_its_definition(beta):
    """JSD(beta) = beta KL(T||M) + (1-beta) KL(S||M), M = beta T + (1-beta) S; beta 0 / 1: KL(T||S) / KL(S||T)."""
    gen = torch.Generator().manual_seed(1)
    s_logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    t_logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    out = generalized_jsd(s_logits, t_logits, beta)
    for b in range(2):
        for c in range(3):
            s = s_logits[b, c].softmax(-1).tolist()
            t = t_logits[b, c].softmax(-1).tolist()
            if beta == 0.0:
                want = _kl(t, s)
            elif beta == 1.0:
                want = _kl(s, t)
            else:
                m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
                want = beta * _kl(t, m) + (1 - beta) * _kl(s, m)
            assert abs(out[b, c].item() - want) < 1e-12


def test_generalized_jsd_is_zero_for_equal_distributions_and_grads_reach_the_student_only():
    logits = torch.randn(1, 2, 7, dtype=torch.float64)
    assert generalized_jsd(logits, logits.clone(), 0.5).abs().max() < 1e-12
    student = torch.randn(1, 2, 7, requires_grad=True)
    teacher = torch.randn(1, 2, 7, requires_grad=True)
    generalized_jsd(student, teacher, 0.5).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_generalized_jsd_gradient_is_the_forward_kl_gradient_at_beta_zero():
    """d KL(T||S)/d s_logits = softmax(s) - softmax(t) (the cross-entropy gradient against soft targets)."""
    student = torch.randn(1, 1, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 1, 6, dtype=torch.float64)
    generalized_jsd(student, teacher, 0.0).sum().backward()
    want = student.detach().softmax(-1) - teacher.softmax(-1)
    assert torch.allclose(student.grad, want, atol=1e-12)


def test_generalized_jsd_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), 1.5)
