"""Non-local means with the k nearest patches: search -> weights -> wpsum -> fold average.

Each query patch is replaced by a weighted mean of its ``k`` nearest patches in the
space-time window, and the overlapping estimates are averaged back into the video. Queries
are processed in batches so memory is bounded by the batch, not the video: give ``batch``
(queries) or ``max_memory`` (bytes) and the other is derived.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .._checks import check_int, check_positive_number, check_video, fail
from .._grid import query_grid
from .._plan import plan_batches
from ..ops._cpu import torch_threads_quiet
from ..ops.fold import ifold
from ..ops.patches import wpsum
from ..ops.search import search

# Defaults chosen on astronaut 512x512, sigma 20/255, 2 CPU cores (see BENCHMARKS.md).
PS, WS, K, H = 5, 7, 14, 1.0


def _weights(dists: torch.Tensor, npix: int, sigma: float, h: float) -> torch.Tensor:
    """``softmax(-max(d / npix - 2 sigma^2, 0) / (h sigma)^2)`` over the last axis, written out
    (in place on one temporary): ``torch.softmax`` over 14 values a row costs ten times more."""
    e = dists.to(torch.float32 if dists.dtype != torch.float64 else dists.dtype)
    # (products, not powers: a Python float power past the range raises instead of giving inf;
    # the scale capped at the dtype's largest value: an infinite one would make 0 * inf = NaN
    # at each row's nearest neighbour, so a tiny h * sigma keeps the nearest ones instead)
    denom = npix * (h * sigma) * (h * sigma)
    top = torch.finfo(e.dtype).max
    scale = top if denom == 0 else min(1 / denom, top)
    e = e.sub(2 * npix * sigma * sigma).clamp_(min=0)
    e = e.sub_(e.amin(-1, keepdim=True)).mul_(-scale).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def batch_for_memory(
    shape: Sequence[int],
    max_memory: int,
    *,
    ps: int = PS,
    k: int = K,
    device: torch.device | str = "cpu",
) -> int:
    """Queries per batch that keep :func:`nlm` within ``max_memory`` bytes: the plan of
    :func:`dnls.plan_batches` for its steps (search, weights, wpsum, ifold).

    Raises:
        ValueError: when the budget does not hold one batch of a row of queries.
    """
    batch = plan_batches(
        shape, max_memory, k=k, ps=ps, steps=("search", "weights", "wpsum", "ifold"),
        device=device,
    )  # fmt: skip
    if batch < shape[-1]:
        fail("max_memory", max_memory, "a budget that holds one row of queries a batch")
    return batch


def nlm(
    noisy: torch.Tensor,
    sigma: float,
    *,
    ps: int = PS,
    ws: int = WS,
    wt: int = 0,
    k: int = K,
    h: float = H,
    batch: int | None = None,
    max_memory: int | None = None,
    flows: torch.Tensor | Sequence[torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise a video ``(B, T, C, H, W)`` with k-nearest-patch non-local means.

    Args:
        noisy: the noisy video, values in the scale of ``sigma`` (e.g. ``[0, 1]``).
        sigma: standard deviation of the noise.
        ps, ws, wt, k: patch size, window, temporal half-window and neighbours per patch.
        h: filtering strength relative to ``sigma``; the weight of a neighbour at mean squared
            patch distance ``d`` is ``exp(-max(d - 2 sigma^2, 0) / (h sigma)^2)``.
        batch: queries per batch (memory grows with it, not with the video); default 65536,
            or what ``max_memory`` allows.
        max_memory: a budget in bytes for the whole call (see :func:`batch_for_memory`).
        flows: optional flows for the space-time search (see :func:`dnls.search`); integer
            flows keep whole-pixel positions and the fused CPU kernels.
        progress: called as ``progress(done, total)`` (queries) after every batch.

    Returns:
        The denoised video, same shape and dtype as ``noisy``.

    Example:
        >>> noisy = torch.rand(1, 1, 3, 32, 32)
        >>> nlm(noisy, 0.1).shape
        torch.Size([1, 1, 3, 32, 32])
    """
    noisy = check_video("noisy", noisy)
    if noisy.ndim != 5:
        fail("noisy", noisy, "5-D (B, T, C, H, W)")
    sigma = check_positive_number("sigma", sigma)
    h = check_positive_number("h", h)
    if progress is not None and not callable(progress):
        fail("progress", progress, "None or a callable progress(done, total)", TypeError)
    if max_memory is not None:
        max_memory = check_int("max_memory", max_memory, min_value=1)
        limit = batch_for_memory(noisy.shape, max_memory, ps=ps, k=k, device=noisy.device)
        batch = limit if batch is None else min(batch, limit)
    batch = check_int("batch", 65536 if batch is None else batch, min_value=1)
    npix = ps * ps * noisy.shape[2]
    grid = query_grid(noisy.shape)
    out = counts = None
    # Whole-pixel flows keep every op on the fused CPU kernels; fractional ones send the search
    # to the reference path, which needs torch's threads.
    given = [flows] if torch.is_tensor(flows) else flows if isinstance(flows, (tuple, list)) else []
    fractional = [f for f in given if torch.is_tensor(f) and f.is_floating_point()]
    quiet = torch_threads_quiet(noisy.device) if not fractional else contextlib.nullcontext()
    with torch.no_grad(), quiet:
        for start, count in grid.batches(batch):
            dists, inds = search(
                noisy, ws=ws, wt=wt, ps=ps, k=k, flows=flows, start=start, count=count
            )
            weights = _weights(dists, npix, sigma, h)
            patches = wpsum(noisy, weights, inds, ps=ps)[:, 0]
            out, counts = ifold(patches, shape=noisy.shape, start=start, out=out, counts=counts)
            if progress is not None:
                progress(start + count, grid.count)
    return (out / counts).to(noisy.dtype)
