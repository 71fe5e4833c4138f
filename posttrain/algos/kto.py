"""KTO (Ethayarajh et al. 2024): a loss on unpaired desirable / undesirable completions, pure torch.

The reference point z_ref is a batch estimate of KL(π‖π_ref), computed on *mismatched* (prompt, completion) pairs:
row i's prompt with row j's completion, j ≠ i. `mismatched_indices` picks j for every row.
"""

from __future__ import annotations

from typing import Optional

import torch

from posttrain.types import LossOutput

Tensor = torch.Tensor


def mismatched_indices(batch_size: int, generator: Optional[torch.Generator] = None) -> torch.LongTensor:
    """For each row i, the row j whose completion is paired with prompt i for the KL estimate. (B,) int64.

    A roll by a random shift s in [1, B-1]: (i + s) mod B is a derangement for every B ≥ 2, odd or even (reversing
    the batch, as TRL once did, maps the middle row of an odd batch onto itself). At B == 1 there is no other row,
    so the single row is paired with itself: z_ref then estimates KL on matched pairs, which is biased upwards,
    but finite; use batches of 2 or more for KTO.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = generator.device if generator is not None else torch.device("cpu")  # index tensors built on the host
    if batch_size == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    shift = torch.randint(1, batch_size, (1,), generator=generator, device=device)
    return (torch.arange(batch_size, device=device) + shift) % batch_size


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO loss, Ethayarajh et al. 2024 eq. 8, averaged over all B rows (as TRL does).

    policy_logps, ref_logps (B,): summed completion log-probs under the policy and the reference.
    desirable (B,) bool: the label of each completion.
    kl_policy_logps, kl_ref_logps (B,): the same sums on mismatched pairs (see `mismatched_indices`).

    r = log π - log π_ref;  z_ref = max(0, mean(kl_policy_logps - kl_ref_logps)), detached (the paper does not
    backpropagate through it);  loss = w_d·(1 - σ(β(r - z_ref))) on desirable rows, w_u·(1 - σ(β(z_ref - r))) on
    undesirable ones. 1 - σ(x) is computed as σ(-x), which keeps its precision when σ(x) ≈ 1.
    Metrics (detached): `kl` (z_ref), `rewards/chosen` / `rewards/rejected` (mean βr over desirable / undesirable
    rows; absent when there are none), `rewards/margins` (their difference, only when both are present).
    """
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    policy_logps, ref_logps = policy_logps.to(dtype), ref_logps.to(dtype)
    z_ref = (kl_policy_logps.to(dtype) - kl_ref_logps.to(dtype)).mean().clamp(min=0).detach()
    desirable = desirable.to(torch.bool)

    logratios = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (logratios - z_ref)),
        undesirable_weight * torch.sigmoid(-beta * (z_ref - logratios)),
    )
    rewards = (beta * logratios).detach()
    metrics = {"kto/z_ref": z_ref}  # the reference point: a batch estimate of KL(π‖π_ref), not a per-token KL
    if desirable.any():
        metrics["rewards/chosen"] = rewards[desirable].mean()
    if (~desirable).any():
        metrics["rewards/rejected"] = rewards[~desirable].mean()
    if len(metrics) == 3:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return LossOutput(losses.mean(), metrics)
