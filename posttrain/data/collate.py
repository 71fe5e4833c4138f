"""Length policy, length-grouped batching with a resumable position, and padding into tensors."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from posttrain.data.chat import Encoded
from posttrain.ops import IGNORE_INDEX
from posttrain.types import RolloutBatch


@dataclass
class LengthReport:
    """What the over-long policy did, reported in the run's log and metrics."""

    policy: str
    kept: int = 0
    dropped: int = 0
    truncated: int = 0
    examples: list[str] = field(default_factory=list)  # where the first few over-long records came from

    def summary(self) -> str:
        return f"over-long policy {self.policy!r}: kept {self.kept}, dropped {self.dropped}, truncated {self.truncated}"


def apply_length_policy(encoded: Encoded, max_length: int, policy: str) -> Encoded | None:
    """None to drop; a truncated copy that keeps the prompt's start and at least one trained token; or as is.

    `truncate` cuts the end (the completion's tail) first; if the prompt alone leaves no room for one
    completion token, the example is dropped rather than trained with no target (prompts over the limit: TRL #3569).
    """
    if len(encoded) <= max_length:
        return encoded
    if policy == "drop":
        return None
    if policy != "truncate":
        raise ValueError(f"unknown over-long policy {policy!r}; use 'drop' or 'truncate'")
    ids, labels = encoded.input_ids[:max_length], encoded.labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None
    return Encoded(ids, labels, prompt_len=min(encoded.prompt_len, max_length))


def filter_by_length(items: list, lengths: list[int], wheres: list[str], max_length: int, policy: str, fit=None):
    """Apply the policy to a list; `fit(item) -> item | None` does the per-item truncation. Returns (kept, report)."""
    report = LengthReport(policy)
    kept = []
    for item, length, where in zip(items, lengths, wheres):
        if length <= max_length:
            kept.append(item)
            report.kept += 1
            continue
        fitted = fit(item) if (fit is not None and policy == "truncate") else None
        if len(report.examples) < 5:
            report.examples.append(where)
        if fitted is None:
            report.dropped += 1
        else:
            report.truncated += 1
            report.kept += 1
            kept.append(fitted)
    return kept, report


