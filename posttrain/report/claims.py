"""The claims of the usual PPO / DPO / GRPO comparison table, checked against what a run measured.

The usual table (e.g. the DPO paper, Rafailov et al. 2023 §1, and the DeepSeekMath GRPO paper, Shao et al.
2024 §4.1, which drops PPO's critic):

    |                  | PPO  | DPO  | GRPO   |
    | models in memory | 4    | 2    | 3      |   policy, reference, reward model, critic
    | compute          | high | low  | medium |
    | stability        | low  | high | medium |

and the claims around it: GRPO needs ~50 % less memory than PPO (no critic), DPO is close to PPO on simple
preference tasks, GRPO with verifiable rewards is best on verifiable tasks, and a policy optimizing a learned
reward without a KL penalty hacks it. Each claim gets one verdict, by the rule in its function's docstring,
and its measured text gives the numbers that decided it (rounded for people; exact ones in the Comparison):
- "confirmed": every pair of algorithms this run measured is ordered as the claim orders them;
- "not confirmed": some measured pair is ordered differently, or tied where the claim separates them;
- "not measured": fewer than two of PPO / DPO / GRPO have the measurement.
Only orders are compared, never absolute values: a tiny model on a CPU says nothing about absolute cost.
When several stages run the same algorithm, the first one that has the measurement stands for it.

Stability needs more than one run: it is judged from the spread of final accuracy over seeds (`posttrain demo
--seeds N`, report/seeds.py) and is "not settled" without it.

Claims about quality (held-out accuracy) are judged by a paired test on the same prompts (report/stats.py):
a difference counts only when McNemar's exact p < 0.05; otherwise the verdict is "not settled" — this run's
prompts cannot tell the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from posttrain.report.load import Stage, measured
from posttrain.report.stats import compare_paired, wilson
from posttrain.report.units import duration, gigabytes, number

from posttrain.registry import Registry

CONFIRMED, NOT_CONFIRMED, NOT_MEASURED = "confirmed", "not confirmed", "not measured"
NOT_SETTLED = "not settled"  # a quality claim whose paired test found no significant difference
ALPHA = 0.05  # a quality difference is real when the paired test's p is below this
CLOSE_PTS = 0.05  # "close": the 95 % interval of the accuracy difference lies within ±5 points
CLAIM_ALGOS = ("ppo", "dpo", "grpo")
LEVEL = {"low": 1, "medium": 2, "high": 3}



@dataclass
class ClaimResult:
    name: str
    claimed: dict[str, str]  # algorithm -> the claimed entry ("4", "high", ...)
    measured: str  # what this run measured, per algorithm, exact values
    verdict: str
    rule: str


CLAIMS = Registry("claim")
register_claim = CLAIMS.register  # `fn(stages) -> ClaimResult` checks the claim `name`; run in this order


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def order_verdict(claimed: dict[str, float], observed: dict[str, float]) -> str:
    """Pairwise order agreement between claimed ranks and observed values (ties count as a disagreement
    unless the claim ties the pair too)."""
    both = [a for a in claimed if a in observed]
    if len(both) < 2:
        return NOT_MEASURED
    agree = all(_sign(claimed[a] - claimed[b]) == _sign(observed[a] - observed[b]) for a, b in combinations(both, 2))
    return CONFIRMED if agree else NOT_CONFIRMED


def per_algorithm(stages: list[Stage], value_of) -> dict[str, float]:
    """algorithm -> value_of(stage) for the first stage of each claimed algorithm where it is not None."""
    out: dict[str, float] = {}
    for stage in stages:
        if stage.command in CLAIM_ALGOS and stage.command not in out:
            value = value_of(stage)
            if value is not None:
                out[stage.command] = value
    return out


def _rule(fn) -> str:
    return " ".join(fn.__doc__.split("Rule: ", 1)[1].split())


def _describe(values: dict[str, object], detail=None, unit=number) -> str:
    """'ppo: 5.0 min, dpo: 45 s': each algorithm's value rounded for people by `unit` (the exact values are in
    the Comparison table)."""
    if not values:
        return "—"
    return ", ".join(f"{a}: {unit(v)}" + (f" ({detail[a]})" if detail else "") for a, v in values.items())


@register_claim("models in memory")
def models_in_memory(stages: list[Stage]) -> ClaimResult:
    """Rule: order of the measured `models_in_memory` (pipeline_summary.json) must be PPO > GRPO > DPO."""
    claimed = {"ppo": 4, "dpo": 2, "grpo": 3}
    values = per_algorithm(stages, lambda s: measured(s)["models_in_memory"][0])
    return ClaimResult("models in memory", {a: str(v) for a, v in claimed.items()}, _describe(values),
                       order_verdict(claimed, values), _rule(models_in_memory))


@register_claim("compute")
def compute(stages: list[Stage]) -> ClaimResult:
    """Rule: order of the stages' wall time `wall_time_s` must be PPO > GRPO > DPO (the stages as run, so
    compare runs of similar length; the time per step is not used because steps differ in work)."""
    claimed = {"ppo": "high", "dpo": "low", "grpo": "medium"}
    values = per_algorithm(stages, lambda s: measured(s)["wall_time_s"][0])
    verdict = order_verdict({a: LEVEL[v] for a, v in claimed.items()}, values)
    return ClaimResult("compute", claimed, _describe(values, unit=duration), verdict, _rule(compute))


MIN_SEEDS = 2  # runs per algorithm before its spread means anything


def seed_spreads(stages: list[Stage]) -> dict[str, dict]:
    """algorithm -> report/seeds.seed_summary of its first stage repeated over >= MIN_SEEDS seeds with a final accuracy."""
    from posttrain.report.seeds import seed_summary

    def value(stage):
        s = seed_summary(stage.seed_runs)
        return s if s is not None and s["accuracy"] is not None and len(s["seeds"]) >= MIN_SEEDS else None

    return per_algorithm(stages, value)


@register_claim("stability")
def stability(stages: list[Stage]) -> ClaimResult:
    """Rule: instability = the standard deviation of the final held-out accuracy over seeds (`posttrain demo
    --seeds N`, N >= 2; report/seeds.py, which also counts loss and reward spikes: a step more than 4 robust
    standard deviations from the rolling median of the 5 before it); its order must be PPO > GRPO > DPO, i.e.
    stability PPO < GRPO < DPO, over the algorithms repeated (DPO trains offline and is not repeated, so
    usually PPO against GRPO). Not settled without two algorithms run over >= 2 seeds: one run has no spread."""
    from posttrain.report.seeds import describe

    claimed = {"ppo": "low", "dpo": "high", "grpo": "medium"}
    found = seed_spreads(stages)
    text = "; ".join(f"{a}: {describe(s)}" for a, s in found.items())
    if len(found) < 2:
        text = "not settled: needs --seeds ≥ 2" + (f" for two algorithms ({text})" if text else "")
        return ClaimResult("stability", claimed, text, NOT_SETTLED, _rule(stability))
    instability_rank = {a: -LEVEL[v] for a, v in claimed.items()}  # low stability = high instability
    verdict = order_verdict(instability_rank, {a: s["accuracy"]["std"] for a, s in found.items()})
    return ClaimResult("stability", claimed, text, verdict, _rule(stability))


def paired(stages: list[Stage], first: str, second: str) -> dict | None:
    """`second` against `first` (compare_paired) for the first stage of each algorithm with per-prompt outcomes,
    on the prompts both have a verdict for; None when either has none."""
    found = per_algorithm(stages, lambda s: s.outcomes)
    a, b = found.get(first), found.get(second)
    if a is None or b is None:
        return None
    keys = sorted(k for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None)
    return compare_paired([a[k] for k in keys], [b[k] for k in keys]) if keys else None


def describe_pair(second: str, first: str, c: dict) -> str:
    """'grpo − ppo: +3.1 pts [-1.2, +7.4], p = 0.21 (20 right only by grpo, 12 only by ppo, of 256 prompts)'."""
    pts = lambda v: f"{100 * v:+.1f}"  # noqa: E731
    return (f"{second} − {first}: {pts(c['diff'])} pts [{pts(c['diff_lo'])}, {pts(c['diff_hi'])}], p = {c['p']:.3g} "
            f"({c['second_only']} right only by {second}, {c['first_only']} only by {first}, of {c['n']} prompts)")


@register_claim("GRPO best on verifiable tasks")
def grpo_best(stages: list[Stage]) -> ClaimResult:
    """Rule: GRPO's held-out accuracy against PPO's and DPO's on the same prompts, by McNemar's exact test:
    confirmed when GRPO is higher than each with p < 0.05; not confirmed when one of them is higher with p < 0.05;
    not settled otherwise; not measured without GRPO and another one's per-prompt outcomes."""
    pairs = {other: paired(stages, other, "grpo") for other in ("ppo", "dpo")}
    pairs = {k: v for k, v in pairs.items() if v is not None}
    if not pairs:
        verdict = NOT_MEASURED
    elif all(c["diff"] > 0 and c["p"] < ALPHA for c in pairs.values()):
        verdict = CONFIRMED
    elif any(c["diff"] < 0 and c["p"] < ALPHA for c in pairs.values()):
        verdict = NOT_CONFIRMED
    else:
        verdict = NOT_SETTLED
    text = "; ".join(describe_pair("grpo", k, c) for k, c in pairs.items()) or "—"
    return ClaimResult("GRPO best on verifiable tasks", {"ppo": "lower", "dpo": "lower", "grpo": "best"}, text,
                       verdict, _rule(grpo_best))


