"""Decode-time linear layers through oneDNN's prepacked weight layout, on the CPU.

A decode step multiplies a handful of rows by every weight matrix of the model: small-M GEMMs, where the time goes
into re-reading and re-blocking the weights, not into arithmetic. `torch.nn.functional.linear` hands oneDNN (or
MKL) the plain row-major weight at every call; `torch.ops.mkldnn._reorder_linear_weight` lays a weight out once
in the blocked format the GEMM kernel reads directly (what inductor's weight freezing does on the CPU). Measured on
a 2-core AVX-512-BF16 CPU, bf16, 16 rows: a 576 x 1536 weight in 118 us instead of 166 us, the 49,152-token head
in 3.4 ms instead of 6.9 ms; a SmolLM2-135M decode step of 16 rows 1.27-1.53x faster in bf16, 1.68x in fp32
(`python bench/decode_step.py`).

The numerics: in bf16 the packed product equals `F.linear`'s bit for bit (tests/unit/test_packed_linear.py); in
fp32 oneDNN's blocking sums in another order (differences ~1e-6 relative). Under bf16 autocast an fp32 model's
linears get exactly what autocast gives them: the input cast to bf16, a bf16 product, a bf16 output.

`PackedWeights` keeps the packed copies between decode calls (an evaluation's batches pack once) and re-packs a
weight when its `_version` moved (an optimizer step, a weight load). The copies are one more set of the linear
weights in the compute dtype, the set autocast's weight cache would hold anyway; `clear()` frees them (the HF
engine does at `sleep()`, after a training step's sampling).
"""

from __future__ import annotations

import contextlib

import torch


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a decode on `device` in `dtype` can use packed weights: the CPU, oneDNN built in, fp32 or bf16 (bf16
    only where the CPU has native bf16 instructions)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedWeights:
    """Packed copies of a model's `nn.Linear` weights (and biases) in one compute dtype, kept up to date."""

    def __init__(self):
        self._packed: dict[int, tuple] = {}  # id(module) -> (weight, its version, dtype, packed weight, bias)
        self.packs = 0  # weights packed so far (a test and the bench read it)

    def clear(self) -> bool:
        had = bool(self._packed)
        self._packed = {}
        return had

    def get(self, module: torch.nn.Linear, dtype: torch.dtype, rows_hint: int):
        weight = module.weight
        entry = self._packed.get(id(module))
        if entry is not None and entry[0] is weight and entry[1] == weight._version and entry[2] == dtype:
            return entry[3], entry[4]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), rows_hint)
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        self._packed[id(module)] = (weight, weight._version, dtype, packed, bias)
        self.packs += 1
        return packed, bias


def plain_linears(model) -> list[torch.nn.Linear]:
    """The model's linear layers that are exactly `nn.Linear` with a floating-point weight: subclasses (quantized
    layers, LoRA's wrappers) keep their own forward; LoRA's inner `lora_A`/`lora_B` and base layers are plain."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.is_floating_point()
            and type(m.weight.data) is torch.Tensor]  # not a sharded (DTensor) weight


@contextlib.contextmanager
def packed_linears(model, cache: PackedWeights, dtype: torch.dtype, rows_hint: int = 16):
    """Within the block every plain linear layer of `model` computes `x @ W.T + b` from its packed weight in
    `dtype` (the input cast to it, the output in it). Inference only: the packed product has no autograd."""
    layers = plain_linears(model)
    for layer in layers:
        weight, bias = cache.get(layer, dtype, rows_hint)
        layer.forward = _packed_forward(weight, bias, dtype)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "none", [], "")

    return forward
