"""GRPO on a tiny Llama: learns a trivially learnable reward; truncation masking; sampler/trainer log-probs."""

import json
from collections import Counter

import pytest
import torch

from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from posttrain.train.grpo import GRPO
from posttrain.train.loop import Trainer
from tiny import prompt_rows, run_config, write_jsonl

FAST = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6", "algo.sampling.prompts_per_step=4", "algo.sampling.num_generations=8",
        "train.batch_size=32", "algo.sampling.eval_max_new_tokens=6", "data.num_eval_examples=8"]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(48))


def test_grpo_learns_a_trivial_reward(tmp_path, tiny_dir, prompts):
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=30", "train.lr=1e-2",
                     "train.schedule=constant", "algo.kl.beta=0.02")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[0]["reward"] < 0.5
    assert max(r["reward"] for r in rows) > 0.9
    assert rows[-1]["models_in_memory"] == 2.0  # policy + frozen reference (no LoRA)
    for key in ("kl/token_k1_mean", "kl/token_k2_mean", "kl/token_k3_mean", "kl/seq_k1_sum", "entropy", "clip_ratio/low", "clip_ratio/high", "zero_variance_groups",
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
    """sampling temperature vs recomputed log-probs: TRL PR #3029: sampled at T = 0.6, the trainer's log-probs of the same tokens match (ratio 1 before updates)."""
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "algo.sampling.temperature=0.6")
    algo = GRPO(cfg)
    batch = algo.sample(1)
    recomputed = algo.policy_logps(batch)
    mask = batch.completion_mask.bool()
    # sampling runs under bf16 autocast by default; here the model config says fp32 (autocast=none)
    assert torch.allclose(recomputed[mask], batch.extra["sampler_logp"][mask], atol=1e-4)


def test_all_truncated_batch_with_masking_changes_nothing(tmp_path, tiny_dir, prompts):
    """truncated and empty completions: TRL PR #3248: every completion truncated + mask_truncated -> loss 0 and unchanged weights."""
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "algo.mask_truncated=true", "train.max_steps=2",
                     "train.lr=1e-2", "train.eval_every=0")
    algo = GRPO(cfg)
    real_generate = algo.collector.engine.generate

    def all_truncated(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        out.truncated = torch.ones_like(out.truncated)
        return out

    algo.collector.engine.generate = all_truncated
    algo.evaluate = lambda: {}
    before = [p.detach().clone() for p in algo.model.parameters()]
    Trainer(algo, cfg.train).fit()
    assert all(torch.equal(a, b) for a, b in zip(before, algo.model.parameters()))
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert all(r["loss"] == 0.0 for r in rows) and rows[0]["completions/truncated_fraction"] == 1.0


def test_each_prompt_once_per_epoch_in_g_rows_and_duplicates_stay_separate(tmp_path, tiny_dir):
    """prompts, groups and seeds: TRL #4531: an epoch shows every prompt exactly once (G rows); equal prompt texts are separate groups."""
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


def test_shared_prompt_rows_train_like_padded_rows(tmp_path, tiny_dir, prompts):
    """algo.share_prompt (default on) against padded rows: the same losses, KLs and gradient norms, with
    minibatches that split groups (num_iterations 2, 12-row minibatches, 8-row micro-batches) and a reference."""
    runs = {}
    for share in (True, False):
        cfg = run_config("grpo", tmp_path / f"run-{share}", tiny_dir, prompts, *FAST, f"algo.share_prompt={share}",
                         "train.max_steps=3", "train.lr=1e-2", "algo.kl.beta=0.05", "algo.num_iterations=2",
                         "algo.minibatch_rows=12", "train.batch_size=8", "train.eval_every=0")
        run(cfg)
        runs[share] = [r for r in read_metrics(tmp_path / f"run-{share}") if "loss" in r]
    for shared, padded in zip(runs[True], runs[False]):
        for key in ("loss", "grad_norm", "kl/token_k3_mean", "entropy", "reward", "approx_kl"):
            assert shared[key] == pytest.approx(padded[key], rel=1e-3, abs=1e-5), key
        assert shared["forward_token_fraction"] < 0.8 and padded["forward_token_fraction"] == 1.0


def test_shared_prompt_logps_after_refill(tmp_path, tiny_dir, prompts):
    """Rollouts concatenated by dynamic sampling (prompts re-left-padded to a wider width) pack correctly."""
    from posttrain.data.collate import concat_batches
    from posttrain.models.shared_prefix import completion_logps

    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST)
    algo = GRPO(cfg)
    batch = concat_batches([algo.sample(1), algo.sample(1, round_=1)])
    rows = torch.randperm(batch.num_rows, generator=torch.Generator().manual_seed(0))[:20]
    with torch.no_grad():
        shared = completion_logps(algo.model, batch, rows, 1024, share_prompt=True)
        padded = completion_logps(algo.model, batch, rows, 1024, share_prompt=False)
    torch.testing.assert_close(shared, padded, atol=2e-5, rtol=1e-5)
    assert batch.forward_tokens(True) < batch.forward_tokens(False)


