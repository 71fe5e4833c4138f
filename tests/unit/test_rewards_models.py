"""Reward-model and LLM-judge rewards on a tiny random Llama: the score is read at the last real token whatever
the padding (reward read from the wrong token: transformers #35352, TRL #3750), with pad == eos."""

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from posttrain.rewards.model_rewards import LLMJudgeReward, RewardModelReward, last_token_index

WORDS = ["<unk>", "<s>", "</s>"] + (
    "the cat sat on mat dog is good bad yes no Yes No question answer user assistant : ? . "
    "a b c d e f g h i j k l m n o p q r s t u v w x y z one two three four five six seven eight nine ten"
).split()
CHAT = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}" \
       "{% if add_generation_prompt %}assistant :{% endif %}"
PROMPTS = ["the cat", "a dog is", "question : one two three four five six seven eight nine ten ?"]
COMPLETIONS = [" sat on mat </s>", " good", " answer : b c d e f g h i j k </s>"]  # two end in EOS == pad


def make_tokenizer(padding_side="right", chat_template=None):
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")  # pad == eos, as in our model
    tok.padding_side = padding_side
    tok.chat_template = chat_template
    return tok


def config(**kw):
    return LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, pad_token_id=WORDS.index("</s>"), **kw)


@pytest.fixture(scope="module")
def reward_model():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config(num_labels=1)).eval()


@pytest.fixture(scope="module")
def gpt2_reward_model():
    """Absolute positions: left padding without position ids from the mask shifts them and changes the score
    (RoPE is shift-invariant, so the Llama case alone would not catch that)."""
    torch.manual_seed(0)
    eos = WORDS.index("</s>")
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=1,
                     pad_token_id=eos, bos_token_id=eos, eos_token_id=eos)
    return GPT2ForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def causal_lm():
    torch.manual_seed(1)
    return LlamaForCausalLM(config()).eval()


def reference_scores(model, tok, texts=None, ids=None):
    """Each sequence alone, unpadded, through the model's own forward: no padding, so its last position is the
    last real token (pad_token_id unset so that a trailing EOS is not mistaken for padding)."""
    pad = model.config.pad_token_id
    model.config.pad_token_id = None
    ids = ids if ids is not None else [tok.encode(t) for t in texts]
    try:
        with torch.no_grad():
            return [model(input_ids=torch.tensor([row])).logits[0, 0].item() for row in ids]
    finally:
        model.config.pad_token_id = pad


def training_ids(tok, prompts, completions, use_chat):
    """The ids `posttrain rm` trains on (and RewardModelReward scores): prompt + completion + its end token."""
    from posttrain.data.chat import encode_prompt_completion

    return [encode_prompt_completion(tok, p, c, use_chat).input_ids for p, c in zip(prompts, completions)]


def test_last_token_index_from_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_model_score_is_the_same_padded_unpadded_and_batched(request, arch, side):
    reward_model = request.getfixturevalue({"llama": "reward_model", "gpt2": "gpt2_reward_model"}[arch])
    tok = make_tokenizer(side)
    expected = reference_scores(reward_model, tok, ids=training_ids(tok, PROMPTS, COMPLETIONS, use_chat=False))
    batched = RewardModelReward(reward_model, tok, batch_size=8)(PROMPTS, COMPLETIONS)  # padded to the longest
    alone = RewardModelReward(reward_model, tok, batch_size=1)(PROMPTS, COMPLETIONS)  # no padding at all
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_pooling_by_pad_token_id_would_be_wrong_here(reward_model):
    """The model's own pooling looks for pad_token_id and, with pad == eos, stops before a real final EOS:
    the score differs from ours, so the test above can fail."""
    tok = make_tokenizer("right")
    text = PROMPTS[0] + COMPLETIONS[0]
    with torch.no_grad():
        naive = reward_model(**tok([text], return_tensors="pt")).logits[0, 0].item()
    ours = RewardModelReward(reward_model, tok)([PROMPTS[0]], [COMPLETIONS[0]])[0]
    assert abs(naive - ours) > 1e-4


