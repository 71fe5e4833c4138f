"""`posttrain pairs`: preference pairs from a policy's own samples, labelled by a verifier.

The comparison data of an RLHF pipeline: Ouyang et al. (2022) have labellers rank the SFT model's own samples;
here a 0/1 reward function (the `numeric` verifier by default) stands in for them. Preference methods trained on
such on-policy pairs learn about the mistakes this model makes, where pairs built by corrupting reference answers
teach a distribution it never samples (on the arithmetic task a reward model trained on synthetic one-digit
corruptions ranked the SFT model's own samples at chance).

    posttrain pairs --model runs/demo/sft/final --data task:arithmetic --output-dir runs/demo/pairs \
        --prompts 320 --eval-prompts 64 --samples 4 --temperature 1.0

K samples are drawn for each of the first `prompts + eval_prompts` prompts of the train split. A prompt whose
samples include a right one (score 1) and a wrong one (score 0) gives up to `per_prompt` distinct pairs (a right
completion against a wrong one, picked with `seed`); prompts whose samples all agree give none and are counted.
The first `prompts` prompts give `pairs.jsonl` (training), the next `eval_prompts` give `eval_pairs.jsonl`:
held-out pairs of the policy's own samples on prompts no training pair comes from, the set a reward model's
pairwise accuracy is measured on. Both files have TRL's preference columns (prompt, chosen, rejected);
`samples.jsonl` keeps every scored sample and `pairs_summary.json` the counts.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path


def make_pairs(records, samples: list[dict], score: str, per_prompt: int, rng: random.Random) -> tuple[list[dict], int]:
    """(pairs, prompts with both a right and a wrong sample). `samples` are evaluate.score_answers rows: `index`
    names the record, `score` is the 0/1 label; pairs are distinct (right, wrong) completion texts."""
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for row in samples:
        by_prompt[row["index"]].append(row)
    pairs, mixed = [], 0
    for index, rows in sorted(by_prompt.items()):
        good = sorted({r["completion"] for r in rows if r[score] == 1.0})
        bad = sorted({r["completion"] for r in rows if r[score] == 0.0})
        if not good or not bad:
            continue
        mixed += 1
        combos = [(g, b) for g in good for b in bad]
        for g, b in rng.sample(combos, min(per_prompt, len(combos))):
            pairs.append({"prompt": records[index].data["prompt"], "chosen": [{"role": "assistant", "content": g}],
                          "rejected": [{"role": "assistant", "content": b}]})
    return pairs, mixed


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from posttrain.data.tasks import write_jsonl

    write_jsonl(rows, path)


def build_pairs(args) -> dict:
    """Sample, label, split and write (see the module docstring); returns the summary it writes."""
    from posttrain import devices
    from posttrain.data.formats import load_dataset_records
    from posttrain.evaluate import GenEvalConfig, evaluate_policy, load_reward_fns
    from posttrain.models.loading import load_inference_lm, load_tokenizer, resolve_model_path

    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = args.prompts + args.eval_prompts
    records = load_dataset_records(args.data, "prompts", args.split, n=total)[:total]
    if len(records) < total:
        raise SystemExit(f"{args.data} ({args.split}) has {len(records)} prompts; --prompts + --eval-prompts = {total}")
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = load_inference_lm(path, devices.select(args.device))
    cfg = GenEvalConfig(samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, greedy=False)
    summary, rows = evaluate_policy(model, tokenizer, records, load_reward_fns([args.score]), cfg)
    score = args.score.split(":")[-1]
    if any(r[score] not in (0.0, 1.0) for r in rows):
        raise SystemExit(f"--score {args.score} must give 0/1 labels; got e.g. "
                         f"{next(r[score] for r in rows if r[score] not in (0.0, 1.0))}")
    _write_jsonl(out / "samples.jsonl", rows)
    rng = random.Random(args.seed)
    train_pairs, train_mixed = make_pairs(records, [r for r in rows if r["index"] < args.prompts], score, args.per_prompt, rng)
    eval_pairs, eval_mixed = make_pairs(records, [r for r in rows if r["index"] >= args.prompts], score, args.per_prompt, rng)
    if not train_pairs:
        raise SystemExit(f"no prompt of {args.prompts} had both a right and a wrong sample: no pairs to train on "
                         "(more --samples or a higher --temperature)")
    _write_jsonl(out / "pairs.jsonl", train_pairs)
    _write_jsonl(out / "eval_pairs.jsonl", eval_pairs)
    result = {"model": path, "data": args.data, "split": args.split, "samples_per_prompt": args.samples,
              "temperature": args.temperature, "sample_accuracy": summary.get(f"{score}/accuracy"),
              "train_prompts": args.prompts, "train_prompts_mixed": train_mixed, "train_pairs": len(train_pairs),
              "eval_prompts": args.eval_prompts, "eval_prompts_mixed": eval_mixed, "eval_pairs": len(eval_pairs),
              "wall_time_s": time.perf_counter() - start}
    (out / "pairs_summary.json").write_text(json.dumps(result, indent=1))
    print(f"[pairs] {len(train_pairs)} training pairs from {train_mixed} of {args.prompts} prompts, {len(eval_pairs)} "
          f"held-out pairs from {eval_mixed} of {args.eval_prompts}; samples {100 * (result['sample_accuracy'] or 0):.1f} % "
          f"right -> {out}", flush=True)
    return result


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the policy that samples (model folder or 'smollm2')")
    p.add_argument("--data", default="task:arithmetic", help="prompts with the columns the --score function reads")
    p.add_argument("--split", default="train")
    p.add_argument("--output-dir", dest="output_dir", required=True)
    p.add_argument("--prompts", type=int, default=256, help="prompts whose pairs are for training (pairs.jsonl)")
    p.add_argument("--eval-prompts", dest="eval_prompts", type=int, default=64,
                   help="the next prompts, whose pairs are held out (eval_pairs.jsonl)")
    p.add_argument("--samples", type=int, default=4, help="completions sampled per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=48)
    p.add_argument("--per-prompt", dest="per_prompt", type=int, default=2, help="most pairs from one prompt")
    p.add_argument("--score", default="numeric", help="0/1 reward function that labels a sample (name or module:function)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=lambda a: build_pairs(a) and 0)
