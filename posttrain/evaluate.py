"""`posttrain eval`: a causal LM answered and scored by reward functions, or a reward model on preference pairs.

Prints a JSON summary (mean reward per function; accuracy where a reward is 0/1; pass@k where k > 1, with
the unbiased estimator of Chen et al. 2021 eq. 1) and writes per-sample results as JSONL.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class GenEvalConfig:
    samples: int = 1  # completions per prompt; 1 = greedy
    temperature: float = 1.0  # used when samples > 1
    max_new_tokens: int = 48
    batch_size: int = 32  # prompts per generation batch
    seed: int = 0
    autocast: bool | None = None  # bf16 autocast for fp32 weights; None: where bf16 is fast (models.loading.bf16_is_fast)
    greedy: bool | None = None  # None: greedy exactly when samples == 1; False samples one answer at `temperature`
    env: object = None  # an EnvConfig (online_config) naming an environment: answers are multi-turn trajectories


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn from n with c correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _columns(records) -> dict[str, list]:
    keys = {k for r in records for k in r.data if k != "prompt"}
    return {k: [r.data.get(k) for r in records] for k in sorted(keys)}


@torch.no_grad()
def generate_answers(model, tokenizer, records, cfg: GenEvalConfig) -> list[list[str]]:
    """K completions per record (greedy when K == 1), decoded without special tokens; with `cfg.env`, the last
    assistant turn of each trajectory."""
    return _answers(model, tokenizer, records, cfg)[0]


def _answers(model, tokenizer, records, cfg: GenEvalConfig):
    """(answers, env rewards in row order, [(prompts, env/* metrics)] per chunk); the last two empty without env."""
    from posttrain.data.chat import encode_prompt, end_of_turn_ids
    from posttrain.rollout.base import SamplingParams
    from posttrain.rollout.hf import HFGenerator

    greedy = cfg.samples == 1 if cfg.greedy is None else cfg.greedy
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
        stop_token_ids=sorted(end_of_turn_ids(tokenizer)), batch_size=cfg.batch_size,
    )
    fp32 = next(model.parameters()).dtype == torch.float32
    from posttrain.models.loading import bf16_is_fast

    use_bf16 = bf16_is_fast(next(model.parameters()).device.type) if cfg.autocast is None else cfg.autocast
    engine = HFGenerator(model, tokenizer.pad_token_id, tokenizer, torch.bfloat16 if (use_bf16 and fp32) else None)
    answers: list[list[str]] = []
    env_rewards, env_metrics = [], []
    for start in range(0, len(records), cfg.batch_size):
        chunk = records[start : start + cfg.batch_size]
        if cfg.env is not None and cfg.env.name:
            from posttrain.envs.trajectory import run_trajectories

            rollout = run_trajectories(engine, tokenizer, [r.data for r in chunk], cfg.env, params, cfg.samples,
                                       cfg.seed + start)
            env_rewards += rollout.info["env_reward"]
            env_metrics.append((len(chunk), rollout.info["metrics"]))
        else:
            ids = [encode_prompt(tokenizer, r.data["prompt"]) for r in chunk]
            rollout = engine.generate(ids, params, num_samples=cfg.samples, seed=cfg.seed + start)
        texts = rollout.texts
        answers += [texts[i * cfg.samples : (i + 1) * cfg.samples] for i in range(len(chunk))]
    return answers, env_rewards, env_metrics


def score_answers(records, answers: list[list[str]], reward_fns: dict) -> tuple[dict, list[dict]]:
    """Summary and per-sample rows for K answers per record under each named reward function (given the prompts as
    the trainers give them: `prompt_text`, and the messages in `raw_prompt`)."""
    from posttrain.data.chat import prompt_text

    k = len(answers[0]) if answers else 1
    prompts = [prompt_text(r.data["prompt"]) for r in records for _ in range(k)]
    flat = [a for group in answers for a in group]
    columns = {key: [v for v in vals for _ in range(k)] for key, vals in _columns(records).items()}
    columns["raw_prompt"] = [r.data["prompt"] for r in records for _ in range(k)]  # messages, for model rewards
    summary: dict = {"num_prompts": len(records), "samples": k}
    per_fn = {}
    for name, fn in reward_fns.items():
        scores = [float(s) for s in fn(prompts, flat, **columns)]
        per_fn[name] = scores
        finite = [s for s in scores if math.isfinite(s)]
        summary[f"{name}/mean_reward"] = sum(finite) / max(len(finite), 1)
        if finite and all(s in (0.0, 1.0) for s in finite):
            correct = [sum(scores[i * k : (i + 1) * k]) for i in range(len(records))]
            summary[f"{name}/accuracy"] = sum(finite) / len(finite)
            if k > 1:
                for kk in sorted({1, k}):
                    summary[f"{name}/pass@{kk}"] = sum(pass_at_k(k, int(c), kk) for c in correct) / len(records)
    rows = [
        {"index": i // k, "sample": i % k, "prompt": prompts[i], "completion": flat[i], **{n: s[i] for n, s in per_fn.items()}}
        for i in range(len(flat))
    ]
    return summary, rows


def evaluate_policy(model, tokenizer, records, reward_fns: dict, cfg: GenEvalConfig | None = None) -> tuple[dict, list[dict]]:
    """Answers (single-turn, or trajectories in `cfg.env`) scored by `reward_fns`; with an environment, its reward
    as `env_reward` where it gives one, and its env/* metrics averaged over the batches."""
    cfg = cfg or GenEvalConfig()
    answers, env_rewards, batches = _answers(model, tokenizer, records, cfg)
    if cfg.env is None or not cfg.env.name:
        return score_answers(records, answers, reward_fns)
    fns = dict(reward_fns)
    if any(r != 0 for r in env_rewards) or not fns:
        fns["env_reward"] = lambda prompts, completions, **_: env_rewards  # one call over the whole batch, in order
    summary, rows = score_answers(records, answers, fns)
    for key in sorted({k for _, m in batches for k in m}):
        summary[key] = sum(n * m.get(key, 0.0) for n, m in batches) / max(sum(n for n, _ in batches), 1)
    return summary, rows


def load_reward_fns(specs: list[str]) -> dict:
    from posttrain.rewards.registry import load_reward

    return {spec.split(":")[-1]: load_reward(spec) for spec in specs}


def _is_reward_model(path: str) -> bool:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        return False
    archs = json.loads(cfg_file.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def run_eval(args) -> int:
    from posttrain.data.formats import load_dataset_records
    from posttrain.models.loading import load_tokenizer, resolve_model_path

    from posttrain import devices

    device = devices.select(args.device)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    if _is_reward_model(path):
        records = load_dataset_records(args.data, "preference", args.split, n=args.limit)
        summary = _eval_reward_model(path, tokenizer, records, device)
        rows = []
    else:
        from posttrain.models.loading import load_inference_lm

        records = load_dataset_records(args.data, "prompts", args.split, n=args.limit)[: args.limit]
        model = load_inference_lm(path, device)
        cfg = GenEvalConfig(samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, env=_env_from_args(args))
        summary, rows = evaluate_policy(model, tokenizer, records, load_reward_fns(args.reward or ["numeric"]), cfg)
    out = Path(args.output or (Path(path) / "eval_results.jsonl" if Path(path).is_dir() else "eval_results.jsonl"))
    with open(out, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    summary["results_file"] = str(out)
    print(json.dumps(summary, indent=1))
    return 0


def _env_from_args(args):
    if not getattr(args, "env", ""):
        return None
    from posttrain.online_config import EnvConfig

    return EnvConfig(name=args.env, options=json.loads(args.env_options), max_turns=args.env_max_turns,
                     max_total_tokens=args.env_max_tokens)


def _eval_reward_model(path, tokenizer, records, device) -> dict:
    from posttrain.models.loading import load_reward_model
    from posttrain.data.preference import encode_pair_ids

    model = load_reward_model(path, pad_token_id=tokenizer.pad_token_id, trainable=False, device=device)
    pairs = [encode_pair_ids(r, tokenizer, True) for r in records]
    return {"num_pairs": len(pairs), **pairwise_accuracy(model, pairs, tokenizer.pad_token_id)}


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model with reward functions, or a reward model on pairs")
    p.add_argument("--model", required=True, help="model folder, hub id, or 'smollm2'")
    p.add_argument("--data", default="task:arithmetic", help="prompts (with answer columns) or preference pairs")
    p.add_argument("--split", default="test", help="split of a built-in task")
    p.add_argument("--reward", action="append", help="reward function name or module:function (repeatable)")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt (pass@k for k > 1)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=48)
    p.add_argument("--limit", type=int, default=200, help="number of prompts or pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")
    p.add_argument("--output", help="per-sample results JSONL (default: MODEL/eval_results.jsonl)")
    p.add_argument("--env", default="", help="answer through a multi-turn environment: 'tools' or module:Class")
    p.add_argument("--env-options", dest="env_options", default="{}", help='its options as JSON, e.g. '
                   '\'{"tools": ["calculator"]}\'')
    p.add_argument("--env-max-turns", dest="env_max_turns", type=int, default=4)
    p.add_argument("--env-max-tokens", dest="env_max_tokens", type=int, default=256,
                   help="tokens after the prompt per trajectory (the policy's and the environment's)")
    p.set_defaults(func=run_eval)


@torch.no_grad()
def pairwise_accuracy(model, pairs, pad_id: int, batch_size: int = 8, model_cfg=None) -> dict:
    """Share of held-out pairs (token-id pairs, `encode_pair_ids`) whose chosen completion scores higher under the
    reward model, and the mean margin."""
    from posttrain.data.preference import pad_pair_ids
    from posttrain.devices import module_device, to_device
    from posttrain.models.forward import pair_scores
    from posttrain.models.loading import autocast_context

    if not pairs:
        return {}
    model.eval()
    device = module_device(model)
    correct, margin = 0, 0.0
    for s in range(0, len(pairs), batch_size):
        batch = to_device(pad_pair_ids(pairs[s : s + batch_size], pad_id), device)
        with autocast_context(model_cfg, device.type) if model_cfg else torch.no_grad():
            chosen, rejected = pair_scores(model, batch)
        correct += int((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
    return {"accuracy": correct / len(pairs), "margin": margin / len(pairs)}
