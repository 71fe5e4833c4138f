"""The rollout collector of the online algorithms: the prompts and their order, the rollout engine, and one
scored rollout per call (`sample`): G completions per prompt sampled by the engine, scored by the rewards, laid
out as a `RolloutBatch` on the policy's device.
"""

from __future__ import annotations

import inspect
import time

import torch

from posttrain.config import RunConfig
from posttrain.data.chat import encode_prompt, end_of_turn_ids, prompt_text
from posttrain.data.collate import filter_by_length
from posttrain.data.formats import DataError
from posttrain.algos.advantages import per_reward_normalized_total
from posttrain.rollout.base import SamplingParams, get_generator, reclaim_memory, release_memory
from posttrain.train import common
from posttrain.train.distributed import context
from posttrain.train.monitors import distinct_n
from posttrain.train.sharding import full_params, resolve_sharding
from posttrain.types import RolloutBatch


class RolloutCollector:
    def __init__(self, cfg: RunConfig, policy, tokenizer, records, rewards):
        """records: the train split's prompt records; rewards: a RewardRunner."""
        a = cfg.algo.sampling
        self.cfg, self.policy, self.tokenizer, self.rewards = cfg, policy, tokenizer, rewards
        self.prompts = encode_prompts(cfg, tokenizer, records, "train")
        world = context().world
        if a.prompts_per_step % world:
            raise ValueError(f"prompts_per_step={a.prompts_per_step} must be divisible by the {world} processes")
        self.order = common.make_order([len(p[1]) for p in self.prompts], cfg, a.prompts_per_step // world,
                                       group_by_length=False, drop_last=True)
        self.engine = make_engine(a.engine, policy, tokenizer, cfg)  # it receives the sampling section only
        self._synced_step: int | None = None  # the step whose weights a separate engine (vLLM) holds

    def sampling_params(self, max_new_tokens: int, greedy: bool = False) -> SamplingParams:
        a = self.cfg.algo.sampling
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.0 if greedy else a.temperature, top_p=a.top_p, top_k=a.top_k,
            stop_token_ids=sorted(end_of_turn_ids(self.tokenizer)), batch_size=max(1, a.prompts_per_step),
        )

    def sample(self, step: int, round_: int = 0) -> RolloutBatch:
        """Generate and score G completions for the next prompts of the data order."""
        a = self.cfg.algo.sampling
        picked = [self.prompts[i] for i in self.order.next()]
        seed = self.cfg.train.seed * 1_000_003 + step * 101 + round_ * 7 + context().rank * 100_003  # ranks differ
        start = time.perf_counter()
        with full_params(self.policy):  # sharded: ranks sample different lengths, so no collective per token
            reclaim_memory(self.engine)  # a colocated engine (vLLM) takes back its KV cache and weights
            self._sync_engine(step)
            rollout = self._rollout(picked, self.sampling_params(a.max_new_tokens), a.num_generations, seed)
            release_memory(self.engine)  # ... and lends them to the scoring passes and the updates
        gen_time = time.perf_counter() - start
        records = [r for r, _ in picked for _ in range(a.num_generations)]
        start = time.perf_counter()
        batch = self._score(rollout, records)
        batch.extra["metrics"].update({"timing/generate_s": gen_time, "timing/reward_s": time.perf_counter() - start,
                                       "completions_per_s": batch.num_rows / max(gen_time, 1e-9)})
        if self.engine.weight_copies:  # an engine with its own weights: how often they were synced, it slept
            batch.extra["metrics"].update({"engine/weight_syncs": float(self.engine.syncs),
                                           "engine/sleeps": float(self.engine.sleeps)})
        return batch

    def _rollout(self, picked, params: SamplingParams, num_samples: int, seed: int):
        """Single-turn completions of the engine, or multi-turn trajectories when `algo.env` names an environment."""
        if not self.cfg.algo.env.name:
            return self.engine.generate([ids for _, ids in picked], params, num_samples, seed)
        from posttrain.envs.trajectory import run_trajectories

        return run_trajectories(self.engine, self.tokenizer, [r.data for r, _ in picked], self.cfg.algo.env, params,
                                num_samples, seed)

    def _score(self, rollout, records) -> RolloutBatch:
        """The rollout scored by the rewards, as a RolloutBatch whose rows without a finite reward get no loss."""
        prompts = [r.data["prompt"] for r in records]
        columns = {k: [r.data.get(k) for r in records] for k in records[0].data if k != "prompt"}
        policy_mask = rollout.completion_mask if rollout.policy_mask is None else rollout.policy_mask
        lengths = policy_mask.sum(-1).tolist()
        # raw_prompt: the messages themselves, so model rewards template them as their training pairs were
        scored = self.rewards([prompt_text(p) for p in prompts], rollout.texts, **{**columns, "raw_prompt": prompts},
                              **self._length_column(lengths))
        device = rollout.completion_ids.device
        rewards = torch.tensor(scored.total or [0.0] * len(records), dtype=torch.float32, device=device)
        if self.cfg.algo.reward.combine == "per_function" and len(scored.per_fn) > 1:
            rewards = self._per_function_total(scored, rollout.group, rewards.device)
        if "env_reward" in rollout.info:  # the environment's per-turn rewards (NaN: the environment failed)
            rewards = rewards + torch.tensor(rollout.info["env_reward"], dtype=torch.float32, device=device)
        # the environment's tokens between turns are context, never trained on
        loss_mask = policy_mask.clone()
        if self.cfg.algo.mask_truncated:
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
        for name, values in scored.per_fn.items():  # each function's score per row (samples.jsonl)
            batch.extra[f"score/{name}"] = torch.tensor(values, dtype=torch.float32, device=device)
        batch.extra["sampler_logp"] = rollout.logprobs
        batch.extra["metrics"] = {**scored.metrics(), "rewards/masked_samples": float(masked.sum()),
                                  **length_metrics(rollout), **rollout.info.get("metrics", {})}
        if "turn_rewards" in rollout.info:  # token-level: PPO places each turn's reward at its turn's end
            batch.extra["turn_rewards"] = rollout.info["turn_rewards"]
        if "transcripts" in rollout.info:
            batch.extra["transcripts"] = rollout.info["transcripts"]
        if any(name == "code" for name, _, _ in self.rewards.fns):  # which sandbox layers were active on this machine
            from posttrain.rewards.sandbox import sandbox_metrics

            batch.extra["metrics"].update(sandbox_metrics())
        return batch

    def _per_function_total(self, scored, group, device) -> torch.Tensor:
        """GDPO's total: each reward function normalized within its group before the weighted sum."""
        names = list(scored.per_fn)
        weight = {name: w for name, _, w in self.rewards.fns}
        per_fn = torch.tensor([scored.per_fn[n] for n in names], dtype=torch.float64, device=device)
        weights = torch.tensor([weight[n] for n in names], dtype=torch.float64, device=device)
        return per_reward_normalized_total(per_fn, weights, group.to(device)).float()

    def _sync_engine(self, step: int) -> None:
        """An engine with its own copy of the weights (vLLM) gets the policy's once per step, before it samples:
        the weights change only in the updates between steps (dynamic sampling's extra rounds reuse them)."""
        if self.engine.weight_copies and self._synced_step != step:
            self.engine.sync_weights(self.policy)
            self._synced_step = step

    def _length_column(self, lengths) -> dict:
        wants = any(accepts(fn, "completion_lengths") for _, fn, _ in self.rewards.fns)
        return {"completion_lengths": lengths} if wants else {}


