"""What the online algorithms (GRPO, PPO, online DPO) share, composed from three parts built in this order:
the reference (`reference.ModelReference`), the rewards (`online_rewards.build_rewards`, which may share that
reference) and the rollout collector (`collector.RolloutCollector`: prompts, engine, scored rollouts).

An online iteration: take `prompts_per_step` prompts, sample G completions each with the current policy
(KV cache of each prompt shared by its G samples), score them with the reward functions, compute the
reference and old-policy log-probs the loss needs, then hand the loop minibatch updates over the rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.algos.rollout_correction import rollout_weights
from posttrain.config import RunConfig
from posttrain.data.packing import rollout_micro_batches
from posttrain.models.loading import load_frozen_lm, resolve_model_path, wants_bf16
from posttrain.models.shared_prefix import completion_logps, supports_shared_prefix
from posttrain.online_config import EnvConfig, ReferenceConfig, RewardConfig, SamplingConfig
from posttrain.train import common
from posttrain.train.collector import RolloutCollector
from posttrain.train.online_rewards import RewardSetup, build_rewards
from posttrain.train.reference import ModelReference
from posttrain.types import RolloutBatch


@dataclass
class OnlineConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    mask_truncated: bool = False  # completions that hit max_new_tokens get no loss (DAPO overlong filtering)
    monitor: dict = field(default_factory=dict)  # MonitorConfig options (train/monitors.py); {enabled: false} turns off
    share_prompt: bool = True  # score a group's completions in one row around its prompt (models/shared_prefix.py)
    env: EnvConfig = field(default_factory=EnvConfig)  # multi-turn environment (posttrain/envs/); none by default


def corrected_advantages(correction, batch: RolloutBatch, rows, old_logp: torch.Tensor, mask: torch.Tensor,
                         advantages: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The advantages of `rows` weighted for the sampler/trainer mismatch (`algo.correction`, a CorrectionConfig;
    algos/rollout_correction.py), and the mismatch metrics; unchanged when the correction is off."""
    if correction.mode == "none" and correction.off_policy_delta <= 0:
        return advantages, {}
    weights, metrics = rollout_weights(old_logp, batch.extra["sampler_logp"][rows], mask, correction.mode,
                                       correction.cap, correction.cap_low, advantages, correction.off_policy_delta)
    return (advantages[:, None] if advantages.dim() == 1 else advantages) * weights, metrics


def online_reference(policy, cfg: RunConfig, path: str | None, device: torch.device) -> ModelReference:
    """The reference of an online run: `path` (default: the starting checkpoint) loaded frozen, or — a LoRA policy
    with no `ref_model` — the policy with its adapter switched off (no copy)."""
    if cfg.model.lora.enabled and path is None:
        return ModelReference(policy, None, cfg.model)
    return ModelReference(policy, load_frozen_lm(cfg.model, resolve_model_path(path or cfg.model.name_or_path), device),
                          cfg.model)