@register_claim("DPO close to PPO")
def dpo_close_to_ppo(stages: list[Stage]) -> ClaimResult:
    """Rule: DPO's held-out accuracy against PPO's on the same prompts: not confirmed when McNemar's exact
    p < 0.05 (a real difference); confirmed when the paired-bootstrap 95 % interval of the difference lies
    within ±5 points, that bound never taken below z²/(n + z²), the 95 % upper bound of the share of n prompts two
    models answer differently when none was seen (so 8 identical answers do not make two models "close"); not
    settled otherwise (no significant difference, but the interval is too wide to call them close)."""
    c = paired(stages, "ppo", "dpo")
    if c is None:
        verdict = NOT_MEASURED
    elif c["p"] < ALPHA:
        verdict = NOT_CONFIRMED
    elif max(-c["diff_lo"], c["diff_hi"], wilson(0, c["n"])[1]) <= CLOSE_PTS:
        verdict = CONFIRMED
    else:
        verdict = NOT_SETTLED
    return ClaimResult("DPO close to PPO", {"ppo": "≈ DPO", "dpo": "≈ PPO", "grpo": "—"},
                       describe_pair("dpo", "ppo", c) if c else "—", verdict, _rule(dpo_close_to_ppo))


MEMORY_CLAIM = 0.50  # "GRPO needs ~50 % less memory than PPO"
MEMORY_TOLERANCE = 0.15  # ... confirmed for a measured saving within 50 ± 15 %