def test_skipping_inert_rows_leaves_the_update_unchanged(tmp_path, tiny_dir, prompts):
    """Rows with advantage 0 (zero-variance groups) get no forward pass: the same losses and gradient norms as
    running them, with fewer tokens through the model; with a KL term in the loss nothing is skipped."""
    runs = {}
    for skip in (True, False):
        cfg = run_config("grpo", tmp_path / f"run-{skip}", tiny_dir, prompts, *FAST, f"algo.skip_inert_rows={skip}",
                         "algo.reward.functions=[tiny:vowel_reward_on_odd_prompts]", "train.max_steps=3", "train.lr=1e-2",
                         "algo.num_iterations=2", "algo.minibatch_rows=16", "train.batch_size=8", "train.eval_every=0",
                         "algo.loss_agg=seq-mean-token-mean")
        run(cfg)
        runs[skip] = [r for r in read_metrics(tmp_path / f"run-{skip}") if "loss" in r]
    for skipped, full in zip(runs[True], runs[False]):
        assert skipped["zero_variance_groups"] == full["zero_variance_groups"]
        for key in ("loss", "grad_norm", "reward"):  # entropy, approx_kl, clip ratios: over the rows run
            assert skipped[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
        kept = 1 - skipped["zero_variance_groups"]
        assert skipped["forward_token_fraction"] == pytest.approx(kept * full["forward_token_fraction"], rel=0.25)
    assert sum(r["zero_variance_groups"] > 0 for r in runs[True]) >= 2
    algo = GRPO(run_config("grpo", tmp_path / "kl", tiny_dir, prompts, *FAST, "algo.kl.beta=0.1",
                           "algo.reward.functions=[tiny:vowel_reward_on_odd_prompts]"))
    iteration = algo.next_iteration(1)
    assert all(len(update.skipped) == 0 for update in iteration.updates)


def test_separate_engine_gets_the_policy_weights_once_per_step(tmp_path, tiny_dir, prompts):
    """algo.sampling.engine names a registered engine; one holding its own weights (like vLLM) is synced before each step's
    sampling with the weights the previous update produced, once per step, and counted in models_in_memory."""
    from posttrain.rollout.base import GENERATORS, register_generator
    from posttrain.rollout.hf import HFGenerator

    synced: list[torch.Tensor] = []

    class CopyingEngine(HFGenerator):  # samples from its own copy of the weights, refreshed by sync_weights
        weight_copies = 1

        @classmethod
        def for_training(cls, model, tokenizer, sampling, context):
            import copy

            engine = cls(copy.deepcopy(model), tokenizer.pad_token_id, tokenizer)
            engine.syncs = 0
            return engine

        def sync_weights(self, model):
            self.model.load_state_dict(model.state_dict())
            synced.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
            self.syncs += 1

    register_generator("test-copying")(CopyingEngine)
    try:
        cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=3", "train.lr=1e-2",
                         "algo.sampling.engine=test-copying", "algo.kl.beta=0.0", "train.eval_every=0")
        run(cfg)
    finally:
        GENERATORS.pop("test-copying")
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert [r["engine/weight_syncs"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["models_in_memory"] == 2.0 for r in rows)  # policy + the engine's copy (beta 0: no reference)
    assert len(synced) == 3 and not torch.equal(synced[0], synced[1]) and not torch.equal(synced[1], synced[2])


@pytest.mark.parametrize("loss, extra", [("gspo", ["algo.clip_low=3e-4", "algo.clip_high=4e-4"]), ("gspo_token", []),
                                         ("cispo", []), ("sapo", []), ("gmpo", ["algo.clip_low=0.4", "algo.clip_high=0.4"])])
def test_each_2025_policy_loss_learns_a_trivial_reward(tmp_path, tiny_dir, prompts, loss, extra):
    """Two passes per rollout (mu = 2), so the second pass sees ratios away from 1 and each loss's clip or gate."""
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=30", "train.lr=1e-2",
                     "train.schedule=constant", "algo.kl.beta=0", "algo.num_iterations=2", f"algo.policy_loss={loss}",
                     "algo.sampling.eval_max_new_tokens=1", "data.num_eval_examples=2", *extra)
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[0]["reward"] < 0.5
    assert max(r["reward"] for r in rows) > 0.9, [round(r["reward"], 2) for r in rows]


