"""Token-in, token-out rollouts over several turns: the policy samples a turn, the environment answers, repeat.

A trajectory is kept as token ids from the start: the ids the engine sampled (with their sampler log-probs) and
the ids of the environment's text inserted between turns. Nothing is re-tokenised from strings — decoding a
sampled turn and encoding it again can give other ids (a model that spells `<|im_end|>` out of characters, or
BPE merges across a boundary), and then the trainer's log-probs would not be those of what was sampled.

Layout in the `Rollout` (one row per trajectory, prompt-major, G per prompt):
    prompt_ids      the opening messages (env.reset) with the generation prompt, left-padded;
    completion_ids  turn 1 | env text | turn 2 | ... right-padded; completion_mask: every real token (attended);
    policy_mask     1 on the sampled tokens only: the environment's tokens get attention, but no loss, KL or
                    entropy term; logprobs: the sampler's, 0 on the environment's tokens.
The environment's text is the chat template's rendering of its messages after an assistant turn
(`env_segment_ids`), so the trajectory reads as the conversation the template would write.

The HF engine keeps each trajectory's KV cache between turns (`rollout/turn_session.py`): a turn encodes only
the tokens its cache lacks (the environment's text). vLLM reuses the context through its prefix cache.
Environments answer a turn concurrently, each within `turn_timeout_s`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace

import torch

from posttrain.data.chat import _tokenize, encode_prompt, end_of_turn_ids, render
from posttrain.envs.base import EnvStep, guarded_calls, load_environment
from posttrain.online_config import EnvConfig
from posttrain.rollout.base import SamplingParams
from posttrain.types import Rollout

log = logging.getLogger("posttrain.envs")
_BASE = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]


class EnvironmentError_(RuntimeError):
    """An environment raised or overran its turn under `algo.env.on_error=raise`."""


@functools.lru_cache(maxsize=8)
def _base_rendering(tokenizer) -> tuple[str, int, list[int]]:
    """The reference conversation (one user and one assistant turn) as text, the id of the token that closes its
    assistant turn, and the template's ids after that token (ChatML: "\n"). Once per tokenizer, not per turn."""
    before = render(tokenizer, _BASE)
    base_ids, stops = _tokenize(tokenizer, before), end_of_turn_ids(tokenizer)
    end = [k for k, t in enumerate(base_ids) if t in stops][-1]
    return before, base_ids[end], base_ids[end + 1 :]


