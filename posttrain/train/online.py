"""What the online algorithms (GRPO, PPO, online DPO) share: prompts, rollouts, rewards, reference, updates.

An online iteration: take `prompts_per_step` prompts, sample G completions each with the current policy
(KV cache of each prompt shared by its G samples), score them with the reward functions, compute the
reference and old-policy log-probs the loss needs, then hand the loop minibatch updates over the rollout.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from posttrain.config import RunConfig
from posttrain.data.chat import encode_prompt, end_of_turn_ids
from posttrain.data.collate import filter_by_length
from posttrain.models.shared_prefix import supports_shared_prefix
from posttrain.rollout.base import get_generator, reclaim_memory, release_memory
from posttrain.models.loading import adapter_disabled, frozen_on, load_frozen_lm, resolve_model_path, wants_bf16
from posttrain.train import common
from posttrain.train.monitors import distinct_n
from posttrain.train.distributed import context
from posttrain.train.rollout_batch import RolloutBatch, completion_logps
from posttrain.train.sharding import full_params


@dataclass
class OnlineConfig:
    rewards: list[str] = field(default_factory=lambda: ["numeric"])  # names or module:function
    reward_weights: list[float] = field(default_factory=list)  # default 1.0 each
    reward_options: dict = field(default_factory=dict)  # {reward name: {option: value}}
    reward_model: str | None = None  # a reward model folder, scored as reward "reward_model"
    reward_model_kind: str = "scalar"  # scalar (a `posttrain rm` model) | implicit (a `posttrain dpo` model: β·log πθ/π_ref)
    reward_model_ref: str | None = None  # implicit: its reference (default: what its run's config.yaml names)
    reward_model_beta: float | None = None  # implicit: its β (default: its run's config.yaml)
    reward_on_error: str = "raise"  # raise | zero (counted in rewards/<name>/errors)
    reward_timeout_s: float = 30.0
    reward_workers: int = 2
    ref_model: str | None = None  # default: the starting policy (with LoRA: the adapter switched off)
    prompts_per_step: int = 8
    num_generations: int = 8  # G samples per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0  # KL coefficient; 0 loads no reference
    kl_estimator: str = "k3"  # k1 | k2 | k3 (Schulman 2020)
    mask_truncated: bool = False  # completions that hit max_new_tokens get no loss (DAPO overlong filtering)
    eval_rewards: list[str] = field(default_factory=list)  # held-out scoring; default: `rewards`
    eval_max_new_tokens: int = 48
    monitor: dict = field(default_factory=dict)  # MonitorConfig options (train/monitors.py); {enabled: false} turns off
    share_prompt: bool = True  # score a group's completions in one row around its prompt (train/rollout_batch.py)
    engine: str = "hf"  # rollout engine: hf (the policy itself) | vllm (colocated vLLM, weights synced each step)
    vllm_options: dict = field(default_factory=dict)  # passed to vllm.LLM (gpu_memory_utilization, dtype, ...)


def accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_reward_runner(cfg: OnlineConfig, names: list[str] | None = None, reward_model_fn=None):
    from posttrain.rewards.registry import load_reward
    from posttrain.rewards.runner import RewardRunner

    names = list(names if names is not None else cfg.rewards)
    weights = list(cfg.reward_weights) or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(names)} rewards")
    fns = [(n.split(":")[-1], load_reward(n, **cfg.reward_options.get(n, {})), w) for n, w in zip(names, weights)]
    if reward_model_fn is not None:
        fns.append(("reward_model", reward_model_fn, 1.0))
    return RewardRunner(fns, num_workers=cfg.reward_workers, timeout_s=cfg.reward_timeout_s, on_error=cfg.reward_on_error)


class Reference:
    """Reference log-probs: the LoRA policy with its adapter off (no copy), or a frozen model (one copy)."""

    def __init__(self, policy, cfg: RunConfig, path: str | None, device: torch.device):
        self.policy, self.model = policy, None
        if not (cfg.model.lora.enabled and path is None):
            self.model = load_frozen_lm(cfg.model, resolve_model_path(path or cfg.model.name_or_path), device)

    @property
    def copies(self) -> int:
        return 1 if self.model is not None else 0

    @torch.no_grad()
    def logps(self, batch: RolloutBatch, rows, temperature: float, chunk: int, share_prompt: bool) -> torch.Tensor:
        """Completion log-probs (len(rows), C) under the reference."""
        frozen = self.model is not None
        with frozen_on(self.model, batch.input_ids.device) if frozen else adapter_disabled(self.policy):
            return completion_logps(self.model if frozen else self.policy, batch, rows, chunk, False, temperature,
                                    share_prompt)


class OnlineBase(common.DatasetAlgorithm):
    """Prompts, generation, rewards and evaluation; subclasses add their advantages and losses."""

    def __init__(self, cfg: RunConfig, needs_reference: bool):
        self.cfg, self.algo_cfg = cfg, cfg.algo
        self.model, self.tokenizer = common.load_policy_and_tokenizer(cfg)
        train, held = common.load_splits(cfg, "prompts")
        self.train_prompts = self._encode_prompts(train, "train")
        self.eval_records = held
        world = context().world
        if self.algo_cfg.prompts_per_step % world:
            raise ValueError(f"prompts_per_step={self.algo_cfg.prompts_per_step} must be divisible by the {world} processes")
        self.order = common.make_order([len(p[1]) for p in self.train_prompts], cfg, self.algo_cfg.prompts_per_step // world,
                                       group_by_length=False, drop_last=True)
        self.generator = get_generator(self.algo_cfg.engine).for_training(self.model, self.tokenizer, cfg)
        self._synced_step: int | None = None  # the step whose weights a separate engine (vLLM) holds
        self.reference = Reference(self.model, cfg, self.algo_cfg.ref_model, self.device) if needs_reference else None
        self.rewards = build_reward_runner(self.algo_cfg, reward_model_fn=self._reward_model_fn())
        self.batch: RolloutBatch | None = None
        self.monitor = _make_monitor(self.algo_cfg.monitor)

    def _encode_prompts(self, records, name: str):
        """(record, prompt ids) pairs; prompts over max_prompt_length are dropped and counted, never truncated
        (a cut prompt is another question), so generator and trainer see identical ids (PITFALLS #9)."""
        encoded = [(r, encode_prompt(self.tokenizer, r.data["prompt"])) for r in records]
        kept, report = filter_by_length(
            encoded, [len(ids) for _, ids in encoded], [r.where for r in records], self.cfg.data.max_prompt_length, "drop"
        )
        common.record_length_report(self.cfg, f"{name}_prompts", report)
        return kept

    def _reward_model_fn(self):
        a = self.algo_cfg
        if a.reward_model_kind not in ("scalar", "implicit"):
            raise ValueError(f"algo.reward_model_kind must be scalar or implicit, got {a.reward_model_kind!r}")
        if not a.reward_model:
            return None
        if a.reward_model_kind == "implicit":
            return self._implicit_reward_fn()
        from posttrain.models.loading import load_reward_model
        from posttrain.rewards.model_rewards import RewardModelReward

        m = self.cfg.model
        self.reward_model = load_reward_model(a.reward_model, m.frozen_dtype or m.dtype, self.tokenizer.pad_token_id,
                                              trainable=False, device="cpu" if m.offload_frozen else self.device)
        self.model_reward_fn = RewardModelReward(self.reward_model, self.tokenizer, device=self.device)
        return self.model_reward_fn

    def _implicit_reward_fn(self):
        """A DPO model's implicit reward, with the β, reference and templating its run recorded (unless set here);
        the reference is PPO's own frozen reference when they are the same checkpoint (no second copy)."""
        import os

        from posttrain.rewards.model_rewards import ImplicitReward, dpo_run_settings

        a, m = self.algo_cfg, self.cfg.model
        run = dpo_run_settings(a.reward_model)
        beta = a.reward_model_beta if a.reward_model_beta is not None else run.get("beta")
        if beta is None:
            raise ValueError(f"set algo.reward_model_beta: {a.reward_model} has no DPO run config.yaml to read β from")
        same = lambda x, y: os.path.realpath(resolve_model_path(x)) == os.path.realpath(resolve_model_path(y))  # noqa: E731
        self.implicit_models = [load_frozen_lm(m, resolve_model_path(a.reward_model), self.device)]
        ref_path = a.reward_model_ref or run.get("ref") or m.name_or_path
        ours, ref_context = (self.reference.model if self.reference is not None else None), None
        if ours is not None and same(ref_path, a.ref_model or m.name_or_path):
            ref = ours
        elif m.lora.enabled and a.ref_model is None and same(ref_path, m.name_or_path):  # the adapter switched off
            ref, ref_context = self.model, (lambda: adapter_disabled(self.model))
        else:
            ref = load_frozen_lm(m, resolve_model_path(ref_path), self.device)
            self.implicit_models.append(ref)
        self.model_reward_fn = ImplicitReward(self.implicit_models[0], ref, self.tokenizer, beta,
                                              use_chat=run.get("use_chat", True), ref_context=ref_context,
                                              autocast=lambda: common.autocast_context(m, self.device.type),
                                              device=self.device)
        return self.model_reward_fn

    @property
    def models_in_memory(self) -> int:
        rm = (1 if getattr(self, "reward_model", None) is not None else 0) + len(getattr(self, "implicit_models", []))
        engine = getattr(self.generator, "weight_copies", 0)  # vLLM holds its own copy of the policy
        return 1 + (self.reference.copies if self.reference else 0) + rm + self.extra_copies + engine

    extra_copies = 0

    @property
    def logp_temperature(self) -> float:
        """Log-probs are scored at the sampling temperature, so the ratio is 1 before any update (PITFALLS #11)."""
        return self.algo_cfg.temperature or 1.0

    def sampling_params(self, max_new_tokens: int, greedy: bool = False):
        from posttrain.rollout.base import SamplingParams

        a = self.algo_cfg
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.0 if greedy else a.temperature, top_p=a.top_p, top_k=a.top_k,
            stop_token_ids=sorted(end_of_turn_ids(self.tokenizer)), batch_size=max(1, a.prompts_per_step),
        )

    def sample(self, step: int, round_: int = 0) -> RolloutBatch:
        """Generate and score G completions for the next prompts of the data order."""
        a = self.algo_cfg
        picked = [self.train_prompts[i] for i in self.order.next()]
        seed = self.cfg.train.seed * 1_000_003 + step * 101 + round_ * 7 + context().rank * 100_003  # ranks differ
        start = time.perf_counter()
        with full_params(self.model):  # sharded: ranks sample different lengths, so no collective per token
            reclaim_memory(self.generator)  # a colocated engine (vLLM) takes back its KV cache and weights
            self._sync_engine(step)
            rollout = self.generator.generate([ids for _, ids in picked], self.sampling_params(a.max_new_tokens),
                                              a.num_generations, seed)
            release_memory(self.generator)  # ... and lends them to the scoring passes and the updates
        gen_time = time.perf_counter() - start
        records = [r for r, _ in picked for _ in range(a.num_generations)]
        prompts = [r.data["prompt"] for r in records]
        columns = {k: [r.data.get(k) for r in records] for k in records[0].data if k != "prompt"}
        lengths = rollout.completion_mask.sum(-1).tolist()
        # raw_prompt: the messages themselves, so model rewards template them as their training pairs were
        scored = self.rewards([_prompt_text(p) for p in prompts], rollout.texts, **{**columns, "raw_prompt": prompts},
                              **self._length_column(lengths))
        rewards = torch.tensor(scored.total, dtype=torch.float32, device=rollout.completion_ids.device)
        loss_mask = rollout.completion_mask.clone()
        if a.mask_truncated:
            loss_mask[rollout.truncated] = 0
        # NaN: a reward that could not be computed (bad gold answer, sandbox failure); inf: a broken reward. Such rows
        # get no loss and no advantage, and their group's statistics use the valid rows only.
        masked = ~torch.isfinite(rewards)
        loss_mask[masked] = 0
        rewards = rewards.masked_fill(masked, 0.0)  # finite everywhere; `reward_valid` says which rows count
        batch = RolloutBatch(
            input_ids=torch.cat([rollout.prompt_ids, rollout.completion_ids], 1),
            attention_mask=torch.cat([rollout.prompt_mask, rollout.completion_mask], 1),
            completion_mask=rollout.completion_mask, loss_mask=loss_mask, rewards=rewards, group=rollout.group,
            truncated=rollout.truncated, prompt_width=rollout.prompt_ids.shape[1], texts=rollout.texts, prompts=prompts,
            pad_id=self.tokenizer.pad_token_id,
        )
        batch.extra["reward_valid"] = ~masked
        batch.extra["sampler_logp"] = rollout.logprobs
        batch.extra["metrics"] = {**scored.metrics(), "rewards/masked_samples": float(masked.sum()), **_length_metrics(rollout), "timing/generate_s": gen_time,
                                  "completions_per_s": batch.num_rows / max(gen_time, 1e-9)}
        for name in ("syncs", "sleeps"):  # counters of an engine with its own weights (vLLM)
            if hasattr(self.generator, name):
                batch.extra["metrics"][f"engine/{'weight_syncs' if name == 'syncs' else name}"] = float(getattr(self.generator, name))
        return batch

    def _sync_engine(self, step: int) -> None:
        """An engine with its own copy of the weights (vLLM) gets the policy's once per step, before it samples:
        the weights change only in the updates between steps (dynamic sampling's extra rounds reuse them)."""
        if hasattr(self.generator, "sync_weights") and self._synced_step != step:
            self.generator.sync_weights(self.model)
            self._synced_step = step

    def _forward_token_fraction(self, batch: RolloutBatch, inert: torch.Tensor | None = None) -> float:
        """Tokens the training forward passes process over those of all rows padded: < 1 when a group's prompt is
        shared or inert rows are skipped."""
        share = self.algo_cfg.share_prompt and supports_shared_prefix(self.model)
        rows = None if inert is None else (~inert).nonzero().squeeze(-1)
        return batch.forward_tokens(share, rows) / max(batch.forward_tokens(False), 1)

    def _length_column(self, lengths) -> dict:
        wants = any(accepts(fn, "completion_lengths") for _, fn, _ in self.rewards.fns)
        return {"completion_lengths": lengths} if wants else {}

    @torch.no_grad()
    def policy_logps(self, batch: RolloutBatch, with_entropy: bool = False):
        """Completion log-probs (N, C) of the current policy at the sampling temperature, in row chunks."""
        outs, ents = [], []
        for rows in _chunks(batch.num_rows, self.cfg.train.batch_size):
            with common.autocast_context(self.cfg.model, self.device.type):
                out = completion_logps(self.model, batch, rows, self.cfg.model.logprob_chunk, with_entropy,
                                       self.logp_temperature, self.algo_cfg.share_prompt)
            lp, ent = out if with_entropy else (out, None)
            outs.append(lp)
            ents.append(ent)
        return (torch.cat(outs), torch.cat(ents)) if with_entropy else torch.cat(outs)

    def reference_logps(self, batch: RolloutBatch) -> torch.Tensor:
        outs = []
        for rows in _chunks(batch.num_rows, self.cfg.train.batch_size):
            with common.autocast_context(self.cfg.model, self.device.type):
                outs.append(self.reference.logps(batch, rows, self.logp_temperature, self.cfg.model.logprob_chunk,
                                                 self.algo_cfg.share_prompt))
        return torch.cat(outs)

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
        micro = self.cfg.train.batch_size
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
                update = Update(live[k : k + micro] for k in range(0, len(live), micro))
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

        fns = load_reward_fns(self.algo_cfg.eval_rewards or [r for r in self.algo_cfg.rewards])
        if getattr(self, "model_reward_fn", None) is not None:  # the trained-on (proxy) score of the same answers
            fns["reward_model"] = self.model_reward_fn
        gen_cfg = GenEvalConfig(max_new_tokens=self.algo_cfg.eval_max_new_tokens, batch_size=32,
                                autocast=wants_bf16(self.cfg.model, self.device.type))
        summary, _ = evaluate_policy(self.model, self.tokenizer, self.eval_records, fns, gen_cfg)
        return {k: v for k, v in summary.items() if isinstance(v, float)}



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


def _chunks(n: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + size, n), device="cpu") for s in range(0, n, size)]


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def _length_metrics(rollout) -> dict:
    lengths = rollout.completion_mask.sum(-1).float()
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/max_length": float(lengths.max()),
        "completions/truncated_fraction": float(rollout.truncated.float().mean()),
        "completions/distinct_2": distinct_n([ids[m.bool()].tolist() for ids, m in
                                              zip(rollout.completion_ids, rollout.completion_mask)]),
    }
