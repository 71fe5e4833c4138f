"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022) on the one loop: policy, reference, reward, critic.

Per-token reward r_t = −β·KL_t (k1 on the sampled token) for every completion token, plus the sequence score
at the last completion token; GAE(γ, λ) over it (Schulman et al. 2016); whitened advantages; clipped
surrogate and clipped value loss (Schulman et al. 2017); entropy bonus; several epochs over minibatches that
stop early once the approximate KL to the rollout policy passes `target_kl`; fixed or adaptive β.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.algos.advantages import gae, token_level_rewards
from posttrain.algos.kl import KL_CONTROLLERS, kl_estimate
from posttrain.algos.entropy_control import AdaptiveEntropyCoef
from posttrain.algos.policy_loss import actor_loss, clipped_value_loss
from posttrain.config import RunConfig
from posttrain.online_config import CorrectionConfig, KLConfig, SamplingConfig, rename_kl_keys
from posttrain.models.loading import torch_dtype
from posttrain.ops import whiten
from posttrain.train import common
from posttrain.train.loop import Iteration
from posttrain.train.registry import algorithm
from posttrain.train.online import OnlineBase, OnlineConfig, _all_rows, _in_row_order, corrected_advantages, kl_metrics, valid_mean
from posttrain.types import RolloutBatch
from posttrain.types import LossOutput


@dataclass
class PPOKLConfig(KLConfig):
    beta: float = 0.05  # initial KL coefficient of the per-token KL penalty in the reward
    control: str = "fixed"  # fixed | adaptive (Ziegler et al. 2019)
    target: float = 6.0  # adaptive: target sequence KL
    horizon: int = 10000  # adaptive: steps over which β closes the gap to the target


rename_kl_keys("ppo", {"beta": "beta", "kl_estimator": "estimator", "kl_control": "control", "kl_target": "target",
                       "kl_horizon": "horizon"})


@dataclass
class PPOConfig(OnlineConfig):
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_generations=1))
    kl: PPOKLConfig = field(default_factory=PPOKLConfig)
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 2
    minibatch_rows: int = 0  # 0 = the whole rollout per update
    policy_loss: str = "clip"  # clip | dual_clip | gspo | gspo_token | cispo | sapo | gmpo (algos.policy_loss*.py)
    dual_clip: float = 3.0  # dual_clip's c (Ye et al. 2020)
    clip_low: float = 0.2
    clip_high: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    # > 0: the entropy coefficient adapts each step, rising while the token entropy is below this many nats and
    # falling above it (algos/entropy_control.AdaptiveEntropyCoef, from entropy_coef, at most 0.1)
    entropy_target: float = 0.0
    target_kl: float = 0.0  # stop the epochs once approx_kl exceeds it (0 = never)
    normalize_rewards: bool = True  # scale scores by running std (running mean removed too)
    whiten_advantages: bool = True
    critic_init: str = "auto"  # auto (reward model if given, else policy) | reward_model | policy | shared
    # shared: a value head on the policy's own (LoRA-adapted) decoder, no critic copy: the memory-light option
    loss_agg: str = "token-mean"  # see ops.agg_loss: how per-token losses become one number
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)  # sampler/trainer mismatch


