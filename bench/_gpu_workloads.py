"""The workloads of bench/gpu_check.py: model shapes, synthetic data, the posttrain and TRL workers, FLOP counts
and the device-placement check (`off_device`, also used by tests/gpu).

Models are random-initialised from a config (no hub, no download) and saved as a normal HF folder with the
character-level ChatML tokenizer of tests/tiny.py: token ids past its ~104 entries decode to nothing, which is
fine for timing (rewards then score short texts) and keeps tokenization identical on both sides. Every row of a
workload has the same length, so neither side pads and both do the same work.

The TRL contenders are the CPU benches' own (`sft_vs_trl`, `dpo_vs_trl`, `grpo_vs_trl`: the same settings, data
order and step timer), run on the chosen device: their configs ask for `use_cpu=True`, which `_trl_on_device`
overrides, and their step timers are captured so warm-up steps can be dropped.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/ (_harness, the CPU benches) and the checkout (posttrain itself) first; tests/ (tiny.py) last
for index, extra in ((0, BENCH), (1, BENCH.parent), (None, BENCH.parent / "tests")):
    if str(extra) not in sys.path:
        sys.path.insert(len(sys.path) if index is None else index, str(extra))

import _harness as H  # noqa: E402

ALGOS = ("sft", "dpo", "grpo", "ppo")
TEMPLATE_TOKENS = 21  # ChatML around one user and one assistant turn, in tiny.py's tokenizer (1 token per char)

# HF configs of the real models (random weights); `quick` keeps the vocabulary and tying, shrinks the trunk
SHAPES = {
    "tiny": None,  # tests/tiny.py's 2-layer Llama
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                         rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6)),
}
QUICK_TRUNK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


@dataclass(frozen=True)
class Sizes:
    """Per-shape workload sizes. Steps: `warmup` untimed, then `steps` timed (online: `online_*`)."""

    sft_batch: int
    sft_len: int  # tokens per SFT row
    dpo_batch: int  # pairs per step
    dpo_prompt: int
    dpo_completion: int
    prompts: int  # GRPO prompts per step (x G completions); PPO: 2x this many prompts, one completion each
    generations: int
    new_tokens: int
    micro: int  # rows per forward/backward of the online algorithms
    warmup: int = 2
    steps: int = 4
    online_warmup: int = 1
    online_steps: int = 2
    timeout_s: int = 120  # per contender process, start-up included


SIZES = {
    "tiny": Sizes(16, 128, 8, 64, 32, 4, 8, 32, 16, steps=4, online_steps=3, timeout_s=60),
    "smollm2-135m": Sizes(16, 512, 8, 256, 128, 8, 8, 128, 32, steps=4, timeout_s=100),
    "qwen2.5-0.5b": Sizes(16, 512, 8, 256, 128, 8, 8, 128, 32, steps=4, timeout_s=150),
}
QUICK = Sizes(4, 64, 2, 24, 12, 2, 4, 8, 8, warmup=1, steps=1, online_warmup=1, online_steps=1, timeout_s=240)


def sizes_for(shape: str, quick: bool) -> Sizes:
    return QUICK if quick else SIZES[shape]


def step_counts(algo: str, s: Sizes) -> tuple[int, int]:
    return (s.online_warmup, s.online_steps) if algo in ("grpo", "ppo") else (s.warmup, s.steps)


# ---- models and data -----------------------------------------------------------------------------------------------

def build_model_dir(shape: str, path: Path, quick: bool) -> dict:
    """Random-init `shape` and save it (fp32 safetensors + tokenizer) at `path`; returns its size facts."""
    import torch
    import transformers

    from tiny import tiny_llama, tiny_tokenizer

    if SHAPES[shape] is None:
        model = tiny_llama()
    else:
        cls_name, kwargs = SHAPES[shape]
        kwargs = {**kwargs, **(QUICK_TRUNK if quick else {})}
        config = getattr(transformers, cls_name)(**kwargs, tie_word_embeddings=True, bos_token_id=2, eos_token_id=3,
                                                 pad_token_id=3)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    cfg = model.config
    return {"params": sum(p.numel() for p in model.parameters()), "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(max(1, n)))


def make_records(algo: str, s: Sizes, n_steps: int, seed: int = 0) -> list[dict]:
    """One epoch of equal-length records for `n_steps` steps of `algo`, in the formats of tests/tiny.py and the
    CPU benches (SFT messages; conversational preference pairs; arithmetic prompts with an `answer` column)."""
    rng = random.Random(seed)
    if algo == "sft":
        half = (s.sft_len - TEMPLATE_TOKENS) // 2
        return [{"messages": [{"role": "user", "content": _text(rng, half)},
                              {"role": "assistant", "content": _text(rng, s.sft_len - TEMPLATE_TOKENS - half)}]}
                for _ in range(s.sft_batch * n_steps)]
    if algo == "dpo":
        size = s.dpo_completion - TEMPLATE_TOKENS // 2
        return [{"prompt": [{"role": "user", "content": _text(rng, s.dpo_prompt - TEMPLATE_TOKENS // 2)}],
                 "chosen": [{"role": "assistant", "content": _text(rng, size)}],
                 "rejected": [{"role": "assistant", "content": _text(rng, size)}]}
                for _ in range(s.dpo_batch * n_steps)]
    from posttrain.data.tasks import make_task_records

    prompts = s.prompts if algo == "grpo" else 2 * s.prompts
    return make_task_records("arithmetic", kind="prompts", split="train", n=prompts * n_steps, seed=seed)


DATA_FILES = {"sft": "sft.jsonl", "dpo": "pairs.jsonl", "grpo": "prompts.jsonl", "ppo": "prompts.jsonl"}


def write_workload(work: Path, algo: str, s: Sizes, bf16: bool) -> None:
    """The data file and the setup/order files the reused TRL contenders read (order: as given, until the
    posttrain contender writes the order its batches visited)."""
    from posttrain.data.tasks import write_jsonl

    warm, timed = step_counts(algo, s)
    records = make_records(algo, s, warm + timed)
    write_jsonl(records, work / DATA_FILES[algo])
    H.write_setup(work, {"records": records, "bf16_fast": bf16, "trl_defaults_steps": warm + timed})
    _write_order(work, algo, list(range(len(records))))


def _write_order(work: Path, algo: str, order: list[int]) -> None:
    """WORKDIR/order.json as the reused contender reads it: a bare list (dpo_vs_trl) or {"order": [...]}."""
    (work / "order.json").write_text(json.dumps(order if algo == "dpo" else {"order": order}))


# ---- FLOPs (PaLM appendix B: 6N per trained token, 2N per forward-only token, plus attention) -----------------------

def step_flops(algo: str, m: dict, train_tokens: float, gen_tokens: float, rows: int, updates: float) -> float:
    """Model FLOPs of one step: `train_tokens` trained (prompt + completion, summed over the step's `updates`
    optimizer updates of `rows` sequences each), `gen_tokens` generated.

    SFT, DPO: 6N + 12·L·d·S per trained token (S: the mean row length; N counts the tied embedding once, as the
    LM head). The one-off DPO reference pass is in no timed step (both sides precompute it) and is not counted.
    GRPO, PPO: 2N per generated token; training runs the trunk (N minus the V·d head) on every token but the LM
    head only on completion tokens (both sides score those alone). PPO adds two forward passes (old policy,
    reference) and the critic: a trunk without LM head, one forward for the values and trained every update."""
    n, layers, d, vocab = m["params"], m["layers"], m["hidden"], m["vocab"]
    updates = max(updates, 1.0)
    attn = 12 * layers * d * train_tokens / max(rows * updates, 1)  # per token, forward + backward
    if algo in ("sft", "dpo"):
        return train_tokens * (6 * n + attn)
    head, trunk, rollout = vocab * d, n - vocab * d, train_tokens / updates
    flops = 2 * n * gen_tokens + updates * (rollout * (6 * trunk + attn) + 6 * head * gen_tokens)
    if algo == "ppo":
        forward = rollout * (2 * trunk + attn / 3)
        flops += 2 * (forward + 2 * head * gen_tokens) + forward + updates * rollout * (6 * trunk + attn)
    return flops


# ---- placement -----------------------------------------------------------------------------------------------------

def off_device(modules: dict, optimizer, device) -> list[str]:
    """Every parameter of `modules` and every state tensor of `optimizer` (None: none) not on `device`, as
    'name on cpu'. One exception: torch keeps a non-fused, non-capturable AdamW's scalar `step` on the host."""
    import torch

    device = torch.device(device)
    bad = [f"{name}.{pname} on {p.device}" for name, module in modules.items()
           for pname, p in module.named_parameters() if p.device != device]
    if optimizer is None:
        return bad
    host_step_ok = {id(p) for g in optimizer.param_groups if not (g.get("fused") or g.get("capturable"))
                    for p in g["params"]}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value) or value.device == device:
                continue
            if key == "step" and value.dim() == 0 and id(p) in host_step_ok:
                continue
            bad.append(f"optimizer state {key!r} of a {tuple(p.shape)} parameter on {value.device}")
    return bad