def env_segment_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` (tool results, a user reply) as the chat template writes them after an assistant
    turn that ended with its end-of-turn token, up to and including the next assistant generation prompt."""
    before, _, tail = _base_rendering(tokenizer)
    after = render(tokenizer, _BASE + list(messages), add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template does not render conversations incrementally; cannot append turns")
    return tail + _tokenize(tokenizer, after[len(before) :])


def turn_end_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (ChatML: <|im_end|>)."""
    return _base_rendering(tokenizer)[1]


@dataclass
class _Trajectory:
    env: object
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    policy: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    truncated: bool = False
    error: str = ""
    last_text: str = ""
    ended_by: str = ""
    counters: dict = field(default_factory=dict)
    turn_rewards: list = field(default_factory=list)
    reward_at: list = field(default_factory=list)  # (index in ids of the turn's last policy token, reward)

    def extend(self, ids, logps, policy: int) -> None:
        self.ids += list(ids)
        self.logps += list(logps) if policy else [0.0] * len(ids)
        self.policy += [policy] * len(ids)


def _fail(traj: _Trajectory, where: str, error: str, cfg: EnvConfig) -> None:
    message = f"environment {cfg.name!r} {where}: {error}"
    if cfg.on_error == "raise":
        raise EnvironmentError_(message + " (algo.env.on_error=raise)")
    log.warning("%s; the trajectory ends without loss (algo.env.on_error=end)", message)
    traj.error, traj.done, traj.ended_by = error, True, "error"


def _open(tokenizer, records: list[dict], cfg: EnvConfig, num_samples: int) -> list[_Trajectory]:
    cls = load_environment(cfg.name)
    rows = [r for r in records for _ in range(num_samples)]  # prompt-major, G per prompt
    trajs = [_Trajectory(cls(**cfg.options), []) for _ in rows]
    opened = guarded_calls([lambda t=t, r=r: t.env.reset(r) for t, r in zip(trajs, rows)], cfg.turn_timeout_s)
    for t, record, (messages, error) in zip(trajs, rows, opened):
        t.prompt = encode_prompt(tokenizer, messages if not error else record["prompt"])
        if error:
            _fail(t, "reset", error, cfg)
    return trajs


def _turn_generator(engine):
    """(generate(contexts, params, num_samples, seed, rows), session): the engine's multi-turn session where it
    has one (the HF engine keeps each trajectory's KV cache between turns), else its `generate`, rows ignored."""
    make = getattr(engine, "turn_session", None)
    if make is not None:
        session = make()
        return session.generate, session
    return (lambda contexts, params, num_samples, seed, rows: engine.generate(contexts, params, num_samples, seed)), None


def _sample_turn(generate, tokenizer, trajs, live, params, cfg, turn, seed, num_samples) -> None:
    """One assistant turn for the `live` trajectories, appended to them as policy tokens."""
    budgets = [cfg.max_total_tokens - len(trajs[i].ids) for i in live]
    turn_params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, max(budgets))))
    turn_seed = None if seed is None else seed + 1_000_003 * turn
    shared = turn == 0 and len(live) == len(trajs) and all(
        trajs[i].prompt == trajs[i - i % num_samples].prompt for i in live)
    if shared:  # the opening turn: each prompt encoded once for its G samples (the engine's prefix sharing)
        rollout = generate([trajs[i].prompt for i in live[::num_samples]], turn_params, num_samples, turn_seed, live)
    else:
        rollout = generate([trajs[i].prompt + trajs[i].ids for i in live], turn_params, 1, turn_seed, live)
    for row, (i, budget) in enumerate(zip(live, budgets)):
        keep = rollout.completion_mask[row].bool()
        ids, lps = rollout.completion_ids[row][keep].tolist(), rollout.logprobs[row][keep].tolist()
        truncated = bool(rollout.truncated[row]) or len(ids) > budget
        t = trajs[i]
        t.extend(ids[:budget], lps[:budget], 1)
        t.last_text = tokenizer.decode(ids[:budget], skip_special_tokens=True)
        if truncated and cfg.cut_turns == "answer" and len(t.ids) < cfg.max_total_tokens:
            t.extend([turn_end_id(tokenizer)], (), 0)  # closed for the policy, so the template's next turn follows
            t.counters["cut_turns"] = t.counters.get("cut_turns", 0.0) + 1
        elif truncated:
            t.truncated, t.done, t.ended_by = True, True, "length"


def _answer_turn(tokenizer, trajs, live, cfg) -> None:
    """The environments' answers to the turn just sampled; their messages appended as environment tokens."""
    answers = guarded_calls([lambda t=trajs[i]: t.env.step(t.last_text) for i in live], cfg.turn_timeout_s)
    for i, (step, error) in zip(live, answers):
        t = trajs[i]
        t.turns += 1
        if error or not isinstance(step, EnvStep):
            _fail(t, f"step (turn {t.turns})", error or f"step returned {type(step).__name__}, not EnvStep", cfg)
            continue
        if step.reward is not None:
            t.reward += float(step.reward)
            t.turn_rewards.append(float(step.reward))
            sampled = [k for k, p in enumerate(t.policy) if p]
            if sampled:  # PPO credits the turn's reward to its last sampled token (`turn_rewards` in info)
                t.reward_at.append((sampled[-1], float(step.reward)))
        for key, value in step.info.items():
            t.counters[key] = t.counters.get(key, 0.0) + float(value)
        if step.done or t.turns >= cfg.max_turns:
            t.done, t.ended_by = True, "done" if step.done else "max_turns"
            continue
        segment = env_segment_ids(tokenizer, step.messages)
        if len(t.ids) + len(segment) >= cfg.max_total_tokens:  # no room for the environment's text and a reply
            t.done, t.truncated, t.ended_by = True, True, "budget"
            continue
        t.extend(segment, (), 0)


def run_trajectories(engine, tokenizer, records: list[dict], cfg: EnvConfig, params: SamplingParams,
                     num_samples: int = 1, seed: int | None = None) -> Rollout:
    """B records -> a Rollout of B * num_samples trajectories (see the module docstring for its layout), with
    `policy_mask`, `texts` = each trajectory's last assistant turn, and `info`: env_reward (N,) (NaN where the
    environment failed), turn_rewards (N, C): each turn's reward at that turn's last sampled token, transcripts (N,) and the env/* metrics."""
    trajs = _open(tokenizer, records, cfg, num_samples)
    generate, session = _turn_generator(engine)
    for turn in range(cfg.max_turns):
        live = [i for i, t in enumerate(trajs) if not t.done]
        if not live:
            break
        _sample_turn(generate, tokenizer, trajs, live, params, cfg, turn, seed, num_samples)
        _answer_turn(tokenizer, trajs, [i for i in live if not trajs[i].done], cfg)
    rollout = _as_rollout(trajs, tokenizer, engine_device(engine), num_samples)
    if session is not None:  # how much of each turn's context came from the kept cache
        rollout.info["metrics"]["env/kv_reused_fraction"] = session.reused_fraction()
    return rollout


def engine_device(engine) -> torch.device:
    """Where the engine's tensors live: its `device` (vLLM: the policy's), else its model's; the CPU otherwise."""
    if isinstance(getattr(engine, "device", None), torch.device):
        return engine.device
    model = getattr(engine, "model", None)
    return next(model.parameters()).device if model is not None and hasattr(model, "parameters") else torch.device("cpu")


def _as_rollout(trajs: list[_Trajectory], tokenizer, device, num_samples: int) -> Rollout:
    from posttrain.rollout.hf import left_pad

    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([t.prompt for t in trajs], pad, device)
    C = max(1, max(len(t.ids) for t in trajs))

    def right(values, fill, dtype):
        out = torch.full((len(trajs), C), fill, dtype=dtype, device="cpu")  # built on the host, copied once
        for r, v in enumerate(values):
            out[r, : len(v)] = torch.as_tensor(v, dtype=dtype, device="cpu")
        return out.to(device)

    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=right([t.ids for t in trajs], pad, torch.long),
        completion_mask=right([[1] * len(t.ids) for t in trajs], 0, torch.long),
        logprobs=right([t.logps for t in trajs], 0.0, torch.float32),
        truncated=torch.tensor([t.truncated for t in trajs], dtype=torch.bool, device=device),
        group=torch.arange(len(trajs) // num_samples, device=device).repeat_interleave(num_samples),
        texts=[t.last_text for t in trajs],
    )
    rollout.policy_mask = right([t.policy for t in trajs], 0, torch.long)
    placed = torch.zeros((len(trajs), C), dtype=torch.float32, device="cpu")
    for r, t in enumerate(trajs):
        for k, value in t.reward_at:
            placed[r, k] += value
    rollout.info = {"env_reward": [math.nan if t.error else t.reward for t in trajs],
                    "turn_rewards": placed.to(device),
                    "transcripts": [tokenizer.decode(t.ids, skip_special_tokens=False) for t in trajs],
                    "metrics": env_metrics(trajs)}
    return rollout


def env_metrics(trajs: list[_Trajectory]) -> dict:
    """Per-trajectory means of turns and of each counter an environment reports (tool_calls, tool_errors ...),
    the environment's share of the tokens after the prompt, the mean per-turn reward, and how trajectories ended."""
    n = len(trajs)
    tokens = sum(len(t.ids) for t in trajs)
    env_tokens = sum(len(t.policy) - sum(t.policy) for t in trajs)
    out = {"env/turns_mean": sum(t.turns for t in trajs) / n, "env/errors": float(sum(bool(t.error) for t in trajs)),
           "env/env_token_fraction": env_tokens / max(tokens, 1)}
    for key in sorted({k for t in trajs for k in t.counters}):
        out[f"env/{key}_mean"] = sum(t.counters.get(key, 0.0) for t in trajs) / n
    turn_rewards = [r for t in trajs for r in t.turn_rewards]
    if turn_rewards:
        out["env/turn_reward_mean"] = sum(turn_rewards) / len(turn_rewards)
    for reason in ("done", "max_turns", "length", "budget", "error"):
        out[f"env/ended_{reason}"] = sum(t.ended_by == reason for t in trajs) / n
    return out
