"""Machine matmul peak, measured, so MFU figures mean something on any CPU or GPU; whether the CPU
multiplies bf16 natively; the dtype a matmul runs in under autocast."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads inside the functions: the CLI tunes malloc before importing it
    import torch


def cpu_has_bf16() -> bool:
    """True if this CPU multiplies bf16 natively (AVX512-BF16 or AMX) and PyTorch's kernels use it;
    elsewhere (AVX2) PyTorch's bf16 matmuls take a reference path ~20x slower than fp32
    (benchmarks/README.md). A process whose kernels are held to AVX2 (`ATEN_CPU_CAPABILITY=avx2`,
    `ONEDNN_MAX_CPU_ISA=AVX2` or `DNNL_MAX_CPU_ISA=AVX2`: how an AVX2-only CPU is reproduced on a newer
    one) counts as AVX2."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    if not any(f in flags for f in ("avx512_bf16", "amx_bf16")):
        return False
    import torch

    # oneDNN reads its cap from ONEDNN_MAX_CPU_ISA, else (unset or empty) from its older name
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    held_below_bf16 = isa.upper() in _ONEDNN_ISAS_WITHOUT_BF16
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2") and not held_below_bf16


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads at `threads` (None: left as they are) inside, the caller's count back after:
    the setting is the process's, and a notebook's session goes on after a stage that set it."""
    if threads is None:
        yield
        return
    if threads < 1:  # 0 was ignored, -1 torch's traceback
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    say_if_oversubscribed(threads)
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(was)


# Where the kernel says which cgroup a process is in, and where the cgroup file systems are mounted.
_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota() -> float | None:
    """The CPUs' worth of time this process's cgroup may use (`docker --cpus`, a Kubernetes CPU limit,
    systemd's CPUQuota=): cgroup v2's cpu.max or v1's CFS quota, the tightest of its cgroup and the
    ones above it. None: no quota. The affinity mask does not show it: a container limited to 2 CPUs
    on a 64-core host sees all 64, and a thread per core there is throttled most of every period."""
    try:
        lines = _PROC_CGROUP.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) < 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: one hierarchy
            base = _CGROUP_ROOT
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own
            base = _CGROUP_ROOT / "cpu"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        # every level from the process's cgroup up (a parent's limit holds for its children); a
        # container sees its own cgroup at the mount's root, not under the host's path
        for depth in range(len(parts), -1, -1):
            quotas.append(_cgroup_quota(base.joinpath(*parts[:depth]), v2=controllers == ""))
    return min((q for q in quotas if q is not None), default=None)


def _cgroup_quota(folder: Path, v2: bool) -> float | None:
    """One cgroup's CPU quota in CPUs (None: none, or no such cgroup here)."""
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text(encoding="utf-8").strip()
            period = (folder / "cpu.cfs_period_us").read_text(encoding="utf-8").strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask (`taskset`, a container's cpuset) and its
    cgroup's CPU quota (`cpu_quota`, rounded down, at least 1). `os.cpu_count()` counts the host's."""
    n = _affinity_cpus()
    quota = cpu_quota()
    return n if quota is None else max(1, min(n, int(quota)))


def _affinity_cpus() -> int:
    """The CPUs this process's affinity mask allows (what torch's default thread count follows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_within_quota() -> int | None:
    """Where the cgroup's CPU quota is below the CPUs this process sees and no thread count was chosen
    (OMP_NUM_THREADS, MKL_NUM_THREADS), sets OMP_NUM_THREADS to `usable_cpus()` for torch to read when it
    loads, and the processes started from this one (a speedrun's stages, evaluation workers) after it.
    torch counts the affinity mask alone: a thread per host core, each throttled most of every period.
    Returns the count set, or None. Call it before torch is imported."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None
    usable = usable_cpus()
    if usable >= _affinity_cpus():
        return None
    os.environ["OMP_NUM_THREADS"] = str(usable)
    return usable


def say_if_oversubscribed(threads: int) -> None:
    """A warning on stderr where `--threads` asks for more threads than the CPUs this process may use
    (`usable_cpus`): torch makes them all, and they take turns on the CPUs, a step slower than on as
    many threads as CPUs (torch itself caps OMP_NUM_THREADS at the machine's cores; a flag is taken as asked)."""
    import sys

    cpus = usable_cpus()
    if threads > cpus:
        print(
            f"nanoseek: warning: --threads {threads} is more than the {cpus} CPU{'s' if cpus > 1 else ''} "
            f"this process may use; the threads will take turns on them (--threads {cpus} is usually faster)",
            file=sys.stderr,
        )


def say_if_bf16_is_emulated(stage: str) -> None:
    """A warning on stderr where `stage` trains in bf16 on a CPU without native bf16 (`cpu_has_bf16`):
    its bf16 matmuls take PyTorch's reference path there, ~20x slower than fp32, and the stage's
    output said nothing of why it crawled (`auto` picks fp32 there; a forced bf16 did not)."""
    import sys

    if not cpu_has_bf16():
        print(
            f"nanoseek: warning: {stage} trains in bf16 on a CPU without native bf16 (AVX512-BF16 or AMX, "
            "with PyTorch's kernels not held to AVX2): bf16 matmuls are ~20x slower than fp32 here "
            "(precision fp32 is the fast path)",
            file=sys.stderr,
        )


def default_device() -> torch.device:
    """Where a single-process stage puts its model: the first CUDA GPU where there is one, else the CPU
    (pretraining under torchrun takes its rank's GPU instead: `init_distributed`)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_info() -> dict[str, str]:
    """The CPU's model name and the vector flags that decide its matmul paths, as benchmarks print
    them beside their figures (results must hold on AVX2-only and AVX-512/bf16 machines alike)."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    lines = text.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return {
        "cpu": name or platform.processor() or platform.machine(),
        "flags": " ".join(f for f in wanted if f in flags) or "none of " + ",".join(wanted),
    }


def cpu_description() -> str:
    """The line benchmarks print beside their figures: the CPU's model name, its matmul flags
    (`cpu_info`) and whether it multiplies bf16 natively (`cpu_has_bf16`)."""
    info = cpu_info()
    native = "yes" if cpu_has_bf16() else "no (fp32 is the fast path)"
    return f"{info['cpu']}; flags: {info['flags']}; native bf16: {native}"


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16, the first with bf16 dot products.
_ONEDNN_ISAS_WITHOUT_BF16 = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}


# The choices and help of every `--dtype` whose default is "auto" (`nanoseek.checkpoint.resolve_dtype`
# decides), `--device` and `--quantize`: serve, generate, chat and eval take the same ones.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
AUTO_DTYPE_HELP = (
    "weights dtype; auto (default): a bf16/fp16 checkpoint in bf16 where the CPU multiplies bf16 "
    "natively, else float32; an fp32 checkpoint in float32; bfloat16 on a CUDA GPU (float16 without bf16 "
    "units); float32 on mps"  # (`resolve_dtype`: the help said "bfloat16 on a GPU", and mps took float32)
)
DEVICE_HELP = "cpu, cuda, mps (default: cuda where there is one, else cpu)"
# the formats `nanoseek.engine.quantize` stores weights in (here: the CLI lists them without loading torch)
QUANTIZE_FORMATS = ("int8", "fp8", "w8a8")
QUANTIZE_HELP = (
    "int8 or fp8 weights (w8a8: int8 weights and activations, CPU), applied as the checkpoint streams in"
)


def matmul_peak_flops(
    dtype: torch.dtype | None = None, device: str = "cpu", n: int | None = None, seconds: float = 0.5
) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` (default fp32) on `device` over ~`seconds` (cached per
    process). n defaults to 1024 on a CPU and 8192 on a GPU: a 1024-wide product is over in microseconds
    there, mostly launch, and an H200's MFU read ~50% against it where a few percent was true.
    On a CPU it is cached per torch thread count too: the peak is its threads', and a stage on one
    thread after one on two in the same process (a notebook; a speedrun stage beside another) read the
    two threads' peak, its MFU half the true one."""
    import torch

    threads = torch.get_num_threads() if str(device) == "cpu" else 0
    return _measured_peak_flops(dtype, str(device), n, seconds, threads)


@functools.cache
def _measured_peak_flops(
    dtype: torch.dtype | None, device: str, n: int | None, seconds: float, threads: int
) -> float:
    """`matmul_peak_flops`, measured; `threads` is only the cache's key."""
    import torch

    n = n or (1024 if str(device) == "cpu" else 8192)

    dtype = dtype or torch.float32
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


matmul_peak_flops.cache_clear = _measured_peak_flops.cache_clear  # type: ignore[attr-defined]

_MALLOC_TUNED = False


def tune_malloc(threshold_bytes: int = 256 << 20) -> bool:
    """Keep large CPU tensors' memory in the process between steps (glibc only; a no-op elsewhere).

    By default glibc serves blocks above ~128 KB-32 MB with fresh mmap pages and hands freed memory
    back to the kernel, so every training step page-faults its multi-MB activations in again: ~0.5 s
    of system time per 10 steps of `tiny` and 7-10% of the step. Raising the mmap and trim thresholds
    makes freed blocks reusable (RSS stays at the peak step's, which training reaches anyway).
    Returns True if the thresholds were set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = bool(mallopt(m_mmap_threshold, threshold_bytes)) and bool(
        mallopt(m_trim_threshold, 2 * threshold_bytes)
    )
    _MALLOC_TUNED = ok
    return ok


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: the autocast dtype when autocast is on, else x's own (what a
    hand-written kernel or autograd.Function must cast to, since autocast does not reach inside it)."""
    import torch

    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)`, skipping the call when t already has it: a no-op `.to` still costs a full
    dispatch, and a decode step made a few dozen of them (fp32 models, where every cast is one)."""
    return t if t.dtype == dtype else t.to(dtype)
