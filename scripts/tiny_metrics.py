"""Tiny-model runs of every algorithm at a fixed seed, their logged metrics written to one JSON file: the evidence
that a refactor changed no number. Run it before and after, then compare:

    .venv/bin/python scripts/tiny_metrics.py /tmp/before.json
    ... change the code ...
    .venv/bin/python scripts/tiny_metrics.py /tmp/after.json --compare /tmp/before.json

Timing and memory metrics (which differ run to run) are left out; everything else must be bit-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

VOLATILE = ("step_time_s", "tokens_per_s", "completions_per_s", "peak_mem_gb", "mem/", "timing/", "reference/seconds")
ONLINE = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6", "algo.sampling.prompts_per_step=4", "algo.sampling.num_generations=4",
          "train.batch_size=8", "algo.sampling.eval_max_new_tokens=6", "data.num_eval_examples=4", "train.lr=1e-2"]
RUNS = {
    "sft": ("sft", "sft", ["train.lr=3e-3", "train.grad_accum=2", "train.batch_size=4"]),
    "rm": ("rm", "pairs", ["train.lr=1e-3"]),
    "dpo": ("dpo", "pairs", ["train.lr=1e-3"]),
    "ipo": ("dpo", "pairs", ["train.lr=1e-3", "algo.loss_type=ipo"]),
    "kto": ("kto", "unpaired", ["train.lr=1e-3"]),
    "grpo": ("grpo", "prompts", [*ONLINE, "algo.kl.beta=0.05", "algo.num_iterations=2"]),
    "grpo-kl-reward": ("grpo", "prompts", [*ONLINE, "algo.kl.beta=0.05", "algo.kl.placement=reward"]),
    "ppo": ("ppo", "prompts", [*ONLINE, "algo.sampling.num_generations=1", "algo.sampling.prompts_per_step=8"]),
    "online-dpo": ("online-dpo", "prompts", ONLINE),
}


def write_data(folder: Path) -> dict:
    from tiny import prompt_rows, write_jsonl

    rows = {
        "sft": [{"messages": [{"role": "user", "content": f"{i % 10}+{i % 7}"}, {"role": "assistant", "content": str(i % 10 + i % 7)}]}
                for i in range(48)],
        "pairs": [{"prompt": f"{i}+{i}=", "chosen": f"ok {2 * i}", "rejected": f"no {2 * i + 1 + i % 3}"} for i in range(48)],
        "unpaired": [{"prompt": f"{i}?", "completion": "yes" if i % 2 else "no", "label": bool(i % 2)} for i in range(48)],
        "prompts": prompt_rows(32),
    }
    return {k: write_jsonl(folder / f"{k}.jsonl", v) for k, v in rows.items()}


def run_all(folder: Path, steps: int) -> dict:
    from posttrain.metrics import read_metrics
    from posttrain.train.registry import run
    from tiny import run_config, tiny_model_dir

    model = tiny_model_dir(folder / "model")
    data = write_data(folder)
    out = {}
    for name, (command, kind, extra) in RUNS.items():
        run_dir = folder / name
        cfg = run_config(command, run_dir, model, data[kind], "train.device=cpu", "train.num_threads=1",
                         f"train.max_steps={steps}", "train.eval_every=2", "train.seed=7", *extra)
        run(cfg)
        out[name] = [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in read_metrics(run_dir)]
    return out


# metrics renamed since an earlier version, per run: compared under their new names ("kl" meant three things)
_GRPO_KL = {"kl": "kl/token_k3_mean", "kl/k1": "kl/token_k1_mean", "kl/k2": "kl/token_k2_mean",
            "kl/k3": "kl/token_k3_mean", "kl/sequence_k1": "kl/seq_k1_sum"}
RENAMED: dict[str, dict[str, str]] = {"grpo": _GRPO_KL, "grpo-kl-reward": _GRPO_KL, "ppo": {"kl": "kl/seq_k1_sum"},
                                      "kto": {"kl": "kto/z_ref"}}


def compare(after: dict, before: dict) -> int:
    """Every value logged before must be logged after, bit-identical (under its new name if renamed); metrics
    that are new are listed, not counted as differences."""
    bad = 0
    for name in sorted(set(before) | set(after)):
        renamed = RENAMED.get(name, {})
        b = [{renamed.get(k, k): v for k, v in row.items()} for row in before.get(name, [])]
        added = sorted({k for row in after.get(name, []) for k in row} - {k for row in b for k in row})
        a = [{k: v for k, v in row.items() if k not in added} for row in after.get(name, [])]
        if a == b:
            new = f"; new metrics: {', '.join(added)}" if added else ""
            print(f"{name:16s} identical ({len(a)} rows, {sum(len(r) for r in a)} values{new})")
            continue
        bad += 1
        print(f"{name:16s} DIFFERS")
        for i, (ra, rb) in enumerate(zip(a or [], b or [])):
            for key in sorted(set(ra) | set(rb)):
                if ra.get(key) != rb.get(key):
                    print(f"    row {i} {key}: before {rb.get(key)!r} after {ra.get(key)!r}")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--compare", help="an earlier output: exit 1 unless every run's metrics are identical")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_all(Path(tmp), args.steps)
    Path(args.output).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.output}: {', '.join(f'{k} {len(v)} rows' for k, v in result.items())}")
    return compare(result, json.loads(Path(args.compare).read_text())) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())
