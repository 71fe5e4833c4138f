"""Sequences that share a prefix, scored in one row: the prompt of a preference pair or of a GRPO group is
encoded once.

A pair (prompt+chosen, prompt+rejected) of lengths Lc and Lr whose first L tokens agree becomes one row
    [ common prefix (L) | chosen tail (Lc - L) | rejected tail (Lr - L) ]
of Lc + Lr - L tokens instead of two rows of Lc and Lr. A block mask keeps the tails apart (a rejected token sees
the prefix and the rejected tokens before it, never the chosen tail) and position ids restart at L for each tail,
so every token sees exactly the context it has in its own sequence: the log-probs equal those of two separate
rows up to floating-point rounding (tests/unit/test_shared_prefix.py). The first rejected token is predicted from the
prefix's last hidden state, like the first chosen one, which is why scoring goes through explicit
(hidden position, label) lists instead of the usual shift-by-one.

On the demo task a prompt is ~4x longer than an answer, so a pair costs ~45 % fewer tokens in the forward and
backward passes. TRL's DPOTrainer concatenates chosen and rejected as two full rows.
"""

from __future__ import annotations

import torch

from posttrain.data.packing import pack_rows
from posttrain.models.forward import _unwrap, token_logps
from posttrain.ops import hidden_logprobs
from posttrain.types import RolloutBatch

# attention implementations that take an arbitrary 4D mask (flash-attention kernels do not)
MASKABLE = ("sdpa", "eager")


def _attention(model) -> str:
    return getattr(_unwrap(model).config, "_attn_implementation", "eager")


def supports_shared_prefix(model) -> bool:
    return _attention(model) in MASKABLE


def block_mask(segments: torch.Tensor, additive_dtype: torch.dtype | None = None,
               documents: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) segments -> (B, 1, T, T) mask: query q sees key k <= q in the prefix or in q's own segment, and
    with `documents` (B, T) (a padding-free batch, `data/padding_free.py`) only inside q's own document.

    Boolean (True = attend) for SDPA; with `additive_dtype`, 0 / dtype-min floats for eager attention.
    A padding query sees itself only, so no softmax row is empty (an empty one gives NaN).
    """
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    if documents is not None:
        allowed &= documents[:, :, None] == documents[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool, device=segments.device) & (q < 0)
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min)


def document_mask(model, documents: torch.Tensor) -> torch.Tensor:
    """The 4D attention mask of a padding-free batch for `model`'s attention implementation: causal inside each
    document (documents (B, T), -1 padding), nothing across them."""
    if not supports_shared_prefix(model):
        raise ValueError(f"padding-free batches need an attention that takes a 4D mask ({', '.join(MASKABLE)}), "
                         f"not {_attention(model)!r}")
    eager = _attention(model) == "eager"
    segments = torch.where(documents >= 0, 0, -1)
    return block_mask(segments, next(_unwrap(model).parameters()).dtype if eager else None, documents)


def _packed_token_logps(model, batch: dict, chunk_size: int, with_entropy: bool = False, temperature: float = 1.0):
    """One decoder pass over a packed batch; (N,) fp32 log-probs [and entropies] of its `score_label` tokens, each
    predicted by the hidden state at `score_index`. The output head runs in chunks on those positions only."""
    inner = _unwrap(model)
    decoder = getattr(inner, inner.base_model_prefix)
    eager = _attention(model) == "eager"
    mask = block_mask(batch["segments"], next(inner.parameters()).dtype if eager else None, batch.get("documents"))
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                     use_cache=False).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1])[batch["score_index"]]
    head = inner.get_output_embeddings()
    out = hidden_logprobs(picked[None], head, batch["score_label"][None], chunk_size, with_entropy, temperature)
    return (out[0][0], out[1][0]) if with_entropy else out[0]


def shared_prefix_logps(model, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each of the 2B sequences of a `pack_pairs` batch, and their
    counts: (2B,) fp32 each, firsts then seconds. One decoder pass over B rows."""
    logp = _packed_token_logps(model, batch, chunk_size)
    n = batch["num_seqs"]
    sums = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add(0, batch["score_seq"], logp.float())
    counts = torch.bincount(batch["score_seq"], minlength=n).float()
    return sums, counts


def grouped_token_logps(model, batch: dict, width: int, chunk_size: int = 1024, with_entropy: bool = False,
                        temperature: float = 1.0):
    """Per-token log-probs (S, width) fp32 of the S completions of a `pack_groups` batch, aligned with each
    completion's tokens (0 past its end) [and the entropies of the predicting distributions, same shape]."""
    out = _packed_token_logps(model, batch, chunk_size, with_entropy, temperature)
    where = (batch["score_seq"], batch["score_pos"])

    def spread(values):
        return values.new_zeros(batch["num_seqs"], width, dtype=torch.float32).index_put(where, values.float())

    return (spread(out[0]), spread(out[1])) if with_entropy else spread(out)


def completion_logps(model, batch: RolloutBatch, rows: torch.Tensor, chunk: int, with_entropy: bool = False,
                     temperature: float = 1.0, share_prompt: bool = True):
    """Log-probs (len(rows), C) fp32 of the completion tokens of `rows` (0 past each end) [and the entropies of
    the predicting distributions]: one packed row per group when `share_prompt` and the attention takes a block
    mask, else the padded rows with positions from the attention mask."""
    C = batch.completion_mask.shape[1]
    if share_prompt and supports_shared_prefix(model):
        return grouped_token_logps(model, pack_rows(batch, rows), C, chunk, with_entropy, temperature)
    out = token_logps(model, batch.input_ids[rows], batch.attention_mask[rows], batch.labels(rows), chunk,
                      with_entropy, temperature)
    P = batch.prompt_width
    return (out[0][:, P:], out[1][:, P:]) if with_entropy else out[:, P:]


def completion_logits(model, batch: RolloutBatch, rows: torch.Tensor) -> torch.Tensor:
    """Next-token logits (len(rows), C, V) at each completion position of `rows` (position t predicts completion
    token t), from the padded rows with positions from the attention mask. For losses that need the whole
    distribution (GKD's JSD); one log-prob per token goes through `completion_logps` instead."""
    from posttrain.models.forward import decoder_hidden

    P, C = batch.prompt_width, batch.completion_mask.shape[1]
    hidden = decoder_hidden(model, batch.input_ids[rows], batch.attention_mask[rows])
    return _unwrap(model).get_output_embeddings()(hidden[:, P - 1 : P + C - 1])
