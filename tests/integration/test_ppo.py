"""PPO on a tiny Llama: learns a trivial reward with a critic; early stop at the target KL; adaptive beta."""

import pytest

from posttrain.metrics import read_metrics
from posttrain.train.registry import run
from posttrain.train.ppo import PPO, RunningMoments
from tiny import prompt_rows, run_config, write_jsonl

FAST = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6", "algo.sampling.prompts_per_step=32", "train.batch_size=32",
        "algo.sampling.eval_max_new_tokens=6", "data.num_eval_examples=8", "train.schedule=constant"]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(64))


def test_ppo_learns_a_trivial_reward(tmp_path, tiny_dir, prompts):
    run(run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=20", "train.lr=1e-2"))
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[0]["reward"] < 0.5 and max(r["reward"] for r in rows) > 0.9
    last = rows[-1]
    assert last["models_in_memory"] == 3.0  # policy, reference, critic (rule-based reward: no reward model)
    for key in ("returns/mean", "values/mean", "value_loss", "explained_variance", "approx_kl", "clip_ratio", "kl_coef", "kl/seq_k1_sum", "kl/token_k3_mean"):
        assert key in last, key


def test_target_kl_stops_the_epochs_early_and_adaptive_beta_moves(tmp_path, tiny_dir, prompts):
    cfg = run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=3", "train.lr=1e-2",
                     "algo.ppo_epochs=4", "algo.target_kl=1e-9", "algo.kl.control=adaptive", "algo.kl.target=0.001",
                     "algo.kl.horizon=100", "train.eval_every=0")
    algo = PPO(cfg)
    algo.evaluate = lambda: {}
    from posttrain.train.loop import Trainer

    Trainer(algo, cfg.train).fit()
    rows = [r for r in read_metrics(tmp_path / "run") if "updates" in r]
    assert all(r["updates"] == 1.0 for r in rows)  # 4 epochs planned, stopped after the first update
    for prev, nxt in zip(rows, rows[1:]):  # Ziegler et al.: beta *= 1 + clip(KL/target - 1, ±0.2) * n / horizon
        err = max(-0.2, min(0.2, prev["kl/seq_k1_sum"] / 0.001 - 1))
        assert nxt["kl_coef"] == pytest.approx(prev["kl_coef"] * (1 + err * 32 / 100), rel=1e-6)


def test_running_moments_match_numpy():
    import torch

    m = RunningMoments()
    xs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, -4.0])]
    for x in xs:
        m.update(x)
    allx = torch.cat(xs)
    assert m.mean == pytest.approx(float(allx.mean()), rel=1e-3)
    assert m.var == pytest.approx(float(allx.var(unbiased=False)), rel=1e-3)


def test_ppo_against_a_dpo_models_implicit_reward(tmp_path, tiny_dir, prompts):
    """algo.reward.model_kind=implicit: a causal LM scored as β·log πθ/π_ref. Its reference is PPO's own frozen
    reference when they are the same checkpoint (4 copies: policy, reference, DPO model, critic), loaded when not."""
    from tiny import tiny_model_dir

    dpo_model = tiny_model_dir(tmp_path / "dpo-model", seed=1)
    base = [*FAST[1:], "train.max_steps=2", "train.lr=1e-3", "algo.reward.functions=[]", "algo.reward.eval_functions=[tiny:vowel_reward]",
            f"algo.reward.model={dpo_model}", "algo.reward.model_kind=implicit", "algo.reward.model_beta=0.5"]
    run(run_config("ppo", tmp_path / "shared", tiny_dir, prompts, *base))
    rows = read_metrics(tmp_path / "shared")
    stepped = [r for r in rows if "reward" in r]
    assert [r["models_in_memory"] for r in stepped] == [4.0, 4.0]
    assert all(r["reward"] == r["reward"] and r["reward"] != 0.0 for r in stepped)  # finite, and not a zero log-ratio
    assert any("eval/reward_model/mean_reward" in r for r in rows)  # the proxy score of held-out answers
    other_ref = tiny_model_dir(tmp_path / "other-ref", seed=2)
    run(run_config("ppo", tmp_path / "own", tiny_dir, prompts, *base, f"algo.reward.model_ref={other_ref}"))
    assert [r["models_in_memory"] for r in read_metrics(tmp_path / "own") if "reward" in r] == [5.0, 5.0]


def test_shared_critic_learns_a_trivial_reward(tmp_path, tiny_dir, prompts):
    """critic_init=shared: a value head on the policy's own decoder (no critic copy) still learns the reward."""
    cfg = run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=20", "train.lr=1e-2",
                     "algo.critic_init=shared", "train.eval_every=0")
    algo = PPO(cfg)
    assert algo.critic.decoder is algo.model.model  # the same modules, not a copy
    assert set(algo.modules()) == {"policy", "value_head"}
    from posttrain.train.loop import Trainer

    Trainer(algo, cfg.train).fit()
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[0]["reward"] < 0.5 and max(r["reward"] for r in rows) > 0.9
    assert {r["models_in_memory"] for r in rows} == {2.0}  # policy and reference; no critic copy
    assert max(r["explained_variance"] for r in rows) > 0.05  # a zero head explains exactly 0: the head learned


