"""A KV cache allocated once per decode, for the HF engine.

transformers' `DynamicCache` grows each layer's keys and values by `torch.cat` at every decode step: the whole
cache is copied once per token, per layer (measured on SmolLM2-135M, 16 rows, fp32: 14 % of a decode step).
Here each layer's buffer of (rows, kv heads, capacity, head dim) is allocated at the prefill, with
capacity = prompt width + max_new_tokens; a step writes one position in place and attention reads a view of
the filled part, so no step copies the cache. Rows that finish leave the batch (`batch_select_indices`), and the
filled part of the survivors is copied once, as `DynamicCache` does.

The attention sees exactly the keys and values `DynamicCache` would give it (the same tensors, without the
copies; under autocast already in the precision the attention casts them to), so the logits are identical
(tests/unit/test_rollout_hf.py).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One decoder layer's keys and values in a buffer of `capacity` positions; `keys`/`values` are views of the
    first `length` of them."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = _stored_dtype(key_states), key_states.device
        B, H, _, Dk = key_states.shape
        self._keys = key_states.new_empty((B, H, self.capacity, Dk), dtype=self.dtype)
        self._values = value_states.new_empty((B, H, self.capacity, value_states.shape[-1]), dtype=self.dtype)
        self.length = 0
        self.is_initialized = True

    def _views(self):
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]
        return self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {n} positions > capacity {self.capacity}")
        self._keys[:, :, self.length : self.length + n] = key_states
        self._values[:, :, self.length : self.length + n] = value_states
        self.length += n
        return self._views()

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def _rebuild(self, rows_of) -> None:
        """New buffers whose filled part is `rows_of(old filled part)`."""
        if not self.is_initialized:
            return
        keys, values = rows_of(self._keys[:, :, : self.length]), rows_of(self._values[:, :, : self.length])
        self._keys = keys.new_empty((keys.shape[0], keys.shape[1], self.capacity, keys.shape[-1]))
        self._values = values.new_empty((values.shape[0], values.shape[1], self.capacity, values.shape[-1]))
        self._keys[:, :, : self.length], self._values[:, :, : self.length] = keys, values
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(lambda x: x.index_select(0, indices))

    def reserve(self, capacity: int) -> None:
        """At least `capacity` positions (a multi-turn session's next turn): the filled part copied once if it grows."""
        if capacity > self.capacity:
            self.capacity = int(capacity)
            self._rebuild(lambda x: x)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a preallocated decode cache is never cropped")

    def reset(self) -> None:
        self._keys = self._values = self.keys = self.values = None
        self.length = 0
        self.is_initialized = False


def _stored_dtype(states: torch.Tensor) -> torch.dtype:
    """The dtype the cache stores: under autocast the lower precision the attention computes in. A Llama's keys
    leave RoPE in fp32 (its cos/sin follow the fp32 residual stream) while its values are bf16, so autocast would
    cast every cached key to bf16 again at every step (11 % of a decode step, measured); cast once when stored,
    the attention gets the same bf16 keys."""
    device = states.device.type
    if states.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return states.dtype


class PreallocatedCache(DynamicCache):
    """A `DynamicCache` whose layers are `PreallocatedLayer`s of `capacity` positions."""

    def __init__(self, num_layers: int, capacity: int):
        Cache.__init__(self, layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])

    def reserve(self, capacity: int) -> None:
        for layer in self.layers:
            layer.reserve(capacity)


def decode_cache(model, capacity: int):
    """The cache for one decode of at most `capacity` positions: preallocated when every layer of the model is
    full attention (a plain decoder), else transformers' own `DynamicCache` for its config (sliding windows,
    linear attention and the like keep their own layer types)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if config is not None else None
    layer_types = getattr(text, "layer_types", None)
    num_layers = getattr(text, "num_hidden_layers", None)
    if layer_types is not None:
        plain = set(layer_types) <= {"full_attention"}
    else:
        plain = not getattr(text, "sliding_window", None)
    if plain and num_layers is not None:
        return PreallocatedCache(num_layers, capacity)
    return DynamicCache(config=config)
