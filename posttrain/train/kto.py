"""`posttrain kto`: KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable completions, on the one loop.

Data: `prompt`, `completion`, `label` records; a preference set (`prompt`, `chosen`, `rejected`, detected by its
columns) feeds KTO too, each pair split into one desirable and one undesirable example.

The reference point z_ref estimates KL(π‖π_ref) on *mismatched* pairs: prompt i with the completion of another
example. Which other example is fixed once, at load time, by a seeded derangement over the whole training set
(`kl_partners`; the partner never shares the prompt), not drawn per batch: so the KL pairs are known in advance,
their reference log-probs are precomputed with the others, and a resumed run sees the same pairs. Within an update
z_ref = max(0, mean over the update's KL pairs of log π − log π_ref), computed without gradient when the update is
built (`next_iteration`), so k micro-batches give exactly the gradient of one batch, as in eq. 8 of the paper.

How this differs from the paper and TRL, which mismatch completions within each batch (TRL's KTOTrainer shifts the
batch's completions by one): there, prompt i meets a new completion each epoch and a batch's KL pairs use only that
batch's completions; here prompt i always meets the same other example's completion, drawn from the whole set.
Each batch's estimate has the same expectation (a prompt with an unrelated completion, as in the product of the
marginals), but across epochs the KL sample does not change — fewer distinct KL pairs over a long run, in exchange
for no second reference pass per step. `test_kl_partners_are_fixed_across_epochs` pins this behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

import torch

from posttrain.algos.kto import kto_loss, mismatched_indices
from posttrain.config import RunConfig
from posttrain.data.chat import Encoded, encode_prompt_completion
from posttrain.data.formats import Record, read_records
from posttrain.devices import to_device
from posttrain.train import common, reference
from posttrain.data.collate import pad_encoded
from posttrain.data.preference import fit_both, split_degenerate
from posttrain.models.forward import sequence_logps
from posttrain.models.loading import disable_dropout
from posttrain.train.loop import Iteration
from posttrain.train.registry import algorithm
from posttrain.types import LossOutput


@dataclass
class KTOConfig:
    beta: float = 0.1  # β of the implicit reward
    desirable_weight: float = 1.0  # λ_D; the paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3]
    undesirable_weight: float = 1.0  # λ_U
    precompute_ref: bool = True  # one reference pass before training (one model in memory); False: every step
    ref_model: str | None = None  # another reference checkpoint; default: the initial policy (reference.py)
    use_chat_template: bool = True
    disable_dropout: bool = True


# ---- data ----------------------------------------------------------------------------------------------------------

def data_kind(spec: str) -> str:
    """'preference' when the records have chosen/rejected columns, else 'unpaired' (built-in tasks: unpaired)."""
    if spec.startswith("task:"):
        return "unpaired"
    first = read_records(spec)[0].data
    return "preference" if {"chosen", "rejected"} <= first.keys() else "unpaired"


def unpair(records: list[Record]) -> list[Record]:
    """Each preference pair -> a desirable (chosen) and an undesirable (rejected) example sharing a `pair` id."""
    return [
        Record({"prompt": r.data["prompt"], "completion": r.data[name], "label": label, "pair": k}, f"{r.where} ({name})")
        for k, r in enumerate(records)
        for name, label in (("chosen", True), ("rejected", False))
    ]


def kl_partners(prompt_keys: list[str], seed: int) -> list[int]:
    """partner[i]: the example whose completion is paired with prompt i for the KL estimate. A derangement.

    A random roll over a seeded shuffle (`kto.mismatched_indices`, a derangement for any n >= 2, odd or even),
    then every partner that shares its prompt (the other half of a split preference pair) is swapped with
    another row's partner where that fixes both. n == 1 pairs the only example with itself (an odd batch once paired a row with itself in TRL, #1911).
    """
    n = len(prompt_keys)
    if n < 2:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen, device="cpu").tolist()
    roll = mismatched_indices(n, gen).tolist()
    partner = [0] * n
    for k in range(n):
        partner[perm[k]] = perm[roll[k]]
    rng = random.Random(seed)
    for i in range(n):
        for _ in range(64 if prompt_keys[partner[i]] == prompt_keys[i] else 0):
            j = rng.randrange(n)
            if prompt_keys[partner[j]] != prompt_keys[i] and prompt_keys[partner[i]] != prompt_keys[j]:
                partner[i], partner[j] = partner[j], partner[i]
                break
    return partner


def with_kl_partners(records: list[Record], seed: int) -> list[Record]:
    keys = [json.dumps(r.data["prompt"], sort_keys=True) for r in records]
    partner = kl_partners(keys, seed)
    return [Record({**r.data, "kl_completion": records[partner[i]].data["completion"]}, r.where) for i, r in enumerate(records)]


@dataclass
class KTOItem:
    index: int  # position in its split: the key of its reference log-probs
    seq: Encoded  # prompt + its own completion
    kl: Encoded  # prompt + the partner's completion
    desirable: bool
    pair: int  # preference pair it came from; -1 for unpaired data


def encode_example(record: Record, tokenizer, use_chat: bool) -> KTOItem:
    """Prompt + own completion, prompt + partner's completion; index is set once the split is final."""
    data = record.data
    own = encode_prompt_completion(tokenizer, data["prompt"], data["completion"], use_chat)
    kl = encode_prompt_completion(tokenizer, data["prompt"], data["kl_completion"], use_chat)
    return KTOItem(-1, own, kl, bool(data["label"]), int(data.get("pair", -1)))


