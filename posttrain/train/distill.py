"""On-policy distillation on the one loop: the student samples, a frozen teacher's log-probs on the student's own
tokens are the training signal (algos/distill.py: the per-token reverse KL as a negative reward, or GKD's JSD).

Agarwal et al. 2024 (GKD, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes") with
lambda = 1 (every sequence is the student's); Gu et al. 2024 (MiniLLM) for the reverse KL. The teacher is any causal
LM with the student's tokenizer; it is loaded frozen and counted in `models_in_memory`. The task rewards are still
computed (they are what the run is for, and what held-out evaluation reports); `algo.reward_weight > 0` also trains
on them, adding their group advantage (GRPO's) to each token's distillation advantage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from posttrain.algos.advantages import group_advantages
from posttrain.algos.distill import DISTILL_LOSSES, generalized_jsd, reverse_kl_advantages
from posttrain.algos.kl import kl_estimate
from posttrain.algos.policy_loss import actor_loss
from posttrain.config import RunConfig
from posttrain.online_config import CorrectionConfig, SamplingConfig
from posttrain.ops import agg_loss, masked_mean
from posttrain.train import common
from posttrain.train.loop import Iteration
from posttrain.train.online import OnlineBase, OnlineConfig, corrected_advantages, online_reference, valid_mean
from posttrain.train.registry import algorithm
from posttrain.types import LossOutput


@dataclass
class DistillConfig(OnlineConfig):
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_generations=4))
    teacher: str = ""  # the teacher: a checkpoint folder, GGUF file or hub id with the student's tokenizer (frozen)
    loss: str = "reverse_kl"  # reverse_kl (per-token negative reward, one log-prob per token) | jsd (GKD, whole vocabulary)
    beta: float = 0.5  # jsd's interpolation: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher)
    reward_weight: float = 0.0  # > 0: also train on the task rewards, this times their group advantage per token
    policy_loss: str = "clip"  # reverse_kl's policy-gradient loss: clip | gspo | cispo | ... (algos/policy_loss*.py)
    clip_low: float = 0.2
    clip_high: float = 0.2
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)  # sampler/trainer mismatch (reverse_kl)
    num_iterations: int = 1  # passes over each rollout (old log-probs stored when > 1)
    minibatch_rows: int = 0  # rows per optimizer update; 0 = the whole rollout
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm


@algorithm("distill", config=DistillConfig, help="On-policy distillation: the student samples, a frozen teacher scores its tokens")
class Distill(OnlineBase):
    def __init__(self, cfg: RunConfig):
        a = cfg.algo
        if not a.teacher:
            raise ValueError("posttrain distill needs algo.teacher: the checkpoint whose behaviour the student learns")
        DISTILL_LOSSES.lookup(a.loss)
        if not 0.0 <= a.beta <= 1.0:
            raise ValueError(f"algo.beta must be in [0, 1], got {a.beta}")
        super().__init__(cfg, needs_reference=False)
        self.teacher = online_reference(self.model, cfg, a.teacher, self.device)
        self.extra_copies = self.teacher.copies
        _check_same_tokenizer(self.tokenizer, a.teacher)
        self.updates_per_step = self.planned_updates(a.num_iterations, a.minibatch_rows)

    def next_iteration(self, step: int) -> Iteration:
        a = self.algo_cfg
        batch = self.sample(step)
        metrics = dict(batch.extra["metrics"])
        start = time.perf_counter()
        if a.num_iterations > 1 or (a.minibatch_rows and a.minibatch_rows < batch.num_rows):
            batch.extra["old_logp"] = self.policy_logps(batch)
        if a.loss == "reverse_kl":
            batch.extra["teacher_logp"] = self.reference_logps(batch, self.teacher)
        metrics["timing/logprob_passes_s"] = time.perf_counter() - start
        valid = batch.extra["reward_valid"]
        task_adv = torch.zeros_like(batch.rewards)
        if a.reward_weight and valid.any():
            task_adv[valid] = group_advantages(batch.rewards[valid], batch.group[valid], "grpo")
        batch.extra["task_advantages"] = a.reward_weight * task_adv
        self.batch = batch
        metrics.update(models_in_memory=float(self.models_in_memory), reward=valid_mean(batch))
        return Iteration(self.updates(batch.num_rows, a.minibatch_rows, a.num_iterations, step), metrics)

    def loss(self, rows, totals) -> LossOutput:
        a = self.algo_cfg
        counts = dict(num_tokens=totals["num_tokens"], num_seqs=totals["num_seqs"], max_len=a.sampling.max_new_tokens)
        return self._jsd_loss(rows, counts) if a.loss == "jsd" else self._reverse_kl_loss(rows, counts)

    def _reverse_kl_loss(self, rows, counts: dict) -> LossOutput:
        a, b = self.algo_cfg, self.batch
        logp, entropy = self.current_logps(rows)
        mask = b.loss_mask[rows]
        old = b.extra["old_logp"][rows] if "old_logp" in b.extra else logp.detach()
        teacher = b.extra["teacher_logp"][rows]
        advantages = reverse_kl_advantages(old, teacher, mask) + b.extra["task_advantages"][rows, None] * mask
        advantages, mismatch = corrected_advantages(a.correction, b, rows, old, mask, advantages)
        out = actor_loss(a.policy_loss, logp, old, advantages, mask, entropy, clip_low=a.clip_low,
                         clip_high=a.clip_high, agg_mode=a.loss_agg, **counts)
        return LossOutput(out.loss, {**out.metrics, **mismatch, **_teacher_gap(old, teacher, mask)})

    def _jsd_loss(self, rows, counts: dict) -> LossOutput:
        from posttrain.models.shared_prefix import completion_logits

        a, b = self.algo_cfg, self.batch
        mask = b.loss_mask[rows]
        self.model.train()
        with torch.no_grad(), self.teacher.scoring(self.device) as teacher, self._autocast():
            teacher_logits = completion_logits(teacher, b, rows)
        with self._autocast():
            student_logits = completion_logits(self.model, b, rows)
        per_token = generalized_jsd(student_logits, teacher_logits, a.beta, self.logp_temperature)
        loss = agg_loss(per_token, mask, a.loss_agg, **counts)
        if a.reward_weight:  # the task's policy gradient on the same tokens (on-policy: ratio 1, old = logp)
            logp = torch.log_softmax(student_logits.float() / self.logp_temperature, -1).gather(
                -1, b.input_ids[rows, b.prompt_width:, None]).squeeze(-1)
            pg = -(b.extra["task_advantages"][rows, None] * logp)
            loss = loss + agg_loss(pg, mask, a.loss_agg, **counts)
        return LossOutput(loss, {"distill/jsd_token_mean": masked_mean(per_token.detach(), mask)})

    def _autocast(self):
        return common.autocast_context(self.cfg.model, self.device.type)


def _teacher_gap(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """The reverse KL(student || teacher) per token on the student's samples: its k1 (unbiased) and k3 (never
    negative) estimates, and the share of tokens the teacher finds likelier than the student does."""
    return {"distill/reverse_kl_k1": masked_mean(kl_estimate(student_logp, teacher_logp, "k1"), mask),
            "distill/reverse_kl_k3": masked_mean(kl_estimate(student_logp, teacher_logp, "k3"), mask),
            "distill/teacher_prefers_fraction": masked_mean((teacher_logp > student_logp).float(), mask)}


def _check_same_tokenizer(tokenizer, teacher: str) -> None:
    """Distillation compares log-probs of the same token ids: the teacher's vocabulary must be the student's."""
    from posttrain.models.loading import load_tokenizer, resolve_model_path

    theirs = load_tokenizer(resolve_model_path(teacher))
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"algo.teacher {teacher!r} has another tokenizer ({len(theirs)} tokens vs the student's "
                         f"{len(tokenizer)}, or the same size with other ids): on-policy distillation needs the same "
                         "token ids in both models")
