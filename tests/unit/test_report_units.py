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


def _ppo(name, beta, rewards, diff, p, model="rm/final"):
    from posttrain.report.load import Stage

    rows = [{"step": i, "loss": 1.0, "reward": r} for i, r in enumerate(rewards, 1)]
    return Stage(name, "ppo", None, rows=rows, config={"algo": {"kl": {"beta": beta}, "reward": {"model": model}}},
                 summary={"vs_baseline": {"baseline": "sft", "diff": diff, "p": p}})


def test_reward_hacking_claim_by_hand():
    from posttrain.report.claims import CONFIRMED, NOT_CONFIRMED, NOT_MEASURED, NOT_SETTLED, proxy_rise, reward_hacking

    rising = [0.1, 0.2, 0.3, 0.5, 0.6, 0.9]  # first third 0.15, last third 0.75
    assert proxy_rise([{"reward": r} for r in rising]) == 0.6
    hack, kept = _ppo("ppo_nokl", 0.0, rising, -0.08, 0.01), _ppo("ppo", 0.05, rising, 0.01, 0.8)
    result = reward_hacking([kept, hack])
    assert result.verdict == CONFIRMED
    assert result.measured == ("ppo (KL β = 0.05): trained reward +0.6 first→last third, held-out accuracy +1.0 pts vs "
                               "sft (p = 0.8); ppo_nokl (KL β = 0): trained reward +0.6 first→last third, held-out "
                               "accuracy -8.0 pts vs sft (p = 0.01)")
    assert reward_hacking([kept]).verdict == NOT_MEASURED  # every stage has a KL penalty
    assert reward_hacking([_ppo("x", 0.0, rising, -0.01, 0.7)]).verdict == NOT_SETTLED
    assert reward_hacking([_ppo("x", 0.0, rising, 0.1, 0.001)]).verdict == NOT_CONFIRMED
    assert reward_hacking([_ppo("x", 0.0, rising, -0.1, 0.001, model=None)]).verdict == NOT_MEASURED  # a verifier


def test_memory_claim_by_hand():
    from posttrain.report.claims import CONFIRMED, NOT_CONFIRMED, NOT_MEASURED, grpo_memory

    def stages(ppo, grpo):
        return [Stage("ppo", "ppo", None, summary={"peak_mem_gb": ppo}), Stage("grpo", "grpo", None, summary={"peak_mem_gb": grpo})]

    assert grpo_memory(stages(4.0, 2.0)).verdict == CONFIRMED
    assert grpo_memory(stages(4.0, 2.0)).measured == "ppo: 4.00 GB, grpo: 2.00 GB: GRPO 50 % less (claimed 50 ± 15 %)"
    assert grpo_memory(stages(4.0, 3.6)).verdict == NOT_CONFIRMED  # 10 % less
    assert grpo_memory(stages(2.0, 2.5)).measured.endswith("GRPO 25 % more (claimed 50 ± 15 %)")
    assert grpo_memory(stages(4.0, None)).verdict == NOT_MEASURED
