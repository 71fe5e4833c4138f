"""posttrain SFT vs TRL's SFTTrainer: same model, same records in the same order, same batch, steps, optimizer
and learning-rate schedule; loss on the assistant's answer only.

    python bench/sft_vs_trl.py [--steps 4] [--batch-size 8] [--model smollm2] [--threads 2]

Installs nothing; TRL is imported lazily (`pip install trl`). Each contender runs in its own subprocess, so the
peak resident memory (ru_maxrss) is its own. Contenders:
  posttrain      our defaults: model.autocast=auto (bf16 only where it is fast: CUDA, AVX-512 CPUs), no
                 gradient checkpointing, batches grouped by length, log-probs from hidden states in chunks
  trl-best       SFTConfig tuned for this machine: bf16 only where it is fast, gradient_checkpointing=False
  trl-best-eager trl-best with eager attention: on a CPU in bf16 SDPA's fused flash kernel is slow (posttrain
                 switches SDPA to its math backend itself; a TRL user can only pick eager)
  trl-defaults   SFTConfig as shipped: bf16=True, gradient_checkpointing=True. On an AVX2-only CPU bf16 matmuls
                 are a ~25x slower fallback, so it runs `--trl-defaults-steps` steps (default: 1 there, all
                 elsewhere) and its rates come from those steps
Loss mask: SmolLM2's chat template has no `{% generation %}` markers and TRL cannot patch it, so TRL's
`assistant_only_loss=True` is unavailable; TRL reads the records as conversational prompt/completion pairs
(prompt = the user turn, completion = the assistant turn) with completion_only_loss=True, which masks the
same tokens except that TRL also trains the newline after `<|im_end|>` (one token per sequence; ours stops
at `<|im_end|>`). posttrain reads the `messages` records as they are.

Figures: tokens = non-pad tokens of every sequence trained on, from our encoding (TRL's token count is checked
against it). `tok/s` uses the optimizer steps' wall time. MFU = 6 * params * tok/s over the machine's measured
matmul peak (bench/matmul_peak.py, the faster of fp32 and bf16). Padding = padded positions / all positions.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
from matmul_peak import load_average, mfu  # noqa: E402

TRL_VARIANTS = {"trl-best": "best", "trl-best-eager": "best-eager", "trl-defaults": "defaults"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="path, hub id or 'smollm2' (the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (no accumulation)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trl-defaults-steps", type=int, default=0, help="steps of trl-defaults; 0 = 1 where bf16 is slow, else --steps")
    p.add_argument("--contenders", default="posttrain,trl-best,trl-defaults", help="comma-separated subset; posttrain first")
    p.add_argument("--omp-wait-policy", default="passive", choices=H.WAIT_POLICIES, help="OMP_WAIT_POLICY of every contender")
    p.add_argument("--workdir", default="/tmp/posttrain-bench-sft")
    H.add_shared_args(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Padded positions / all positions when `lengths` are batched in order and right-padded per batch."""
    padded = real = 0
    for s in range(0, len(lengths), batch_size):
        chunk = lengths[s : s + batch_size]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1.0 - real / max(padded, 1)


# ---- workers (each in its own process) -----------------------------------------------------------------------------

