"""Choosing the next token from a decode step's logits: temperature, top-k, top-p and the draw itself.

Cost matters here: the vocabulary is ~50k, and a decode step of a 135M model on a CPU takes ~30 ms, so an
O(V log V) sort or V random numbers per row are a visible share of it. Hence:

- the draw is inverse-CDF sampling (one uniform per row, cumulative sums and binary searches) instead of
  `torch.multinomial`, which draws V exponential variates per row (measured: 14 ms of a 47 ms step for 16 rows);
  it runs in two levels, blocks then tokens, with float64 cumulative sums, so no cumulative sum runs over the
  whole vocabulary and rounding cannot move mass between tokens;
- no sort when top-p is off; with top-p on, only the `NUCLEUS_CANDIDATES` most likely tokens are sorted, and a
  row whose nucleus is not inside them (a very flat distribution) falls back to the full sort, so the kept set
  is exactly the one the full sort gives.

The reported log-prob of a token is log softmax(logits / T) of the FULL (unfiltered) distribution at that token,
not of the top-k/top-p renormalized one: that is what the trainer recomputes from a forward pass at the same
temperature, so the importance ratio is exactly 1 before any update. At T = 0 (greedy) the log-prob is at T = 1.
Top-p: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", sec. 3.1.
"""

from __future__ import annotations

import torch

from posttrain.rollout.base import SamplingParams

NUCLEUS_CANDIDATES = 1024  # tokens sorted for top-p before falling back to the full vocabulary
DRAW_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw


def _top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _nucleus_drop(sorted_logits: torch.Tensor, log_total: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the (descending) sorted tokens top-p removes: a token goes when the mass strictly before it
    already reaches top_p. log_total (R, 1): the log of the whole (filtered) distribution's normalizer."""
    probs = (sorted_logits - log_total).exp()
    return (probs.cumsum(dim=-1) - probs) >= top_p


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering: (R, V) -> (R, V) with removed tokens at -inf.

    top-p keeps the smallest set of most likely tokens whose probability (after top-k, renormalized) reaches
    top_p; the most likely token is always kept. top_k = 0 and top_p = 1 switch each filter off.
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        logits = _top_k_mask(logits, top_k)
    if top_p >= 1.0:
        return logits
    log_total = logits.logsumexp(dim=-1, keepdim=True)
    k = min(V, top_k if 0 < top_k < V else NUCLEUS_CANDIDATES)
    values, order = logits.topk(k, dim=-1)  # sorted, descending
    drop_sorted = _nucleus_drop(values, log_total, top_p)
    keep = logits.new_full(logits.shape, False, dtype=torch.bool).scatter(-1, order, ~drop_sorted)
    # a row whose candidates all survive may have its nucleus beyond them: redo those rows with the full sort
    overflow = (~drop_sorted[:, -1]) & (k < V) & torch.isfinite(values[:, -1])
    if bool(overflow.any()):
        rows = overflow.nonzero().squeeze(-1)
        full_values, full_order = logits[rows].sort(dim=-1, descending=True)
        full_keep = ~_nucleus_drop(full_values, log_total[rows], top_p)
        keep[rows] = keep.new_zeros((len(rows), V)).scatter(-1, full_order, full_keep)
    return logits.masked_fill(~keep, float("-inf"))


def _first_above(cdf: torch.Tensor, x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative sum exceeds x (R, 1), never one of zero mass: rounding can put x
    at or past the end, and the last index of positive mass is taken then. cdf, mass (R, n) -> (R, 1)."""
    n = cdf.shape[-1]
    positions = torch.arange(n, device=cdf.device)
    last_positive = torch.where(mass > 0, positions, 0).amax(dim=-1, keepdim=True)
    return torch.minimum(torch.searchsorted(cdf, x, right=True), last_positive)


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits) (R, V) -> (tokens (R,), log normalizer (R,) = logsumexp(logits)).

    Inverse-CDF sampling in two levels, so no cumulative sum runs over the whole vocabulary (a float64 cumsum of
    (64, 49152) took 40 ms): u ~ U[0, 1) times the total mass picks a block of `DRAW_BLOCK` tokens by the
    cumulative block masses, then a token inside it by the block's own cumulative masses (the last block holds
    the V mod DRAW_BLOCK remaining tokens). A token of probability 0 (-inf logit) is never drawn: the cumulative
    sums do not grow at it. One (R, V) temporary: on this kind of VM a fresh 12 MB buffer costs ~3 ms of page
    faults, more than the arithmetic.
    """
    R, V = logits.shape
    device = logits.device
    top = logits.amax(dim=-1, keepdim=True)
    weights = torch.sub(logits, top).exp_()  # (R, V) in [0, 1], the top token 1
    full = V // DRAW_BLOCK
    block_mass = weights[:, : full * DRAW_BLOCK].view(R, full, DRAW_BLOCK).sum(dim=-1)
    if full * DRAW_BLOCK < V:
        block_mass = torch.cat([block_mass, weights[:, full * DRAW_BLOCK :].sum(dim=-1, keepdim=True)], dim=-1)
    block_mass = block_mass.double()  # (R, blocks); an fp32 sum of 256 terms in [0, 1] is exact to ~1e-6
    block_cdf = block_mass.cumsum(dim=-1)
    total = block_cdf[:, -1:]
    u = torch.rand((R, 1), generator=generator, dtype=torch.float64, device=device) * total
    block = _first_above(block_cdf, u, block_mass)  # (R, 1)
    inside = u - (block_cdf.gather(-1, block) - block_mass.gather(-1, block))  # mass to walk inside the block
    index = block * DRAW_BLOCK + torch.arange(DRAW_BLOCK, device=device)  # (R, DRAW_BLOCK), may pass V in the last
    mass = weights.gather(-1, index.clamp(max=V - 1)).double().masked_fill_(index >= V, 0.0)
    offset = _first_above(mass.cumsum(dim=-1), inside, mass)
    tokens = (block * DRAW_BLOCK + offset).squeeze(-1)
    return tokens, (top.squeeze(-1).double() + total.squeeze(-1).log()).float()


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step: logits (R, V) -> (tokens (R,), logprobs (R,)).

    logprobs are log softmax(logits / T) of the unfiltered distribution at the chosen token (T = 1 when greedy).
    The input is never modified; at most one fp32 copy of it is made (for a bf16 input or T != 1).
    """
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        picked = logits.gather(-1, tokens[:, None]).squeeze(-1).float()
        return tokens, picked - logits.float().logsumexp(dim=-1)
    scaled = logits.float()
    if params.temperature != 1.0:
        scaled = scaled.div_(params.temperature) if scaled is not logits else scaled / params.temperature
    filtered = filter_logits(scaled, params.top_k, params.top_p)
    tokens, log_normalizer = draw(filtered, generator)
    if filtered is not scaled:  # the reported log-prob is of the unfiltered distribution
        log_normalizer = scaled.logsumexp(dim=-1)
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_normalizer
