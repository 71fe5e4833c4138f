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

from posttrain.models.forward import _unwrap
from posttrain.ops import IGNORE_INDEX, hidden_logprobs

# attention implementations that take an arbitrary 4D mask (flash-attention kernels do not)
MASKABLE = ("sdpa", "eager")


def _attention(model) -> str:
    return getattr(_unwrap(model).config, "_attn_implementation", "eager")


def supports_shared_prefix(model) -> bool:
    return _attention(model) in MASKABLE


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _scored(labels: list[int], to_row) -> list[tuple[int, int]]:
    """(row position of the predicting hidden state, label) for each labelled token after the first."""
    return [(to_row(t - 1), labels[t]) for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]


def pack_pairs(pairs: list[tuple], pad_id: int) -> dict:
    """pairs: B (first, second) Encoded sequences -> one right-padded batch of B rows.

    Returns input_ids, position_ids (B, T); segments (B, T): 0 prefix, 1 first tail, 2 second tail, -1 padding;
    score_index (N,) flat positions into (B*T) of the hidden states that predict the N labelled tokens,
    score_label (N,), score_seq (N,) in [0, 2B): sequence s < B is pair s's first, B + s its second.
    """
    B = len(pairs)
    rows, positions, segments, index, label, seq = [], [], [], [], [], []
    prefixes = [common_prefix(a.input_ids, b.input_ids) for a, b in pairs]
    T = max(len(a) + len(b) - L for (a, b), L in zip(pairs, prefixes))
    for row, ((first, second), L) in enumerate(zip(pairs, prefixes)):
        n1, n2 = len(first), len(second)
        ids = first.input_ids + second.input_ids[L:]
        pad = T - len(ids)
        rows.append(ids + [pad_id] * pad)
        positions.append(list(range(n1)) + list(range(L, n2)) + [0] * pad)
        segments.append([0] * L + [1] * (n1 - L) + [2] * (n2 - L) + [-1] * pad)
        for s, (seq_labels, to_row) in enumerate(((first.labels, lambda i: i),
                                                  (second.labels, lambda i, L=L, n1=n1: i if i < L else n1 + i - L))):
            for pos, lab in _scored(seq_labels, to_row):
                index.append(row * T + pos)
                label.append(lab)
                seq.append(s * B + row)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device="cpu")  # noqa: E731  (host staging)
    return {"input_ids": as_long(rows), "position_ids": as_long(positions), "segments": as_long(segments),
            "score_index": as_long(index), "score_label": as_long(label), "score_seq": as_long(seq), "num_seqs": 2 * B}


def block_mask(segments: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, T) segments -> (B, 1, T, T) mask: query q sees key k <= q in the prefix or in q's own segment.

    Boolean (True = attend) for SDPA; with `additive_dtype`, 0 / dtype-min floats for eager attention.
    A padding query sees itself only, so no softmax row is empty (an empty one gives NaN).
    """
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool, device=segments.device) & (q < 0)
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min)


def _packed_token_logps(model, batch: dict, chunk_size: int, with_entropy: bool = False, temperature: float = 1.0):
    """One decoder pass over a packed batch; (N,) fp32 log-probs [and entropies] of its `score_label` tokens, each
    predicted by the hidden state at `score_index`. The output head runs in chunks on those positions only."""
    inner = _unwrap(model)
    decoder = getattr(inner, inner.base_model_prefix)
    eager = _attention(model) == "eager"
    mask = block_mask(batch["segments"], next(inner.parameters()).dtype if eager else None)
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


def pack_groups(prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int) -> dict:
    """R prompts with their completions -> R right-padded rows [prompt | completion 1 | ... | completion K_r].

    The G samples of a GRPO group share their prompt, so its tokens run through the model once instead of G
    times (on the demo task a group of 8 costs ~3x fewer tokens). Every completion token is scored; the first
    of each is predicted by the prompt's last hidden state.
    Returns input_ids, position_ids, segments (R, T) (0 prompt, k the k-th completion, -1 padding); score_index,
    score_label (N,) as in `pack_pairs`; score_seq (N,) the completion's number in row-major order of
    `completions`; score_pos (N,) the token's index within its completion.
    """
    T = max(len(p) + sum(len(c) for c in cs) for p, cs in zip(prompts, completions))
    rows, positions, segments, index, label, seq, pos = [], [], [], [], [], [], []
    number = 0
    for r, (prompt, tails) in enumerate(zip(prompts, completions)):
        if not prompt:
            raise ValueError("pack_groups needs a non-empty prompt: a completion's first token is predicted from it")
        L = len(prompt)
        ids, position, segment = list(prompt), list(range(L)), [0] * L
        for k, tail in enumerate(tails, start=1):
            start = len(ids)
            for t, token in enumerate(tail):
                index.append(r * T + (L - 1 if t == 0 else start + t - 1))
                label.append(token)
                seq.append(number)
                pos.append(t)
            ids += tail
            position += range(L, L + len(tail))
            segment += [k] * len(tail)
            number += 1
        pad = T - len(ids)
        rows.append(ids + [pad_id] * pad)
        positions.append(position + [0] * pad)
        segments.append(segment + [-1] * pad)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device="cpu")  # noqa: E731  (host staging)
    return {"input_ids": as_long(rows), "position_ids": as_long(positions), "segments": as_long(segments),
            "score_index": as_long(index), "score_label": as_long(label), "score_seq": as_long(seq),
            "score_pos": as_long(pos), "num_seqs": number}


def grouped_token_logps(model, batch: dict, width: int, chunk_size: int = 1024, with_entropy: bool = False,
                        temperature: float = 1.0):
    """Per-token log-probs (S, width) fp32 of the S completions of a `pack_groups` batch, aligned with each
    completion's tokens (0 past its end) [and the entropies of the predicting distributions, same shape]."""
    out = _packed_token_logps(model, batch, chunk_size, with_entropy, temperature)
    where = (batch["score_seq"], batch["score_pos"])

    def spread(values):
        return values.new_zeros(batch["num_seqs"], width, dtype=torch.float32).index_put(where, values.float())

    return (spread(out[0]), spread(out[1])) if with_entropy else spread(out)
