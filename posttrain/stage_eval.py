"""Held-out measurements of one pipeline stage's model: accuracy and mean reward of greedy answers, KL to the
stage's starting model, and the answers to a few fixed prompts (for the before/after table)."""

from __future__ import annotations

import contextlib
import math

import torch

from posttrain.evaluate import GenEvalConfig, evaluate_policy, load_reward_fns


def load_lm(path: str):
    from transformers.utils import logging as hf_logging

    from posttrain.models.loading import load_tokenizer

    hf_logging.disable_progress_bar()  # the pipeline's terminal shows its own lines and the summary table

    from posttrain.devices import current
    from posttrain.models.loading import load_inference_lm

    return load_inference_lm(path, current()), load_tokenizer(path)


@torch.no_grad()
def sequence_kl(policy, reference, tokenizer, records, max_new_tokens: int = 48, seed: int = 0, batch_size: int = 32) -> float:
    """Mean over prompts of KL(π‖π_ref) for a whole completion sampled from π at T = 1, estimated as the sum over
    its tokens of k3 = (ρ − 1) − log ρ with ρ = π_ref(y_t|·) / π(y_t|·) (Schulman 2020). Each term is an unbiased,
    never negative estimate of that position's KL(π(·|y_<t) ‖ π_ref(·|y_<t)), and by the chain rule their sum's
    expectation is the sequence KL. The plain k1 sum is unbiased too but, on a few dozen prompts, often negative."""
    from posttrain.data.chat import encode_prompt, end_of_turn_ids
    from posttrain.models.forward import token_logps
    from posttrain.rollout.base import SamplingParams
    from posttrain.rollout.hf import HFGenerator

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=sorted(end_of_turn_ids(tokenizer)),
                            batch_size=batch_size)
    from posttrain.models.loading import bf16_autocast, bf16_is_fast

    device_type = next(policy.parameters()).device.type
    fast = bf16_is_fast(device_type)
    engine = HFGenerator(policy, tokenizer.pad_token_id, tokenizer, torch.bfloat16 if fast else None)
    total, count = 0.0, 0
    for s in range(0, len(records), batch_size):
        ids = [encode_prompt(tokenizer, r.data["prompt"]) for r in records[s : s + batch_size]]
        roll = engine.generate(ids, params, 1, seed=seed + s)
        full = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
        attn = torch.cat([roll.prompt_mask, roll.completion_mask], 1)
        labels = full.masked_fill(attn == 0, -100)
        labels[:, : roll.prompt_ids.shape[1]] = -100
        with bf16_autocast(device_type) if fast else contextlib.nullcontext():
            lp = token_logps(policy, full, attn, labels)
            lr = token_logps(reference, full, attn, labels)
        log_ratio = (lr - lp).masked_fill(labels == -100, 0.0)
        total += float((torch.expm1(log_ratio) - log_ratio).sum())
        count += len(ids)
    return total / max(count, 1)


def evaluate_stage(model_path: str, start_path: str | None, records, rewards: list[str], sample_prompts: int = 4,
                   max_new_tokens: int = 48, kl_prompts: int = 32) -> dict:
    """The numbers the report's comparison table shows for one causal-LM stage, and `outcomes`: one row per
    held-out prompt ({index, prompt, completion, reward, correct}) for the paired tests between stages."""
    model, tokenizer = load_lm(model_path)
    fns = load_reward_fns(rewards)
    summary, rows = evaluate_policy(model, tokenizer, records, fns, GenEvalConfig(max_new_tokens=max_new_tokens))
    first = next(iter(fns))
    out = {
        "heldout_accuracy": summary.get(f"{first}/accuracy", math.nan),
        "mean_reward": summary.get(f"{first}/mean_reward", math.nan),
        "answers": [r["completion"] for r in rows[:sample_prompts]],
        "prompts": [r["prompt"] for r in rows[:sample_prompts]],
        "outcomes": per_prompt_outcomes(rows, first, f"{first}/accuracy" in summary),
    }
    if start_path and start_path != model_path:
        reference, _ = load_lm(start_path)
        out["kl_to_ref"] = sequence_kl(model, reference, tokenizer, records[:kl_prompts], max_new_tokens)
    else:
        out["kl_to_ref"] = 0.0
    return out


def per_prompt_outcomes(rows: list[dict], reward: str, is_accuracy: bool) -> list[dict]:
    """A row per greedy answer: its score under `reward` and, when that reward is 0/1 (a verifier), `correct` as 0/1;
    a score the reward masked (NaN) is `correct: None`, left out of accuracies as `score_answers` leaves it out."""
    out = []
    for r in rows:
        score = r.get(reward)
        finite = isinstance(score, (int, float)) and math.isfinite(score)
        correct = int(score) if (is_accuracy and finite) else None
        out.append({"index": r["index"], "prompt": r["prompt"], "completion": r["completion"],
                    "reward": score if finite else None, "correct": correct})
    return out
