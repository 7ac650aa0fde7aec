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
    # a @ b.t() is nn.Linear's layout; on CPUs without native bf16 (AVX2), `a @ b` in bf16 takes a
    # reference path ~20x slower, which would make every bf16 MFU figure meaningless.
    for _ in range(3):
        a @ b.t()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 5 or time.perf_counter() < deadline:
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b.t()
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2 * n**3 / best


def autocast_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}.get(
        precision, torch.float32
    )
