"""A scored rollout in the shapes the losses use, and the forward passes that score its completions.

A rollout is stored padded (left-padded prompts, right-padded completions) because that is what generation
returns; for scoring, the rows of one group can instead be packed around their shared prompt
(`models/shared_prefix.pack_groups`): the same log-probs from ~3x fewer tokens on the demo task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.models.forward import token_logps
from posttrain.models.shared_prefix import grouped_token_logps, pack_groups, supports_shared_prefix
from posttrain.ops import IGNORE_INDEX


@dataclass
class RolloutBatch:
    """A scored rollout in the shapes the losses use. N rows = prompts x G; P prompt width; C completion width."""

    input_ids: torch.Tensor  # (N, P + C): left-padded prompt then right-padded completion
    attention_mask: torch.Tensor  # (N, P + C)
    completion_mask: torch.Tensor  # (N, C) real completion tokens (first EOS included)
    loss_mask: torch.Tensor  # (N, C) completion_mask, minus truncated rows when mask_truncated
    rewards: torch.Tensor  # (N,) combined reward
    group: torch.Tensor  # (N,) prompt index within this batch
    truncated: torch.Tensor  # (N,) bool
    prompt_width: int
    texts: list[str]
    prompts: list
    pad_id: int = 0
    extra: dict = field(default_factory=dict)  # algorithm tensors: old_logp, ref_logp, advantages, values ...

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def labels(self, rows) -> torch.Tensor:
        """Labels over the full sequence: completion tokens under the loss mask, IGNORE elsewhere."""
        P = self.prompt_width
        labels = torch.full_like(self.input_ids[rows], IGNORE_INDEX)
        comp = self.input_ids[rows, P:]
        labels[:, P:] = comp.masked_fill(self.completion_mask[rows] == 0, IGNORE_INDEX)
        return labels

    def prompt_ids(self, row: int) -> list[int]:
        return self.input_ids[row, : self.prompt_width][self.attention_mask[row, : self.prompt_width].bool()].tolist()

    def completion_ids(self, row: int) -> list[int]:
        return self.input_ids[row, self.prompt_width :][self.completion_mask[row].bool()].tolist()

    def pack(self, rows: torch.Tensor) -> dict:
        """The rows `rows` as one packed row per group [prompt | completions...] (`shared_prefix.pack_groups`);
        its score_seq indexes into `rows`."""
        members: dict[int, list[int]] = {}
        for i, r in enumerate(rows.tolist()):
            members.setdefault(int(self.group[r]), []).append(i)
        prompts, tails, order = [], [], []
        for idx in members.values():
            prompt = self.prompt_ids(int(rows[idx[0]]))
            if any(self.prompt_ids(int(rows[i])) != prompt for i in idx[1:]):
                raise ValueError("rows of one group must share their prompt to be packed")
            prompts.append(prompt)
            tails.append([self.completion_ids(int(rows[i])) for i in idx])
            order += idx
        packed = pack_groups(prompts, tails, self.pad_id)
        packed["score_seq"] = torch.tensor(order, dtype=torch.long, device="cpu")[packed["score_seq"]]
        device = self.input_ids.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}

    def forward_tokens(self, share_prompt: bool, rows: torch.Tensor | None = None) -> int:
        """Tokens a forward pass over `rows` (default all) processes: each group's prompt once when shared."""
        rows = torch.arange(self.num_rows, device=self.input_ids.device) if rows is None else rows
        if not share_prompt:
            return int(self.attention_mask[rows].sum())
        prompt_lengths = self.attention_mask[rows, : self.prompt_width].sum(-1)
        per_group = prompt_lengths.new_zeros(int(self.group.max()) + 1).scatter(0, self.group[rows], prompt_lengths)
        return int(per_group.sum()) + int(self.completion_mask[rows].sum())


def completion_logps(model, batch: RolloutBatch, rows: torch.Tensor, chunk: int, with_entropy: bool = False,
                     temperature: float = 1.0, share_prompt: bool = True):
    """Log-probs (len(rows), C) fp32 of the completion tokens of `rows` (0 past each end) [and the entropies of
    the predicting distributions]: one packed row per group when `share_prompt` and the attention takes a block
    mask, else the padded rows with positions from the attention mask."""
    C = batch.completion_mask.shape[1]
    if share_prompt and supports_shared_prefix(model):
        return grouped_token_logps(model, batch.pack(rows), C, chunk, with_entropy, temperature)
    out = token_logps(model, batch.input_ids[rows], batch.attention_mask[rows], batch.labels(rows), chunk,
                      with_entropy, temperature)
    P = batch.prompt_width
    return (out[0][:, P:], out[1][:, P:]) if with_entropy else out[:, P:]


def select_rows(batch: RolloutBatch, keep: torch.Tensor) -> RolloutBatch:
    """The rows where `keep` (N,) bool is true, groups renumbered from 0 in order of appearance."""
    idx = keep.nonzero().squeeze(-1)
    _, group = torch.unique_consecutive(batch.group[idx], return_inverse=True)
    return RolloutBatch(
        input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx], completion_mask=batch.completion_mask[idx],
        loss_mask=batch.loss_mask[idx], rewards=batch.rewards[idx], group=group, truncated=batch.truncated[idx],
        prompt_width=batch.prompt_width, texts=[batch.texts[i] for i in idx.tolist()],
        prompts=[batch.prompts[i] for i in idx.tolist()], pad_id=batch.pad_id,
        extra={**batch.extra, "reward_valid": batch.extra["reward_valid"][idx]},
    )


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
        extra={**batches[0].extra, "reward_valid": cat(lambda b: b.extra["reward_valid"])},
    )