def frozen_modules(algo) -> dict:
    """The frozen models an algorithm holds besides `modules()` (reference, reward model), where it keeps them."""
    out = {}
    ref = getattr(getattr(algo, "reference", None), "model", None)
    if ref is not None:
        out["reference"] = ref
    if getattr(algo, "reward_model", None) is not None:
        out["reward_model"] = algo.rewards.scalar_model
    return out


# ---- posttrain contender -------------------------------------------------------------------------------------------

ALGO_CLASSES = {"sft": ("posttrain.train.sft", "SFT"), "dpo": ("posttrain.train.dpo", "DPO"),
                "grpo": ("posttrain.train.grpo", "GRPO"), "ppo": ("posttrain.train.ppo", "PPO")}


def posttrain_overrides(algo: str, s: Sizes, args) -> list[str]:
    """The run's config overrides: the TRL contenders' sizes and settings, on `args.device`."""
    warm, timed = step_counts(algo, s)
    common = [f"train.device={args.device}", f"model.autocast={'bf16' if args.precision == 'bf16' else 'none'}",
              "train.tensorboard=false", "train.progress=false", "data.eval_fraction=0", f"train.max_steps={warm + timed}",
              f"train.num_threads={args.threads}", "data.max_length=2048", "data.max_prompt_length=1024",
              f"model.compile={getattr(args, 'compile', 'off')}"]  # off: no torch.compile on either side
    per_algo = {
        "sft": [f"train.batch_size={s.sft_batch}", "train.lr=1e-5"],
        "dpo": [f"train.batch_size={s.dpo_batch}", "train.lr=1e-5", "algo.beta=0.1"],
        # every row trained (no skipping of advantage-0 rows), so both sides do the same work
        "grpo": [f"train.batch_size={s.micro}", "train.lr=1e-6", "algo.reward.functions=[numeric]", "algo.kl.beta=0.0",
                 f"algo.sampling.prompts_per_step={s.prompts}", f"algo.sampling.num_generations={s.generations}",
                 f"algo.sampling.max_new_tokens={s.new_tokens}", "algo.sampling.temperature=1.0", "algo.skip_inert_rows=false"],
        "ppo": [f"train.batch_size={s.micro}", "train.lr=1e-6", "algo.reward.functions=[numeric]",
                f"algo.sampling.prompts_per_step={2 * s.prompts}", f"algo.sampling.max_new_tokens={s.new_tokens}"],
    }
    return common + per_algo[algo]