def run_posttrain(args, work: Path) -> dict:
    import torch

    from posttrain.config import load_config
    from posttrain.models.loading import wants_bf16
    from posttrain.ops import IGNORE_INDEX
    from posttrain.train import common
    from posttrain.train.loop import Trainer
    from posttrain.train.sft import SFT

    overrides = [
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "data.eval_fraction=0",
        "train.tensorboard=false", "train.progress=false", f"train.num_threads={args.threads}",
    ]
    flags = {"model.name_or_path": args.model, "data.path": str(work / "sft.jsonl"), "train.output_dir": str(work / "posttrain-run")}
    cfg = load_config("sft", None, overrides, flags)
    common.setup_run(cfg)
    algo = SFT(cfg)
    visited = H.record_visits(algo.order)
    trainer = Trainer(algo, cfg.train)
    H.no_saving(trainer, algo)
    trainer.fit()
    steps = H.metrics_rows(work / "posttrain-run")
    lengths = [len(algo.train_items[i]) for i in visited]
    labels = sum(sum(1 for t in algo.train_items[i].labels[1:] if t != IGNORE_INDEX) for i in visited)
    H.write_setup(work, {"order": visited}, "order")
    return {
        "lengths": lengths, "labels": labels, "step_s": [r["step_time_s"] for r in steps], "losses": [r["loss"] for r in steps],
        "padding": sum(r["padding_fraction"] for r in steps) / len(steps), "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in algo.model.parameters()),
        "settings": f"autocast={'bf16' if wants_bf16(cfg.model, 'cpu') else 'fp32'}, ckpt={'on' if cfg.model.gradient_checkpointing else 'off'}",
    }


def trl_settings(variant: str, bf16_fast: bool) -> dict:
    """SFTConfig fields that differ between the TRL contenders (the rest is shared and set to match ours)."""
    if variant == "defaults":
        return {}  # as shipped: bf16=True, gradient_checkpointing=True
    return {"bf16": bf16_fast, "gradient_checkpointing": False}


