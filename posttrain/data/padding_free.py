"""Padding-free batches: whole sequences packed side by side in rows, and micro-batches sized by tokens.

`pack_documents` places the sequences of a micro-batch into rows of `width` tokens by first-fit decreasing
(Johnson 1973: at most 11/9 of the optimal number of rows + 1): a row [doc a | doc b | doc c | pad]. Each
token carries its document's index in the row (`documents`, -1 for padding); the model side builds a
block-diagonal causal mask from it (a token sees only the earlier tokens of its own document) and takes the
position ids, which restart at 0 for each document. The first token of each document is not labelled: it would
otherwise be "predicted" by the last token of the document before it. So the log-probs of every labelled token
equal those of the padded batch (tests/unit/test_padding_free.py).

Rows are as wide as the longest sequence by default, so the attention's cost per row is that of one padded row
(a dense mask over one very long row would cost O(T^2) for nothing), while the rows' count follows the real
tokens instead of the number of sequences.

`token_budget_batches` and `packed_micro_batches` cut the sequences of an update into micro-batches whose
padded cost (rows x width) stays within `max_tokens`: a step's cost follows its real tokens, not a fixed count of rows. The update's loss is
normalized by the tokens of the whole update either way, so the gradient does not depend on the split.
"""

from __future__ import annotations

import torch

from posttrain.ops import IGNORE_INDEX


def first_fit_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `width` tokens, longest first (first-fit decreasing)."""
    if any(n > width for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a packed row of {width}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


def pack_documents(items: list, pad_id: int, width: int | None = None, rows: list[list[int]] | None = None) -> dict:
    """Encoded sequences (input_ids, labels) -> a packed batch of host tensors, each (rows, width):
    input_ids, labels (IGNORE_INDEX on padding and on each document's first token), attention_mask (1 real,
    0 padding), position_ids (restarting per document), documents (index in the row, -1 padding), doc_seq (the
    item each token belongs to, -1 padding); last_index
    (num_seqs,) the flat position in (rows * width) of each item's last token, in the items' order (where a
    reward model reads its score); and num_seqs, padding_fraction. `rows`: the items' indices per row when already decided (`packed_micro_batches`),
    else first-fit decreasing into rows of `width` (default: the longest item)."""
    lengths = [len(x.input_ids) for x in items]
    width = width or max(lengths)
    rows = rows if rows is not None else first_fit_rows(lengths, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    labels = torch.full_like(ids, IGNORE_INDEX)
    positions = torch.zeros_like(ids)
    documents = torch.full_like(ids, -1)
    seq = torch.full_like(ids, -1)
    last = [0] * len(items)
    for r, members in enumerate(rows):
        start = 0
        for d, i in enumerate(members):
            n = lengths[i]
            ids[r, start : start + n] = torch.as_tensor(items[i].input_ids)
            labels[r, start : start + n] = torch.as_tensor(items[i].labels)
            labels[r, start] = IGNORE_INDEX  # no prediction across documents
            positions[r, start : start + n] = torch.arange(n)
            documents[r, start : start + n] = d
            seq[r, start : start + n] = i
            last[i] = r * width + start + n - 1
            start += n
    real = documents >= 0
    return {"input_ids": ids, "labels": labels, "attention_mask": real.long(), "position_ids": positions,
            "documents": documents, "doc_seq": seq, "num_seqs": len(items), "last_index": torch.tensor(last, dtype=torch.long),
            "padding_fraction": 1.0 - float(real.sum()) / max(ids.numel(), 1)}


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of an update's sequences cut into padded micro-batches of at most `max_tokens` tokens of padded
    cost (rows x the micro-batch's longest sequence), sorted by length so that similar lengths share one. A
    sequence longer than the budget gets a micro-batch of its own (it cannot be split)."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    micro: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > max_tokens:
            micro.append(current)
            current = []
        current.append(i)
    return micro + [current] if current else micro


def packed_micro_batches(lengths: list[int], width: int, max_tokens: int = 0, parts: int = 1) -> list[list[list[int]]]:
    """An update's sequences packed into rows of `width` (`first_fit_rows`), the rows grouped into micro-batches:
    as many rows as `max_tokens` holds (rows x width) when it is > 0, else `parts` near-equal groups.
    -> per micro-batch, its rows, each a list of indices into `lengths`."""
    rows = first_fit_rows(lengths, width)
    if max_tokens > 0:
        per_micro = max(1, max_tokens // width)
        return [rows[s : s + per_micro] for s in range(0, len(rows), per_micro)]
    return even_split(rows, parts)


def even_split(items: list, parts: int) -> list[list]:
    """`items` in `parts` consecutive chunks of near-equal size (none empty while items remain)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        out.append(items[start:end])
        start = end
    return out
