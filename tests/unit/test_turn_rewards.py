"""Per-turn environment rewards at each turn's end for PPO's token-level rewards, and GAE over them."""

import torch

from posttrain.algos.advantages import gae, token_level_rewards


def _loop_gae(rewards, values, mask, gamma, lam):
    """GAE by hand over the masked positions of one row, in order (environment tokens skipped)."""
    idx = [t for t in range(len(mask)) if mask[t]]
    adv = [0.0] * len(mask)
    running = 0.0
    for j in reversed(range(len(idx))):
        t = idx[j]
        next_v = values[idx[j + 1]] if j + 1 < len(idx) else 0.0
        running = rewards[t] + gamma * next_v - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def test_two_turn_rewards_at_each_turns_last_policy_token():
    # turn 1: policy tokens 0-2, env tokens 3-4, turn 2: policy tokens 5-6, then padding (7)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 0]])
    r1, r2 = 0.5, 2.0
    turn = torch.zeros(1, 8)
    turn[0, 2], turn[0, 6] = r1, r2  # what run_trajectories puts in info["turn_rewards"]
    score = torch.tensor([r1 + r2 + 0.25])  # the env rewards' sum plus a reward function's 0.25
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0, 9.0, 0.4, 0.5, 9.0]]) * mask
    beta = 0.1
    out = token_level_rewards(beta * kl, score, mask, turn)
    expected = torch.tensor([[-0.01, -0.02, -0.03 + r1, 0, 0, -0.04, -0.05 + r2 + 0.25, 0]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(), score.sum() - beta * kl.sum())
    # without turn rewards the whole score sits at the last policy token (today's single-turn layout)
    plain = token_level_rewards(beta * kl, score, mask)
    assert torch.isclose(plain[0, 2], torch.tensor(-0.03)) and torch.isclose(plain[0, 6], torch.tensor(-0.05 + score.item()))
    values = torch.tensor([[0.3, -0.2, 0.1, 0.0, 0.0, 0.4, 0.2, 0.0]])
    adv, ret = gae(out, values, mask.float(), 0.9, 0.8)
    want = _loop_gae(out[0].tolist(), values[0].tolist(), mask[0].tolist(), 0.9, 0.8)
    torch.testing.assert_close(adv[0], torch.tensor(want))
    assert adv[0, 3] == 0 and adv[0, 4] == 0


def test_trajectory_places_turn_rewards(monkeypatch):
    from posttrain.envs import trajectory as tr

    t = tr._Trajectory(env=None, prompt=[1])
    t.extend([5, 6, 7], [-1.0, -1.0, -1.0], 1)
    t.reward_at.append((2, 0.5))
    t.extend([8, 9], (), 0)
    t.extend([10, 11], [-1.0, -1.0], 1)
    t.reward_at.append((6, 2.0))
    u = tr._Trajectory(env=None, prompt=[1, 2])
    u.extend([5], [-1.0], 1)

    class Tok:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=False):
            return ""

    rollout = tr._as_rollout([t, u], Tok(), torch.device("cpu"), 1)
    placed = rollout.info["turn_rewards"]
    assert placed.shape == rollout.completion_ids.shape
    assert placed[0].tolist() == [0, 0, 0.5, 0, 0, 0, 2.0] and placed[1].abs().sum() == 0
