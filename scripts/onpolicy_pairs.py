"""Preference pairs from a policy's own samples, labelled by a verifier: the comparison data of an RLHF
pipeline (Ouyang et al. 2022 rank the SFT model's samples), with the numeric verifier standing in for labellers.

    python scripts/onpolicy_pairs.py SAMPLES.jsonl --data task:arithmetic --split train --limit N --out PAIRS.jsonl

SAMPLES.jsonl is what `posttrain eval --samples K --temperature T --split S --limit N --output SAMPLES.jsonl`
wrote for the same data, split and limit: K scored completions per prompt. Every prompt whose samples include
both a correct one (score 1) and a wrong one (score 0) gives up to `--per-prompt` distinct pairs (a correct
sample against a wrong one, chosen at random with `--seed`); prompts whose samples all agree give
none, and how many did is printed. The output has TRL's preference columns: prompt, chosen, rejected.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("samples")
    p.add_argument("--data", default="task:arithmetic")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, required=True, help="the --limit the samples were drawn with")
    p.add_argument("--score", default="numeric", help="the reward column that labels a sample (1 right, 0 wrong)")
    p.add_argument("--per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def make_pairs(records, samples: list[dict], score: str, per_prompt: int, rng: random.Random) -> tuple[list[dict], int]:
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
        prompt = records[index].data["prompt"]
        combos = [(g, b) for g in good for b in bad]
        for g, b in rng.sample(combos, min(per_prompt, len(combos))):  # distinct pairs only
            pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": g}],
                          "rejected": [{"role": "assistant", "content": b}]})
    return pairs, mixed


def main(argv=None) -> None:
    from posttrain.data.formats import load_dataset_records

    args = parse_args(argv)
    records = load_dataset_records(args.data, "prompts", args.split, n=args.limit)[: args.limit]
    samples = [json.loads(line) for line in open(args.samples)]
    pairs, mixed = make_pairs(records, samples, args.score, args.per_prompt, random.Random(args.seed))
    with open(args.out, "w") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in pairs)
    print(f"{len(pairs)} pairs from {mixed} of {len(records)} prompts with both right and wrong samples -> {args.out}")


if __name__ == "__main__":
    main()
