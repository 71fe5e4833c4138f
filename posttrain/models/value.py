"""The PPO critic: a decoder with a scalar value head at every token — its own copy of a decoder, or the
policy's decoder itself (`critic_from_causal_lm(policy)`, the memory-light option)."""

from __future__ import annotations

import torch
from torch import nn

from posttrain.ops import position_ids_from_mask


class ValueModel(nn.Module):
    """V(s_t) for every position: decoder hidden states (B, T, H) -> values (B, T) in fp32."""

    def __init__(self, decoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.decoder, self.head = decoder, head

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        hidden = self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def critic_from_reward_model(reward_model) -> ValueModel:
    """Initialised from a trained reward model: its decoder and its score head (a common, strong start)."""
    inner = reward_model.get_base_model() if hasattr(reward_model, "get_base_model") else reward_model
    return ValueModel(getattr(inner, inner.base_model_prefix), inner.score)


def critic_from_causal_lm(model) -> ValueModel:
    """A zero head (values start at 0) on `model`'s decoder: a copy of the policy's, or the policy itself — then
    no second model is in memory and the value loss trains the head and, through the shared trunk (LoRA layers
    included), the policy's trainable weights (the shared-trunk design of Ziegler et al. 2019)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, inner.base_model_prefix)
    weight = next(decoder.parameters())
    head = nn.Linear(inner.config.hidden_size, 1, bias=True, dtype=weight.dtype, device=weight.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return ValueModel(decoder, head)

