"""Failure-mode monitors: each fires on the step its condition starts, once, and stays quiet on a healthy run."""

import pytest

from posttrain.train.monitors import FailureMonitor, MonitorConfig, distinct_n, gold_key


def _run(rows, **options):
    monitor = FailureMonitor(MonitorConfig(**options))
    return [(a.step, a.kind) for step, row in enumerate(rows, 1) for a in monitor.observe(step, row)]


def test_healthy_run_raises_nothing():
    rows = [{"reward": 0.1 * i, "entropy": 2.0 - 0.05 * i, "kl/token_k3_mean": 0.01 * i, "completions/mean_length": 20 + i,
             "completions/distinct_2": 0.9, "completions/truncated_fraction": 0.0, "value_loss": 1.0 / i,
             "clip_ratio": 0.05, **({"eval/numeric/accuracy": 0.3 + 0.01 * i} if i % 3 == 0 else {})}
            for i in range(1, 12)]
    assert _run(rows) == []


def test_reward_hacking_is_proxy_up_while_gold_falls_from_its_best():
    rows = [{"reward": 0.2, "eval/numeric/accuracy": 0.40}, {"reward": 0.5, "eval/numeric/accuracy": 0.50},
            {"reward": 0.6, "eval/numeric/accuracy": 0.47},  # within the tolerance (0.05)
            {"reward": 0.8, "eval/numeric/accuracy": 0.30},  # hacked: proxy up, gold 0.20 below its best
            {"reward": 0.9, "eval/numeric/accuracy": 0.28},  # still hacked: not repeated
            {"reward": 0.95},  # a step without evaluation changes nothing
            {"reward": 0.97, "eval/numeric/accuracy": 0.27},  # still hacked: not repeated
            {"reward": 0.3, "eval/numeric/accuracy": 0.30}]  # proxy fell too: plain degradation, not hacking
    assert _run(rows) == [(4, "reward_hacking")]


def test_mode_collapse_length_explosion_and_kl_blowup():
    rows = [{"entropy": 2.0, "completions/mean_length": 10.0, "kl/token_k3_mean": 0.0},
            {"entropy": 1.0, "completions/mean_length": 25.0, "kl/token_k3_mean": 0.02},
            {"entropy": 0.4, "completions/mean_length": 31.0, "kl/token_k3_mean": 0.05},  # entropy 0.4 < 0.25 x 2.0; length 31 > 3 x 10
            {"entropy": 0.6, "completions/mean_length": 40.0, "kl/token_k3_mean": 0.9}]  # KL 18x in one step
    assert _run(rows) == [(3, "mode_collapse"), (3, "length_explosion"), (4, "kl_blowup")]


def test_an_alert_repeats_only_after_it_cleared():
    rows = [{"kl/token_k3_mean": 0.1}, {"kl/token_k3_mean": 6.0}, {"kl/token_k3_mean": 7.0}, {"kl/token_k3_mean": 1.0}, {"kl/token_k3_mean": 8.0}]
    assert _run(rows, kl_jump=1e9) == [(2, "kl_blowup"), (5, "kl_blowup")]


def test_truncation_and_ppo_instability():
    rows = [{"completions/truncated_fraction": 0.1, "value_loss": 1.0}, {"value_loss": 1.2}, {"value_loss": 0.8},
            {"value_loss": 30.0, "completions/truncated_fraction": 0.7}, {"value_loss": 1.0, "clip_ratio": 0.6}]
    # step 5: the value loss is back to normal but the clip fraction is high: still unstable, so not repeated
    assert _run(rows) == [(4, "length_explosion"), (4, "ppo_instability")]


def test_state_round_trip_continues_identically():
    rows = [{"entropy": 2.0, "kl/token_k3_mean": 0.1, "value_loss": 1.0}, {"entropy": 1.5, "kl/token_k3_mean": 0.2, "value_loss": 1.0},
            {"entropy": 1.0, "kl/token_k3_mean": 0.3, "value_loss": 1.0}, {"entropy": 0.3, "kl/token_k3_mean": 9.0, "value_loss": 50.0}]
    whole = _run(rows)
    first, second = FailureMonitor(), FailureMonitor()
    for step, row in enumerate(rows[:2], 1):
        first.observe(step, row)
    second.load_state_dict(first.state_dict())
    resumed = [(a.step, a.kind) for step, row in enumerate(rows[2:], 3) for a in second.observe(step, row)]
    assert resumed == whole == [(4, "mode_collapse"), (4, "kl_blowup"), (4, "ppo_instability")]


def test_distinct_n_and_gold_key_by_hand():
    assert distinct_n([[1, 2, 1, 2], [1, 2]]) == pytest.approx(2 / 4)  # bigrams 12 21 12 | 12 -> {12, 21}
    assert distinct_n([[5]]) == 1.0
    assert gold_key({"eval/numeric/mean_reward": 0.1, "eval/numeric/accuracy": 0.2}) == "eval/numeric/accuracy"
    assert gold_key({"eval/rm/mean_reward": 0.1}) == "eval/rm/mean_reward" and gold_key({"reward": 1}) is None


def test_disabled_monitor_and_unknown_options():
    assert _run([{"kl/token_k3_mean": 100.0}], enabled=False) == []
    from posttrain.train.online import _make_monitor

    with pytest.raises(ValueError, match="kl_max"):
        _make_monitor({"kl_maxx": 1.0})
