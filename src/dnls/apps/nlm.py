"""Non-local means with the k nearest patches: search -> weights -> wpsum -> fold average.

Each query patch is replaced by a weighted mean of its ``k`` nearest patches in the
space-time window, and the overlapping estimates are averaged back into the video. Queries
are processed in batches of ``batch`` so memory is bounded by the batch, not the video.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import check_int, check_positive_number, check_video, fail
from .._grid import query_grid
from ..ops.fold import ifold
from ..ops.patches import wpsum
from ..ops.search import search


def nlm(
    noisy: torch.Tensor,
    sigma: float,
    *,
    ps: int = 5,
    ws: int = 11,
    wt: int = 0,
    k: int = 14,
    h: float = 0.6,
    batch: int = 8192,
    flows: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise a video ``(B, T, C, H, W)`` with k-nearest-patch non-local means.

    Args:
        noisy: the noisy video, values in the scale of ``sigma`` (e.g. ``[0, 1]``).
        sigma: standard deviation of the noise.
        ps, ws, wt, k: patch size, window, temporal half-window and neighbours per patch.
        h: filtering strength relative to ``sigma``; the weight of a neighbour at mean squared
            patch distance ``d`` is ``exp(-max(d - 2 sigma^2, 0) / (h sigma)^2)``.
        batch: queries per batch (memory grows with it, not with the video).
        flows: optional flows for the space-time search (see :func:`dnls.search`).

    Returns:
        The denoised video, same shape and dtype as ``noisy``.
    """
    noisy = check_video("noisy", noisy)
    if noisy.ndim != 5:
        fail("noisy", noisy, "5-D (B, T, C, H, W)")
    sigma = check_positive_number("sigma", sigma)
    h = check_positive_number("h", h)
    batch = check_int("batch", batch, min_value=1)
    npix = ps * ps * noisy.shape[2]
    out = counts = None
    with torch.no_grad():
        for start, count in query_grid(noisy.shape).batches(batch):
            dists, inds = search(
                noisy, ws=ws, wt=wt, ps=ps, k=k, flows=flows, start=start, count=count
            )
            excess = (dists.float() / npix - 2 * sigma**2).clamp(min=0)
            weights = torch.softmax(-excess / (h * sigma) ** 2, dim=-1)
            patches = wpsum(noisy, weights, inds, ps=ps)[:, 0]
            out, counts = ifold(patches, shape=noisy.shape, start=start, out=out, counts=counts)
    return (out / counts).to(noisy.dtype)
