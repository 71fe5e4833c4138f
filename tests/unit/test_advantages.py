import math

import pytest
import torch

from posttrain.algos.advantages import ADVANTAGE_ESTIMATORS, gae, group_advantages, group_is_degenerate

EPS = 1e-6


def _loop_reference(name, rewards, group):
    """Per-group Python loop, written independently of the vectorized code."""
    out = [0.0] * len(rewards)
    for g in set(group):
        idx = [i for i, x in enumerate(group) if x == g]
        rs = [rewards[i] for i in idx]
        n, mean = len(rs), sum(rs) / len(rs)
        if max(rs) == min(rs):
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (n - 1))
        for i in idx:
            if name == "grpo":
                out[i] = (rewards[i] - mean) / (std + EPS)
            elif name == "dr_grpo":
                out[i] = rewards[i] - mean
            else:
                out[i] = rewards[i] - (sum(rs) - rewards[i]) / (n - 1)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_loop_with_shuffled_noncontiguous_ids(name):
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([7, 100, 3, -2, 55])
    group = ids[torch.randint(0, 5, (40,), generator=gen)]  # interleaved, uneven sizes, non-contiguous ids
    group = torch.cat([group, torch.tensor([999])])  # a group of one
    rewards = torch.rand(41, generator=gen, dtype=torch.float64)
    rewards[group == 3] = 0.35  # one degenerate group
    adv = ADVANTAGE_ESTIMATORS[name](rewards, group, EPS)
    ref = _loop_reference(name, rewards.tolist(), group.tolist())
    torch.testing.assert_close(adv, ref, rtol=1e-10, atol=1e-10)
    assert (adv[group == 3] == 0).all() and adv[-1] == 0


def test_grpo_hand_values_use_unbiased_std():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), "grpo")
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # n - 1 = 3
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + EPS))


def test_rloo_hand_values():
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([4, 4, 4]), "rloo")
    torch.testing.assert_close(adv, torch.tensor([0.0, -1.5, 1.5]))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value", [0.35, 1.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equal_rewards_give_exactly_zero(name, value, dtype):
    rewards = torch.full((7,), value, dtype=dtype)
    adv = group_advantages(rewards, torch.zeros(7, dtype=torch.long), name)
    assert adv.dtype == dtype and torch.isfinite(adv).all() and (adv == 0).all()


def test_naive_mean_subtraction_leaves_residue_that_we_remove():
    # why the explicit max == min test exists: 0.35 seven times has a float32 mean that is not 0.35
    r = torch.full((7,), 0.35)
    naive = (r - r.mean()) / (r.std() + EPS)
    assert (naive != 0).any()
    assert (group_advantages(r, torch.zeros(7, dtype=torch.long), "grpo") == 0).all()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_permuting_rows_permutes_advantages(name):
    gen = torch.Generator().manual_seed(1)
    group = torch.arange(6).repeat_interleave(4)
    rewards = torch.randint(0, 3, (24,), generator=gen).float() / 2
    perm = torch.randperm(24, generator=gen)
    adv = group_advantages(rewards, group, name)
    assert torch.equal(group_advantages(rewards[perm], group[perm], name), adv[perm])


def test_group_is_degenerate():
    rewards = torch.tensor([0.35, 0.35, 1.0, 0.0, 5.0, 2.0, 2.0])
    group = torch.tensor([9, 9, 1, 1, 4, 3, 3])
    assert group_is_degenerate(rewards, group).tolist() == [True, True, False, False, True, True, True]


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="grpo"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), "nope")


def _gae_loop(rewards, values, length, gamma, lam):
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        last = rewards[t] + gamma * next_v - values[t] + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_per_sequence_loop_on_right_padded_data():
    gen = torch.Generator().manual_seed(2)
    B, T, gamma, lam = 6, 9, 0.97, 0.9
    lengths = torch.tensor([9, 1, 5, 3, 8, 2])
    mask = (torch.arange(T) < lengths[:, None]).float()
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)  # junk after the end must be ignored
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        ref[b] = torch.tensor(_gae_loop(rewards[b].tolist(), values[b].tolist(), int(lengths[b]), gamma, lam))
    torch.testing.assert_close(adv, ref)
    torch.testing.assert_close(ret, (ref + values) * mask)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand_computed_three_steps():
    # r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma = 0.9, lam = 0.8, then one padded step with junk values
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.7  # terminal: no bootstrap
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    d0 = 0.0 + 0.9 * 0.6 - 0.5
    a2, a1 = d2, d1 + 0.72 * d2
    a0 = d0 + 0.72 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]], dtype=torch.float64))


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 2.0]])
    values = torch.tensor([[0.3, -0.1, 0.4]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.full((1, 3), 2.0))
    torch.testing.assert_close(adv, 2.0 - values)
