"""Small containers that move between stages. Tensors keep their shapes documented per field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    """

    prompt_ids: Any
    prompt_mask: Any
    completion_ids: Any
    completion_mask: Any
    logprobs: Any
    truncated: Any
    group: Any
    texts: list[str] = field(default_factory=list)
