"""Calibrate the arithmetic task's difficulty: greedy accuracy of a model before and after a short SFT.

The demo pipeline needs a level where SmolLM2-135M-Instruct after a short SFT is right on roughly 20-60% of
held-out problems, so RL has room to show gains. For each level this script
  1. measures greedy accuracy on `--n-eval` test problems (batched, left padding, `--max-new-tokens`),
  2. fine-tunes a fresh copy for `--steps` AdamW steps or `--budget-minutes` of wall time, whichever comes
     first, on train problems (loss on assistant tokens only, the closing <|im_end|> included),
  3. measures again, and prints one JSON line per level: level, before, after, steps, minutes.

A research tool, not library code: plain transformers + torch, plus the task and the library's chat encoding
(so the tokens trained here are the tokens `posttrain sft` trains).

The numbers in posttrain/data/tasks/arithmetic.py came from (about 17 minutes per level on 2 shared cores)

    .venv/bin/python scripts/calibrate_arithmetic.py --levels 1 2 4 --steps 200 --budget-minutes 8

fp32 on purpose: on an AVX2-only CPU (no AVX512-BF16/AMX) bf16 autocast emulates bf16 matmuls and is ~6x slower.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from posttrain.data.chat import encode_messages  # noqa: E402
from posttrain.data.tasks.arithmetic import LEVELS, make_records  # noqa: E402
from posttrain.ops import IGNORE_INDEX, shift_labels  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "posttrain" / "models" / "smollm2-135m-instruct"
_ANSWER = re.compile(r"The answer is\s*(-?\d[\d,]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*")


def extract_answer(text: str) -> str | None:
    """'The answer is N' if present, else the last number (the rule the numeric verifier uses)."""
    found = _ANSWER.findall(text) or _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


@torch.no_grad()
def accuracy(
    model, tokenizer, records: list[dict], batch_size: int, max_new_tokens: int, bf16: bool = False
) -> tuple[float, list[str]]:
    """Greedy accuracy on `prompts` records; left padding so every row's last prompt token is aligned."""
    model.eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in records]
    outputs: list[str] = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = [extract_answer(o) == r["answer"] for o, r in zip(outputs, records)]
    return sum(correct) / len(correct), outputs


def collate(encoded: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels (B, T); padding has label IGNORE_INDEX and mask 0."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), IGNORE_INDEX)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assistant_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over trained tokens, with the LM head applied only where a label exists.

    Logits at position t predict token t+1 (shift_labels). Skipping the (B, T, V) logits of the prompt saves
    about a sixth of a step here: the prompt is ~70% of each sequence and V = 49,152.
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = shift_labels(batch["labels"])  # (B, T)
    keep = labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[keep])  # (N, V), N trained tokens
    return F.cross_entropy(logits.float(), labels[keep])


def short_sft(model, tokenizer, records: list[dict], args) -> list[float]:
    """Plain AdamW loop, linear warm-up then constant; stops at args.steps or after args.budget_minutes."""
    encoded = [encode_messages(tokenizer, r["messages"]) for r in records]
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(args.steps // 10, 5))  # short: a budget-cut run may do only a few dozen steps
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = collate(encoded[step * args.batch_size : (step + 1) * args.batch_size], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = assistant_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        elapsed = time.perf_counter() - start
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step:4d} loss {losses[-1]:.4f} {elapsed / 60:.1f} min", flush=True)
        if elapsed > 60 * args.budget_minutes:
            print(f"  budget of {args.budget_minutes} min reached after {step + 1} steps", flush=True)
            break
    return losses


def calibrate_level(args, level: int, tokenizer) -> dict:
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    test = make_records("prompts", split="test", n=args.n_eval, seed=args.seed, difficulty=level)
    t0 = time.perf_counter()
    before, outputs = math.nan, []
    if args.before:
        before, outputs = accuracy(model, tokenizer, test, args.eval_batch_size, args.max_new_tokens, args.bf16)
    t1 = time.perf_counter()
    for record, out in list(zip(test, outputs))[:2]:
        print(f"  before SFT: answer {record['answer']:>6}  model: {out!r}")
    train = make_records("sft", split="train", n=args.steps * args.batch_size, seed=args.seed, difficulty=level)
    losses = short_sft(model, tokenizer, train, args)
    t2 = time.perf_counter()
    after, outputs = accuracy(model, tokenizer, test, args.eval_batch_size, args.max_new_tokens, args.bf16)
    t3 = time.perf_counter()
    for record, out in list(zip(test, outputs))[:3]:
        print(f"  after SFT:  answer {record['answer']:>6}  model: {out!r}")
    return {
        "level": level, "difficulty": repr(LEVELS[level]), "before": before, "after": after,
        "steps": len(losses), "batch_size": args.batch_size, "lr": args.lr, "n_eval": args.n_eval,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "minutes_sft": round((t2 - t1) / 60, 2), "minutes_eval": round((t1 - t0 + t3 - t2) / 60, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--levels", type=int, nargs="+", default=sorted(LEVELS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=8.0, help="stop the SFT after this much wall time")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast: faster only on CPUs with native bf16 (AVX512-BF16, AMX); slower on AVX2")
    p.add_argument("--threads", type=int, default=2, help="the machine is shared: keep this small")
    p.add_argument("--no-before", dest="before", action="store_false", help="skip the pre-SFT evaluation")
    p.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for level in args.levels:
        print(f"level {level}: {LEVELS[level]}", flush=True)
        row = calibrate_level(args, level, tokenizer)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
