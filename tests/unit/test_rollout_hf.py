"""The HF rollout engine: prefix sharing, padding, log-probs vs the trainer's recomputation, stops, seeds.

Tiny random models built here (Llama = RoPE, GPT-2 = absolute positions), plus a "counter" LM whose next token
is always last + 1, so that stop tokens and stop strings land exactly where a test wants them.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from posttrain.ops import IGNORE_INDEX, position_ids_from_mask, shift_labels, token_logprobs
from posttrain.rollout.base import Generator, SamplingParams, get_generator
from posttrain.rollout.hf import HFGenerator, left_pad
from posttrain.rollout.sampling import filter_logits, sample_next

PAD = 0
PROMPTS = [[1, 5, 9, 13, 2, 7, 30], [3, 4], [11, 12, 13, 14, 15], [60]]  # different lengths on purpose
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: thread hand-offs cost more than the math (10x slower with 2 threads on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, initializer_range=0.2,  # larger than default: logits far from uniform, no argmax ties
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def rows_of(r, i):
    """Row i's real completion tokens and their log-probs."""
    m = r.completion_mask[i].bool()
    return r.completion_ids[i][m].tolist(), r.logprobs[i][m]


def alone(model, prompt, params):
    """Each prompt generated on its own: batch of 1, no padding, no sharing."""
    return HFGenerator(model, PAD).generate([prompt], params, num_samples=1, seed=0)


# ---------------------------------------------------------------- protocol, params, filters


def test_protocol_registry_and_param_validation():
    gen = HFGenerator(tiny_llama(), PAD)
    assert isinstance(gen, Generator)
    assert get_generator("hf") is HFGenerator
    assert get_generator("vllm").__name__ == "VLLMGenerator"
    with pytest.raises(KeyError, match="unknown rollout engine"):
        get_generator("nope")
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(batch_size=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[1, 2], []], GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        gen.generate([[1, 2]], SamplingParams(max_new_tokens=2, stop_strings=["x"]))


def test_vllm_engine_without_vllm_or_gpu_raises_clearly():
    cls = get_generator("vllm")
    with pytest.raises((ImportError, RuntimeError), match="vLLM|GPU"):
        cls("unused-model-path", pad_token_id=PAD)


def test_filter_logits_hand_computed():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_p=0.45) == [0]  # 0.5 alone reaches 0.45
    assert kept(top_p=0.6) == [0, 1]  # 0.5 < 0.6, 0.8 >= 0.6
    assert kept(top_p=0.85) == [0, 1, 2]
    assert kept(top_k=2) == [0, 1]
    assert kept(top_k=2, top_p=0.6) == [0]  # top-p on the renormalized top-2: 0.625 >= 0.6
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary must not matter
    assert torch.isfinite(filter_logits(shuffled, top_p=0.6))[0].tolist() == [False, True, False, True]


def test_sample_next_stays_in_nucleus_and_reports_full_distribution_logprob():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(2000, 1)
    params = SamplingParams(temperature=0.5, top_p=0.8)
    tokens, logp = sample_next(logits, params, torch.Generator().manual_seed(0))
    full = (logits / 0.5).log_softmax(-1)
    assert set(tokens.tolist()) <= {0, 1}  # at T=0.5 probs are [.685, .247, .062, .007]: nucleus 0.8 keeps two
    torch.testing.assert_close(logp, full.gather(-1, tokens[:, None]).squeeze(-1))
    freq0 = (tokens == 0).float().mean().item()
    assert abs(freq0 - 25 / 34) < 0.04  # renormalized over the two: .25 / (.25 + .09) = 0.735


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ---------------------------------------------------------------- (a) prefix sharing


