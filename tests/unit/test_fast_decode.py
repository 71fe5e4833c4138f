"""The fast decode path: the preallocated KV cache gives what transformers' DynamicCache and `model.generate` give;
the two-level inverse-CDF draw and the candidate-limited nucleus sample the reference distribution; autocast
casts each weight once per call; the host allocator settings apply."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import posttrain.rollout.hf as hf
from posttrain.host_memory import tune_host_allocator
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.kv_cache import PreallocatedCache, decode_cache
from posttrain.rollout.sampling import DRAW_BLOCK, NUCLEUS_CANDIDATES, draw, filter_logits, sample_next

PAD = 0
PROMPTS = [[1, 5, 9, 13, 2, 7, 30], [3, 4], [11, 12, 13, 14, 15], [60]]  # left padding of 0, 5, 2 and 6


def tiny_llama(seed=0, vocab=64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def real_rows(r):
    return [(ids[m.bool()].tolist(), lp[m.bool()]) for ids, m, lp in zip(r.completion_ids, r.completion_mask, r.logprobs)]


def test_preallocated_cache_equals_dynamic_cache_greedy_and_sampled(monkeypatch):
    model = tiny_llama()
    free = hf.HFGenerator(model, PAD).generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    stops = [int(free.completion_ids[0, 2]), int(free.completion_ids[2, 5])]  # rows stop at different steps
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=stops)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, stop_token_ids=stops)
    runs = {}
    for name in ("fast", "dynamic"):
        if name == "dynamic":
            monkeypatch.setattr(hf, "decode_cache", lambda m, cap: DynamicCache(config=m.config))
        gen = hf.HFGenerator(model, PAD)
        runs[name] = [gen.generate(PROMPTS, p, num_samples=3, seed=11) for p in (greedy, sampled)]
    for fast, dynamic in zip(runs["fast"], runs["dynamic"]):
        assert fast.completion_mask.tolist() == dynamic.completion_mask.tolist()
        for (ids_f, lp_f), (ids_d, lp_d) in zip(real_rows(fast), real_rows(dynamic)):
            assert ids_f == ids_d
            torch.testing.assert_close(lp_f, lp_d, atol=1e-6, rtol=0)
    assert any(not m.all() for m in runs["fast"][0].completion_mask.bool())  # some rows did stop early


def test_greedy_tokens_equal_transformers_generate_under_left_padding():
    model = tiny_llama(seed=3)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    ours = hf.HFGenerator(model, PAD).generate(PROMPTS, params, num_samples=1, seed=0)
    for i, prompt in enumerate(PROMPTS):  # each prompt alone through transformers' own generate
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=PAD,
                             eos_token_id=None)
        assert ours.completion_ids[i].tolist() == out[0, len(prompt):].tolist()


def test_decode_cache_kind_and_capacity():
    model = tiny_llama()
    cache = decode_cache(model, 12)
    assert isinstance(cache, PreallocatedCache) and len(cache.layers) == 2
    x = torch.zeros(2, 2, 12, 8)
    cache.layers[0].update(x, x)
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.layers[0].update(x[:, :, :1], x[:, :, :1])
    from transformers import MistralConfig, MistralForCausalLM

    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=64, sliding_window=4))
    assert type(decode_cache(sliding, 12)) is DynamicCache  # sliding windows keep transformers' own layers


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper-tail p-value of Pearson's chi-square statistic (Wilson–Hilferty normal approximation)."""
    n = counts.sum()
    keep = probs > 0
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    k = int(keep.sum()) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("vocab", [2 * DRAW_BLOCK, 3 * DRAW_BLOCK + 37])  # whole blocks, and a short last block
def test_draw_matches_the_distribution(vocab):
    torch.manual_seed(0)
    logits = torch.randn(vocab) * 2.0
    logits[5] = float("-inf")  # probability 0: never drawn
    probs = logits.softmax(-1)
    rows = 200_000
    tokens, log_normalizer = draw(logits.repeat(rows, 1), torch.Generator().manual_seed(1))
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[5] == 0
    assert _chi_square_p(counts, probs.double()) > 1e-3
    tv = 0.5 * (counts / rows - probs.double()).abs().sum()
    assert tv < 0.03  # sampling noise alone is ~0.5 * sqrt(2 V / (pi n)) ~ 0.02 for these V
    torch.testing.assert_close(log_normalizer, logits.logsumexp(-1).expand(rows))


def test_draw_on_a_point_mass_and_mass_in_the_last_token():
    for hot in (0, DRAW_BLOCK - 1, DRAW_BLOCK, 2 * DRAW_BLOCK + 9):
        logits = torch.full((50, 2 * DRAW_BLOCK + 10), float("-inf"))
        logits[:, hot] = 0.0
        assert draw(logits, torch.Generator().manual_seed(0))[0].tolist() == [hot] * 50