def test_reward_model_uses_the_chat_template(reward_model):
    tok = make_tokenizer("left", CHAT)
    rm = RewardModelReward(reward_model, tok, batch_size=2)
    templated = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                         tokenize=False) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert templated[0] == "user : the cat </s> assistant :  sat on mat </s> </s> "
    expected = reference_scores(reward_model, tok, ids=training_ids(tok, PROMPTS, COMPLETIONS, use_chat=True))
    # scored up to and including the end-of-turn token, as in training: the template's trailing text is not read
    assert len(training_ids(tok, PROMPTS[:1], COMPLETIONS[:1], True)[0]) < len(tok.encode(templated[0]))
    torch.testing.assert_close(torch.tensor(rm(PROMPTS, COMPLETIONS)), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    conversational = [[{"role": "user", "content": p}] for p in PROMPTS]
    torch.testing.assert_close(torch.tensor(rm(conversational, COMPLETIONS)), torch.tensor(expected))


def test_reward_model_rejects_a_multi_label_head():
    model = LlamaForSequenceClassification(config(num_labels=2))
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModelReward(model, make_tokenizer())


TEMPLATE = "question : {prompt} answer : {completion} ?"


def reference_judge(model, tok, prompts, completions, yes_ids, no_ids):
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = torch.tensor([tok.encode(TEMPLATE.format(prompt=p, completion=c))])
            probs = torch.softmax(model(input_ids=ids).logits[0, -1], -1)
            out.append((probs[yes_ids].sum() / (probs[yes_ids].sum() + probs[no_ids].sum())).item())
    return out


def test_judge_yes_no_tokens_are_the_single_token_variants():
    judge = LLMJudgeReward(LlamaForCausalLM(config()), make_tokenizer(), TEMPLATE)
    assert judge.yes_ids == [WORDS.index("yes"), WORDS.index("Yes")]  # " YES"/"YES" are <unk>: dropped
    assert judge.no_ids == [WORDS.index("no"), WORDS.index("No")]


@pytest.mark.parametrize("side", ["left", "right"])
def test_judge_matches_unpadded_reference_whatever_the_padding(causal_lm, side):
    tok = make_tokenizer(side)
    judge = LLMJudgeReward(causal_lm, tok, TEMPLATE, batch_size=8)
    expected = reference_judge(causal_lm, tok, PROMPTS, COMPLETIONS, judge.yes_ids, judge.no_ids)
    got = judge(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert all(0.0 < s < 1.0 for s in got)


class FixedLogits(torch.nn.Module):
    """Next-token logits chosen by hand: yes and Yes at log 1.5 each, no at log 1, No at -inf."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        logits = torch.full((*input_ids.shape, len(WORDS)), -30.0)
        logits[..., WORDS.index("yes")] = logits[..., WORDS.index("Yes")] = math.log(1.5)
        logits[..., WORDS.index("no")] = 0.0
        logits[..., WORDS.index("No")] = -math.inf
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_judge_score_is_p_yes_over_p_yes_plus_p_no():
    judge = LLMJudgeReward(FixedLogits(), make_tokenizer(), TEMPLATE)
    assert judge._keep == {"logits_to_keep": 1}
    assert judge(["the cat", "a"], ["sat", "b c d"]) == pytest.approx([0.75, 0.75], abs=1e-6)  # 3 / (3 + 1)


# ---- DPO's implicit reward model --------------------------------------------------------------------------------

def _completion_logp_by_loop(model, tok, prompt, completion):
    """Σ log p of the completion's tokens, one sequence at a time, full log-softmax (the slow, obvious way)."""
    from posttrain.data.chat import encode_prompt_completion

    enc = encode_prompt_completion(tok, prompt, completion, use_chat=True)
    ids = torch.tensor([enc.input_ids])
    logp = model(ids).logits.float().log_softmax(-1)[0]
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(enc.prompt_len, len(enc.input_ids)))


def test_implicit_reward_is_beta_times_the_completion_log_ratio():
    from posttrain.rewards.model_rewards import ImplicitReward

    tok = make_tokenizer(chat_template=CHAT)
    torch.manual_seed(1)
    policy, ref = LlamaForCausalLM(config()).eval(), LlamaForCausalLM(config()).eval()
    completions = [c.replace(" </s>", "") for c in COMPLETIONS]  # the template closes the turn itself
    got = ImplicitReward(policy, ref, tok, beta=0.25, batch_size=2)(PROMPTS, completions)
    with torch.no_grad():
        want = [0.25 * (_completion_logp_by_loop(policy, tok, p, c) - _completion_logp_by_loop(ref, tok, p, c))
                for p, c in zip(PROMPTS, completions)]
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(w, 3) for w in want)) == 3  # rows differ: padding did not blur them together
    assert ImplicitReward(ref, ref, tok, beta=0.25)(PROMPTS, completions) == pytest.approx([0.0] * 3, abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        ImplicitReward(policy, ref, tok, beta=0.0)


def test_a_causal_lm_is_refused_as_a_frozen_scalar_reward_model(tmp_path):
    """from_pretrained would add a random score head: a reward of noise, silently."""
    from posttrain.models.loading import load_reward_model

    LlamaForCausalLM(config()).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="not a reward model with a score head"):
        load_reward_model(str(tmp_path / "lm"), trainable=False)
    assert load_reward_model(str(tmp_path / "lm")).score.out_features == 1  # `posttrain rm` still starts from one
