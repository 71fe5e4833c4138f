"""Rollout-training mismatch correction: sampler log-probs perturbed by known amounts give exactly the
truncated or masked importance weights (token and sequence level) and the off-policy sequence mask."""

import math

import pytest
import torch

from posttrain.algos.rollout_correction import rollout_weights


def setup():
    old = torch.log(torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.6, 0.1]], dtype=torch.float64))
    # log(pi_old / pi_sampler) per token: known perturbations
    gaps = torch.tensor([[math.log(3.0), 0.0, math.log(0.5)], [math.log(1.5), math.log(1.2), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    return old, old - gaps, mask, gaps


def test_token_truncate_and_mask():
    old, sampler, mask, gaps = setup()
    w, m = rollout_weights(old, sampler, mask, "token_truncate", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.5], [1.5, 1.2, 0.0]], dtype=torch.float64))  # 3 truncated to 2; padding 0
    assert float(m["mismatch/truncated_fraction"]) == pytest.approx(1 / 5)
    w, m = rollout_weights(old, sampler, mask, "token_mask", cap=2.0, cap_low=0.6)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.0], [1.5, 1.2, 0.0]], dtype=torch.float64))  # 3 > 2 and 0.5 < 0.6 masked
    assert float(m["mismatch/masked_fraction"]) == pytest.approx(2 / 5)
    abs_gaps = (gaps.abs() * mask)
    assert float(m["mismatch/abs_logp_diff_max"]) == pytest.approx(math.log(3.0))
    assert float(m["mismatch/abs_logp_diff_mean"]) == pytest.approx(float(abs_gaps.sum() / 5))
    r = gaps.exp()
    assert float(m["mismatch/k3"]) == pytest.approx(float(((r - 1 - gaps) * mask).sum() / 5))


def test_sequence_truncate_and_mask():
    old, sampler, mask, _ = setup()
    # sequence weights: 3 * 1 * 0.5 = 1.5 and 1.5 * 1.2 = 1.8 (the padded token does not count)
    w, _ = rollout_weights(old, sampler, mask, "sequence_truncate", cap=1.6)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.5, 1.5], [1.6, 1.6, 0.0]], dtype=torch.float64))
    w, m = rollout_weights(old, sampler, mask, "sequence_mask", cap=1.6)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert float(m["mismatch/masked_fraction"]) == pytest.approx(2 / 5)


def test_off_policy_sequence_masking_drops_only_negative_advantage_far_sequences():
    old, sampler, mask, gaps = setup()
    # mean (sampler - old) gap: row 0 -(log 3 + log .5)/3 = -0.135; row 1 -(log 1.5 + log 1.2)/2 = -0.29: flip it
    w, m = rollout_weights(old, old + gaps, mask, "none", advantages=torch.tensor([-1.0, -1.0]), off_policy_delta=0.2)
    assert w[1].tolist() == [0.0, 0.0, 0.0] and w[0].tolist() == [1.0, 1.0, 1.0]
    assert float(m["mismatch/off_policy_masked"]) == 0.5
    w, _ = rollout_weights(old, old + gaps, mask, "none", advantages=torch.tensor([-1.0, 1.0]), off_policy_delta=0.2)
    assert w[1].tolist() == [1.0, 1.0, 0.0]  # positive advantage: kept
    with pytest.raises(ValueError, match="unknown rollout correction"):
        rollout_weights(old, sampler, mask, "tis")