def test_sample_next_frequencies_at_temperature_with_top_k_and_top_p():
    torch.manual_seed(1)
    logits = torch.randn(300) * 1.5
    T, top_k, top_p = 0.7, 40, 0.9
    rows = 100_000
    tokens, logp = sample_next(logits.repeat(rows, 1), SamplingParams(temperature=T, top_k=top_k, top_p=top_p),
                               torch.Generator().manual_seed(2))
    target = filter_logits((logits / T)[None], top_k, top_p)[0].softmax(-1).double()  # the reference filter
    counts = torch.bincount(tokens, minlength=300).double()
    assert counts[target == 0].sum() == 0
    assert _chi_square_p(counts, target) > 1e-3
    torch.testing.assert_close(logp, (logits / T).log_softmax(-1)[tokens])  # unfiltered distribution's log-prob


def _full_sort_nucleus(logits, top_p):
    """The textbook nucleus over the whole sorted vocabulary: the reference for the candidate-limited one."""
    values, order = logits.sort(dim=-1, descending=True)
    probs = values.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p
    return torch.zeros_like(drop).scatter(-1, order, drop)


def test_candidate_nucleus_equals_full_sort_also_when_the_nucleus_is_wider_than_the_candidates():
    V = 3 * NUCLEUS_CANDIDATES
    peaked = torch.randn(4, V) * 4.0  # nucleus of a few tokens
    flat = torch.randn(3, V) * 0.01  # nucleus of ~0.9 V tokens: beyond the candidates, the full-sort fallback
    logits = torch.cat([peaked, flat])
    for top_p in (0.5, 0.9, 0.999):
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))
        assert kept.tolist() == (~_full_sort_nucleus(logits, top_p)).tolist()
    assert torch.isfinite(filter_logits(flat, top_p=0.9)).sum(-1).min() > NUCLEUS_CANDIDATES


def _weight_casts(gen, prompt, params) -> int:
    """Casts of tensors shaped like a linear weight during one generate call (one prompt: activations have a
    leading batch dimension of 1, which no weight of the tiny model has)."""
    shapes = {list(m.weight.shape).__repr__() for m in gen.model.modules() if isinstance(m, torch.nn.Linear)}
    with torch.profiler.profile(record_shapes=True) as prof:
        gen.generate([prompt], params)
    return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
               if e.key == "aten::_to_copy" and e.input_shapes and repr(e.input_shapes[0]) in shapes)


def test_autocast_casts_each_frozen_weight_once_per_call(monkeypatch):
    """Under bf16 autocast a decode of 6 steps casts each (frozen) weight once, not at each of the 7 forwards
    (the path without packed weights: a GPU, a CPU without oneDNN bf16). Packed weights cast each once when packed
    and not at all on a call whose weights did not change."""
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    if hf.packing_available(torch.device("cpu"), torch.bfloat16):
        packed = hf.HFGenerator(model, PAD, autocast_dtype=torch.bfloat16, packed_weights=True)
        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert _weight_casts(packed, PROMPTS[0], params) == linears
        assert _weight_casts(packed, PROMPTS[0], params) == 0
    gen = hf.HFGenerator(model, PAD, autocast_dtype=torch.bfloat16, packed_weights=False)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert _weight_casts(gen, PROMPTS[0], params) == linears
    assert all(not p.requires_grad for p in model.parameters())  # flags restored
    import contextlib

    monkeypatch.setattr(hf, "_cast_weights_once", lambda model, applies: contextlib.nullcontext())
    assert _weight_casts(gen, PROMPTS[0], params) == 6 * linears  # without it: every forward (prefill + 5 steps)


def test_host_allocator_tuning_applies_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc tuning applies to glibc only")
    assert tune_host_allocator() is True


def test_compile_setting_and_regional_compile_agrees_with_eager():
    """model.compile: auto means CUDA only; `on` compiles each decoder layer in place (state dict keys unchanged)
    and the compiled forward and backward agree with eager to 1e-5 in fp32."""
    from posttrain.models.compiled import compile_decoder, decoder_layers, wants_compile

    import importlib.util

    assert wants_compile("auto", "cuda") == (importlib.util.find_spec("triton") is not None)
    assert not wants_compile("auto", "cpu") and wants_compile("on", "cpu") and not wants_compile("off", "cuda")
    with pytest.raises(ValueError, match="model.compile"):
        wants_compile("yes", "cpu")
    eager, compiled = tiny_llama(), tiny_llama()
    keys = list(compiled.state_dict())
    assert compile_decoder(compiled, "off", "cpu") == 0
    assert compile_decoder(compiled, "on", "cpu") == len(decoder_layers(compiled)) == 2
    assert list(compiled.state_dict()) == keys
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 30], [3, 4, 8, 8, 1, 2, 3]])
    outs = []
    for model in (eager, compiled):
        model.train()
        logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()
        outs.append((logits.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)
