"""The host allocator's settings: keep freed memory for reuse instead of handing it back to the kernel.

PyTorch's CPU tensors come from glibc's malloc. By default a block above the dynamic mmap threshold is a fresh
`mmap` and goes back with `munmap` when freed, and the heap's top is trimmed when more than 128 KiB is free: a
training or decode step that allocates and frees the same large activations every time pays first-touch page
faults on each of them, every step. In a VM these are slow. Measured on the 2-core dev box (SmolLM2-135M,
bf16 autocast): one sampling step over a (64, 49152) logits batch 12 ms -> 3 ms, a 64-row decode step
122 ms -> 74 ms, with `M_MMAP_THRESHOLD` at its 32 MiB maximum and `M_TRIM_THRESHOLD` at 4 GiB, the same
effect as PyTorch's usual advice to preload jemalloc or tcmalloc. The price: the process keeps its peak heap
(resident memory does not shrink after a peak; `mem/host_peak_rss_gb` is unchanged).

`POSTTRAIN_MALLOC_TUNING=0` leaves malloc as it is; only glibc is tuned (musl, macOS and Windows are left alone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 4 * 1024**3

_tuned: bool | None = None


def tune_host_allocator() -> bool:
    """Apply the settings once per process; True when glibc accepted them (also on later calls)."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("POSTTRAIN_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return _tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return _tuned
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
