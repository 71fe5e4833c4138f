"""The vLLM rollout engine without vLLM: a fake `vllm` module records what the engine asks of `vllm.LLM`.

Checked here: the engine options per platform (colocated GPU share, sleep mode on with CUDA, off on vLLM's CPU
build, the user's options winning), the sleep / wake-up hooks through `release_memory` / `reclaim_memory` (order,
counts, no-ops), that the HF engine is untouched by them, that `sync_weights` hands vLLM the policy's own tensors,
and the Rollout built from vLLM outputs: padding, log-probs, truncation, groups, on the requested device even when
torch's default device is `meta`. What only a real vLLM on a GPU can show (memory actually freed, weights right
after a wake-up) is scripts/check_vllm.py's job.
"""

import sys
import types
import warnings
from types import SimpleNamespace

import pytest
import torch

from posttrain.rollout import vllm_engine
from posttrain.rollout.base import MemoryHooks, SamplingParams, get_generator, reclaim_memory, release_memory
from posttrain.rollout.vllm_engine import COLOCATED_GPU_MEMORY_UTILIZATION, VLLMGenerator

PAD = 0


class FakeLLM:
    """Stands in for `vllm.LLM`: records its options and every call, in order, in `calls`."""

    def __init__(self, model, **options):
        self.model, self.options, self.calls = model, options, []
        self.outputs = []  # what the next `generate` returns
        self.loaded = None  # the (name, tensor) pairs of the last weight load

    def generate(self, requests, sampling, use_tqdm=True):
        self.calls.append("generate")
        self.requests, self.sampling = requests, sampling
        return self.outputs

    def sleep(self, level=1):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({tags})")

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(f"rpc:{method}")
        self.rpc_kwargs = kwargs
        self.loaded = list(kwargs["weights_iterator"])
        return [None]

    def apply_model(self, fn):
        self.calls.append("apply_model")
        return [fn(SimpleNamespace(load_weights=lambda weights: setattr(self, "loaded", list(weights))))]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


@pytest.fixture
def fake_vllm(monkeypatch):
    """A fake `vllm` module on a chosen platform (default cuda); returns a function that sets the platform."""
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    platform = {"kind": "cuda"}
    monkeypatch.setattr(vllm_engine, "_platform", lambda vllm: platform["kind"])
    monkeypatch.setattr(vllm_engine, "_has_inplace_reload", lambda: True)
    for var in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)  # the engine sets some; restored after the test

    def on(kind):
        platform["kind"] = kind

    return on


def engine(**kw):
    kw.setdefault("device", "cpu")
    return VLLMGenerator("some/model", PAD, **kw)


# ---------------------------------------------------------------- options per platform


def test_cuda_defaults_share_the_gpu_and_enable_sleep_mode(fake_vllm):
    e = engine(device=None, dtype="bfloat16")
    opts = e.llm.options
    assert COLOCATED_GPU_MEMORY_UTILIZATION == 0.3
    assert opts["gpu_memory_utilization"] == 0.3 and opts["enable_sleep_mode"] is True
    assert opts["logprobs_mode"] == "processed_logprobs" and opts["dtype"] == "bfloat16"
    assert e.llm.model == "some/model" and e.device == torch.device("cuda") and e.sleep_mode
    assert vllm_engine.os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # tensors passed by reference


def test_user_options_win(fake_vllm):
    e = engine(gpu_memory_utilization=0.55, enable_sleep_mode=False, logprobs_mode="raw_logprobs")
    assert e.llm.options["gpu_memory_utilization"] == 0.55
    assert e.llm.options["enable_sleep_mode"] is False and e.llm.options["logprobs_mode"] == "raw_logprobs"
    # without sleep mode the hooks must not call into vLLM (LLM.sleep needs the sleep allocator)
    assert release_memory(e) is False and reclaim_memory(e) is False
    assert e.llm.calls == [] and e.sleeps == 0


def test_for_training_passes_vllm_options_over_the_defaults(fake_vllm, tmp_path):
    from posttrain.online_config import SamplingConfig
    from posttrain.rollout.base import EngineContext

    sampling = SamplingConfig(max_new_tokens=28, vllm_options={"gpu_memory_utilization": 0.45, "max_model_len": 256})
    context = EngineContext(max_model_len=128, seed=7, start_checkpoint=str(tmp_path))  # a folder: the policy's checkpoint
    policy = torch.nn.Linear(2, 2)
    e = get_generator("vllm").for_training(policy, SimpleNamespace(pad_token_id=3), sampling, context)
    opts = e.llm.options
    assert opts["gpu_memory_utilization"] == 0.45 and opts["max_model_len"] == 256  # the user's
    assert opts["seed"] == 7 and opts["enable_sleep_mode"] is True  # the defaults
    assert e.llm.model == str(tmp_path) and e.pad_token_id == 3 and e.device == torch.device("cpu")


