"""`posttrain dpo`: the offline DPO family (dpo, ipo, robust, cdpo, hinge, simpo, orpo) on the one loop.

Each micro-batch of B pairs is one padded batch of 2B rows (chosen rows, then rejected rows) and one forward pass;
log-probs are summed over completion tokens only (prompt tokens carry no label, so no loss and no gradient) and
split back into a `PairLogps`. The losses (`posttrain.algos.preference`) return a batch mean, so a micro-batch's
loss is scaled by B / (pairs in the whole update): k micro-batches give the gradient of one batch of kB pairs.
Reference log-probs come from one pass before training (`posttrain.train.reference`); reference-free losses
(simpo, orpo) load and compute no reference at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from posttrain.algos.preference import PairLogps, PreferenceLossConfig, configured_preference_loss, needs_reference
from posttrain.config import RunConfig
from posttrain.data.formats import Record
from posttrain.data.preference import PairItem, encode_pair, fit_both, pair_batch, split_degenerate
from posttrain.devices import to_device
from posttrain.models.forward import sequence_logps
from posttrain.models.loading import disable_dropout
from posttrain.models.shared_prefix import supports_shared_prefix
from posttrain.train import common, reference
from posttrain.train.loop import Iteration
from posttrain.train.registry import algorithm
from posttrain.types import LossOutput

log = logging.getLogger("posttrain")


@dataclass
class DPOConfig(PreferenceLossConfig):
    precompute_ref: bool = True  # one reference pass before training (one model in memory); False: every step
    ref_model: str | None = None  # another reference checkpoint; default: the initial policy (reference.py)
    use_chat_template: bool = True
    # chosen and rejected in one row around their common prompt (posttrain.models.shared_prefix): the prompt is
    # encoded once per pair, same log-probs; False: two padded rows per pair, as TRL does
    share_prompt: bool = True
    disable_dropout: bool = True  # dropout would make policy != reference at step 0 (TRL does the same)


# ---- helpers shared with KTO ---------------------------------------------------------------------------------------


# ---- pairs ---------------------------------------------------------------------------------------------------------


def pair_logps(model, batch: dict, ref: torch.Tensor | None, chunk: int) -> PairLogps:
    """One forward pass over the 2B rows, split into chosen and rejected (B,) sums and lengths."""
    sums, lengths = sequence_logps(model, batch, chunk)
    half = sums.shape[0] // 2
    ref_c, ref_r = (ref[:half], ref[half:]) if ref is not None else (None, None)
    return PairLogps(sums[:half], sums[half:], lengths[:half], lengths[half:], ref_c, ref_r)


@algorithm("dpo", config=DPOConfig, help="DPO family on preference pairs (algo.loss_type=dpo|ipo|robust|cdpo|hinge|simpo|orpo)")
class DPO(common.DatasetAlgorithm):
    """The DPO family for the one loop."""


    def __init__(self, cfg: RunConfig, model=None, tokenizer=None):
        self.cfg, algo = cfg, cfg.algo
        needs_reference(algo.loss_type)  # fail on an unknown loss name before loading anything
        if model is None:
            model, tokenizer = common.load_policy_and_tokenizer(cfg)
        self.model, self.tokenizer, self.pad_id = model, tokenizer, tokenizer.pad_token_id
        self.share_prompt = algo.share_prompt and supports_shared_prefix(model)
        if algo.disable_dropout:
            disable_dropout(model)
        train, held = common.load_splits(cfg, "preference")
        self.train_items, self.eval_items = self._load("train", train), self._load("eval", held)
        self.order = common.make_order([max(len(p.chosen), len(p.rejected)) for p in self.train_items], cfg)
        self.reference, ref_metrics = None, {}
        if needs_reference(algo.loss_type):
            self.reference, ref_metrics = reference.build_reference(
                model, cfg, self._ref_columns(), self.pad_id, algo.ref_model, algo.precompute_ref
            )
        self._once = common.once_metrics(model, ref_metrics)

    def _load(self, name: str, records: list[Record]) -> list[PairItem]:
        kept, dropped = split_degenerate(records)
        use_chat = self.cfg.algo.use_chat_template
        encode = lambda r: encode_pair(r, self.tokenizer, use_chat)  # noqa: E731
        fit = fit_both(self.cfg.data.max_length, self.cfg.data.overlong)
        pairs, _ = common.encode_all(kept, encode, lambda p: max(map(len, p)), self.cfg, fit, name,
                                     dropped_before={"with chosen == rejected": len(dropped)})
        common.report_degenerate(self.cfg, name, dropped)
        return [PairItem(i, c, r) for i, (c, r) in enumerate(pairs)]

    def _ref_columns(self) -> dict[str, reference.RefColumn]:
        train = self.cfg.train
        needed = reference.planned_indices(self.order, train.max_steps * train.grad_accum)
        share = lambda split: f"{split}.rejected" if self.share_prompt else None  # noqa: E731
        columns = {
            "train.chosen": reference.RefColumn([p.chosen for p in self.train_items], needed, share("train")),
            "train.rejected": reference.RefColumn([p.rejected for p in self.train_items], needed),
        }
        if self.eval_items:
            columns["eval.chosen"] = reference.RefColumn([p.chosen for p in self.eval_items], None, share("eval"))
            columns["eval.rejected"] = reference.RefColumn([p.rejected for p in self.eval_items])
        return columns


    def next_iteration(self, step: int) -> Iteration:
        batches = [[self.train_items[i] for i in self.order.next()] for _ in range(self.cfg.train.grad_accum)]
        batches = common.token_budget_groups(batches, lambda p: common.pair_cost(len(p.chosen), len(p.rejected)),
                                             self.cfg)
        micro = [pair_batch(b, self.pad_id, "train", self.share_prompt, self.cfg.train.padding_free) for b in batches]
        metrics, self._once = self._once, {}
        return Iteration([micro], metrics)

    def totals(self, update) -> dict:
        return {
            "num_pairs": sum(b["num_pairs"] for b in update),
            # tokens/s counts the pairs' tokens (two full sequences each), the same unit for shared and unshared rows
            "tokens": sum(b["pair_tokens"] for b in update),
        }

    def _loss(self, batch: dict) -> LossOutput:
        algo = self.cfg.algo
        ref = self.reference.logps(batch) if self.reference is not None else None
        with common.autocast_context(self.cfg.model, self.device.type):
            logps = pair_logps(self.model, batch, ref, self.cfg.model.logprob_chunk)
        return configured_preference_loss(algo, logps)

    def loss(self, micro, totals) -> LossOutput:
        self.model.train()
        out = self._loss(micro)
        metrics = {**out.metrics, "forward_token_fraction": micro["forward_tokens"] / micro["pair_tokens"],
                   "padding_fraction": micro["padding_fraction"]}
        return LossOutput(out.loss * (micro["num_pairs"] / totals["num_pairs"]), metrics)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and implicit-reward metrics, pair-weighted: `rewards/accuracies` is the pairwise accuracy."""
        if not self.eval_items:
            return {}
        self.model.eval()
        sums: dict[str, float] = {}
        bs = self.cfg.train.batch_size
        for start in range(0, len(self.eval_items), bs):
            chunk = self.eval_items[start : start + bs]
            out = self._loss(to_device(pair_batch(chunk, self.pad_id, "eval", self.share_prompt), self.device))
            for key, value in {"loss": out.loss, **out.metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
        self.model.train()
        return {key: value / len(self.eval_items) for key, value in sums.items()}