@register_claim("GRPO ~50 % less memory than PPO")
def grpo_memory(stages: list[Stage]) -> ClaimResult:
    """Rule: saving = 1 − peak(GRPO) / peak(PPO) of the stages' `peak_mem_gb` (the stage process's peak: accelerator
    memory on a GPU, host RSS on a CPU, where the Python process and data count too); confirmed when the saving is
    50 ± 15 %, not confirmed outside that band; not measured without both peaks."""
    peaks = per_algorithm(stages, lambda s: measured(s)["peak_mem_gb"][0])
    models = per_algorithm(stages, lambda s: measured(s)["models_in_memory"][0])
    claimed = {"ppo": "1×", "dpo": "—", "grpo": "~0.5×"}
    if not ("ppo" in peaks and "grpo" in peaks and peaks["ppo"] > 0):
        return ClaimResult("GRPO ~50 % less memory than PPO", claimed, "—", NOT_MEASURED, _rule(grpo_memory))
    saving = 1 - peaks["grpo"] / peaks["ppo"]
    ok = abs(saving - MEMORY_CLAIM) <= MEMORY_TOLERANCE
    count = lambda a: f", {number(models[a])} models" if a in models else ""  # noqa: E731
    text = (f"ppo: {gigabytes(peaks['ppo'])}{count('ppo')}, grpo: {gigabytes(peaks['grpo'])}{count('grpo')}: GRPO "
            f"{100 * abs(saving):.0f} % {'less' if saving >= 0 else 'more'} (claimed 50 ± {100 * MEMORY_TOLERANCE:.0f} %)")
    return ClaimResult("GRPO ~50 % less memory than PPO", claimed, text, CONFIRMED if ok else NOT_CONFIRMED,
                       _rule(grpo_memory))


