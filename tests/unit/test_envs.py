"""Multi-turn rollouts (posttrain/envs/): token-exact trajectories, masks over the policy's tokens only, tools,
timeouts, user environments, the sampler's log-probs recomputed by the trainer, SFT masks of tool turns, GAE."""

import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain.data.chat import encode_messages
from posttrain.data.tool_format import format_tool_call, parse_tool_calls, tool_calls_as_text
from posttrain.envs.tools import ToolEnvironment, calculator
from posttrain.envs.trajectory import env_segment_ids, run_trajectories
from posttrain.online_config import EnvConfig
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFGenerator
from posttrain.types import Rollout
from tiny import tiny_llama, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from multiturn_kv import CountingModel, ReEncoding  # noqa: E402  (the bench's prefill counter and baseline)

TOK = tiny_tokenizer()
EOT = TOK.convert_tokens_to_ids("<|im_end|>")


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


class ScriptedEngine:
    """Returns turn k's scripted token ids for every row of its k-th call, log-prob -0.5 each."""

    def __init__(self, turns):
        self.turns, self.calls, self.contexts = [list(t) for t in turns], 0, []

    def generate(self, prompt_ids, params, num_samples=1, seed=None):
        self.contexts.append([list(p) for p in prompt_ids])
        out = self.turns[self.calls]
        self.calls += 1
        n = len(prompt_ids) * num_samples
        comp = torch.tensor([out] * n)
        return Rollout(prompt_ids=None, prompt_mask=None, completion_ids=comp, completion_mask=torch.ones_like(comp),
                       logprobs=torch.full(comp.shape, -0.5), truncated=torch.tensor([out[-1] != EOT] * n),
                       group=torch.arange(len(prompt_ids)).repeat_interleave(num_samples))


def scripted(turns, env="tiny_envs:Scripted", **cfg):
    engine = ScriptedEngine(turns)
    rollout = run_trajectories(engine, TOK, [{"prompt": "hi"}], EnvConfig(name=env, **cfg),
                               SamplingParams(max_new_tokens=64), num_samples=2, seed=0)
    return engine, rollout


def test_mask_covers_exactly_the_policys_tokens():
    turn1, turn2 = ids("ab") + [EOT], ids("c") + [EOT]
    engine, r = scripted([turn1, turn2])
    env = env_segment_ids(TOK, [{"role": "tool", "content": "42"}])
    assert TOK.decode(env) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    expected = turn1 + env + turn2
    for row in range(2):
        assert r.completion_ids[row].tolist() == expected
        assert r.policy_mask[row].tolist() == [1] * 3 + [0] * len(env) + [1] * 2
        assert r.completion_mask[row].tolist() == [1] * len(expected)
        assert r.logprobs[row].tolist() == [-0.5] * 3 + [0.0] * len(env) + [-0.5] * 2
    # the second turn was sampled from the exact ids so far, not from a re-rendered conversation
    assert engine.contexts[1][0] == r.prompt_ids[0].tolist() + turn1 + env
    assert r.info["env_reward"] == [1.0, 1.0] and r.texts == ["c", "c"]
    assert r.info["metrics"]["env/turns_mean"] == 2.0
    assert r.info["metrics"]["env/env_token_fraction"] == pytest.approx(len(env) / len(expected))


def test_sampled_ids_are_kept_where_retokenising_the_text_would_change_them():
    spelled = TOK.convert_tokens_to_ids(list("<|im_end|>"))  # the marker spelled out character by character
    assert len(spelled) == 10 and ids(TOK.decode(spelled)) == [EOT]  # re-tokenising the text gives other ids
    _, r = scripted([spelled + [EOT], ids("x") + [EOT]])
    assert r.completion_ids[0, : len(spelled) + 1].tolist() == spelled + [EOT]


