"""posttrain DPO vs TRL's DPOTrainer: same model, same pairs in the same order, same batch, steps and optimizer.

    python bench/dpo_vs_trl.py [--steps 2] [--batch-size 4] [--model smollm2] [--threads 2] [--precision auto]
        [--contenders posttrain,posttrain-two-rows,trl-defaults,trl-no-ckpt,trl-precompute]

Installs nothing; TRL is imported lazily (`pip install trl`). Each contender runs in its own subprocess, so the
peak resident memory (ru_maxrss) is its own. Both sides keep fp32 weights and compute in `--precision`:
bf16 autocast (TRL's default bf16=True, our model.autocast=bf16) or fp32. `auto` picks bf16 on CUDA or a CPU with
AVX-512 and fp32 otherwise: on an AVX2-only CPU PyTorch's bf16 matmul is a slow fallback (measured 0.3 GFLOPS vs
25 GFLOPS fp32 on the 2-core dev box), which would make a bf16 run take hours. Contenders:
  posttrain        our defaults: reference log-probs precomputed before training (one model in memory), each
                   pair one row [prompt | chosen | rejected] (algo.share_prompt, posttrain.models.shared_prefix)
  posttrain-two-rows  algo.share_prompt=false: chosen and rejected as two padded rows, as TRL does
  trl-defaults     DPOConfig as shipped (gradient_checkpointing=True, reference model run every step)
  trl-no-ckpt      gradient_checkpointing=False (the compute settings of our defaults; not run by default)
  trl-precompute   gradient_checkpointing=False, precompute_ref_log_probs=True (TRL's closest mode to ours)
  trl-precompute-eager  the same with eager attention (on a CPU in bf16 SDPA's flash kernel is slow)
The default size (2 steps x 4 pairs, three contenders) takes about 5 minutes on the 2-core dev box when it is idle:
SmolLM2-135M trains at roughly 15-30 tokens/s there in fp32.
Pairs: the built-in arithmetic task's preference pairs (posttrain.data.tasks), else a synthetic set. TRL reads them
in exactly the order posttrain's batches visited them (a sequential sampler), so the loss curves are comparable.

Figures: tokens = prompt + completion tokens of both rows of every pair trained on (counted once, from our
encoding, identical for all contenders). `train tok/s` uses the optimizer steps' wall time; `total tok/s` adds the
reference pass when it runs before training (ours, TRL's precompute). Peak memory is the process's RSS high mark.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

TRL_VARIANTS = {
    "trl-defaults": {},
    "trl-no-ckpt": {"gradient_checkpointing": False},
    "trl-precompute": {"gradient_checkpointing": False, "precompute_ref_log_probs": True},
    "trl-precompute-eager": {"gradient_checkpointing": False, "precompute_ref_log_probs": True},  # + eager attention
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="path, hub id or 'smollm2' (the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (no accumulation)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="compute dtype of both sides")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contenders", default="posttrain,posttrain-two-rows,trl-defaults,trl-precompute",
                   help=f"comma-separated, from posttrain,posttrain-two-rows,{','.join(TRL_VARIANTS)}")
    p.add_argument("--workdir", default="/tmp/posttrain-bench-dpo")
    H.add_shared_args(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- data ----------------------------------------------------------------------------------------------------------

def make_pairs(n: int, seed: int = 0) -> tuple[list[dict], str]:
    """n preference records and where they came from."""
    try:
        from posttrain.data.tasks import make_task_records

        return make_task_records("arithmetic", kind="preference", split="train", n=n, seed=seed), "task:arithmetic"
    except (ImportError, KeyError):
        import random

        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
            q = [{"role": "user", "content": f"What is {a} + {b}? Give the final answer as 'The answer is N.'"}]
            rows.append({"prompt": q, "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                         "rejected": [{"role": "assistant", "content": f"The answer is {a + b + rng.choice([-10, -1, 1, 10])}."}]})
        return rows, "synthetic"


def auto_precision() -> str:
    import torch

    fast_bf16 = torch.cuda.is_available() or "AVX512" in torch.backends.cpu.get_cpu_capability()
    return "bf16" if fast_bf16 else "fp32"


# ---- workers (each in its own process) -----------------------------------------------------------------------------

def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_posttrain(args, work: Path, share_prompt: bool = True) -> dict:
    import torch

    from posttrain.config import load_config
    from posttrain.train import common
    from posttrain.train.dpo import DPO
    from posttrain.train.loop import Trainer

    overrides = [
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", f"algo.beta={args.beta}",
        "data.eval_fraction=0", "train.tensorboard=false", "train.progress=false", f"train.num_threads={args.threads}",
        f"model.autocast={'bf16' if args.precision == 'bf16' else 'none'}", f"algo.share_prompt={share_prompt}",
    ]
    run_dir = work / ("posttrain-run" if share_prompt else "posttrain-two-rows-run")
    shutil.rmtree(run_dir, ignore_errors=True)  # a stored reference table from an earlier run would skip its pass
    flags = {"model.name_or_path": args.model, "data.path": str(work / "pairs.jsonl"), "train.output_dir": str(run_dir)}
    cfg = load_config("dpo", None, overrides, flags)
    common.setup_run(cfg)
    algo = DPO(cfg)
    visited = H.record_visits(algo.order)
    trainer = Trainer(algo, cfg.train)
    H.no_saving(trainer, algo)
    trainer.fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    if share_prompt:
        (work / "order.json").write_text(json.dumps(visited))
    tokens = sum(len(algo.train_items[i].chosen) + len(algo.train_items[i].rejected) for i in visited)
    return {
        "tokens": tokens, "train_s": sum(r["step_time_s"] for r in steps), "ref_s": steps[0].get("reference/seconds", 0.0),
        "losses": [r["loss"] for r in steps], "peak_gb": peak_rss_gb(), "threads": torch.get_num_threads(),
        "models_in_memory": steps[0]["models_in_memory"],
    }


def trl_config(trl, args, work: Path, variant: str):
    """TRL's DPOConfig with our optimizer and schedule (AdamW, cosine to 0, no warmup, clip 1.0) and the variant."""
    return trl.DPOConfig(
        output_dir=str(work / f"{variant}-run"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=args.beta, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, bf16=args.precision == "bf16", **TRL_VARIANTS[variant],
    )


def run_trl(args, work: Path, variant: str) -> dict:
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install trl") from None
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer

    from posttrain.models.loading import resolve_model_path

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    records = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    order = json.loads((work / "order.json").read_text())
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = H.load_trl_model(path, args, variant)

    class InOrder(trl.DPOTrainer):
        ref_s = 0.0

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            InOrder.ref_s += time.perf_counter() - start
            return out

    config = trl_config(trl, args, work, variant)
    timer = H.trl_step_timer()
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list([records[i] for i in order]),
                      processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    ds = trainer.train_dataset
    trl_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    return {
        "trl_tokens": trl_tokens, "train_s": sum(timer.step_s), "ref_s": InOrder.ref_s, "losses": [log["loss"] for log in timer.logs],
        "peak_gb": peak_rss_gb(), "threads": torch.get_num_threads(), "trl_version": trl.__version__,
        "models_in_memory": 1 if config.precompute_ref_log_probs else 2,
    }


# ---- orchestration -------------------------------------------------------------------------------------------------

def print_table(results: dict, tokens: int, source: str, args) -> None:
    print(f"\nDPO, {args.model}, {args.steps} steps x {args.batch_size} pairs, data {source}, {args.threads} threads, "
          f"{args.precision} compute, {tokens} tokens trained")
    head = f"{'contender':<22}{'train tok/s':>12}{'total tok/s':>12}{'train s':>9}{'ref s':>7}{'peak GB':>9}{'models':>7}" \
           f"{'loss@1':>8}{'loss@' + str(args.steps):>9}{'process s':>11}"
    print(head)
    print("-" * len(head))
    base = results.get("posttrain")
    for name, r in results.items():
        train_tps, total_tps = tokens / r["train_s"], tokens / (r["train_s"] + r["ref_s"])
        print(f"{name:<22}{train_tps:>12.0f}{total_tps:>12.0f}{r['train_s']:>9.1f}{r['ref_s']:>7.1f}{r['peak_gb']:>9.2f}"
              f"{r['models_in_memory']:>7}{r['losses'][0]:>8.4f}{r['losses'][-1]:>9.4f}{r['wall_s']:>11.1f}")
    if base:
        print("\nposttrain speed-up (total tok/s, reference pass included):")
        ours = tokens / (base["train_s"] + base["ref_s"])
        for name, r in results.items():
            if name != "posttrain":
                print(f"  vs {name:<20} {ours / (tokens / (r['train_s'] + r['ref_s'])):.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.precision == "auto":
        args.precision = auto_precision()
    work = Path(args.workdir)
    if args.worker:
        if args.worker.startswith("posttrain"):
            result = run_posttrain(args, work, share_prompt=args.worker != "posttrain-two-rows")
        else:
            result = run_trl(args, work, args.worker)
        (work / f"{args.worker}.json").write_text(json.dumps(result))
        return
    work.mkdir(parents=True, exist_ok=True)
    records, source = make_pairs(args.steps * args.batch_size)  # one epoch: every batch full, each pair seen once
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    if names[0] != "posttrain":
        raise SystemExit("posttrain must run first: it fixes the order of the pairs the others read")
    results = H.run_contenders(__file__, names, args, lambda r: r["train_s"] + r["ref_s"])
    for name, r in results.items():
        if "trl_tokens" in r and r["trl_tokens"] != results["posttrain"]["tokens"]:
            print(f"  note: TRL tokenized {r['trl_tokens']} tokens, posttrain {results['posttrain']['tokens']}")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results, results["posttrain"]["tokens"], source, args)
    print(H.describe_repeats(results))


if __name__ == "__main__":
    main()
