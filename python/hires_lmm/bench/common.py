"""Benchmark harness shared by every family (python -m hires_lmm.bench).

A family module hires_lmm/bench/bench_<family>.py exposes
    def cases(device: str, quick: bool) -> list[Case]
and the runner times each case's `ours` against each of its `references` side by side."""
import dataclasses
import statistics
import time
from typing import Any, Callable, Dict, Optional

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


def time_us(fn: Callable[[], Any], device: str, warmup: int = 5, iters: int = 30,
            min_time_s: float = 0.05) -> float:
    """Median time of one call in microseconds. On CUDA: CUDA events, L2 flushed between calls
    (a 256 MB write) so memory-bound kernels are measured from HBM; on CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        times = []
        for _ in range(iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)
    times = []
    t_end = time.perf_counter() + min_time_s
    n = 0
    while n < max(3, iters // 5) or (time.perf_counter() < t_end and n < iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        n += 1
    return statistics.median(times)
