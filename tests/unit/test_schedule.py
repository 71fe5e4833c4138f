"""The learning-rate schedule (train.loop.make_scheduler): linear warmup, then cosine, linear or constant."""

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.train.loop import make_scheduler


def _scheduler(schedule: str, warmup: int, total: int, lr: float = 1.0):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return optimizer, make_scheduler(optimizer, TrainConfig(schedule=schedule, warmup_steps=warmup), total)


def _factors(schedule: str, warmup: int, total: int, updates) -> list[float]:
    _, scheduler = _scheduler(schedule, warmup, total)
    return [scheduler.lr_lambdas[0](u) for u in updates]


# warmup 3 then 10 decay updates (total 13): warmup factors (u + 1) / (warmup + 1) = 1/4, 2/4, 3/4, then the
# schedule at progress (u - 3) / 10, held at its end value past the total
UPDATES = [0, 1, 2, 3, 5, 8, 12, 13, 20]
WARMUP = [0.25, 0.5, 0.75]


@pytest.mark.parametrize("schedule,after_warmup", [
    # u = 3, 5, 8, 12, 13, 20: progress 0, 0.2, 0.5, 0.9, 1, 1 (clamped); cosine (1 + cos(pi p)) / 2
    ("cosine", [1.0, 0.9045085, 0.5, 0.0244717, 0.0, 0.0]),
    ("linear", [1.0, 0.8, 0.5, 0.1, 0.0, 0.0]),
    ("constant", [1.0] * 6),
])
def test_factors_with_warmup(schedule, after_warmup):
    assert _factors(schedule, 3, 13, UPDATES) == pytest.approx(WARMUP + after_warmup, abs=1e-7)


def test_no_warmup_starts_at_the_full_rate():
    # progress u / 4: (1 + cos(pi/4)) / 2 = 0.8535534, (1 + cos(3 pi/4)) / 2 = 0.1464466
    assert _factors("cosine", 0, 4, [0, 1, 2, 3, 4]) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0], abs=1e-7)
    assert _factors("linear", 0, 4, [0, 1, 2, 3, 4]) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_the_optimizer_sees_base_lr_times_the_factor_at_each_step():
    optimizer, scheduler = _scheduler("linear", 2, 6, lr=2e-3)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # updates 0..6: 1/3, 2/3 (warmup), then progress (u - 2) / 4 = 0, 1/4, 1/2, 3/4, 1
    assert seen == pytest.approx([2e-3 * f for f in (1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0)])


def test_a_total_within_the_warmup_does_not_divide_by_zero():
    assert _factors("cosine", 3, 2, [2, 3, 4]) == pytest.approx([0.75, 1.0, 0.0])


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match=r"unknown schedule 'cosinus'; use cosine, linear or constant"):
        _scheduler("cosinus", 0, 10)


def test_an_unknown_schedule_is_refused_before_training_even_with_warmup():
    """Checked when the scheduler is made: a typo no longer trains through the warmup before it stops the run."""
    with pytest.raises(ValueError, match="unknown schedule"):
        _scheduler("cosinus", 5, 10)