def _kl_beta(stage: Stage) -> float | None:
    kl = ((stage.config.get("algo") or {}).get("kl") or {})
    return kl.get("beta") if isinstance(kl.get("beta"), (int, float)) else None


def _learned_reward(stage: Stage) -> bool:
    return bool(((stage.config.get("algo") or {}).get("reward") or {}).get("model"))


def proxy_rise(rows: list[dict]) -> float | None:
    """Mean trained (proxy) `reward` of the last third of the logged steps minus that of the first third."""
    values = [r["reward"] for r in rows if not r.get("final") and isinstance(r.get("reward"), (int, float))
              and r["reward"] == r["reward"]]
    if len(values) < 2:
        return None
    k = max(1, len(values) // 3)
    return sum(values[-k:]) / k - sum(values[:k]) / k


def hacked(stage: Stage) -> tuple[str, str]:
    """(outcome, text) of one stage that optimizes a learned reward: 'hacked' when its trained reward rose while
    its held-out accuracy fell against the baseline with McNemar's p < 0.05; 'held' when accuracy did not fall
    significantly while the reward rose (or 'improved' when it rose significantly); 'unknown' otherwise."""
    rise, vs = proxy_rise(stage.rows), stage.summary.get("vs_baseline")
    beta = _kl_beta(stage)
    head = f"{stage.name} (KL β = {number(beta)}): trained reward {'—' if rise is None else f'{rise:+.3g}'} first→last third"
    if rise is None or not isinstance(vs, dict):
        return "unknown", head + ", no paired held-out test"
    gold = f", held-out accuracy {100 * vs['diff']:+.1f} pts vs {vs['baseline']} (p = {vs['p']:.3g})"
    if rise <= 0:
        return "unknown", head + gold + ": the reward did not rise"
    if vs["diff"] < 0 and vs["p"] < ALPHA:
        return "hacked", head + gold
    return ("improved" if vs["diff"] > 0 and vs["p"] < ALPHA else "held"), head + gold


@register_claim("reward hacking without a KL penalty")
def reward_hacking(stages: list[Stage]) -> ClaimResult:
    """Rule: over the stages that optimize a learned reward model (`algo.reward.model`), each judged by `hacked`
    (its trained reward rises from the first to the last third of its steps while its held-out accuracy falls
    against the baseline, McNemar p < 0.05): confirmed when a stage without a KL penalty (algo.kl.beta = 0) hacked
    and no stage with one did; not confirmed when a stage without one gained held-out accuracy significantly, or
    one with a penalty hacked; not settled otherwise; not measured when no stage optimizes a learned reward
    without a KL penalty (the demo's PPO has one; a stage with algo.kl.beta: 0 measures the claim)."""
    judged = [(s, *hacked(s)) for s in stages if _learned_reward(s) and _kl_beta(s) is not None]
    without = [o for s, o, _ in judged if _kl_beta(s) == 0]
    with_kl = [o for s, o, _ in judged if _kl_beta(s) > 0]
    text = "; ".join(t for _, _, t in judged) or "—"
    claimed = {"ppo": "hacks without KL", "dpo": "—", "grpo": "— (verifier)"}
    if not without:
        verdict = NOT_MEASURED
        text = "no stage optimizes a learned reward without a KL penalty" + (f"; {text}" if judged else "")
    elif "hacked" in without and "hacked" not in with_kl:
        verdict = CONFIRMED
    elif "improved" in without or "hacked" in with_kl:
        verdict = NOT_CONFIRMED
    else:
        verdict = NOT_SETTLED
    return ClaimResult("reward hacking without a KL penalty", claimed, text, verdict, _rule(reward_hacking))


def check_claims(stages: list[Stage]) -> list[ClaimResult]:
    return [fn(stages) for fn in CLAIMS.values()]
