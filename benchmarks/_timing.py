"""Timing and peak-memory helpers shared by the GPU benchmark scripts of this folder."""

from __future__ import annotations

from collections.abc import Callable

import torch


def bench(fn: Callable, rep_ms: int, warmup_ms: int) -> float:
    """Median CUDA-event time of ``fn`` in ms, over ``rep_ms`` after ``warmup_ms`` of warm-up."""
    import triton.testing  # here, so a CPU run of attention.py needs no Triton for peak_mb

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def peak_mb(fn: Callable) -> float:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def kernel_ms(fn: Callable, reps: int = 5) -> float:
    """GPU time of the kernels ``fn`` launches, per call, in ms (torch profiler): the median
    CUDA-event time of :func:`bench` also holds the host's time where it launches more slowly
    than the GPU runs."""
    return sum(ms for _, ms in kernel_breakdown(fn, reps))


def kernel_breakdown(fn: Callable, reps: int = 5) -> list[tuple[str, float]]:
    """GPU time per call of each kernel ``fn`` launches (torch profiler), in ms, the longest
    first: which of an op's kernels takes its time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / reps / 1000) for e in prof.key_averages()]
    return sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])


def host_ms(fn: Callable, reps: int = 20) -> float:
    """Host time per call of ``fn`` in ms: ``reps`` calls in a row, timed on the host before
    the final synchronisation. Where it exceeds the kernels' time, the host, not the GPU, sets
    the op's pace (its launches, or a synchronisation inside the op)."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / reps * 1000
