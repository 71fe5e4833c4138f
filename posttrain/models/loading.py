"""Loading causal LMs and reward models (local folder, hub id, GGUF file, the bundled SmolLM2), dtype and LoRA."""

from __future__ import annotations

import contextlib
from pathlib import Path

from posttrain.config import BUNDLED_ALIASES, LoraConfig, ModelConfig


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16"}


def resolve_model_path(name_or_path: str) -> str:
    """A path or hub id that `from_pretrained` understands; GGUF files are converted once into the cache. A name
    that is neither (no such path, not shaped like a hub id) is a FileNotFoundError naming it: transformers would
    say "Repo id must be in the form ..." about a mistyped folder."""
    from posttrain.config_rules import model_path_problem
    from posttrain.models import bundled

    if name_or_path.lower() in BUNDLED_ALIASES:
        return str(bundled.ensure_bundled_model())
    problem = model_path_problem(name_or_path)
    if problem is not None:
        raise FileNotFoundError(f"model {name_or_path!r}: {problem}")
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        out = gguf_cache_dir(path)
        if not (out / "config.json").exists():
            bundled.convert_gguf(path, out)
        return str(out)
    return name_or_path


def gguf_cache_dir(path: str | Path) -> Path:
    """The folder a GGUF file is converted into: `$POSTTRAIN_HOME/models/<stem>-<digest>`.

    The digest is sha256 of the resolved path, size and mtime: the same in every process (str hashes are
    salted per process, so ranks and reruns would each convert into their own folder), and a new one when the
    file at that path is replaced.
    """
    import hashlib

    from posttrain.models import bundled

    path, resolved = Path(path), Path(path).resolve()
    stat = resolved.stat()
    key = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    return bundled.posttrain_home() / "models" / f"{path.stem}-{hashlib.sha256(key).hexdigest()[:16]}"


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPES[name])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def load_tokenizer(path: str, chat_template: str | None = None):
    """Tokenizer with a pad token (EOS when it has none: masks never rely on the pad id) and a chat template."""
    from transformers import AutoTokenizer

    from posttrain.data.chat import ensure_chat_template

    try:  # the first file read from a model: a hub id that is not there (or offline) fails here
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:  # transformers' text spans lines and names no key: one line, the model named
        raise FileNotFoundError(f"model {path!r}: cannot load its tokenizer: {' '.join(str(exc).split())}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer, chat_template)
    return tokenizer


def apply_lora(model, lora: LoraConfig):
    """Wrap the model with a fresh LoRA adapter, created on the model's device; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from posttrain.devices import module_device

    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with module_device(model):
        return get_peft_model(model, peft_cfg)


def _placed(device):
    """Construction on `device`: every tensor made while loading (weights, buffers, a LoRA adapter, a new head)
    goes there, whatever torch's default device is."""
    import torch

    return torch.device(device if device is not None else "cpu")


def load_causal_lm(cfg: ModelConfig, path: str | None = None, trainable: bool = True, device=None):
    """The policy (trainable, LoRA if configured) on `device`, or a frozen copy (trainable=False: eval mode, no
    grads, in `model.frozen_dtype` when set). `device` None means the CPU."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg.name_or_path)
    dtype = cfg.dtype if trainable or not cfg.frozen_dtype else cfg.frozen_dtype
    with _placed(device) as where:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), device_map={"": str(where)})
        if cfg.gradient_checkpointing and trainable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if trainable and cfg.lora.enabled:
            model = apply_lora(model, cfg.lora)
    if trainable:
        from posttrain.models.compiled import compile_decoder

        compile_decoder(model, cfg.compile, _placed(device).type)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def load_frozen_lm(cfg: ModelConfig, path: str, device):
    """A frozen causal LM (a reference): on `device`, or on the CPU when `model.offload_frozen` (then moved to the
    device only for its forward passes, `frozen_on`)."""
    return load_causal_lm(cfg, path, trainable=False, device="cpu" if cfg.offload_frozen else device)


def load_reward_model(path: str, dtype: str = "fp32", pad_token_id: int | None = None, trainable: bool = True,
                      device=None):
    """A sequence classifier with one output (the Bradley–Terry score) on `device` (None: the CPU); a causal LM
    checkpoint gets a new head when trainable, and is refused when frozen."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(path)
    architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    if not trainable and not any(a.endswith("ForSequenceClassification") for a in architectures):
        # from_pretrained would give it a new random head: a reward of noise, with no error
        raise ValueError(f"{path} holds {architectures or 'no architecture'}, not a reward model with a score head; "
                         "train one with `posttrain rm` (an online run can score a DPO model with algo.reward_model_kind=implicit)")
    with _placed(device) as where:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype(dtype),
                                                                   device_map={"": str(where)})
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if not trainable:
        model.eval().requires_grad_(False)
    return model


