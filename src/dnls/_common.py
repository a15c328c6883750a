"""Helpers shared by the ops: head splitting, backend selection, launch shapes."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def split_heads(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """``(B, T, C, H, W)`` -> ``(B, HD, T, C // HD, H, W)`` (a view); 6-D input is kept."""
    if x.ndim == 6:
        return x
    b, t, c, h, w = x.shape
    return x.view(b, t, nheads, c // nheads, h, w).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, HD, T, C', H, W)`` -> ``(B, T, HD * C', H, W)``."""
    b, hd, t, c, h, w = x.shape
    return x.transpose(1, 2).reshape(b, t, hd * c, h, w)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Ops that have Triton kernels in this version.
TRITON_OPS = frozenset({"search", "gather", "scatter", "wpsum", "ifold", "attention"})


# The launch shapes (tiles, warps, settings) the Triton kernels take: the tuned ones for CUDA
# tensors; under the interpreter small ones, so that tiny test tensors cross tile edges, unless
# CUDA_LAUNCHES is set (benchmarks/offline.py's compiles, benchmarks/patches.py --smoke).
CUDA_LAUNCHES = False


def cuda_launch(device: torch.device) -> bool:
    """Whether a kernel launch on ``device`` takes CUDA's launch shapes."""
    return device.type == "cuda" or CUDA_LAUNCHES


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_cpu(device: torch.device) -> bool:
    """Whether CPU tensors may run the fused CPU kernels (numba): ``DNLS_BACKEND`` is ``auto``
    (``torch`` forces the reference path) and numba is installed. Each op also checks that
    its arguments are in the kernels' scope (see :mod:`dnls.ops._cpu`)."""
    choice = os.environ.get("DNLS_BACKEND", "auto").strip().lower() or "auto"
    has_numba = importlib.util.find_spec("numba") is not None
    return device.type == "cpu" and choice == "auto" and has_numba


def backend(device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on ``device``: ``"torch"`` or ``"triton"``.

    ``auto`` (the default) runs the Triton kernels on CUDA tensors when Triton is installed and
    the op has kernels, else the reference path. The environment variable ``DNLS_BACKEND``
    (``auto``, ``torch`` or ``triton``) forces a backend; ``triton`` on CPU tensors runs under
    Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before dnls launches a kernel.
    A forced backend that cannot run raises ``RuntimeError`` with the reason.
    """
    choice = os.environ.get("DNLS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"DNLS_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "torch":
        return "torch"
    has_kernel = op in TRITON_OPS and _triton_available()
    if choice == "auto":
        return "triton" if device.type == "cuda" and has_kernel else "torch"
    if op not in TRITON_OPS:
        raise RuntimeError(
            f"DNLS_BACKEND=triton was requested, but {op} has no Triton kernel in this version; "
            "unset DNLS_BACKEND or set it to 'torch' or 'auto'"
        )
    if not _triton_available():
        raise RuntimeError("DNLS_BACKEND=triton was requested, but Triton is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "DNLS_BACKEND=triton on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before starting Python"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"DNLS_BACKEND=triton cannot run on device {device}")
    return "triton"
