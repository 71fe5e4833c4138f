"""posttrain/report/stats.py against values computed by hand, and its edge cases."""

import math

import pytest

from posttrain.report.stats import (_quantile, accuracy_with_interval, binomial_two_sided, bootstrap_interval, chi2_1_sf,
                                    compare_paired, mcnemar, paired_bootstrap_diff, wilson, z_value)

Z = 1.959963984540054


def test_wilson_43_of_100_by_hand():
    # p = .43, z² = 3.841459: centre (.43 + .0192073) / 1.0384146 = .432584, half 1.887456 · √(.002451 + .000096) = .095257
    lo, hi = wilson(43, 100)
    assert lo == pytest.approx(0.337333, abs=1e-6) and hi == pytest.approx(0.527846, abs=1e-6)
    assert (lo + hi) / 2 == pytest.approx((0.43 + Z * Z / 200) / (1 + Z * Z / 100), abs=1e-9)


def test_wilson_ends_and_empty():
    assert wilson(0, 10) == (0.0, pytest.approx(Z * Z / (10 + Z * Z)))  # 0/n: upper bound z²/(n + z²) = .2775
    assert wilson(10, 10) == (pytest.approx(10 / (10 + Z * Z)), 1.0)
    assert all(math.isnan(v) for v in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(5, 4)
    assert z_value(0.95) == pytest.approx(Z, abs=1e-9)


def test_wilson_coverage_is_near_95_percent():
    """Exact coverage over the binomial distribution: the Wald interval is known to fall short here, Wilson not."""
    for n, p in ((100, 0.43), (256, 0.5), (64, 0.1)):
        cover = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)
                    if wilson(k, n)[0] <= p <= wilson(k, n)[1])
        assert 0.93 <= cover <= 0.97, (n, p, cover)


def test_mcnemar_b10_c2_exact_by_hand():
    # 12 discordant pairs, min = 2: 2 · (C(12,0) + C(12,1) + C(12,2)) / 2¹² = 2 · 79 / 4096 = .0386
    t = mcnemar(10, 2)
    assert t.p_exact == pytest.approx(158 / 4096) and round(t.p_exact, 4) == 0.0386
    assert t.chi2 == pytest.approx(49 / 12)  # (|10 − 2| − 1)² / 12
    assert t.p_chi2 == pytest.approx(0.0433, abs=1e-4) and t.p == t.p_exact and t.method == "exact"
    assert mcnemar(2, 10).p == t.p  # two-sided: symmetric


def test_mcnemar_edges_and_large_counts():
    assert mcnemar(0, 0).p == 1.0 and mcnemar(7, 7).p == 1.0 and mcnemar(0, 0).chi2 == 0.0
    assert mcnemar(0, 5).p_exact == pytest.approx(2 / 32)  # 5 of 5 one way: 2 · (1/2)⁵
    near = mcnemar(400, 340)  # the exact and the corrected chi-square agree at large counts
    assert abs(near.p_exact - near.p_chi2) < 0.005 and near.p < 0.05
    big = mcnemar(3000, 2900)  # past EXACT_MAX the chi-square decides
    assert big.method == "chi2" and big.p == big.p_chi2 and math.isnan(big.p_exact)
    assert binomial_two_sided(3, 6) == 1.0 and chi2_1_sf(3.841459) == pytest.approx(0.05, abs=1e-6)
    with pytest.raises(ValueError):
        mcnemar(-1, 2)


def test_quantile_is_numpys_default():
    import numpy as np

    values = sorted([0.3, 1.0, 2.5, 2.5, 7.0, 9.25])
    for q in (0.0, 0.025, 0.5, 0.975, 1.0):
        assert _quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_bootstrap_interval_seeded_and_near_the_normal_one():
    values = [1] * 50 + [0] * 50
    lo, hi = bootstrap_interval(values, seed=3)
    assert (lo, hi) == bootstrap_interval(values, seed=3) and (lo, hi) != bootstrap_interval(values, seed=4)
    # the mean of 100 fair 0/1 values: standard error .05, so about .5 ± .098
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert bootstrap_interval([0.7] * 9) == (pytest.approx(0.7), pytest.approx(0.7))  # all equal: no spread
    assert all(math.isnan(v) for v in bootstrap_interval([]))