def run_posttrain(args, work: Path) -> dict:
    """Train `args.workload` on the one loop, check placement, and report the timed steps."""
    import importlib

    from posttrain.config import load_config
    from posttrain.devices import resolve
    from posttrain.train import common
    from posttrain.train.loop import Trainer

    s = sizes_for(args.shape, bool(args.quick))
    module, cls = ALGO_CLASSES[args.workload]
    algo_cls = getattr(importlib.import_module(module), cls)  # importing registers the algo config
    run_dir = work / "posttrain-run"
    flags = {"model.name_or_path": args.model_dir, "data.path": str(work / DATA_FILES[args.workload]),
             "train.output_dir": str(run_dir)}
    cfg = load_config(args.workload, None, posttrain_overrides(args.workload, s, args), flags)
    common.setup_run(cfg)
    algo = algo_cls(cfg)
    visited = H.record_visits(algo.order)
    trainer = Trainer(algo, cfg.train)
    H.no_saving(trainer, algo)
    trainer.fit()
    device = resolve(cfg.train.device)
    _write_order(work, args.workload, visited)
    frozen = {} if cfg.model.offload_frozen else frozen_modules(algo)  # offloaded ones wait on the host by design
    bad = off_device(algo.modules(), trainer.optimizer, device) + off_device(frozen, None, device)
    rows = H.metrics_rows(run_dir)
    warm, _ = step_counts(args.workload, s)
    timed = rows[warm:]
    per_step = _online_rows(args.workload, s)
    result = {
        "step_s": [r["step_time_s"] for r in timed], "losses": [r["loss"] for r in rows],
        "train_tokens": [r["tokens_per_s"] * r["step_time_s"] for r in timed],
        "gen_tokens": [r.get("completions/mean_length", 0.0) * per_step for r in timed],
        "gen_s": [r.get("timing/generate_s", 0.0) for r in timed],
        "completions": per_step, "rows": _rows_per_update(args.workload, s), "updates": [r.get("updates", 1.0) for r in timed],
        "placement": bad, "device": str(device), "params": sum(p.numel() for p in algo.model.parameters()),
        "settings": f"autocast={args.precision}, device={device}, optimizer fused={trainer.optimizer.param_groups[0].get('fused')}",
        "posttrain_metrics": {k: max(r.get(k, 0.0) for r in rows) for k in
                              ("peak_mem_gb", "mem/gpu_peak_allocated_gb", "mem/host_peak_rss_gb") if any(k in r for r in rows)},
    }
    return {**result, **_device_memory(device)}


