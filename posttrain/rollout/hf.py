"""The Hugging Face rollout engine: our own decode loop over a `transformers` causal LM.

Why not `model.generate`: we need the log-prob of every sampled token under exactly the distribution the trainer
recomputes, positions that are right under left padding, and the prompt encoded once per group.

- Prompts are left-padded; position ids are `cumsum(mask) - 1` and are passed explicitly at every step, so models
  with absolute positions (GPT-2) see the same positions as for an unpadded prompt (the default positions
  0..P-1 would start a left-padded row's first real token at its pad count).
- Prefix sharing: the distinct prompts of a chunk are encoded once, then the KV cache and the last-position
  logits are repeated G times along the batch dimension (`batch_repeat_interleave`); all N*G rows are decoded
  together. Rows that stop are dropped from the batch (`batch_select_indices`). The cache is allocated once per
  chunk (`rollout/kv_cache.py`): no step copies it.
- Sampling (`rollout/sampling.py`): logits / temperature, top-k, top-p, an inverse-CDF draw with a
  `torch.Generator` seeded per call; the log-prob returned is that of the full distribution at temperature T.
- Under bf16 autocast each fp32 weight is cast once per call, not once per decode step (`_cast_weights_once`).
- On the CPU the linear layers run from weights prepacked once for oneDNN (`rollout/packed_linear.py`).

Shapes: B prompts in a chunk, G samples per prompt, R = B*G rows, P prompt length, C completion length, V vocab.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from posttrain.host_memory import tune_host_allocator
from posttrain.ops import position_ids_from_mask
from posttrain.rollout.base import EngineContext, MemoryHooks, SamplingParams, register_generator, validate_prompts
from posttrain.rollout.kv_cache import decode_cache
from posttrain.rollout.packed_linear import PackedWeights, packed_linears, packing_available
from posttrain.rollout.sampling import sample_next
from posttrain.types import Rollout


def left_pad(prompt_ids: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, P), mask (B, P)) on `device` (default: the CPU), real tokens flush right so every
    row's next token is at -1. Built on the host, then copied once."""
    P = max(len(p) for p in prompt_ids)
    host = {"dtype": torch.long, "device": "cpu"}
    ids = torch.full((len(prompt_ids), P), pad_token_id, **host)
    mask = torch.zeros((len(prompt_ids), P), **host)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p) :] = torch.as_tensor(p, **host)
        mask[i, P - len(p) :] = 1
    device = device if device is not None else "cpu"
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


class StopStringMatcher:
    """Whether each row's completion so far contains a stop string, on decoded text.

    Only the last `window` tokens are decoded: a byte-level token carries at least one byte, so a stop string of
    L UTF-8 bytes lies within its last L tokens; 4 more tokens keep it away from the window's first token, whose
    decoding may lose a leading space or half a character. A row is checked every step and stops at its first
    hit, so any hit was completed by the newest token.
    """

    def __init__(self, tokenizer, stop_strings):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.window = max(len(s.encode("utf-8")) for s in self.stop_strings) + 4

    def __call__(self, completion: torch.Tensor) -> torch.Tensor:
        """completion (R, t) token ids -> (R,) bool."""
        texts = self.tokenizer.batch_decode(completion[:, -self.window :].tolist(), skip_special_tokens=False)
        hits = [any(s in text for s in self.stop_strings) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=completion.device)