def test_paired_bootstrap_diff():
    first = [1, 0, 1, 1] * 25  # 75 %
    second = [1, 1, 1, 1] * 25  # 100 %: 25 prompts gained, none lost
    diff, lo, hi = paired_bootstrap_diff(first, second)
    # differences are 25 ones among 100: standard error √(.25 · .75 / 100) = .0433, about .25 ± .085
    assert diff == 0.25 and lo == pytest.approx(0.165, abs=0.015) and hi == pytest.approx(0.335, abs=0.015)
    assert paired_bootstrap_diff(first, first)[0:3] == (0.0, 0.0, 0.0)  # the same answers: no difference at all
    assert all(math.isnan(v) for v in paired_bootstrap_diff([], []))
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1], [1, 0])


def test_compare_paired_counts_and_accuracy():
    first = [1] * 10 + [0] * 2 + [1] * 30 + [0] * 58  # 40 %
    second = [0] * 10 + [1] * 2 + [1] * 30 + [0] * 58  # 32 %: 10 lost, 2 gained
    out = compare_paired(first, second)
    assert (out["first_only"], out["second_only"], out["n"]) == (10, 2, 100)
    assert out["diff"] == pytest.approx(-0.08) and out["p"] == pytest.approx(158 / 4096)
    assert out["diff_lo"] < out["diff"] < out["diff_hi"] < 0  # the loss is significant, so its interval excludes 0
    acc = accuracy_with_interval(first)
    assert acc["correct"] == 40 and acc["accuracy"] == 0.4 and (acc["lo"], acc["hi"]) == wilson(40, 100)
    assert math.isnan(accuracy_with_interval([])["accuracy"])


def test_heldout_files_to_summary_statistics(tmp_path):
    """attach_statistics: the baseline is the first measured stage when none is named sft; a masked verdict (None)
    leaves its prompt out of that stage's accuracy and of every pair that includes it; a non-0/1 reward gives none."""
    from posttrain.report.heldout import attach_statistics, compare_stages, write_outcomes

    def rows(correct):
        return [{"index": i, "prompt": f"q{i}", "completion": "", "reward": c, "correct": c} for i, c in enumerate(correct)]

    write_outcomes(tmp_path, "base", rows([0, 0, 1, 0, None]))
    write_outcomes(tmp_path, "tune", rows([1, 1, 1, 0, 1]))
    write_outcomes(tmp_path, "grpo", rows([1, 1, 1, 1, 1]))
    write_outcomes(tmp_path, "judge", [{"index": 0, "prompt": "q0", "completion": "", "reward": 0.3, "correct": None}])
    summary = {"stages": [{"name": n} for n in ("base", "tune", "rm", "grpo", "judge")]}
    attach_statistics(summary, tmp_path)
    by = {s["name"]: s for s in summary["stages"]}
    assert summary["baseline"] == "tune" and "vs_baseline" not in by["tune"]
    assert (by["base"]["heldout_n"], by["base"]["heldout_correct"]) == (4, 1)  # the masked prompt is left out
    assert by["base"]["vs_baseline"]["n"] == 4 and by["base"]["vs_baseline"]["baseline_only"] == 2
    g = by["grpo"]["vs_baseline"]
    assert (g["baseline_only"], g["stage_only"], g["n"], g["p"]) == (0, 1, 5, 1.0) and g["diff"] == pytest.approx(0.2)
    assert "heldout_n" not in by["rm"] and "heldout_n" not in by["judge"]
    assert compare_stages(tmp_path, "tune", "grpo")["second_only"] == 1 and compare_stages(tmp_path, "rm", "grpo") is None