def encode_prompts(cfg: RunConfig, tokenizer, records, name: str):
    """(record, prompt ids) pairs; prompts over max_prompt_length are dropped and counted, never truncated (a cut
    prompt is another question), so generator and trainer see identical ids (the prompt-limit bug TRL had)."""
    encoded = [(r, encode_prompt(tokenizer, r.data["prompt"])) for r in records]
    kept, report = filter_by_length(
        encoded, [len(ids) for _, ids in encoded], [r.where for r in records], cfg.data.max_prompt_length, "drop"
    )
    common.record_length_report(cfg, f"{name}_prompts", report)
    return kept


def make_engine(name: str, model, tokenizer, cfg: RunConfig):
    """The rollout engine; a separate engine's copy of the weights (vLLM) needs the whole weights on each rank."""
    if name == "vllm" and resolve_sharding(cfg.train) != "none":
        raise ValueError("algo.engine=vllm with train.sharding: each rank's vLLM engine needs whole weights; "
                         "use train.sharding=none (data-parallel ranks each run their own engine)")
    from posttrain.models.loading import wants_bf16
    from posttrain.rollout.base import EngineContext

    weight = next(model.parameters())
    env = cfg.algo.env
    # a multi-turn context grows by the environment's text and the tool descriptions; 512 tokens cover those
    after_prompt = max(cfg.algo.sampling.max_new_tokens, env.max_total_tokens + 512 if env.name else 0)
    context = EngineContext(bf16=weight.dtype == torch.float32 and wants_bf16(cfg.model, weight.device.type),
                            max_model_len=cfg.data.max_prompt_length + after_prompt,
                            seed=cfg.train.seed, start_checkpoint=cfg.model.name_or_path)
    return get_generator(name).for_training(model, tokenizer, cfg.algo.sampling, context)


