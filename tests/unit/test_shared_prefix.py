"""One row per pair around the shared prompt gives the log-probs (and gradients) of two separate rows."""

import random

import pytest
import torch

from posttrain.data.chat import Encoded
from posttrain.data.collate import pad_encoded
from posttrain.data.packing import common_prefix, pack_groups, pack_pairs
from posttrain.models.forward import sequence_logps
from posttrain.models.shared_prefix import block_mask, grouped_token_logps, shared_prefix_logps
from posttrain.ops import IGNORE_INDEX
from tiny import tiny_llama

VOCAB = 40


def encoded(prompt: list[int], completion: list[int]) -> Encoded:
    return Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, len(prompt))


def random_pairs(seed: int, n: int = 5) -> list[tuple[Encoded, Encoded]]:
    """Prompts of 1-12 tokens; completions of 1-6 tokens that sometimes start alike (a longer common prefix)."""
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(4, VOCAB) for _ in range(k)]  # noqa: E731
    pairs = []
    for _ in range(n):
        prompt, common = tokens(rng.randint(1, 12)), tokens(rng.choice([0, 0, 2]))
        first, second = common + tokens(rng.randint(1, 6)), common + tokens(rng.randint(1, 6))
        if first == second:
            second = second + [5]
        pairs.append((encoded(prompt, first), encoded(prompt, second)))
    return pairs


@pytest.fixture(params=["sdpa", "eager"])
def model(request):
    m = tiny_llama(vocab_size=VOCAB, seed=3)
    m.config._attn_implementation = request.param
    return m.eval()


def separate(model, pairs):
    return sequence_logps(model, pad_encoded([a for a, _ in pairs] + [b for _, b in pairs], 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_row_equals_two_rows(model, seed):
    pairs = random_pairs(seed)
    sums, counts = shared_prefix_logps(model, pack_pairs(pairs, 0))
    ref_sums, ref_counts = separate(model, pairs)
    assert counts.tolist() == ref_counts.tolist() == [len(a) - a.prompt_len for a, _ in pairs] + [
        len(b) - b.prompt_len for _, b in pairs]
    torch.testing.assert_close(sums, ref_sums, atol=2e-5, rtol=1e-5)


def test_shared_row_gradients_equal_two_rows(model):
    pairs = random_pairs(7)
    weights = torch.randn(2 * len(pairs))

    def grads(fn):
        model.zero_grad()
        (fn()[0] * weights).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    shared = grads(lambda: shared_prefix_logps(model, pack_pairs(pairs, 0)))
    torch.testing.assert_close(shared, grads(lambda: separate(model, pairs)), atol=1e-5, rtol=1e-4)


def test_packed_layout_by_hand():
    """prompt [7 8], chosen [9 10], rejected [9 11 12]: the common prefix is [7 8 9] (the first answer token too)."""
    batch = pack_pairs([(encoded([7, 8], [9, 10]), encoded([7, 8], [9, 11, 12]))], pad_id=0)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 3, 4]]
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 2, 2]]
    # chosen: 9 from position 1, 10 from 2; rejected: 9 from 1, 11 from 2 (the shared prefix), 12 from row position 4
    assert batch["score_index"].tolist() == [1, 2, 1, 2, 4]
    assert batch["score_label"].tolist() == [9, 10, 9, 11, 12]
    assert batch["score_seq"].tolist() == [0, 0, 1, 1, 1]
    mask = block_mask(batch["segments"])[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],   # the chosen tail sees the prefix and itself
                    [1, 1, 1, 0, 1, 0],   # the rejected tail never sees the chosen tail
                    [1, 1, 1, 0, 1, 1]]


def test_padding_rows_see_only_themselves():
    segments = torch.tensor([[0, 1, 2, -1, -1]])
    mask = block_mask(segments)[0, 0]
    assert mask[3].tolist() == [False, False, False, True, False] and mask[4, 4]
    additive = block_mask(segments, torch.float32)[0, 0]
    assert additive[4, 4] == 0 and additive[4, 0] == torch.finfo(torch.float32).min


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


# --- a GRPO group: one prompt, G completions -------------------------------------------------------------------

def random_groups(seed: int, n: int = 3) -> tuple[list[list[int]], list[list[list[int]]]]:
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(4, VOCAB) for _ in range(k)]  # noqa: E731
    prompts = [tokens(rng.randint(1, 10)) for _ in range(n)]
    completions = [[tokens(rng.randint(1, 6)) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    return prompts, completions


def padded_completion_logps(model, prompts, completions, temperature=1.0):
    """The reference: each (prompt, completion) alone in its own row, batch of 1, no padding at all."""
    from posttrain.models.forward import token_logps

    width = max(len(c) for cs in completions for c in cs)
    logps, ents = [], []
    for prompt, cs in zip(prompts, completions):
        for c in cs:
            ids = torch.tensor([prompt + c])
            labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + c])
            lp, ent = token_logps(model, ids, torch.ones_like(ids), labels, with_entropy=True, temperature=temperature)
            pad = lambda x: torch.nn.functional.pad(x[0, len(prompt):], (0, width - len(c)))  # noqa: E731
            logps.append(pad(lp))
            ents.append(pad(ent))
    return torch.stack(logps), torch.stack(ents), width


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_row_equals_separate_rows(model, seed):
    prompts, completions = random_groups(seed)
    ref_logp, ref_ent, width = padded_completion_logps(model, prompts, completions, temperature=0.7)
    logp, ent = grouped_token_logps(model, pack_groups(prompts, completions, 0), width, with_entropy=True, temperature=0.7)
    torch.testing.assert_close(logp, ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=2e-5, rtol=1e-5)
    lengths = [len(c) for cs in completions for c in cs]
    assert [(row != 0).sum().item() for row in logp] == lengths  # zeros past each completion's end


def test_group_row_gradients_equal_separate_rows(model):
    prompts, completions = random_groups(5)
    _, _, width = padded_completion_logps(model, prompts, completions)
    weights = torch.randn(sum(len(cs) for cs in completions), width)

    def grads(fn):
        model.zero_grad()
        (fn() * weights).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    shared = grads(lambda: grouped_token_logps(model, pack_groups(prompts, completions, 0), width))
    torch.testing.assert_close(shared, grads(lambda: padded_completion_logps(model, prompts, completions)[0]),
                               atol=1e-5, rtol=1e-4)


def test_group_layout_by_hand():
    """prompt [7 8] with completions [9 10] and [11]; prompt [5] with [6 6 6]."""
    batch = pack_groups([[7, 8], [5]], [[[9, 10], [11]], [[6, 6, 6]]], pad_id=0)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 11], [5, 6, 6, 6, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    assert batch["segments"].tolist() == [[0, 0, 1, 1, 2], [0, 1, 1, 1, -1]]
    # 9 and 11 are both predicted by the prompt's last state (row position 1); row 2 starts at flat index 5
    assert batch["score_index"].tolist() == [1, 2, 1, 5, 6, 7]
    assert batch["score_label"].tolist() == [9, 10, 11, 6, 6, 6]
    assert batch["score_seq"].tolist() == [0, 0, 1, 2, 2, 2]
    assert batch["score_pos"].tolist() == [0, 1, 0, 0, 1, 2]
    assert block_mask(batch["segments"])[0, 0, 4].int().tolist() == [1, 1, 0, 0, 1]  # [11] never sees [9 10]


def test_group_needs_a_prompt():
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_groups([[]], [[[1, 2]]], 0)
