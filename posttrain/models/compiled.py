"""Regional compilation of a decoder: each decoder layer's forward through `torch.compile`, not the whole model.

The layers of a decoder share their code, so dynamo traces one layer and reuses the graph for all of them
(parameters are graph inputs): compile time is that of one layer, not of 30, and the state dict's keys are
unchanged (`nn.Module.compile` compiles in place), so checkpoints and exports are the same as uncompiled ones.
Shapes are dynamic (`dynamic=True`): sequence lengths change every step and must not recompile.
Inductor fuses RMSNorm, RoPE and SiLU-times-gate into single kernels; on a GPU that removes most of the
elementwise launches and memory round-trips of a small model's step.

`model.compile`: on | off | auto. `auto` compiles on CUDA (where triton is installed) and not on a CPU, from a measurement on the 2-core
dev box (SmolLM2-135M, SFT step of 8 x ~110 tokens, bf16 autocast): 30.6 s of compilation for a steady step of
2.67 s against 2.68 s eager, i.e. no gain to amortise (the CPU step is matmul-bound; `bench/compile_step.py`
measures it again on any machine).
"""

from __future__ import annotations

import torch

COMPILE_SETTINGS = ("auto", "on", "off")


def wants_compile(setting: str, device_type: str) -> bool:
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"model.compile must be one of {COMPILE_SETTINGS}, got {setting!r}")
    if setting == "auto" and device_type == "cuda":
        import importlib.util

        return importlib.util.find_spec("triton") is not None  # inductor's GPU code generator
    return setting == "on"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers decoder (`model.model.layers`, GPT-2's `transformer.h`, under a
    PEFT wrapper too); empty when the layout is unknown."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, getattr(inner, "base_model_prefix", "model"), inner)
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def compile_decoder(model, setting: str, device_type: str) -> int:
    """Compile each decoder layer in place when `setting` asks for it on `device_type`; the number compiled."""
    if not wants_compile(setting, device_type):
        return 0
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"model.compile={setting}: no decoder layers found in {type(model).__name__}")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