def kto_batch(items: list[KTOItem], pad_id: int, split: str, padding_free: bool = False) -> dict:
    """The trained rows (B, T) with labels and `desirable` (B,), and under "kl" the B mismatched rows; with
    `padding_free`, each of the two packed side by side into fewer rows (data/padding_free.py). `num_seqs`: B."""
    collate = pad_encoded
    if padding_free:
        from posttrain.data.padding_free import pack_documents as collate
    batch = collate([x.seq for x in items], pad_id)
    batch["num_seqs"] = len(items)
    batch["ref_keys"] = [(f"{split}.completion", x.index) for x in items]
    batch["desirable"] = torch.tensor([x.desirable for x in items], device="cpu")
    batch["kl"] = collate([x.kl for x in items], pad_id)
    batch["kl"]["ref_keys"] = [(f"{split}.kl", x.index) for x in items]
    return batch


def reward_accuracy(rewards: torch.Tensor, desirable: torch.Tensor, pair: torch.Tensor) -> float | None:
    """Share of (desirable, undesirable) comparisons the implicit reward orders right.

    Within each preference pair when the data came in pairs (pair >= 0), else over every desirable x undesirable
    combination (the ROC AUC). None when there is nothing to compare.
    """
    if (pair >= 0).all():
        good = {int(p): float(r) for p, r, d in zip(pair, rewards, desirable) if d}
        bad = {int(p): float(r) for p, r, d in zip(pair, rewards, desirable) if not d}
        both = good.keys() & bad.keys()
        return sum(good[p] > bad[p] for p in both) / len(both) if both else None
    good, bad = rewards[desirable], rewards[~desirable]
    return float((good[:, None] > bad[None, :]).float().mean()) if len(good) and len(bad) else None


# ---- the algorithm -------------------------------------------------------------------------------------------------

