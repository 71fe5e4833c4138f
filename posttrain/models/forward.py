"""Forward passes that return exactly what the losses need: per-token log-probs, entropies, sequence scores.

The causal LM's decoder runs once; its hidden states go through the output head in chunks
(`ops.hidden_logprobs`), so a (B, T, V) fp32 log-softmax never exists. Position ids always come from the
attention mask, so left, right and no padding give the same numbers (left padding without position ids: OpenRLHF #217, TRL #6800).
"""

from __future__ import annotations

import torch

from posttrain.ops import IGNORE_INDEX, hidden_logprobs, position_ids_from_mask, shift_labels


def _unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(model, input_ids, attention_mask, documents=None, position_ids=None) -> torch.Tensor:
    """Last hidden states (B, T, H) of a causal LM or sequence classifier, positions from the mask; or, for a
    padding-free batch (`data/padding_free.pack_documents`), with its `documents` (B, T) block mask and its
    `position_ids` that restart per document."""
    inner = _unwrap(model)
    decoder = getattr(inner, inner.base_model_prefix)
    if documents is not None:
        from posttrain.models.shared_prefix import document_mask

        attention_mask = document_mask(model, documents)
    else:
        position_ids = position_ids_from_mask(attention_mask)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def token_logps(
    model, input_ids, attention_mask, labels=None, chunk_size: int = 1024, with_entropy: bool = False,
    temperature: float = 1.0, documents=None, position_ids=None,
):
    """log p(x_t | x_<t) aligned with the tokens: out[:, t] scores input_ids[:, t]; 0 where not labelled.

    input_ids, attention_mask, labels (B, T); labels default to the real tokens (mask) and mark which tokens
    to score (IGNORE_INDEX elsewhere) -> logps (B, T) fp32 [, entropy (B, T) of the predicting distribution].
    documents, position_ids (B, T): a padding-free batch (`data/padding_free.pack_documents`), whose labels
    already leave each document's first token unscored.
    """
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    # a token whose predecessor is padding (the first real token under left padding) has no prediction
    follows_pad = torch.nn.functional.pad(attention_mask[:, :-1], (1, 0)) == 0
    labels = labels.masked_fill(follows_pad, IGNORE_INDEX)
    hidden = decoder_hidden(model, input_ids, attention_mask, documents, position_ids)
    head = _unwrap(model).get_output_embeddings()
    out = hidden_logprobs(hidden, head, shift_labels(labels), chunk_size, with_entropy, temperature)
    logp, ent = out if with_entropy else (out, None)
    # position t's hidden state predicts token t+1: move the results onto the token they score
    logp = torch.nn.functional.pad(logp[:, :-1], (1, 0))
    if not with_entropy:
        return logp
    return logp, torch.nn.functional.pad(ent[:, :-1], (1, 0))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row (B,), whatever the padding side; never uses pad_token_id."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def reward_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Bradley–Terry scores (B,) from a sequence classifier's head at the last real token (reward read from the wrong token: transformers #35352, TRL #3750)."""
    hidden = decoder_hidden(model, input_ids, attention_mask)
    last = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = _unwrap(model).score
    return head(picked).squeeze(-1).float()


def sequence_logps(model, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled (completion) tokens and their count, per row: (R,) fp32 each.

    batch: input_ids, attention_mask, labels (R, T), or a `shared_prefix.pack_pairs` batch (R = 2 x its rows).
    Prompt and padding positions carry IGNORE_INDEX, so they never
    reach the output head and add nothing to the sums (nor, under autograd, to the gradient of anything built on them).
    """
    if "score_index" in batch:  # chosen and rejected in one row around their shared prompt
        from posttrain.models.shared_prefix import shared_prefix_logps

        return shared_prefix_logps(model, batch, chunk)
    labels = batch["labels"]
    if "doc_seq" in batch:  # a padding-free batch: several sequences per row, summed per sequence
        return _packed_sequence_logps(model, batch, chunk)
    logp = token_logps(model, batch["input_ids"], batch["attention_mask"], labels, chunk)
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False  # the first token has no prediction
    return (logp * mask).sum(-1), mask.sum(-1).float()


def _packed_sequence_logps(model, batch: dict, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of a `pack_documents` batch: (num_seqs,) sums and counts, in the items' order."""
    logp = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk,
                       documents=batch["documents"], position_ids=batch["position_ids"])
    scored = batch["labels"] != IGNORE_INDEX  # each document's first token is unlabelled already
    seq = batch["doc_seq"][scored]
    n = batch["num_seqs"]
    sums = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add(0, seq, logp[scored].float())
    return sums, torch.bincount(seq, minlength=n).float()


def packed_reward_scores(model, batch: dict) -> torch.Tensor:
    """Scores (S,) of the S sequences of a padding-free batch (`data/padding_free.pack_documents`), each read at
    its own last token (`last_index`), in the order the sequences were given."""
    hidden = decoder_hidden(model, batch["input_ids"], batch["attention_mask"], batch["documents"], batch["position_ids"])
    picked = hidden.reshape(-1, hidden.shape[-1])[batch["last_index"]]
    return _unwrap(model).score(picked).squeeze(-1).float()


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores (B,), (B,) of a `pad_pair_ids` batch (or a padding-free one, `rm.packed_pairs`):
    chosen sequences first, then rejected ones."""
    if "documents" in batch:
        scores = packed_reward_scores(model, batch)
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]
