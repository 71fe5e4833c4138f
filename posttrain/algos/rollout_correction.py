"""Correcting for the gap between the sampling engine's probabilities and the trainer's (rollout-training
mismatch): the tokens were drawn from pi_sampler (vLLM, or the HF engine in another precision or layout), while
the loss assumes pi_old, the trainer's own probabilities before the update. The importance weight

    token:     rho_t = pi_old(y_t) / pi_sampler(y_t) = exp(old_logp_t - sampler_logp_t)
    sequence:  rho   = prod_t rho_t = exp(sum_t (old_logp_t - sampler_logp_t))

makes the gradient unbiased for pi_old (Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training", truncated importance sampling, eq. 3; TRL's `vllm_importance_sampling_mode`, verl's
`rollout_is` / `rollout_rs`), and is tamed by truncation (w = min(rho, cap)) or by masking the tokens or
sequences whose rho leaves [cap_low, cap] (w = 0 there, rho inside). Modes, `algo.rollout_correction`:
none | token_truncate | token_mask | sequence_truncate | sequence_mask.

Off-policy sequence masking (DeepSeek-V3.2, 2025, sec. 3.1): a sequence whose advantage is negative and whose
mean log-prob gap mean_t (sampler_logp - old_logp) exceeds delta is dropped (`off_policy_delta`, 0 = off) —
learning from one's own mistakes is useful only while they are still one's own.

The weights are constants (no gradient) and multiply each token's advantage, which for every policy loss here
(linear in A for a fixed ratio, and w >= 0) is the same as weighting its per-token loss; normalization counts are
unchanged, so a masked token lowers the loss instead of being renormalized away.
"""

from __future__ import annotations

import torch

from posttrain.algos.kl import LOG_RATIO_CLAMP
from posttrain.ops import masked_mean

MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str = "none",
                    cap: float = 2.0, cap_low: float = 0.0, advantages: torch.Tensor | None = None,
                    off_policy_delta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Importance weights (B, T) (constants, 1 where nothing applies) and their metrics.

    old_logp, sampler_logp, mask (B, T); advantages (B,) or (B, T), needed for off-policy sequence masking.
    Metrics: mismatch/abs_logp_diff_mean and _max, mismatch/k3 (KL(sampler || old) on the sampled tokens),
    mismatch/truncated_fraction, mismatch/masked_fraction (of tokens), mismatch/off_policy_masked (of sequences).
    """
    if mode not in MODES:
        raise ValueError(f"unknown rollout correction {mode!r}; choose one of {MODES}")
    with torch.no_grad():
        maskf = mask.to(old_logp.dtype)
        diff = ((old_logp - sampler_logp) * maskf).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log rho_t
        weights = torch.ones_like(old_logp)
        truncated = torch.zeros_like(mask, dtype=torch.bool)
        masked = torch.zeros_like(mask, dtype=torch.bool)
        if mode.startswith("token"):
            rho = diff.exp()
        elif mode.startswith("sequence"):
            rho = diff.sum(-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp().expand_as(diff)
        if mode.endswith("truncate"):
            truncated = rho > cap
            weights = rho.clamp(max=cap)
        elif mode.endswith("mask"):
            masked = (rho > cap) | (rho < cap_low)
            weights = torch.where(masked, 0.0, rho)
        dropped = torch.zeros(old_logp.shape[0], dtype=torch.bool, device=old_logp.device)
        if off_policy_delta > 0:
            if advantages is None:
                raise ValueError("off-policy sequence masking needs the advantages")
            adv = advantages if advantages.dim() == 1 else (advantages * maskf).sum(-1)
            gap = (-diff).sum(-1) / maskf.sum(-1).clamp(min=1)  # mean_t (sampler_logp - old_logp)
            dropped = (adv < 0) & (gap > off_policy_delta)
            weights = weights.masked_fill(dropped[:, None], 0.0)
        abs_diff = diff.abs()
        ratio = diff.exp()
        metrics = {
            "mismatch/abs_logp_diff_mean": masked_mean(abs_diff, maskf),
            "mismatch/abs_logp_diff_max": (abs_diff * maskf).amax(),
            "mismatch/k3": masked_mean(ratio - 1 - diff, maskf),
            "mismatch/truncated_fraction": masked_mean(truncated.to(maskf.dtype), maskf),
            "mismatch/masked_fraction": masked_mean(masked.to(maskf.dtype), maskf),
            "mismatch/off_policy_masked": dropped.to(maskf.dtype).mean(),
        }
    return weights * maskf, metrics
