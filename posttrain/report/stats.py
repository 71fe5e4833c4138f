"""Intervals and paired tests for held-out accuracies: pure functions of counts or 0/1 lists, no torch.

Every stage of a pipeline answers the same held-out prompts, so two stages are compared prompt by prompt (a
paired design): what decides is the prompts one stage gets right and the other wrong (the discordant pairs),
not the two accuracies' separate intervals, which overlap long after a paired test has separated them.

- `wilson`: the Wilson score interval for a proportion (Wilson 1927; recommended over the normal "Wald" interval
  by Brown, Cai & DasGupta 2001, Statistical Science 16(2), because it keeps its coverage near 0 and 1 and
  never leaves [0, 1]).
- `bootstrap_interval`: the percentile bootstrap (Efron & Tibshirani 1993, An Introduction to the Bootstrap,
  ch. 13), seeded, so the same data give the same interval.
- `mcnemar`: McNemar's test (McNemar 1947) for paired 0/1 outcomes; exact form: under H0 each of the b + c
  discordant pairs is equally likely to go either way, so min(b, c) ~ Binomial(b + c, 1/2), two-sided
  (Agresti 2013, Categorical Data Analysis, §11.1); its chi-square form with Edwards' continuity correction
  (|b − c| − 1)² / (b + c), 1 degree of freedom, for large counts.
- `paired_bootstrap_diff`: the percentile bootstrap of the accuracy difference, resampling prompts (both
  stages' answers to a prompt stay together).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

LEVEL = 0.95
EXACT_MAX = 5000  # discordant pairs above which McNemar's p is the chi-square's (the exact sum's big integers grow)
NAN = float("nan")


def z_value(level: float = LEVEL) -> float:
    """The two-sided normal quantile: 1.959964 for 95 %."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for a proportion successes / n.

    With p̂ = k/n and z the normal quantile: centre (p̂ + z²/2n) / (1 + z²/n), half-width
    z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²). n = 0 carries no information: (nan, nan).
    """
    if not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return NAN, NAN
    z = z_value(level)
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at k = 0 or k = n one bound is exactly 0 or 1; rounding must not put it a hair outside
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, 'type 7')."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _resampled_means(columns: list[list[float]], resamples: int, seed: int) -> list[list[float]]:
    """For each of `resamples` draws of n indices with replacement, the mean of every column at those indices."""
    import numpy as np

    data = np.asarray(columns, dtype=np.float64)  # (columns, n)
    rng = np.random.default_rng(seed)
    n = data.shape[1]
    out = []
    for start in range(0, resamples, 500):  # chunks bound the (draws, n) index array's memory
        idx = rng.integers(0, n, size=(min(500, resamples - start), n))
        out.append(data[:, idx].mean(axis=2))  # (columns, draws)
    return np.concatenate(out, axis=1).tolist()


def bootstrap_interval(values: list[float], resamples: int = 2000, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: the (1 − level)/2 and (1 + level)/2 quantiles of the means of
    `resamples` samples of len(values) drawn with replacement. Empty input: (nan, nan)."""
    if not values:
        return NAN, NAN
    means = sorted(_resampled_means([list(values)], resamples, seed)[0])
    return _quantile(means, (1 - level) / 2), _quantile(means, (1 + level) / 2)


def binomial_two_sided(k: int, n: int) -> float:
    """Two-sided p of k successes in n fair coin flips: 2 · P(X ≤ min(k, n − k)), capped at 1 (the binomial at
    p = 1/2 is symmetric, so doubling the smaller tail is the same as summing every outcome as unlikely)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


def chi2_1_sf(x: float) -> float:
    """P(χ²₁ > x) = erfc(√(x/2))."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2))


@dataclass(frozen=True)
class McNemar:
    b: int  # pairs where the first is right and the second wrong
    c: int  # pairs where the first is wrong and the second right
    p_exact: float
    chi2: float  # (|b − c| − 1)² / (b + c), continuity-corrected; 0 when b + c = 0
    p_chi2: float
    p: float  # the exact p up to EXACT_MAX discordant pairs, the chi-square's above
    method: str  # "exact" | "chi2"


def mcnemar(b: int, c: int) -> McNemar:
    """McNemar's test of b against c discordant pairs (see the module docstring). No discordant pair: p = 1."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar: counts must be >= 0, got b={b}, c={c}")
    n = b + c
    chi2 = (max(abs(b - c) - 1, 0) ** 2 / n) if n else 0.0
    p_chi2 = chi2_1_sf(chi2) if n else 1.0
    exact = binomial_two_sided(min(b, c), n) if n <= EXACT_MAX else NAN
    use_exact = n <= EXACT_MAX
    return McNemar(b, c, exact, chi2, p_chi2, exact if use_exact else p_chi2, "exact" if use_exact else "chi2")


def paired_bootstrap_diff(first: list[int], second: list[int], resamples: int = 2000, level: float = LEVEL,
                          seed: int = 0) -> tuple[float, float, float]:
    """(mean(second) − mean(first), lo, hi): the percentile bootstrap interval of the accuracy difference,
    resampling prompts so that both answers to one prompt are drawn together. Empty: all nan."""
    if len(first) != len(second):
        raise ValueError(f"paired_bootstrap_diff: {len(first)} against {len(second)} outcomes; pairs need equal lengths")
    if not first:
        return NAN, NAN, NAN
    diffs = [float(s) - float(f) for f, s in zip(first, second)]
    means = sorted(_resampled_means([diffs], resamples, seed)[0])
    return sum(diffs) / len(diffs), _quantile(means, (1 - level) / 2), _quantile(means, (1 + level) / 2)


def accuracy_with_interval(outcomes: list[int], level: float = LEVEL) -> dict:
    """{n, correct, accuracy, lo, hi} with the Wilson interval, for a list of 0/1 outcomes."""
    n, k = len(outcomes), int(sum(outcomes))
    lo, hi = wilson(k, n, level)
    return {"n": n, "correct": k, "accuracy": k / n if n else NAN, "lo": lo, "hi": hi}


def compare_paired(first: list[int], second: list[int], resamples: int = 2000, seed: int = 0) -> dict:
    """`second` against `first` on the same prompts: the difference with its paired-bootstrap interval, the
    discordant counts and McNemar's test. Keys: n, diff, diff_lo, diff_hi, first_only, second_only, p, p_exact,
    chi2, p_chi2, test."""
    if len(first) != len(second):
        raise ValueError(f"compare_paired: {len(first)} against {len(second)} outcomes on what must be the same prompts")
    first_only = sum(1 for f, s in zip(first, second) if f and not s)
    second_only = sum(1 for f, s in zip(first, second) if s and not f)
    diff, lo, hi = paired_bootstrap_diff(first, second, resamples, seed=seed)
    test = asdict(mcnemar(first_only, second_only))
    return {"n": len(first), "diff": diff, "diff_lo": lo, "diff_hi": hi, "first_only": first_only,
            "second_only": second_only, "p": test["p"], "p_exact": test["p_exact"], "chi2": test["chi2"],
            "p_chi2": test["p_chi2"], "test": f"McNemar ({test['method']})"}
