"""Online (iterative) DPO: sample k completions per prompt with the current policy, score them, train the DPO
family's loss on best-versus-worst pairs, repeat (Xiong et al. 2024; Guo et al. 2024, "Direct Language Model
Alignment from Online AI Feedback"). The loss is any registered preference loss (`loss_type`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.algos.preference import PairLogps, PreferenceLossConfig, configured_preference_loss, needs_reference
from posttrain.config import RunConfig
from posttrain.online_config import SamplingConfig
from posttrain.train import common
from posttrain.train.loop import Iteration
from posttrain.train.registry import algorithm
from posttrain.train.online import OnlineBase, OnlineConfig, valid_mean
from posttrain.types import LossOutput


@dataclass
class OnlineDPOConfig(OnlineConfig, PreferenceLossConfig):
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_generations=4))  # k per prompt
    epochs: int = 1  # passes over each round's pairs


def best_worst_pairs(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (chosen, rejected) of each group's highest and lowest reward; groups with one value skipped.

    Ties resolve to the first row, so the choice is deterministic.
    """
    chosen, rejected = [], []
    for g in torch.unique(group).tolist():
        rows = ((group == g) & ~torch.isnan(rewards)).nonzero().squeeze(-1)  # masked (NaN) samples never pair
        if len(rows) < 2:
            continue
        r = rewards[rows]
        if float(r.max()) == float(r.min()):
            continue
        chosen.append(int(rows[int(r.argmax())]))
        rejected.append(int(rows[int(r.argmin())]))
    return (torch.tensor(chosen, dtype=torch.long, device=group.device),
            torch.tensor(rejected, dtype=torch.long, device=group.device))


@algorithm("online-dpo", config=OnlineDPOConfig, help="iterative DPO on best-vs-worst sampled pairs")
class OnlineDPO(OnlineBase):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg, needs_reference=needs_reference(cfg.algo.loss_type))
        self.updates_per_step = cfg.algo.epochs

    @property
    def logp_temperature(self) -> float:
        return 1.0  # DPO's implicit reward is defined on the policy itself, not a tempered copy

    def next_iteration(self, step: int) -> Iteration:
        a = self.algo_cfg
        batch = self.sample(step)
        valid = batch.extra["reward_valid"]
        rewards = torch.where(valid, batch.rewards, torch.full_like(batch.rewards, float("nan")))
        chosen, rejected = best_worst_pairs(rewards, batch.group)
        metrics = dict(batch.extra["metrics"], pairs=float(len(chosen)), reward=valid_mean(batch),
                       models_in_memory=float(self.models_in_memory),
                       forward_token_fraction=self._forward_token_fraction(batch))
        self.batch = batch
        if len(chosen) == 0:
            return Iteration([], metrics)  # every group tied: nothing to learn from this round
        batch.extra.update(chosen=chosen, rejected=rejected)
        if self.reference is not None:
            batch.extra["ref_logp"] = self.reference_logps(batch)
        micro, cost = self.cfg.train.batch_size, self._pair_cost(batch)
        updates = []
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 31 + step)
        for _ in range(a.epochs):
            perm = torch.randperm(len(chosen), generator=gen, device="cpu").tolist()
            groups = common.token_budget_groups([perm[s : s + micro] for s in range(0, len(perm), micro)], cost, self.cfg)
            updates.append([torch.tensor(g, dtype=torch.long, device="cpu") for g in groups])
        return Iteration(updates, metrics)

    def _pair_cost(self, batch):
        """A pair's cost in a forward pass (what a token budget counts): its packed row [prompt | chosen | rejected]
        under prompt sharing (both sides are one group's), else two padded rows."""
        chosen, rejected = batch.extra["chosen"].tolist(), batch.extra["rejected"].tolist()
        if not self.budget_shares_prompt:
            return lambda p: 2 * batch.input_ids.shape[1]
        prompt, tokens = batch.attention_mask[:, : batch.prompt_width].sum(-1).tolist(), batch.completion_mask.sum(-1).tolist()
        return lambda p: prompt[chosen[p]] + tokens[chosen[p]] + tokens[rejected[p]]

    def totals(self, update) -> dict:
        b = self.batch
        rows = [torch.cat([b.extra["chosen"][p], b.extra["rejected"][p]]) for p in update]
        return {"num_pairs": sum(len(p) for p in update), "tokens": sum(int(b.attention_mask[r].sum()) for r in rows)}

    def loss(self, pairs, totals) -> LossOutput:
        a, b = self.algo_cfg, self.batch
        chosen, rejected = b.extra["chosen"][pairs], b.extra["rejected"][pairs]
        rows = torch.cat([chosen, rejected])  # one forward pass for both sides
        logp, _ = self.current_logps(rows, with_entropy=False)
        mask = b.loss_mask[rows].float()
        sums, lengths = (logp * mask).sum(-1), mask.sum(-1)
        n = len(pairs)
        ref = None
        if "ref_logp" in b.extra:
            ref = (b.extra["ref_logp"][rows] * mask).sum(-1)
        logps = PairLogps(
            chosen_logps=sums[:n], rejected_logps=sums[n:], chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
            ref_chosen_logps=None if ref is None else ref[:n], ref_rejected_logps=None if ref is None else ref[n:],
        )
        out = configured_preference_loss(a, logps)
        return LossOutput(out.loss * n / totals["num_pairs"], out.metrics)
