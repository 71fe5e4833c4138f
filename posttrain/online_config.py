"""The sections of an online algorithm's config (`algo.sampling.*`, `algo.reward.*`, `algo.reference.*`,
`algo.kl.*`): one dataclass per component, so each part of the code receives the part it uses (a rollout engine
gets `SamplingConfig` and nothing else). The flat names of earlier releases (`algo.temperature`, `algo.rewards`,
`algo.beta` ...) are still accepted, with a deprecation warning naming the new key (`rename_online_keys`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import rename_key


@dataclass
class SamplingConfig:
    prompts_per_step: int = 8  # prompts per step (over all processes)
    num_generations: int = 8  # G samples per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eval_max_new_tokens: int = 48  # held-out greedy answers
    engine: str = "hf"  # rollout engine: hf (the policy itself) | vllm (colocated vLLM, weights synced each step)
    vllm_options: dict = field(default_factory=dict)  # passed to vllm.LLM (gpu_memory_utilization, dtype, ...)


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["numeric"])  # reward functions: names or module:function
    weights: list[float] = field(default_factory=list)  # one per function; default 1.0 each
    options: dict = field(default_factory=dict)  # {function name: {option: value}}
    model: str | None = None  # a reward model folder, scored as reward "reward_model"
    model_kind: str = "scalar"  # scalar (a `posttrain rm` model) | implicit (a `posttrain dpo` model: β·log πθ/π_ref)
    model_ref: str | None = None  # implicit: its reference (default: what its run's config.yaml names)
    model_beta: float | None = None  # implicit: its β (default: its run's config.yaml)
    on_error: str = "raise"  # raise | zero (counted in rewards/<name>/errors)
    timeout_s: float = 30.0
    workers: int = 2
    eval_functions: list[str] = field(default_factory=list)  # held-out scoring; default: `functions`
    # how several functions make one reward: sum (weighted sum, then the advantage estimator) | per_function
    # (GDPO: each function z-scored within the prompt's group, then the weighted sum; algos/advantages.py)
    combine: str = "sum"


@dataclass
class ReferenceConfig:
    model: str | None = None  # default: the starting policy (with LoRA: the adapter switched off)


@dataclass
class KLConfig:
    beta: float = 0.0  # KL coefficient; 0 loads no reference
    # k1 | k2 | k3 (Schulman 2020), or null: k1 where the KL is in the reward (unbiased), k3 where it is in the loss.
    # In the loss, k3's expected gradient is that of the forward KL(π_ref‖π) and k2's that of the reverse KL(π‖π_ref);
    # k1's is 0 (E_π[∇ log π] = 0: no KL pressure), so k1 in the loss is refused ("A Comedy of Estimators", 2025)
    estimator: str | None = None


@dataclass
class CorrectionConfig:
    """Rollout-training mismatch correction (algos/rollout_correction.py): importance weights
    pi_old / pi_sampler per token or per sequence."""

    mode: str = "none"  # none | token_truncate | token_mask | sequence_truncate | sequence_mask
    cap: float = 2.0  # truncate weights above it; mask tokens/sequences whose weight is above it
    cap_low: float = 0.0  # the mask modes also drop weights below it
    off_policy_delta: float = 0.0  # > 0: drop negative-advantage sequences whose mean log-prob gap exceeds it


# flat key of earlier releases -> its section (for every online command)
_SECTIONED = {
    "sampling": ("prompts_per_step", "num_generations", "max_new_tokens", "temperature", "top_p", "top_k",
                 "eval_max_new_tokens", "engine", "vllm_options"),
    "reward": {"rewards": "functions", "reward_weights": "weights", "reward_options": "options",
               "reward_model": "model", "reward_model_kind": "model_kind", "reward_model_ref": "model_ref",
               "reward_model_beta": "model_beta", "reward_on_error": "on_error", "reward_timeout_s": "timeout_s",
               "reward_workers": "workers", "eval_rewards": "eval_functions"},
    "reference": {"ref_model": "model"},
}


def rename_online_keys(commands: tuple[str, ...]) -> None:
    """Accept the flat keys of earlier releases for `commands` (their sampling, reward and reference keys)."""
    for section, names in _SECTIONED.items():
        pairs = names.items() if isinstance(names, dict) else ((n, n) for n in names)
        for old, new in pairs:
            rename_key(f"algo.{old}", f"algo.{section}.{new}", commands)


def rename_kl_keys(command: str, names: dict[str, str]) -> None:
    """Accept a command's flat KL keys of earlier releases (`algo.kl_in`) as `algo.kl.*` names."""
    for old, new in names.items():
        rename_key(f"algo.{old}", f"algo.kl.{new}", (command,))


rename_online_keys(("grpo", "ppo", "online-dpo"))


@dataclass
class EnvConfig:
    """A multi-turn environment for the rollouts (`posttrain/envs/`); `name` empty = single-turn completions.

    name: a built-in environment (`tools`) or `module:Class`, created once per trajectory with `options`.
    max_turns: assistant turns per trajectory at most. max_total_tokens: tokens after the prompt (the policy's and
    the environment's together) at most; each turn samples up to `algo.sampling.max_new_tokens` of them.
    turn_timeout_s: wall clock for the environment's answer to one turn (tools included).
    on_error: end (an environment that raises or overruns ends its trajectory, which gets no loss; counted in
    env/errors and logged) | raise (the run stops with the error).
    """

    name: str = ""  # "" (single-turn) | tools (built-in: calculator, python) | module:Class
    options: dict = field(default_factory=dict)  # passed to the environment's constructor (tools: {tools: [...]})
    max_turns: int = 4  # assistant turns per trajectory at most
    max_total_tokens: int = 256  # tokens after the prompt per trajectory, the policy's and the environment's
    turn_timeout_s: float = 30.0  # wall clock for the environment's answer to one turn
    on_error: str = "end"  # end (that trajectory ends, no loss, counted in env/errors) | raise
    # a turn cut at algo.sampling.max_new_tokens: end (the trajectory ends there, as in verl's agent loop) |
    # answer (the turn is closed with the end-of-turn token as environment text, no loss, and the environment
    # answers it; counted in env/cut_turns)
    cut_turns: str = "end"

    def __post_init__(self):
        if self.cut_turns not in ("end", "answer"):
            raise ValueError(f"algo.env.cut_turns must be 'end' or 'answer', got {self.cut_turns!r}")
        if self.on_error not in ("end", "raise"):
            raise ValueError(f"algo.env.on_error must be 'end' or 'raise', got {self.on_error!r}")
        if self.max_turns < 1 or self.max_total_tokens < 1:
            raise ValueError("algo.env.max_turns and algo.env.max_total_tokens must be >= 1")
