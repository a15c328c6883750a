"""Helpers shared by the ops: head splitting and backend selection."""

from __future__ import annotations

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


def backend(device: torch.device) -> str:
    """The backend that runs an op on ``device``: ``"torch"`` or ``"triton"``.

    ``DNLS_BACKEND`` (``auto``, ``torch`` or ``triton``) forces one; ``auto`` picks the reference
    path. The Triton kernels are not part of this version, so an explicit ``triton`` request
    raises with that reason rather than silently running something else.
    """
    choice = os.environ.get("DNLS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"DNLS_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "triton":
        raise RuntimeError(
            "DNLS_BACKEND=triton was requested, but this version of dnls has no Triton kernels "
            f"yet (device {device}); unset DNLS_BACKEND or set it to 'torch' or 'auto'"
        )
    return "torch"
