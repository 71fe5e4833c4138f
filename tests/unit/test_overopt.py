"""Over-optimization measurement: best-of-n by hand, its analytic KL, PPO points from metrics; RM label noise."""

import math

import pytest
import torch

from posttrain.overopt import best_of_n_curve, bon_kl, rl_points
from posttrain.data.preference import swap_labels


def test_best_of_n_kl_by_hand():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert bon_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)


def test_best_of_n_picks_the_proxy_argmax_within_disjoint_groups():
    proxy = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.0, 0.8, 0.9]])
    gold = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    n1, n2, n4 = best_of_n_curve(gold, proxy, [1, 2, 4])
    assert n1["gold_reward"] == pytest.approx(gold.mean()) and n1["kl"] == 0.0
    # n=2, groups (0.1,0.9)->gold 0, (0.5,0.2)->1, (0.3,0.0)->0, (0.8,0.9)->0
    assert n2["gold_reward"] == pytest.approx(0.25) and n2["proxy_reward"] == pytest.approx((0.9 + 0.5 + 0.3 + 0.9) / 4)
    # n=4: 0.9 -> gold 0; 0.9 -> gold 0: the proxy's favourites are wrong, so gold falls as n grows
    assert n4["gold_reward"] == 0.0 and n4["proxy_reward"] == pytest.approx(0.9) and n4["step"] == 4
    with pytest.raises(ValueError, match="divide"):
        best_of_n_curve(gold, proxy, [3])


def test_rl_points_read_eval_steps_at_their_rollout_kl():
    rows = [{"step": 1, "kl/seq_k1_sum": 0.5, "reward": 1.0},
            {"step": 2, "kl/seq_k1_sum": 1.5, "eval/reward_model/mean_reward": 2.0, "eval/numeric/mean_reward": 0.4}]
    start = {"method": "ppo", "step": 0, "kl": 0.0, "gold_reward": 0.3, "proxy_reward": 0.1}
    rows.append({"step": 3, "kl/seq_k1_sum": -0.01})  # a slightly negative k1 estimate is clamped to 0
    rows.append({"step": 3, "final": True, "eval/reward_model/mean_reward": 3.0, "eval/numeric/mean_reward": 0.1})
    assert rl_points(rows, "numeric", start) == [
        start, {"method": "ppo", "step": 2, "kl": 1.5, "gold_reward": 0.4, "proxy_reward": 2.0},
        {"method": "ppo", "step": 3, "kl": 0.0, "gold_reward": 0.1, "proxy_reward": 3.0}]


def test_label_noise_swaps_a_seeded_fraction():
    pairs = [(f"c{i}", f"r{i}") for i in range(20)]
    noisy, flipped = swap_labels(pairs, 0.25, seed=3)
    assert flipped == 5 and sum(c.startswith("r") for c, _ in noisy) == 5
    assert noisy == swap_labels(pairs, 0.25, seed=3)[0] and swap_labels(pairs, 0.0, 3) == (pairs, 0)
    assert all(c.startswith("r") for c, _ in swap_labels(pairs, 1.0, 0)[0])
    with pytest.raises(ValueError, match="label_noise"):
        swap_labels(pairs, 1.5, 0)
