"""Advantage estimators: group-relative ones for GRPO/RLOO (one scalar per completion) and GAE for PPO (per token).

Group estimators share one signature, `fn(rewards (N,), group (N,) long, eps) -> advantages (N,)`, and are looked
up by name in `ADVANTAGE_ESTIMATORS`. Groups are identified by their ids (any integers, in any order, not
necessarily contiguous); every reduction is a scatter/index_add, never a Python loop over groups.

A group whose rewards are all equal carries no learning signal. Its advantages are set to exactly 0 by an explicit
max == min test, because mean subtraction alone can leave residue (e.g. 0.35 repeated three times has a float mean
that differs from 0.35 in the last bit, and dividing that residue by std + eps blows it up).
"""

from __future__ import annotations

from typing import Callable

import torch

from posttrain.registry import Registry

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
register_advantage = ADVANTAGE_ESTIMATORS.register


def _group_stats(rewards: torch.Tensor, group: torch.Tensor):
    """rewards (N,), group (N,) -> (inverse (N,) compact ids in [0, G), count (G,), mean (G,), degenerate (G,) bool).

    Statistics are in float64 so that the per-group mean is as exact as the data allow.
    """
    inverse = torch.unique(group, return_inverse=True)[1]
    G = int(inverse.max()) + 1 if inverse.numel() else 0
    r = rewards.double()
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inverse, r)
    hi = torch.full((G,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inverse, r, "amax")
    lo = torch.full((G,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inverse, r, "amin")
    return inverse, count, total / count, hi == lo


def group_is_degenerate(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """rewards (N,), group (N,) -> bool (N,): True for rows whose group has all-equal rewards (incl. size-1 groups).

    Used for GRPO's `zero_variance_groups` metric and for DAPO's dynamic sampling (drop such groups, Yu et al. 2025 eq. 11).
    """
    inverse, _, _, degenerate = _group_stats(rewards, group)
    return degenerate[inverse]


def _finish(adv: torch.Tensor, inverse: torch.Tensor, degenerate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return adv.masked_fill(degenerate[inverse], 0.0).to(like.dtype)


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps), DeepSeekMath (Shao et al. 2024) eq. 3 with outcome supervision.

    std is the unbiased (Bessel-corrected, n - 1) sample std, as TRL's `rewards.view(-1, G).std(dim=1)`.
    rewards (N,), group (N,) -> (N,).
    """
    inverse, count, mean, degenerate = _group_stats(rewards, group)
    centered = rewards.double() - mean[inverse]
    sq = torch.zeros_like(mean).index_add_(0, inverse, centered**2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return _finish(centered / (std[inverse] + eps), inverse, degenerate, rewards)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean_g: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2)
    drops the std division, which over-weights near-degenerate groups. eps is unused. (N,), (N,) -> (N,).
    """
    inverse, _, mean, degenerate = _group_stats(rewards, group)
    return _finish(rewards.double() - mean[inverse], inverse, degenerate, rewards)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean_{j != i, j in g} r_j: the leave-one-out baseline of RLOO (Ahmadian et al. 2024,
    "Back to Basics", after Kool et al. 2019).

    A group of one has no other sample to compare with: its advantage is 0. eps is unused. (N,), (N,) -> (N,).
    """
    inverse, count, mean, degenerate = _group_stats(rewards, group)
    r, n = rewards.double(), count[inverse]
    baseline = (mean[inverse] * n - r) / (n - 1).clamp(min=1)
    return _finish(r - baseline, inverse, degenerate, rewards)


def _batch_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(unbiased=True) if x.numel() > 1 else x.new_zeros(())


@register_advantage("grpo_batch_std")
def grpo_batch_std_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_batch + eps): the group mean as baseline, the whole batch's reward std as scale
    (LitePPO, Liu et al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM Reasoning", sec. 4.1: more robust
    than the group std when rewards are sparse). (N,), (N,) -> (N,)."""
    inverse, _, mean, degenerate = _group_stats(rewards, group)
    return _finish((rewards.double() - mean[inverse]) / (_batch_std(rewards.double()) + eps), inverse, degenerate, rewards)


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, "REINFORCE++", eq. 6-7) for one outcome reward per completion: no critic and no
    group baseline; the returns are whitened over the global batch, A_i = (r_i - mean_batch) / (std_batch + eps).
    The per-token KL of the method belongs in the reward (`algo.kl.placement=reward`). Groups whose rewards are
    all equal are NOT zeroed here: without a group baseline their samples still carry the batch-relative signal.
    (N,), (N,) -> (N,)."""
    r = rewards.double()
    return ((r - r.mean()) / (_batch_std(r) + eps)).to(rewards.dtype)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, sec. 3.3): the group mean subtracted, then normalized by the std of
    those centered values over the global batch, A_i = (r_i - mean_g) / (std_batch(r - mean_g) + eps). The centered
    values already have batch mean 0, so a zero-variance group keeps advantage exactly 0. (N,), (N,) -> (N,)."""
    inverse, _, mean, degenerate = _group_stats(rewards, group)
    centered = rewards.double() - mean[inverse]
    return _finish(centered / (_batch_std(centered) + eps), inverse, degenerate, rewards)


@register_advantage("gpg")
def gpg_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GPG (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline", eq. 8-9): A_i = (r_i -
    mean_g) / F_norm, with no std division, and the gradient rescaled by alpha = N / (N - M), M the samples of
    zero-variance groups, so that those groups do not dilute the batch's gradient. alpha is folded into A here.
    eps is unused. (N,), (N,) -> (N,)."""
    inverse, _, mean, degenerate = _group_stats(rewards, group)
    rows_degenerate = degenerate[inverse]
    valid = int((~rows_degenerate).sum())
    alpha = rewards.numel() / valid if valid else 0.0
    return _finish((rewards.double() - mean[inverse]) * alpha, inverse, degenerate, rewards)


@register_advantage("opo")
def opo_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6,
                   lengths: torch.Tensor | None = None) -> torch.Tensor:
    """OPO (Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline", eq. 5-6): A_i = r_i - b_g with the
    length-weighted baseline b_g = sum_i l_i r_i / sum_i l_i over the group, l_i the completion's length (the
    baseline that minimises the gradient variance when each token's gradient norm is about equal). No std
    division. rewards (N,), group (N,), lengths (N,) tokens of each completion -> (N,). eps is unused."""
    if lengths is None:
        raise ValueError("the opo advantage needs each completion's length (lengths=...)")
    inverse, _, _, degenerate = _group_stats(rewards, group)
    G = degenerate.shape[0]
    l, r = lengths.double().clamp(min=1), rewards.double()
    weighted = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inverse, l * r)
    total = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inverse, l)
    return _finish(r - (weighted / total)[inverse], inverse, degenerate, rewards)


def per_reward_normalized_total(per_fn: torch.Tensor, weights: torch.Tensor, group: torch.Tensor,
                                eps: float = 1e-6) -> torch.Tensor:
    """GDPO's multi-reward total (Liu et al. 2026, "GDPO: Group reward-Decoupled normalization Policy
    Optimization", eq. 4): each reward function's values z-scored within each prompt's group, then weighted and
    summed, sum_k w_k (r_k - mean_g r_k) / (std_g r_k + eps), instead of z-scoring the weighted sum, where a
    reward with a large spread drowns the others and distinct reward combinations collapse to one advantage.
    A group in which reward k is constant contributes 0 for k. NaN (a masked sample) stays NaN in the total.

    per_fn (K, N), weights (K,), group (N,) -> (N,).
    """
    total = torch.zeros(per_fn.shape[1], dtype=torch.float64, device=per_fn.device)
    nan = torch.isnan(per_fn[weights != 0]).any(0)  # as in the plain sum: a weight-0 reward is logged only
    for values, weight in zip(per_fn, weights.tolist()):
        if weight == 0:
            continue
        normalized = torch.zeros_like(total)
        if (~nan).any():
            normalized[~nan] = grpo_advantages(values[~nan].double(), group[~nan], eps).double()
        total += weight * normalized
    return total.masked_fill(nan, float("nan")).to(per_fn.dtype)


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, estimator: str = "grpo", eps: float = 1e-6,
                     lengths: torch.Tensor | None = None):
    """Look up `estimator` in ADVANTAGE_ESTIMATORS and apply it: rewards (N,), group (N,) -> advantages (N,).
    `lengths` (N,), each completion's trained tokens, goes to the estimators that use it (opo)."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    extra = {"lengths": lengths} if estimator in LENGTH_AWARE else {}
    return ADVANTAGE_ESTIMATORS[estimator](rewards, group, eps, **extra)


LENGTH_AWARE = ("opo",)  # estimators whose baseline weighs each completion by its length


def token_level_rewards(
    kl_penalty: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, turn_rewards: torch.Tensor | None = None
) -> torch.Tensor:
    """PPO's per-token rewards (B, T): -kl_penalty on every masked token, plus the sequence score at the last
    masked token. turn_rewards (B, T), optional: a multi-turn trajectory's per-turn rewards already placed at each
    turn's last policy token and included in `scores`; they stay where they are (so GAE credits the turn that
    earned them) and only the rest of the score goes to the last token: the row's sum is unchanged."""
    m = mask.float()
    last = (m.cumsum(-1) == m.sum(-1, keepdim=True)) & mask.bool()  # the last loss token of each row
    out = -kl_penalty * m
    if turn_rewards is not None:
        placed = turn_rewards.to(out.dtype) * m
        scores = scores - placed.sum(-1)
        out = out + placed
    return out + last.to(out.dtype) * scores[:, None]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, Schulman et al. 2016 eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l},
    delta_t = r_t + gamma V_{t+1} - V_t.

    rewards, values, mask (B, T). The recursion runs over the masked tokens only, in order: a multi-turn trajectory's
    mask has gaps (the environment's tokens between the policy's turns), and the policy token before a gap
    bootstraps from the value of the next policy token, the environment's text being part of the transition.
    With a right-padded mask (1 up to each sequence's end) that is the usual GAE. The value after the last masked
    token is 0 (the episode ended); unmasked positions get advantage and return 0.
    Returns (advantages (B, T), returns (B, T)) with returns = advantages + values, the value-function target.
    """
    # masked tokens first, in their order (a stable sort), so the recursion below sees them contiguous
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
    adv, ret = _gae_contiguous(rewards.gather(1, order), values.gather(1, order), mask.gather(1, order), gamma, lam)
    return torch.zeros_like(adv).scatter(1, order, adv), torch.zeros_like(ret).scatter(1, order, ret)


def _gae_contiguous(rewards, values, mask, gamma: float, lam: float):
    m = mask.to(values.dtype)
    v, r = values * m, rewards * m
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    delta = r + gamma * next_v - v
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):  # T is a completion length: a short loop, each step vectorized over B
        running = (delta[:, t] + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + v) * m
