"""One HF-engine decode step, with and without packed linear weights (`rollout/packed_linear.py`), against the
machine's limits: the measured matmul peak (MFU) and the memory bandwidth a step needs to read the weights once.

    python bench/decode_step.py                       # the bundled SmolLM2-135M, 16 and 64 rows, bf16 where fast
    python bench/decode_step.py --rows 16 --dtypes fp32,bf16 --repeats 5

A decode step's time is (a run of max_new_tokens tokens - a run of 1 token) / (max_new_tokens - 1): the prefill
cancels. Greedy, no stop tokens: every mode runs the same number of steps and must give the same tokens (checked).
Modes run interleaved, `repeats` rounds; the median is reported. "bf16" is an fp32 model under bf16 autocast, what
an online run on a bf16-capable CPU samples with. MFU counts 2 x parameters per token (the tied head once, as a
matmul); "weights GB/s" is the bytes of the linear weights in the compute dtype over the step time: a decode step
of few rows reads every weight once, so it cannot beat the copy bandwidth printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from posttrain.rollout.base import SamplingParams  # noqa: E402
from posttrain.rollout.hf import HFGenerator  # noqa: E402
from posttrain.rollout.packed_linear import packing_available, plain_linears  # noqa: E402


def copy_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Best read+write bandwidth of a large tensor copy (GB/s of bytes moved)."""
    src = torch.empty(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_seconds(gen: HFGenerator, prompts, rows: int, new_tokens: int):
    G = rows // len(prompts)
    full = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, batch_size=len(prompts))
    one = SamplingParams(max_new_tokens=1, temperature=0.0, batch_size=len(prompts))
    start = time.perf_counter()
    rollout = gen.generate(prompts, full, num_samples=G, seed=0)
    middle = time.perf_counter()
    gen.generate(prompts, one, num_samples=G, seed=0)
    end = time.perf_counter()
    return ((middle - start) - (end - middle)) / (new_tokens - 1), rollout


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="checkpoint directory, or smollm2 (the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--rows", default="16,64", help="decode rows, comma-separated (prompts x G, 2 prompts)")
    p.add_argument("--dtypes", default="auto", help="fp32,bf16 or auto (bf16 where oneDNN has native bf16, and fp32)")
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from matmul_peak import load_average, measure_peak
    from posttrain.models.loading import resolve_model_path

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    dtypes = args.dtypes.split(",") if args.dtypes != "auto" else (
        ["bf16", "fp32"] if packing_available(torch.device("cpu"), torch.bfloat16) else ["fp32"])
    prompts = [list(range(100, 100 + args.prompt_len)), list(range(300, 300 + args.prompt_len - 7))]
    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.weight.numel() for m in plain_linears(model))
    print(f"{path}: {params / 1e6:.1f} M parameters ({linear_params / 1e6:.1f} M in linear layers, the head included)")
    print(f"load average before: {load_average()}; copy bandwidth {copy_bandwidth_gbs():.1f} GB/s")
    peaks = {d: measure_peak(d, (256, 512, 1024), 3, args.threads)["gflops"] for d in dtypes}
    print("matmul peak GFLOPS: " + ", ".join(f"{d} {g:.0f}" for d, g in peaks.items()))
    for rows in [int(r) for r in args.rows.split(",")]:
        for dtype in dtypes:
            autocast = torch.bfloat16 if dtype == "bf16" else None
            modes = {"plain": HFGenerator(model, 0, None, autocast, packed_weights=False),
                     "packed": HFGenerator(model, 0, None, autocast, packed_weights=True)}
            times, tokens = {m: [] for m in modes}, {}
            for name, gen in modes.items():  # warm-up (and the packing, outside the timing)
                tokens[name] = step_seconds(gen, prompts, rows, 4)[1].completion_ids
            for _ in range(args.repeats):
                for name, gen in modes.items():
                    seconds, rollout = step_seconds(gen, prompts, rows, args.new_tokens)
                    times[name].append(seconds)
                    tokens[name] = rollout.completion_ids
            same = torch.equal(tokens["plain"], tokens["packed"])
            for name in modes:
                t = statistics.median(times[name])
                gflops = 2 * params * rows / t / 1e9
                bytes_ = linear_params * (2 if dtype == "bf16" else 4)
                print(f"rows {rows:>3} {dtype} {name:<6}: {t * 1e3:6.1f} ms/step  "
                      f"[{', '.join(f'{x * 1e3:.1f}' for x in times[name])}]  {rows / t:6.0f} tokens/s  "
                      f"MFU {gflops / peaks[dtype]:5.1%}  weights {bytes_ / t / 1e9:5.1f} GB/s")
            print(f"rows {rows:>3} {dtype}: packed / plain {statistics.median(times['plain']) / statistics.median(times['packed']):.2f}x, "
                  f"same greedy tokens: {same}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
