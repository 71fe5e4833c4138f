"""bf16 autocast on a CPU: SDPA's math backend instead of the slow fused CPU flash kernel, same function."""

import torch
from torch.profiler import ProfilerActivity, profile

from posttrain.models.forward import token_logps
from posttrain.models.loading import bf16_autocast
from tests.tiny import tiny_llama


def _left_padded_batch():
    ids = torch.randint(4, 90, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the pad queries see no key at all (fully masked rows)
    mask[1, :2] = 0
    return ids, mask


def _attention_ops(model, ids, mask, context) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof, context:
        token_logps(model, ids, mask).sum().backward()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_bf16_autocast_runs_math_attention_not_the_cpu_flash_kernel():
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    ids, mask = _left_padded_batch()
    plain = _attention_ops(model, ids, mask, torch.autocast("cpu", dtype=torch.bfloat16))
    ours = _attention_ops(model, ids, mask, bf16_autocast("cpu"))
    assert any("flash" in op for op in plain)  # what plain autocast picks on a CPU
    assert not any("flash" in op for op in ours), ours


def test_bf16_autocast_log_probs_and_gradients_match_fp32_with_left_padding():
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    ids, mask = _left_padded_batch()
    ref = token_logps(model, ids, mask)
    ref.sum().backward()
    ref_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    with bf16_autocast("cpu"):
        out = token_logps(model, ids, mask)
    out.sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()  # fully masked pad rows give no NaN
    assert (out[mask == 0] == 0).all()
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.02)  # bf16 rounding of a 90-token vocabulary
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99
