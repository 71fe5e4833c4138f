"""GRPO on a tiny Llama: learns a trivially learnable reward; truncation masking; sampler/trainer log-probs."""

import json
from collections import Counter

import pytest
import torch

from posttrain.metrics import read_metrics
from posttrain.train.grpo import GRPO, run_grpo
from posttrain.train.loop import Trainer
from tiny import prompt_rows, run_config, write_jsonl

FAST = ["algo.rewards=[tiny:vowel_reward]", "algo.max_new_tokens=6", "algo.prompts_per_step=4", "algo.num_generations=8",
        "train.batch_size=32", "algo.eval_max_new_tokens=6", "data.num_eval_examples=8"]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(48))


def test_grpo_learns_a_trivial_reward(tmp_path, tiny_dir, prompts):
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=30", "train.lr=1e-2",
                     "train.schedule=constant", "algo.beta=0.02")
    run_grpo(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[0]["reward"] < 0.5
    assert max(r["reward"] for r in rows) > 0.9
    assert rows[-1]["models_in_memory"] == 2.0  # policy + frozen reference (no LoRA)
    for key in ("kl/k1", "kl/k2", "kl/k3", "entropy", "clip_ratio/low", "clip_ratio/high", "zero_variance_groups",
                "completions/mean_length", "completions/truncated_fraction", "rewards/vowel_reward/mean",
                "completions/distinct_2"):
        assert key in rows[-1], key
    # the policy learns to emit vowels only: its rollouts' distinct bigrams collapse and the monitor says so, once
    alerts = [json.loads(line) for line in (tmp_path / "run" / "warnings.jsonl").read_text().splitlines()]
    collapse = [a for a in alerts if a["kind"] == "mode_collapse"]
    assert len(collapse) == 1 and rows[collapse[0]["step"] - 1]["alerts/mode_collapse"] == 1.0
    assert rows[collapse[0]["step"] - 1]["completions/distinct_2"] < 0.25 * rows[0]["completions/distinct_2"]
    assert all(r["completions/distinct_2"] >= 0.25 * rows[0]["completions/distinct_2"] for r in rows[:collapse[0]["step"] - 1])


def test_sampler_logprobs_match_trainer_recompute(tmp_path, tiny_dir, prompts):
    """PITFALLS #11: sampled at T = 0.6, the trainer's log-probs of the same tokens match (ratio 1 before updates)."""
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "algo.temperature=0.6")
    algo = GRPO(cfg)
    batch = algo.sample(1)
    recomputed = algo.policy_logps(batch)
    mask = batch.completion_mask.bool()
    # sampling runs under bf16 autocast by default; here the model config says fp32 (autocast=none)
    assert torch.allclose(recomputed[mask], batch.extra["sampler_logp"][mask], atol=1e-4)


def test_all_truncated_batch_with_masking_changes_nothing(tmp_path, tiny_dir, prompts):
    """PITFALLS #8: every completion truncated + mask_truncated -> loss 0 and unchanged weights."""
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "algo.mask_truncated=true", "train.max_steps=2",
                     "train.lr=1e-2", "train.eval_every=0")
    algo = GRPO(cfg)
    real_generate = algo.generator.generate

    def all_truncated(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        out.truncated = torch.ones_like(out.truncated)
        return out

    algo.generator.generate = all_truncated
    algo.evaluate = lambda: {}
    before = [p.detach().clone() for p in algo.model.parameters()]
    Trainer(algo, cfg.train).fit()
    assert all(torch.equal(a, b) for a, b in zip(before, algo.model.parameters()))
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(r["loss"] == 0.0 for r in rows) and rows[0]["completions/truncated_fraction"] == 1.0


def test_each_prompt_once_per_epoch_in_g_rows_and_duplicates_stay_separate(tmp_path, tiny_dir):
    """PITFALLS #17: an epoch shows every prompt exactly once (G rows); equal prompt texts are separate groups."""
    rows = prompt_rows(8) + prompt_rows(8)[:4]  # four duplicated prompt texts
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, data, *FAST, "data.eval_fraction=0.0")
    algo = GRPO(cfg)
    seen = Counter()
    for step in range(1, 4):  # 12 prompts / 4 per step = one epoch
        batch = algo.sample(step)
        assert batch.group.tolist() == [g for g in range(4) for _ in range(8)]
        for g in range(4):
            texts = {batch.prompts[i] for i in range(batch.num_rows) if batch.group[i] == g}
            assert len(texts) == 1
            seen[texts.pop()] += 1
    assert sum(seen.values()) == 12
    assert all(seen[f"say {i}"] == (2 if i < 4 else 1) for i in range(8))
