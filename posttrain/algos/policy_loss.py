"""Policy-gradient losses of PPO and GRPO: the policy-loss registry (clipped surrogate, dual-clip), the clipped
value loss, the KL penalty term, and `actor_loss` — policy gradient + KL term + entropy bonus — that both share.

All take per-token tensors (B, T) with a mask (B, T) and aggregate with `posttrain.ops.agg_loss`, whose
num_tokens / num_seqs / max_len are passed through so gradient accumulation can normalize by the whole batch.
Metrics are detached 0-d tensors (no host sync here); the trainer decides when to read them.

A policy loss is `fn(logp, old_logp, advantages, mask, *, clip_low, clip_high, agg_mode, num_tokens, num_seqs,
max_len, **options) -> LossOutput`, registered by name (`@POLICY_LOSSES.register("name")`) and chosen by
`algo.policy_loss`; adding one is one decorated function and its test.
"""

from __future__ import annotations

import torch

from posttrain.algos.kl import LOG_RATIO_CLAMP, kl_estimate
from posttrain.ops import agg_loss, masked_mean
from posttrain.registry import Registry
from posttrain.types import LossOutput

POLICY_LOSSES = Registry("policy loss")


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg_mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
    dual_clip: float | None = None,
) -> LossOutput:
    """PPO's clipped objective (Schulman et al. 2017, eq. 7) as a loss to minimize, per token:
      -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A),  rho = exp(logp - old_logp).
    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025, eq. 10). dual_clip = c > 1 also caps the loss of
    negative-advantage tokens at -c A (dual-clip PPO, Ye et al. 2020, eq. 5), so a huge rho cannot dominate.

    logp, old_logp, mask (B, T); advantages (B, T), or (B,) for one value per sequence (GRPO).
    Metrics: clip_ratio/high (A > 0 and rho > 1 + clip_high), clip_ratio/low (A < 0 and rho < 1 - clip_low) — the
    masked fraction of tokens whose gradient the clip zeroes — and clip_ratio their sum; clip_ratio/dual;
    approx_kl = mean k3 estimate of KL(pi_old || pi) on the sampled tokens, (rho - 1) - log rho.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype)
    # log rho is clamped so that exp stays finite in low precision; tokens this far off get no gradient anyway
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        capped = torch.minimum(per_token, -advantages * dual_clip)
        per_token = torch.where(advantages < 0, capped, per_token)
    loss = agg_loss(per_token, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)

    with torch.no_grad():
        high = (advantages > 0) & (ratio > 1.0 + clip_high)
        low = (advantages < 0) & (ratio < 1.0 - clip_low)
        dual = (advantages < 0) & (ratio > dual_clip) if dual_clip is not None else torch.zeros_like(high)
        metrics = {
            "clip_ratio/high": masked_mean(high.float(), mask),
            "clip_ratio/low": masked_mean(low.float(), mask),
            "clip_ratio": masked_mean((high | low).float(), mask),
            "clip_ratio/dual": masked_mean(dual.float(), mask),
            "approx_kl": masked_mean(kl_estimate(old_logp, logp, "k3"), mask),
            "ratio_mean": masked_mean(ratio.float(), mask),
        }
    return LossOutput(loss, metrics)


@POLICY_LOSSES.register("clip")
def clip_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, agg_mode="token-mean",
                     num_tokens=None, num_seqs=None, max_len=None, **_) -> LossOutput:
    """PPO's clipped surrogate (with DAPO's clip-higher when clip_high > clip_low): `clipped_surrogate`."""
    return clipped_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high, agg_mode, num_tokens, num_seqs, max_len)


@POLICY_LOSSES.register("dual_clip")
def dual_clip_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, agg_mode="token-mean",
                          num_tokens=None, num_seqs=None, max_len=None, dual_clip=3.0, **_) -> LossOutput:
    """Dual-clip PPO (Ye et al. 2020, eq. 5): the clipped surrogate with negative-advantage tokens' loss capped at
    -c A (c = `dual_clip` > 1; the paper uses 3), so one token with a huge ratio cannot dominate the update."""
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    return clipped_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high, agg_mode, num_tokens, num_seqs,
                             max_len, dual_clip=dual_clip)


def actor_loss(
    name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    **options,
) -> LossOutput:
    """The actor's loss of GRPO and PPO: policy loss `name` + kl_coef * KL term (when `ref_logp` is given: the KL
    in the loss, DeepSeekMath eq. 3) − entropy_coef * entropy bonus, all aggregated alike (`options` carries
    clip_low/clip_high/agg_mode/num_tokens/num_seqs/max_len and the loss's own options).

    logp, old_logp, mask, entropy, ref_logp (B, T); advantages (B, T) or (B,). Metrics: the policy loss's, plus
    policy_loss, kl_loss (with a KL term) and entropy (masked token mean, when `entropy` is given).
    """
    out = POLICY_LOSSES.lookup(name)(logp, old_logp, advantages, mask, **options)
    loss, metrics = out.loss, {**out.metrics, "policy_loss": out.loss.detach()}
    counts = {k: options.get(k) for k in ("num_tokens", "num_seqs", "max_len")}
    agg_mode = options.get("agg_mode", "token-mean")
    if ref_logp is not None:
        kl = kl_penalty_loss(logp, ref_logp, mask, kl_estimator, agg_mode, **counts)
        loss = loss + kl_coef * kl.loss
        metrics["kl_loss"] = kl.loss.detach()
    if entropy is not None:
        if entropy_coef:
            loss = loss - entropy_coef * agg_loss(entropy, mask, agg_mode, **counts)
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return LossOutput(loss, metrics)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg_mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> LossOutput:
    """PPO2's clipped value loss (baselines ppo2; Schulman et al. 2017 sec. 5 uses the unclipped one), per token:
      0.5 max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2).
    values, old_values, returns, mask (B, T). Metrics: vf_clipfrac (fraction of tokens where the clipped term wins,
    i.e. whose gradient is zeroed), value_mean.
    """
    values_clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped, clipped)
    loss = agg_loss(per_token, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "value_mean": masked_mean(values.float(), mask),
        }
    return LossOutput(loss, metrics)


def kl_penalty_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    agg_mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> LossOutput:
    """The KL term of the GRPO loss (DeepSeekMath eq. 3-4), unscaled: agg(kl_estimate(logp, ref_logp, kind)).

    The caller adds beta * loss. logp, ref_logp, mask (B, T); ref_logp is treated as a constant. Metric: kl
    (token mean of the estimate, whatever agg_mode).
    """
    per_token = kl_estimate(logp, ref_logp.detach(), kind)
    loss = agg_loss(per_token, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return LossOutput(loss, {"kl": masked_mean(per_token.detach(), mask)})


# the 2025 losses (gspo, gspo_token, cispo, sapo, gmpo) register themselves on import
from posttrain.algos import policy_loss_2025  # noqa: E402,F401
