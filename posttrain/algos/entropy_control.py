"""Entropy-based controls of the policy gradient.

`high_entropy_mask`: the policy gradient only on the top-q fraction of tokens by entropy (Wang et al. 2025,
"Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for LLM Reasoning", eq. 6: the
indicator 1[H_t >= tau_q], tau_q the (1 - q) quantile of the batch's token entropies; q = 0.2 in the paper).
The other tokens still count in the loss's normalization (their term is 0), as in the paper's objective.

`AdaptiveEntropyCoef`: an entropy-bonus coefficient that rises while the policy's entropy is below a target and
falls while it is above (a proportional controller in log space, like SAC's temperature; Haarnoja et al. 2018,
eq. 18, applied to the token entropy), clipped to [0, max_coef].
"""

from __future__ import annotations

import math

import torch


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_q: float) -> torch.Tensor:
    """(B, T) bool: the masked tokens whose entropy is at least the (1 - top_q) quantile of the masked tokens'
    entropies (ties at the threshold kept). top_q in (0, 1]; 1 keeps every masked token."""
    if not 0.0 < top_q <= 1.0:
        raise ValueError(f"top_q must be in (0, 1], got {top_q}")
    real = mask.bool()
    if top_q == 1.0 or not real.any():
        return real
    values = entropy.detach()[real].float()
    k = max(1, math.ceil(top_q * values.numel()))
    threshold = values.topk(k).values[-1]
    return real & (entropy.detach() >= threshold)


class AdaptiveEntropyCoef:
    """coef <- clip(coef * exp(lr * (target - entropy)), 0, max_coef) after each step (entropy in nats/token)."""

    def __init__(self, initial: float, target: float, lr: float = 0.1, max_coef: float = 0.1):
        self.value, self.target, self.lr, self.max_coef = float(initial), float(target), float(lr), float(max_coef)

    def update(self, entropy: float) -> float:
        self.value = min(self.max_coef, max(0.0, self.value * math.exp(self.lr * (self.target - entropy))))
        return self.value
