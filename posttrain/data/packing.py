"""Packing sequences that share a prefix into one row (the collation side of `models/shared_prefix.py`).

A preference pair [prefix | chosen tail | rejected tail] (`pack_pairs`), a GRPO group [prompt | completion 1 | ...
| completion G] (`pack_groups`), or the rows of a rollout by group (`pack_rows`): token lists in, host tensors
out (input_ids, position ids that restart for each tail, segment ids for the block mask, and the flat positions
of the hidden states that predict each scored token). The model side scores them.
"""

from __future__ import annotations

import torch

from posttrain.ops import IGNORE_INDEX
from posttrain.types import RolloutBatch


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


def _pair_unit(first, second) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """One pair as [prefix | first tail | second tail]: ids, position ids, segments (0 / 1 / 2) and the scored
    tokens as (position of the predicting hidden state, label, 0 first | 1 second), positions within the unit."""
    L = common_prefix(first.input_ids, second.input_ids)
    n1, n2 = len(first), len(second)
    ids = first.input_ids + second.input_ids[L:]
    positions = list(range(n1)) + list(range(L, n2))
    segments = [0] * L + [1] * (n1 - L) + [2] * (n2 - L)
    scored = [(pos, lab, 0) for pos, lab in _scored(first.labels, lambda i: i)]
    scored += [(pos, lab, 1) for pos, lab in _scored(second.labels, lambda i: i if i < L else n1 + i - L)]
    return ids, positions, segments, scored


def pack_pairs(pairs: list[tuple], pad_id: int, padding_free: bool = False, width: int | None = None) -> dict:
    """pairs: B (first, second) Encoded sequences -> one right-padded batch, a pair [prefix | first tail | second
    tail] per row; with `padding_free`, several pairs side by side per row of `width` tokens (default: the longest
    pair), by first-fit decreasing, with `documents` (R, T) (the pair's index in its row, -1 padding) for the
    block mask (no token sees another pair's).

    Returns input_ids, position_ids (R, T); segments (R, T): 0 prefix, 1 first tail, 2 second tail, -1 padding;
    score_index (N,) flat positions into (R*T) of the hidden states that predict the N labelled tokens,
    score_label (N,), score_seq (N,) in [0, 2B): sequence s < B is pair s's first, B + s its second.
    """
    from posttrain.data.padding_free import first_fit_rows

    B = len(pairs)
    units = [_pair_unit(a, b) for a, b in pairs]
    lengths = [len(u[0]) for u in units]
    T = width or max(lengths)
    layout = first_fit_rows(lengths, T) if padding_free else [[i] for i in range(B)]
    R = len(layout)
    rows, positions, segments = [[pad_id] * T for _ in range(R)], [[0] * T for _ in range(R)], [[-1] * T for _ in range(R)]
    documents = [[-1] * T for _ in range(R)]
    index, label, seq = [], [], []
    for r, members in enumerate(layout):
        offset = 0
        for d, i in enumerate(members):
            ids, pos, seg, scored = units[i]
            n = len(ids)
            rows[r][offset : offset + n], positions[r][offset : offset + n] = ids, pos
            segments[r][offset : offset + n], documents[r][offset : offset + n] = seg, [d] * n
            for at, lab, which in scored:
                index.append(r * T + offset + at)
                label.append(lab)
                seq.append(which * B + i)
            offset += n
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device="cpu")  # noqa: E731  (host staging)
    out = {"input_ids": as_long(rows), "position_ids": as_long(positions), "segments": as_long(segments),
           "score_index": as_long(index), "score_label": as_long(label), "score_seq": as_long(seq), "num_seqs": 2 * B}
    if padding_free:
        out["documents"] = as_long(documents)
    return out


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


def pack_rows(batch: RolloutBatch, rows: torch.Tensor) -> dict:
    """The rows `rows` as one packed row per group [prompt | completions...] (`shared_prefix.pack_groups`);
    its score_seq indexes into `rows`."""
    members: dict[int, list[int]] = {}
    for i, r in enumerate(rows.tolist()):
        members.setdefault(int(batch.group[r]), []).append(i)
    prompts, tails, order = [], [], []
    for idx in members.values():
        prompt = batch.prompt_ids(int(rows[idx[0]]))
        if any(batch.prompt_ids(int(rows[i])) != prompt for i in idx[1:]):
            raise ValueError("rows of one group must share their prompt to be packed")
        prompts.append(prompt)
        tails.append([batch.completion_ids(int(rows[i])) for i in idx])
        order += idx
    packed = pack_groups(prompts, tails, batch.pad_id)
    packed["score_seq"] = torch.tensor(order, dtype=torch.long, device="cpu")[packed["score_seq"]]
    device = batch.input_ids.device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}


def rollout_micro_batches(batch: RolloutBatch, rows: torch.Tensor, max_tokens: int, share_prompt: bool) -> list[torch.Tensor]:
    """`rows` (host indices into `batch`) cut into forward passes of at most `max_tokens` tokens of the cost the
    pass really has: with `share_prompt`, `pack_rows`'s one row per group [prompt | completions...] padded to the
    longest; else the padded rows at the batch's full width. A group whose row alone would pass the budget is
    split into rows of several completions each (each with the prompt); a single completion longer than the
    budget gets a pass of its own. Longest units first, as `token_budget_batches` does."""
    if not share_prompt:
        per = max(1, max_tokens // batch.input_ids.shape[1])
        return [rows[s : s + per] for s in range(0, len(rows), per)]
    prompt_len = batch.attention_mask[:, : batch.prompt_width].sum(-1).tolist()
    comp_len = batch.completion_mask.sum(-1).tolist()
    units = _group_units(batch, rows.tolist(), prompt_len, comp_len, max_tokens)
    passes: list[dict[int, list]] = []  # per pass: group -> [prompt length, completion tokens, rows]
    for group, prompt, tokens, members in sorted(units, key=lambda u: -(u[1] + u[2])):
        if not passes or not _fits(passes[-1], group, prompt, tokens, max_tokens):
            passes.append({})
        row = passes[-1].setdefault(group, [prompt, 0, []])
        row[1] += tokens
        row[2] += members
    return [torch.tensor([r for g in sorted(p) for r in p[g][2]], dtype=torch.long, device="cpu") for p in passes]


def _group_units(batch: RolloutBatch, rows: list[int], prompt_len, comp_len, max_tokens: int) -> list[tuple]:
    """(group, prompt length, completion tokens, rows) of each group of `rows`; a group whose packed row would
    pass the budget split greedily into several."""
    by_group: dict[int, list[int]] = {}
    for r in rows:
        by_group.setdefault(int(batch.group[r]), []).append(r)
    units = []
    for group, members in by_group.items():
        prompt = int(prompt_len[members[0]])
        current, tokens = [], 0
        for r in members:
            if current and prompt + tokens + comp_len[r] > max_tokens:
                units.append((group, prompt, tokens, current))
                current, tokens = [], 0
            current.append(r)
            tokens += int(comp_len[r])
        units.append((group, prompt, tokens, current))
    return units


def _fits(pass_: dict[int, list], group: int, prompt: int, tokens: int, max_tokens: int) -> bool:
    """Whether a unit joins a pass within the budget: a unit of a group already there lengthens that group's row
    (`pack_rows` packs a pass's rows by group), another adds a row; a pass costs its rows x its longest row."""
    lengths = {g: p + t for g, (p, t, _) in pass_.items()}
    lengths[group] = lengths.get(group, prompt) + tokens
    return len(lengths) * max(lengths.values()) <= max_tokens
