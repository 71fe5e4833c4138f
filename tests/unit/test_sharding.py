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


def test_full_params_gathers_then_restores_each_units_resharding(tmp_path):
    """A one-process group is enough to check the bookkeeping: inside `full_params` every unit is gathered and
    stays gathered after a forward; afterwards full (ZeRO-3) units reshard after forward again and grad_op
    (ZeRO-2) units keep their weights, as before."""
    import torch.distributed as dist

    from posttrain.train.sharding import full_params, shard
    from tiny import tiny_llama

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for mode in ("full", "grad_op"):
            model = tiny_llama(seed=0)
            units = shard(model, mode)
            assert len(units) == model.config.num_hidden_layers
            resharding = lambda: [u._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None for u in units]  # noqa: E731
            before = resharding()
            assert before == [mode == "full"] * len(units)
            ids = torch.tensor([[5, 6, 7]])
            with full_params(model):
                assert resharding() == [False] * len(units)
                with torch.no_grad():
                    model(input_ids=ids)
                assert all(u._get_fsdp_state()._fsdp_param_group.is_unsharded for u in units)
            assert resharding() == before
    finally:
        dist.destroy_process_group()
