"""The vLLM rollout engine (CUDA GPU only), colocated with the trainer in the same process.

Not run by the test suite: it needs vLLM and a GPU. Written against vLLM's documented offline API
(`vllm.LLM`, `LLM.generate` with `{"prompt_token_ids": ...}` prompts, `SamplingParams`, `LLM.apply_model`,
`LLM.reset_prefix_cache`) and its `logprobs_mode` engine option (vLLM >= 0.10.2).

Differences from the HF engine, stated rather than hidden:
- log-probs come from vLLM's sampler with `logprobs_mode="processed_logprobs"`: after temperature AND after
  top-k/top-p, renormalized over the kept tokens. They equal the HF engine's (full distribution at the sampling
  temperature, what the trainer recomputes; PITFALLS #11) only when top_k = 0 and top_p = 1. With filters on,
  recompute old log-probs with the trainer rather than trusting these.
- samples are reproducible for a given seed within vLLM, not identical to the HF engine's samples.
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
            "the 'vllm' rollout engine needs vLLM on a CUDA GPU: pip install 'posttrain[vllm]'. "
            "Without a GPU use the 'hf' engine (posttrain.rollout.hf.HFGenerator)."
        ) from err
    return vllm


@register_generator("vllm")
class VLLMGenerator:
    """Generator backed by `vllm.LLM`, following `posttrain.rollout.base.Generator`.

    model_path: a Hugging Face checkpoint directory or hub id with the policy's architecture.
    pad_token_id: fills prompt and completion padding of the returned Rollout.
    gpu_memory_utilization: the fraction of GPU memory vLLM may take; keep room for the colocated trainer.
    llm_kwargs: passed to `vllm.LLM` (e.g. dtype, max_model_len, enable_sleep_mode).
    """

    def __init__(self, model_path: str, pad_token_id: int, gpu_memory_utilization: float = 0.3, **llm_kwargs):
        vllm = _import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("the 'vllm' rollout engine needs a CUDA GPU; none is visible. Use the 'hf' engine.")
        # engine core in this process, so sync_weights hands tensors to the model without pickling them
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm
        self.pad_token_id = int(pad_token_id)
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = vllm.LLM(model=str(model_path), gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)

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
            logprobs[i, :n] = torch.tensor([lp[t].logprob for t, lp in zip(ids, c.logprobs)], dtype=torch.float32)
        truncated = torch.tensor([c.finish_reason == "length" for _, c in rows])
        device = torch.device("cuda", torch.cuda.current_device())
        rollout = Rollout(
            prompt_ids=prompt, prompt_mask=prompt_mask, completion_ids=completion, completion_mask=completion_mask,
            logprobs=logprobs, truncated=truncated, group=torch.arange(num_prompts).repeat_interleave(G),
            texts=[c.text for _, c in rows],
        )
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "truncated"):
            setattr(rollout, name, getattr(rollout, name).to(device))
        rollout.group = rollout.group.to(device)
        return rollout

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into the vLLM model, then drop vLLM's prefix cache.

        Uses `LLM.apply_model`, which runs a function on the model inside each worker; vLLM models take
        `load_weights(iterable of (HF name, tensor))`. A PEFT model's adapter is merged for the copy and unmerged
        after, and its names are mapped back to the base model's. The prefix cache holds keys/values computed
        with the old weights, so it must be reset or later prompts would reuse them.
        """
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            weights = [(_base_name(name), t) for name, t in model.state_dict().items() if "lora_" not in name]
            self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights=weights))
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()


def _base_name(name: str) -> str:
    """A PEFT parameter name -> the base model's ('base_model.model.x.base_layer.weight' -> 'x.weight')."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")
