"""Numerics (issue 7, point 4): non-finite values are caught, logged with their step and handled by one policy.

The policy, layer by layer:
- a reward that cannot be computed is NaN (rewards/registry.py); the online trainer masks its row: the row gets no
  loss (its loss-mask row is zeroed), its reward is replaced by its group's mean of the valid ones so that it moves
  no advantage, and it is counted in `rewards/masked_samples` (train/online.py);
- a non-finite loss or gradient norm, whatever its cause (inf/NaN logits, an inf reward, a NaN advantage), skips the
  optimizer update: no weight, optimizer or scheduler change, `skipped` is logged with the step, and after
  `train.max_bad_steps` such updates in a row the run stops with NonFiniteLossError naming the step (train/loop.py);
- log-probabilities are computed in fp32 per chunk whatever the logits' dtype (ops.token_logprobs), so bf16/fp16
  logits of magnitude 1e4 give finite log-probs and gradients close to a float64 reference.
"""

import math
import zlib

import pytest
import torch

from posttrain.algos.advantages import group_advantages
from posttrain.metrics import read_metrics
from posttrain.ops import IGNORE_INDEX, hidden_logprobs, token_logprobs
from posttrain.rewards.runner import RewardRunner
from posttrain.train import common
from posttrain.train.grpo import GRPO
from posttrain.train.loop import NonFiniteLossError, Trainer
from posttrain.train.sft import SFT
from tiny import addition_sft_rows, prompt_rows, run_config, tiny_model_dir, write_jsonl

GRPO_ARGS = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6", "algo.sampling.prompts_per_step=4", "algo.sampling.num_generations=6",
             "train.batch_size=24", "train.lr=1e-2", "train.num_threads=1", "data.eval_fraction=0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("numerics")
    return {"model": tiny_model_dir(root / "m"), "sft": write_jsonl(root / "sft.jsonl", addition_sft_rows(32)),
            "prompts": write_jsonl(root / "p.jsonl", prompt_rows(16))}


# ---- the loop's guard ----------------------------------------------------------------------------------------------

def _inject(algo, kind: str, bad_calls: set[int]):
    """Make the loss (or what produces it) non-finite on the given 1-based loss calls."""
    real_loss, calls = algo.loss, {"n": 0}
    hook_layer = algo.model.model.layers[0].mlp

    def loss(micro, totals):
        calls["n"] += 1
        bad = calls["n"] in bad_calls
        if kind == "inf logits" and bad:  # an inf activation: every logit after it is inf or NaN
            handle = hook_layer.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([0]), math.inf))
            try:
                return real_loss(micro, totals)
            finally:
                handle.remove()
        out = real_loss(micro, totals)
        if bad and kind in ("+inf loss", "-inf loss", "nan loss"):
            out.loss = out.loss + {"+inf loss": math.inf, "-inf loss": -math.inf, "nan loss": math.nan}[kind]
        if bad and kind == "inf gradient":  # a finite loss whose gradient overflows
            out.loss.register_hook(lambda g: g * math.inf)
        return out

    algo.loss = loss


@pytest.mark.parametrize("kind", ["+inf loss", "-inf loss", "nan loss", "inf logits", "inf gradient"])
def test_non_finite_steps_are_skipped_logged_and_stop_the_run(tmp_path, files, kind):
    """Step 2 is bad once (skipped, then training goes on); steps 5, 6, 7 are bad in a row: stop at step 7."""
    cfg = run_config("sft", tmp_path / "run", files["model"], files["sft"], "train.max_steps=10", "train.max_bad_steps=3",
                     "train.batch_size=4", "train.num_threads=1", "data.eval_fraction=0")
    common.setup_run(cfg)
    algo = SFT(cfg)
    _inject(algo, kind, {2, 5, 6, 7})
    trainer = Trainer(algo, cfg.train)
    snapshots = {}
    real_one_step = trainer._one_step

    def one_step():
        snapshots[trainer.step] = [p.detach().clone() for p in algo.model.parameters()]
        return real_one_step()

    trainer._one_step = one_step
    with pytest.raises(NonFiniteLossError, match=r"^step 7: 3 non-finite losses or gradients in a row; stopping"):
        trainer.fit()
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert [s for s, r in rows.items() if r["skipped"]] == [2, 5, 6]
    assert "loss" not in rows[2] and rows[3]["loss"] > 0  # a skipped step logs no loss; the next one trains
    assert rows[2]["lr"] == rows[1]["lr"] and rows[3]["lr"] < rows[2]["lr"]  # no scheduler step when skipped
    unchanged = lambda a, b: all(torch.equal(x, y) for x, y in zip(snapshots[a], snapshots[b]))  # noqa: E731
    assert unchanged(1, 2) and not unchanged(2, 3)  # step 2 (snapshot 1 -> 2) changed nothing; step 3 did
    assert unchanged(4, 5) and unchanged(4, 6)
    state = trainer.optimizer.state[next(iter(algo.model.parameters()))]
    assert int(state["step"]) == 3  # optimizer updates of steps 1, 3, 4 only


