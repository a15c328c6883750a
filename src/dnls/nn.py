"""Neural-network layers on the dnls ops: non-local search and non-local (neighbourhood)
attention over videos.

The data path of :func:`non_local_attention` is the library's own, in three registered ops:

    dists, inds = search(q, k, dist="dot")          (B, HD, Q, K), (B, HD, Q, K, 3)
    weights     = softmax(scale * dists)            in float32 (float64 for float64 inputs)
    out         = wpsum(v, weights, inds)           (B, HD, Q, pt, C', ps, ps)
                  -> a reshape to the video (ps = pt = 1) or the fold average (ifold / counts)

so no ``Q x K x patch`` tensor is built, and everything traces under
``torch.compile(fullgraph=True)``. Neighbourhood attention of pixels (``k=None``, ``ps = pt =
1``, no flows, ``stride1 = 1``) is one registered op instead, ``dnls::attention``
(:mod:`dnls.ops.attention`): on the Triton backend scores, softmax and sum run in one kernel
and never write the ``Q x W`` logits. Modules keep hyperparameters (and their projections)
only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import _checks
from ._common import merge_heads, split_heads
from ._ref import acc_dtype
from .ops import attention as fused
from .ops.fold import ifold
from .ops.search import DISTS, SELF_MATCH, check_window, search

__all__ = ["NonLocalAttention", "NonLocalSearch", "non_local_attention"]


def _check_window(ws, wt, ps, pt, k, dist, stride1, dilation, border) -> None:
    """Hyperparameters of a window and a patch, checked when a module is built."""
    _checks.check_int("ws", ws, min_value=1)
    _checks.check_int("wt", wt, min_value=0)
    _checks.check_patch_geometry(ps, pt, dilation, border)
    if k is not None:
        _checks.check_int("k", k, min_value=1)
    _checks.check_choice("dist", dist, DISTS)
    _checks.check_positive_number("stride1", stride1)


def _default_scale(head_dim: int, ps: int, pt: int) -> float:
    return 1.0 / math.sqrt(head_dim * ps * ps * pt)


def non_local_attention(
    qvid: torch.Tensor,
    kvid: torch.Tensor,
    vvid: torch.Tensor,
    *,
    ws: int,
    wt: int = 0,
    ps: int = 1,
    pt: int = 1,
    k: int | None = None,
    dist: str = "dot",
    scale: float | None = None,
    nheads: int = 1,
    stride1: float = 1,
    dilation: int = 1,
    flows: torch.Tensor | Sequence[torch.Tensor] | None = None,
    border: str = "reflect",
) -> torch.Tensor:
    """Attention of every pixel over its space-time window (all of it, or its ``k`` nearest).

    For the query patch at each pixel, :func:`dnls.search` scores the candidate key patches of
    its window (``dist="dot"``: ``<q, k>``; ``"l2"``: ``-|q - k|^2``), the scores times ``scale``
    go through a softmax (computed in float32, float64 for float64 inputs), and
    :func:`dnls.wpsum` sums the value patches at the same positions with those weights. With
    ``ps = pt = 1`` that sum is the output pixel; otherwise the output patches are folded back
    and every pixel is the average of the patches that cover it. ``k=None`` attends to the
    whole window (neighbourhood attention); ``k`` keeps the ``k`` best-scoring candidates.

    Args:
        qvid, kvid, vvid: queries, keys and values, ``(B, T, C, H, W)`` (split into ``nheads``
            heads) or head-split ``(B, HD, T, C', H, W)``; same shape, dtype and device.
        ws, wt, stride1, flows: the window, as in :func:`dnls.search` (``2*wt + 1`` frames of
            ``ws x ws`` positions, slid inward at the borders, optionally moved by flows).
        ps, pt, dilation, border: the patches compared and summed (``ps = pt = 1``: pixels).
        k: candidates attended to per query; ``None`` for all ``(2*wt + 1) * ws * ws``.
        dist: ``"dot"`` or ``"l2"``.
        scale: multiplies the scores before the softmax; default
            ``1 / sqrt(C' * ps * ps * pt)``, ``C'`` the channels per head.
        nheads: heads of 5-D inputs.

    Returns:
        The output video in the layout and dtype of ``vvid``: ``(B, T, C, H, W)`` or
        ``(B, HD, T, C', H, W)``. Differentiable w.r.t. the three videos and floating flows.

    Example:
        >>> q, k, v = torch.rand(3, 1, 3, 16, 24, 24).unbind(0)
        >>> dnls.nn.non_local_attention(q, k, v, ws=5, wt=1, nheads=2).shape
        torch.Size([1, 3, 16, 24, 24])
    """
    vvid = _checks.check_video("vvid", vvid)
    qvid = _checks.check_video("qvid", qvid)
    kvid = _checks.check_video("kvid", kvid)
    _checks.check_same("kvid", kvid, "qvid", qvid)
    _checks.check_same("vvid", vvid, "qvid", qvid)
    dist = _checks.check_choice("dist", dist, DISTS)
    _checks.check_patch_geometry(ps, pt, dilation, border)
    hd = _checks.check_nheads(nheads, qvid, "qvid")
    q6, k6, v6 = (split_heads(x, hd) for x in (qvid, kvid, vvid))
    b, _, nframes, cph, height, width = q6.shape
    if scale is None:
        scale = _default_scale(cph, ps, pt)
    else:
        scale = _checks.check_positive_number("scale", scale)

    stride1 = _checks.check_positive_number("stride1", stride1)
    if fused.applies(ps, pt, k, flows, stride1, scale):
        ws = _checks.check_int("ws", ws, min_value=1)
        wt = _checks.check_int("wt", wt, min_value=0)
        check_window(ws, wt, stride1, (nframes, height, width))
        out6 = fused.attention(q6, k6, v6, ws=ws, wt=wt, scale=scale, dist=dist)
        return out6 if vvid.ndim == 6 else merge_heads(out6)
    dists, inds = search(
        q6, k6, ws=ws, wt=wt, ps=ps, pt=pt, k=k, dist=dist, stride1=stride1,
        dilation=dilation, flows=flows, border=border,
    )  # fmt: skip
    logits = dists.to(acc_dtype(dists.dtype)) * (scale if dist == "dot" else -scale)
    weights = torch.softmax(logits, dim=-1)
    # the registered op of :func:`dnls.wpsum`: ``inds`` come from search, so they need not be
    # checked again (on a (B, HD, Q, W, 3) index tensor that is a pass and a host sync)
    patches = torch.ops.dnls.wpsum(
        v6, weights, inds, ps=ps, pt=pt, dilation=dilation, border=border
    )
    if ps == 1 and pt == 1:  # one pixel per query, queries in raster order (t, h, w)
        out6 = patches.view(b, hd, nframes, height, width, cph).permute(0, 1, 2, 5, 3, 4)
    else:  # fold the patches of all heads at once: channels are head-major as in merge_heads
        q = patches.shape[2]
        flat = patches.permute(0, 2, 3, 1, 4, 5, 6).reshape(b, q, pt, hd * cph, ps, ps)
        shape = (b, nframes, hd * cph, height, width)
        vid, counts = ifold(flat, shape=shape, dilation=dilation, border=border)
        out6 = split_heads(vid / counts, hd)
    out6 = out6.to(vvid.dtype)
    return out6 if vvid.ndim == 6 else merge_heads(out6)


class NonLocalSearch(nn.Module):
    """:func:`dnls.search` with its hyperparameters stored: a layer that returns, for every
    query patch, the ``k`` nearest patches of its space-time window.

    Args:
        ws, wt, ps, pt, k, dist, stride0, stride1, dilation, nheads, self_match, border: as in
            :func:`dnls.search` (keyword-only).

    Shape:
        - qvid, kvid: ``(B, T, C, H, W)`` or ``(B, HD, T, C', H, W)``.
        - Output: ``dists (B, HD, Q, K)`` and ``inds (B, HD, Q, K, 3)``.

    Example:
        >>> layer = dnls.nn.NonLocalSearch(ws=7, wt=1, ps=5, k=8)
        >>> dists, inds = layer(torch.rand(1, 3, 3, 32, 32))
        >>> dists.shape
        torch.Size([1, 1, 3072, 8])
    """

    def __init__(
        self,
        *,
        ws: int,
        wt: int = 0,
        ps: int = 7,
        pt: int = 1,
        k: int | None = None,
        dist: str = "l2",
        stride0: int = 1,
        stride1: float = 1,
        dilation: int = 1,
        nheads: int = 1,
        self_match: str = "keep",
        border: str = "reflect",
    ) -> None:
        super().__init__()
        _check_window(ws, wt, ps, pt, k, dist, stride1, dilation, border)
        _checks.check_int("stride0", stride0, min_value=1)
        _checks.check_int("nheads", nheads, min_value=1)
        _checks.check_choice("self_match", self_match, SELF_MATCH)
        self.ws, self.wt, self.ps, self.pt, self.k = ws, wt, ps, pt, k
        self.dist, self.stride0, self.stride1, self.dilation = dist, stride0, stride1, dilation
        self.nheads, self.self_match, self.border = nheads, self_match, border

    def forward(
        self,
        qvid: torch.Tensor,
        kvid: torch.Tensor | None = None,
        *,
        flows: torch.Tensor | Sequence[torch.Tensor] | None = None,
        region: Sequence[int] | None = None,
        start: int = 0,
        count: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Search ``qvid`` against ``kvid`` (itself when ``None``); ``flows``, ``region``,
        ``start`` and ``count`` as in :func:`dnls.search`."""
        return search(
            qvid, kvid, ws=self.ws, wt=self.wt, ps=self.ps, pt=self.pt, k=self.k,
            dist=self.dist, stride0=self.stride0, stride1=self.stride1, dilation=self.dilation,
            nheads=self.nheads, flows=flows, region=region, start=start, count=count,
            self_match=self.self_match, border=self.border,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"ws={self.ws}, wt={self.wt}, ps={self.ps}, pt={self.pt}, k={self.k}, "
            f"dist={self.dist!r}, stride0={self.stride0}, stride1={self.stride1}, "
            f"dilation={self.dilation}, nheads={self.nheads}, self_match={self.self_match!r}, "
            f"border={self.border!r}"
        )


class NonLocalAttention(nn.Module):
    """Multi-head non-local attention over a video: 1x1 query/key/value projections,
    :func:`non_local_attention` in each head, and a 1x1 output projection.

    ``k=None`` is neighbourhood attention over the whole ``(2*wt + 1) x ws x ws`` window;
    ``k`` attends to the ``k`` best-scoring candidates only. With ``ps > 1`` queries and keys
    are compared as patches and the output patches are folded back by averaging.

    Args:
        dim: channels ``C`` of the input and output.
        nheads: heads; ``dim`` must be divisible by it.
        ws, wt, ps, pt, k, dist, scale, stride1, dilation, border: as in
            :func:`non_local_attention` (keyword-only).
        bias: whether the projections have a bias.

    Shape:
        - Input: ``(B, T, dim, H, W)``; optional ``flows`` as in :func:`dnls.search`.
        - Output: ``(B, T, dim, H, W)``.

    Under ``torch.autocast`` the projections run in the autocast dtype; the dnls ops take
    queries, keys and values in that one dtype, accumulate in float32, and the softmax is
    computed in float32.

    Example:
        >>> attn = dnls.nn.NonLocalAttention(32, 4, ws=7, wt=1)
        >>> attn(torch.rand(2, 3, 32, 24, 24)).shape
        torch.Size([2, 3, 32, 24, 24])
    """

    def __init__(
        self,
        dim: int,
        nheads: int,
        *,
        ws: int,
        wt: int = 0,
        ps: int = 1,
        pt: int = 1,
        k: int | None = None,
        dist: str = "dot",
        scale: float | None = None,
        stride1: float = 1,
        dilation: int = 1,
        border: str = "reflect",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dim = _checks.check_int("dim", dim, min_value=1)
        nheads = _checks.check_int("nheads", nheads, min_value=1)
        if dim % nheads:
            _checks.fail("nheads", nheads, f"a divisor of dim={dim}")
        _check_window(ws, wt, ps, pt, k, dist, stride1, dilation, border)
        if scale is not None:
            scale = _checks.check_positive_number("scale", scale)
        self.dim, self.nheads = dim, nheads
        self.ws, self.wt, self.ps, self.pt, self.k, self.dist = ws, wt, ps, pt, k, dist
        self.scale = scale if scale is not None else _default_scale(dim // nheads, ps, pt)
        self.stride1, self.dilation, self.border = stride1, dilation, border
        factory = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=bias, **factory)

    def forward(
        self,
        x: torch.Tensor,
        *,
        flows: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend ``x (B, T, dim, H, W)``; returns ``(B, T, dim, H, W)``."""
        x = _checks.check_video("x", x)
        if x.ndim != 5 or x.shape[2] != self.dim:
            _checks.fail("x", x, f"5-D (B, T, C, H, W) with C = dim = {self.dim}")
        b, t, c, h, w = x.shape
        hd = self.nheads
        # (B, T, H, W, 3C) -> three head-split views (B, HD, T, C', H, W)
        qkv = self.qkv(x.permute(0, 1, 3, 4, 2)).view(b, t, h, w, 3, hd, c // hd)
        q, k, v = qkv.permute(4, 0, 5, 1, 6, 2, 3).unbind(0)
        out = non_local_attention(
            q, k, v, ws=self.ws, wt=self.wt, ps=self.ps, pt=self.pt, k=self.k, dist=self.dist,
            scale=self.scale, stride1=self.stride1, dilation=self.dilation, flows=flows,
            border=self.border,
        )  # fmt: skip
        out = self.proj(out.permute(0, 2, 4, 5, 1, 3).reshape(b, t, h, w, c))
        return out.permute(0, 1, 4, 2, 3)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, nheads={self.nheads}, ws={self.ws}, wt={self.wt}, ps={self.ps}, "
            f"pt={self.pt}, k={self.k}, dist={self.dist!r}, scale={self.scale:.6g}, "
            f"stride1={self.stride1}, dilation={self.dilation}, border={self.border!r}"
        )
