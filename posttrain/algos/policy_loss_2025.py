"""The policy losses the RL libraries adopted in 2025: sequence-level ratios (GSPO, GMPO), a clipped
stop-gradient weight on log pi (CISPO) and a soft gate instead of the clip (SAPO). Registered in
`policy_loss.POLICY_LOSSES` under `algo.policy_loss=gspo|gspo_token|cispo|sapo|gmpo`.

Same signature as every policy loss (`policy_loss.py`): logp, old_logp, mask (B, T) per token; advantages (B, T)
or (B,); r_t = exp(logp - old_logp). Sequence-level losses (gspo, gmpo) average over sequences,
sum_i loss_i / num_seqs (the sequence is their unit: `agg_mode` does not apply; num_seqs is the whole update's,
so gradient accumulation stays exact); token-level ones (gspo_token, cispo, sapo) aggregate with `agg_mode`.
Metrics as the clipped surrogate's where they mean the same: clip_ratio (tokens or sequences whose ratio was
clipped), approx_kl (k3 of KL(pi_old || pi)), ratio_mean.
"""

from __future__ import annotations

import torch

from posttrain.algos.kl import LOG_RATIO_CLAMP, kl_estimate
from posttrain.algos.policy_loss import POLICY_LOSSES
from posttrain.ops import agg_loss, masked_mean
from posttrain.types import LossOutput


def _per_token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).to(like.dtype).expand_as(like)


