"""What an online run is rewarded by: reward functions by name, a scalar reward model, or a DPO model's implicit
reward, combined by a `RewardRunner`. `build_rewards` makes them all in one place, with every input explicit (the
policy, its tokenizer, the run's reference and device), and says which models it added to memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from posttrain.config import RunConfig
from posttrain.online_config import RewardConfig
from posttrain.models.loading import adapter_disabled, autocast_context, load_frozen_lm, load_reward_model, resolve_model_path


@dataclass
class RewardSetup:
    runner: object  # RewardRunner: fn(prompts, completions, **columns) -> ScoredBatch
    model_fn: object | None = None  # the model reward (scalar or implicit): also scored on held-out answers
    scalar_model: object | None = None  # a scalar reward model (PPO can start its critic from it)
    loaded: list = field(default_factory=list)  # models this setup loaded (counted in models_in_memory)

    @property
    def copies(self) -> int:
        return len(self.loaded)


def build_reward_runner(cfg: RewardConfig, names: list[str] | None = None, reward_model_fn=None):
    """A RewardRunner over the named reward functions (with their weights and options) and a model reward."""
    from posttrain.rewards.registry import load_reward
    from posttrain.rewards.runner import RewardRunner

    names = list(names if names is not None else cfg.functions)
    weights = list(cfg.weights) or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"algo.reward.weights has {len(weights)} entries for {len(names)} reward functions")
    fns = [(n.split(":")[-1], load_reward(n, **cfg.options.get(n, {})), w) for n, w in zip(names, weights)]
    if reward_model_fn is not None:
        fns.append(("reward_model", reward_model_fn, 1.0))
    return RewardRunner(fns, num_workers=cfg.workers, timeout_s=cfg.timeout_s, on_error=cfg.on_error)


def build_rewards(cfg: RunConfig, policy, tokenizer, reference, device) -> RewardSetup:
    """The run's rewards. `reference` (a ModelReference or None) is shared with an implicit reward model when both
    are the same checkpoint."""
    a = cfg.algo.reward
    if a.model_kind not in ("scalar", "implicit"):
        raise ValueError(f"algo.reward.model_kind must be scalar or implicit, got {a.model_kind!r}")
    setup = RewardSetup(runner=None)
    if a.model and a.model_kind == "implicit":
        setup.model_fn = _implicit_reward(cfg, policy, tokenizer, reference, device, setup.loaded)
    elif a.model:
        from posttrain.rewards.model_rewards import RewardModelReward

        m = cfg.model
        setup.scalar_model = load_reward_model(a.model, m.frozen_dtype or m.dtype, tokenizer.pad_token_id,
                                               trainable=False, device="cpu" if m.offload_frozen else device)
        setup.loaded.append(setup.scalar_model)
        setup.model_fn = RewardModelReward(setup.scalar_model, tokenizer, device=device)
    setup.runner = build_reward_runner(a, reward_model_fn=setup.model_fn)  # a: the algo.reward section
    return setup


def _implicit_reward(cfg: RunConfig, policy, tokenizer, reference, device, loaded: list):
    """A DPO model's implicit reward, with the β, reference and templating its run recorded (unless set here);
    its reference is the run's own frozen reference when they are the same checkpoint (no second copy), or the
    policy with its adapter off under LoRA."""
    from posttrain.rewards.model_rewards import ImplicitReward, dpo_run_settings

    a, m, ref_model = cfg.algo.reward, cfg.model, cfg.algo.reference.model
    run = dpo_run_settings(a.model)
    beta = a.model_beta if a.model_beta is not None else run.get("beta")
    if beta is None:
        raise ValueError(f"set algo.reward.model_beta: {a.model} has no DPO run config.yaml to read β from")
    same = lambda x, y: os.path.realpath(resolve_model_path(x)) == os.path.realpath(resolve_model_path(y))  # noqa: E731
    model = load_frozen_lm(m, resolve_model_path(a.model), device)
    loaded.append(model)
    ref_path = a.model_ref or run.get("ref") or m.name_or_path
    ours, ref_context = (reference.model if reference is not None else None), None
    if ours is not None and same(ref_path, ref_model or m.name_or_path):
        ref = ours
    elif m.lora.enabled and ref_model is None and same(ref_path, m.name_or_path):  # the adapter switched off
        ref, ref_context = policy, (lambda: adapter_disabled(policy))
    else:
        ref = load_frozen_lm(m, resolve_model_path(ref_path), device)
        loaded.append(ref)
    return ImplicitReward(model, ref, tokenizer, beta, use_chat=run.get("use_chat", True), ref_context=ref_context,
                          autocast=lambda: autocast_context(m, device.type), device=device)