def test_cpu_build_has_no_sleep_mode(fake_vllm):
    fake_vllm("cpu")
    e = engine()
    assert "enable_sleep_mode" not in e.llm.options and not e.sleep_mode
    assert vllm_engine.os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert release_memory(e) is False and reclaim_memory(e) is False and e.llm.calls == []
    with pytest.raises(ValueError, match="CPU build has no sleep mode"):
        engine(enable_sleep_mode=True)


def test_expandable_segments_turn_the_default_sleep_mode_off(fake_vllm, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64,expandable_segments:True")
    with pytest.warns(UserWarning, match="expandable_segments"):
        e = engine()
    assert e.llm.options["enable_sleep_mode"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for explicitly: no warning, vLLM decides
        assert engine(enable_sleep_mode=True).llm.options["enable_sleep_mode"] is True


def test_bad_options_are_refused(fake_vllm):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        engine(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        engine(device="cuda:1")  # vLLM would load on cuda:0, not beside this policy


# ---------------------------------------------------------------- sleep / wake-up


def test_sleep_and_wake_up_through_the_helpers(fake_vllm):
    e = engine()
    assert reclaim_memory(e) is False and e.llm.calls == []  # awake: nothing to reclaim
    assert release_memory(e) is True and e.asleep and e.sleeps == 1
    assert release_memory(e) is False  # already asleep: vLLM is not asked twice
    assert reclaim_memory(e) is True and not e.asleep
    assert reclaim_memory(e) is False
    assert e.llm.calls == ["sleep(1)", "wake_up(None)"] and e.sleeps == 1


def test_training_steps_call_order(fake_vllm):
    """Two steps as the trainer runs them: reclaim, sync, sample | release, update; weights loaded only awake."""
    e, policy = engine(), torch.nn.Linear(3, 2)
    e.llm.outputs = [request([5, 6], [completion(0, [7], [-0.5])])]
    for _ in range(2):
        reclaim_memory(e)
        e.sync_weights(policy)
        e.generate([[5, 6]], SamplingParams(max_new_tokens=4))
        release_memory(e)
    assert e.llm.calls == ["rpc:reload_weights", "reset_prefix_cache", "generate", "sleep(1)",
                           "wake_up(None)", "rpc:reload_weights", "reset_prefix_cache", "generate", "sleep(1)"]
    assert e.sleeps == 2 and e.syncs == 2 and e.asleep


def test_sync_and_generate_wake_a_sleeping_engine_first(fake_vllm):
    e = engine()
    e.llm.outputs = [request([1], [completion(0, [2], [-1.0])])]
    release_memory(e)
    e.sync_weights(torch.nn.Linear(2, 2))  # weight memory is unmapped while asleep: must wake before loading
    assert e.llm.calls == ["sleep(1)", "wake_up(None)", "rpc:reload_weights", "reset_prefix_cache"]
    release_memory(e)
    e.generate([[1]], SamplingParams(max_new_tokens=2))
    assert e.llm.calls[-3:] == ["sleep(1)", "wake_up(None)", "generate"] and not e.asleep


def test_hf_engine_is_untouched_by_the_helpers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.rollout.hf import HFGenerator

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32)).eval()
    hf = HFGenerator(model, PAD)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    before = hf.generate([[1, 2, 3]], params, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert isinstance(hf, MemoryHooks) and hf.weight_copies == 0  # no copy of the weights of its own
    # what it frees at sleep: its packed decode weights (on a CPU with oneDNN), rebuilt by the next call
    assert release_memory(hf) is bool(hf.packed.packs) and release_memory(hf) is False and reclaim_memory(hf) is False
    after = hf.generate([[1, 2, 3]], params, seed=0)
    assert torch.equal(before.completion_ids, after.completion_ids)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    # the mixin's defaults are no-ops too, and a non-callable attribute named like a hook is left alone
    assert release_memory(MemoryHooks()) is False and reclaim_memory(MemoryHooks()) is False
    assert release_memory(SimpleNamespace(sleep=True)) is False


# ---------------------------------------------------------------- weight sync


def test_sync_hands_vllm_the_policys_own_tensors(fake_vllm):
    e, policy = engine(), torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    e.sync_weights(policy)
    assert e.llm.rpc_kwargs["is_checkpoint_format"] is True
    names = [n for n, _ in e.llm.loaded]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    params = dict(policy.named_parameters())
    for name, t in e.llm.loaded:  # the same storage: no copy, no cast, no trip through another device
        assert t.data_ptr() == params[name].data_ptr() and t.dtype == params[name].dtype and not t.requires_grad


def test_sync_of_a_policy_off_the_cpu_never_copies_to_the_cpu(fake_vllm):
    """A meta-device policy stands in for a GPU one: any `.cpu()` on the way would raise (meta has no data)."""
    e = engine(device="meta")
    with torch.device("meta"):
        policy = torch.nn.Linear(8, 8)
    e.sync_weights(policy)
    assert [t.device.type for _, t in e.llm.loaded] == ["meta", "meta"] and e.syncs == 1


def test_sync_on_older_vllm_uses_apply_model(fake_vllm, monkeypatch):
    monkeypatch.setattr(vllm_engine, "_has_inplace_reload", lambda: False)
    e, policy = engine(), torch.nn.Linear(2, 2)
    e.sync_weights(policy)
    assert e.llm.calls == ["apply_model", "reset_prefix_cache"]
    assert [n for n, _ in e.llm.loaded] == ["weight", "bias"]
    assert e.llm.loaded[0][1].data_ptr() == policy.weight.data_ptr()


def test_sync_of_a_peft_model_merges_and_maps_names(fake_vllm):
    events = []

    class Peft(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def state_dict(self, *a, **k):
            return {"base_model.model.layer.base_layer.weight": self.w, "base_model.model.layer.lora_A.weight": self.w,
                    "base_model.model.head.weight": self.w}

        def merge_adapter(self):
            events.append("merge")

        def unmerge_adapter(self):
            events.append("unmerge")

    e = engine()
    def load(method, kwargs=None):
        events.append(("load", [n for n, _ in kwargs["weights_iterator"]]))

    e.llm.collective_rpc = load
    e.sync_weights(Peft())
    assert events == ["merge", ("load", ["layer.weight", "head.weight"]), "unmerge"]


# ---------------------------------------------------------------- Rollout from vLLM outputs


def completion(index, ids, logps, finish="stop", text=""):
    """A vLLM CompletionOutput: log-probs as one {token: Logprob} per position, with a distractor token."""
    lps = [{t: SimpleNamespace(logprob=lp), 999: SimpleNamespace(logprob=-99.0)} for t, lp in zip(ids, logps)]
    return SimpleNamespace(index=index, token_ids=tuple(ids), logprobs=lps, finish_reason=finish, text=text)


def request(prompt, completions):
    return SimpleNamespace(prompt_token_ids=list(prompt), outputs=completions)


def two_prompts_outputs():
    """2 prompts x G=2; vLLM may list a request's completions out of index order."""
    return [
        request([11, 12, 13], [completion(1, [21], [-0.25], "length", "b"),
                               completion(0, [20, 22, 23], [-1.0, -2.0, -3.0], text="a")]),
        request([14], [completion(0, [24, 25], [-0.5, -0.75], "length", "c"), completion(1, [], [], text="d")]),
    ]


def check_rollout(r, device):
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "truncated", "group"):
        assert getattr(r, name).device == torch.device(device), name
    assert r.prompt_ids.dtype == r.completion_ids.dtype == torch.long and r.logprobs.dtype == torch.float32
    assert r.truncated.dtype == torch.bool


def test_rollout_from_vllm_outputs(fake_vllm):
    e = engine()
    e.llm.outputs = two_prompts_outputs()
    params = SamplingParams(max_new_tokens=3, top_k=0, stop_token_ids=[2])
    r = e.generate([[11, 12, 13], [14]], params, num_samples=2, seed=5)
    check_rollout(r, "cpu")
    assert r.prompt_ids.tolist() == [[11, 12, 13]] * 2 + [[PAD, PAD, 14]] * 2  # left-padded
    assert r.prompt_mask.tolist() == [[1, 1, 1]] * 2 + [[0, 0, 1]] * 2
    assert r.completion_ids.tolist() == [[20, 22, 23], [21, PAD, PAD], [24, 25, PAD], [PAD, PAD, PAD]]  # by index
    assert r.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert r.logprobs.tolist() == [[-1.0, -2.0, -3.0], [-0.25, 0, 0], [-0.5, -0.75, 0], [0, 0, 0]]
    assert r.truncated.tolist() == [False, True, True, False] and r.group.tolist() == [0, 0, 1, 1]
    assert r.texts == ["a", "b", "c", "d"]
    s = e.llm.sampling
    assert (s.n, s.max_tokens, s.top_k, s.seed, s.logprobs, s.stop_token_ids) == (2, 3, -1, 5, 0, [2])
    assert e.llm.requests == [{"prompt_token_ids": [11, 12, 13]}, {"prompt_token_ids": [14]}]


def test_rollout_texts_come_from_the_tokenizer(fake_vllm):
    tok = SimpleNamespace(batch_decode=lambda rows, skip_special_tokens: [f"{len(r)}:{skip_special_tokens}"
                                                                          for r in rows])
    e = engine(tokenizer=tok)
    e.llm.outputs = two_prompts_outputs()
    texts = e.generate([[11, 12, 13], [14]], SamplingParams(), num_samples=2).texts
    assert texts == ["3:True", "1:True", "2:True", "0:True"]


def test_all_empty_completions_still_give_one_column(fake_vllm):
    e = engine()
    e.llm.outputs = [request([4, 5], [completion(0, [], [])])]
    r = e.generate([[4, 5]], SamplingParams())
    assert r.completion_ids.tolist() == [[PAD]] and r.completion_mask.tolist() == [[0]]
    assert r.logprobs.tolist() == [[0.0]]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_rollout_goes_to_the_requested_device_under_a_meta_default(fake_vllm, device):
    """posttrain's device tests set torch's default device to `meta`: a tensor made without `device=` would land
    there. The Rollout must be on the engine's device; built on the CPU, it keeps its values when that is the CPU."""
    e = engine(device=device)
    e.llm.outputs = two_prompts_outputs()
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        r = e.generate([[11, 12, 13], [14]], SamplingParams(max_new_tokens=3), num_samples=2)
    finally:
        torch.set_default_device(previous)
    check_rollout(r, device)
    assert r.prompt_ids.shape == (4, 3) and r.completion_ids.shape == (4, 3) and r.group.shape == (4,)
    if device == "cpu":
        assert r.completion_ids.tolist() == [[20, 22, 23], [21, PAD, PAD], [24, 25, PAD], [PAD, PAD, PAD]]
        assert r.logprobs[0].tolist() == [-1.0, -2.0, -3.0] and r.group.tolist() == [0, 0, 1, 1]
        assert r.truncated.tolist() == [False, True, True, False]


def test_multi_turn_trajectories_through_the_vllm_engine(fake_vllm):
    """The environment loop drives vLLM as it drives the HF engine: each turn's requests are the trajectory's exact
    ids so far (which vLLM's prefix cache serves), its sampled ids and log-probs kept, the tool text unmasked."""
    from posttrain.envs.trajectory import env_segment_ids, run_trajectories
    from posttrain.online_config import EnvConfig
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    turns = [[10, 11, eot], [12, eot]]

    class TurnLLM(FakeLLM):
        def generate(self, requests, sampling, use_tqdm=True):
            self.seen = getattr(self, "seen", []) + [[r["prompt_token_ids"] for r in requests]]
            out = turns[len(self.seen) - 1]
            return [request(r["prompt_token_ids"], [completion(k, out, [-0.25] * len(out)) for k in range(sampling.n)])
                    for r in requests]

    vllm_engine_module = sys.modules["vllm"]
    vllm_engine_module.LLM = TurnLLM
    e = engine(tokenizer=tok)
    r = run_trajectories(e, tok, [{"prompt": "hi"}], EnvConfig(name="tiny_envs:Scripted"),
                         SamplingParams(max_new_tokens=8, stop_token_ids=[eot]), num_samples=2, seed=0)
    env = env_segment_ids(tok, [{"role": "tool", "content": "42"}])
    prompt = r.prompt_ids[0].tolist()
    assert e.llm.seen[0] == [prompt]  # the opening turn: one request with n = 2 samples
    assert e.llm.seen[1] == [prompt + turns[0] + env] * 2
    assert r.completion_ids[0].tolist() == turns[0] + env + turns[1]
    assert r.policy_mask[0].tolist() == [1, 1, 1] + [0] * len(env) + [1, 1]
    assert r.logprobs[0].tolist() == [-0.25] * 3 + [0.0] * len(env) + [-0.25] * 2
