"""Top-q high-entropy token selection on a hand-made entropy table ("80/20", eq. 6) and the adaptive entropy
coefficient's direction and bounds."""

import pytest
import torch

from posttrain.algos.entropy_control import AdaptiveEntropyCoef, high_entropy_mask

ENTROPY = torch.tensor([[0.1, 2.0, 0.5, 9.0], [1.5, 0.2, 3.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the 7.0 is padding: never chosen, not counted


def test_top_q_picks_the_highest_entropy_real_tokens():
    # 7 real tokens; q = 0.3 -> ceil(2.1) = 3 tokens: 9.0, 3.0, 2.0
    assert high_entropy_mask(ENTROPY, MASK, 0.3).tolist() == [[False, True, False, True], [False, False, True, False]]
    assert high_entropy_mask(ENTROPY, MASK, 0.1).sum() == 1  # at least one: the 9.0
    assert high_entropy_mask(ENTROPY, MASK, 1.0).tolist() == MASK.bool().tolist()
    with pytest.raises(ValueError, match="top_q"):
        high_entropy_mask(ENTROPY, MASK, 0.0)


def test_ties_at_the_threshold_are_kept():
    entropy = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    assert high_entropy_mask(entropy, torch.ones(1, 4), 0.25).tolist() == [[True, True, True, False]]


def test_adaptive_entropy_coef_rises_below_target_falls_above_and_stays_bounded():
    ctl = AdaptiveEntropyCoef(0.01, target=1.0, lr=0.5, max_coef=0.05)
    assert ctl.update(0.2) > 0.01  # entropy below target: more bonus
    high = AdaptiveEntropyCoef(0.01, target=1.0, lr=0.5)
    assert high.update(3.0) < 0.01
    for _ in range(100):
        ctl.update(0.0)
    assert ctl.value == 0.05
