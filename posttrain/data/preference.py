"""Preference data shared by DPO, KTO, the reward model and the over-optimization study: pairs encoded, degenerate
pairs split off, the over-long policy applied to both sides of a pair, label noise, and micro-batches of pairs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from posttrain.data.chat import Encoded, encode_prompt_completion
from posttrain.data.collate import apply_length_policy, pad_batch, pad_encoded
from posttrain.data.formats import Record
from posttrain.data.packing import pack_pairs


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, list) else str(value).strip()


def split_degenerate(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(kept, dropped): a pair whose chosen and rejected texts are equal teaches nothing (degenerate pairs: OpenRLHF #364)."""
    kept, dropped = [], []
    for record in records:
        same = _canonical(record.data["chosen"]) == _canonical(record.data["rejected"])
        (dropped if same else kept).append(record)
    return kept, dropped


def fit_both(max_length: int, policy: str):
    """The over-long policy applied to every sequence of an example; None (drop) if any of them is dropped."""
    def fit(seqs):
        out = tuple(apply_length_policy(s, max_length, policy) for s in seqs)
        return None if any(s is None for s in out) else out

    return fit


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


def pair_batch(items: list[PairItem], pad_id: int, split: str, share_prompt: bool = False,
               padding_free: bool = False) -> dict:
    """A micro-batch of B pairs: with `share_prompt`, B rows [prompt | chosen | rejected] (shared_prefix.pack_pairs);
    otherwise chosen rows then rejected rows, one right-padded batch of 2B rows (input_ids, attention_mask, labels).
    `padding_free` packs those units (pairs, or the 2B sequences) side by side into fewer rows, each unit seeing
    only itself (data/padding_free.py). Either way the log-probs come out as 2B sums, chosen first."""
    if share_prompt:
        batch = pack_pairs([(p.chosen, p.rejected) for p in items], pad_id, padding_free)
        real = batch["segments"] >= 0
    elif padding_free:
        from posttrain.data.padding_free import pack_documents

        batch = pack_documents([p.chosen for p in items] + [p.rejected for p in items], pad_id)
        real = batch["attention_mask"].bool()
    else:
        batch = pad_encoded([p.chosen for p in items] + [p.rejected for p in items], pad_id)
        real = batch["attention_mask"].bool()
    forward_tokens = int(real.sum())
    batch["padding_fraction"] = 1.0 - forward_tokens / max(real.numel(), 1)
    batch["ref_keys"] = [(f"{split}.chosen", p.index) for p in items] + [(f"{split}.rejected", p.index) for p in items]
    batch["num_pairs"] = len(items)
    batch["pair_tokens"] = sum(len(p.chosen) + len(p.rejected) for p in items)  # what two separate rows would hold
    batch["forward_tokens"] = forward_tokens
    return batch


def encode_pair_ids(record, tokenizer, use_chat: bool) -> tuple[list[int], list[int]]:
    """The token ids of prompt+chosen and prompt+rejected (a reward model's pair: no labels needed)."""
    data = record.data
    chosen = encode_prompt_completion(tokenizer, data["prompt"], data["chosen"], use_chat).input_ids
    rejected = encode_prompt_completion(tokenizer, data["prompt"], data["rejected"], use_chat).input_ids
    return chosen, rejected


def swap_labels(pairs: list, fraction: float, seed: int) -> tuple[list, int]:
    """Swap chosen and rejected in round(fraction * len) pairs picked by a seeded permutation."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"algo.label_noise must be in [0, 1], got {fraction}")

    picked = set(random.Random(seed).sample(range(len(pairs)), round(fraction * len(pairs))))
    return [(r, c) if i in picked else (c, r) for i, (c, r) in enumerate(pairs)], len(picked)


def pad_pair_ids(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Chosen rows then rejected rows in one padded batch (2B, T)."""
    return pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id, "right")
