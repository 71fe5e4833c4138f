"""Reward modeling: a Bradley–Terry scalar head read at the last real token, trained on preference pairs.

loss = −log σ(r(x, y_w) − r(x, y_l))  (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1), optionally plus
`center_coef · (r_w + r_l)²` to keep scores near 0 (Eisenstein et al. 2023). Chosen and rejected rows share
one forward pass. Held-out pairwise accuracy is the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from posttrain.config import RunConfig
from posttrain.data.padding_free import pack_documents
from posttrain.data.preference import encode_pair_ids, pad_pair_ids, swap_labels
from posttrain.evaluate import pairwise_accuracy
from posttrain.models.forward import pair_scores
from posttrain.models.loading import load_reward_model, load_tokenizer, resolve_model_path
from posttrain.train import common
from posttrain.train.loop import Iteration
from posttrain.train.registry import algorithm
from posttrain.types import LossOutput


@dataclass
class RMConfig:
    use_chat_template: bool = True
    center_coef: float = 0.0  # weight of (r_w + r_l)^2; 0 disables
    label_noise: float = 0.0  # fraction of training pairs swapped (seeded): a deliberately noisy proxy reward model


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair loss (B,) from scores (B,) of chosen and rejected completions."""
    loss = -F.logsigmoid(chosen - rejected)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def packed_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """B pairs as a padding-free batch of 2B documents (`train.padding_free`): chosen ones first, then rejected
    ones, each scored at its own last token (`models.forward.pair_scores`)."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    return pack_documents([SimpleNamespace(input_ids=s, labels=s) for s in seqs], pad_id)


def _pairs_in(batch: dict) -> int:
    return batch["num_seqs"] // 2 if "num_seqs" in batch else batch["input_ids"].shape[0] // 2


@algorithm("rm", config=RMConfig, help="Bradley–Terry reward model on preference pairs")
class RewardModeling(common.DatasetAlgorithm):
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        path = resolve_model_path(cfg.model.name_or_path)
        self.tokenizer = load_tokenizer(path, cfg.data.chat_template)
        torch.manual_seed(cfg.train.seed)  # the new score head is initialised from the seed
        self.model = load_reward_model(path, cfg.model.dtype, self.tokenizer.pad_token_id, device=common.run_device(cfg))
        if cfg.model.lora.enabled:
            from posttrain.models.loading import apply_lora

            self.model = apply_lora(self.model, cfg.model.lora)
            for name, p in self.model.named_parameters():
                p.requires_grad_(p.requires_grad or "score" in name)  # the head is always trained
        train, held = common.load_splits(cfg, "preference")
        enc = lambda r: encode_pair_ids(r, self.tokenizer, cfg.algo.use_chat_template)  # noqa: E731
        self.train_pairs, _ = common.encode_all(train, enc, lambda p: max(map(len, p)), cfg)
        self.train_pairs, flipped = swap_labels(self.train_pairs, cfg.algo.label_noise, cfg.train.seed)
        if flipped:
            common.log.warning("label_noise=%s: %d of %d training pairs swapped", cfg.algo.label_noise, flipped, len(self.train_pairs))
        self.eval_pairs, _ = common.encode_all(held, enc, lambda p: max(map(len, p)), cfg, name="eval")
        self.order = common.make_order([max(map(len, p)) for p in self.train_pairs], cfg)
        self.pad_id = self.tokenizer.pad_token_id

    def modules(self):
        return {"reward_model": self.model}

    def next_iteration(self, step: int) -> Iteration:
        batches = [[self.train_pairs[i] for i in self.order.next()] for _ in range(self.cfg.train.grad_accum)]
        batches = common.token_budget_groups(batches, lambda pair: common.pair_cost(len(pair[0]), len(pair[1])), self.cfg)
        if not self.cfg.train.padding_free:
            return Iteration([[pad_pair_ids(b, self.pad_id) for b in batches]])
        return Iteration([[packed_pairs(b, self.pad_id) for b in batches]])

    def totals(self, update) -> dict:
        return {"num_pairs": sum(_pairs_in(b) for b in update), "tokens": sum(int(b["attention_mask"].sum()) for b in update)}

    def loss(self, micro, totals) -> LossOutput:
        self.model.train()
        with common.autocast_context(self.cfg.model, self.device.type):
            chosen, rejected = pair_scores(self.model, micro)
        per_pair = bradley_terry_loss(chosen, rejected, self.cfg.algo.center_coef)
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "rewards/margins": (chosen - rejected).detach().mean(),
        }
        return LossOutput(per_pair.sum() / totals["num_pairs"], metrics)

    @torch.no_grad()
    def evaluate(self) -> dict:
        return pairwise_accuracy(self.model, self.eval_pairs, self.pad_id, self.cfg.train.batch_size, self.cfg.model)