def _online_rows(algo: str, s: Sizes) -> int:
    return {"grpo": s.prompts * s.generations, "ppo": 2 * s.prompts}.get(algo, 0)


def _device_memory(device) -> dict:
    """This process's peak GPU memory (the caching allocator's high mark of allocated tensors) and host RSS:
    measured the same way for every contender."""
    import torch

    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None
    return {"gpu_peak_gb": gpu, "host_rss_gb": H.peak_rss_gb()}


# ---- TRL contender -------------------------------------------------------------------------------------------------

def trl_has(algo: str) -> str | None:
    """Why TRL cannot run `algo` here (None: it can); imports trl only to look for a PPOTrainer."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return "trl is not importable here"
    if algo == "ppo":
        import trl

        if not hasattr(trl, "PPOTrainer"):
            return f"TRL {trl.__version__} has no PPOTrainer (removed from trl)"
        return "TRL's PPOTrainer is not wired into this check"
    return None


def _trl_on_device(trl, on_cpu: bool) -> None:
    """The reused CPU benches build their configs with use_cpu=True; on a GPU that must be False."""
    for name in ("SFTConfig", "DPOConfig", "GRPOConfig"):
        base = getattr(trl, name)

        def post_init(self, _base=base):
            self.use_cpu = on_cpu
            _base.__post_init__(self)

        setattr(trl, name, type(name, (base,), {"__post_init__": post_init}))


def _capture_step_timers() -> list:
    """Make H.trl_step_timer hand out timers that are kept here and that also keep what the trainer passes its
    callbacks at the end of training (model, optimizer), for the placement check."""
    made, original = [], H.trl_step_timer

    def capturing():
        timer = original()

        def on_train_end(_args, _state, _control, **kwargs):
            timer.ended = kwargs

        timer.on_train_end, timer.ended = on_train_end, {}
        made.append(timer)
        return timer

    H.trl_step_timer = capturing
    return made


def trl_namespace(algo: str, s: Sizes, args) -> argparse.Namespace:
    """The arguments the CPU benches' `run_trl` reads, set to this workload's sizes."""
    warm, timed = step_counts(algo, s)
    base = dict(model=args.model_dir, steps=warm + timed, threads=args.threads, trl_attn="sdpa", trl_defaults_steps=warm + timed)
    if algo == "sft":
        return argparse.Namespace(**base, batch_size=s.sft_batch, lr=1e-5)
    if algo == "dpo":
        return argparse.Namespace(**base, batch_size=s.dpo_batch, lr=1e-5, beta=0.1, precision=args.precision)
    return argparse.Namespace(**base, prompts_per_step=s.prompts, num_generations=s.generations, max_new_tokens=s.new_tokens,
                              temperature=1.0, micro_batch=s.micro, lr=1e-6, kl_beta=0.04)


def run_trl(args, work: Path) -> dict:
    """TRL's trainer for `args.workload` through the CPU bench's contender, on `args.device`."""
    import torch

    trl = H.require_trl()
    import dpo_vs_trl
    import grpo_vs_trl
    import sft_vs_trl

    device = torch.device("cuda", 0) if args.device.startswith("cuda") else torch.device("cpu")
    _trl_on_device(trl, device.type == "cpu")
    if device.type == "cuda":  # what posttrain's devices.prepare turns on, so fp32 matmuls run alike on both sides
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    timers = _capture_step_timers()
    s = sizes_for(args.shape, bool(args.quick))
    ns, algo = trl_namespace(args.workload, s, args), args.workload
    if algo == "sft":
        r = sft_vs_trl.run_trl(ns, work, "best")
        lengths, bs = r["trl_lengths"], s.sft_batch
        tokens = [sum(lengths[i : i + bs]) for i in range(0, len(lengths), bs)]
    elif algo == "dpo":
        r = dpo_vs_trl.run_trl(ns, work, "trl-precompute")
        tokens = [r["trl_tokens"] / ns.steps] * ns.steps  # equal-length pairs: the same count every step
    else:
        r = grpo_vs_trl.run_trl(ns, work, "best", False)
        tokens = r["train_tokens"]
    warm, _ = step_counts(algo, s)
    step_s = timers[0].step_s if timers else r["step_s"]
    ended = timers[0].ended if timers else {}
    placement = off_device({"policy": ended["model"]}, ended["optimizer"], device) if "optimizer" in ended else \
        ["the trainer's model and optimizer were not seen"]
    return {
        "step_s": step_s[warm:], "losses": [log["loss"] for log in timers[0].logs] if timers else [], "train_tokens": tokens[warm:],
        "gen_tokens": r.get("completion_tokens", [0.0] * len(step_s))[warm:], "gen_s": r.get("gen_s", [])[warm:],
        "completions": _online_rows(algo, s),
        "rows": _rows_per_update(algo, s), "updates": [1.0] * len(step_s[warm:]), "placement": placement,
        "device": str(device), "params": sum(p.numel() for p in ended["model"].parameters()) if "model" in ended else None,
        "settings": f"TRL {trl.__version__}: {r.get('settings', 'precompute_ref_log_probs=True, ckpt=off')}"
                    f"{', TF32 on' if device.type == 'cuda' else ''}",
        **_device_memory(device),
    }


def _rows_per_update(algo: str, s: Sizes) -> int:
    """Sequences in one optimizer update (a DPO pair is two)."""
    return {"sft": s.sft_batch, "dpo": 2 * s.dpo_batch}.get(algo) or _online_rows(algo, s)