class RunningMoments:
    """Running mean and variance of scalar rewards (Chan et al. parallel update), saved with the run."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        batch_mean, batch_var, n = float(x.mean()), float(x.var(unbiased=False)), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var**0.5 + 1e-8)


@algorithm("ppo", config=PPOConfig, help="PPO (RLHF) with a critic, a reward model and a KL penalty")
class PPO(OnlineBase):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg, needs_reference=True)
        a = cfg.algo
        self.critic = self._make_critic(a.critic_init)
        self.extra_copies = 0 if a.critic_init == "shared" else 1  # the critic's own decoder
        k = a.kl
        self.kl_ctl = KL_CONTROLLERS[k.control](k.beta) if k.control == "fixed" else \
            KL_CONTROLLERS[k.control](k.beta, k.target, k.horizon)
        self.moments = RunningMoments()
        self.entropy_ctl = AdaptiveEntropyCoef(a.entropy_coef, a.entropy_target) if a.entropy_target > 0 else None
        self._entropies: list[float] = []  # token entropy of each micro-batch of the last step
        self.updates_per_step = self.planned_updates(a.ppo_epochs, a.minibatch_rows)
        self._update_kls: list[tuple[float, int]] = []  # (approx_kl, loss tokens) of the current update's micro-batches

    def _make_critic(self, init: str):
        import copy

        from posttrain.models.value import critic_from_causal_lm, critic_from_reward_model

        if init == "shared":
            from posttrain.train.sharding import resolve_sharding

            if resolve_sharding(self.cfg.train) != "none":
                raise ValueError("critic_init=shared needs train.sharding=none: the head reads the policy's own "
                                 "decoder, which a sharded wrapper owns")
            critic = critic_from_causal_lm(self.model)  # no copy: only the head is new
            critic.head.requires_grad_(True)
            return critic
        if init not in ("auto", "reward_model", "policy"):
            raise ValueError(f"algo.critic_init must be auto, reward_model, policy or shared, got {init!r}")
        rm = self.rewards.scalar_model
        if init == "reward_model" or (init == "auto" and rm is not None):
            if rm is None:
                raise ValueError("critic_init=reward_model needs a scalar reward model (algo.reward.model with "
                                 "algo.reward.model_kind=scalar): an implicit reward model has no score head")
            critic = critic_from_reward_model(copy.deepcopy(rm))
        else:
            ref = self.reference.model
            # a bf16 reference (model.frozen_dtype) would hand the critic rounded weights: copy the policy then
            source = ref if ref is not None and not self.cfg.model.frozen_dtype else self.model
            critic = critic_from_causal_lm(copy.deepcopy(source))
        # a copy of a frozen model may sit on the CPU (offload_frozen) or in bf16 (frozen_dtype): the critic trains
        # on the run's device in the policy's dtype
        critic.to(self.device, dtype=torch_dtype(self.cfg.model.dtype))
        return critic.train().requires_grad_(True)

    def modules(self):
        if self.algo_cfg.critic_init == "shared":  # the decoder is the policy's: save and train it once
            return {"policy": self.model, "value_head": self.critic.head}
        return {"policy": self.model, "critic": self.critic}

    @property
    def budget_shares_prompt(self) -> bool:
        """The critic scores the padded rows of a micro-batch: a token budget counts those, the larger pass."""
        return False

    @torch.no_grad()
    def _values(self, batch: RolloutBatch) -> torch.Tensor:
        out, passes = [], self.micro_batches(batch, _all_rows(batch))
        for rows in passes:
            with common.autocast_context(self.cfg.model, self.device.type):
                out.append(self._completion_values(batch, rows))
        return _in_row_order(torch.cat(out), passes)

    def _completion_values(self, batch: RolloutBatch, rows) -> torch.Tensor:
        """V for each completion token (N, C): read at the position that predicts it (P + t − 1)."""
        P = batch.prompt_width
        values = self.critic(batch.input_ids[rows], batch.attention_mask[rows])
        return values[:, P - 1 : -1]

    def next_iteration(self, step: int) -> Iteration:
        a = self.algo_cfg
        if self.entropy_ctl is not None and self._entropies:  # the last step's entropy sets this step's coefficient
            self.entropy_ctl.update(sum(self._entropies) / len(self._entropies))
            self._entropies = []
        batch = self.sample(step)
        metrics = dict(batch.extra["metrics"], forward_token_fraction=self._forward_token_fraction(batch))
        if self.entropy_ctl is not None:
            metrics["entropy_coef"] = self.entropy_ctl.value
        mask = batch.loss_mask.float()
        old_logp, ref_logp = self.policy_logps(batch), self.reference_logps(batch)
        values = self._values(batch) * mask
        valid = batch.extra["reward_valid"]
        scores = torch.where(valid, batch.rewards, torch.zeros_like(batch.rewards))  # masked rows: no loss tokens either
        if a.normalize_rewards and valid.any():
            self.moments.update(scores[valid])
            scores = torch.where(valid, self.moments.normalize(scores), scores)
        kl = kl_estimate(old_logp, ref_logp, a.kl.estimator or "k1") * mask  # per token on the sampled tokens
        # per-turn environment rewards at their turns' ends; under reward normalization the score moves as one
        turns = None if a.normalize_rewards else batch.extra.get("turn_rewards")
        token_rewards = token_level_rewards(self.kl_ctl.value * kl, scores, mask, turns)
        advantages, returns = gae(token_rewards, values, mask, a.gamma, a.lam)
        if a.whiten_advantages:
            advantages = whiten(advantages, mask) * mask
        batch.extra.update(old_logp=old_logp, values=values, advantages=advantages, returns=returns)
        self.batch, self._update_kls = batch, []
        seq_kl = float(kl.sum(-1).mean())  # the penalised estimate, summed per sequence: what the KL controller tracks
        metrics.update(_ppo_metrics(batch, values, returns, mask), **kl_metrics(old_logp, ref_logp, mask),
                       kl_coef=self.kl_ctl.value, reward=valid_mean(batch), models_in_memory=float(self.models_in_memory))
        metrics[f"kl/seq_{a.kl.estimator or 'k1'}_sum"] = seq_kl
        self.kl_ctl.update(seq_kl, batch.num_rows)
        return Iteration(self.updates(batch.num_rows, a.minibatch_rows, a.ppo_epochs, step), metrics)

    def loss(self, rows, totals) -> LossOutput:
        a, b = self.algo_cfg, self.batch
        logp, entropy = self.current_logps(rows)
        mask = b.loss_mask[rows]
        counts = dict(num_tokens=totals["num_tokens"], num_seqs=totals["num_seqs"], max_len=a.sampling.max_new_tokens)
        old = b.extra["old_logp"][rows]
        advantages, mismatch = corrected_advantages(a.correction, b, rows, old, mask, b.extra["advantages"][rows])
        actor = actor_loss(a.policy_loss, logp, old, advantages, mask, entropy,
                           entropy_coef=self.entropy_ctl.value if self.entropy_ctl else a.entropy_coef, clip_low=a.clip_low, clip_high=a.clip_high, agg_mode=a.loss_agg,
                           dual_clip=a.dual_clip, **counts)  # the KL is in the reward (k1 per token), not in the loss
        with common.autocast_context(self.cfg.model, self.device.type):
            values = self._completion_values(b, rows)
        vf = clipped_value_loss(values, b.extra["values"][rows], b.extra["returns"][rows], mask, a.value_clip, a.loss_agg, **counts)
        self._update_kls.append((float(actor.metrics["approx_kl"]), int(mask.sum())))
        if self.entropy_ctl is not None:
            self._entropies.append(float(actor.metrics["entropy"]))
        return LossOutput(actor.loss + a.vf_coef * vf.loss,
                          {**actor.metrics, **vf.metrics, **mismatch, "value_loss": vf.loss.detach()})

    def totals(self, update) -> dict:
        self._update_kls = []  # a new update begins: early_stop judges its micro-batches only
        return super().totals(update)

    def early_stop(self) -> bool:
        """Trust region: no more updates on this rollout once the update just applied moved the policy more than
        target_kl — its approx_kl over all its micro-batches' loss tokens, not the last micro-batch's alone."""
        target = self.algo_cfg.target_kl
        tokens = sum(n for _, n in self._update_kls)
        return bool(target) and tokens > 0 and sum(kl * n for kl, n in self._update_kls) / tokens > target

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "kl_ctl": self.kl_ctl.state_dict(), "moments": vars(self.moments).copy()}
        if self.entropy_ctl is not None:
            state["entropy_ctl"] = {"value": self.entropy_ctl.value, "pending": list(self._entropies)}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        vars(self.moments).update(state["moments"])
        if self.entropy_ctl is not None and "entropy_ctl" in state:
            self.entropy_ctl.value = state["entropy_ctl"]["value"]
            self._entropies = list(state["entropy_ctl"]["pending"])


def _ppo_metrics(batch: RolloutBatch, values, returns, mask) -> dict:
    """Returns, values and the critic's explained variance 1 − Var[R − V] / Var[R] on the loss tokens."""
    sel = mask.bool()
    ret, val = returns[sel], values[sel]
    var = ret.var() if ret.numel() > 1 else ret.new_zeros(())
    explained = float(1 - (ret - val).var() / var) if float(var) > 0 else 0.0
    return {"returns/mean": float(ret.mean()), "values/mean": float(val.mean()), "explained_variance": explained}