def test_shared_critic_with_lora_holds_one_model(tmp_path, tiny_dir, prompts):
    """With LoRA the reference is the adapter switched off and the critic the adapted decoder plus a head: one
    model in memory. Only the adapter and the head train; the base (= the reference) never moves.
    (In this tiny model LoRA cannot move the logits far: its embeddings and final norm are frozen, so learning
    is checked without LoRA above.)"""
    import torch

    from posttrain.train.loop import Trainer

    cfg = run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=4", "train.lr=1e-2",
                     "model.lora.enabled=true", "algo.critic_init=shared", "train.eval_every=0")
    algo = PPO(cfg)
    assert algo.critic.decoder is algo.model.get_base_model().model
    base_before = {n: p.detach().clone() for n, p in algo.model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in algo.model.named_parameters() if "lora_B" in n}
    Trainer(algo, cfg.train).fit()
    rows = read_metrics(tmp_path / "run")
    assert {r["models_in_memory"] for r in rows if "reward" in r} == {1.0}
    for n, p in algo.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    assert any(not torch.equal(p, lora_before[n]) for n, p in algo.model.named_parameters() if "lora_B" in n)
    assert float(algo.critic.head.weight.abs().sum()) > 0
    trainable = [r for r in rows if "params/trainable" in r][0]["params/trainable"]
    lora = sum(p.numel() for n, p in algo.model.named_parameters() if "lora_" in n)
    assert trainable == lora + algo.critic.head.weight.numel() + 1


def test_shared_critic_refuses_sharding(tmp_path, tiny_dir, prompts):
    cfg = run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST, "algo.critic_init=shared", "train.sharding=full")
    with pytest.raises(ValueError, match="critic_init=shared needs train.sharding=none"):
        PPO(cfg)


def test_implicit_reward_with_a_lora_policy_uses_the_adapter_off_base(tmp_path, tiny_dir, prompts):
    """With LoRA the DPO model's reference (= the base) is the policy with its adapter off: no copy, same scores."""
    import torch

    from posttrain.models.loading import load_causal_lm
    from posttrain.rewards.model_rewards import ImplicitReward
    from tiny import tiny_model_dir

    dpo_model = tiny_model_dir(tmp_path / "dpo-model", seed=1)
    cfg = run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST[1:], "algo.reward.functions=[]", "model.lora.enabled=true",
                     "algo.critic_init=shared", f"algo.reward.model={dpo_model}", "algo.reward.model_kind=implicit",
                     "algo.reward.model_beta=0.5")
    algo = PPO(cfg)
    assert algo.models_in_memory == 2  # the base (policy, reference, critic trunk) and the DPO model
    with torch.no_grad():
        for n, p in algo.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the adapted policy now differs from the base
    texts = ["abc", "hello there", "x"]
    plain = ["say 1", "say 2", "say 3"]
    got = algo.rewards.model_fn(plain, texts)
    copy = ImplicitReward(algo.rewards.loaded[0], load_causal_lm(cfg.model, tiny_dir, trainable=False),
                          algo.tokenizer, 0.5)(plain, texts)
    assert got == pytest.approx(copy, abs=1e-5)
    adapted = ImplicitReward(algo.rewards.loaded[0], algo.model, algo.tokenizer, 0.5)(plain, texts)
    assert max(abs(x - y) for x, y in zip(got, adapted)) > 1e-3  # the adapter really was off for the reference


def test_early_stop_reads_the_whole_update_not_its_last_micro_batch(tmp_path, tiny_dir, prompts):
    """The trust-region check averages approx_kl over the update's tokens: a last micro-batch above target_kl
    with a mean below it does not stop the epochs (and the reverse does)."""
    algo = PPO(run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST, "algo.target_kl=0.1"))
    update = algo.next_iteration(1).updates[0]
    algo.totals(update)  # an update begins
    algo._update_kls += [(0.01, 90), (0.5, 10)]  # last micro-batch 0.5 > 0.1, token mean 0.059 < 0.1
    assert not algo.early_stop()
    algo.totals(update)
    assert algo._update_kls == []  # the next update starts afresh
    algo._update_kls += [(0.5, 90), (0.01, 10)]  # last 0.01 < 0.1, mean 0.451 > 0.1
    assert algo.early_stop()


def test_ppo_rollout_correction_reports_the_sampler_gap(tmp_path, tiny_dir, prompts):
    """fp32 HF engine = the trainer's numbers: the gap is ~0 and nothing is truncated."""
    cfg = run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=2",
                     "algo.correction.mode=sequence_truncate", "algo.correction.cap=2.0")
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    assert rows[-1]["mismatch/abs_logp_diff_mean"] < 1e-4 and rows[-1]["mismatch/truncated_fraction"] == 0


def test_ppo_adaptive_entropy_coefficient_moves_and_is_logged(tmp_path, tiny_dir, prompts):
    cfg = run_config("ppo", tmp_path / "run", tiny_dir, prompts, *FAST, "train.max_steps=3",
                     "algo.entropy_coef=0.01", "algo.entropy_target=100.0")  # far above any entropy: it must rise
    run(cfg)
    coefs = [r["entropy_coef"] for r in read_metrics(tmp_path / "run") if "entropy_coef" in r]
    assert coefs[0] == pytest.approx(0.01) and coefs[-1] > coefs[0]
