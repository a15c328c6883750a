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
