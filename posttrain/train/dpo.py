"""`posttrain dpo`: the offline DPO family (dpo, ipo, robust, cdpo, hinge, simpo, orpo) on the one loop.

Each micro-batch of B pairs is one padded batch of 2B rows (chosen rows, then rejected rows) and one forward pass;
log-probs are summed over completion tokens only (prompt tokens carry no label, so no loss and no gradient) and
split back into a `PairLogps`. The losses (`posttrain.algos.preference`) return a batch mean, so a micro-batch's
loss is scaled by B / (pairs in the whole update): k micro-batches give the gradient of one batch of kB pairs.
Reference log-probs come from one pass before training (`posttrain.train.reference`); reference-free losses
(simpo, orpo) load and compute no reference at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.algos.preference import PairLogps, needs_reference, preference_loss
from posttrain.config import RunConfig, register_algo_config
from posttrain.data.chat import Encoded, encode_prompt_completion
from posttrain.data.collate import apply_length_policy
from posttrain.data.formats import Record
from posttrain.devices import to_device
from posttrain.models.shared_prefix import pack_pairs, supports_shared_prefix
from posttrain.train import common, reference
from posttrain.train.loop import Iteration, Trainer
from posttrain.types import LossOutput

log = logging.getLogger("posttrain")


@register_algo_config("dpo")
@dataclass
class DPOConfig:
    loss_type: str = "dpo"  # dpo | ipo | robust | cdpo | hinge | simpo | orpo (posttrain.algos.preference)
    beta: float = 0.1  # β of the implicit reward (IPO's τ)
    label_smoothing: float = 0.0  # ε, assumed label-flip rate (cdpo/dpo, robust, simpo)
    simpo_gamma: float = 0.5  # SimPO's target margin γ
    orpo_lambda: float = 0.1  # ORPO's weight λ of the odds-ratio term
    nll_weight: float = 0.0  # α of an NLL term on the chosen completion (RPO; TRL's rpo_alpha); 0 = off
    precompute_ref: bool = True  # one reference pass before training (one model in memory); False: every step
    ref_model: str | None = None  # another reference checkpoint; default: the initial policy (reference.py)
    use_chat_template: bool = True
    # chosen and rejected in one row around their common prompt (posttrain.models.shared_prefix): the prompt is
    # encoded once per pair, same log-probs; False: two padded rows per pair, as TRL does
    share_prompt: bool = True
    disable_dropout: bool = True  # dropout would make policy != reference at step 0 (TRL does the same)


# ---- helpers shared with KTO ---------------------------------------------------------------------------------------

def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, list) else str(value).strip()


def split_degenerate(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(kept, dropped): a pair whose chosen and rejected texts are equal teaches nothing (PITFALLS #15)."""
    kept, dropped = [], []
    for record in records:
        same = _canonical(record.data["chosen"]) == _canonical(record.data["rejected"])
        (dropped if same else kept).append(record)
    return kept, dropped


def report_degenerate(cfg: RunConfig, name: str, dropped: list[Record]) -> None:
    """Add the count (and the first few places) to data_report.json (rank 0 only: ranks writing the same file
    at once read each other's half-written JSON); warn when any were dropped."""
    from posttrain.train.distributed import context

    path = Path(cfg.train.output_dir) / "data_report.json"
    if context().is_main:
        report = json.loads(path.read_text()) if path.exists() else {}
        report.setdefault(name, {}).update(degenerate_dropped=len(dropped), first_degenerate=[r.where for r in dropped[:5]])
        common.write_json(path, report)
    if dropped:
        log.warning("%s data: dropped %d pairs whose chosen == rejected (first: %s)", name, len(dropped),
                    ", ".join(r.where for r in dropped[:5]))


def once_metrics(model, ref_metrics: dict) -> dict:
    """Logged with the first step of a process: parameter counts, models held, what the reference pass did."""
    return {**common.describe_model(model), "models_in_memory": 1, **ref_metrics}


