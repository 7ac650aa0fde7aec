"""Machine matmul peak, measured, so MFU figures mean something on any CPU or GPU."""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def matmul_peak_flops(
    dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 1024, seconds: float = 0.5
) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` on `device` over ~`seconds` (cached per process)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 5 or time.perf_counter() < deadline:
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2 * n**3 / best


def autocast_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}.get(
        precision, torch.float32
    )
