"""Where a posttrain training step's time goes: torch.profiler over one step, ops grouped by kind.

    python bench/profile_step.py [--algo sft|dpo] [--model smollm2] [--batch-size 8] [--threads 2] [--autocast auto]

Runs `--warmup` steps, profiles the next one, and prints each kind's share of the profiled CPU time: matrix
multiplies (aten::mm/bmm/addmm and their backward), attention kernels, dtype casts (autocast's weight casts
and their backward), the optimizer, gradient clipping's norms, and the elementwise rest (norms, activations,
masks, log-softmax). The top ops follow. This is the "where the time goes" of the README's bench table.
Under SDPA's math backend (posttrain's choice for bf16 on a CPU) attention runs as `bmm` and softmax, so it is
counted with the matmuls and the elementwise ops.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

KINDS = (  # (kind, substrings of aten op names), first match wins
    ("matmul", ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear")),
    ("attention", ("attention",)),
    ("dtype casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("optimizer", ("adam",)),
    ("grad-norm clipping", ("norm", "_foreach")),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", default="sft", choices=["sft", "dpo"])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch-size", type=int, default=8, help="sequences (SFT) or pairs (DPO) per step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--autocast", default="auto", choices=["auto", "bf16", "none"])
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--workdir", default="/tmp/posttrain-profile")
    return p.parse_args(argv)


def kind_of(op: str) -> str:
    lowered = op.lower()
    for kind, needles in KINDS:
        if any(n.lower() in lowered for n in needles):
            return kind
    return "elementwise and other"


def build_trainer(args, work: Path):
    from posttrain.config import load_config
    from posttrain.data.tasks import make_task_records, write_jsonl
    from posttrain.train import common
    from posttrain.train.loop import Trainer

    kind = "sft" if args.algo == "sft" else "preference"
    steps = args.warmup + 1
    write_jsonl(make_task_records("arithmetic", kind=kind, split="train", n=steps * args.batch_size, seed=0), work / "data.jsonl")
    overrides = [f"train.max_steps={steps}", f"train.batch_size={args.batch_size}", "data.eval_fraction=0",
                 "train.tensorboard=false", "train.progress=false", f"train.num_threads={args.threads}",
                 f"model.autocast={args.autocast}"]
    flags = {"model.name_or_path": args.model, "data.path": str(work / "data.jsonl"), "train.output_dir": str(work / "run")}
    if args.algo == "sft":  # imported first: importing registers the algorithm's config
        from posttrain.train.sft import SFT as Algo
    else:
        from posttrain.train.dpo import DPO as Algo
    cfg = load_config(args.algo, None, overrides, flags)
    common.setup_run(cfg)
    algo = Algo(cfg)
    trainer = Trainer(algo, cfg.train)
    H.no_saving(trainer, algo)
    return trainer, algo, cfg


def main(argv=None) -> None:
    args = parse_args(argv)
    H.set_wait_policy("passive")
    from torch.profiler import ProfilerActivity, profile

    from posttrain.models.loading import wants_bf16

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    trainer, algo, cfg = build_trainer(args, work)
    one_step, seen = trainer._one_step, {"n": 0}
    captured = {}

    def profiled_step():
        seen["n"] += 1
        if seen["n"] != args.warmup + 1:
            return one_step()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = one_step()
        captured.update(prof=prof, wall=time.perf_counter() - start)
        return out

    trainer._one_step = profiled_step
    trainer.fit()
    events = [e for e in captured["prof"].key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    compute = "bf16 autocast" if wants_bf16(cfg.model, "cpu") else "fp32"
    print(f"\n{args.algo.upper()} step {args.warmup + 1}, {args.model}, batch {args.batch_size}, {compute}, "
          f"{torch_threads()} threads: {captured['wall']:.2f} s wall, {total / 1e6:.2f} s in aten ops "
          f"(load average {os.getloadavg()[0]:.1f})")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<24}{us / 1e6:>7.2f} s {100 * us / total:>6.1f} %")
    print("top ops (self CPU time):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {e.key[:48]:<50}{e.self_cpu_time_total / 1e6:>7.3f} s {e.count:>6} calls")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
