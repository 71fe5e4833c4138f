"""Small containers that move between stages. Tensors keep their shapes documented per field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.ops import IGNORE_INDEX


@dataclass
class LossOutput:
    """What a loss or a step function returns: a scalar to backpropagate and metrics to log (floats or 0-d tensors)."""

    loss: Any
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """Sampled completions for a batch of prompts, as a generator returns them.

    prompt_ids (N, P) left-padded, prompt_mask (N, P); completion_ids (N, C) right-padded, completion_mask (N, C)
    marks real completion tokens (the first EOS included, padding after it excluded); logprobs (N, C) of the
    sampling policy at its temperature; truncated (N,) True where the length limit was hit before EOS.
    group (N,) the index of the prompt each row was sampled from.
    policy_mask (N, C): in a multi-turn rollout (`posttrain/envs/`), 1 on the tokens the policy sampled and 0 on
    the environment's tokens between its turns (completion_mask covers both); None: every completion token is the
    policy's. info: what a multi-turn rollout adds (env_reward, transcripts, metrics).
    """

    prompt_ids: Any
    prompt_mask: Any
    completion_ids: Any
    completion_mask: Any
    logprobs: Any
    truncated: Any
    group: Any
    texts: list[str] = field(default_factory=list)
    policy_mask: Any = None
    info: dict = field(default_factory=dict)


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

    def forward_tokens(self, share_prompt: bool, rows: torch.Tensor | None = None) -> int:
        """Tokens a forward pass over `rows` (default all) processes: each group's prompt once when shared."""
        rows = torch.arange(self.num_rows, device=self.input_ids.device) if rows is None else rows
        if not share_prompt:
            return int(self.attention_mask[rows].sum())
        prompt_lengths = self.attention_mask[rows, : self.prompt_width].sum(-1)
        per_group = prompt_lengths.new_zeros(int(self.group.max()) + 1).scatter(0, self.group[rows], prompt_lengths)
        return int(per_group.sum()) + int(self.completion_mask[rows].sum())
