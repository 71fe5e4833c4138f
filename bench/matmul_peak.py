"""This machine's matmul peak (GFLOPS) in fp32 and bf16, and model FLOP utilization (MFU) against it.

    python bench/matmul_peak.py [--threads 2] [--sizes 256,512,1024] [--repeats 5] [--dtypes fp32,bf16]

The peak is the best of `repeats` timed (M x K) @ (K x N) products per size, 2*M*N*K FLOPs each, on `threads`
CPU threads: what a dense layer can get here at best. On an AVX2-only CPU PyTorch's bf16 matmul is a slow
fallback (about 25x below fp32 on the 2-core dev box), which is why `model.autocast=auto` keeps fp32 there.
Other processes on the box lower the figure; the load average is printed beside it.

MFU (Chowdhery et al. 2022, PaLM, appendix B) counts the matmul FLOPs a token costs: 2*N in a forward pass and
6*N in a training step (forward + backward) for N parameters, attention's O(T) term left out (short sequences).
A tied input/output embedding counts once: its lookup is free and its use as the LM head is a real matmul.
"""

from __future__ import annotations

import argparse
import os
import time

FLOPS_PER_TOKEN = {"train": 6, "generate": 2, "forward": 2}  # x parameters, per token
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def matmul_gflops(n: int, dtype: str = "fp32", repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOPS of an (n x n) @ (n x n) product in `dtype`; the budget per size is kept near
    a second so a slow bf16 fallback does not stall the caller (fewer repeats then)."""
    import torch

    a = torch.randn(n, n).to(getattr(torch, DTYPES[dtype]))
    b = torch.randn(n, n).to(a.dtype)
    flops = 2.0 * n**3
    a @ b  # warm-up: first call picks kernels and allocates
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > 1.0:
            break
    return flops / best / 1e9


def measure_peak(dtype: str = "fp32", sizes=(256, 512, 1024), repeats: int = 5, threads: int | None = None) -> dict:
    """{"gflops": best over sizes, "by_size": {n: GFLOPS}, "threads": n, "dtype": dtype}."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    by_size = {n: matmul_gflops(n, dtype, repeats) for n in sizes}
    return {"gflops": max(by_size.values()), "by_size": by_size, "threads": torch.get_num_threads(), "dtype": dtype}


def mfu(num_params: int, tokens_per_s: float, peak_gflops: float, kind: str = "train") -> float:
    """Model FLOP utilization in [0, 1]: FLOPS_PER_TOKEN[kind] * params * tokens/s over the measured peak."""
    if peak_gflops <= 0:
        return float("nan")
    return FLOPS_PER_TOKEN[kind] * num_params * tokens_per_s / (peak_gflops * 1e9)


def load_average() -> str:
    """The 1/5/15-minute load averages and the core count, e.g. '4.2 / 5.1 / 5.3 on 2 cores'."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="256,512,1024", help="square matrix sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed products per size (best one counts)")
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"load average before: {load_average()}")
    results = {d: measure_peak(d, sizes, args.repeats, args.threads) for d in args.dtypes.split(",")}
    threads = next(iter(results.values()))["threads"]
    print(f"matmul GFLOPS, best of {args.repeats}, {threads} threads")
    print(f"{'dtype':<6}" + "".join(f"{n:>10}" for n in sizes) + f"{'peak':>10}")
    for dtype, r in results.items():
        print(f"{dtype:<6}" + "".join(f"{r['by_size'][n]:>10.1f}" for n in sizes) + f"{r['gflops']:>10.1f}")
    if "fp32" in results and "bf16" in results:
        print(f"bf16 / fp32: {results['bf16']['gflops'] / results['fp32']['gflops']:.3f}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
