"""Multi-turn decoding that keeps each trajectory's KV cache between turns (HF engine).

Re-encoding the whole conversation at every turn costs a prefill of all earlier turns per turn: quadratic in the
number of turns. A session keeps, per row, the cache of every token fed so far; a later turn encodes only what
the cache lacks — the previous turn's last sampled token (a row's last token is never fed) and the environment's
text after it — and decodes on.

Layout: each chunk of rows (`SamplingParams.batch_size` prompts) shares one preallocated cache, one slot per
column. A row that ends its turn before the others stays in the batch: its later slots are masked out (holes),
so its cache survives for its next turn (`HFGenerator._decode(keep_rows=True)`). An extension writes each row's
new tokens right-aligned in a block as wide as the longest (holes to their left), so every row's last real token
is the block's last column. Positions count each row's real tokens only, so they are those of the dense sequence
the trainer scores, and masked slots get no attention weight: the logits are the dense computation's up to float
rounding (tests/unit/test_envs.py compares greedy tokens with and without a session, and the trainer's log-probs).

Where a context does not extend a row's cached tokens (a caller that rewrote the conversation), or the model's
cache is not a plain full-attention one (a sliding window counts slots, not tokens), the turn is re-encoded in
full — correct, only slower — and counted in `reencoded_turns`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.ops import position_ids_from_mask
from posttrain.rollout.base import SamplingParams, validate_prompts
from posttrain.rollout.hf import _assemble, left_pad
from posttrain.rollout.kv_cache import PreallocatedCache, decode_cache
from posttrain.types import Rollout


@dataclass(eq=False)  # chunks compare by identity
class _Chunk:
    """Rows decoded together: their keys (the caller's row ids) in cache order, each row's fed token ids, the
    shared cache, its attention mask over slots (R, W) and each row's next position (R,)."""

    keys: list[int]
    fed: list[list[int]]
    cache: object
    attn: torch.Tensor
    next_pos: torch.Tensor


class TurnSession:
    """`generate(contexts, params, num_samples, seed, rows)` like the engine's, where `rows` names each output
    row (default 0..N-1) and a later call's context for row k must start with everything row k has seen (its
    previous context and completion). Counters: encoded_tokens (prefilled), reused_tokens (read from the cache
    instead), reencoded_turns."""

    def __init__(self, engine):
        self.engine = engine
        self.chunks: list[_Chunk] = []
        self.extendable = isinstance(decode_cache(engine.model, 1), PreallocatedCache)
        self.encoded_tokens = self.reused_tokens = self.reencoded_turns = 0

    def reused_fraction(self) -> float:
        total = self.encoded_tokens + self.reused_tokens
        return self.reused_tokens / total if total else 0.0

    def generate(self, contexts: list[list[int]], params: SamplingParams, num_samples: int = 1,
                 seed: int | None = None, rows: list[int] | None = None) -> Rollout:
        validate_prompts(contexts, num_samples)
        rows = list(range(len(contexts) * num_samples)) if rows is None else list(rows)
        if not self.extendable:
            self.encoded_tokens += sum(len(c) for c in contexts)
            return self.engine.generate(contexts, params, num_samples, seed)
        if self.chunks and num_samples == 1 and self._extends(contexts, rows):
            with self.engine.decoding(params, seed) as (generator, matcher):
                return self._extend(contexts, rows, params, generator, matcher)
        if self.chunks:
            self.reencoded_turns += 1
        with self.engine.decoding(params, seed) as (generator, matcher):
            return self._open(contexts, rows, params, num_samples, generator, matcher)

    def _extends(self, contexts, rows) -> bool:
        cached = {k: f for c in self.chunks for k, f in zip(c.keys, c.fed)}
        return all(k in cached and len(ctx) > len(cached[k]) and ctx[: len(cached[k])] == cached[k]
                   for k, ctx in zip(rows, contexts))

    def _open(self, contexts, rows, params, G, generator, matcher) -> Rollout:
        """A fresh cache per chunk of prompts (each encoded once for its G rows), decoded keeping every row."""
        engine, self.chunks, parts = self.engine, [], []
        for s in range(0, len(contexts), params.batch_size):
            prompts = contexts[s : s + params.batch_size]
            logits, cache, ids, mask, pos = engine._prefill(prompts, params, G)
            self.encoded_tokens += sum(len(p) for p in prompts)
            context_rows = [p for p in prompts for _ in range(G)]
            chunk = _Chunk(rows[s * G : (s + len(prompts)) * G], [], cache, mask, pos[:, -1] + 1)
            parts.append(self._decode(chunk, context_rows, logits, ids, mask, params, generator, matcher))
        return self._gather(parts, rows, G)

    def _extend(self, contexts, rows, params, generator, matcher) -> Rollout:
        wanted = dict(zip(rows, contexts))
        parts, kept = [], []
        for chunk in self.chunks:
            at = [i for i, k in enumerate(chunk.keys) if k in wanted]
            if not at:
                continue
            self._select(chunk, at)
            new = [wanted[k][len(f):] for k, f in zip(chunk.keys, chunk.fed)]
            self.reused_tokens += sum(len(f) for f in chunk.fed)
            self.encoded_tokens += sum(len(n) for n in new)
            logits = self._prefill_block(chunk, new, params)
            context_rows = [wanted[k] for k in chunk.keys]
            ids, mask = left_pad(context_rows, self.engine.pad_token_id, chunk.attn.device)
            parts.append(self._decode(chunk, context_rows, logits, ids, mask, params, generator, matcher))
            kept.append(chunk)
        self.chunks = kept
        return self._gather(parts, rows)

    @staticmethod
    def _select(chunk: _Chunk, at: list[int]) -> None:
        """Keep only the rows `at` of a chunk (a finished trajectory's cache is dropped)."""
        if len(at) == len(chunk.keys):
            return
        idx = torch.tensor(at, device=chunk.attn.device)
        chunk.cache.batch_select_indices(idx)
        chunk.keys, chunk.fed = [chunk.keys[i] for i in at], [chunk.fed[i] for i in at]
        chunk.attn, chunk.next_pos = chunk.attn[idx], chunk.next_pos[idx]

    def _prefill_block(self, chunk: _Chunk, new: list[list[int]], params) -> torch.Tensor:
        """Each row's new tokens, right-aligned in one block after its cached slots -> last-position logits (R, V)."""
        block, block_mask = left_pad(new, self.engine.pad_token_id, chunk.attn.device)
        chunk.cache.reserve(chunk.attn.shape[1] + block.shape[1] + params.max_new_tokens)
        pos = chunk.next_pos[:, None] + position_ids_from_mask(block_mask)  # holes: any position, masked out
        chunk.attn = torch.cat([chunk.attn, block_mask], dim=1)
        out = self.engine.model(input_ids=block, attention_mask=chunk.attn, position_ids=pos,
                                past_key_values=chunk.cache, use_cache=True, logits_to_keep=1)
        chunk.next_pos = pos[:, -1] + 1
        return out.logits[:, -1]

    def _decode(self, chunk, context_rows, logits, ids, mask, params, generator, matcher) -> Rollout:
        """Decode a chunk's rows keeping them all; record what each row's cache now holds."""
        comp, cmask, logps, truncated, chunk.attn, chunk.next_pos = self.engine._decode(
            logits, chunk.cache, chunk.attn, chunk.next_pos, params, generator, matcher, keep_rows=True)
        # every token but a row's last sampled one was fed: the next turn starts by encoding that one
        chunk.fed = [ctx + comp[r][cmask[r].bool()].tolist()[:-1] for r, ctx in enumerate(context_rows)]
        if chunk not in self.chunks:
            self.chunks.append(chunk)
        return Rollout(prompt_ids=ids, prompt_mask=mask, completion_ids=comp, completion_mask=cmask, logprobs=logps,
                       truncated=truncated, group=torch.zeros(len(context_rows), dtype=torch.long, device=ids.device))

    def _gather(self, parts: list[Rollout], rows: list[int], G: int = 1) -> Rollout:
        """The chunks' rollouts as one, its rows in the order of `rows`; `group` numbers the contexts (G rows each)."""
        cat = _assemble(parts, self.engine.pad_token_id)
        order_of = {k: i for i, k in enumerate(k for c in self.chunks for k in c.keys)}
        idx = torch.tensor([order_of[k] for k in rows], device=cat.completion_ids.device)
        out = Rollout(**{name: getattr(cat, name)[idx] for name in
                         ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "truncated")},
                      group=torch.arange(len(rows), device=idx.device) // G)
        return self.engine.with_texts(out)