class BatchOrder:
    """A deterministic, resumable order of example indices in batches, grouped by length when asked.

    Each epoch shuffles with (seed, epoch); length grouping sorts within windows of 50 batches and then
    shuffles the batches, so batches hold similar lengths yet the order stays random. The position is
    (epoch, batch index) and is saved in checkpoints.

    With several processes every rank builds the same order of *global* batches (batch_size x world) and takes
    every world-th example of each, so the global batch is the one a single process would see; a short last
    batch is dropped then, since a rank must never get an empty share.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True, drop_last: bool = False,
                 rank: int = 0, world: int = 1):
        if not lengths:
            raise ValueError("no examples left to train on (all dropped or empty dataset)")
        self.lengths, self.batch_size, self.seed = lengths, batch_size * world, seed
        self.group_by_length, self.drop_last = group_by_length, drop_last or world > 1
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._batches = self._make_epoch(0)

    def _make_epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group_by_length:
            window = self.batch_size * 50
            order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=self.lengths.__getitem__)]
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        rng.shuffle(batches)
        return batches

    def next(self) -> list[int]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._make_epoch(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return batch[self.rank :: self.world]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._batches = self._make_epoch(self.epoch)


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right", labels: list[list[int]] | None = None):
    """Pad id lists into tensors: input_ids (B, T), attention_mask (B, T), labels (B, T) if given.

    The attention mask, not the pad id, tells real tokens from padding (pad may equal EOS). The tensors are built
    on the CPU (host staging: counting tokens there costs no device sync); the training loop moves each micro-batch
    to the run's device before its forward pass.
    """
    import torch

    width = max(len(s) for s in sequences)
    host = {"dtype": torch.long, "device": "cpu"}
    ids = torch.full((len(sequences), width), pad_id, **host)
    mask = torch.zeros((len(sequences), width), **host)
    lab = torch.full((len(sequences), width), IGNORE_INDEX, **host) if labels is not None else None
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, **host)
        mask[row, span] = 1
        if lab is not None:
            lab[row, span] = torch.tensor(labels[row], **host)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    return out


def padding_fraction(lengths: list[int]) -> float:
    """Share of a padded (B, max_len) batch that is padding."""
    if not lengths:
        return 0.0
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))


def pad_encoded(items: list[Encoded], pad_id: int) -> dict:
    """Right-padded (R, T) batch of encoded sequences with their labels (input_ids, attention_mask, labels)."""
    return pad_batch([x.input_ids for x in items], pad_id, "right", [x.labels for x in items])


def select_rows(batch: RolloutBatch, keep: torch.Tensor) -> RolloutBatch:
    """The rows where `keep` (N,) bool is true, groups renumbered from 0 in order of appearance."""
    idx = keep.nonzero().squeeze(-1)
    _, group = torch.unique_consecutive(batch.group[idx], return_inverse=True)
    return RolloutBatch(
        input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx], completion_mask=batch.completion_mask[idx],
        loss_mask=batch.loss_mask[idx], rewards=batch.rewards[idx], group=group, truncated=batch.truncated[idx],
        prompt_width=batch.prompt_width, texts=[batch.texts[i] for i in idx.tolist()],
        prompts=[batch.prompts[i] for i in idx.tolist()], pad_id=batch.pad_id,
        extra={key: _take_rows(value, idx, batch.num_rows) for key, value in batch.extra.items()},
    )


def _take_rows(value, idx: torch.Tensor, num_rows: int):
    """A per-row extra (a tensor or list with one entry per row: reward_valid, sampler_logp, transcripts, the
    per-function scores) at the rows `idx`; anything else (the step's metrics) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_rows:
        return value[idx.to(value.device)]
    if isinstance(value, list) and len(value) == num_rows:
        return [value[i] for i in idx.tolist()]
    return value


def _concat_extra(batches: list[RolloutBatch], width: int) -> dict:
    """The per-row extras of several rollouts concatenated (a token-level one, as wide as its batch's completions,
    right-padded with 0 to `width`); anything else from the first batch."""
    import torch.nn.functional as F

    out = {}
    for key, first in batches[0].extra.items():
        values = [b.extra.get(key) for b in batches]
        if all(isinstance(v, list) and len(v) == b.num_rows for v, b in zip(values, batches)):
            out[key] = [x for v in values for x in v]
        elif all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b.num_rows
                 for v, b in zip(values, batches)):
            token_level = all(v.dim() == 2 and v.shape[1] == b.completion_mask.shape[1] for v, b in zip(values, batches))
            out[key] = torch.cat([F.pad(v, (0, width - v.shape[1])) if token_level else v for v in values])
        else:
            out[key] = first
    return out


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Rows of several rollouts in one batch: prompts re-left-padded and completions re-right-padded."""
    import torch.nn.functional as F

    P = max(b.prompt_width for b in batches)
    C = max(b.completion_mask.shape[1] for b in batches)
    pad_id = batches[0].pad_id

    def widen(b, t, fill):
        prompt, comp = t[:, : b.prompt_width], t[:, b.prompt_width :]
        return torch.cat([F.pad(prompt, (P - b.prompt_width, 0), value=fill), F.pad(comp, (0, C - comp.shape[1]), value=fill)], 1)

    offsets, groups = 0, []
    for b in batches:
        groups.append(b.group + offsets)
        offsets += int(b.group.max()) + 1 if b.num_rows else 0
    cat = lambda f: torch.cat([f(b) for b in batches])  # noqa: E731
    return RolloutBatch(
        input_ids=cat(lambda b: widen(b, b.input_ids, pad_id)), attention_mask=cat(lambda b: widen(b, b.attention_mask, 0)),
        completion_mask=cat(lambda b: F.pad(b.completion_mask, (0, C - b.completion_mask.shape[1]))),
        loss_mask=cat(lambda b: F.pad(b.loss_mask, (0, C - b.loss_mask.shape[1]))), rewards=cat(lambda b: b.rewards),
        group=torch.cat(groups), truncated=cat(lambda b: b.truncated), prompt_width=P,
        texts=[t for b in batches for t in b.texts], prompts=[p for b in batches for p in b.prompts], pad_id=pad_id,
        extra=_concat_extra(batches, C),
    )