class OnlineBase(common.DatasetAlgorithm):
    """Prompts, generation, rewards and evaluation; subclasses add their advantages and losses."""

    extra_copies = 0  # models a subclass adds (PPO's critic)

    def __init__(self, cfg: RunConfig, needs_reference: bool):
        self.cfg, self.algo_cfg = cfg, cfg.algo
        train, self.eval_records = common.load_splits(cfg, "prompts")  # bad data fails before the model loads
        self.model, self.tokenizer = common.load_policy_and_tokenizer(cfg)
        self.reference = online_reference(self.model, cfg, self.algo_cfg.reference.model, self.device) if needs_reference else None
        self.rewards: RewardSetup = build_rewards(cfg, self.model, self.tokenizer, self.reference, self.device)
        self.collector = RolloutCollector(cfg, self.model, self.tokenizer, train, self.rewards.runner)
        self.batch: RolloutBatch | None = None
        self.monitor = _make_monitor(self.algo_cfg.monitor)

    def local_rows(self) -> int:
        """Rollout rows this process samples per step (its share of prompts_per_step, times G)."""
        from posttrain.train.distributed import context

        return self.algo_cfg.sampling.prompts_per_step // context().world * self.algo_cfg.sampling.num_generations

    def planned_updates(self, epochs: int, minibatch_rows: int) -> int:
        """Optimizer updates per step for the schedule: `updates` slices this process's rows into minibatches."""
        rows = self.local_rows()
        return epochs * -(-rows // (minibatch_rows or rows))

    @property
    def order(self):
        """The prompt order (the data position a checkpoint saves)."""
        return self.collector.order

    def sample(self, step: int, round_: int = 0) -> RolloutBatch:
        return self.collector.sample(step, round_)

    @property
    def models_in_memory(self) -> int:
        """Copies of model weights held at once: the policy, a frozen reference, reward models, a critic's own
        decoder, an engine's copy of the policy (vLLM)."""
        reference = self.reference.copies if self.reference is not None else 0
        return 1 + reference + self.rewards.copies + self.extra_copies + self.collector.engine.weight_copies

    @property
    def logp_temperature(self) -> float:
        """Log-probs are scored at the sampling temperature, so the ratio is 1 before any update (the sampling-
        temperature mismatch TRL once had)."""
        return self.algo_cfg.sampling.temperature or 1.0

    def _forward_token_fraction(self, batch: RolloutBatch, inert: torch.Tensor | None = None) -> float:
        """Tokens the training forward passes process over those of all rows padded: < 1 when a group's prompt is
        shared or inert rows are skipped."""
        rows = None if inert is None else (~inert).nonzero().squeeze(-1)
        return batch.forward_tokens(self.policy_shares_prompt, rows) / max(batch.forward_tokens(False), 1)

    @torch.no_grad()
    def policy_logps(self, batch: RolloutBatch, with_entropy: bool = False):
        """Completion log-probs (N, C) of the current policy at the sampling temperature, in row chunks."""
        outs, ents = [], []
        passes = self.micro_batches(batch, _all_rows(batch))
        for rows in passes:
            with common.autocast_context(self.cfg.model, self.device.type):
                out = completion_logps(self.model, batch, rows, self.cfg.model.logprob_chunk, with_entropy,
                                       self.logp_temperature, self.algo_cfg.share_prompt)
            lp, ent = out if with_entropy else (out, None)
            outs.append(lp)
            ents.append(ent)
        if with_entropy:
            return _in_row_order(torch.cat(outs), passes), _in_row_order(torch.cat(ents), passes)
        return _in_row_order(torch.cat(outs), passes)

    def micro_batches(self, batch: RolloutBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """`rows` (host indices) cut into forward passes: `train.batch_size` rows each, or with
        `train.max_tokens_per_micro_batch`, as many as that many tokens of the pass's real cost hold (packed group
        rows under prompt sharing, padded rows otherwise; `packing.rollout_micro_batches`). The losses are
        normalized by the update's totals, so the cut changes memory and speed, not the update."""
        budget = self.cfg.train.max_tokens_per_micro_batch
        if budget <= 0:
            micro = self.cfg.train.batch_size
            return [rows[k : k + micro] for k in range(0, len(rows), micro)]
        return rollout_micro_batches(batch, rows, budget, self.budget_shares_prompt)

    @property
    def policy_shares_prompt(self) -> bool:
        """Whether the policy's passes pack a group's rows around one prompt (`models/shared_prefix.py`)."""
        return self.algo_cfg.share_prompt and supports_shared_prefix(self.model)

    @property
    def budget_shares_prompt(self) -> bool:
        """Whether the largest pass over a micro-batch is packed by group (what a token budget counts)."""
        return self.policy_shares_prompt

    @torch.no_grad()
    def reference_logps(self, batch: RolloutBatch, frozen: ModelReference | None = None) -> torch.Tensor:
        """Completion log-probs (N, C) under the reference (or another frozen model: a teacher), in row chunks."""
        outs, passes = [], self.micro_batches(batch, _all_rows(batch))
        with (frozen or self.reference).scoring(batch.input_ids.device) as reference:
            for rows in passes:
                with common.autocast_context(self.cfg.model, self.device.type):
                    outs.append(completion_logps(reference, batch, rows, self.cfg.model.logprob_chunk, False,
                                                 self.logp_temperature, self.algo_cfg.share_prompt))
        return _in_row_order(torch.cat(outs), passes)

    def current_logps(self, rows, with_entropy: bool = True):
        """Completion log-probs (and entropies) of the micro-batch `rows`, with gradients."""
        self.model.train()
        with common.autocast_context(self.cfg.model, self.device.type):
            out = completion_logps(self.model, self.batch, rows, self.cfg.model.logprob_chunk, with_entropy,
                                   self.logp_temperature, self.algo_cfg.share_prompt)
        return out if with_entropy else (out, None)

    def updates(self, num_rows: int, minibatch_rows: int, epochs: int, step: int,
                inert: torch.Tensor | None = None) -> list[Update]:
        """`epochs` passes over the rollout in shuffled minibatches (one optimizer update each) of micro-batches.

        `inert` (N,) bool marks rows whose loss and gradient are exactly zero (a GRPO row with advantage 0 and
        no KL term in the loss): they run through no forward pass but still count in the loss normalizers, so
        the update is the one over all rows. An update keeps at least one micro-batch, so metrics exist."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step)
        minibatch_rows = minibatch_rows or num_rows
        inert = None if inert is None else inert.cpu()  # row indices are host tensors; the loop moves each micro-batch
        out = []
        for _ in range(epochs):
            shuffle = epochs > 1 or minibatch_rows < num_rows
            perm = torch.randperm(num_rows, generator=gen, device="cpu") if shuffle else torch.arange(num_rows, device="cpu")
            for s in range(0, num_rows, minibatch_rows):
                mb = perm[s : s + minibatch_rows]
                skip = inert is not None and not bool(inert[mb].all())
                live, skipped = (mb[~inert[mb]], mb[inert[mb]]) if skip else (mb, mb[:0])
                update = Update(self.micro_batches(self.batch, live))
                update.skipped = skipped
                out.append(update)
        return out

    def totals(self, update) -> dict:
        mask = self.batch.loss_mask
        counted = list(update) + [getattr(update, "skipped", torch.zeros(0, dtype=torch.long, device="cpu"))]
        return {
            "num_tokens": sum(int(mask[rows].sum()) for rows in counted),
            "num_seqs": sum(len(rows) for rows in counted),
            "tokens": sum(int(self.batch.attention_mask[rows].sum()) for rows in counted),
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out greedy answers scored by the (verifier) rewards: accuracy and mean reward."""
        if not self.eval_records:
            return {}
        from posttrain.evaluate import GenEvalConfig, evaluate_policy, load_reward_fns

        fns = load_reward_fns(self.algo_cfg.reward.eval_functions or list(self.algo_cfg.reward.functions))
        env = self.algo_cfg.env if self.algo_cfg.env.name else None  # held-out answers through the same environment
        if self.rewards.model_fn is not None:  # the trained-on (proxy) score of the same answers
            fns["reward_model"] = self.rewards.model_fn
        gen_cfg = GenEvalConfig(max_new_tokens=self.algo_cfg.sampling.eval_max_new_tokens, batch_size=32,
                                autocast=wants_bf16(self.cfg.model, self.device.type), env=env)
        summary, _ = evaluate_policy(self.model, self.tokenizer, self.eval_records, fns, gen_cfg)
        return {k: v for k, v in summary.items() if isinstance(v, float)}


def kl_metrics(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """KL(π‖π_ref) measured on the sampled tokens, each metric named for what it is: the token means of the three
    estimators (nats per token; k2 and k3 never negative) and the mean over rows of each sequence's k1 sum (nats
    per completion: the unbiased sequence KL, comparable across algorithms)."""
    from posttrain.algos.kl import kl_estimate
    from posttrain.ops import masked_mean

    out = {f"kl/token_{k}_mean": float(masked_mean(kl_estimate(logp, ref_logp, k), mask)) for k in ("k1", "k2", "k3")}
    out["kl/seq_k1_sum"] = float(((logp - ref_logp) * mask).sum(-1).mean())
    return out


def valid_mean(batch: RolloutBatch) -> float:
    """Mean reward of the rows whose reward was computed (NaN when none was, rather than a mean of nothing)."""
    valid = batch.extra["reward_valid"]
    return float(batch.rewards[valid].mean()) if valid.any() else float("nan")


class Update(list):
    """An optimizer update's micro-batches (row indices), and `skipped`: rows counted in the loss normalizers
    that no forward pass needs (see `OnlineBase.updates`)."""

    skipped: torch.Tensor


def _make_monitor(options: dict):
    from dataclasses import fields

    from posttrain.train.monitors import FailureMonitor, MonitorConfig

    known = {f.name for f in fields(MonitorConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"algo.monitor: unknown option(s) {unknown}; valid: {sorted(known)}")
    return FailureMonitor(MonitorConfig(**options))


def _all_rows(batch: RolloutBatch) -> torch.Tensor:
    return torch.arange(batch.num_rows, device="cpu")


def _in_row_order(values: torch.Tensor, passes: list[torch.Tensor]) -> torch.Tensor:
    """Per-row results computed pass by pass (rows in `passes` order) put back in row order."""
    order = torch.cat(passes).to(values.device)
    return values.new_empty(values.shape).index_copy_(0, order, values)
