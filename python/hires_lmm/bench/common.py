"""Benchmark harness shared by every family (python -m hires_lmm.bench).

A family module hires_lmm/bench/bench_<family>.py exposes
    def cases(device: str, quick: bool) -> list[Case]
and the runner times each case's `ours` against each of its `references` side by side."""
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class Case:
    op: str                                   # op or stage name, e.g. "deepstack_inject_rms_norm"
    case: str                                 # shape description, e.g. "8192x4096 nv=2304"
    dtype: torch.dtype
    ours: Callable[[], Any]                   # runs our kernel once
    references: Dict[str, Callable[[], Any]]  # name -> runs one reference (e.g. "hf_eager", "compile")
    bytes: Optional[int] = None               # bytes moved by one call of ours (for GB/s)
    flops: Optional[float] = None             # FLOPs of one call (for TFLOP/s)
    max_err: Optional[Callable[[], float]] = None  # max abs error of ours vs the fp32 reference
    tol: Optional[float] = None               # ok when max_err <= tol


@dataclasses.dataclass(frozen=True)
class Timing:
    """Spread of the per-call times of one function, in microseconds, over `runs` timed calls."""
    p20: float
    p50: float
    p80: float
    runs: int


def percentile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an ascending list, q in [0, 1]."""
    if not sorted_values:
        raise ValueError("percentile: argument 'sorted_values' must not be empty")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_stats(fn: Callable[[], Any], device: str, warmup: int = 5, iters: int = 30,
               min_time_s: float = 0.05) -> Timing:
    """Per-call times of `fn` after `warmup` calls: p20, median, p80 and the number of timed calls.

    CUDA: exactly `iters` calls, each timed with CUDA events, with the L2 flushed before each (a
    256 MB write) so memory-bound kernels are measured from HBM. CPU: perf_counter around each call;
    at least max(3, iters // 5) calls, then more until `min_time_s` has passed, at most `iters`
    (slow CPU cases stop early)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if device == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        for _ in range(iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        t_end = time.perf_counter() + min_time_s
        while len(times) < max(3, iters // 5) or (time.perf_counter() < t_end and len(times) < iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return Timing(percentile(times, 0.2), percentile(times, 0.5), percentile(times, 0.8), len(times))


def time_us(fn: Callable[[], Any], device: str, warmup: int = 5, iters: int = 30,
            min_time_s: float = 0.05) -> float:
    """Median time of one call in microseconds (see time_stats for what is measured)."""
    return time_stats(fn, device, warmup, iters, min_time_s).p50
