"""Rewards computed by models: a sequence-classification reward model, DPO's implicit reward model, and an
LLM judge asked a yes/no question.

All are callables with the reward contract and ``batched = True`` (the runner calls them once per batch).
The scalar reward model and the judge read the model at the LAST NON-PAD token, found from the attention mask: with
pad == eos a real EOS at the end of a sequence looks like padding, so ``pad_token_id`` must not be trusted; and both
pass position ids computed from the mask, so left padding does not shift RoPE positions (the default positions
0..T-1 would start a left-padded row's first real token at its pad count).
"""

from __future__ import annotations

import inspect
import math

YES_VARIANTS = (" yes", "yes", " Yes", "Yes", " YES", "YES")
NO_VARIANTS = (" no", "no", " No", "No", " NO", "NO")


from posttrain.devices import module_device
from posttrain.models.forward import last_token_index  # the one definition (models/ is below rewards/)


def _texts(tokenizer, prompts, completions, generation_prompt: bool):
    """Chat-templated texts when the tokenizer has a template (then without added special tokens: the
    template writes its own BOS), else plain prompt + completion with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if completion is not None:
                messages.append({"role": "assistant", "content": completion})
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=generation_prompt))
        return texts, False
    if any(isinstance(p, list) for p in prompts):
        raise ValueError("conversational prompts need a tokenizer with a chat template")
    return [p + (c or "") for p, c in zip(prompts, completions, strict=True)], True


def _encode(tokenizer, texts, add_special_tokens: bool, max_length, device, padding_side=None):
    import torch

    side = {"padding_side": padding_side} if padding_side else {}
    with torch.device("cpu"):  # the tokenizer builds its tensors with torch's default device: stage them on the host
        batch = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                          add_special_tokens=add_special_tokens, return_tensors="pt", **side)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if not bool(mask.any(-1).all()):
        raise ValueError("an input encodes to zero tokens")
    return ids, mask, torch.clamp(mask.long().cumsum(-1) - 1, min=0)  # position ids from the mask


def _placed(model, device):
    """The frozen model on `device` for one call (`model.offload_frozen` keeps it on the CPU in between)."""
    from posttrain.models.loading import frozen_on

    return frozen_on(model, device)


class RewardModelReward:
    """Scores ``prompt + completion`` with an ``AutoModelForSequenceClassification`` (num_labels=1).

    `forward.reward_scores` runs the backbone with the mask's position ids and applies the ``score`` head to the
    hidden state of the last non-pad token: the model's own pooling locates that token through ``pad_token_id``
    and is wrong when pad == eos. Works for decoder classifiers with a ``score`` head (Llama, Qwen, Mistral,
    GPT-2 ...), PEFT-wrapped or not.
    """

    batched = True

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None, device=None):
        """device: where its forward passes run (default: where the model is)."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        # checked here rather than at the first batch: `reward_scores` reads exactly these two attributes
        head = getattr(inner, "score", None)
        backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
        if head is None or backbone is None:
            raise ValueError(f"{type(inner).__name__} has no `score` head and base model: not a decoder reward model")
        if getattr(inner.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model has num_labels=1, got {inner.config.num_labels}")
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.device = device if device is not None else module_device(model)
        self.__name__ = "reward_model"

    def __call__(self, prompts, completions, raw_prompt=None, **_) -> list[float]:
        """Scores of prompt + completion, tokenized exactly as `posttrain rm` tokenized its training pairs
        (chat template, completion up to and including its end-of-turn token), so the score is read at the
        token the head was trained on. raw_prompt (the dataset's message lists, passed by the trainers) is
        used over the flattened `prompts` when given."""
        import torch

        from posttrain.data.chat import encode_prompt_completion
        from posttrain.data.collate import pad_batch
        from posttrain.models.forward import reward_scores

        use_chat = bool(getattr(self.tokenizer, "chat_template", None))
        source = prompts if raw_prompt is None else raw_prompt
        ids = [encode_prompt_completion(self.tokenizer, p, c, use_chat).input_ids for p, c in zip(source, completions, strict=True)]
        if self.max_length:
            ids = [row[-self.max_length :] for row in ids]
        scores: list[float] = []
        with torch.no_grad(), _placed(self.model, self.device):
            for start in range(0, len(ids), self.batch_size):
                batch = pad_batch(ids[start : start + self.batch_size], self.tokenizer.pad_token_id or 0, "right")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                scores += reward_scores(self.model, batch["input_ids"], batch["attention_mask"]).tolist()
        return scores


class ImplicitReward:
    """DPO's implicit reward model: r(x, y) = β Σ_t [log πθ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)] over the
    completion's tokens (Rafailov et al. 2023 eq. 5; RewardBench scores DPO models as reward models this way).

    ``model`` is a causal LM trained by `posttrain dpo` on comparisons, ``ref_model`` the reference it was
    trained against, ``beta`` its β: the same Bradley–Terry model of preferences as a scalar reward model, with the
    reward parameterised by the LM's own next-token predictions instead of a new head on the last token.
    Completions are tokenized as DPO tokenized its pairs (chat template, end-of-turn token included), and the
    log-probs are chunked over the vocabulary (never a (B, T, V) fp32 log-softmax).
    """

    batched = True

    def __init__(self, model, ref_model, tokenizer, beta: float, batch_size: int = 16, autocast=None,
                 use_chat: bool = True, ref_context=None, device=None):
        """ref_context: entered around the reference's forward pass — `adapter_disabled(policy)` makes a LoRA
        policy with its adapter off the reference, with no copy in memory. device: where the forward passes run
        (default: where `model` is; frozen models offloaded to the CPU are moved there for the call)."""
        import contextlib

        if beta <= 0:
            raise ValueError(f"an implicit reward needs beta > 0, got {beta}")
        self.model, self.ref_model, self.tokenizer, self.beta, self.batch_size = model, ref_model, tokenizer, beta, batch_size
        self.use_chat = use_chat and bool(getattr(tokenizer, "chat_template", None))
        self.autocast = autocast or contextlib.nullcontext
        self.ref_context = ref_context or contextlib.nullcontext
        self.device = device if device is not None else module_device(model)
        self.__name__ = "reward_model"

    def __call__(self, prompts, completions, raw_prompt=None, **_) -> list[float]:
        """raw_prompt: the prompts as the dataset holds them (message lists), which the trainers pass; `prompts`
        are flattened to text for rule-based rewards and would lose system and earlier turns."""
        import torch

        from posttrain.data.chat import encode_prompt_completion
        from posttrain.data.collate import pad_batch
        from posttrain.models.forward import token_logps

        source = prompts if raw_prompt is None else raw_prompt
        encoded = [encode_prompt_completion(self.tokenizer, p, c, self.use_chat) for p, c in zip(source, completions, strict=True)]
        scores: list[float] = []
        with torch.no_grad(), self.autocast(), _placed(self.model, self.device), _placed(self.ref_model, self.device):
            for start in range(0, len(encoded), self.batch_size):
                rows = encoded[start : start + self.batch_size]
                batch = pad_batch([e.input_ids for e in rows], self.tokenizer.pad_token_id or 0, "right",
                                  labels=[e.labels for e in rows])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                policy = token_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                with self.ref_context():
                    reference = token_logps(self.ref_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                scores += (self.beta * (policy - reference).sum(-1)).float().tolist()
        return scores


def dpo_run_settings(model_dir: str) -> dict:
    """β, reference and chat templating of the `posttrain dpo` run that wrote `model_dir` (RUN/final), read from
    RUN/config.yaml; {} when there is none (a model from elsewhere: then they must be given)."""
    from pathlib import Path

    import yaml

    config = Path(model_dir).parent / "config.yaml"
    if not config.is_file():
        return {}
    tree = yaml.safe_load(config.read_text()) or {}
    algo, model = tree.get("algo") or {}, tree.get("model") or {}
    if algo.get("loss_type") in ("simpo", "orpo"):  # trained without a reference: no log-ratio reward to read
        raise ValueError(f"{model_dir} was trained with loss_type={algo['loss_type']}, which has no reference model; "
                         "an implicit reward β·log πθ/π_ref needs a reference-based DPO loss")
    out = {"beta": algo.get("beta"), "ref": algo.get("ref_model") or model.get("name_or_path"),
           "use_chat": algo.get("use_chat_template", True)}
    return {k: v for k, v in out.items() if v is not None}


def _conversation_text(tokenizer, prompt) -> str:
    """A dataset prompt as the judge's question shows it: a string as it is; a message list as "role: content"
    lines, since the flattened text the trainers pass as `prompts` drops the roles (and so the line between system
    and user turns). Not the chat template: its turn markers inside the judge's own user turn would end that turn
    early (ChatML's <|im_end|>)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _single_token_ids(tokenizer, variants) -> list[int]:
    ids = []
    for variant in variants:
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids and encoded[0] != tokenizer.unk_token_id:
            ids.append(encoded[0])
    return ids


class LLMJudgeReward:
    """P(yes) / (P(yes) + P(no)) of a causal LM's next token after a yes/no question about the completion.

    ``question_template`` is formatted with ``prompt``, ``completion`` and any string columns, e.g.
    ``"Question: {prompt}\\nAnswer: {completion}\\nIs the answer correct? Reply yes or no."``; it is sent as a
    user turn with the generation prompt when the tokenizer has a chat template, as plain text otherwise.
    ``{prompt}`` is the ``raw_prompt`` column when given (the dataset's prompts, which the trainers pass), a message
    list rendered with its roles by ``_conversation_text``; else the ``prompts`` argument.

    Tokens: the first token of the reply may or may not carry a leading space (after "Answer:" the model writes
    " yes"; after a chat template's assistant header usually "Yes"), and capitalisation varies. P(yes) sums the
    probabilities of every variant in ``YES_VARIANTS`` that the tokenizer encodes as ONE token (duplicates and
    the unknown token dropped); likewise P(no). Multi-token variants are left out rather than scored by their
    first piece, which "No" could share with "Not". The chosen ids are in ``yes_ids`` / ``no_ids``.
    """

    batched = True

    def __init__(self, model, tokenizer, question_template: str, batch_size: int = 8, max_length: int | None = None):
        self.yes_ids = _single_token_ids(tokenizer, YES_VARIANTS)
        self.no_ids = _single_token_ids(tokenizer, NO_VARIANTS)
        if not self.yes_ids or not self.no_ids:
            raise ValueError(f"the tokenizer has no single-token yes/no (yes: {self.yes_ids}, no: {self.no_ids})")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError("a token is both a yes and a no variant")
        self.model, self.tokenizer, self.template = model, tokenizer, question_template
        self.batch_size, self.max_length = batch_size, max_length
        self.__name__ = "llm_judge"
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        # (B, 1, V) logits instead of (B, T, V): a real saving with 100k+ vocabularies
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}

    def __call__(self, prompts, completions, **columns) -> list[float]:
        import torch

        # raw_prompt stays among the columns: a string one can still fill a `{raw_prompt}` field of the template
        raw = columns.get("raw_prompt")
        shown = prompts if raw is None else [_conversation_text(self.tokenizer, p) for p in raw]
        questions = []
        for i, (prompt, completion) in enumerate(zip(shown, completions, strict=True)):
            extra = {k: v[i] for k, v in columns.items() if isinstance(v[i], str)}
            questions.append(self.template.format(**extra, prompt=prompt, completion=completion))
        texts, special = _texts(self.tokenizer, questions, [None] * len(questions), generation_prompt=True)
        yes, no = torch.tensor(self.yes_ids, device="cpu"), torch.tensor(self.no_ids, device="cpu")
        scores = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                # left padding puts every row's last real token at T-1, so only that position needs logits
                ids, mask, pos = _encode(self.tokenizer, texts[start:start + self.batch_size], special,
                                         self.max_length, module_device(self.model), padding_side="left")
                if not bool((last_token_index(mask) == ids.shape[1] - 1).all()):
                    raise RuntimeError("left padding expected: the tokenizer ignored padding_side")
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **self._keep).logits
                logp = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()  # (B, V)
                # P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) - log P(no)), stable when both are tiny
                diff = torch.logsumexp(logp[:, yes], -1) - torch.logsumexp(logp[:, no], -1)
                scores += torch.sigmoid(diff).tolist()
        return [s if math.isfinite(s) else math.nan for s in scores]
