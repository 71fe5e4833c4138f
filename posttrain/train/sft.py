"""Supervised fine-tuning: next-token loss on assistant tokens only (chat templates, multi-turn)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import RunConfig
from posttrain.data.chat import Encoded, encode_messages, encode_prompt_completion
from posttrain.data.collate import apply_length_policy
from posttrain.devices import to_device
from posttrain.models.forward import token_logps
from posttrain.ops import IGNORE_INDEX, agg_loss
from posttrain.train import common
from posttrain.train.loop import Iteration
from posttrain.train.registry import algorithm
from posttrain.types import LossOutput


@dataclass
class SFTConfig:
    use_chat_template: bool = True  # prompt/completion records are wrapped as a user/assistant exchange
    loss_agg: str = "token-mean"  # see ops.agg_loss; token-mean over the whole accumulated batch


def encode_sft(record, tokenizer, use_chat: bool) -> Encoded:
    data = record.data
    if "messages" in data:
        return encode_messages(tokenizer, data["messages"])
    return encode_prompt_completion(tokenizer, data["prompt"], data["completion"], use_chat)


def sft_loss(model, batch: dict, totals: dict, agg: str = "token-mean", chunk: int = 1024) -> LossOutput:
    """Mean negative log-likelihood of labelled tokens, normalized by the whole update's token count."""
    labels = batch["labels"]
    logp = token_logps(model, batch["input_ids"], batch["attention_mask"], labels, chunk,
                       documents=batch.get("documents"), position_ids=batch.get("position_ids"))
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False  # the first token has no prediction
    loss = agg_loss(-logp, mask, agg, num_tokens=totals["num_tokens"], num_seqs=totals["num_seqs"])
    return LossOutput(loss, {"padding_fraction": batch["padding_fraction"]})


@algorithm("sft", config=SFTConfig, help="supervised fine-tuning on demonstrations (assistant tokens only)")
class SFT(common.DatasetAlgorithm):
    """The SFT algorithm for the one loop."""

    def __init__(self, cfg: RunConfig, model=None, tokenizer=None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = common.load_policy_and_tokenizer(cfg)
        self.model, self.tokenizer = model, tokenizer
        train, held = common.load_splits(cfg, "sft")
        use_chat = cfg.algo.use_chat_template
        fit = lambda e: apply_length_policy(e, cfg.data.max_length, cfg.data.overlong)  # noqa: E731
        self.train_items, _ = common.encode_all(train, lambda r: encode_sft(r, tokenizer, use_chat), len, cfg, fit)
        self.eval_items, _ = common.encode_all(held, lambda r: encode_sft(r, tokenizer, use_chat), len, cfg, fit, "eval")
        self.order = common.make_order([len(x) for x in self.train_items], cfg)
        self.pad_id = tokenizer.pad_token_id

    def next_iteration(self, step: int) -> Iteration:
        batches = [[self.train_items[i] for i in self.order.next()] for _ in range(self.cfg.train.grad_accum)]
        return Iteration([common.sequence_micro_batches(batches, self.cfg, self.pad_id)])

    def totals(self, update) -> dict:
        return {
            "num_tokens": sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in update),
            "num_seqs": sum(b.get("num_seqs", b["input_ids"].shape[0]) for b in update),
            "tokens": sum(int(b["attention_mask"].sum()) for b in update),
        }

    def loss(self, micro, totals) -> LossOutput:
        self.model.train()
        with common.autocast_context(self.cfg.model, self.device.type):
            return sft_loss(self.model, micro, totals, self.cfg.algo.loss_agg, self.cfg.model.logprob_chunk)

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_items:
            return {}
        self.model.eval()
        nll, count = 0.0, 0
        bs = self.cfg.train.batch_size
        for s in range(0, len(self.eval_items), bs):
            batch = to_device(common.padded_sft_batch(self.eval_items[s : s + bs], self.pad_id), self.device)
            with common.autocast_context(self.cfg.model, self.device.type):
                logp = token_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            mask = batch["labels"] != IGNORE_INDEX
            mask[:, 0] = False
            nll -= float((logp * mask).sum())
            count += int(mask.sum())
        return {"loss": nll / max(count, 1)}
