"""Tensor helpers shared by every algorithm: shifting, masked reductions, chunked log-probs, loss aggregation.

Everything here is a pure function of tensors. Shapes: B batch, T time, V vocabulary, H hidden size.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: position t's logits predict token t+1.

    labels (B, T) -> (B, T), the last position filled with IGNORE_INDEX. This is the one place the shift happens.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is true; 0 (not NaN) where the mask is empty."""
    mask = mask.to(x.dtype)
    total = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / total.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO advantage whitening)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def _label_logprob_and_entropy(logits: torch.Tensor, labels: torch.Tensor, with_entropy: bool):
    """logits (N, V) in any dtype, labels (N,) -> (logp (N,), entropy (N,) or None), computed in fp32 per chunk."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)
    return logp, entropy


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024, with_entropy: bool = False
):
    """log p(label_t | ·) for already-shifted labels, never building a (B, T, V) fp32 log-softmax.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX where no label -> logp (B, T) (0 at ignored positions),
    and entropy (B, T) when asked. Rows are processed `chunk_size` tokens at a time, upcast to fp32 per chunk.
    """
    B, T, V = logits.shape
    flat_logits, flat_labels = logits.reshape(B * T, V), labels.reshape(B * T)
    logps, ents = [], []
    for start in range(0, B * T, chunk_size):
        lp, ent = _label_logprob_and_entropy(
            flat_logits[start : start + chunk_size], flat_labels[start : start + chunk_size], with_entropy
        )
        logps.append(lp)
        ents.append(ent)
    valid = labels != IGNORE_INDEX
    logp = torch.cat(logps).view(B, T) * valid
    entropy = torch.cat(ents).view(B, T) * valid if with_entropy else None
    return (logp, entropy) if with_entropy else logp


def _head_chunk(head, hidden, labels, with_entropy, temperature):
    logits = head(hidden)
    if temperature != 1.0:
        logits = logits / temperature
    logp, ent = _label_logprob_and_entropy(logits, labels, with_entropy)
    return (logp, ent) if with_entropy else (logp,)


def hidden_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    temperature: float = 1.0,
):
    """Like token_logprobs but from hidden states (B, T, H): the logits of a chunk exist only while it is processed.

    Under autograd each chunk is checkpointed, so backward recomputes one chunk's logits at a time instead of
    keeping B*T*V of them alive (the dominant memory of LM fine-tuning with a 49k-token vocabulary).
    Only labelled positions go through the head at all.
    """
    B, T, _ = hidden.shape
    valid = labels != IGNORE_INDEX
    idx = valid.reshape(-1).nonzero().squeeze(-1)
    sel_hidden, sel_labels = hidden.reshape(B * T, -1)[idx], labels.reshape(-1)[idx]
    logps, ents = [], []
    for start in range(0, sel_labels.numel(), chunk_size):
        args = (head, sel_hidden[start : start + chunk_size], sel_labels[start : start + chunk_size], with_entropy, temperature)
        if torch.is_grad_enabled() and hidden.requires_grad:
            out = checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            out = _head_chunk(*args)
        logps.append(out[0])
        if with_entropy:
            ents.append(out[1])
    flat_logp = hidden.new_zeros(B * T, dtype=torch.float32)
    logp = flat_logp.index_put((idx,), torch.cat(logps) if logps else flat_logp[:0]).view(B, T)
    if not with_entropy:
        return logp
    flat_ent = hidden.new_zeros(B * T, dtype=torch.float32)
    return logp, flat_ent.index_put((idx,), torch.cat(ents) if ents else flat_ent[:0]).view(B, T)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, whatever the padding side (B, T) -> (B, T)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def agg_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> torch.Tensor:
    """Aggregate a per-token loss (B, T) under `mask` (B, T) into a scalar.

    Modes (verl's names; see Dr. GRPO, Liu et al. 2025, for the length bias of the per-sequence ones):
      token-mean              sum over all tokens / number of tokens       (DAPO's token-level loss)
      seq-mean-token-mean     mean over sequences of each sequence's token mean (GRPO paper)
      seq-mean-token-sum      mean over sequences of each sequence's token sum
      seq-mean-token-sum-norm sum over tokens / (sequences * max_len)      (Dr. GRPO's constant normalizer)
    num_tokens / num_seqs are the counts of the *whole accumulated batch* when gradient accumulation splits it,
    so that k micro-batches give exactly the gradient of one big batch. Defaults: this batch's own counts.
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype, device=per_token.device)
        return (per_token * mask).sum() / denom.clamp(min=1.0)
    n_seqs = float(per_token.shape[0]) if num_seqs is None else float(num_seqs)
    if mode == "seq-mean-token-mean":
        seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return seq.sum() / max(n_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return (per_token * mask).sum() / max(n_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        length = float(per_token.shape[1]) if max_len is None else float(max_len)
        return (per_token * mask).sum() / (max(n_seqs, 1.0) * length)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {AGG_MODES}")