# ---- rewards and advantages in the online trainer ------------------------------------------------------------------

def crc_reward(prompt: str, completion: str) -> float:
    """Deterministic in (prompt, completion), so the test can recompute it: NaN for about a third of the samples."""
    h = zlib.crc32(f"{prompt}|{completion}".encode())
    return math.nan if h % 3 == 0 else (h % 7) / 7


def _grpo(tmp_path, files, reward, *extra):
    cfg = run_config("grpo", tmp_path / "run", files["model"], files["prompts"], *GRPO_ARGS, *extra)
    common.setup_run(cfg)
    algo = GRPO(cfg)
    fn = lambda prompts, completions, **_: [reward(p, c) for p, c in zip(prompts, completions)]  # noqa: E731
    algo.collector.rewards = RewardRunner([("r", fn, 1.0)], num_workers=2, timeout_s=30)
    return cfg, algo


def _raw_rewards(batch, reward) -> torch.Tensor:
    from posttrain.data.chat import prompt_text

    return torch.tensor([reward(prompt_text(p), c) for p, c in zip(batch.prompts, batch.texts)], dtype=torch.float64)


def test_nan_rewards_are_masked_out_of_the_loss_and_counted(tmp_path, files):
    cfg, algo = _grpo(tmp_path, files, crc_reward)
    iteration = algo.next_iteration(1)
    batch = algo.batch
    raw = _raw_rewards(batch, crc_reward)
    nan = torch.isnan(raw)
    assert 0 < int(nan.sum()) < batch.num_rows
    assert iteration.metrics["rewards/masked_samples"] == float(nan.sum())
    assert iteration.metrics["rewards/r/masked"] == float(nan.sum())
    assert torch.equal(batch.loss_mask[nan], torch.zeros_like(batch.loss_mask[nan]))
    assert torch.equal(batch.loss_mask[~nan], batch.completion_mask[~nan])
    adv = batch.extra["advantages"]
    assert torch.isfinite(adv).all() and torch.isfinite(batch.rewards).all()

    def loss_and_grad():
        algo.model.zero_grad()
        update = iteration.updates[0]
        totals = algo.totals(update)
        loss = sum(algo.loss(rows, totals).loss for rows in update)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in algo.model.parameters() if p.grad is not None])

    loss, grad = loss_and_grad()
    assert math.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the masked rows are out of the loss: whatever their advantage, the loss and gradient do not move
    batch.extra["advantages"] = adv.masked_fill(nan, 1e6)
    loss2, grad2 = loss_and_grad()
    assert loss2 == loss and torch.equal(grad, grad2)


def test_all_rewards_nan_is_a_zero_loss_step_not_a_crash(tmp_path, files):
    cfg, algo = _grpo(tmp_path, files, lambda p, c: math.nan, "train.max_steps=1")
    before = [p.detach().clone() for p in algo.model.parameters()]
    Trainer(algo, cfg.train).fit()
    row = [r for r in read_metrics(tmp_path / "run") if "loss" in r][0]
    assert row["skipped"] == 0.0 and row["loss"] == 0.0 and row["rewards/masked_samples"] == 24.0
    assert all(torch.equal(a, b) for a, b in zip(before, algo.model.parameters()))


@pytest.mark.parametrize("estimator", [
    "dr_grpo",
    "grpo",
    "rloo",
])
def test_masked_rows_leave_the_valid_rows_advantages_unchanged(tmp_path, files, estimator):
    """The valid rows of a group with masked rows get the advantages the valid rows alone would give."""
    cfg, algo = _grpo(tmp_path, files, crc_reward, f"algo.advantage={estimator}")
    algo.next_iteration(1)
    batch = algo.batch
    raw = _raw_rewards(batch, crc_reward)
    valid = ~torch.isnan(raw)
    assert (~valid).any()
    expected = group_advantages(raw[valid].float(), batch.group[valid], estimator)
    assert torch.allclose(batch.extra["advantages"][valid], expected, atol=1e-6)