def test_prefix_shared_equals_unshared_greedy_with_chunks():
    model = tiny_llama()
    G = 3
    params = SamplingParams(max_new_tokens=8, temperature=0.0, batch_size=3)  # 4 prompts -> chunks of 3 and 1
    shared = HFGenerator(model, PAD).generate(PROMPTS, params, num_samples=G, seed=0)
    reencoded = HFGenerator(model, PAD, share_prefix=False).generate(PROMPTS, params, num_samples=G, seed=0)
    assert shared.group.tolist() == [i for i in range(len(PROMPTS)) for _ in range(G)]
    for i in range(len(PROMPTS) * G):
        p = PROMPTS[i // G]
        assert shared.prompt_ids[i][shared.prompt_mask[i].bool()].tolist() == p
        ref_ids, ref_lp = rows_of(alone(model, p, params), 0)
        ids, lp = rows_of(shared, i)
        assert ids == ref_ids
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
        assert rows_of(reencoded, i)[0] == ref_ids
    assert all(not t.is_inference() for t in (shared.completion_ids, shared.logprobs, shared.completion_mask))


# ---------------------------------------------------------------- (b) log-probs vs trainer recomputation


def recompute_logprobs(model, r, temperature):
    """What the trainer does: one forward over prompt + completion, positions from the mask, logits / T."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    labels = torch.cat([torch.full_like(r.prompt_ids, IGNORE_INDEX), r.completion_ids], dim=1)
    labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = token_logprobs(logits / temperature, shift_labels(labels))
    P = r.prompt_ids.shape[1]
    return logp[:, P - 1 : -1]  # position P-1+j predicts completion token j


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (8, 0.7)])
def test_logprobs_match_full_forward_at_temperature(top_k, top_p):
    model = tiny_llama()
    # stop ids make rows leave the batch at different steps: the pruned KV cache must stay right for the others
    params = SamplingParams(max_new_tokens=12, temperature=0.6, top_k=top_k, top_p=top_p, stop_token_ids=[3, 17, 40])
    r = HFGenerator(model, PAD).generate(PROMPTS, params, num_samples=4, seed=3)
    ref = recompute_logprobs(model, r, 0.6)
    m = r.completion_mask.bool()
    assert m.sum() > 20
    torch.testing.assert_close(r.logprobs[m], ref[m], atol=1e-4, rtol=0)
    assert (r.logprobs[~m] == 0).all()


# ---------------------------------------------------------------- (c) left padding, RoPE and absolute positions


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_left_padded_batch_equals_each_prompt_alone(make_model):
    model = make_model()
    batch = HFGenerator(model, PAD).generate(PROMPTS, GREEDY, num_samples=1, seed=0)
    assert batch.prompt_mask.sum(1).tolist() == [len(p) for p in PROMPTS]
    for i, p in enumerate(PROMPTS):
        ref_ids, ref_lp = rows_of(alone(model, p, GREEDY), 0)
        ids, lp = rows_of(batch, i)
        assert ids == ref_ids
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)


def test_gpt2_padding_check_can_fail_without_position_ids():
    """Negative control: the test above would catch an engine that let GPT-2 default its positions."""
    model = tiny_gpt2()
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        wrong = model(input_ids=ids, attention_mask=mask).logits[1, -1]  # positions 0..P-1 despite the padding
        right = model(input_ids=torch.tensor([PROMPTS[1]])).logits[0, -1]
    assert (wrong - right).abs().max() > 1e-2


# ---------------------------------------------------------------- (d) stops and masks


class CounterLM(torch.nn.Module):
    """Next token = (last input token + 1) % V, with a sure margin; ignores the cache (stays empty)."""

    def __init__(self, vocab_size=16):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the engine a device and a dtype

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        nxt = (input_ids + 1) % self.vocab_size
        return SimpleNamespace(logits=F.one_hot(nxt, self.vocab_size) * 20.0 + self.anchor)


class CharTokenizer:
    """Token i <-> the letter chr(ord('a') + i); enough for stop strings and texts."""

    def batch_decode(self, rows, skip_special_tokens=False):
        return ["".join(chr(ord("a") + t) for t in row) for row in rows]


def counter_rollout(prompts, **kw):
    kw.setdefault("max_new_tokens", 5)
    params = SamplingParams(temperature=0.0, **kw)
    return HFGenerator(CounterLM(), PAD, tokenizer=CharTokenizer()).generate(prompts, params, num_samples=1, seed=0)


def test_stop_token_masks_and_truncation():
    # completions: [3] -> 4 5 6 7 8 (EOS in the last slot); [9] -> 10..14 (no EOS); [6] -> 7 8 (EOS, then pad);
    # [7] -> 8 (immediate EOS)
    r = counter_rollout([[3], [9], [1, 2, 6], [7]], stop_token_ids=[8])
    assert r.completion_ids.tolist() == [[4, 5, 6, 7, 8], [10, 11, 12, 13, 14], [7, 8, 0, 0, 0], [8, 0, 0, 0, 0]]
    assert r.completion_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert r.truncated.tolist() == [False, True, False, False]
    assert (r.logprobs[r.completion_mask == 0] == 0).all()
    assert r.texts == ["efghi", "klmno", "hi", "i"]


def test_early_exit_when_all_rows_stop():
    r = counter_rollout([[6], [5]], stop_token_ids=[8], max_new_tokens=50)
    assert r.completion_ids.shape[1] == 3  # row 1 needs 3 tokens; the loop ends there, not at 50
    assert r.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_secondary_eos_and_pad_equal_to_eos():
    r = counter_rollout([[9], [3], [14]], stop_token_ids=[15, 12])  # 12 is the secondary EOS
    assert r.completion_mask.sum(1).tolist() == [3, 5, 1]  # 10 11 12 | 4..8 | 15
    assert r.truncated.tolist() == [False, True, False]
    # pad id 0 as EOS: the first 0 is a real token (mask 1) and the 0s after it are padding (mask 0)
    r = counter_rollout([[14], [2]], stop_token_ids=[PAD])
    assert r.completion_ids.tolist() == [[15, 0, 0, 0, 0], [3, 4, 5, 6, 7]]
    assert r.completion_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert r.truncated.tolist() == [False, True]


def test_stop_strings_keep_the_completing_token():
    r = counter_rollout([[6], [9], [0]], stop_strings=["ij", "zz"], max_new_tokens=12)
    # [6] -> h i j: "ij" completed by j (token 9); [9] -> "klmnopabcdef" never has it; [0] -> b..j stops at j
    assert rows_of(r, 0)[0] == [7, 8, 9]
    assert r.truncated.tolist() == [False, True, False]
    assert rows_of(r, 2)[0] == list(range(1, 10))
    assert r.texts[0] == "hij"
    # a long stop string far into the completion: only a tail window is decoded, it must still be found
    r = counter_rollout([[0]], stop_strings=["klm"], max_new_tokens=15)
    assert rows_of(r, 0)[0] == list(range(1, 13)) and not r.truncated[0]


def test_stop_token_pruning_on_real_model_keeps_other_rows_exact():
    model = tiny_llama()
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    free = HFGenerator(model, PAD).generate(PROMPTS, params, seed=0)
    stop_id = free.completion_ids[0, 0].item()  # row 0 stops at once; rows without it must be untouched
    stopped = HFGenerator(model, PAD).generate(PROMPTS, SamplingParams(**{**vars(params), "stop_token_ids": [stop_id]}))
    for i in range(len(PROMPTS)):
        seq = free.completion_ids[i].tolist()
        n = seq.index(stop_id) + 1 if stop_id in seq else len(seq)
        assert rows_of(stopped, i)[0] == seq[:n]
        assert bool(stopped.truncated[i]) == (stop_id not in seq)
    assert stopped.truncated.any() and not stopped.truncated.all()


# ---------------------------------------------------------------- (e) seeds, (f) top_k = 1


def test_same_seed_same_samples_different_seed_different():
    model = tiny_llama()
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    gen = HFGenerator(model, PAD)
    a, b, c = (gen.generate(PROMPTS, params, num_samples=2, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the G samples of one prompt differ from each other (the cache copy does not copy the randomness)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])
    torch.manual_seed(123)
    d = gen.generate(PROMPTS, params, num_samples=2)
    torch.manual_seed(123)
    assert torch.equal(d.completion_ids, gen.generate(PROMPTS, params, num_samples=2).completion_ids)


def test_top_k_one_equals_greedy():
    model = tiny_llama()
    greedy = HFGenerator(model, PAD).generate(PROMPTS, GREEDY, num_samples=2, seed=0)
    top1 = HFGenerator(model, PAD).generate(
        PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1), num_samples=2, seed=5
    )
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    torch.testing.assert_close(greedy.logprobs, top1.logprobs)  # both at T = 1, full distribution


# ---------------------------------------------------------------- modes and dtypes


def test_dropout_off_during_generation_and_train_mode_restored():
    model = tiny_gpt2().train()  # GPT-2 has dropout 0.1: sampling in train mode would be noisy
    gen = HFGenerator(model, PAD)
    a, b = gen.generate(PROMPTS, GREEDY, seed=0), gen.generate(PROMPTS, GREEDY, seed=0)
    assert model.training
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=0, rtol=0)


def test_bf16_autocast_and_bf16_model_run():
    model = tiny_llama()
    params = SamplingParams(max_new_tokens=4, temperature=0.6)
    r = HFGenerator(model, PAD, autocast_dtype=torch.bfloat16).generate(PROMPTS, params, num_samples=2, seed=0)
    assert r.logprobs.dtype == torch.float32 and torch.isfinite(r.logprobs).all()
    r16 = HFGenerator(model.to(torch.bfloat16), PAD).generate(PROMPTS, params, num_samples=2, seed=0)
    assert r16.logprobs.dtype == torch.float32 and (r16.logprobs <= 0).all()
