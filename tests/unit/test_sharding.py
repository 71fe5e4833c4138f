"""train.sharding: the mode from the config, a DeepSpeed JSON or accelerate's launch environment; gradient clipping."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from posttrain.train.sharding import clip_grad_norm, resolve_sharding


def cfg(sharding="auto", deepspeed=None):
    return SimpleNamespace(sharding=sharding, deepspeed=deepspeed)


def test_explicit_mode_wins_over_the_environment():
    assert resolve_sharding(cfg("grad_op"), {"ACCELERATE_USE_FSDP": "true"}) == "grad_op"
    assert resolve_sharding(cfg("none"), {"ACCELERATE_USE_FSDP": "true"}) == "none"
    with pytest.raises(ValueError, match="train.sharding must be"):
        resolve_sharding(cfg("zero3"), {})


@pytest.mark.parametrize("stage,mode", [(0, "none"), (1, "grad_op"), (2, "grad_op"), (3, "full")])
def test_deepspeed_zero_stage_picks_the_mode(tmp_path, stage, mode):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 4}))
    assert resolve_sharding(cfg(deepspeed=str(path)), {}) == mode


def test_deepspeed_config_problems_are_named(tmp_path, caplog):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        resolve_sharding(cfg(deepspeed=str(bad)), {})
    with pytest.raises(ValueError, match="ZeRO stage must be 0-3"):
        (tmp_path / "s5.json").write_text(json.dumps({"zero_optimization": {"stage": 5}}))
        resolve_sharding(cfg(deepspeed=str(tmp_path / "s5.json")), {})
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "flops_profiler": {}}))
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert resolve_sharding(cfg(deepspeed=str(odd)), {}) == "full"
    assert "flops_profiler" in caplog.text and "offload_param" in caplog.text


@pytest.mark.parametrize("env,mode", [
    ({}, "none"),
    ({"ACCELERATE_USE_FSDP": "true"}, "full"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "grad_op"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "3"}, "none"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "grad_op"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, "full"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "full"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "grad_op"),
])
def test_accelerate_launch_environment(env, mode):
    assert resolve_sharding(cfg(), env) == mode


def test_clip_grad_norm_matches_torch_in_one_process():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    expected = [p.grad.clone() for p in params]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, g in zip(ref, expected):
        r.grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    got = clip_grad_norm(params, 1.0)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad)