def _sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) advantages: as given, or the token mean of (B, T) ones."""
    if advantages.dim() == 1:
        return advantages
    return (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _seq_mean(per_seq: torch.Tensor, num_seqs) -> torch.Tensor:
    return per_seq.sum() / max(float(per_seq.shape[0] if num_seqs is None else num_seqs), 1.0)


def _metrics(logp, old_logp, mask, ratio, clipped) -> dict:
    with torch.no_grad():
        return {"clip_ratio": masked_mean(clipped.float(), mask),
                "approx_kl": masked_mean(kl_estimate(old_logp, logp, "k3"), mask),
                "ratio_mean": masked_mean(ratio.float(), mask)}


def _masked_mean_log_ratio(logp, old_logp, mask) -> torch.Tensor:
    """(B,) mean over each sequence's tokens of log r_t, the log of the geometric mean of its token ratios."""
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@POLICY_LOSSES.register("gspo")
def gspo_loss(logp, old_logp, advantages, mask, *, clip_low=3e-4, clip_high=4e-4, num_seqs=None, **_) -> LossOutput:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7): the sequence ratio
      s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp(mean_t log r_t)
    clipped per sequence, loss_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i), averaged over
    sequences. The paper's clip range is 3e-4 / 4e-4 (a sequence ratio moves much less than a token's)."""
    mask = mask.to(logp.dtype)
    adv = _sequence_advantages(advantages, mask).to(logp.dtype)
    seq_ratio = torch.exp(_masked_mean_log_ratio(logp, old_logp, mask))  # (B,)
    per_seq = torch.maximum(-adv * seq_ratio, -adv * seq_ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    clipped = ((adv > 0) & (seq_ratio > 1 + clip_high)) | ((adv < 0) & (seq_ratio < 1 - clip_low))
    return LossOutput(_seq_mean(per_seq, num_seqs),
                      _metrics(logp, old_logp, mask, seq_ratio[:, None].expand_as(logp), clipped[:, None].expand_as(logp)))


@POLICY_LOSSES.register("gspo_token")
def gspo_token_loss(logp, old_logp, advantages, mask, *, clip_low=3e-4, clip_high=4e-4, agg_mode="token-mean",
                    num_tokens=None, num_seqs=None, max_len=None, **_) -> LossOutput:
    """GSPO-token (Zheng et al. 2025, eq. 13-14): s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], whose value is the
    sequence ratio s_i and whose gradient is s_i grad log pi(y_t), so each token can carry its own advantage
    A_{i,t}; clipped per token like PPO. With one advantage per sequence and agg_mode=seq-mean-token-mean its
    gradient equals GSPO's (as verl implements `gspo`)."""
    mask_f = mask.to(logp.dtype)
    adv = _per_token_advantages(advantages, logp)
    log_seq = _masked_mean_log_ratio(logp, old_logp, mask_f).detach()[:, None]
    ratio = torch.exp(logp - logp.detach() + log_seq)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    clipped = ((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low))
    loss = agg_loss(per_token, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return LossOutput(loss, _metrics(logp, old_logp, mask, ratio, clipped))


@POLICY_LOSSES.register("cispo")
def cispo_loss(logp, old_logp, advantages, mask, *, clip_high=0.2, cispo_clip_low=None, agg_mode="token-mean",
               num_tokens=None, num_seqs=None, max_len=None, **_) -> LossOutput:
    """CISPO (MiniMax-M1, 2025, eq. 4-5): per token -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] A_t log pi(y_t).
    The importance weight is clipped and detached, never the gradient of log pi: every token keeps a gradient,
    also those PPO's clip would silence. As in the paper there is no lower bound unless `cispo_clip_low` is set;
    the upper one is the run's clip_high."""
    adv = _per_token_advantages(advantages, logp)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    low = 0.0 if cispo_clip_low is None else 1.0 - cispo_clip_low
    weight = ratio.clamp(low, 1.0 + clip_high).detach()
    per_token = -weight * adv * logp
    loss = agg_loss(per_token, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return LossOutput(loss, _metrics(logp, old_logp, mask, ratio, (ratio > 1 + clip_high) | (ratio < low)))


@POLICY_LOSSES.register("sapo")
def sapo_loss(logp, old_logp, advantages, mask, *, sapo_tau_pos=1.0, sapo_tau_neg=1.05, agg_mode="token-mean",
              num_tokens=None, num_seqs=None, max_len=None, **_) -> LossOutput:
    """SAPO (Wu et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347): the hard clip replaced by a
    soft gate, per token -g(r_t, tau) A_t with g(r, tau) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos where
    A > 0 and tau_neg where A < 0 (1.0 / 1.05, the paper's and TRL's defaults). At r = 1 the gate's slope is 1,
    so on-policy it is the plain policy gradient; far from 1 the gradient fades smoothly instead of vanishing."""
    adv = _per_token_advantages(advantages, logp)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    tau = torch.where(adv > 0, sapo_tau_pos, sapo_tau_neg).to(logp.dtype)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    per_token = -gate * adv
    loss = agg_loss(per_token, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    # "clipped" for SAPO: tokens whose gradient the gate cut by more than half
    with torch.no_grad():
        slope = 4 * torch.sigmoid(tau * (ratio - 1)) * (1 - torch.sigmoid(tau * (ratio - 1)))
    return LossOutput(loss, _metrics(logp, old_logp, mask, ratio, slope < 0.5))


@POLICY_LOSSES.register("gmpo")
def gmpo_loss(logp, old_logp, advantages, mask, *, clip_low=0.4, clip_high=0.4, num_seqs=None, **_) -> LossOutput:
    """GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization", eq. 4): the geometric mean of the token
    ratios, each clipped in log space to [-clip_low, clip_high] on the side the advantage's sign makes
    pessimistic, loss_i = -A_i exp(mean_t sgn(A_i) min(sgn(A_i) log r_t, sgn(A_i) clip(log r_t))), averaged
    over sequences. The clip range is in log-ratio space (the paper: (e^-0.4, e^0.4))."""
    mask = mask.to(logp.dtype)
    adv = _sequence_advantages(advantages, mask).to(logp.dtype)
    sign = torch.sign(adv)[:, None]
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-clip_low, clip_high))
    seq_ratio = torch.exp((pessimistic * mask).sum(-1) / mask.sum(-1).clamp(min=1))
    clipped = (log_ratio > clip_high) | (log_ratio < -clip_low)
    return LossOutput(_seq_mean(-adv * seq_ratio, num_seqs), _metrics(logp, old_logp, mask, torch.exp(log_ratio), clipped))