def test_collector_loss_mask_is_the_policy_mask(tmp_path, tiny_dir):
    from posttrain.train.collector import RolloutCollector
    from posttrain.train.online_rewards import build_rewards
    from posttrain.models.loading import load_tokenizer
    from tiny import run_config, write_jsonl

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {i}", "answer": str(i)} for i in range(8)])
    cfg = run_config("grpo", tmp_path / "run", tiny_dir, data, "algo.env.name=tiny_envs:Scripted",
                     "algo.reward.functions=[]", "algo.sampling.max_new_tokens=4", "algo.sampling.prompts_per_step=2",
                     "algo.sampling.num_generations=2")
    model, tok = tiny_llama(), load_tokenizer(tiny_dir)
    from posttrain.data.formats import load_dataset_records

    records = load_dataset_records(str(data), "prompts")
    collector = RolloutCollector(cfg, model, tok, records, build_rewards(cfg, model, tok, None, "cpu").runner)
    turn1, turn2 = ids("ab") + [EOT], ids("c") + [EOT]
    collector.engine = ScriptedEngine([turn1, turn2])
    collector.engine.weight_copies = 0
    batch = collector.sample(0)
    env = len(env_segment_ids(TOK, [{"role": "tool", "content": "42"}]))
    expected = torch.tensor([[1] * 3 + [0] * env + [1] * 2] * 4)
    assert torch.equal(batch.loss_mask, expected) and torch.equal(batch.completion_mask, torch.ones_like(expected))
    assert torch.equal(batch.attention_mask[:, batch.prompt_width:], batch.completion_mask)
    assert batch.rewards.tolist() == [1.0] * 4  # the environment's reward, no reward functions
    assert batch.extra["metrics"]["env/turns_mean"] == 2.0 and len(batch.extra["transcripts"]) == 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_trainer_logps_equal_the_samplers_on_the_policy_tokens(temperature):
    from posttrain.models.shared_prefix import completion_logps
    from posttrain.types import RolloutBatch

    model = tiny_llama(seed=3).eval()
    engine = HFGenerator(model, TOK.pad_token_id, TOK)
    records = [{"prompt": "say 1"}, {"prompt": "tell me more please"}]
    # a random model rarely emits <|im_end|>: half the vocabulary ends a turn, so turns end and tools answer
    params = SamplingParams(max_new_tokens=6, temperature=temperature, stop_token_ids=[EOT, *range(4, 60)])
    r = run_trajectories(engine, TOK, records, EnvConfig(name="tiny_envs:Scripted", options={"replies": ["4", "5"]},
                                                        max_turns=3, max_total_tokens=80), params, 3, seed=1)
    batch = RolloutBatch(torch.cat([r.prompt_ids, r.completion_ids], 1), torch.cat([r.prompt_mask, r.completion_mask], 1),
                         r.completion_mask, r.policy_mask, torch.zeros(6), r.group, r.truncated, r.prompt_ids.shape[1],
                         r.texts, records, TOK.pad_token_id)
    assert int((r.completion_mask - r.policy_mask).sum()) > 0
    policy = r.policy_mask.bool()
    for share in (True, False):
        with torch.no_grad():
            logp = completion_logps(model, batch, torch.arange(6), 1024, temperature=temperature or 1.0,
                                    share_prompt=share)
        # greedy decoding reports the log-prob at temperature 1, as the trainer scores it
        assert torch.allclose(logp[policy], r.logprobs[policy], atol=2e-5), (logp[policy] - r.logprobs[policy]).abs().max()