def fit_both(max_length: int, policy: str):
    """The over-long policy applied to every sequence of an example; None (drop) if any of them is dropped."""
    def fit(seqs):
        out = tuple(apply_length_policy(s, max_length, policy) for s in seqs)
        return None if any(s is None for s in out) else out

    return fit


# ---- pairs ---------------------------------------------------------------------------------------------------------

@dataclass
class PairItem:
    index: int  # position in its split: the key of its reference log-probs
    chosen: Encoded
    rejected: Encoded


def encode_pair(record: Record, tokenizer, use_chat: bool) -> tuple[Encoded, Encoded]:
    data = record.data
    chosen = encode_prompt_completion(tokenizer, data["prompt"], data["chosen"], use_chat)
    rejected = encode_prompt_completion(tokenizer, data["prompt"], data["rejected"], use_chat)
    return chosen, rejected


def pair_batch(items: list[PairItem], pad_id: int, split: str, share_prompt: bool = False) -> dict:
    """A micro-batch of B pairs: with `share_prompt`, B rows [prompt | chosen | rejected] (shared_prefix.pack_pairs);
    otherwise chosen rows then rejected rows, one right-padded batch of 2B rows (input_ids, attention_mask, labels).
    Either way the log-probs come out as 2B sums, chosen first."""
    if share_prompt:
        batch = pack_pairs([(p.chosen, p.rejected) for p in items], pad_id)
        forward_tokens = int((batch["segments"] >= 0).sum())
    else:
        batch = reference.padded([p.chosen for p in items] + [p.rejected for p in items], pad_id)
        forward_tokens = int(batch["attention_mask"].sum())
    batch["ref_keys"] = [(f"{split}.chosen", p.index) for p in items] + [(f"{split}.rejected", p.index) for p in items]
    batch["num_pairs"] = len(items)
    batch["pair_tokens"] = sum(len(p.chosen) + len(p.rejected) for p in items)  # what two separate rows would hold
    batch["forward_tokens"] = forward_tokens
    return batch


def pair_logps(model, batch: dict, ref: torch.Tensor | None, chunk: int) -> PairLogps:
    """One forward pass over the 2B rows, split into chosen and rejected (B,) sums and lengths."""
    sums, lengths = reference.sequence_logps(model, batch, chunk)
    half = sums.shape[0] // 2
    ref_c, ref_r = (ref[:half], ref[half:]) if ref is not None else (None, None)
    return PairLogps(sums[:half], sums[half:], lengths[:half], lengths[half:], ref_c, ref_r)


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
        self._once = once_metrics(model, ref_metrics)

    def _load(self, name: str, records: list[Record]) -> list[PairItem]:
        kept, dropped = split_degenerate(records)
        use_chat = self.cfg.algo.use_chat_template
        encode = lambda r: encode_pair(r, self.tokenizer, use_chat)  # noqa: E731
        fit = fit_both(self.cfg.data.max_length, self.cfg.data.overlong)
        pairs, _ = common.encode_all(kept, encode, lambda p: max(map(len, p)), self.cfg, fit, name)
        report_degenerate(self.cfg, name, dropped)
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
        batches = [self.order.next() for _ in range(self.cfg.train.grad_accum)]
        micro = [pair_batch([self.train_items[i] for i in idx], self.pad_id, "train", self.share_prompt) for idx in batches]
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
        return preference_loss(algo.loss_type, logps, algo.beta, algo.label_smoothing, algo.simpo_gamma, algo.orpo_lambda,
                               algo.nll_weight)

    def loss(self, micro, totals) -> LossOutput:
        self.model.train()
        out = self._loss(micro)
        metrics = {**out.metrics, "forward_token_fraction": micro["forward_tokens"] / micro["pair_tokens"]}
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



def run_dpo(cfg: RunConfig) -> dict:
    """`posttrain dpo`: train with cfg.algo.loss_type, evaluate, write the run directory; returns the last metrics."""
    common.setup_run(cfg)
    return Trainer(DPO(cfg), cfg.train).fit()