def accepts(fn, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (or any, through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# columns every reward receives besides the record's own: the prompt's messages, and the completions' token counts
PROVIDED_COLUMNS = {"raw_prompt", "completion_lengths"}


def required_columns(fn) -> list[str]:
    """The dataset columns a reward function cannot run without: its parameters after (prompts, completions) that
    have no default (`numeric(prompts, completions, answer, **_)` needs `answer`); options bound by partial have one."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a callable without a signature: nothing can be said before calling it
        return []
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in named[2:] if p.default is p.empty and p.kind is not p.POSITIONAL_ONLY]


def check_reward_columns(cfg: RunConfig, train, held) -> None:
    """Each prompt record has every column the run's rewards need (`algo.reward.functions` for training,
    `eval_functions` for the held-out split), checked when the data is read: otherwise the first rollout (after
    the models are loaded and a step is sampled) fails with a TypeError from inside the reward, or, under
    `on_error=zero`, scores 0 everywhere. A null value is a value (the reward may mask it), a missing key is not."""
    from posttrain.rewards.registry import load_reward

    section = cfg.algo.reward
    train_fns = {n: load_reward(n, **section.options.get(n, {})) for n in section.functions}
    eval_names = section.eval_functions or section.functions
    eval_fns = {n: train_fns.get(n) or load_reward(n) for n in eval_names}
    eval_key = "algo.reward.eval_functions" if section.eval_functions else "algo.reward.functions"
    for records, fns, key in ((train, train_fns, "algo.reward.functions"), (held, eval_fns, eval_key)):
        needs = {name: [c for c in required_columns(fn) if c not in PROVIDED_COLUMNS] for name, fn in fns.items()}
        for record in records:
            for name, columns in needs.items():
                missing = [c for c in columns if c not in record.data]
                if missing:
                    raise DataError(f"{record.where}: missing column {missing[0]!r}, which reward {name!r} "
                                    f"({key}) needs; columns: {sorted(record.data)}")


def length_metrics(rollout) -> dict:
    lengths = rollout.completion_mask.sum(-1).float()
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/max_length": float(lengths.max()),
        "completions/truncated_fraction": float(rollout.truncated.float().mean()),
        "completions/distinct_2": distinct_n([ids[m.bool()].tolist() for ids, m in
                                              zip(rollout.completion_ids, rollout.completion_mask)]),
    }
