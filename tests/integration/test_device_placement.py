"""Device placement, checked on a CPU-only machine.

CI has no GPU, so a tensor created without `device=` (it lands on torch's default device, the CPU, and on a GPU
run collides with the CUDA weights) would go unnoticed. Here the default device is `meta` while the run's device
is the CPU: every tensor the code creates without saying where ends up on `meta`, which has no data, and the run
fails at once. On top, `DeviceAudit` (a TorchFunctionMode) records every op that touches a tensor off the run's
device, with the op and the posttrain line that called it, so a failure says where the placement went wrong.
After the steps, every parameter, gradient and optimizer state must be on the run's device.
"""

from __future__ import annotations

import json
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from posttrain.train.loop import Trainer
from tiny import prompt_rows, run_config, write_jsonl


class DeviceAudit(TorchFunctionMode):
    """Records (op, devices, caller) for every op that posttrain code calls with tensor inputs or outputs off
    `device`. Ops that libraries call themselves are not judged (transformers builds a model on `meta` before
    loading its weights, on purpose); a library op fed a misplaced tensor fails on its own."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device, self.off = torch.device(device), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        wrong = {t.device for t in tensors if t.device != self.device}
        if wrong and len(self.off) < 20:
            caller = _caller()
            if "/posttrain/" in caller:
                self.off.append((getattr(func, "__name__", str(func)), sorted(map(str, wrong)), caller.split("posttrain/")[-1]))
        return out


def _caller() -> str:
    """file:line of the innermost frame outside torch and this test: who asked for the op."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("test_device_placement.py"):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def run_on_cpu_with_meta_default(algo_factory, cfg):
    """Build the algorithm and train cfg.train.max_steps steps with torch's default device set to `meta`."""
    audit = DeviceAudit("cpu")
    try:
        with torch.device("meta"), audit:
            algo = algo_factory(cfg)
            trainer = Trainer(algo, cfg.train)
            trainer.fit()
    except Exception as exc:
        exc.add_note(f"first ops off the run's device: {audit.off[:5]}")
        raise
    assert not audit.off, f"ops off the run's device: {audit.off}"
    return algo, trainer


def assert_all_on(device: str, algo, trainer) -> None:
    device = torch.device(device)
    for name, module in algo.modules().items():
        for pname, p in module.named_parameters():
            assert p.device == device, f"{name}.{pname} on {p.device}"
            assert p.grad is None or p.grad.device == device, f"{name}.{pname}.grad on {p.grad.device}"
    states = [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert states, "the optimizer holds no state: nothing was checked"
    assert {t.device for t in states} == {device}


@pytest.fixture
def data(tmp_path):
    rows = {
        "sft": [{"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i + 1)}]}
                for i in range(24)],
        "pairs": [{"prompt": f"{i}+{i}=", "chosen": f"ok {2 * i}", "rejected": f"no {2 * i + 1 + i % 3}"} for i in range(24)],
        "unpaired": [{"prompt": f"{i}?", "completion": "yes" if i % 2 else "no", "label": bool(i % 2)} for i in range(24)],
        "prompts": prompt_rows(16),
    }
    return {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in rows.items()}


ONLINE = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=4", "algo.sampling.prompts_per_step=2", "algo.sampling.num_generations=4",
          "train.batch_size=4", "algo.sampling.eval_max_new_tokens=4", "data.num_eval_examples=2"]
CASES = {
    "sft": ("posttrain.train.sft:SFT", "sft", []),
    "sft-lora": ("posttrain.train.sft:SFT", "sft", ["model.lora.enabled=true", "model.lora.r=2"]),
    "dpo": ("posttrain.train.dpo:DPO", "pairs", []),
    "dpo-live-ref": ("posttrain.train.dpo:DPO", "pairs", ["algo.precompute_ref=false"]),
    "kto": ("posttrain.train.kto:KTO", "unpaired", []),
    "rm": ("posttrain.train.rm:RewardModeling", "pairs", []),
    "grpo": ("posttrain.train.grpo:GRPO", "prompts", [*ONLINE, "algo.kl.beta=0.05"]),
    "ppo": ("posttrain.train.ppo:PPO", "prompts", ONLINE),
    "ppo-offloaded-bf16-ref": ("posttrain.train.ppo:PPO", "prompts",
                               [*ONLINE, "model.offload_frozen=true", "model.frozen_dtype=bf16"]),
    "online-dpo": ("posttrain.train.online_dpo:OnlineDPO", "prompts", ONLINE),
    "grpo-multi-turn": ("posttrain.train.grpo:GRPO", "prompts", [*ONLINE, "algo.env.name=tiny_envs:TwoTurnVowels",
                                                                "algo.env.cut_turns=answer", "algo.reward.functions=[]"]),
}


def _factory(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_on_the_run_device(tmp_path, tiny_dir, data, case):
    target, kind, extra = CASES[case]
    command = {"SFT": "sft", "DPO": "dpo", "KTO": "kto", "RewardModeling": "rm", "GRPO": "grpo", "PPO": "ppo",
               "OnlineDPO": "online-dpo"}[target.split(":")[1]]
    cfg = run_config(command, tmp_path / "run", tiny_dir, data[kind], "train.device=cpu", "train.max_steps=2",
                     "train.save_every=1", *extra)
    algo, trainer = run_on_cpu_with_meta_default(_factory(target), cfg)
    assert_all_on("cpu", algo, trainer)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(isinstance(v, float) and v == v for v in losses)  # finite, logged
    assert all("mem/host_peak_rss_gb" in r for r in rows if "loss" in r)
    if "frozen_dtype=bf16" in " ".join(extra):  # the frozen reference in bf16, the trained critic in the policy's fp32
        assert next(algo.reference.model.parameters()).dtype == torch.bfloat16
        assert {p.dtype for p in algo.critic.parameters()} == {torch.float32}


def test_a_tensor_created_without_a_device_is_caught(tmp_path, tiny_dir, data, monkeypatch):
    """The check itself: the HF engine's prompt padding as it was before devices were explicit (tensors made on
    torch's default device, then `.to(device)`) — correct on a CPU-only run, a misplacement on a GPU one — fails."""
    import posttrain.rollout.hf as hf
    from posttrain.train.grpo import GRPO

    def careless_left_pad(prompt_ids, pad_token_id, device=None):
        P = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), P), pad_token_id, dtype=torch.long)  # no device=
        mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
        return ids.to(device), mask.to(device)

    cfg = run_config("grpo", tmp_path / "run", tiny_dir, data["prompts"], "train.device=cpu", "train.max_steps=1", *ONLINE)
    monkeypatch.setattr(hf, "left_pad", careless_left_pad)
    with pytest.raises((RuntimeError, NotImplementedError, AssertionError)):
        run_on_cpu_with_meta_default(GRPO, cfg)


def test_the_audit_names_an_op_off_the_device():
    from posttrain.ops import masked_mean

    audit = DeviceAudit("cpu")
    with audit:
        masked_mean(torch.ones(3, device="cpu"), torch.ones(3, device="cpu"))
        assert audit.off == []
        masked_mean(torch.ones(3, device="meta"), torch.ones(3, device="meta"))
    op, devices, caller = audit.off[0]
    assert devices == ["meta"] and caller.startswith("ops.py:")