def run_trl(args, work: Path, variant: str) -> dict:
    trl = H.require_trl()
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer

    from posttrain.models.loading import resolve_model_path

    setup = H.read_setup(work)
    order = H.read_setup(work, "order")["order"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [{"prompt": setup["records"][i]["messages"][:-1], "completion": setup["records"][i]["messages"][-1:]} for i in order]
    steps = args.steps if variant == "best" else setup["trl_defaults_steps"]
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = H.load_trl_model(path, args, variant)

    class InOrder(trl.SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    config = trl.SFTConfig(
        output_dir=str(work / f"trl-{variant}-run"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, completion_only_loss=True, assistant_only_loss=False,
        **trl_settings(variant, setup["bf16_fast"]),
    )
    timer = H.trl_step_timer()
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    seen = trainer.train_dataset[: steps * args.batch_size]
    lengths = [len(ids) for ids in seen["input_ids"]]
    labels = sum(sum(1 for t in lab[1:] if t != -100) for lab in seen["labels"])
    return {
        "step_s": timer.step_s, "losses": [log["loss"] for log in timer.logs], "trl_lengths": lengths, "labels": labels,
        "padding": padding_fraction(lengths, args.batch_size), "threads": torch.get_num_threads(), "trl_version": trl.__version__,
        "settings": f"bf16={config.bf16}, ckpt={'on' if config.gradient_checkpointing else 'off'}",
    }


WORKERS = {"posttrain": run_posttrain, **{name: functools.partial(run_trl, variant=v) for name, v in TRL_VARIANTS.items()}}


# ---- orchestration -------------------------------------------------------------------------------------------------

def summarize(results: dict, lengths: list[int], args, peak: dict) -> list[dict]:
    """A table row per contender; tokens per step come from our encoding of the batches it trained on."""
    bs, params = args.batch_size, results["posttrain"]["params"]
    step_tokens = [sum(lengths[s : s + bs]) for s in range(0, len(lengths), bs)]
    rows = []
    for name, r in results.items():
        n = len(r["step_s"])
        tokens, seconds = sum(step_tokens[:n]), sum(r["step_s"])
        tps = tokens / seconds
        rows.append({
            "contender": name, "steps": n, "tok/s": tps, "MFU %": 100 * mfu(params, tps, peak["best"], "train"),
            "s/step": seconds / n, "peak GB": r["peak_gb"], "pad %": 100 * r["padding"], "loss@1": r["losses"][0],
            "loss@last": r["losses"][-1], "process s": r["wall_s"], "settings": r["settings"],
        })
    return rows


def print_report(rows: list[dict], results: dict, lengths: list[int], args, peak: dict, source: str) -> None:
    tokens = sum(lengths)
    print(f"\nSFT, {args.model}, {args.steps} steps x {args.batch_size} sequences, data {source}, {args.threads} threads, "
          f"{tokens} tokens in {args.steps} steps (non-pad, our encoding)")
    print(f"matmul peak: fp32 {peak['fp32']:.1f} GFLOPS, bf16 {peak['bf16']:.1f} GFLOPS (MFU vs {peak['best_dtype']}); "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    cols = [("contender", 15, ""), ("steps", 6, "d"), ("tok/s", 8, ".0f"), ("MFU %", 7, ".1f"), ("s/step", 8, ".1f"),
            ("peak GB", 8, ".2f"), ("pad %", 7, ".1f"), ("loss@1", 8, ".4f"), ("loss@last", 10, ".4f"), ("process s", 10, ".1f")]
    print(H.format_table(cols, rows))
    for row in rows:
        print(f"  {row['contender']:<15} {row['settings']}")
    ours = rows[0]["tok/s"]
    print("\nposttrain speed-up (train tok/s):")
    for row in rows[1:]:
        print(f"  vs {row['contender']:<14} {ours / row['tok/s']:.2f}x")
    shuffled = list(lengths)
    random.Random(0).shuffle(shuffled)
    print(f"padding: posttrain's length-grouped order {100 * padding_fraction(lengths, args.batch_size):.1f}% (the TRL contenders "
          f"read the same order); a random order of the same records: {100 * padding_fraction(shuffled, args.batch_size):.1f}%")
    for name, r in results.items():
        if "trl_lengths" in r and r["trl_lengths"] != lengths[: len(r["trl_lengths"])]:
            print(f"  note: {name} tokenized {sum(r['trl_lengths'])} tokens where ours has {sum(lengths[: len(r['trl_lengths'])])}")
    if "autocast=bf16" in results["posttrain"]["settings"] and not peak["bf16_fast"]:
        print("  WARNING: posttrain's model.autocast=auto chose bf16 although bf16 matmuls are slower here "
              "(posttrain.models.loading.bf16_is_fast misjudged; its small probe matmul is noisy under load)")
    per_seq = [f"{name} {r['labels'] / len(r.get('trl_lengths', lengths)):.2f}" for name, r in results.items()]
    print(f"trained labels per sequence: {', '.join(per_seq)} (TRL also trains the newline after <|im_end|>, an easy "
          "token, so its mean loss reads a few % lower)")
    print(H.describe_load(results))
    print(H.describe_repeats(results))
    print(f"load average now: {load_average()}")


def make_records(n: int) -> tuple[list[dict], str]:
    from posttrain.data.tasks import make_task_records

    return make_task_records("arithmetic", kind="sft", split="train", n=n, seed=0), "task:arithmetic"


def main(argv=None) -> None:
    args = parse_args(argv)
    if H.worker_or_none(args, WORKERS):
        return
    policy = H.set_wait_policy(args.omp_wait_policy)  # before torch is imported
    from posttrain.data.tasks import write_jsonl

    start = time.perf_counter()
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    if names[0] != "posttrain":
        raise SystemExit("posttrain must run first: it fixes the order of the records the others read")
    work = Path(args.workdir)
    records, source = make_records(args.steps * args.batch_size)  # one epoch: every batch full, each record seen once
    print(f"load average: {load_average()}; OMP_WAIT_POLICY={policy}; measuring the matmul peak ...", flush=True)
    peak = H.machine_peak(args.threads)
    H.write_setup(work, {"records": records, "bf16_fast": peak["bf16_fast"],
                         "trl_defaults_steps": args.trl_defaults_steps or (args.steps if peak["bf16_fast"] else 1)})
    write_jsonl(records, work / "sft.jsonl")
    results = H.run_contenders(__file__, names, args, lambda r: sum(r["step_s"]))
    lengths = results["posttrain"]["lengths"]
    rows = summarize(results, lengths, args, peak)
    print_report(rows, results, lengths, args, peak, source)
    print(f"bench wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
