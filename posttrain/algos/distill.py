"""On-policy distillation: the student samples, a frozen teacher scores the student's own tokens.

Two training signals, selected by name (`DISTILL_LOSSES`, `algo.loss` of `posttrain distill`):

- `reverse_kl`: the per-token reverse KL on the sampled tokens as a negative reward,
      A_t = -(log pi_S(y_t | y_<t) - log pi_T(y_t | y_<t)),   y ~ pi_S,
  with no sum over future tokens (discount 0), trained by a policy-gradient loss. Its expectation under the
  student's samples is -KL(pi_S || pi_T) per position (Agarwal et al. 2024, GKD, with beta = 1 estimated from
  one sample; Gu et al. 2024, MiniLLM). Needs one log-prob per token from each model: no vocabulary-wide tensor.
- `jsd`: GKD's generalised Jensen-Shannon divergence over the whole vocabulary at each sampled position
  (Agarwal et al. 2024, eq. 1 with the JSD(beta) of their section 3):
      JSD(beta)(T || S) = beta KL(T || M) + (1 - beta) KL(S || M),   M = beta T + (1 - beta) S,
  whose endpoints are taken as the KLs it interpolates (as TRL does): beta = 0 is the forward KL(T || S),
  beta = 1 the reverse KL(S || T). Differentiable in the student's logits; costs (B, C, V) logits per micro-batch.
"""

from __future__ import annotations

import math

import torch

from posttrain.registry import Registry

DISTILL_LOSSES = Registry("distillation loss")
DISTILL_LOSSES.add("reverse_kl", "per-token reverse KL on the sampled tokens as a negative reward")
DISTILL_LOSSES.add("jsd", "GKD generalised JSD(beta) over the vocabulary at each sampled position")


def reverse_kl_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages (B, C) = -(log pi_S - log pi_T) on the sampled tokens, 0 outside `mask`, detached.

    student_logp, teacher_logp, mask (B, C): log-probs of the sampled tokens under the (old) student and the
    teacher. Positive where the teacher likes a token more than the student does; the policy gradient then raises
    it. The mean over tokens is minus the k1 estimate of KL(pi_S || pi_T) per token."""
    return (-(student_logp - teacher_logp) * mask).detach()


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position JSD(beta) (B, C) between the teacher's and the student's next-token distributions.

    student_logits, teacher_logits (B, C, V), any float dtype (computed in at least fp32); beta in [0, 1] (0: KL(T||S),
    1: KL(S||T)); both distributions at `temperature`. Gradients flow into `student_logits` only."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits are scored in fp32
    log_s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last axis, from log-probabilities (p log p = 0 where p = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
