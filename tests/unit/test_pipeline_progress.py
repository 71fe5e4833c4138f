"""The pipeline's progress line: stage i of n and the ETA from the finished stages' seconds per planned step."""

from posttrain.pipeline_progress import Progress, planned_steps


def test_progress_line_and_eta_by_hand():
    p = Progress([("sft", 24), ("dpo", 16), ("grpo", 8)])
    assert p.eta_s() is None
    assert p.line("sft", "sft") == "[pipeline] stage 1/3: sft (sft, 24 steps) · 0.0 s so far · ETA: after the first stage"
    p.finished("sft", 120.0)  # 5 s per step: 24 steps left -> 120 s
    assert p.eta_s() == 120.0
    assert p.line("dpo", "dpo") == "[pipeline] stage 2/3: dpo (dpo, 16 steps) · 2.0 min so far · ETA 2.0 min for 2 stages"
    p.finished("dpo", 200.0)  # 320 s over 40 steps: 8 s per step, 8 steps left
    assert p.eta_s() == 64.0
    assert p.line("grpo", "grpo").endswith("· 5.3 min so far · ETA 1.1 min for 1 stage")


def test_planned_steps_from_overrides_then_defaults():
    assert planned_steps({"train.max_steps": 7}, {"train.max_steps": 3}) == 3
    assert planned_steps({"train.max_steps": 7}, {}) == 7
    assert planned_steps({}, {}) == 100
