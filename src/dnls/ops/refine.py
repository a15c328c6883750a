"""refine: coarse-to-fine search in small windows around positions found earlier.

Layout: parameters -> candidate geometry -> reference forward/backward (plain PyTorch, chunked
so the workspace never grows with the number of queries) -> ``torch.library`` registration ->
the public function.

Candidates of query ``q``: for each of the first ``kr`` given positions ``x_r = (t_r, h_r, w_r)``
(``r = 0 .. kr-1``), a ``wr x wr`` grid with spacing ``stride1`` in frame ``t_r``, centred on
``(h_r, w_r)`` and slid inward where it would leave the frame. Candidate index
``j = r*wr*wr + a*wr + b``: given position first, then rows, then columns. Overlapping grids
keep their duplicates as distinct candidates.

Backward. With ``q`` the query patch, ``k_j`` the patch of candidate ``j`` at position ``y_j``
and ``g_j = dL/d dist_j``, the patch gradients are those of ``search``:

    l2:  dL/dq = sum_j 2 g_j (q - k_j),  dL/dk_j = -2 g_j (q - k_j)
    dot: dL/dq = sum_j g_j k_j,          dL/dk_j = g_j q
    y_j = clamp(x_r) + offset  ->  dL/dx_r += <dL/dk_j, dk_j/dy_j> + dL/dy_j  where the clamp
                                  is inactive (floating given positions only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .. import _checks
from .._common import backend
from .._grid import QueryGrid
from .._ref import PatchGeom, flat_video, read, read_dpos
from .search import (
    DISTS,
    SELF_MATCH,
    WORKSPACE,
    _check_videos,
    _chunks,
    _distance,
    _distance_backward,
    _schema_params,
    _select,
    _selected_dists,
    check_span,
)


@dataclass(frozen=True)
class RefineParams:
    wr: int
    kr: int
    k: int  # -1: every candidate, in candidate order
    ps: int
    pt: int
    dist: str
    stride0: int
    stride1: float
    dilation: int
    region: tuple[int, int, int, int, int, int]
    start: int
    count: int
    self_match: str
    border: str

    @property
    def nwin(self) -> int:
        """The number of candidates of every query, ``kr * wr * wr``."""
        return self.kr * self.wr * self.wr

    @property
    def nk(self) -> int:
        """``K``, the number of results per query."""
        return self.k if self.k >= 0 else self.nwin

    @property
    def geom(self) -> PatchGeom:
        return PatchGeom(self.ps, self.pt, self.dilation, self.border)

    def grid(self, thw: tuple[int, int, int]) -> QueryGrid:
        return QueryGrid(thw, self.stride0, self.region)


def _whole(inds: torch.Tensor, stride1: float) -> bool:
    return not inds.is_floating_point() and float(stride1).is_integer()


def _pos_dtype(vid: torch.Tensor, inds: torch.Tensor, stride1: float) -> torch.dtype:
    """int64 for whole-pixel candidates, else the float dtype positions are computed in."""
    if _whole(inds, stride1):
        return torch.int64
    if torch.float64 in (vid.dtype, inds.dtype):
        return torch.float64
    return torch.float32


def _inds_dtype(inds: torch.Tensor, stride1: float) -> torch.dtype:
    return torch.int32 if _whole(inds, stride1) else torch.float32


# ---------------------------------------------------------------------------------------------
# Candidate geometry
# ---------------------------------------------------------------------------------------------


@dataclass
class _Windows:
    frames: torch.Tensor  # (B, HD, n, kr) frame of each window
    center: torch.Tensor  # (B, HD, n, kr, 2) slid centres
    free: torch.Tensor  # (B, HD, n, kr, 2) True where the slide did not move the centre
    offsets: torch.Tensor  # (wr,) grid offsets


def _windows(given: torch.Tensor, hw: tuple[int, int], p: RefineParams, dtype) -> _Windows:
    """The slid windows around the given positions ``(B, HD, n, kr, 3)``."""
    height, width = hw
    lo_steps = p.wr // 2
    hi_steps = p.wr - 1 - lo_steps
    s1 = int(p.stride1) if dtype == torch.int64 else p.stride1
    center = given[..., 1:].to(dtype)
    lo = lo_steps * s1
    hi = torch.tensor(
        [height - 1 - hi_steps * s1, width - 1 - hi_steps * s1], device=given.device
    ).to(dtype)
    slid = torch.maximum(torch.minimum(center, hi), torch.full_like(hi, lo))
    free = (center >= lo) & (center <= hi)
    offsets = ((torch.arange(p.wr, device=given.device) - lo_steps) * s1).to(dtype)
    return _Windows(given[..., 0].round().long(), slid, free, offsets)


def _candidates(win: _Windows, p: RefineParams) -> torch.Tensor:
    """All ``kr * wr * wr`` candidate positions ``(B, HD, n, kr*wr*wr, 3)`` in order."""
    b, hd, n, kr, _ = win.center.shape
    wr = p.wr
    ph = win.center[..., 0, None, None] + win.offsets[:, None]  # (B, HD, n, kr, wr, 1)
    pw = win.center[..., 1, None, None] + win.offsets[None, :]  # (B, HD, n, kr, 1, wr)
    pt = win.frames.to(ph.dtype)[..., None, None]
    shape = (b, hd, n, kr, wr, wr)
    pos = torch.stack([pt.expand(shape), ph.expand(shape), pw.expand(shape)], dim=-1)
    return pos.reshape(b, hd, n, kr * wr * wr, 3)


def _positions(win: _Windows, widx: torch.Tensor, qpos: torch.Tensor, p: RefineParams):
    """Positions ``(B, HD, n, K, 3)`` of candidate indices ``widx`` ``(B, HD, n, K)`` (``-1``:
    the query's own position ``qpos`` ``(n, 3)``), their window ``r`` and whether their centre
    moves with the given position ``(B, HD, n, K, 2)``."""
    b, hd, n, nk = widx.shape
    wi = widx.long().clamp(min=0)
    wr2 = p.wr * p.wr
    r, a, c = wi // wr2, (wi // p.wr) % p.wr, wi % p.wr
    center = win.center.gather(3, r[..., None].expand(b, hd, n, nk, 2))
    free = win.free.gather(3, r[..., None].expand(b, hd, n, nk, 2)) & (widx >= 0)[..., None]
    frames = win.frames.gather(3, r)
    pos = torch.stack(
        [frames.to(center.dtype), center[..., 0] + win.offsets[a], center[..., 1] + win.offsets[c]],
        dim=-1,
    )
    own = qpos.to(pos.dtype)[:, None].expand(b, hd, n, nk, 3)
    return torch.where((widx < 0)[..., None], own, pos), r, free


# ---------------------------------------------------------------------------------------------
# Reference forward and backward. qvid, kvid: (B, HD, T, C, H, W); inds: (B, HD, Q, K, 3).
# ---------------------------------------------------------------------------------------------


def _refine_ref(qvid, kvid, inds, p: RefineParams):
    b, hd, nframes, c, height, width = qvid.shape
    thw = (nframes, height, width)
    shape6, geom = tuple(qvid.shape), p.geom
    qflat, kflat = flat_video(qvid), flat_video(kvid)
    pdtype = _pos_dtype(qvid, inds, p.stride1)
    nwin, nk = p.nwin, p.nk
    patch = p.pt * c * p.ps * p.ps
    dists = torch.empty((b, hd, p.count, nk), dtype=qflat.dtype, device=qflat.device)
    out = torch.empty(b, hd, p.count, nk, 3, dtype=_inds_dtype(inds, p.stride1), device=qvid.device)
    widx = torch.empty(b, hd, p.count, nk, dtype=torch.int32, device=qvid.device)
    wchunk = max(1, min(nwin, WORKSPACE // max(1, b * hd * patch)))
    for c0, n in _chunks(p.count, b * hd * nwin * patch):
        chunk = slice(c0, c0 + n)
        qpos = p.grid(thw).positions(p.start + c0, n, device=qvid.device)
        win = _windows(inds[:, :, chunk, : p.kr], (height, width), p, pdtype)
        cands = _candidates(win, p)  # (B, HD, n, nwin, 3)
        qpos6 = qpos.to(pdtype).expand(b, hd, n, 3)
        qp = read(qflat, shape6, qpos6, geom)[:, :, :, None]  # (B, HD, n, 1, pt, C, ps, ps)
        d = torch.empty((b, hd, n, nwin), dtype=qflat.dtype, device=qflat.device)
        for w0 in range(0, nwin, wchunk):
            w1 = min(nwin, w0 + wchunk)
            pos = cands[:, :, :, w0:w1].reshape(b, hd, n * (w1 - w0), 3)
            kp = read(kflat, shape6, pos, geom)
            d[..., w0:w1] = _distance(qp, kp.view(b, hd, n, w1 - w0, *kp.shape[3:]), p.dist)
        own = (cands == qpos[:, None, :].to(pdtype)).all(-1)  # (B, HD, n, nwin)
        sel = _select(d, own, p)
        widx[:, :, chunk] = sel.to(torch.int32)
        picked = sel.clamp(min=0)
        dists[:, :, chunk] = _selected_dists(d, picked, p.k, p.dist)
        out[:, :, chunk] = cands.gather(-2, picked[..., None].expand(*picked.shape, 3))
        if p.self_match == "anchor":  # the query itself, whether or not it is a candidate
            own_kp = read(kflat, shape6, qpos6, geom)[:, :, :, None]
            dists[:, :, chunk, 0] = _distance(qp, own_kp, p.dist)[..., 0]
            out[:, :, chunk, 0] = qpos6
    return dists.to(qvid.dtype), out, widx


def _refine_backward_ref(gdists, ginds, qvid, kvid, inds, widx, p: RefineParams):
    b, hd, nframes, c, height, width = qvid.shape
    thw = (nframes, height, width)
    shape6, geom = tuple(qvid.shape), p.geom
    qflat, kflat = flat_video(qvid), flat_video(kvid)
    acc = qflat.dtype
    pdtype = _pos_dtype(qvid, inds, p.stride1)
    nk = p.nk
    gq = torch.zeros(shape6, dtype=acc, device=qvid.device)
    gk = torch.zeros(shape6, dtype=acc, device=qvid.device)
    pos_grad = inds.is_floating_point()
    gi = torch.zeros(inds.shape, dtype=acc, device=qvid.device)
    patch = p.pt * c * p.ps * p.ps
    for c0, n in _chunks(p.count, b * hd * max(nk, 1) * patch):
        chunk = slice(c0, c0 + n)
        qpos = p.grid(thw).positions(p.start + c0, n, device=qvid.device)
        win = _windows(inds[:, :, chunk, : p.kr], (height, width), p, pdtype)
        pos, r, free = _positions(win, widx[:, :, chunk], qpos, p)
        pos_flat = pos.reshape(b, hd, n * nk, 3)
        qpos6 = qpos.to(pdtype).expand(b, hd, n, 3)
        g = gdists[:, :, chunk].to(acc)
        dq, dk, gkp = _distance_backward(qflat, kflat, shape6, geom, qpos6, pos_flat, g, p.dist)
        gq += dq
        gk += dk
        if not pos_grad:
            continue
        gpos = read_dpos(kflat, shape6, pos_flat, geom, gkp).view(b, hd, n, nk, 3)
        if ginds is not None:
            gpos = gpos + ginds[:, :, chunk].to(acc)
        contrib = gpos[..., 1:] * free  # the anchored own position carries none
        gi[:, :, chunk, :, 1:].scatter_add_(3, r[..., None].expand(b, hd, n, nk, 2), contrib)
    gi = gi.to(inds.dtype) if pos_grad else qvid.new_empty(0)
    return gq.to(qvid.dtype), gk.to(kvid.dtype), gi


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _params(kw: dict) -> RefineParams:
    return RefineParams(**{**kw, "region": tuple(kw["region"])})


torch.library.define(
    "dnls::refine",
    "(Tensor qvid, Tensor kvid, Tensor inds, *, "
    f"{_schema_params(RefineParams)}) -> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "dnls::refine_backward",
    "(Tensor gdists, Tensor? ginds, Tensor qvid, Tensor kvid, Tensor inds, Tensor widx, *, "
    f"{_schema_params(RefineParams)}) -> (Tensor, Tensor, Tensor)",
)


@torch.library.impl("dnls::refine", "default")
def _refine_impl(qvid, kvid, inds, **kw):
    backend(qvid.device, "refine")  # raises where an explicitly requested backend cannot run
    return _refine_ref(qvid, kvid, inds, _params(kw))


@torch.library.register_fake("dnls::refine")
def _(qvid, kvid, inds, *, kr, wr, k, count, stride1, **_):
    b, hd = qvid.shape[:2]
    nk = k if k >= 0 else kr * wr * wr
    return (
        qvid.new_empty(b, hd, count, nk),
        qvid.new_empty(b, hd, count, nk, 3, dtype=_inds_dtype(inds, stride1)),
        qvid.new_empty(b, hd, count, nk, dtype=torch.int32),
    )


@torch.library.impl("dnls::refine_backward", "default")
def _refine_backward_impl(gdists, ginds, qvid, kvid, inds, widx, **kw):
    backend(qvid.device, "refine")
    return _refine_backward_ref(gdists, ginds, qvid, kvid, inds, widx, _params(kw))


@torch.library.register_fake("dnls::refine_backward")
def _(gdists, ginds, qvid, kvid, inds, widx, **_):
    gi = inds.new_empty(inds.shape) if inds.is_floating_point() else qvid.new_empty(0)
    return qvid.new_empty(qvid.shape), kvid.new_empty(kvid.shape), gi


def _refine_setup(ctx, inputs, keyword_only_inputs, output):
    qvid, kvid, inds = inputs
    ctx.kw = dict(keyword_only_inputs)
    ctx.save_for_backward(qvid, kvid, inds, output[2])


def _refine_backward(ctx, gdists, ginds, _gwidx):
    qvid, kvid, inds, widx = ctx.saved_tensors
    float_pos = inds.is_floating_point()
    ginds = ginds if (float_pos and ginds is not None and ginds.is_floating_point()) else None
    gq, gk, gi = torch.ops.dnls.refine_backward(gdists, ginds, qvid, kvid, inds, widx, **ctx.kw)
    return gq, gk, (gi if float_pos else None)


torch.library.register_autograd("dnls::refine", _refine_backward, setup_context=_refine_setup)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def refine(
    qvid: torch.Tensor,
    kvid: torch.Tensor | None,
    inds: torch.Tensor,
    *,
    wr: int,
    kr: int | None = None,
    k: int | None = None,
    ps: int = 7,
    pt: int = 1,
    dist: str = "l2",
    stride0: int = 1,
    stride1: float = 1,
    dilation: int = 1,
    nheads: int = 1,
    region: Sequence[int] | None = None,
    start: int = 0,
    count: int | None = None,
    self_match: str = "keep",
    border: str = "reflect",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search small windows around positions found earlier (coarse-to-fine).

    For each query, the candidates are the ``wr x wr`` grids (spacing ``stride1``) centred on
    each of its first ``kr`` given positions, in the given position's frame, each grid slid
    inward where it would leave the frame. Candidate order: given position, then rows, then
    columns. Overlapping grids are not merged: a position in two grids is two candidates.

    Args:
        qvid: queries, ``(B, T, C, H, W)`` or head-split ``(B, HD, T, C', H, W)``.
        kvid: keys of the same shape; ``None`` refines ``qvid`` against itself.
        inds: positions ``(B, HD, Q, K, 3)`` for the same queries (as returned by
            :func:`search` with the same ``stride0``, ``region``, ``start`` and ``count``);
            integer, or floating for sub-pixel positions (read bilinearly, differentiable).
        wr: the side of each window; ``(wr - 1) * stride1`` must fit the frame.
        kr: how many of the ``K`` given positions to refine around (default all).
        k: results per query; ``None`` returns all ``kr*wr*wr`` candidates in order.
        ps, pt, dilation, border, dist, stride0, stride1, nheads, region, start, count:
            as in :func:`search`.
        self_match: ``"keep"``; ``"anchor"`` (the query's own position first, then the
            ``k - 1`` nearest other candidates) or ``"exclude"`` (its own position never
            returned) need ``k``.

    Returns:
        ``dists (B, HD, Q, K)`` in the input dtype and ``inds (B, HD, Q, K, 3)``: int32 for
        integer ``inds`` and a whole ``stride1``, else float32. Ties go to the earlier
        candidate. Differentiable w.r.t. ``qvid``, ``kvid`` and floating ``inds`` (through
        ``dists`` and the returned float positions).

    Example:
        >>> vid = torch.rand(1, 4, 3, 32, 32)
        >>> _, coarse = dnls.search(vid, ws=9, wt=1, ps=5, k=4, stride1=2)
        >>> dists, inds = dnls.refine(vid, None, coarse, wr=3, kr=4, k=8, ps=5)
        >>> dists.shape, inds.shape
        (torch.Size([1, 1, 4096, 8]), torch.Size([1, 1, 4096, 8, 3]))
    """
    q6, k6 = _check_videos(qvid, kvid, nheads)
    b, hd, nframes, _, height, width = q6.shape
    thw = (nframes, height, width)

    wr = _checks.check_int("wr", wr, min_value=1)
    _checks.check_patch_geometry(ps, pt, dilation, border)
    dist = _checks.check_choice("dist", dist, DISTS)
    self_match = _checks.check_choice("self_match", self_match, SELF_MATCH)
    stride0 = _checks.check_int("stride0", stride0, min_value=1)
    stride1 = _checks.check_positive_number("stride1", stride1)
    check_span("wr", wr, stride1, height, width)
    region = _checks.check_region(region, thw)
    grid = QueryGrid(thw, stride0, region)
    start, count = _checks.check_start_count(start, count, grid.count)

    inds = _checks.check_tensor("inds", inds)
    if inds.ndim != 5 or inds.shape[-1] != 3 or inds.shape[3] < 1:
        _checks.fail("inds", inds, "5-D (B, HD, Q, K, 3) with K >= 1")
    expected = (b, hd, count, inds.shape[3], 3)
    if tuple(inds.shape) != expected:
        _checks.fail(
            "inds", inds, f"of shape {expected}: (B, HD, Q, K, 3) with Q = count = {count}"
        )
    if inds.device != qvid.device:
        _checks.fail("inds", inds, f"on the video's device ({qvid.device})")
    _checks.check_positions("inds", inds, thw, expected[:4])

    nk_given = inds.shape[3]
    if kr is None:
        kr = nk_given
    kr = _checks.check_int("kr", kr, min_value=1)
    if kr > nk_given:
        _checks.fail("kr", kr, f"at most K = {nk_given}, the positions given per query")
    if self_match != "keep" and k is None:
        _checks.fail(
            "self_match",
            self_match,
            "'keep' when k is None (the query's own position may be a candidate any number of "
            "times); pass k",
        )
    # The own position is in each window at most once: at least kr * (wr*wr - 1) others.
    kmax = {"keep": kr * wr * wr, "exclude": kr * (wr * wr - 1), "anchor": kr * (wr * wr - 1) + 1}
    if k is not None:
        k = _checks.check_int("k", k, min_value=1)
        if k > kmax[self_match]:
            _checks.fail(
                "k",
                k,
                f"at most {kmax[self_match]} for kr={kr}, wr={wr} and self_match={self_match!r}",
            )

    p = RefineParams(
        wr,
        kr,
        -1 if k is None else k,
        ps,
        pt,
        dist,
        stride0,
        stride1,
        dilation,
        region,
        start,
        count,
        self_match,
        border,
    )
    # by fields, not p.__dict__: Dynamo (torch 2.11) cannot trace a dataclass's __dict__
    kw = {f.name: getattr(p, f.name) for f in fields(p)}
    kw["region"] = list(p.region)
    dists, out, _ = torch.ops.dnls.refine(q6, k6, inds, **kw)
    return dists, out
