"""Offline pairwise preference losses (the DPO family), as pure functions of sequence log-probs.

Every loss sees one `PairLogps` (all fields (B,)) and returns per-pair losses plus implicit rewards; the front door
`preference_loss` averages over the batch and builds the metrics TRL users know (`rewards/chosen`, `rewards/margins`,
`logps/chosen`, ...). Losses are looked up by name in `PREFERENCE_LOSSES`, filled by `@register`.

Notation: h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)), the difference of log-ratios.
Math is done in at least fp32 (bf16 inputs are upcast), with `logsigmoid` so that margins |βh| in the thousands stay finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from posttrain.types import LossOutput

from posttrain.registry import Registry

Tensor = torch.Tensor


@dataclass
class PairLogps:
    """Sequence-level log-probs of a batch of (chosen, rejected) completions. Every tensor is (B,).

    chosen_logps, rejected_logps: sum over completion tokens of log π(token | ·) under the policy.
    chosen_lengths, rejected_lengths: number of completion tokens (float), for length-normalized losses.
    ref_chosen_logps, ref_rejected_logps: the same sums under the frozen reference; None for reference-free losses.
    chosen_nll: mean per-token NLL of the chosen completion under the policy (ORPO's SFT term); when None, ORPO
        uses -chosen_logps / chosen_lengths, which is the same number when both come from the same logits.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen_logps: Optional[Tensor] = None
    ref_rejected_logps: Optional[Tensor] = None
    chosen_nll: Optional[Tensor] = None


@dataclass
class PreferenceHParams:
    """Hyper-parameters shared by the family; each loss reads the ones it needs.

    beta: inverse temperature β of the implicit reward (DPO, cDPO, robust, IPO's τ, hinge, SimPO).
    label_smoothing: ε, the assumed probability that a label is flipped (cdpo/dpo, robust; robust needs ε < 0.5).
    simpo_gamma: γ, SimPO's target reward margin (in reward units, i.e. already multiplied by β).
    orpo_lambda: λ, weight of ORPO's odds-ratio term against the NLL term (TRL calls it `beta`).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1


# A loss maps (logps, hparams) -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,), extra metrics).
LossFn = Callable[[PairLogps, PreferenceHParams], tuple]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs_reference: bool


PREFERENCE_LOSSES = Registry("preference loss")


def register(name: str, needs_reference: bool) -> Callable[[LossFn], LossFn]:
    return lambda fn: PREFERENCE_LOSSES.add(name, LossSpec(fn, needs_reference)).fn


def _spec(name: str) -> LossSpec:
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid names: {', '.join(sorted(PREFERENCE_LOSSES))}")
    return PREFERENCE_LOSSES[name]


def needs_reference(name: str) -> bool:
    """Whether loss `name` uses a reference model (the trainer skips loading one when False)."""
    return _spec(name).needs_reference


# ---------------------------------------------------------------------------------------------------------------
# shared pieces


def _log_ratios(lp: PairLogps, length_normalized: bool = False) -> tuple[Tensor, Tensor]:
    """(log π - log π_ref) for chosen and rejected, (B,) each; per token when `length_normalized`."""
    chosen = lp.chosen_logps - lp.ref_chosen_logps
    rejected = lp.rejected_logps - lp.ref_rejected_logps
    if length_normalized:
        chosen, rejected = chosen / lp.chosen_lengths, rejected / lp.rejected_lengths
    return chosen, rejected


def _sigmoid_family(lp: PairLogps, hp: PreferenceHParams, robust: bool):
    """-logσ(βh) with label noise ε. cDPO (Mitchell 2023): (1-ε)·(-logσ(βh)) + ε·(-logσ(-βh)), the expected loss
    under flipped labels, which stops pushing once σ(βh) = 1 - ε. Robust DPO (Chowdhury et al. 2024, rDPO loss):
    [(1-ε)·(-logσ(βh)) - ε·(-logσ(-βh))] / (1 - 2ε), an unbiased estimate of the clean DPO loss under noise ε."""
    eps = hp.label_smoothing
    chosen, rejected = _log_ratios(lp)
    z = hp.beta * (chosen - rejected)
    if robust:
        losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    else:
        losses = (1 - eps) * -F.logsigmoid(z) + eps * -F.logsigmoid(-z)
    return losses, hp.beta * chosen, hp.beta * rejected, {}


# ---------------------------------------------------------------------------------------------------------------
# the losses


@register("dpo", needs_reference=True)
def dpo(lp: PairLogps, hp: PreferenceHParams):
    """DPO, Rafailov et al. 2023 eq. 7: -logσ(βh). With label_smoothing ε > 0 this is cDPO.

    Not TRL's DPO: in TRL 1.16 `DPOTrainer._compute_loss` computes loss_type "sigmoid" as -logσ(βh) whatever
    `label_smoothing` is (in that trainer ε enters only "robust", "exo_pair", "aot" and "aot_unpaired"). TRL's CPO
    trainer (`CPOTrainer.cpo_loss`, trl/experimental/cpo) does smooth its "sigmoid" loss this way.
    """
    return _sigmoid_family(lp, hp, robust=False)


@register("cdpo", needs_reference=True)
def cdpo(lp: PairLogps, hp: PreferenceHParams):
    """Conservative DPO (Mitchell 2023): (1-ε)·(-logσ(βh)) + ε·(-logσ(-βh)). Same function as `dpo`; the name
    exists so that a config saying it uses label noise reads that way."""
    return _sigmoid_family(lp, hp, robust=False)


@register("robust", needs_reference=True)
def robust(lp: PairLogps, hp: PreferenceHParams):
    """Robust DPO, Chowdhury et al. 2024 ("Provably Robust DPO", the rDPO loss): the unbiased estimator
    [(1-ε)·(-logσ(βh)) - ε·(-logσ(-βh))] / (1 - 2ε). Unlike cDPO its expectation over noisy labels equals the
    clean DPO loss; it is not bounded below for ε > 0, so ε must be an honest noise rate, 0 ≤ ε < 0.5."""
    if not 0.0 <= hp.label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {hp.label_smoothing}")
    return _sigmoid_family(lp, hp, robust=True)


@register("ipo", needs_reference=True)
def ipo(lp: PairLogps, hp: PreferenceHParams):
    """IPO, Azar et al. 2023 (the sampled IPO loss): (h - 1/(2τ))² with τ = beta. As in TRL, h is built from
    per-token AVERAGED log-ratios: with summed log-probs the regression target 1/(2τ) would mean different things
    for different lengths. Rewards here are β times the averaged log-ratios, the quantities the loss regresses.
    TRL's differ: TRL 1.16's `DPOTrainer._compute_loss` logs `rewards/*` as β times the SUMMED log-ratios for
    every loss type, IPO included, so an IPO run's reward metrics are not comparable with TRL's."""
    chosen, rejected = _log_ratios(lp, length_normalized=True)
    losses = (chosen - rejected - 1.0 / (2.0 * hp.beta)) ** 2
    return losses, hp.beta * chosen, hp.beta * rejected, {}


@register("hinge", needs_reference=True)
def hinge(lp: PairLogps, hp: PreferenceHParams):
    """SLiC hinge, Zhao et al. 2023 (SLiC-HF's rank calibration loss on log-ratios, as TRL does): relu(1 - βh)."""
    chosen, rejected = _log_ratios(lp)
    losses = torch.relu(1.0 - hp.beta * (chosen - rejected))
    return losses, hp.beta * chosen, hp.beta * rejected, {}


@register("simpo", needs_reference=False)
def simpo(lp: PairLogps, hp: PreferenceHParams):
    """SimPO, Meng et al. 2024 eq. 6: -logσ(β/|y_w|·log π(y_w) - β/|y_l|·log π(y_l) - γ), no reference. The
    rewards are the length-normalized β·log π/|y|; label_smoothing applies as in cDPO (TRL's CPO trainer does)."""
    eps = hp.label_smoothing
    chosen = hp.beta * lp.chosen_logps / lp.chosen_lengths
    rejected = hp.beta * lp.rejected_logps / lp.rejected_lengths
    z = chosen - rejected - hp.simpo_gamma
    losses = (1 - eps) * -F.logsigmoid(z) + eps * -F.logsigmoid(-z)
    return losses, chosen, rejected, {}


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012: expm1 near 0, log1p far from it).

    Each branch only sees inputs from its own side, so the unused one cannot put inf/NaN into the gradient.
    """
    near_zero = x > -math.log(2.0)
    safe = torch.full_like(x, -1.0)
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, safe))),
        torch.log1p(-torch.exp(torch.where(near_zero, safe, x))),
    )


# An average per-token log-prob of exactly 0 means odds of +inf; stop just short so loss and gradient stay finite.
_ORPO_MAX_AVG_LOGP = -1e-6


@register("orpo", needs_reference=False)
def orpo(lp: PairLogps, hp: PreferenceHParams):
    """ORPO, Hong et al. 2024 eqs. 4 and 7: NLL(y_w) + λ·(-logσ(log odds(y_w) - log odds(y_l))), where
    log odds(y) = p̄ - log(1 - exp(p̄)) on the per-token average log-prob p̄ = log π(y)/|y|. No reference.

    Metrics as TRL logs them: `log_odds_chosen` is the mean log odds ratio log odds(y_w) - log odds(y_l);
    `log_odds_ratio` is the mean of logσ of it (TRL's naming); `nll_loss` the mean NLL term. Rewards are λ·p̄,
    TRL's `beta * avg_logps` with TRL's beta being our λ.
    """
    avg_w = (lp.chosen_logps / lp.chosen_lengths).clamp(max=_ORPO_MAX_AVG_LOGP)
    avg_l = (lp.rejected_logps / lp.rejected_lengths).clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds = (avg_w - log1mexp(avg_w)) - (avg_l - log1mexp(avg_l))
    ratio = F.logsigmoid(log_odds)
    nll = lp.chosen_nll if lp.chosen_nll is not None else -lp.chosen_logps / lp.chosen_lengths
    losses = nll - hp.orpo_lambda * ratio
    extra = {"log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean(), "nll_loss": nll.mean()}
    return losses, hp.orpo_lambda * avg_w, hp.orpo_lambda * avg_l, extra


# ---------------------------------------------------------------------------------------------------------------
# front door


def _upcast(lp: PairLogps) -> PairLogps:
    """At least fp32 everywhere (bf16 sums near -1e4 have a spacing of 64); lengths clamped to ≥ 1 token."""
    def up(x):
        return None if x is None else x.to(torch.promote_types(x.dtype, torch.float32))

    def length(n):
        return up(torch.as_tensor(n, device=lp.chosen_logps.device)).clamp(min=1.0)

    return PairLogps(
        up(lp.chosen_logps), up(lp.rejected_logps), length(lp.chosen_lengths), length(lp.rejected_lengths),
        up(lp.ref_chosen_logps), up(lp.ref_rejected_logps), up(lp.chosen_nll),
    )


@dataclass
class PreferenceLossConfig:
    """The preference-loss settings DPO and online DPO share (their configs derive from it)."""

    loss_type: str = "dpo"  # dpo | ipo | robust | cdpo | hinge | simpo | orpo (posttrain.algos.preference)
    beta: float = 0.1  # β of the implicit reward (IPO's τ)
    label_smoothing: float = 0.0  # ε, assumed label-flip rate (cdpo/dpo, robust, simpo)
    simpo_gamma: float = 0.5  # SimPO's target margin γ
    orpo_lambda: float = 0.1  # ORPO's weight λ of the odds-ratio term
    nll_weight: float = 0.0  # α of an NLL term on the chosen completion (RPO; TRL's rpo_alpha); 0 = off


def configured_preference_loss(cfg: PreferenceLossConfig, logps: "PairLogps") -> LossOutput:
    """`preference_loss` with the settings of a PreferenceLossConfig."""
    return preference_loss(cfg.loss_type, logps, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.orpo_lambda,
                           cfg.nll_weight)


def preference_loss(
    name: str,
    logps: PairLogps,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
    nll_weight: float = 0.0,
) -> LossOutput:
    """Mean loss over the batch of pairs for loss `name` (see `PREFERENCE_LOSSES`) and its metrics.

    nll_weight: α of an added NLL term on the chosen completion, α·(−log π(y_w)/|y_w|) (RPO: Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", eq. 3; TRL's `rpo_alpha`). Pairs that differ in a token or two
    (a wrong digit) otherwise let DPO lower the chosen completion's likelihood along with the rejected one's.

    logps: PairLogps with (B,) tensors. Returns LossOutput(loss: 0-d tensor in ≥ fp32, metrics: detached 0-d tensors
    `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`
    (summed log-probs), plus loss-specific ones (ORPO: `log_odds_ratio`, `log_odds_chosen`, `nll_loss`).
    """
    spec = _spec(name)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if spec.needs_reference and (logps.ref_chosen_logps is None or logps.ref_rejected_logps is None):
        raise ValueError(f"preference loss {name!r} needs ref_chosen_logps and ref_rejected_logps")
    lp = _upcast(logps)
    hp = PreferenceHParams(beta, label_smoothing, simpo_gamma, orpo_lambda)
    losses, chosen_rewards, rejected_rewards, extra = spec.fn(lp, hp)
    if nll_weight:
        nll = lp.chosen_nll if lp.chosen_nll is not None else -lp.chosen_logps / lp.chosen_lengths
        losses = losses + nll_weight * nll
        extra = {**extra, "nll_loss": nll.mean()}
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": lp.chosen_logps.mean(),
        "logps/rejected": lp.rejected_logps.mean(),
        **extra,
    }
    return LossOutput(losses.mean(), {k: v.detach() for k, v in metrics.items()})
