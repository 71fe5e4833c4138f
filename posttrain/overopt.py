"""Reward over-optimization made visible (Gao, Schulman & Hilton 2022): proxy and gold reward against KL.

`posttrain overopt` measures one start policy, a proxy reward model and (optionally) a PPO run that optimized that
proxy, on held-out prompts scored by a gold reward (a verifier):

- best-of-n from the start policy, n = 1, 2, 4, ... N: per prompt, N samples at T = 1, split into N/n disjoint
  groups; each group's proxy-argmax is kept. KL(best-of-n ‖ start) = log n − (n − 1)/n (Stiennon et al. 2020,
  appendix; Gao et al. 2022 eq. 1), the analytic value the paper plots against.
- RL (PPO): one point per evaluation of the PPO run: the held-out proxy and gold rewards of its greedy answers
  (`eval/reward_model/mean_reward`, `eval/<gold>/mean_reward`) at the KL its rollouts had at that step (the
  sequence-level k1 estimate against the start policy, `kl`), plus the start policy itself at KL 0.

It writes `overoptimization.json` (the report plots gold and proxy against √KL and marks where gold peaks) and
prints the table. The pipeline config `overopt.yaml` trains the proxy on few, noisy pairs (`algo.label_noise`),
runs PPO against it and then this command.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import RunConfig
from posttrain.train.registry import command


@dataclass
class OverOptConfig:
    reward_model: str | None = None  # the proxy reward model (required)
    gold: str = "numeric"  # the gold reward: a registered reward function
    ppo_run: str | None = None  # a PPO run directory (metrics.jsonl); relative paths are beside train.output_dir
    max_n: int = 16  # best-of-n up to this n (a power of 2)
    max_new_tokens: int = 24
    temperature: float = 1.0


def bon_kl(n: int) -> float:
    """KL(best-of-n ‖ base) in nats, the analytic value for a continuous proxy without ties."""
    return math.log(n) - (n - 1) / n


def best_of_n_curve(gold: torch.Tensor, proxy: torch.Tensor, ns: list[int]) -> list[dict]:
    """gold, proxy (P, N): rewards of N samples per prompt. For each n dividing N: the mean gold and proxy reward of
    the proxy-best sample within each of the N/n disjoint groups of n (P * N/n choices, averaged)."""
    P, N = gold.shape
    points = []
    for n in ns:
        if N % n:
            raise ValueError(f"n={n} does not divide the {N} samples per prompt")
        g, p = gold.reshape(P, N // n, n), proxy.reshape(P, N // n, n)
        pick = p.argmax(-1, keepdim=True)
        points.append({"method": "best-of-n", "step": n, "kl": bon_kl(n),
                       "gold_reward": float(g.gather(-1, pick).mean()), "proxy_reward": float(p.gather(-1, pick).mean())})
    return points


def rl_points(rows: list[dict], gold: str, start: dict | None = None) -> list[dict]:
    """Points of a PPO run's metrics rows: steps that carry held-out proxy and gold means, at that step's rollout
    `kl` (the final evaluation's row has none: it takes the last training row's)."""
    proxy_key, gold_key = "eval/reward_model/mean_reward", f"eval/{gold}/mean_reward"
    points, kl_at = ([start] if start else []), {}
    for r in rows:
        if isinstance(r.get("kl/seq_k1_sum"), (int, float)):  # PPO's sequence KL to its reference
            kl_at[r["step"]] = float(r["kl/seq_k1_sum"])
        if proxy_key in r and gold_key in r and r["step"] in kl_at:
            point = {"method": "ppo", "step": r["step"], "kl": max(kl_at[r["step"]], 0.0),
                     "gold_reward": float(r[gold_key]), "proxy_reward": float(r[proxy_key])}
            points = [p for p in points if p["step"] != r["step"]] + [point]
    return points


def _sample_scores(model, tokenizer, records, fns: dict, cfg: OverOptConfig, samples: int) -> dict[str, torch.Tensor]:
    from posttrain.evaluate import GenEvalConfig, generate_answers, score_answers

    gen = GenEvalConfig(samples=samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, batch_size=8)
    _, rows = score_answers(records, generate_answers(model, tokenizer, records, gen), fns)
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.float32).reshape(len(records), -1) for name in fns}


@command("overopt", config=OverOptConfig,
         help="reward over-optimization: proxy vs gold reward against KL (best-of-n, PPO)")
def run_overopt(cfg: RunConfig) -> dict:
    """`posttrain overopt`: best-of-n and PPO points of proxy and gold reward against KL; overoptimization.json."""

    from posttrain import devices
    from posttrain.data.formats import load_dataset_records
    from posttrain.evaluate import load_reward_fns
    from posttrain.metrics import read_metrics
    from posttrain.models.loading import load_inference_lm, load_reward_model, load_tokenizer, resolve_model_path
    from posttrain.rewards.model_rewards import RewardModelReward

    a: OverOptConfig = cfg.algo
    if not a.reward_model:
        raise ValueError("overopt needs algo.reward_model (the proxy reward model)")
    if a.max_n < 1 or a.max_n & (a.max_n - 1):
        raise ValueError(f"algo.max_n must be a power of 2, got {a.max_n}")
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    path = resolve_model_path(cfg.model.name_or_path)
    device = devices.select(cfg.train.device)
    model, tokenizer = load_inference_lm(path, device), load_tokenizer(path)
    proxy = RewardModelReward(load_reward_model(a.reward_model, "fp32", tokenizer.pad_token_id, trainable=False,
                                                device=device), tokenizer)
    fns = {"gold": load_reward_fns([a.gold])[a.gold.split(":")[-1]], "proxy": proxy}
    records = load_dataset_records(cfg.data.path, "prompts", "test", n=cfg.data.num_eval_examples, seed=cfg.train.seed)
    records = records[: cfg.data.num_eval_examples]
    sampled = _sample_scores(model, tokenizer, records, fns, a, a.max_n)
    points = best_of_n_curve(sampled["gold"], sampled["proxy"], [2 ** i for i in range(int(math.log2(a.max_n)) + 1)])
    if a.ppo_run:
        run = Path(a.ppo_run) if Path(a.ppo_run).is_absolute() else out.parent / a.ppo_run
        greedy = _sample_scores(model, tokenizer, records, fns, a, 1)
        start = {"method": "ppo", "step": 0, "kl": 0.0, "gold_reward": float(greedy["gold"].mean()),
                 "proxy_reward": float(greedy["proxy"].mean())}
        points += rl_points(read_metrics(run), a.gold.split(":")[-1], start)
    (out / "overoptimization.json").write_text(json.dumps({"gold": a.gold, "prompts": len(records), "points": points}, indent=1))
    print(f"{'method':10} {'step':>5} {'KL':>7} {'proxy':>8} {'gold':>7}")
    for p in points:
        print(f"{p['method']:10} {p['step']:>5} {p['kl']:7.3f} {p['proxy_reward']:8.3f} {p['gold_reward']:7.3f}")
    return {"points": points, "path": str(out / "overoptimization.json")}
