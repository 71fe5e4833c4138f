"""Does `model.compile=on` pay on this machine? One SFT-shaped training step (forward + backward of the
log-probs) of the bundled SmolLM2-135M, eager against regional compilation (`posttrain/models/compiled.py`),
each in its own process: compile time (first step minus a steady step) and the steady step time.

    python bench/compile_step.py [--rows 8] [--tokens 112] [--autocast bf16|none] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one(mode: str, args) -> dict:
    import torch

    from posttrain.host_memory import tune_host_allocator
    from posttrain.models.bundled import ensure_bundled_model
    from posttrain.models.compiled import compile_decoder
    from posttrain.models.forward import token_logps
    from transformers import AutoModelForCausalLM

    tune_host_allocator()
    model = AutoModelForCausalLM.from_pretrained(ensure_bundled_model(), dtype=torch.float32).train()
    compile_decoder(model, "on" if mode == "compiled" else "off", "cpu")
    torch.manual_seed(0)

    def step(tokens: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (args.rows, tokens))
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            logp = token_logps(model, ids, torch.ones_like(ids))
        (-logp.mean()).backward()
        return time.perf_counter() - start

    first = step(args.tokens)
    steady = [step(args.tokens + (8 if i % 2 else -8)) for i in range(args.steps)]  # lengths vary, as in training
    return {"mode": mode, "first_s": first, "steady_s": statistics.median(steady)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=112)
    p.add_argument("--autocast", default="bf16", choices=["bf16", "none"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(one(args.worker, args)))
        return
    results = {}
    for mode in ("eager", "compiled"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, *sys.argv[1:]], capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    eager = results["eager"]["steady_s"]
    print(f"{'mode':10s} {'first step s':>13s} {'compile s':>10s} {'steady step s':>14s} {'vs eager':>9s}")
    for mode, r in results.items():
        print(f"{mode:10s} {r['first_s']:13.2f} {r['first_s'] - r['steady_s']:10.1f} {r['steady_s']:14.2f} "
              f"{eager / r['steady_s']:8.2f}x")


if __name__ == "__main__":
    main()
