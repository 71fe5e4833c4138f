"""The batch-normalized advantage estimators, in float64 against hand-computed values (each test names its
equation): LitePPO's group-mean / batch-std, REINFORCE++, REINFORCE++-baseline, GPG, OPO."""

import math

import pytest
import torch

from posttrain.algos.advantages import group_advantages

R = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.35, 0.35, 0.0, 3.0], dtype=torch.float64)
G = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])  # group 1 has zero variance


def std(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def centered():
    means = {0: 0.75, 1: 0.35, 2: 1.5}
    return [float(r) - means[int(g)] for r, g in zip(R, G)]


def test_grpo_batch_std():
    """(r - mean_g) / std_batch (LitePPO sec. 4.1); the zero-variance group exactly 0."""
    a = group_advantages(R, G, "grpo_batch_std", eps=0.0)
    expected = [c / std(R.tolist()) for c in centered()]
    expected[4] = expected[5] = 0.0
    assert a.tolist() == pytest.approx(expected)


def test_reinforce_pp_whitens_over_the_batch_without_a_group_baseline():
    """REINFORCE++ eq. 6-7: (r - mean_batch) / std_batch; mean 0, std 1; equal rewards in a group are not zeroed."""
    a = group_advantages(R, G, "reinforce_pp", eps=0.0)
    m, s = float(R.mean()), std(R.tolist())
    assert a.tolist() == pytest.approx([(float(r) - m) / s for r in R])
    assert float(a.mean()) == pytest.approx(0.0, abs=1e-12) and float(a.std()) == pytest.approx(1.0)
    assert a[4] != 0


def test_reinforce_pp_baseline_group_mean_then_batch_std():
    """REINFORCE++-baseline sec. 3.3: (r - mean_g) / std_batch(r - mean_g)."""
    a = group_advantages(R, G, "reinforce_pp_baseline", eps=0.0)
    c = centered()
    assert a.tolist() == pytest.approx([x / std(c) for x in c])
    assert a[4] == 0 and a[5] == 0


def test_gpg_scales_by_the_fraction_of_informative_samples():
    """GPG eq. 8-9: (r - mean_g) * N / (N - M), M = 2 samples in the zero-variance group: alpha = 8 / 6."""
    a = group_advantages(R, G, "gpg")
    assert a.tolist() == pytest.approx([c * 8 / 6 for c in centered()])
    assert group_advantages(torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long), "gpg").tolist() == [0.0] * 4


def test_gdpo_normalizes_each_reward_within_its_group_before_the_sum():
    """GDPO eq. 4: sum_k w_k z_g(r_k). A reward with a 100x spread no longer drowns the other one, and a reward
    that is constant within a group contributes 0 there; a NaN sample stays masked and changes no statistic."""
    from posttrain.algos.advantages import grpo_advantages, per_reward_normalized_total

    group = torch.tensor([0, 0, 0, 1, 1, 1])
    correct = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # constant in group 1
    length = torch.tensor([100.0, 300.0, 200.0, 0.0, 100.0, 50.0], dtype=torch.float64)
    per_fn = torch.stack([correct, length])
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    total = per_reward_normalized_total(per_fn, weights, group, eps=1e-6)
    expected = grpo_advantages(correct, group, 1e-6) + 0.5 * grpo_advantages(length, group, 1e-6)
    torch.testing.assert_close(total, expected)
    assert total[3:].tolist() == pytest.approx((0.5 * grpo_advantages(length, group, 1e-6)[3:]).tolist())
    per_fn[1, 1] = float("nan")
    masked = per_reward_normalized_total(per_fn, weights, group, eps=1e-6)
    assert torch.isnan(masked[1]) and not torch.isnan(masked[[0, 2, 3, 4, 5]]).any()
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(masked[keep], grpo_advantages(correct[keep], group[keep], 1e-6)
                               + 0.5 * grpo_advantages(length[keep], group[keep], 1e-6))


def test_opo_length_weighted_baseline_by_hand():
    """OPO (Hao et al. 2025, eq. 5-6): A_i = r_i - sum_j l_j r_j / sum_j l_j within the group; no std division."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 1, 1])
    lengths = torch.tensor([2, 6, 4, 3, 9])
    a = group_advantages(rewards, group, "opo", lengths=lengths)
    b0 = (2 * 1.0) / (2 + 6 + 4)  # 1/6
    assert a.tolist() == pytest.approx([1 - b0, -b0, -b0, 0.0, 0.0], abs=1e-15)
    assert a[3] == 0 and a[4] == 0  # zero-variance group: exactly 0
    # equal lengths: the plain group mean (Dr. GRPO's advantage)
    same = group_advantages(rewards, group, "opo", lengths=torch.full((5,), 7))
    torch.testing.assert_close(same, group_advantages(rewards, group, "dr_grpo"), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="length"):
        group_advantages(rewards, group, "opo")


def test_opo_matches_a_loop_with_shuffled_noncontiguous_groups():
    gen = torch.Generator().manual_seed(3)
    group = torch.tensor([9, -1, 4])[torch.randint(0, 3, (30,), generator=gen)]
    rewards = torch.rand(30, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, 40, (30,), generator=gen)
    a = group_advantages(rewards, group, "opo", lengths=lengths)
    for i in range(30):
        members = [j for j in range(30) if group[j] == group[i]]
        b = sum(float(lengths[j] * rewards[j]) for j in members) / sum(int(lengths[j]) for j in members)
        assert a[i].item() == pytest.approx(float(rewards[i]) - b, abs=1e-12)
