"""Behaviour the architecture review asked for: the chosen KL estimator is the one penalised, k1 is refused in the
loss, prompts keep their roles as text, and an update crosses to the host once however many micro-batches it has."""

import pytest
import torch

from posttrain.algos.kl import kl_estimate
from posttrain.train.grpo import GRPO, masked_group_advantages
from posttrain.train.ppo import PPO
from tiny import prompt_rows, run_config, write_jsonl

ONLINE = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=5", "algo.sampling.prompts_per_step=4",
          "train.batch_size=8", "algo.sampling.eval_max_new_tokens=4", "data.num_eval_examples=2"]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", prompt_rows(16))


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_grpo_kl_in_the_reward_uses_the_chosen_estimator(tmp_path, tiny_dir, prompts, estimator):
    algo = GRPO(run_config("grpo", tmp_path / "run", tiny_dir, prompts, *ONLINE, "algo.sampling.num_generations=4",
                           "algo.kl.beta=0.5", "algo.kl.placement=reward", f"algo.kl.estimator={estimator}"))
    with torch.no_grad():  # a policy away from its reference, so the KL term is not 0
        for p in algo.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    algo.next_iteration(1)
    b = algo.batch
    seq = (kl_estimate(algo.policy_logps(b), b.extra["ref_logp"], estimator) * b.loss_mask).sum(-1)
    assert float(seq.abs().sum()) > 0
    expected = masked_group_advantages(b.rewards - 0.5 * seq, b.group, b.extra["reward_valid"], "grpo")
    torch.testing.assert_close(b.extra["advantages"], expected)


def test_ppo_penalises_the_chosen_estimator(tmp_path, tiny_dir, prompts):
    """PPO's per-token penalty used k1 whatever kl_estimator said; now the choice is honoured and logged by name."""
    algo = PPO(run_config("ppo", tmp_path / "run", tiny_dir, prompts, *ONLINE, "algo.kl.estimator=k2", "algo.kl.beta=0.3"))
    with torch.no_grad():
        for p in algo.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    metrics = algo.next_iteration(1).metrics
    b = algo.batch
    k2 = (kl_estimate(b.extra["old_logp"], algo.reference_logps(b), "k2") * b.loss_mask).sum(-1).mean()
    assert metrics["kl/seq_k2_sum"] == pytest.approx(float(k2), rel=1e-5) and float(k2) > 0
    assert metrics["kl/seq_k2_sum"] != pytest.approx(metrics["kl/seq_k1_sum"])


def test_k1_in_the_loss_is_refused_before_anything_loads(tmp_path, tiny_dir, prompts, monkeypatch):
    from posttrain.train import common

    monkeypatch.setattr(common, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="adds no KL pressure"):
        GRPO(run_config("grpo", tmp_path / "run", tiny_dir, prompts, *ONLINE, "algo.kl.beta=0.1", "algo.kl.estimator=k1"))


def test_prompts_as_text_keep_their_roles():
    from posttrain.data.chat import prompt_text

    assert prompt_text("2+2?") == "2+2?"
    assert prompt_text([{"role": "user", "content": "2+2?"}]) == "2+2?"  # the common case, unchanged
    assert prompt_text([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]) == \
        "system: Be terse.\nuser: 2+2?"


def test_an_update_reads_its_numbers_to_the_host_once(tmp_path, tiny_dir):
    """The loop used to read every metric of every micro-batch to the host (a device sync each); now the whole
    update's loss, metrics and gradient norm cross in one copy: the count does not grow with the micro-batches."""
    from torch.overrides import TorchFunctionMode

    from posttrain.train import loop
    from posttrain.train.sft import SFT
    from tiny import addition_sft_rows

    class HostReads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("item", "tolist", "__float__", "__bool__", "__int__"):
                import traceback

                caller = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-1]
                self.count += caller.filename.endswith("posttrain/train/loop.py")  # the loop's own reads
            return func(*args, **(kwargs or {}))

    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(32))
    counts = {}
    for accum in (1, 4):
        algo = SFT(run_config("sft", tmp_path / f"run{accum}", tiny_dir, data, "train.batch_size=2", f"train.grad_accum={accum}"))
        trainer = loop.Trainer(algo, algo.cfg.train)
        update = algo.next_iteration(1).updates[0]
        reads = HostReads()
        with reads:
            loop._run_update(algo, update, trainer.params, algo.cfg.train, algo.device)
        counts[accum] = reads.count
    assert counts[4] == counts[1] == 1, counts