def test_a_hanging_environment_is_cut_at_its_timeout_and_counted():
    start = time.monotonic()
    _, r = scripted([ids("a") + [EOT]], env="tiny_envs:Hangs", turn_timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert r.info["metrics"]["env/errors"] == 2.0 and all(v != v for v in r.info["env_reward"])  # NaN: no loss
    with pytest.raises(RuntimeError, match="broken environment"):
        scripted([ids("a") + [EOT]], env="tiny_envs:Raises", on_error="raise")


def test_a_hanging_tool_is_cut_and_the_policy_told():
    env = ToolEnvironment(tools=["python"], tool_timeout_s=0.5)
    start = time.monotonic()
    step = env.step(format_tool_call("python", {"code": "while True: pass"}))
    assert time.monotonic() - start < 3
    assert step.messages[0]["content"] == "error: timed out" and step.info["tool_timeouts"] == 1


def test_tool_environment_runs_the_calculator_and_reports_errors():
    env = ToolEnvironment()
    opening = env.reset({"prompt": "What is 2 * 3?"})
    assert opening[0]["role"] == "system" and "calculator(" in opening[0]["content"]
    step = env.step("let me see " + format_tool_call("calculator", {"expression": "347 * 862"}))
    assert step.messages == [{"role": "tool", "name": "calculator", "content": "299114"}] and not step.done
    step = env.step(format_tool_call("calc", {"x": 1}) + "<tool_call>{oops</tool_call>")
    assert step.info["tool_errors"] == 2 and step.messages[0]["content"].startswith("error: unknown tool")
    assert env.step("The answer is 6.").done


def test_parse_tool_calls_and_calculator():
    calls = parse_tool_calls('a <tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call> '
                             '<tool_call>[1]</tool_call>')
    assert calls[0].name == "f" and calls[0].arguments == {"x": 1} and calls[1].error
    assert calculator("(2 + 3) * 4") == "20" and calculator("7 / 2") == "3.5" and calculator("-2 ** 3") == "-8"
    with pytest.raises(ValueError):
        calculator("__import__('os')")
    with pytest.raises(ValueError):
        calculator("9 ** 99999")


def test_user_environment_loads_as_module_class():
    from posttrain.envs.base import load_environment

    assert load_environment("tiny_envs:TwoTurnVowels").__name__ == "TwoTurnVowels"
    with pytest.raises(ValueError, match="cannot load"):
        load_environment("tiny_envs:Missing")


def test_sft_on_tool_conversations_masks_the_tool_results():
    from posttrain.data.tasks import make_task_records

    messages = make_task_records("arithmetic_tools", "sft", n=1)[0]["messages"]
    enc = encode_messages(TOK, messages)
    trained = TOK.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])
    a, b = messages[1]["content"].split()[2], messages[1]["content"].split()[4].rstrip("?")
    product = int(a) * int(b)
    assert trained == (format_tool_call("calculator", {"expression": f"{a} * {b}"}) + "<|im_end|>"
                       + f"The answer is {product}.<|im_end|>")
    assert tool_calls_as_text(messages)[2]["content"].startswith("<tool_call>")
    assert str(product) in TOK.decode(enc.input_ids)  # the tool's result is in the context, never in the loss


def test_gae_over_gaps_equals_gae_over_the_policy_tokens_alone():
    from posttrain.algos.advantages import gae

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 1, 0, 0]])
    rewards, values = torch.randn(2, 7), torch.randn(2, 7)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    for row in range(2):
        keep = mask[row].bool()
        ref_adv, ref_ret = gae(rewards[row][keep][None], values[row][keep][None], torch.ones(1, int(keep.sum())), 0.9, 0.8)
        assert torch.allclose(adv[row][keep], ref_adv[0]) and torch.allclose(ret[row][keep], ref_ret[0])
        assert (adv[row][~keep] == 0).all()
    # the contiguous-mask case is the loop of the GAE paper (eq. 16) written out
    m = torch.tensor([[1, 1, 1, 0]])
    r, v = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.2, 0.1, 0.0]])
    a, _ = gae(r, v, m, 1.0, 0.5)
    d = [0 + 0.2 - 0.5, 0 + 0.1 - 0.2, 1 + 0 - 0.1]
    assert torch.allclose(a[0, :3], torch.tensor([d[0] + 0.5 * d[1] + 0.25 * d[2], d[1] + 0.5 * d[2], d[2]]))


