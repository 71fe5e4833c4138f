"""Chat templates and token-exact encodings with assistant-only loss masks.

The rendered conversation is cut into character segments (template text, assistant turns), each segment is
tokenized on its own and the ids are concatenated. That makes three things exact by construction:
the prompt ids are a prefix of the full ids (prompt/completion boundary and template drift: TRL #2054), the labels cover exactly the assistant turns,
and the prompt ids used in SFT, generation and scoring are the same list.

An assistant turn is trained up to and including its end-of-turn token (`<|im_end|>`, or EOS): when the
tokenizer's pad token equals its EOS token, that EOS is still a real token with a label (pad == eos masking the real EOS: TRL #1623);
padding is never decided by comparing ids with pad_token_id.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.ops import IGNORE_INDEX

# A named fallback for tokenizers that ship no template: ChatML, the format SmolLM2 and Qwen use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACK_TEMPLATES = {"chatml": CHATML_TEMPLATE}


@dataclass
class Encoded:
    """input_ids and labels of one example (labels = input ids where trained, IGNORE_INDEX elsewhere)."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int = 0  # tokens before the first trained token (for prompt/completion examples)

    def __len__(self) -> int:
        return len(self.input_ids)


def ensure_chat_template(tokenizer, template: str | None = None) -> None:
    """Use `template` (a name in FALLBACK_TEMPLATES or Jinja text) or keep the tokenizer's own; ChatML if none."""
    if template:
        tokenizer.chat_template = FALLBACK_TEMPLATES.get(template, template)
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that close an assistant turn: EOS and the template's end-of-turn marker when it is one token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return ids


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the chat template writes it. A template that rejects the `tool` role (strict role
    alternation) gets each tool result as a user turn wrapped in <tool_response> tags, the Qwen/Hermes form."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:
        if not any(m.get("role") == "tool" for m in messages):
            raise
    as_user = [{"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
               if m.get("role") == "tool" else m for m in messages]
    return tokenizer.apply_chat_template(as_user, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenize(tokenizer, text: str) -> list[int]:
    # Templates write their own BOS/special tokens into the text; adding them again would double the BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the [start, end) character span of every assistant turn in it (tool results and
    other non-assistant turns lie outside every span, so they get no loss)."""
    full = render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(before):
            raise ValueError("the chat template does not render conversations incrementally; cannot mask turns")
        spans.append((len(before), len(upto)))
    return full, spans


def _trim_after_end_of_turn(ids: list[int], stop_ids: set[int]) -> tuple[list[int], list[int]]:
    """Split a turn's ids into (trained, untrained tail): the tail is template text after the end-of-turn token."""
    for k, tid in enumerate(ids):
        if tid in stop_ids:
            return ids[: k + 1], ids[k + 1 :]
    return ids, []


def encode_messages(tokenizer, messages: list[dict]) -> Encoded:
    """Encode a (multi-turn) conversation; labels on assistant turns and their end-of-turn token only. Tool calls
    in TRL's `tool_calls` field become <tool_call> text (`data/tool_format.py`); tool results are not trained."""
    from posttrain.data.tool_format import tool_calls_as_text

    messages = tool_calls_as_text(messages)
    full, spans = _assistant_spans(tokenizer, messages)
    stop_ids = end_of_turn_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in spans:
        context = _tokenize(tokenizer, full[cursor:start])
        ids += context
        labels += [IGNORE_INDEX] * len(context)
        trained, tail = _trim_after_end_of_turn(_tokenize(tokenizer, full[start:end]), stop_ids)
        ids += trained + tail
        labels += trained + [IGNORE_INDEX] * len(tail)
        cursor = end
    rest = _tokenize(tokenizer, full[cursor:])
    ids += rest
    labels += [IGNORE_INDEX] * len(rest)
    first = next((k for k, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    return Encoded(ids, labels, prompt_len=first)


def as_messages(prompt, role: str = "user") -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": role, "content": prompt}]


def encode_prompt(tokenizer, prompt, use_chat: bool = True) -> list[int]:
    """Prompt ids exactly as generation and scoring see them (chat template + generation prompt)."""
    if use_chat:
        return _tokenize(tokenizer, render(tokenizer, as_messages(prompt), add_generation_prompt=True))
    ids = _tokenize(tokenizer, prompt)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None and (not ids or ids[0] != bos) else []) + ids


def encode_prompt_completion(tokenizer, prompt, completion, use_chat: bool = True) -> Encoded:
    """prompt (str or messages) + completion (str or assistant message list) -> ids with labels on the completion.

    The completion ends with the end-of-turn token (chat) or EOS (plain text); both are trained on.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, use_chat)
    if use_chat:
        completion_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        convo = as_messages(prompt) + completion_msgs
        full = render(tokenizer, convo)
        head = render(tokenizer, as_messages(prompt), add_generation_prompt=True)
        if not full.startswith(head):
            raise ValueError("the chat template's generation prompt is not a prefix of the rendered conversation")
        trained, _tail = _trim_after_end_of_turn(_tokenize(tokenizer, full[len(head):]), end_of_turn_ids(tokenizer))
    else:
        trained = _tokenize(tokenizer, completion) + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + trained, [IGNORE_INDEX] * len(prompt_ids) + trained, prompt_len=len(prompt_ids))


def prompt_text(prompt) -> str:
    """A prompt as text for rule-based rewards: a string as it is, a single user turn as its content, and a longer
    conversation as "role: content" lines — the roles kept, so a system turn is not read as the question. The
    messages themselves travel in the `raw_prompt` column."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
