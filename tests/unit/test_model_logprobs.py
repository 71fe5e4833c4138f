"""Per-token log-probs from the model: shift (logits/labels off by one: TRL #3681) and padding invariance (left padding without position ids: OpenRLHF #217, TRL #6800)."""

import pytest
import torch

from posttrain.data.collate import pad_batch
from posttrain.models.forward import last_token_index, reward_scores, token_logps
from tiny import tiny_llama


def tiny_gpt2(vocab=104):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()


MODELS = {"llama": lambda: tiny_llama().eval(), "gpt2": tiny_gpt2}


@pytest.mark.parametrize("arch", MODELS)
def test_logprobs_equal_brute_force_prefix_loop(arch):
    model = MODELS[arch]()
    ids = torch.tensor([[5, 17, 30, 8, 99, 41]])
    got = token_logps(model, ids, torch.ones_like(ids))
    assert got[0, 0].item() == 0.0  # the first token has no prediction
    for t in range(1, ids.shape[1]):
        with torch.no_grad():
            logits = model(ids[:, :t]).logits[0, -1]
        expected = torch.log_softmax(logits.float(), -1)[ids[0, t]]
        assert got[0, t].item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("arch", MODELS)
def test_same_sequence_alone_left_and_right_padded(arch):
    model = MODELS[arch]()
    seq, other = [7, 12, 40, 3, 55], [9, 9, 1, 2, 3, 4, 5, 6, 70]
    with torch.no_grad():
        alone = token_logps(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0]
        for side in ("left", "right"):
            b = pad_batch([seq, other], pad_id=3, side=side)
            got = token_logps(model, b["input_ids"], b["attention_mask"])[0]
            got = got[-len(seq):] if side == "left" else got[: len(seq)]
            assert torch.allclose(got, alone, atol=1e-5), side


def test_last_token_index_any_padding_side():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 2, 3]


def _tiny_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=104, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=3)
    return LlamaForSequenceClassification(cfg).eval()


def test_reward_read_at_last_real_token_whatever_the_padding():
    """reward read from the wrong token: transformers #35352, TRL #3750: left, right, no padding and batched with a longer sequence give the same score,
    even when the sequence ends with the pad id (pad == eos) and has an EOS in the middle."""
    model = _tiny_classifier()
    seq = [10, 3, 20, 21, 3]  # eos (== pad id 3) in the middle and at the end
    longer = [5] * 12
    with torch.no_grad():
        alone = reward_scores(model, torch.tensor([seq]), torch.ones(1, 5, dtype=torch.long))[0]
        for side in ("left", "right"):
            b = pad_batch([seq, longer], pad_id=3, side=side)
            assert reward_scores(model, b["input_ids"], b["attention_mask"])[0].item() == pytest.approx(alone.item(), abs=1e-5)
        # the classic bug: skipping every token equal to the pad id reads the token before the final EOS
        hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state
        assert abs(model.score(hidden[0, 3]).item() - alone.item()) > 1e-3
