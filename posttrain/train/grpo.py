"""GRPO and its fixes on the one loop: group-relative advantages, clipped surrogate, KL in the loss or reward.

Shao et al. 2024 (DeepSeekMath) eq. 3 with the known fixes as options: Dr. GRPO's mean-only advantage and
constant normalizer (Liu et al. 2025), DAPO's clip-higher, token-level loss, dynamic sampling and overlong
filtering (Yu et al. 2025), RLOO's leave-one-out baseline (Ahmadian et al. 2024).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from posttrain.algos.advantages import group_advantages, group_is_degenerate
from posttrain.algos.entropy_control import high_entropy_mask
from posttrain.algos.kl import kl_estimate
from posttrain.algos.policy_loss import actor_loss
from posttrain.config import RunConfig
from posttrain.online_config import CorrectionConfig, KLConfig, rename_kl_keys
from posttrain.train.loop import Iteration
from posttrain.train.registry import algorithm
from posttrain.train.online import OnlineBase, OnlineConfig, corrected_advantages, kl_metrics, valid_mean
from posttrain.types import RolloutBatch
from posttrain.types import LossOutput


@dataclass
class GRPOKLConfig(KLConfig):
    # loss: beta x the KL estimate added to the loss (DeepSeekMath eq. 3); reward: beta x each sequence's KL
    # estimate subtracted from its reward (then group-normalized with it)
    placement: str = "loss"


rename_kl_keys("grpo", {"beta": "beta", "kl_estimator": "estimator", "kl_in": "placement"})


@dataclass
class GRPOConfig(OnlineConfig):
    kl: GRPOKLConfig = field(default_factory=GRPOKLConfig)
    advantage: str = "grpo"  # grpo (z-score) | dr_grpo (mean only) | rloo | grpo_batch_std | reinforce_pp | reinforce_pp_baseline | gpg | opo
    policy_loss: str = "clip"  # clip | dual_clip | gspo | gspo_token | cispo | sapo | gmpo (algos.policy_loss*.py)
    dual_clip: float = 3.0  # dual_clip's c: a negative-advantage token's loss is capped at -c A (Ye et al. 2020)
    clip_low: float = 0.2  # ratio floor 1 - clip_low
    clip_high: float = 0.2  # ratio ceiling 1 + clip_high (DAPO clip-higher: 0.28; gspo: 3e-4 / 4e-4; gmpo: log-space 0.4)
    sapo_tau_pos: float = 1.0  # sapo's gate temperature where A > 0
    sapo_tau_neg: float = 1.05  # and where A < 0
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)  # sampler/trainer mismatch
    # < 1: policy gradient only on this fraction of each micro-batch's tokens with the highest entropy
    # (the "80/20" paper: 0.2; algos/entropy_control.py); 1 = every token
    entropy_top_q: float = 1.0
    num_iterations: int = 1  # mu: passes over each rollout (old log-probs stored when > 1)
    minibatch_rows: int = 0  # rows per optimizer update; 0 = the whole rollout
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and sample more prompts
    skip_inert_rows: bool = True  # rows with advantage 0 and no KL term in the loss get no forward pass (same gradient)
    max_sampling_rounds: int = 3


@algorithm("grpo", config=GRPOConfig, help="GRPO / Dr. GRPO / RLOO / DAPO with verifiable rewards")
class GRPO(OnlineBase):
    def __init__(self, cfg: RunConfig):
        a = cfg.algo
        if a.kl.beta > 0 and a.kl.placement == "loss" and a.kl.estimator == "k1":
            raise ValueError("algo.kl.estimator=k1 with algo.kl.placement=loss adds no KL pressure: the expected gradient "
                             "of k1 under samples from the policy is 0. Use k3 (the forward KL's gradient), k2 (the "
                             "reverse KL's) or algo.kl.placement=reward")
        if a.kl.placement not in ("loss", "reward"):
            raise ValueError(f"algo.kl.placement must be loss or reward, got {a.kl.placement!r}")
        super().__init__(cfg, needs_reference=a.kl.beta > 0)
        self.updates_per_step = self.planned_updates(a.num_iterations, a.minibatch_rows)

    def _collect(self, step: int) -> tuple[RolloutBatch, dict]:
        """A rollout; with dynamic sampling, groups with equal rewards are replaced by fresh prompts' groups."""
        a = self.algo_cfg
        batch = self.sample(step)
        metrics = dict(batch.extra["metrics"])
        degenerate = group_is_degenerate(batch.rewards, batch.group)
        metrics["zero_variance_groups"] = float(degenerate.float().mean())  # of this process's rows (= its groups)
        if a.dynamic_sampling:
            batch, rounds = self._refill(batch, step, degenerate)
            metrics["dynamic_sampling/rounds"] = float(rounds)
        return batch, metrics

    def _refill(self, batch: RolloutBatch, step: int, degenerate: torch.Tensor):
        from posttrain.data.collate import concat_batches, select_rows

        kept = select_rows(batch, ~degenerate)
        rounds = 0
        while kept.num_rows < batch.num_rows and rounds < self.algo_cfg.max_sampling_rounds:
            rounds += 1
            more = self.sample(step, round_=rounds)
            kept = concat_batches([kept, select_rows(more, ~group_is_degenerate(more.rewards, more.group))])
        if kept.num_rows == 0:
            return batch, rounds  # nothing informative: train on the original (its advantages are all 0)
        return select_rows(kept, torch.arange(kept.num_rows, device=kept.group.device) < batch.num_rows), rounds

    def next_iteration(self, step: int) -> Iteration:
        a = self.algo_cfg
        batch, metrics = self._collect(step)
        passes_start = time.perf_counter()  # the log-prob passes before the updates: old policy, reference
        need_old = a.num_iterations > 1 or (a.minibatch_rows and a.minibatch_rows < batch.num_rows)
        if need_old:
            batch.extra["old_logp"] = self.policy_logps(batch)
        rewards = batch.rewards
        if self.reference is not None:
            ref = self.reference_logps(batch)
            batch.extra["ref_logp"] = ref
            policy = batch.extra.get("old_logp")
            if policy is None:
                policy = self.policy_logps(batch)
            metrics.update(kl_metrics(policy, ref, batch.loss_mask))
            if a.kl.placement == "reward":
                seq_kl = (kl_estimate(policy, ref, a.kl.estimator or "k1") * batch.loss_mask).sum(-1)
                rewards = rewards - a.kl.beta * seq_kl
        metrics["timing/logprob_passes_s"] = time.perf_counter() - passes_start
        batch.extra["advantages"] = masked_group_advantages(rewards, batch.group, batch.extra["reward_valid"], a.advantage,
                                                            batch.loss_mask.sum(-1))
        self.batch = batch
        inert = self._inert_rows(batch)
        metrics["forward_token_fraction"] = self._forward_token_fraction(batch, inert)
        metrics.update(models_in_memory=float(self.models_in_memory), reward=valid_mean(batch), reward_std=float(batch.rewards[batch.extra["reward_valid"]].std()) if batch.num_rows > 1 else 0.0)
        return Iteration(self.updates(batch.num_rows, a.minibatch_rows, a.num_iterations, step, inert), metrics)

    def _inert_rows(self, batch: RolloutBatch) -> torch.Tensor | None:
        """Rows whose clipped-surrogate term is 0 whatever the ratio (advantage 0) when nothing else is in the loss."""
        kl_in_loss = self.reference is not None and self.algo_cfg.kl.placement == "loss"
        if not self.algo_cfg.skip_inert_rows or kl_in_loss:
            return None
        return batch.extra["advantages"] == 0

    def loss(self, rows, totals) -> LossOutput:
        a, b = self.algo_cfg, self.batch
        logp, entropy = self.current_logps(rows)
        mask = b.loss_mask[rows]
        old = b.extra["old_logp"][rows] if "old_logp" in b.extra else logp.detach()
        kl_in_loss = self.reference is not None and a.kl.placement == "loss"
        advantages, mismatch = corrected_advantages(a.correction, b, rows, old, mask, b.extra["advantages"][rows])
        if a.entropy_top_q < 1.0:
            chosen = high_entropy_mask(entropy, mask, a.entropy_top_q)
            advantages = (advantages[:, None] if advantages.dim() == 1 else advantages) * chosen
            mismatch["entropy/pg_token_fraction"] = chosen.sum() / mask.sum().clamp(min=1)
        out = actor_loss(a.policy_loss, logp, old, advantages, mask, entropy,
                          ref_logp=b.extra["ref_logp"][rows] if kl_in_loss else None, kl_coef=a.kl.beta,
                          kl_estimator=a.kl.estimator or "k3", clip_low=a.clip_low, clip_high=a.clip_high,
                          agg_mode=a.loss_agg, dual_clip=a.dual_clip, sapo_tau_pos=a.sapo_tau_pos,
                          sapo_tau_neg=a.sapo_tau_neg, num_tokens=totals["num_tokens"],
                          num_seqs=totals["num_seqs"], max_len=a.sampling.max_new_tokens)
        return LossOutput(out.loss, {**out.metrics, **mismatch})


def masked_group_advantages(rewards, group, valid, estimator: str, lengths=None) -> torch.Tensor:
    """Group advantages over the valid rows only (masked rows: 0), so a masked sample changes no statistic.
    lengths (N,): each row's trained tokens (for length-aware estimators: opo)."""
    adv = torch.zeros_like(rewards)
    if valid.any():
        adv[valid] = group_advantages(rewards[valid], group[valid], estimator,
                                      lengths=None if lengths is None else lengths[valid])
    return adv