@contextlib.contextmanager
def frozen_on(model, device):
    """`model` on `device` for the duration: a frozen model offloaded to the CPU between uses is moved there and
    back (`model.offload_frozen`); one already there is left alone. Yields the model."""
    import torch

    from posttrain.devices import module_device

    if model is None:
        yield None
        return
    home = module_device(model)
    moved = device is not None and home != torch.device(device)
    if moved:
        model.to(device)
    try:
        yield model
    finally:
        if moved:
            model.to(home)


def load_inference_lm(path: str, device):
    """A saved causal LM in its own dtype, in eval mode, built on `device` (evaluation and studies of a finished
    run: no config of ours applies)."""
    from transformers import AutoModelForCausalLM

    with _placed(device) as where:
        return AutoModelForCausalLM.from_pretrained(path, device_map={"": str(where)}).eval()


_FAST_BF16: dict[str, bool] = {}


def bf16_is_fast(device_type: str = "cpu") -> bool:
    """Whether bf16 matmuls beat fp32 here. On a CUDA GPU with bf16 support (Ampere and later) they do; on a CPU only with AVX-512/AMX bf16 support —
    on an AVX2-only CPU PyTorch's bf16 matmul is an emulation measured ~25x slower than fp32. Decided once per
    process by timing a small matmul both ways."""
    import time

    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type not in _FAST_BF16:
        if "AVX512" not in torch.backends.cpu.get_cpu_capability():  # no native bf16 below AVX-512: never fast
            _FAST_BF16[device_type] = False
            return False
        # a layer-sized product: at 128x256x256 AMX's bf16 lead over fp32 is ~1.2x, inside the noise, so the
        # verdict flipped between processes; at 256x512x512 it is ~3x (and an AVX-512 emulation is far slower)
        a, b = torch.randn(256, 512), torch.randn(512, 512)

        def best(dtype):  # the fastest of several runs: robust to another process taking the core for a moment
            x, y = a.to(dtype), b.to(dtype)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                x @ y
                times.append(time.perf_counter() - start)
            return min(times)

        _FAST_BF16[device_type] = best(torch.bfloat16) * 1.2 < best(torch.float32)
    return _FAST_BF16[device_type]


def wants_bf16(cfg: ModelConfig, device_type: str) -> bool:
    """bf16 autocast for fp32 weights: `bf16` always, `auto` where bf16 is fast on this hardware, `none` never."""
    if cfg.dtype not in ("fp32", "float32") or cfg.autocast in ("none", "fp32", "off"):
        return False
    if cfg.autocast in ("bf16", "bfloat16"):
        return True
    if cfg.autocast == "auto":
        return bf16_is_fast(device_type)
    raise ValueError(f"model.autocast must be auto, bf16 or none; got {cfg.autocast!r}")


def autocast_context(cfg: ModelConfig, device_type: str):
    """bf16 autocast per `wants_bf16` (the README's bf16 section has the measured speed-up)."""
    return bf16_autocast(device_type) if wants_bf16(cfg, device_type) else contextlib.nullcontext()


@contextlib.contextmanager
def bf16_autocast(device_type: str = "cpu"):
    """bf16 autocast; on a CPU also PyTorch's math SDPA backend instead of its fused CPU flash kernel.

    Why: in bf16 the CPU flash-attention kernel's backward is the slowest op of a SmolLM2 train step, several
    times slower than the math backend for these short sequences (figures in the README's bf16 section). The math
    backend computes the same function, with `_safe_softmax` giving fully masked rows zeros. The backend is
    chosen in forward; backward follows the graph forward built.
    """
    import torch

    with torch.autocast(device_type, dtype=torch.bfloat16):
        if device_type != "cpu":
            yield
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model under a LoRA policy: the reference without a second copy in memory."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ValueError("model has no LoRA adapter to switch off")
    with disable():
        yield model


def export_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = True, state_dict: dict | None = None) -> Path:
    """A Hugging Face checkpoint (safetensors + tokenizer) that transformers loads with no posttrain import.
    `state_dict`: the whole weights when `model` holds only a shard of them (train/sharding.py)."""
    out_dir = Path(out_dir)
    if merge_lora and hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def disable_dropout(model) -> None:
    """Dropout off (p = 0): with it the policy differs from its reference at step 0 (TRL does the same)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
