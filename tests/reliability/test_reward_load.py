"""Load (issue 7, point 6): a rollout batch whose reward function hangs on 20% of the samples and raises on 10%
finishes within the timeout plus a small slack, with those samples handled by `on_error` (zero: scored 0 and
counted in `rewards/<name>/errors`; raise: one clear error), directly and through a GRPO step."""

import math
import time

import pytest

import crash_worker
from posttrain.metrics import read_metrics
from posttrain.rewards.runner import RewardError, RewardRunner
from tiny import prompt_rows, run_config, tiny_model_dir, write_jsonl

TIMEOUT = 1.0


@pytest.fixture
def flaky():
    crash_worker.reset_flaky()
    yield crash_worker.flaky_reward
    crash_worker.RELEASE.set()  # let the abandoned threads finish


def expected_faults(n: int) -> tuple[int, int]:
    hang = sum(1 for k in range(n) if k % 10 in crash_worker.HANG_EVERY)
    crash = sum(1 for k in range(n) if k % 10 in crash_worker.RAISE_EVERY)
    return hang, crash


def test_runner_finishes_on_time_and_zeroes_and_counts_the_faulty_samples(flaky):
    n, workers = 20, 4
    hang, crash = expected_faults(n)
    assert (hang, crash) == (4, 2) and hang <= workers  # one wave of hung calls
    const = lambda prompts, completions, **_: [0.5] * len(completions)  # noqa: E731
    runner = RewardRunner([("flaky", flaky, 1.0), ("const", const, 2.0)], num_workers=workers, timeout_s=TIMEOUT, on_error="zero")
    start = time.monotonic()
    batch = runner(["p"] * n, ["c"] * n, answer=["1"] * n)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT + 1.5, elapsed
    assert sorted(batch.per_fn["flaky"]) == [0.0] * (hang + crash) + [1.0] * (n - hang - crash)
    assert batch.errors == {"flaky": hang + crash, "const": 0}
    assert batch.per_fn["const"] == [0.5] * n  # the other reward is untouched
    assert sorted(batch.total) == [1.0] * (hang + crash) + [2.0] * (n - hang - crash)
    metrics = batch.metrics()
    assert metrics["rewards/flaky/errors"] == 6.0 and metrics["rewards/flaky/mean"] == pytest.approx(14 / 20)
    assert not any(math.isnan(v) for v in batch.total)


def test_runner_with_on_error_raise_stops_at_the_first_fault_with_one_clear_error(flaky):
    runner = RewardRunner([("flaky", flaky, 1.0)], num_workers=4, timeout_s=TIMEOUT, on_error="raise")
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"reward 'flaky' failed on sample \d+: (RuntimeError: reward crashed|TimeoutError)"):
        runner(["p"] * 20, ["c"] * 20)
    assert time.monotonic() - start < TIMEOUT + 1.5


def test_a_hung_batched_reward_zeroes_the_batch_on_time():
    def hangs(prompts, completions, **_):
        crash_worker.RELEASE.wait(120)
        return [1.0] * len(completions)

    hangs.batched = True
    crash_worker.RELEASE.clear()
    runner = RewardRunner([("model", hangs, 1.0)], num_workers=2, timeout_s=TIMEOUT, on_error="zero")
    start = time.monotonic()
    try:
        batch = runner(["p"] * 8, ["c"] * 8)
    finally:
        crash_worker.RELEASE.set()
    assert time.monotonic() - start < TIMEOUT + 1.0
    assert batch.per_fn["model"] == [0.0] * 8 and batch.errors["model"] == 8


def test_a_grpo_step_with_a_hanging_and_crashing_reward_finishes_on_time(tmp_path, flaky):
    from posttrain.train.registry import run

    model = tiny_model_dir(tmp_path / "model")
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(10))
    n = 5 * 6
    hang, crash = expected_faults(n)
    assert (hang, crash) == (6, 3)
    cfg = run_config("grpo", tmp_path / "run", model, prompts, "algo.reward.functions=[crash_worker:flaky_reward]",
                     "algo.reward.on_error=zero", f"algo.reward.timeout_s={TIMEOUT}", "algo.reward.workers=8",
                     "algo.sampling.prompts_per_step=5", "algo.sampling.num_generations=6", "algo.sampling.max_new_tokens=4", "train.batch_size=30",
                     "train.max_steps=1", "train.num_threads=1", "data.eval_fraction=0")
    start = time.monotonic()
    run(cfg)
    elapsed = time.monotonic() - start
    [row] = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert row["rewards/flaky_reward/errors"] == float(hang + crash)
    assert row["rewards/flaky_reward/mean"] == pytest.approx((n - hang - crash) / n)
    assert row["skipped"] == 0.0 and math.isfinite(row["loss"])
    # the hung calls cost one timeout (8 workers, 6 hangs); the rest of the step (load, generate, export) is small
    assert row["step_time_s"] < TIMEOUT + 3.0, row["step_time_s"]
    assert elapsed < TIMEOUT + 15.0, elapsed