@algorithm("kto", config=KTOConfig, help="KTO on unpaired thumbs-up/down data (or split preference pairs)")
class KTO(common.DatasetAlgorithm):
    """KTO for the one loop."""


    def __init__(self, cfg: RunConfig, model=None, tokenizer=None):
        self.cfg, algo = cfg, cfg.algo
        if model is None:
            model, tokenizer = common.load_policy_and_tokenizer(cfg)
        self.model, self.tokenizer, self.pad_id = model, tokenizer, tokenizer.pad_token_id
        if algo.disable_dropout:
            disable_dropout(model)
        kind = data_kind(cfg.data.path)
        train, held = common.load_splits(cfg, kind)
        self.train_items, self.eval_items = self._load("train", train, kind), self._load("eval", held, kind)
        # no length grouping: on paired data length often tracks the label, and one-sided batches starve z_ref
        self.order = common.make_order([len(x.seq) for x in self.train_items], cfg, group_by_length=False)
        train_cfg = cfg.train
        needed = reference.planned_indices(self.order, train_cfg.max_steps * train_cfg.grad_accum)
        columns = {
            "train.completion": reference.RefColumn([x.seq for x in self.train_items], needed),
            "train.kl": reference.RefColumn([x.kl for x in self.train_items], needed),
        }
        if self.eval_items:
            columns["eval.completion"] = reference.RefColumn([x.seq for x in self.eval_items])
        self.reference, ref_metrics = reference.build_reference(
            model, cfg, columns, self.pad_id, algo.ref_model, algo.precompute_ref
        )
        self._once = common.once_metrics(model, ref_metrics)

    def _load(self, name: str, records: list[Record], kind: str) -> list[KTOItem]:
        dropped: list[Record] = []
        if kind == "preference":
            records, dropped = split_degenerate(records)
            records = unpair(records)
        examples = with_kl_partners(records, self.cfg.train.seed)
        encode = lambda r: encode_example(r, self.tokenizer, self.cfg.algo.use_chat_template)  # noqa: E731
        fit_pair = fit_both(self.cfg.data.max_length, self.cfg.data.overlong)

        def fit(item: KTOItem) -> KTOItem | None:
            fitted = fit_pair((item.seq, item.kl))
            return None if fitted is None else dataclasses.replace(item, seq=fitted[0], kl=fitted[1])

        items, _ = common.encode_all(examples, encode, lambda x: max(len(x.seq), len(x.kl)), self.cfg, fit, name,
                                     dropped_before={"with chosen == rejected": len(dropped)} if dropped else None)
        if kind == "preference":
            common.report_degenerate(self.cfg, name, dropped)
        return [dataclasses.replace(x, index=i) for i, x in enumerate(items)]


    def next_iteration(self, step: int) -> Iteration:
        batches = [[self.train_items[i] for i in self.order.next()] for _ in range(self.cfg.train.grad_accum)]
        # a row and its mismatched KL row are two forward passes of one micro-batch
        batches = common.token_budget_groups(batches, lambda x: common.pair_cost(len(x.seq), len(x.kl)), self.cfg)
        micro = [kto_batch(b, self.pad_id, "train", self.cfg.train.padding_free) for b in batches]
        self.kl_logps = self.kl_pair_logps(micro)  # the weights the update starts from: it follows at once
        metrics, self._once = self._once, {}
        return Iteration([micro], metrics)

    @torch.no_grad()
    def kl_pair_logps(self, update) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-probs of all the update's mismatched (KL) pairs: z_ref is estimated over the
        whole update, so every micro-batch's loss uses the same reference point."""
        self.model.train()
        kl_policy, kl_ref = [], []
        for batch in update:
            kl = to_device(batch["kl"], self.device)  # the loop moves the trained rows, not these
            with common.autocast_context(self.cfg.model, self.device.type):
                kl_policy.append(sequence_logps(self.model, kl, self.cfg.model.logprob_chunk)[0].float())
            kl_ref.append(self.reference.logps(kl))
        return torch.cat(kl_policy), torch.cat(kl_ref)

    def totals(self, update) -> dict:
        """Row and token counts of the update (`tokens`, for tokens_per_s, counts the trained rows only; the
        no-grad KL rows are overhead on top) and its KL pairs' log-probs from `next_iteration`."""
        kl_policy, kl_ref = self.kl_logps
        return {
            "num_rows": sum(b["num_seqs"] for b in update),  # sequences: a padding-free row holds several
            "tokens": sum(int(b["attention_mask"].sum()) for b in update),
            "kl_policy": kl_policy,
            "kl_ref": kl_ref,
        }

    def _logratio_parts(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self.reference.logps(batch)
        with common.autocast_context(self.cfg.model, self.device.type):
            logps, _ = sequence_logps(self.model, batch, self.cfg.model.logprob_chunk)
        return logps, ref

    def loss(self, micro, totals) -> LossOutput:
        self.model.train()
        algo = self.cfg.algo
        logps, ref = self._logratio_parts(micro)
        out = kto_loss(logps, ref, micro["desirable"], totals["kl_policy"], totals["kl_ref"], algo.beta,
                       algo.desirable_weight, algo.undesirable_weight)
        desirable = micro["desirable"]
        for key, rows in (("logps/chosen", desirable), ("logps/rejected", ~desirable)):
            if rows.any():
                out.metrics[key] = logps.detach()[rows].mean()
        return LossOutput(out.loss * (micro["num_seqs"] / totals["num_rows"]), out.metrics)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean implicit rewards β(log π − log π_ref) of held-out desirable / undesirable rows and their accuracy."""
        if not self.eval_items:
            return {}
        self.model.eval()
        rewards = []
        bs = self.cfg.train.batch_size
        for start in range(0, len(self.eval_items), bs):
            batch = to_device(kto_batch(self.eval_items[start : start + bs], self.pad_id, "eval"), self.device)
            logps, ref = self._logratio_parts(batch)
            rewards.append(self.cfg.algo.beta * (logps.float() - ref))
        self.model.train()
        rewards = torch.cat(rewards).cpu()
        desirable = torch.tensor([x.desirable for x in self.eval_items], device="cpu")
        out = {}
        if desirable.any():
            out["rewards/chosen"] = float(rewards[desirable].mean())
        if (~desirable).any():
            out["rewards/rejected"] = float(rewards[~desirable].mean())
        if len(out) == 2:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        accuracy = reward_accuracy(rewards, desirable, torch.tensor([x.pair for x in self.eval_items], device="cpu"))
        return out if accuracy is None else {**out, "rewards/accuracies": accuracy}
