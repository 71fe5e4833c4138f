"""Numbers for people in the claims' texts: rounded, with units."""

from posttrain.report.claims import compute, models_in_memory
from posttrain.report.load import Stage
from posttrain.report.units import duration, gigabytes, number, percent


def test_units_by_hand():
    assert [duration(s) for s in (4.26, 25.28840864099766, 186.30393027799983, 1032.7890831749996, 9000.0)] == \
        ["4.3 s", "25 s", "3.1 min", "17.2 min", "2.5 h"]
    assert gigabytes(3.3449) == "3.34 GB" and percent(0.53125) == "53.1 %" and percent(None) == "—"
    assert [number(v) for v in (4.0, 3, 0.012345, 25.28840864099766, float("nan"), None)] == \
        ["4", "3", "0.0123", "25.3", "nan", "—"]


def test_claim_texts_are_rounded():
    """`posttrain demo --quick` once printed 'dpo: 25.28840864099766'."""
    stages = [Stage(n, n, None, summary={"wall_time_s": w, "models_in_memory": m})
              for n, w, m in (("ppo", 1032.7890831749996, 4.0), ("dpo", 25.28840864099766, 2.0), ("grpo", 186.30393027799983, 3.0))]
    assert compute(stages).measured == "ppo: 17.2 min, dpo: 25 s, grpo: 3.1 min"
    assert models_in_memory(stages).measured == "ppo: 4, dpo: 2, grpo: 3"
