"""RewardRunner: weighted total, per-function metrics, per-sample errors and timeouts; the ensemble."""

import math
import threading
import time

import pytest

from posttrain.rewards.runner import RewardError, RewardRunner, combine, ensemble, nan_stats


def length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def matches(prompts, completions, answer, **_):
    return [float(c == a) for c, a in zip(completions, answer)]


def test_weighted_total_and_metrics_by_hand():
    runner = RewardRunner([("len", length, 0.5), ("exact", matches, 2.0)], num_workers=2, timeout_s=10)
    batch = runner(["p"] * 3, ["a", "bb", "ccc"], answer=["a", "x", "ccc"])
    assert batch.per_fn == {"len": [1.0, 2.0, 3.0], "exact": [1.0, 0.0, 1.0]}
    assert batch.total == [2.5, 1.0, 3.5]
    metrics = batch.metrics()
    assert metrics["rewards/len/mean"] == 2.0
    assert metrics["rewards/len/std"] == pytest.approx(math.sqrt(2 / 3))
    assert metrics["rewards/exact/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/total/mean"] == pytest.approx(7 / 3)
    assert metrics["rewards/len/errors"] == 0.0 and metrics["rewards/len/masked"] == 0.0


def test_each_sample_sees_its_own_columns():
    seen = []

    def spy(prompts, completions, answer, **_):
        seen.append((prompts[0], completions[0], answer[0]))
        return [0.0]

    RewardRunner([("spy", spy, 1.0)], num_workers=3)(["p0", "p1", "p2"], ["c0", "c1", "c2"], answer=["a0", "a1", "a2"])
    assert sorted(seen) == [("p0", "c0", "a0"), ("p1", "c1", "a1"), ("p2", "c2", "a2")]


def hangs_on_sample_5(prompts, completions, **_):
    if completions[0] == "5":
        threading.Event().wait()  # forever
    return [1.0]


def test_a_hanging_reward_does_not_block_the_batch():
    runner = RewardRunner([("slow", hangs_on_sample_5, 1.0), ("len", length, 1.0)], num_workers=2, timeout_s=0.5,
                          on_error="zero")
    start = time.monotonic()
    batch = runner(["p"] * 8, [str(i) for i in range(8)])
    assert time.monotonic() - start < 0.5 + 1.0
    assert batch.per_fn["slow"] == [1.0] * 5 + [0.0] + [1.0] * 2
    assert batch.errors == {"slow": 1, "len": 0}
    assert batch.metrics()["rewards/slow/errors"] == 1.0
    assert batch.total == [2.0] * 5 + [1.0] + [2.0] * 2


def test_a_hang_raises_naming_the_reward_and_sample():
    runner = RewardRunner([("slow", hangs_on_sample_5, 1.0)], num_workers=2, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(RewardError, match="reward 'slow' failed on sample 5: TimeoutError"):
        runner(["p"] * 8, [str(i) for i in range(8)])
    assert time.monotonic() - start < 0.3 + 1.0


def raises_on_b(prompts, completions, **_):
    if completions[0] == "b":
        raise KeyError("boom")
    return [1.0]


def test_a_raising_reward_raises_or_is_zeroed_and_counted():
    with pytest.raises(RewardError, match="reward 'bad' failed on sample 1: KeyError"):
        RewardRunner([("bad", raises_on_b, 1.0)])(["p"] * 3, ["a", "b", "c"])
    batch = RewardRunner([("bad", raises_on_b, 1.0)], on_error="zero")(["p"] * 3, ["a", "b", "c"])
    assert batch.per_fn["bad"] == [1.0, 0.0, 1.0] and batch.errors["bad"] == 1


def test_a_wrong_number_of_values_is_an_error():
    with pytest.raises(RewardError, match="returned 2 values for 1 samples"):
        RewardRunner([("two", lambda p, c, **_: [1.0, 2.0], 1.0)])(["p"], ["c"])


def test_batched_rewards_are_called_once_on_the_whole_batch():
    calls = []

    def model_like(prompts, completions, **_):
        calls.append(len(completions))
        return [0.5] * len(completions)

    model_like.batched = True
    batch = RewardRunner([("rm", model_like, 1.0)])(["p"] * 4, ["c"] * 4)
    assert calls == [4] and batch.total == [0.5] * 4


def test_masked_samples_propagate_to_the_total_but_not_from_weight_zero():
    def masks_first(prompts, completions, **_):
        return [math.nan if completions[0] == "a" else 1.0]

    batch = RewardRunner([("m", masks_first, 1.0), ("len", length, 1.0)])(["p", "p"], ["a", "bb"])
    assert math.isnan(batch.total[0]) and batch.total[1] == 3.0
    metrics = batch.metrics()
    assert metrics["rewards/m/masked"] == 1.0 and metrics["rewards/m/mean"] == 1.0
    assert combine({"m": [math.nan], "len": [2.0]}, {"m": 0.0, "len": 1.0}) == [2.0]


def test_nan_stats():
    assert nan_stats([1.0, math.nan, 3.0]) == (2.0, 1.0, 1.0)
    mean, std, masked = nan_stats([math.nan])
    assert math.isnan(mean) and math.isnan(std) and masked == 1.0


def test_ensemble_mean_minus_k_std():
    a = lambda p, c, **_: [1.0, 2.0]  # noqa: E731
    b = lambda p, c, **_: [3.0, 2.0]  # noqa: E731
    assert ensemble([a, b])(["p", "p"], ["x", "y"]) == [2.0, 2.0]
    assert ensemble([a, b], k=0.5)(["p", "p"], ["x", "y"]) == [1.5, 2.0]  # std of (1, 3) is 1
    nan = lambda p, c, **_: [math.nan, 0.0]  # noqa: E731
    out = ensemble([a, nan])(["p", "p"], ["x", "y"])
    assert math.isnan(out[0]) and out[1] == 1.0


def test_runner_validates_its_arguments():
    with pytest.raises(ValueError, match="on_error"):
        RewardRunner([("a", length, 1.0)], on_error="ignore")
    with pytest.raises(ValueError, match="unique"):
        RewardRunner([("a", length, 1.0), ("a", length, 1.0)])
    with pytest.raises(ValueError, match="same length"):
        RewardRunner([("a", length, 1.0)])(["p"], ["c", "d"])
