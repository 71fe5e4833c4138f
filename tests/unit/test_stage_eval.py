"""The pipeline's KL to the start model: never negative, zero against itself, and the exact KL in expectation."""

import pytest
import torch

from posttrain.data.chat import encode_prompt
from posttrain.data.formats import Record
from posttrain.stage_eval import sequence_kl
from tiny import tiny_llama, tiny_tokenizer


def _records(n):
    return [Record({"prompt": [{"role": "user", "content": "2+3"}]}, f"mem:{i}") for i in range(n)]


def test_one_token_sequence_kl_matches_the_exact_kl():
    tok = tiny_tokenizer()
    policy, reference = tiny_llama(seed=1).eval(), tiny_llama(seed=2).eval()
    ids = torch.tensor([encode_prompt(tok, _records(1)[0].data["prompt"])])
    with torch.no_grad():
        logp = policy(ids).logits[0, -1].log_softmax(-1)
        logq = reference(ids).logits[0, -1].log_softmax(-1)
    exact = float((logp.exp() * (logp - logq)).sum())  # KL of the first (only) token's distribution
    estimate = sequence_kl(policy, reference, tok, _records(512), max_new_tokens=1, batch_size=128)
    assert exact > 0.01 and estimate == pytest.approx(exact, rel=0.2)
    assert sequence_kl(policy, policy, tok, _records(16), max_new_tokens=4) == 0.0