def test_sft_records_with_tool_calls_validate_and_bad_ones_name_the_field():
    from posttrain.data.formats import DataError, Record, validate_sft
    from posttrain.data.tasks import make_task_records

    validate_sft(Record(make_task_records("arithmetic_tools", "sft", n=1)[0], "t.jsonl:1"))
    bad = {"messages": [{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]},
                        {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'messages\[0\].tool_calls': only an assistant"):
        validate_sft(Record(bad, "t.jsonl:2"))
    no_name = {"messages": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}
    with pytest.raises(DataError, match=r"messages\[1\].tool_calls\[0\]"):
        validate_sft(Record(no_name, "t.jsonl:3"))


def test_dynamic_sampling_reselects_per_row_extras_with_their_rows():
    """select_rows / concat_batches carry every per-row extra (sampler log-probs, transcripts, per-function
    scores) with its rows, token-level ones padded to the new width."""
    from posttrain.data.collate import concat_batches, select_rows
    from posttrain.types import RolloutBatch

    def batch(n, width, base):
        return RolloutBatch(torch.zeros(n, 2 + width, dtype=torch.long), torch.ones(n, 2 + width),
                            torch.ones(n, width), torch.ones(n, width), torch.zeros(n), torch.arange(n), torch.zeros(n, dtype=torch.bool),
                            2, [""] * n, [""] * n, extra={"reward_valid": torch.ones(n, dtype=torch.bool),
                            "sampler_logp": base + torch.arange(n * width, dtype=torch.float32).view(n, width),
                            "transcripts": [f"{base}:{i}" for i in range(n)], "score/numeric": base + torch.arange(n) / 10,
                            "metrics": {"m": base}})

    a, b = batch(3, 2, 0.0), batch(2, 3, 100.0)
    kept = select_rows(a, torch.tensor([True, False, True]))
    assert kept.extra["transcripts"] == ["0.0:0", "0.0:2"] and kept.extra["score/numeric"].tolist() == pytest.approx([0.0, 0.2])
    assert kept.extra["sampler_logp"].tolist() == [[0.0, 1.0], [4.0, 5.0]]
    both = concat_batches([kept, b])
    assert both.extra["sampler_logp"].tolist() == [[0.0, 1.0, 0.0], [4.0, 5.0, 0.0], [100.0, 101.0, 102.0],
                                                    [103.0, 104.0, 105.0]]
    assert both.extra["transcripts"] == ["0.0:0", "0.0:2", "100.0:0", "100.0:1"]
    assert both.extra["metrics"] == {"m": 0.0} and both.extra["reward_valid"].tolist() == [True] * 4


def _context_dependent_tiny(seed=5):
    """The tiny model with its decoder layers' weights scaled up: at the default initialisation the residual
    stream is the input embedding, so greedy decoding repeats the last token and every turn has the same length.
    Scaled, the next token depends on the context and turns end at different steps."""
    model = tiny_llama(seed=seed).eval()
    with torch.no_grad():
        for weight in model.model.layers.parameters():
            if weight.dim() == 2:
                weight.mul_(8.0)
    return model


def _turn_lengths(batch):
    """Per row, the lengths of its runs of policy tokens (one per assistant turn)."""
    lengths = []
    for row in batch.policy_mask.tolist():
        runs, count = [], 0
        for flag in row + [0]:
            if flag:
                count += 1
            elif count:
                runs, count = runs + [count], 0
        lengths.append(runs)
    return lengths


def test_kept_kv_cache_gives_the_tokens_of_re_encoding_and_encodes_only_the_new_text():
    model = CountingModel(_context_dependent_tiny())
    engine = HFGenerator(model, TOK.pad_token_id, TOK)
    records = [{"prompt": "say 1"}, {"prompt": "tell me more please, at length"}, {"prompt": "x"}]
    # batch_size 2 puts the prompts in two chunks; 8 new tokens per turn outgrow the cache's first capacity
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[EOT, 34, 27, 100, 11],
                            batch_size=2)
    cfg = EnvConfig(name="tiny_envs:Scripted", options={"replies": ["4", "five 5", "6"]}, max_turns=4,
                    max_total_tokens=160, cut_turns="answer")
    kept = run_trajectories(engine, TOK, records, cfg, params, 2, seed=0)
    kept_prefill, model.prefilled = model.prefilled, 0
    dense = run_trajectories(ReEncoding(engine), TOK, records, cfg, params, 2, seed=0)
    lengths = _turn_lengths(kept)
    # rows that end a turn at different steps leave holes in the kept rows' caches: the case worth testing
    assert len({n for row in lengths for n in row}) >= 3 and all(len(row) >= 3 for row in lengths), lengths
    assert torch.equal(kept.completion_ids, dense.completion_ids) and torch.equal(kept.policy_mask, dense.policy_mask)
    assert torch.allclose(kept.logprobs, dense.logprobs, atol=2e-5)
    assert kept.info["metrics"]["env/kv_reused_fraction"] > 0.5
    # re-encoding prefills every earlier turn again; the session only each row's new tokens
    assert kept_prefill < 0.6 * model.prefilled, (kept_prefill, model.prefilled)


def test_a_context_that_does_not_extend_the_cache_is_re_encoded_and_counted():
    from posttrain.rollout.turn_session import TurnSession

    engine = HFGenerator(tiny_llama(seed=5).eval(), TOK.pad_token_id, TOK)
    params = SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=[EOT])
    session = TurnSession(engine)
    first = session.generate([ids("say 1")], params)
    other = ids("something else entirely")  # not the first call's context and completion
    again = session.generate([other], params, rows=[0])
    assert session.reencoded_turns == 1 and first.completion_ids.shape[0] == 1
    assert torch.equal(again.completion_ids, engine.generate([other], params).completion_ids)
