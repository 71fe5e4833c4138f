"""Per-token estimators of KL(pi || pi_ref) and the controllers that set its coefficient beta.

Tokens are sampled from pi, and log r = ref_logp - logp (Schulman 2020, "Approximating KL Divergence"):
  k1 = -log r                 unbiased, high variance, can be negative per token
  k2 = (log r)^2 / 2          biased, low variance, >= 0
  k3 = (r - 1) - log r        unbiased, low variance, >= 0 (GRPO's KL term, DeepSeekMath eq. 4)
Gradients: k2 and k3 have zero per-token gradient wrt logp when pi == pi_ref; k1's per-token gradient is 1 and
vanishes only in expectation over pi (E_pi[grad log pi] = 0).
"""

from __future__ import annotations


import torch

from posttrain.registry import Registry

LOG_RATIO_CLAMP = 20.0  # |log r| <= 20 keeps exp(log r) <= 4.9e8: finite in fp16/bf16/fp32, and far past any real KL
KL_ESTIMATORS = Registry("KL estimator")  # name -> fn(log r) with r = π_ref / π
register_kl = KL_ESTIMATORS.register


@register_kl("k1")
def _k1(log_r: torch.Tensor) -> torch.Tensor:
    return -log_r


@register_kl("k2")
def _k2(log_r: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_r**2


@register_kl("k3")
def _k3(log_r: torch.Tensor) -> torch.Tensor:
    return torch.expm1(log_r) - log_r  # expm1: no cancellation when r is close to 1, the common case


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate for tokens sampled from pi: logp, ref_logp (...) -> (...).

    Computed in at least fp32 (bf16 inputs are upcast) with log r clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP];
    the clamp also stops gradients of tokens past it.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    log_r = (ref_logp.to(dtype) - logp.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return KL_ESTIMATORS[kind](log_r)


class FixedKLController:
    """A constant beta, with the adaptive controller's interface."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", sec. 2.2):
    e_t = clip((KL_t - target) / target, -0.2, 0.2);  beta_{t+1} = beta_t (1 + K_beta e_t),  K_beta = n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max((float(current_kl) - self.target) / self.target, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


KL_CONTROLLERS = {"fixed": FixedKLController, "adaptive": AdaptiveKLController}
