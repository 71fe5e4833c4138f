"""Packed linear weights in the HF engine's decode (`rollout/packed_linear.py`): the packed product equals
`F.linear` (bit for bit in bf16, to 1e-5 in fp32), a decode gives today's greedy tokens and log-probs under left
padding, a weight that changed is packed again (never a stale product), forwards are restored after the call, and
the KV cache stores autocast's precision."""

import pytest
import torch
import torch.nn.functional as F

import posttrain.rollout.hf as hf
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.packed_linear import PackedWeights, packed_linears, packing_available, plain_linears
from test_fast_decode import PAD, PROMPTS, real_rows, tiny_llama

BF16 = packing_available(torch.device("cpu"), torch.bfloat16)
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no native bf16 for oneDNN (AVX2 only): bf16 is not packed here")


def _linear(out_features=48, in_features=32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_packed_product_equals_linear(dtype):
    layer = _linear().to(dtype)
    cache = PackedWeights()
    for shape in ((1, 32), (13, 32), (3, 7, 32)):  # fewer and more rows than the packing hint, and a 3-d input
        x = torch.randn(shape, dtype=dtype)
        want = F.linear(x, layer.weight, layer.bias)
        with torch.no_grad(), packed_linears(layer, cache, dtype):
            got = layer(x)
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.packs == 1  # packed once for all three calls


@needs_bf16
def test_under_autocast_an_fp32_layer_gets_autocasts_bf16_product():
    layer, x = _linear(), torch.randn(5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        with packed_linears(layer, PackedWeights(), torch.bfloat16):
            got = layer(x)
    assert want.dtype == got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_a_changed_weight_is_packed_again_and_forwards_are_restored():
    layer, x = _linear(), torch.randn(4, 32)
    cache = PackedWeights()
    with torch.no_grad():
        with packed_linears(layer, cache, torch.float32):
            before = layer(x)
        layer.weight.add_(1.0)  # an optimizer step: in place, the version counter moves
        with packed_linears(layer, cache, torch.float32):
            after = layer(x)
    torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before) and cache.packs == 2
    assert "forward" not in vars(layer)  # the class's forward again
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), packed_linears(layer, cache, torch.float32):
            raise RuntimeError("boom")
    assert "forward" not in vars(layer)
    assert cache.clear() and not cache.clear()


def test_only_plain_linears_are_packed():
    class Wrapped(torch.nn.Linear):  # a subclass (a quantized layer, say) keeps its own forward
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Wrapped(4, 4), torch.nn.Embedding(3, 4))
    assert plain_linears(model) == [model[0]]


@pytest.mark.parametrize("autocast", [False, pytest.param(True, marks=needs_bf16)])
def test_decode_with_packed_weights_equals_todays_engine(autocast):
    """Greedy and sampled (same seed) rows with left padding, rows stopping at different steps, G = 3: the same
    tokens; log-probs bit-equal under bf16 autocast, to 1e-5 in fp32."""
    model = tiny_llama(seed=2)
    dtype = torch.bfloat16 if autocast else None
    free = hf.HFGenerator(model, PAD, packed_weights=False).generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    stops = [int(free.completion_ids[0, 2]), int(free.completion_ids[2, 5])]
    for temperature in (0.0, 0.9):
        params = SamplingParams(max_new_tokens=10, temperature=temperature, stop_token_ids=stops)
        plain = hf.HFGenerator(model, PAD, autocast_dtype=dtype, packed_weights=False).generate(PROMPTS, params, 3, seed=5)
        gen = hf.HFGenerator(model, PAD, autocast_dtype=dtype, packed_weights=True)
        packed = gen.generate(PROMPTS, params, 3, seed=5)
        assert gen.packed.packs == len(plain_linears(model))
        assert packed.completion_mask.tolist() == plain.completion_mask.tolist()
        for (ids_p, lp_p), (ids_q, lp_q) in zip(real_rows(packed), real_rows(plain)):
            assert ids_p == ids_q
            torch.testing.assert_close(lp_p, lp_q, atol=0 if autocast else 1e-5, rtol=0)
    assert any(not m.all() for m in plain.completion_mask.bool())  # some rows stopped early


def test_engine_repacks_after_a_training_step_and_frees_at_sleep():
    model = tiny_llama()
    gen = hf.HFGenerator(model, PAD, packed_weights=True)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    first = gen.generate(PROMPTS, params)
    n = gen.packed.packs
    gen.generate(PROMPTS, params)
    assert gen.packed.packs == n  # unchanged weights: nothing packed again (an evaluation's batches)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # in place, as an optimizer step: the greedy tokens change
    flipped = gen.generate(PROMPTS, params)
    want = hf.HFGenerator(model, PAD, packed_weights=False).generate(PROMPTS, params)
    assert flipped.completion_ids.tolist() == want.completion_ids.tolist() != first.completion_ids.tolist()
    assert gen.packed.packs == n + 1
    assert gen.sleep() is True and gen.packed.packs == n + 1 and not gen.sleep()


@needs_bf16
def test_cache_stores_keys_in_autocasts_precision():
    from posttrain.rollout.kv_cache import decode_cache

    model = tiny_llama()
    cache = decode_cache(model, 16)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.dtype == cache.layers[0].values.dtype == torch.bfloat16
    cache = decode_cache(model, 16)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.dtype == torch.float32  # no autocast: the model's own precision