def test_an_infinite_reward_is_masked_like_nan(tmp_path, files):
    def reward(p, c):
        return math.inf if zlib.crc32(f"{p}|{c}".encode()) % 5 == 0 else 0.5 + (len(c) % 3) / 3

    cfg, algo = _grpo(tmp_path, files, reward, "train.max_steps=1")
    Trainer(algo, cfg.train).fit()
    row = [r for r in read_metrics(tmp_path / "run") if "rewards/masked_samples" in r][0]
    assert row["skipped"] == 0.0 and row["rewards/masked_samples"] > 0


def test_nan_advantages_skip_the_update(tmp_path, files, monkeypatch):
    """The last line of defence: a NaN advantage (whatever produced it) makes the loss NaN; the update is skipped."""
    import posttrain.train.grpo as grpo_module

    real = grpo_module.group_advantages
    nan_at_row_3 = lambda *a, **k: real(*a, **k).index_fill(0, torch.tensor([3]), math.nan)  # noqa: E731
    monkeypatch.setattr(grpo_module, "group_advantages", nan_at_row_3)
    cfg, algo = _grpo(tmp_path, files, lambda p, c: float(len(c) % 4), "train.max_steps=2", "train.max_bad_steps=2")
    before = [p.detach().clone() for p in algo.model.parameters()]
    with pytest.raises(NonFiniteLossError, match="step 2: 2 non-finite"):
        Trainer(algo, cfg.train).fit()
    assert read_metrics(tmp_path / "run")[0]["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, algo.model.parameters()))


# ---- low-precision log-probs ---------------------------------------------------------------------------------------

def _large_logits(dtype, scale: float):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=gen, dtype=torch.float64) * scale
    logits[0, 0, 7] = scale * 6  # a dominant token: log-prob close to 0
    labels = torch.randint(0, 50, (2, 5), generator=gen)
    labels[0, 0] = 7
    labels[1, 4] = IGNORE_INDEX
    return logits.to(dtype), labels


@pytest.mark.parametrize("dtype, scale", [(torch.bfloat16, 1e4), (torch.bfloat16, 1e30), (torch.float16, 1e4)])
def test_large_low_precision_logits_give_finite_logprobs_close_to_fp64(dtype, scale):
    """log-probs from 0 down to about -1e5 (and -1e31) in bf16/fp16: finite, and equal to float64 on the same inputs
    to fp32 rounding of their magnitude; gradients too."""
    logits, labels = _large_logits(dtype, scale / (6 if dtype is torch.float16 else 1))
    leaf = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(leaf, labels, chunk_size=3, with_entropy=True)
    ref_leaf = logits.double().clone().requires_grad_(True)
    ref = torch.log_softmax(ref_leaf, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != IGNORE_INDEX)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert logp[0, 0].item() > -1e-2 and logp.min().item() < -scale / 10  # near 0 and very negative both present
    tol = 4 * torch.finfo(torch.float32).eps * logits.double().abs().max().item()
    assert torch.allclose(logp.double(), ref, atol=tol, rtol=0)
    (grad,) = torch.autograd.grad(logp.sum(), leaf)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_leaf)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad.double(), ref_grad, atol=2 * torch.finfo(dtype).eps, rtol=0)


def test_bf16_head_through_hidden_logprobs_matches_fp64_of_the_same_logits():
    """The chunked, checkpointed path the models use: a bf16 head producing logits of order 1e4."""
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(2, 6, 16, generator=gen) * 30).to(torch.bfloat16).requires_grad_(True)
    head = torch.nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.mul_(100)
    labels = torch.randint(0, 40, (2, 6), generator=gen)
    logp = hidden_logprobs(hidden, head, labels, chunk_size=5)
    logits = head(hidden).double()
    assert logits.abs().max() > 1e3
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert torch.isfinite(logp).all()
    tol = 4 * torch.finfo(torch.float32).eps * logits.abs().max().item()
    assert torch.allclose(logp.double(), ref, atol=tol, rtol=0)
    (grad,) = torch.autograd.grad(logp.sum(), hidden)
    assert torch.isfinite(grad).all()


def test_cli_reports_a_diverged_run_in_one_line(tmp_path, files, monkeypatch, capsys):
    from posttrain.cli import main

    real_loss = SFT.loss

    def nan_loss(self, micro, totals):
        out = real_loss(self, micro, totals)
        out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(SFT, "loss", nan_loss)
    code = main(["sft", "--model", files["model"], "--data", files["sft"], "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "5", "model.autocast=none", "train.progress=false", "train.tensorboard=false",
                 "train.max_bad_steps=2"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "step 2: 2 non-finite losses or gradients in a row" in err
