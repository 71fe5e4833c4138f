"""Assistant-only masks, pad == eos, prompt/completion boundaries (pad == eos masking the real EOS: TRL #1623; prompt/completion boundary and template drift: TRL #2054)."""

from posttrain.data.chat import encode_messages, encode_prompt, encode_prompt_completion
from posttrain.data.collate import pad_batch
from posttrain.ops import IGNORE_INDEX


def trained_text(tok, enc):
    return tok.decode([lab for lab in enc.labels if lab != IGNORE_INDEX])


def test_multi_turn_labels_cover_assistant_turns_and_their_end_token_only(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    enc = encode_messages(tok, msgs)
    assert trained_text(tok, enc) == "yo<|im_end|>4<|im_end|>"
    # by hand: the rendered conversation has exactly 6 trained tokens (y, o, end, 4, end) -> 5
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == 5
    # where labels exist they equal the input ids (shifting happens once, later, in ops.shift_labels)
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(enc.labels, enc.input_ids))
    # the newline after each <|im_end|> is template text, not trained
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for k, i in enumerate(enc.input_ids[:-1]):
        if i == end and enc.labels[k] != IGNORE_INDEX:
            assert enc.labels[k + 1] == IGNORE_INDEX
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_pad_equals_eos_keeps_the_real_eos_label(tok):
    """pad == eos masking the real EOS: TRL #1623: last supervised label is eos; ignored labels after it equal the padding count exactly."""
    assert tok.pad_token_id == tok.eos_token_id
    short = encode_prompt_completion(tok, "a", "b")
    long = encode_prompt_completion(tok, "a much longer prompt", "and a longer answer")
    batch = pad_batch([short.input_ids, long.input_ids], tok.pad_token_id, "right", [short.labels, long.labels])
    row = batch["labels"][0].tolist()
    last = max(k for k, lab in enumerate(row) if lab != IGNORE_INDEX)
    assert row[last] == tok.eos_token_id
    padding = batch["input_ids"].shape[1] - len(short.input_ids)
    assert padding > 0
    assert row[last + 1 :] == [IGNORE_INDEX] * padding
    assert int((batch["attention_mask"][0] == 0).sum()) == padding


def test_prompt_ids_prefix_and_completion_decodes(tok):
    enc = encode_prompt_completion(tok, "What is 2+3?", "The answer is 5.")
    prompt_ids = encode_prompt(tok, "What is 2+3?")
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids  # the generator sees the same prompt ids
    assert enc.prompt_len == len(prompt_ids)
    assert trained_text(tok, enc) == "The answer is 5.<|im_end|>"
    # the same prompt in a messages record gives the same ids (SFT vs RL template drift, prompt/completion boundary and template drift: TRL #2054)
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "The answer is 5."}]
    as_chat = encode_messages(tok, msgs)
    assert as_chat.input_ids[: len(enc.input_ids)] == enc.input_ids
    assert as_chat.labels[: len(enc.labels)] == enc.labels
    assert tok.decode(as_chat.input_ids[len(enc.input_ids):]) == "\n"  # untrained template text after the turn


def test_plain_text_mode_has_exactly_one_bos_and_an_eos(tok):
    enc = encode_prompt_completion(tok, "2+3=", "5", use_chat=False)
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    assert enc.labels[-1] == tok.eos_token_id
    assert trained_text(tok, enc) == "5<|im_end|>"


def test_message_list_prompt_and_completion(tok):
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    enc = encode_prompt_completion(tok, prompt, [{"role": "assistant", "content": "a"}])
    assert trained_text(tok, enc) == "a<|im_end|>"
