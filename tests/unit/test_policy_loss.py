import math

import pytest
import torch

from posttrain.algos.advantages import group_advantages
from posttrain.algos.kl import kl_estimate
from posttrain.algos.policy_loss import clipped_surrogate, clipped_value_loss, kl_penalty_loss
from posttrain.ops import AGG_MODES


def _policy_at_ratios(ratios):
    """logp leaf (1, n) and a detached old_logp such that exp(logp - old_logp) == ratios."""
    logp = torch.full((1, len(ratios)), -1.0, dtype=torch.float64, requires_grad=True)
    old_logp = logp.detach() - torch.tensor([ratios], dtype=torch.float64).log()
    return logp, old_logp


def test_gradient_is_zero_exactly_where_the_clip_binds():
    # clip-higher: clip_low 0.2, clip_high 0.28 -> trust region [0.8, 1.28]
    ratios = [1.5, 1.25, 0.5, 1.0, 0.5, 0.85, 1.5, 2.0]
    advs = [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 3.0]
    zero = [True, False, False, False, True, False, False, False]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])  # the last token is padding: no gradient, not counted
    logp, old_logp = _policy_at_ratios(ratios)
    out = clipped_surrogate(logp, old_logp, torch.tensor([advs], dtype=torch.float64), mask, 0.2, 0.28)
    out.loss.backward()
    grad = logp.grad[0]
    for i in range(7):
        expected = 0.0 if zero[i] else -advs[i] * ratios[i] / 7  # d(-A rho)/d logp = -A rho, token-mean over 7
        assert grad[i].item() == pytest.approx(expected, abs=1e-12), i
    assert grad[7] == 0
    assert out.metrics["clip_ratio/high"].item() == pytest.approx(1 / 7)
    assert out.metrics["clip_ratio/low"].item() == pytest.approx(1 / 7)
    assert out.metrics["clip_ratio"].item() == pytest.approx(2 / 7)
    approx_kl = sum(r - 1 - math.log(r) for r in ratios[:7]) / 7
    assert out.metrics["approx_kl"].item() == pytest.approx(approx_kl)


def test_dual_clip_caps_negative_advantage_tokens():
    logp, old_logp = _policy_at_ratios([4.0, 2.0, 4.0])
    adv = torch.tensor([[-1.0, -1.0, 1.0]], dtype=torch.float64)
    out = clipped_surrogate(logp, old_logp, adv, torch.ones(1, 3), dual_clip=3.0)
    out.loss.backward()
    assert logp.grad[0, 0] == 0  # A < 0, rho > c: loss capped at -A c = 3
    assert logp.grad[0, 1].item() == pytest.approx(2.0 / 3)  # A < 0, 1.2 < rho < c: unclipped
    assert logp.grad[0, 2] == 0  # A > 0, rho > 1.2: the ordinary clip
    assert out.loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    assert out.metrics["clip_ratio/dual"].item() == pytest.approx(1 / 3)


def _grpo_batch(lengths, rewards, group):
    T = max(lengths)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).float()
    logp = (-torch.rand(len(lengths), T, generator=torch.Generator().manual_seed(0))).requires_grad_()
    adv = group_advantages(torch.tensor(rewards), torch.tensor(group), "grpo")
    return logp, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
def test_grpo_loss_value_at_ratio_one_and_beta_zero(mode):
    """length bias of per-sequence normalization: Dr. GRPO, TRL #2995. With one iteration (old_logp = logp detached, rho = 1 exactly) and beta = 0 the per-token loss is
    -A_i. Zero-mean advantages per group then give a loss of exactly 0 under every mode when all completions have
    the same length; with unequal lengths only seq-mean-token-mean (mean over sequences of -A_i) stays 0, the
    others weight -A_i by the length L_i and are not 0. The gradient is not 0 in any case.
    "Exactly" is mathematical: a float sum of +-A in the kernel's order leaves ~1e-8 in fp32, hence the 1e-6.
    """
    rewards, group = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0], [5, 5, 5, 5, 2, 2]
    logp, adv, mask = _grpo_batch([4] * 6, rewards, group)
    out = clipped_surrogate(logp, logp.detach(), adv, mask, agg_mode=mode)
    assert abs(out.loss.item()) < 1e-6
    out.loss.backward()
    assert logp.grad.abs().sum() > 0

    logp, adv, mask = _grpo_batch([3, 9, 5, 2, 7, 1], rewards, group)
    loss = clipped_surrogate(logp, logp.detach(), adv, mask, agg_mode=mode).loss.item()
    if mode == "seq-mean-token-mean":
        assert abs(loss) < 1e-6
    else:
        assert abs(loss) > 1e-3