@register_generator("hf")
class HFGenerator(MemoryHooks):
    """Generator over a `transformers` causal LM (any dtype), following `posttrain.rollout.base.Generator`.

    model: the policy; put in eval mode for the call (dropout off), its train/eval mode restored afterwards.
    pad_token_id: fills left padding of prompts and completions after they stop (may equal EOS: the masks,
        not the ids, say which tokens are real).
    tokenizer: optional; needed for stop_strings, and fills `Rollout.texts` (special tokens skipped).
    autocast_dtype: e.g. torch.bfloat16 — decode an fp32 model under autocast (ignored for non-fp32 models).
    share_prefix: encode each distinct prompt once and copy its KV cache G times (True), or re-encode the
        prompt for every sample (False; the baseline that bench/rollout_prefix_sharing.py measures against).
    packed_weights: on the CPU, run the linear layers from oneDNN's prepacked weights during a decode
        (`rollout/packed_linear.py`; same bf16 products, ~1.4-2x faster small-row GEMMs); None: wherever available.
    Tensors of the returned Rollout live on the model's device and are ordinary (not inference-mode) tensors.
    """

    def __init__(self, model, pad_token_id: int, tokenizer=None, autocast_dtype=None, share_prefix: bool = True,
                 packed_weights: bool | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is required (the tokenizer's pad id, or its EOS id when it has none)")
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.tokenizer = tokenizer
        self.autocast_dtype = autocast_dtype
        self.share_prefix = share_prefix
        self.packed_weights = packed_weights
        self.packed = PackedWeights()
        tune_host_allocator()  # decode steps allocate and free the same large buffers (see host_memory)

    @classmethod
    def for_training(cls, model, tokenizer, sampling, context: EngineContext) -> "HFGenerator":
        """The engine an online run samples with: the policy itself, under bf16 autocast where the run decided that
        is fast (`context.bf16`)."""
        return cls(model, tokenizer.pad_token_id, tokenizer, torch.bfloat16 if context.bf16 else None)

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        num_samples: int = 1,
        seed: int | None = None,
    ) -> Rollout:
        """prompt_ids: B token lists -> Rollout of N = B * num_samples rows, prompt-major."""
        validate_prompts(prompt_ids, num_samples)
        with self.decoding(params, seed) as (generator, matcher):
            chunks = [
                self._generate_chunk(prompt_ids[s : s + params.batch_size], params, num_samples, generator, matcher)
                for s in range(0, len(prompt_ids), params.batch_size)
            ]
        return self.with_texts(_assemble(chunks, self.pad_token_id))

    def turn_session(self):
        """A multi-turn session that keeps each row's KV cache between turns (`rollout/turn_session.py`)."""
        from posttrain.rollout.turn_session import TurnSession

        return TurnSession(self)

    @contextlib.contextmanager
    def decoding(self, params: SamplingParams, seed: int | None):
        """The state of one decode call: eval mode (restored after), no_grad, autocast with weights cast once;
        yields the torch.Generator seeded for the call and the stop-string matcher (or None)."""
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: HFGenerator(model, pad_token_id, tokenizer=...)")
        device = next(self.model.parameters()).device
        if seed is None:  # drawn from torch's global RNG, so torch.manual_seed still makes a run reproducible
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        generator = torch.Generator(device=device).manual_seed(seed)
        matcher = StopStringMatcher(self.tokenizer, params.stop_strings) if params.stop_strings else None
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast(device), _cast_weights_once(self.model, self._autocast_applies()), \
                    self._packed_linears(device):
                yield generator, matcher
        finally:
            self.model.train(was_training)

    def with_texts(self, rollout: Rollout) -> Rollout:
        """`rollout.texts` filled with each completion decoded (special tokens skipped), when there is a tokenizer."""
        if self.tokenizer is not None:
            rows = [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]
            rollout.texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return rollout

    def sleep(self) -> bool:
        """After a training step's sampling: the packed weights are stale once the optimizer steps; free them."""
        return self.packed.clear()

    def _packed_linears(self, device: torch.device):
        dtype = self.autocast_dtype if self._autocast_applies() else next(self.model.parameters()).dtype
        wanted = self.packed_weights if self.packed_weights is not None else packing_available(device, dtype)
        if not wanted:
            return contextlib.nullcontext()
        if not packing_available(device, dtype):
            raise ValueError(f"packed_weights=True needs a CPU with oneDNN and an fp32 or bf16 decode ({device}, {dtype})")
        return packed_linears(self.model, self.packed, dtype)

    def _autocast_applies(self) -> bool:
        return self.autocast_dtype is not None and next(self.model.parameters()).dtype == torch.float32

    def _autocast(self, device: torch.device):
        if not self._autocast_applies():
            return contextlib.nullcontext()
        # plain autocast, not `bf16_autocast`: its CPU switch to SDPA's math backend is for training's backward;
        # a decode step has none, and the math backend's casts and scaling took 45 % of a GRPO decode step
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def _generate_chunk(self, prompts, params, G, generator, matcher) -> Rollout:
        """B prompts -> a Rollout of R = B * G rows, prompt-major, padded to this chunk's own P and C; `group`
        indexes the chunk's prompts (0..B-1) and `texts` is left empty (`generate` decodes the whole batch)."""
        logits, cache, ids, mask, pos = self._prefill(prompts, params, G)
        completion_ids, completion_mask, logprobs, truncated = self._decode(
            logits, cache, mask, pos[:, -1] + 1, params, generator, matcher)[:4]
        group = torch.arange(len(prompts), device=ids.device).repeat_interleave(G)
        return Rollout(prompt_ids=ids, prompt_mask=mask, completion_ids=completion_ids,
                       completion_mask=completion_mask, logprobs=logprobs, truncated=truncated, group=group)

    def _prefill(self, prompts, params, G):
        """B prompts encoded once (prefix sharing) or G times -> last-position logits (R, V), the cache of all
        R rows, their ids, mask and positions (R, P). The cache holds P + max_new_tokens positions."""
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, self.pad_token_id, device)
        if not self.share_prefix:
            ids, mask = ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)
        pos = position_ids_from_mask(mask)
        cache = decode_cache(self.model, ids.shape[1] + params.max_new_tokens)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: no (B, P, V) tensor in the prefill
        )
        logits = out.logits[:, -1]  # (B, V)
        if self.share_prefix and G > 1:
            cache.batch_repeat_interleave(G)  # each prompt's keys/values copied to its G sample rows, in place
            logits, ids, mask, pos = (x.repeat_interleave(G, dim=0) for x in (logits, ids, mask, pos))
        return logits, cache, ids, mask, pos

    def _decode(self, logits, cache, attn, next_pos, params, generator, matcher, keep_rows: bool = False):
        """Token-by-token decoding of R rows from their last-position logits (R, V) and prefilled cache.

        -> completion ids (R, C), completion mask (R, C), logprobs (R, C), truncated (R,), C <= max_new_tokens,
        then the attention mask and next positions of the cache's rows. A row ends at its first stop token or stop
        string (that token is kept and masked in; it is never fed to the model). By default it then leaves the
        batch and its cache. With `keep_rows` (a multi-turn session, `rollout/turn_session.py`) it stays: its
        cache is kept for its next turn and its later steps write masked-out slots (holes) in it.
        """
        R, device, T = logits.shape[0], logits.device, params.max_new_tokens
        tokens = torch.full((R, T), self.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros((R, T), dtype=torch.float32, device=device)
        cmask = torch.zeros((R, T), dtype=torch.long, device=device)
        stopped = torch.zeros(R, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        alive = torch.arange(R, device=device)  # rows of the output that are still in the decode batch
        steps = T
        for t in range(T):
            tok, lp = sample_next(logits, params, generator)
            running = ~stopped[alive]
            tokens[alive, t] = torch.where(running, tok, self.pad_token_id)
            logps[alive, t], cmask[alive, t] = torch.where(running, lp, 0.0), running.long()
            hit = torch.isin(tok, stop_ids)
            if matcher is not None:
                hit |= matcher(tokens[alive, : t + 1])
            stopped[alive[hit & running]] = True
            if bool(stopped.all()) or t == T - 1:
                steps = t + 1
                break
            if keep_rows:  # stopped rows feed a masked-out pad token: their cache stays aligned with the batch
                tok = torch.where(stopped, self.pad_token_id, tok)
            elif bool(hit.any()):
                keep = (~hit).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                alive, attn, next_pos, tok = alive[keep], attn[keep], next_pos[keep], tok[keep]
            fed = ~stopped[alive]
            attn = torch.cat([attn, fed.long()[:, None]], dim=1)
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits, next_pos = out.logits[:, -1], next_pos + fed.long()
        return tokens[:, :steps], cmask[:, :steps], logps[:, :steps], ~stopped, attn, next_pos


@contextlib.contextmanager
def _cast_weights_once(model, applies: bool):
    """Make autocast cast each fp32 weight to bf16 once per `generate` call instead of once per decode step.

    Autocast caches the low-precision copy of a weight only for a leaf that requires grad, and not under
    `inference_mode` (which is why decoding runs under `no_grad`). A frozen weight (LoRA's base, a reference or
    evaluation model) would be cast again at every step: measured on SmolLM2-135M, 16 rows, that is 45 % of a
    decode step. Under no_grad no graph is recorded, so marking those weights as requiring grad for the call
    changes nothing but the cache; the flags are restored afterwards. The numerics are those of autocast itself:
    the same casts, made once.
    """
    frozen = [p for p in model.parameters() if applies and p.dtype == torch.float32 and not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _assemble(chunks: list[Rollout], pad_token_id: int) -> Rollout:
    """Concatenate per-chunk Rollouts: prompts left-padded to the longest P, completions right-padded to the
    longest C, each chunk's prompt indices offset by the prompts of the chunks before it."""
    P = max(c.prompt_ids.shape[1] for c in chunks)
    C = max(c.completion_ids.shape[1] for c in chunks)

    def cat(name, width, left, value):
        def pad(x):
            return F.pad(x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]), value=value)
        return torch.cat([pad(getattr(c, name)) for c in chunks])

    offset, groups = 0, []
    for c in chunks:
        groups.append(c.group + offset)
        offset += int(c.group.max()) + 1
    return Rollout(
        prompt_ids=cat("prompt_ids", P, True, pad_token_id),
        prompt_mask=cat("prompt_mask", P, True, 0),
        completion_ids=cat("completion_ids", C, False, pad_token_id),
        completion_mask=cat("completion_mask", C, False, 0),
        logprobs=cat("logprobs", C, False, 0.0),
        truncated=torch.cat([c.truncated for c in chunks]),
        group=torch.cat(groups),
    )