def test_rollout_correction_runs_and_reports_the_sampler_gap(tmp_path, tiny_dir, prompts):
    """fp32 HF engine = the trainer's own numbers: the sampler/trainer gap is ~0, nothing truncated or masked."""
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=2", "algo.kl.beta=0",
                     "algo.correction.mode=token_mask", "algo.correction.cap=2.0", "algo.correction.cap_low=0.5",
                     "algo.correction.off_policy_delta=0.5", "algo.sampling.eval_max_new_tokens=1", "data.num_eval_examples=2")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[-1]["mismatch/abs_logp_diff_mean"] < 1e-4
    assert rows[-1]["mismatch/masked_fraction"] == 0 and rows[-1]["mismatch/off_policy_masked"] == 0


@pytest.mark.parametrize("estimator", ["grpo_batch_std", "reinforce_pp", "reinforce_pp_baseline", "gpg", "opo"])
def test_each_batch_normalized_estimator_learns_a_trivial_reward(tmp_path, tiny_dir, prompts, estimator):
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=30", "train.lr=1e-2",
                     "train.schedule=constant", "algo.kl.beta=0", f"algo.advantage={estimator}",
                     "algo.sampling.eval_max_new_tokens=1", "data.num_eval_examples=2")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[0]["reward"] < 0.5
    assert max(r["reward"] for r in rows) > 0.9, [round(r["reward"], 2) for r in rows]


def test_grpo_with_gradient_on_high_entropy_tokens_only_learns(tmp_path, tiny_dir, prompts):
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=30", "train.lr=1e-2",
                     "train.schedule=constant", "algo.kl.beta=0", "algo.entropy_top_q=0.5",
                     "algo.sampling.eval_max_new_tokens=1", "data.num_eval_examples=2")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert all(0.45 <= r["entropy/pg_token_fraction"] <= 0.75 for r in rows if "entropy/pg_token_fraction" in r)
    assert max(r["reward"] for r in rows) > 0.9, [round(r["reward"], 2) for r in rows]


def test_grpo_with_per_function_reward_normalization_learns(tmp_path, tiny_dir, prompts):
    """GDPO's combination: a constant second reward contributes 0 after its within-group normalization."""
    fast = [x for x in FAST if not x.startswith("algo.reward.functions")]
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, prompts, *fast, "train.max_steps=30", "train.lr=1e-2",
                     "train.schedule=constant", "algo.kl.beta=0", "algo.reward.combine=per_function",
                     "algo.reward.functions=[tiny:vowel_reward,tiny:constant_reward]", "algo.reward.weights=[1.0,5.0]",
                     "algo.sampling.eval_max_new_tokens=1", "data.num_eval_examples=2")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert max(r["rewards/vowel_reward/mean"] for r in rows) > 0.9