def test_zero_variance_group_gives_finite_loss_and_zero_gradient():
    rewards, group = [0.35] * 4 + [1.0] * 4, [0] * 4 + [1] * 4
    logp, adv, mask = _grpo_batch([3, 6, 2, 5, 6, 6, 1, 4], rewards, group)
    old_logp = logp.detach() + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    out = clipped_surrogate(logp, old_logp, adv, mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    assert (logp.grad == 0).all()


# length bias of per-sequence normalization: Dr. GRPO, TRL #2995: per-token gradient weight |d loss / d logp_t| for a 10-token and a 1000-token sequence, both A = 1,
# rho = 1. B = 2 sequences, 1010 tokens, padded length T = 1000.
EXPECTED_WEIGHTS = {
    "token-mean": (1 / 1010, 1 / 1010),  # every token equal: long sequences get 100x the total weight
    "seq-mean-token-mean": (1 / (2 * 10), 1 / (2 * 1000)),  # every sequence equal: short tokens weigh 100x more
    "seq-mean-token-sum": (1 / 2, 1 / 2),  # every token equal, scale grows with length
    "seq-mean-token-sum-norm": (1 / (2 * 1000), 1 / (2 * 1000)),  # Dr. GRPO: constant normalizer B * T
}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_per_token_weights_of_short_and_long_sequence(mode):
    mask = (torch.arange(1000) < torch.tensor([10, 1000])[:, None]).float()
    logp = torch.zeros(2, 1000, dtype=torch.float64, requires_grad=True)
    clipped_surrogate(logp, logp.detach(), torch.ones(2, dtype=torch.float64), mask, agg_mode=mode).loss.backward()
    short_w, long_w = EXPECTED_WEIGHTS[mode]
    torch.testing.assert_close(logp.grad[0, :10], torch.full((10,), -short_w, dtype=torch.float64))
    torch.testing.assert_close(logp.grad[1], torch.full((1000,), -long_w, dtype=torch.float64))
    assert (logp.grad[0, 10:] == 0).all()


def test_clipped_value_loss_hand_values():
    values = torch.tensor([[0.5, 0.1, 0.5, 7.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.zeros(1, 4, dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = clipped_value_loss(values, old_values, returns, mask, clip=0.2)
    # token 0: clipped V = 0.2, (0.2-1)^2 = 0.64 > 0.25 -> clipped wins, no gradient
    # token 1: inside the clip, 0.81 both; token 2: clipped 0.04 < 0.25 unclipped
    assert out.loss.item() == pytest.approx((0.5 * 0.64 + 0.5 * 0.81 + 0.5 * 0.25) / 3)
    out.loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.9 / 3, 0.5 / 3, 0.0]], dtype=torch.float64))
    assert out.metrics["vf_clipfrac"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_loss_matches_estimate_and_vanishes_at_reference(kind):
    gen = torch.Generator().manual_seed(4)
    logp = (-torch.rand(3, 5, generator=gen)).requires_grad_()
    ref_logp = -torch.rand(3, 5, generator=gen)
    mask = (torch.arange(5) < torch.tensor([5, 2, 4])[:, None]).float()
    out = kl_penalty_loss(logp, ref_logp, mask, kind, agg_mode="seq-mean-token-mean")
    per_seq = (kl_estimate(logp, ref_logp, kind) * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(out.loss, per_seq.mean())
    torch.testing.assert_close(out.metrics["kl"], (kl_estimate(logp, ref_logp, kind) * mask).sum() / mask.sum())
    if kind != "k1":  # k1's per-token gradient is 1 even at the reference (zero only in expectation)
        at_ref = kl_penalty_loss(logp, logp.detach(), mask, kind)
        at_ref.loss.backward()
        assert at_ref.loss.item() == 0.0 and (logp.grad == 0).all()


def _train_bandit(beta, steps=120):
    """A 6-armed bandit trained by GRPO (clipped surrogate + beta * k3 penalty): returns the final exact KL."""
    gen = torch.Generator().manual_seed(0)
    ref_logits = torch.zeros(6)
    reward = torch.tensor([1.0, 0.0, 0.2, 0.0, 0.5, 0.0])
    logits = ref_logits.clone().requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.05)
    group = torch.arange(8).repeat_interleave(8)
    for _ in range(steps):
        logp_all = torch.log_softmax(logits, -1)
        tokens = torch.multinomial(logp_all.detach().exp(), 64, replacement=True, generator=gen)
        logp = logp_all[tokens][:, None]  # (B, T=1)
        adv = group_advantages(reward[tokens], group, "grpo")
        ref_logp = torch.log_softmax(ref_logits, -1)[tokens][:, None]
        mask = torch.ones_like(logp)
        loss = clipped_surrogate(logp, logp.detach(), adv, mask).loss + beta * kl_penalty_loss(logp, ref_logp, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.softmax(logits.detach(), -1)
    return (p * (p.log() - torch.log_softmax(ref_logits, -1))).sum().item()


def test_larger_beta_ends_at_lower_kl():
    kl_free, kl_mid, kl_strong = _train_bandit(0.0), _train_bandit(0.3), _train_bandit(3.0)
    assert kl_free > kl_mid > kl_strong > 0


def test_policy_losses_are_selected_by_name():
    from posttrain.algos.policy_loss import POLICY_LOSSES, actor_loss

    assert {"clip", "dual_clip"} <= set(POLICY_LOSSES)
    logp = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    old = torch.log(torch.tensor([[0.1, 0.9, 0.9]]))  # ratios 5, 1, 0.22
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 3)
    direct = clipped_surrogate(logp, old, adv, mask, dual_clip=3.0)
    named = actor_loss("dual_clip", logp, old, adv, mask, dual_clip=3.0)
    assert named.loss.item() == direct.loss.item() and named.metrics["clip_ratio/dual"] == direct.metrics["clip_ratio/dual"]
    assert actor_loss("clip", logp, old, adv, mask).loss.item() == clipped_surrogate(logp, old, adv, mask).loss.item()
    with pytest.raises(KeyError, match="unknown policy loss 'nope'; choose one of"):
        actor_loss("nope", logp, old, adv, mask)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        actor_loss("dual_clip", logp, old, adv, mask, dual_clip=0.5)


def test_actor_loss_adds_the_kl_term_and_the_entropy_bonus():
    from posttrain.algos.policy_loss import actor_loss, kl_penalty_loss
    from posttrain.ops import agg_loss

    torch.manual_seed(0)
    logp, old, ref = -torch.rand(2, 4), -torch.rand(2, 4), -torch.rand(2, 4)
    entropy, adv = torch.rand(2, 4), torch.tensor([0.5, -1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    out = actor_loss("clip", logp, old, adv, mask, entropy, ref_logp=ref, kl_coef=0.1, kl_estimator="k2",
                     entropy_coef=0.01, agg_mode="seq-mean-token-mean")
    pg = clipped_surrogate(logp, old, adv, mask, agg_mode="seq-mean-token-mean").loss
    kl = kl_penalty_loss(logp, ref, mask, "k2", "seq-mean-token-mean").loss
    ent = agg_loss(entropy, mask, "seq-mean-token-mean")
    torch.testing.assert_close(out.loss, pg + 0.1 * kl - 0.01 * ent)
    assert {"policy_loss", "kl_loss", "entropy", "clip_ratio", "approx_kl"} <= set(out.metrics)


def test_a_new_policy_loss_is_one_decorated_function(tmp_path, tiny_dir):
    """Adding a policy loss touches one place: this registration; GRPO then trains with it by name."""
    from posttrain.algos.policy_loss import POLICY_LOSSES
    from posttrain.ops import agg_loss
    from posttrain.train.registry import run
    from posttrain.types import LossOutput
    from tiny import prompt_rows, run_config, write_jsonl

    calls = []

    @POLICY_LOSSES.register("test_vanilla_pg")
    def vanilla_pg(logp, old_logp, advantages, mask, *, agg_mode="token-mean", num_tokens=None, num_seqs=None,
                   max_len=None, **_):
        calls.append(logp.shape)
        per_token = -advantages.unsqueeze(-1) * logp  # REINFORCE with the group baseline
        return LossOutput(agg_loss(per_token, mask, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs),
                          {"approx_kl": torch.zeros(())})

    try:
        data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(16))
        run(run_config("grpo", tmp_path / "run", tiny_dir, data, "algo.policy_loss=test_vanilla_pg",
                            "algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=4", "algo.sampling.prompts_per_step=2",
                            "algo.sampling.num_generations=4", "train.max_steps=2", "data.num_eval_examples=2",
                            "algo.sampling.eval_max_new_tokens=2"))
        assert calls  # GRPO's updates went through the registered loss
    finally:
        del POLICY_LOSSES["test_vanilla_pg"]
