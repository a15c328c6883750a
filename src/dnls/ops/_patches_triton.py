"""Triton kernels for the patch ops: gather, scatter, wpsum (forward and backward) and ifold.

Imported only when the Triton backend runs, so ``import dnls`` never needs Triton.

Shapes (head-split): ``vid (B, HD, T, C, H, W)`` read through its strides; ``inds (B, HD, Q, K,
3)`` contiguous; a patch is ``E = pt * C * ps * ps`` elements in ``(pt, C, ps, ps)`` order. A
patch element ``e = (dt, c, i, j)`` of the patch at ``(t, y, x)`` is the pixel
``(t + dt, y + (i - ps//2) * dil, x + (j - ps//2) * dil)`` through the border rule; at a
fractional ``(y, x)`` it is the bilinear mix of the four corners around that point:

    v = (1-fy) * ((1-fx) v00 + fx v01) + fy * ((1-fx) v10 + fx v11) = (1-fy) top + fy bot
    dv/dy = bot - top,   dv/dx = (1-fy) (v01 - v00) + fy (v11 - v10)

Backward, with ``P(v, x)`` the patches of ``v`` at ``x`` and ``S = P^T`` (a scatter-add):

    gather:  gvid = S(g, x)             gx = <g, dP/dx>          (gather_dpos_kernel)
    wpsum:   out_q = sum_k w_qk P(v, x_qk)
             gvid = sum_k S(w_qk g_q, x_qk)   gw_qk = <g_q, P(v, x_qk)>   gx_qk = <w_qk g_q, dP/dx>

Reads are gathers that coalesce along ``j`` (consecutive columns). Generic scatters add with
atomics into a float32 (float64) buffer, so their bits can vary between runs. At whole
positions they can also go by anchors: the entries grouped by position, each position's
patches summed once into one patch per pixel of the box that holds the positions (positions
from a search hold each pixel about K times), and that patch added into the video with
atomics, about K times fewer than one per entry. One-pixel patches fold the per-position sums
into the video as ``ifold`` does instead (no atomics; the entries grouped by a counting sort,
so the order of each position's sum, and its bits, can vary between runs). Under
``torch.use_deterministic_algorithms(True)`` every patch sorts its entries stably and folds:
the same bits on every run. In that mode the other scatters add into int64 accumulators, each
contribution rounded to a fixed point ``1 / scale`` (``scale`` the largest power of two that
no sum can overflow): integer addition is associative, so every run gives the same bits.
``ifold`` (patches on a query grid) needs no atomics: each output pixel sums the patch
elements that land on it, so it is deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _checks
from .._common import cuda_launch, next_power_of_2
from .._ref import count_ones
from ._layout import channels_first, channels_last
from ._search_triton import (
    _TL_DTYPES,
    _accumulate,
    _border,
    _fixed_point,
    _inside,
    _query_position,
)

# Border modes: ZERO reads zero outside; REFLECT mirrors any distance; BOUNCE mirrors once,
# which is exact when no read reaches past a mirror image of the frame (the launcher checks).
ZERO, REFLECT, BOUNCE = 0, 1, 2


@triton.jit
def _bound(i, n, BORDER: tl.constexpr):
    """Index into [0, n) by the border rule, and its validity."""
    if BORDER == 2:
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= n, 2 * n - 2 - i, i)
        return i, i >= 0
    else:
        return _border(i, n, BORDER == 1)


@triton.jit
def _offset(t, y, x, T, H, W, s_t, s_y, s_x, BORDER: tl.constexpr, I64: tl.constexpr):
    """In-video offset of whole pixels (t, y, x) through the border rule, and their validity.
    I64: offsets in int64 (videos of 2^31 elements or more), else int32."""
    ti, tv = _bound(t, T, BORDER)
    yi, yv = _bound(y, H, BORDER)
    xi, xv = _bound(x, W, BORDER)
    if I64:
        off = ti.to(tl.int64) * s_t + yi.to(tl.int64) * s_y + xi.to(tl.int64) * s_x
    else:
        off = ti * s_t + yi * s_y + xi * s_x
    return off, tv & yv & xv


@triton.jit
def _element(e, C: tl.constexpr, PS: tl.constexpr, DIL: tl.constexpr):
    """Patch element index -> frame offset, channel, row offset, column offset."""
    dt = e // (C * PS * PS)
    c = (e // (PS * PS)) % C
    oy = ((e // PS) % PS - PS // 2) * DIL
    ox = (e % PS - PS // 2) * DIL
    return dt, c, oy, ox


@triton.jit
def _pixel_major(e, C: tl.constexpr, PS: tl.constexpr):
    """Patch element ``e`` counted pixel by pixel (frame, row, column, then channel innermost)
    -> its index in the patch's own order (frame, channel, row, column)."""
    c = e % C
    p = e // C
    return ((p // (PS * PS) * C + c) * PS + (p // PS) % PS) * PS + p % PS


@triton.jit
def _load_pos(inds, n, mask, WHOLE: tl.constexpr, ACC: tl.constexpr):
    """Position ``(t, y, x)`` of patch ``n``: t whole; y, x whole, or floating in ACC."""
    pt = tl.load(inds + n * 3, mask=mask, other=0)
    py = tl.load(inds + n * 3 + 1, mask=mask, other=0)
    px = tl.load(inds + n * 3 + 2, mask=mask, other=0)
    if WHOLE:
        t = pt
    else:
        t = tl.floor(pt + 0.5).to(tl.int32)
        py = py.to(ACC)
        px = px.to(ACC)
    return t, py, px


@triton.jit
def _corners(
    t, y, x, T, H, W, s_t, s_y, s_x,
    BORDER: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The bilinear fractions (fy, fx) at fractional (y, x) and the offset and validity of the
    four corners (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)."""
    y0f = tl.floor(y)
    x0f = tl.floor(x)
    fy = (y - y0f).to(ACC)
    fx = (x - x0f).to(ACC)
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    o00, k00 = _offset(t, y0, x0, T, H, W, s_t, s_y, s_x, BORDER, I64)
    o01, k01 = _offset(t, y0, x0 + 1, T, H, W, s_t, s_y, s_x, BORDER, I64)
    o10, k10 = _offset(t, y0 + 1, x0, T, H, W, s_t, s_y, s_x, BORDER, I64)
    o11, k11 = _offset(t, y0 + 1, x0 + 1, T, H, W, s_t, s_y, s_x, BORDER, I64)
    return fy, fx, o00, k00, o01, k01, o10, k10, o11, k11


@triton.jit
def _read(
    base, t, y, x, T, H, W, s_t, s_y, s_x, mask,
    BORDER: tl.constexpr, I64: tl.constexpr, WHOLE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Value at (t, y, x) (bilinear when not WHOLE) and, when not WHOLE, d value / d (y, x)."""
    if WHOLE:
        off, ok = _offset(t, y, x, T, H, W, s_t, s_y, s_x, BORDER, I64)
        v = tl.load(base + off, mask=mask & ok, other=0.0).to(ACC)
        dy = v
        dx = v
    else:
        fy, fx, o00, k00, o01, k01, o10, k10, o11, k11 = _corners(
            t, y, x, T, H, W, s_t, s_y, s_x, BORDER, I64, ACC
        )
        v00 = tl.load(base + o00, mask=mask & k00, other=0.0).to(ACC)
        v01 = tl.load(base + o01, mask=mask & k01, other=0.0).to(ACC)
        v10 = tl.load(base + o10, mask=mask & k10, other=0.0).to(ACC)
        v11 = tl.load(base + o11, mask=mask & k11, other=0.0).to(ACC)
        top = v00 * (1 - fx) + v01 * fx
        bot = v10 * (1 - fx) + v11 * fx
        v = top * (1 - fy) + bot * fy
        dy = bot - top
        dx = (v01 - v00) * (1 - fy) + (v11 - v10) * fy
    return v, dy, dx


@triton.jit
def _add(
    base, t, y, x, T, H, W, s_t, s_y, s_x, val, mask, scale,
    BORDER: tl.constexpr, I64: tl.constexpr, WHOLE: tl.constexpr, ACC: tl.constexpr,
    FIXED: tl.constexpr,
):  # fmt: skip
    """Atomically add ``val`` at (t, y, x) (split over the bilinear corners when not WHOLE):
    the adjoint of :func:`_read`. FIXED: into int64 accumulators at fixed point ``scale``."""
    if WHOLE:
        off, ok = _offset(t, y, x, T, H, W, s_t, s_y, s_x, BORDER, I64)
        _accumulate(base + off, val, mask & ok, scale, FIXED)
    else:
        fy, fx, o00, k00, o01, k01, o10, k10, o11, k11 = _corners(
            t, y, x, T, H, W, s_t, s_y, s_x, BORDER, I64, ACC
        )
        _accumulate(base + o00, val * ((1 - fy) * (1 - fx)), mask & k00, scale, FIXED)
        _accumulate(base + o01, val * ((1 - fy) * fx), mask & k01, scale, FIXED)
        _accumulate(base + o10, val * (fy * (1 - fx)), mask & k10, scale, FIXED)
        _accumulate(base + o11, val * (fy * fx), mask & k11, scale, FIXED)


@triton.jit
def _flat_index(QK, BLOCK: tl.constexpr, E: tl.constexpr, I64: tl.constexpr):
    """Program (i, bh) of the flat kernels: the (b, h) slice ``bh`` and, inside it, the patch
    elements [i * BLOCK, (i + 1) * BLOCK): their index, mask, patch and element number."""
    bh = tl.program_id(1).to(tl.int64)
    if I64:
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        total = QK.to(tl.int64) * E
    else:
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        total = QK * E
    mask = idx < total
    n = idx // E
    e = (idx % E).to(tl.int32)
    return bh, idx, mask, n, e


@triton.jit
def _gather_kernel(
    vid,  # (B, HD, T, C, H, W), any strides
    inds,  # (B * HD, QK, 3) positions
    out,  # (B * HD, QK, E) patches, contiguous
    QK, HD, T, H, W,
    s_b, s_h, s_t, s_c, s_y, s_x,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, I64: tl.constexpr, WHOLE: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One output element per lane; grid (elements of a slice / BLOCK, B * HD)."""
    bh, idx, mask, n, e = _flat_index(QK, BLOCK, PT * C * PS * PS, I64)
    dt, c, oy, ox = _element(e, C, PS, DIL)
    base = vid + (bh // HD) * s_b + (bh % HD) * s_h + c.to(tl.int64) * s_c
    t, y, x = _load_pos(inds + bh * QK * 3, n, mask, WHOLE, ACC)
    v, _, _ = _read(
        base, t + dt, y + oy, x + ox, T, H, W, s_t, s_y, s_x, mask, BORDER, I64, WHOLE, ACC
    )
    tl.store(out + bh * QK * (PT * C * PS * PS) + idx, v.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _unfold_kernel(
    vid,  # (B, T, C, H, W), any strides
    out,  # (B, Qn, E) contiguous: patches of queries [start, start + Qn) of the grid
    Qn, T, H, W,
    s_b, s_t, s_c, s_y, s_x,
    start, rt0, rh0, rw0, nh, nw,
    STRIDE: tl.constexpr, C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr,
    DIL: tl.constexpr, BORDER: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_Q queries) x (BLOCK_E patch elements) tile of iunfold: positions come from the
    grid (no index tensor), reads coalesce along the queries of a row, writes along e."""
    qq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(2).to(tl.int64)
    qmask = qq < Qn
    m = qmask[:, None] & (e < PT * C * PS * PS)[None, :]
    t, y, x = _query_position(start + tl.where(qmask, qq, 0), rt0, rh0, rw0, nh, nw, STRIDE)
    dt, c, oy, ox = _element(e, C, PS, DIL)
    base = vid + b * s_b + (c.to(tl.int64) * s_c)[None, :]
    v, _, _ = _read(
        base, t[:, None] + dt[None, :], y[:, None] + oy[None, :], x[:, None] + ox[None, :],
        T, H, W, s_t, s_y, s_x, m, BORDER, I64, True, ACC,
    )  # fmt: skip
    if I64:
        row = qq.to(tl.int64)
    else:
        row = qq
    optr = out + b * Qn * (PT * C * PS * PS) + row[:, None] * (PT * C * PS * PS) + e[None, :]
    tl.store(optr, v.to(out.dtype.element_ty), mask=m)


@triton.jit
def _scatter_kernel(
    patches,  # (B * HD, QK, E) contiguous; CONST: one value, every element's
    inds,  # (B * HD, QK, 3)
    out,  # (B * HD, T, C, H, W) accumulation buffer, strides below
    QK, T, H, W,
    o_bh, o_t, o_c, o_y, o_x, scale,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, I64: tl.constexpr, WHOLE: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, CONST: tl.constexpr, FIXED: tl.constexpr,
):  # fmt: skip
    """One patch element per lane, added into the video with atomics (FIXED: at fixed point
    ``scale`` into int64)."""
    bh, idx, mask, n, e = _flat_index(QK, BLOCK, PT * C * PS * PS, I64)
    dt, c, oy, ox = _element(e, C, PS, DIL)
    base = out + bh * o_bh + c.to(tl.int64) * o_c
    t, y, x = _load_pos(inds + bh * QK * 3, n, mask, WHOLE, ACC)
    if CONST:
        val = tl.zeros((BLOCK,), dtype=ACC) + tl.load(patches).to(ACC)
    else:
        val = tl.load(patches + bh * QK * (PT * C * PS * PS) + idx, mask=mask, other=0.0)
        val = val.to(ACC)
    _add(base, t + dt, y + oy, x + ox, T, H, W, o_t, o_y, o_x, val, mask, scale, BORDER, I64,
         WHOLE, ACC, FIXED)  # fmt: skip


@triton.jit
def _scatter_tile_kernel(
    patches,  # (B * HD, QK, E) contiguous; CONST: one value, every element's
    inds,  # (B * HD, QK, 3) whole positions
    out,  # (B * HD, T, C, H, W) accumulation buffer, strides below
    QK, T, H, W,
    o_bh, o_t, o_c, o_y, o_x, scale,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, CONST: tl.constexpr, FIXED: tl.constexpr,
):  # fmt: skip
    """Whole positions: BLOCK_N patches per program, BLOCK_E of their elements at a time, added
    into the video (channels-first or -last) with atomics. Each patch's position is read once.
    Where every patch of the program lies inside the video, an element's address is its
    patch's offset plus its own; otherwise each element goes through the border rule."""
    E: tl.constexpr = PT * C * PS * PS
    bh = tl.program_id(1).to(tl.int64)
    if I64:
        n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    else:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < QK
    t, y, x = _load_pos(inds + bh * QK * 3, n, nm, True, ACC)
    inside = tl.where(nm, _inside(t, y, x, T, H, W, PT, PS, DIL), 1)
    fast = tl.min(inside.to(tl.int32), axis=0) > 0
    base = out + bh * o_bh
    if I64:
        poff = t.to(tl.int64) * o_t + y.to(tl.int64) * o_y + x.to(tl.int64) * o_x
    else:
        poff = t * o_t + y * o_y + x * o_x
    src = patches + (bh * QK + n) * E
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        if E % BLOCK_E == 0:  # (a mask constant along e lets the loads and adds vectorise)
            m = nm[:, None] & tl.full((1, BLOCK_E), 1, tl.int1)
        else:
            m = nm[:, None] & (e < E)[None, :]
        if CONST:
            val = tl.zeros((BLOCK_N, BLOCK_E), dtype=ACC) + tl.load(patches).to(ACC)
        else:
            val = tl.load(src[:, None] + e[None, :], mask=m, other=0.0).to(ACC)
        dt, c, oy, ox = _element(e, C, PS, DIL)
        if fast:
            eoff = dt * o_t + c * o_c + oy * o_y + ox * o_x
            _accumulate(base + poff[:, None] + eoff[None, :], val, m, scale, FIXED)
        else:
            _add(
                base + (c.to(tl.int64) * o_c)[None, :], t[:, None] + dt[None, :],
                y[:, None] + oy[None, :], x[:, None] + ox[None, :], T, H, W, o_t, o_y, o_x,
                val, m, scale, BORDER, I64, True, ACC, FIXED,
            )  # fmt: skip


@triton.jit
def _anchor_key_kernel(inds, key, hist, N, QK, R, t0, y0, x0, nt, ny, nx,
                       WIDE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Each entry's anchor: its slice and position in raster order within the box ``nt x ny x
    nx`` at ``(t0, y0, x0)`` that holds every position (WIDE: int64); and each anchor's count
    of entries, added into ``hist`` (integer atomics: the same counts on every run). A
    position outside the box (only where a recorded box went stale: changed through ``.data``)
    takes the key R, after every anchor, and no count: it is left out, and nothing is indexed
    outside ``hist``."""
    if WIDE:
        n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    t = tl.load(inds + n * 3, mask=m, other=0) - t0
    y = tl.load(inds + n * 3 + 1, mask=m, other=0) - y0
    x = tl.load(inds + n * 3 + 2, mask=m, other=0) - x0
    if WIDE:
        t = t.to(tl.int64)
    inside = (t >= 0) & (t < nt) & (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
    a = tl.where(inside, (((n // QK) * nt + t) * ny + y) * nx + x, R)
    tl.store(key + n, a, mask=m)
    one = tl.full((BLOCK,), 1, hist.dtype.element_ty)
    tl.atomic_add(hist + a, one, mask=m & inside, sem="relaxed")


@triton.jit
def _anchor_place_kernel(key, cursor, order, N, R, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """A counting sort of the entries by anchor, in no fixed order within an anchor: each
    entry takes the next slot of its anchor's (``cursor``: the first slot of each anchor's
    entries, advanced with atomics) and writes its number there. Entries outside the box (key
    R) are left out."""
    if WIDE:
        n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(key + n, mask=n < N, other=R)
    m = a < R
    one = tl.full((BLOCK,), 1, cursor.dtype.element_ty)
    slot = tl.atomic_add(cursor + a, one, mask=m, sem="relaxed")
    tl.store(order + slot, n.to(order.dtype.element_ty), mask=m)


@triton.jit
def _anchor_sum_kernel(
    patches,  # (N, E) rows, contiguous; CONST: one value, every element's; WEIGHTED: (N/K, E)
    order,  # (N,) the entries grouped by anchor (sorted stably, or placed: FLUSH)
    ends,  # (R,) per anchor, the end of its entries in ``order`` (inclusive cumsum of hist)
    hist,  # (R,) per anchor, its number of entries
    out,  # (R, E) contiguous: per anchor with entries, the sum of its patches; FLUSH: the
    # video's accumulation buffer (B * HD, T, C, H, W), strides o_*
    counts,  # FLUSH and COUNTS: (B * HD, T, 1, H, W) contiguous accumulation buffer
    weights,  # WEIGHTED: (N,) each entry's factor (its row of ``patches`` is ``n // K``)
    vid,  # WEIGHTED: (B, HD, T, C, H, W), any strides, the video wpsum read
    gw,  # WEIGHTED: (N,) output, the weights' gradient
    R, K, HD, T, H, W, t0, y0, x0, nt, ny, nx,
    s_b, s_h, s_t, s_c, s_y, s_x,
    o_bh, o_t, o_c, o_y, o_x,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, I64: tl.constexpr,
    ACC: tl.constexpr, BLOCK_A: tl.constexpr, U: tl.constexpr, CONST: tl.constexpr,
    WEIGHTED: tl.constexpr, FLUSH: tl.constexpr, COUNTS: tl.constexpr,
):  # fmt: skip
    """BLOCK_A anchors per program: each sums the patches of its entries, U of them per step
    (their rows loaded together), in the order of ``order``. Each anchor's sum is written
    once; sorted stably, the sums have the same bits on every run. FLUSH: each sum is added
    into the video with atomics instead, through the border rule, as one patch at the anchor
    (and, COUNTS, the anchor's count into each pixel its patch covers), with no fold after.

    WEIGHTED (wpsum's backward, ``patches`` its output gradient ``g``): entry ``n`` adds
    ``w_n g_q`` (``q = n // K``) and writes ``gw_n = <g_q, P(vid, x_n)>``, the video's patch at
    the anchor read once."""
    if I64:
        a = tl.program_id(0).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    else:
        a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    cnt = tl.load(hist + a, mask=a < R, other=0)
    am = cnt > 0  # (an anchor without entries is skipped: nothing reads its sum)
    first = tl.load(ends + a, mask=am, other=0) - cnt
    e = tl.arange(0, EP)
    em = e < E
    acc = tl.zeros((BLOCK_A, EP), dtype=ACC)
    if WEIGHTED or FLUSH:  # each anchor's slice bh and position t, y, x
        rn = nt * ny * nx
        bh = a // rn
        x = a % nx + x0
        y = (a // nx) % ny + y0
        t = (a // (nx * ny)) % nt + t0
        dt, c, oy, ox = _element(e, C, PS, DIL)
    if WEIGHTED:  # the video's patch at each anchor
        base = vid + ((bh // HD) * s_b + (bh % HD) * s_h).to(tl.int64)[:, None]
        vp, _, _ = _read(
            base + (c.to(tl.int64) * s_c)[None, :], (t[:, None] + dt[None, :]).to(tl.int32),
            (y[:, None] + oy[None, :]).to(tl.int32), (x[:, None] + ox[None, :]).to(tl.int32),
            T, H, W, s_t, s_y, s_x, am[:, None] & em[None, :], BORDER, I64, True, ACC,
        )  # fmt: skip
    if CONST:
        acc += cnt.to(ACC)[:, None] * tl.load(patches).to(ACC)
    else:
        for j in range(0, tl.max(cnt, axis=0), U):
            for u in tl.static_range(U):
                live = am & (j + u < cnt)
                n = tl.load(order + first + j + u, mask=live, other=0)
                if not I64:
                    n = n.to(tl.int32)
                m = live[:, None] & em[None, :]
                if WEIGHTED:
                    f = tl.load(weights + n, mask=live, other=0.0).to(ACC)
                    gq = tl.load(patches + (n // K)[:, None] * E + e[None, :], mask=m, other=0.0)
                    gq = gq.to(ACC)
                    tl.store(gw + n, tl.sum(gq * vp, axis=1).to(gw.dtype.element_ty), mask=live)
                    acc += gq * f[:, None]
                else:
                    acc += tl.load(patches + n[:, None] * E + e[None, :], mask=m, other=0.0).to(ACC)
    if FLUSH:
        tt = (t[:, None] + dt[None, :]).to(tl.int32)
        yy = (y[:, None] + oy[None, :]).to(tl.int32)
        xx = (x[:, None] + ox[None, :]).to(tl.int32)
        m = am[:, None] & em[None, :]
        obase = out + (bh.to(tl.int64) * o_bh)[:, None] + (c.to(tl.int64) * o_c)[None, :]
        _add(obase, tt, yy, xx, T, H, W, o_t, o_y, o_x, acc, m, 1.0, BORDER, I64, True, ACC,
             False)  # fmt: skip
        if COUNTS:  # (the elements of channel 0 cover each of the patch's pixels once)
            hw = H * W
            cbase = counts + (bh.to(tl.int64) * T * hw)[:, None]
            ones = tl.zeros((BLOCK_A, EP), dtype=ACC) + cnt.to(ACC)[:, None]
            _add(cbase, tt, yy, xx, T, H, W, hw, W, 1, ones, m & (c == 0)[None, :], 1.0,
                 BORDER, I64, True, ACC, False)  # fmt: skip
    else:
        optr = out + a[:, None] * E + e[None, :]
        tl.store(optr, acc, mask=am[:, None] & em[None, :])


@triton.jit
def _gather_dpos_kernel(
    vid,  # (B, HD, T, C, H, W), any strides
    inds,  # (N, 3) floating positions
    grad,  # (N, E) gradient of the patches, contiguous
    gpos,  # (N, 3) output, zero for t
    N, QK, HD, T, H, W,
    s_b, s_h, s_t, s_c, s_y, s_x,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """BLOCK_N patches per program; reduces <grad, dP/dy> and <grad, dP/dx> over E."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    t, y, x = _load_pos(inds, n, nmask, False, ACC)
    bh = n // QK
    nbase = vid + (bh // HD) * s_b + (bh % HD) * s_h
    gy = tl.zeros((BLOCK_N,), dtype=ACC)
    gx = tl.zeros((BLOCK_N,), dtype=ACC)
    for e0 in range(0, PT * C * PS * PS, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        m = nmask[:, None] & (e < PT * C * PS * PS)[None, :]
        dt, c, oy, ox = _element(e, C, PS, DIL)
        base = nbase[:, None] + (c.to(tl.int64) * s_c)[None, :]
        g = tl.load(grad + n[:, None] * (PT * C * PS * PS) + e[None, :], mask=m, other=0.0)
        _, dy, dx = _read(
            base, t[:, None] + dt[None, :], y[:, None] + oy[None, :], x[:, None] + ox[None, :],
            T, H, W, s_t, s_y, s_x, m, BORDER, I64, False, ACC,
        )  # fmt: skip
        g = g.to(ACC)
        gy += tl.sum(g * dy, axis=1)
        gx += tl.sum(g * dx, axis=1)
    ty = gpos.dtype.element_ty
    tl.store(gpos + n * 3, tl.zeros((BLOCK_N,), dtype=ty), mask=nmask)
    tl.store(gpos + n * 3 + 1, gy.to(ty), mask=nmask)
    tl.store(gpos + n * 3 + 2, gx.to(ty), mask=nmask)


@triton.jit
def _wpsum_kernel(
    vid,  # (B, HD, T, C, H, W), any strides
    weights,  # (R, K) contiguous, R = B * HD * Q
    inds,  # (R * K, 3)
    out,  # (R, E) contiguous
    R, Q, K, HD, T, H, W,
    s_b, s_h, s_t, s_c, s_y, s_x,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, I64: tl.constexpr, WHOLE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_Q queries) x (BLOCK_E patch elements) tile, summed over the K neighbours."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = r < R
    m = rmask[:, None] & (e < PT * C * PS * PS)[None, :]
    dt, c, oy, ox = _element(e, C, PS, DIL)
    bh = r // Q
    base = (vid + (bh // HD) * s_b + (bh % HD) * s_h)[:, None] + (c.to(tl.int64) * s_c)[None, :]
    acc = tl.zeros((BLOCK_Q, BLOCK_E), dtype=ACC)
    for kk in range(K):
        n = r * K + kk
        w = tl.load(weights + n, mask=rmask, other=0.0).to(ACC)
        t, y, x = _load_pos(inds, n, rmask, WHOLE, ACC)
        v, _, _ = _read(
            base, t[:, None] + dt[None, :], y[:, None] + oy[None, :], x[:, None] + ox[None, :],
            T, H, W, s_t, s_y, s_x, m, BORDER, I64, WHOLE, ACC,
        )  # fmt: skip
        acc += w[:, None] * v
    optr = out + r[:, None] * (PT * C * PS * PS) + e[None, :]
    tl.store(optr, acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def _tile_pos(inds, n, m, Q, g_start, g_t0, g_h0, g_w0, g_nh, g_nw, STRIDE: tl.constexpr,
              GRID: tl.constexpr):  # fmt: skip
    """Whole position of patch ``n``: loaded, or (GRID, one patch per query) the query's point
    of the grid: queries ``g_start + n % Q`` of a region from ``(g_t0, g_h0, g_w0)`` with
    ``g_nh x g_nw`` points per frame, ``STRIDE`` apart."""
    if GRID:
        qi = (g_start + tl.where(m, n, 0) % Q).to(tl.int32)
        return _query_position(qi, g_t0, g_h0, g_w0, g_nh, g_nw, STRIDE)
    else:
        return _load_pos(inds, n, m, True, tl.float32)


@triton.jit
def _tile_pass(
    vid, weights, inds, out, region, r0, R, Q, K, HD, T, H, W, s_b, s_h, s_t, s_c, s_y, s_x,
    tmin, ymin, xmin, nh, g_start, g_t0, g_h0, g_w0, g_nh, g_nw,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr, WSUM: tl.constexpr,
    MODE: tl.constexpr, BLOCK_Q: tl.constexpr, KB: tl.constexpr, BLOCK_E: tl.constexpr,
    PITCH: tl.constexpr, RPC: tl.constexpr, STRIDE: tl.constexpr, GRID: tl.constexpr,
):  # fmt: skip
    """The rows ``[r0, r0 + BLOCK_Q)`` of a staged tile: for every chunk of BLOCK_E patch
    elements, KB neighbours of each query at a time, read (MODE) 0: from the video through the
    border rule, 1: from the staged ``region``, 2: from the video without the border rule (every
    patch of the tile lies inside the frame); wpsum (WSUM) sums them with the weights, gather
    stores each patch."""
    E: tl.constexpr = PT * C * PS * PS
    LO: tl.constexpr = (PS // 2) * DIL
    ROWS: tl.constexpr = BLOCK_Q * KB
    rows = tl.arange(0, ROWS)
    q = r0 + rows // KB
    ks = rows % KB
    qo = r0 + tl.arange(0, BLOCK_Q)
    bh = q // Q
    vrow = vid + (bh // HD).to(tl.int64) * s_b + (bh % HD).to(tl.int64) * s_h
    for e0 in tl.static_range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        em = e < E
        dt, c, oy, ox = _element(e, C, PS, DIL)
        if MODE == 1:
            eoff = ((c * RPC + dt * nh + oy + LO) * PITCH + ox + LO).to(tl.int32)
        if MODE == 2:
            if I64:
                eoff = c.to(tl.int64) * s_c + dt.to(tl.int64) * s_t + oy * s_y + ox * s_x
            else:
                eoff = c * s_c + dt * s_t + oy * s_y + ox * s_x
        # each row sums its own neighbours; the KB rows of a query are added at the end
        acc = tl.zeros((ROWS, BLOCK_E), dtype=ACC)
        for k0 in range(0, K, KB):
            kq = k0 + ks
            m = (q < R) & (kq < K)
            n = q * K + kq
            t, y, x = _tile_pos(inds, n, m, Q, g_start, g_t0, g_h0, g_w0, g_nh, g_nw, STRIDE, GRID)
            m2 = m[:, None] & em[None, :]
            if MODE == 1:
                base = ((t - tmin) * nh + y - ymin) * PITCH + x - xmin
                idx = tl.where(m2, base[:, None] + eoff[None, :], 0)
                v = tl.gather(region, tl.reshape(idx, (ROWS * BLOCK_E,)), 0)
                v = tl.reshape(v, (ROWS, BLOCK_E)).to(ACC)
            elif MODE == 2:
                if I64:
                    base = t.to(tl.int64) * s_t + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
                else:
                    base = t * s_t + y * s_y + x * s_x
                v = tl.load(vrow[:, None] + (base[:, None] + eoff[None, :]), mask=m2, other=0.0)
                v = v.to(ACC)
            else:
                v, _, _ = _read(
                    vrow[:, None] + (c.to(tl.int64) * s_c)[None, :], t[:, None] + dt[None, :],
                    y[:, None] + oy[None, :], x[:, None] + ox[None, :],
                    T, H, W, s_t, s_y, s_x, m2, BORDER, I64, True, ACC,
                )  # fmt: skip
            if WSUM:
                w = tl.load(weights + n, mask=m, other=0.0).to(ACC)
                acc += tl.where(m2, w[:, None] * v, 0.0)
            else:
                optr = out + n[:, None] * E + e[None, :]
                tl.store(optr, v.to(out.dtype.element_ty), mask=m2)
        if WSUM:
            res = tl.sum(tl.reshape(acc, (BLOCK_Q, KB, BLOCK_E)), axis=1)
            optr = out + qo[:, None] * E + e[None, :]
            tl.store(optr, res.to(out.dtype.element_ty), mask=(qo < R)[:, None] & em[None, :])


@triton.jit
def _flat_pass(
    vid, weights, inds, out, r0, R, K, s_t, s_c, s_y, s_x,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    I64: tl.constexpr, ACC: tl.constexpr, WSUM: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, PIX: tl.constexpr,
):  # fmt: skip
    """The rows ``[r0, r0 + BLOCK_Q)`` of a tile whose patches all lie inside the frame of one
    (batch, head) slice (``vid`` at its start). Their output is one contiguous run, ``rows x K x
    E`` values for gather, ``rows x E`` for wpsum (WSUM), written BLOCK at a time. A value's
    address is its patch's offset plus its element's, both looked up (``tl.gather``) in two
    small tables made once: no padding of E to a power of two, and no per-value decoding or
    position loads. wpsum's weights share the patches' table (a float32 weight's bits and a
    32-bit offset in one int64: one lookup per value and neighbour; offline, sm_90, the loop
    over neighbours went from 96 to 57 instructions per 8 values a thread). PIX (a
    channels-last video): each patch's values are walked pixel by pixel, channels innermost,
    so that consecutive lanes read consecutive addresses along a patch row (C times longer runs
    than a channel's row), and are stored to their place in the output through a third
    table."""
    E: tl.constexpr = PT * C * PS * PS
    # wpsum's one table of (weight bits, 32-bit offset) pairs; else a table each
    PACKED: tl.constexpr = WSUM and ACC == tl.float32 and not I64
    nq = tl.minimum(R - r0, BLOCK_Q)
    jj = tl.arange(0, BLOCK_Q * KP)
    jm = jj < nq * K
    t, y, x = _load_pos(inds, r0 * K + jj, jm, True, tl.float32)
    if PIX:
        otab = _pixel_major(tl.arange(0, EP), C, PS)
        dt, c, oy, ox = _element(otab, C, PS, DIL)
    else:
        dt, c, oy, ox = _element(tl.arange(0, EP), C, PS, DIL)
    if I64:
        ptab = t.to(tl.int64) * s_t + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
        etab = dt.to(tl.int64) * s_t + c.to(tl.int64) * s_c + oy * s_y + ox * s_x
    else:
        ptab = t * s_t + y * s_y + x * s_x
        etab = dt * s_t + c * s_c + oy * s_y + ox * s_x
    if WSUM:
        wtab = tl.load(weights + r0 * K + jj, mask=jm, other=0.0).to(ACC)
        if PACKED:
            wtab = (wtab.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (
                ptab.to(tl.int64) & 0xFFFFFFFF
            )
        total = nq * E
        last = nq - 1
        obase = out + r0 * E
    else:
        total = nq * K * E
        last = nq * K - 1
        obase = out + (r0 * K) * E
    for f0 in range(0, total, BLOCK):
        f = f0 + tl.arange(0, BLOCK)
        m = f < total
        j = f // E  # the patch (gather) or the query (wpsum) of each value
        el = f - j * E
        # lanes past the run read a value of its last patch, not stored: no masked loads
        j = tl.minimum(j, last)
        eoff = tl.gather(etab, el, 0)
        if PIX:
            dst = obase + (j * E + tl.gather(otab, el, 0))
        else:
            dst = obase + f
        if WSUM:
            acc = tl.zeros((BLOCK,), dtype=ACC)
            for k in range(K):
                jk = j * K + k
                if PACKED:
                    pw = tl.gather(wtab, jk, 0)
                    off = pw.to(tl.int32)
                    w = (pw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                else:
                    off = tl.gather(ptab, jk, 0)
                    w = tl.gather(wtab, jk, 0)
                acc += w * tl.load(vid + (off + eoff)).to(ACC)
            tl.store(dst, acc.to(out.dtype.element_ty), mask=m)
        else:
            v = tl.load(vid + (tl.gather(ptab, j, 0) + eoff))
            tl.store(dst, v, mask=m)


@triton.jit
def _rows_pass(
    vid, weights, inds, out, r0, R, K, s_t, s_c, s_y, s_x,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    I64: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr,
    QS: tl.constexpr, CH: tl.constexpr, PIX: tl.constexpr,
):  # fmt: skip
    """The rows ``[r0, r0 + BLOCK_Q)`` of a tile whose patches all lie inside the frame of one
    (batch, head) slice (``vid`` at its start), QS queries at a time: each patch is read as
    chunks of CH consecutive elements (the lanes of a warp along a patch, in the patch's order,
    or with PIX pixel by pixel from a channels-last video), every chunk of a neighbour from one
    position, loaded once per query and neighbour and shared by the lanes (no lookup tables, no
    shared memory), a sum per chunk kept across the K neighbours: wpsum only (gather's version,
    storing each chunk, was slower than its flat pass on the H100, 0.69-0.92 against 0.48 ms
    on K14, and wrong at one launch, BENCHMARKS.md)."""
    E: tl.constexpr = PT * C * PS * PS
    NCH: tl.constexpr = (E + CH - 1) // CH
    lane = tl.arange(0, CH)
    # per chunk: each lane's element (lanes past E read the last one and store nothing), its
    # offset in the video and its index in the patch's own order
    eoffs = ()
    dsts = ()
    emasks = ()
    for ci in tl.static_range(NCH):
        el = ci * CH + lane
        emasks = emasks + (el < E,)
        if (ci + 1) * CH > E:  # (only the last chunk can pass the patch's end)
            el = tl.minimum(el, E - 1)
        if PIX:
            el = _pixel_major(el, C, PS)
        dt, c, oy, ox = _element(el, C, PS, DIL)
        if I64:
            eoffs = eoffs + (dt.to(tl.int64) * s_t + c.to(tl.int64) * s_c + oy * s_y + ox * s_x,)
        else:
            eoffs = eoffs + (dt * s_t + c * s_c + oy * s_y + ox * s_x,)
        dsts = dsts + (el,)
    nq = tl.minimum(R - r0, BLOCK_Q)
    for s0 in range(0, nq, QS):
        qi = s0 + tl.arange(0, QS)
        qm = qi < nq
        qi = tl.minimum(qi, nq - 1)  # (rows past the tile read its last query, store nothing)
        accs = ()
        for _ci in tl.static_range(NCH):
            accs = accs + (tl.zeros((QS, CH), dtype=ACC),)
        for k in range(K):
            n = (r0 + qi) * K + k
            t = tl.load(inds + n * 3)
            y = tl.load(inds + n * 3 + 1)
            x = tl.load(inds + n * 3 + 2)
            if I64:
                poff = t.to(tl.int64) * s_t + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
            else:
                poff = t * s_t + y * s_y + x * s_x
            w = tl.load(weights + n).to(ACC)
            new = ()
            for ci in tl.static_range(NCH):
                v = tl.load(vid + (poff[:, None] + eoffs[ci][None, :])).to(ACC)
                new = new + (accs[ci] + w[:, None] * v,)
            accs = new
        q = (r0 + qi).to(tl.int64)
        for ci in tl.static_range(NCH):
            optr = out + q[:, None] * E + dsts[ci][None, :]
            tl.store(optr, accs[ci].to(out.dtype.element_ty),
                     mask=qm[:, None] & emasks[ci][None, :])  # fmt: skip


@triton.jit
def _staged_kernel(
    vid,  # (B, HD, T, C, H, W), any strides
    weights,  # (R, K) contiguous (WSUM)
    inds,  # (R * K, 3) whole positions
    out,  # (R, E) for wpsum, (R * K, E) for gather; contiguous
    R, Q, K, HD, T, H, W,
    s_b, s_h, s_t, s_c, s_y, s_x,
    g_start, g_t0, g_h0, g_w0, g_nh, g_nw,  # the query grid (GRID)
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr, WSUM: tl.constexpr,
    BLOCK_Q: tl.constexpr, KB: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr,
    PITCH: tl.constexpr, REG: tl.constexpr, STRIDE: tl.constexpr, GRID: tl.constexpr,
    INTERIOR: tl.constexpr, FLAT: tl.constexpr, EP: tl.constexpr, PIX: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """wpsum or gather of BLOCK_Q queries at whole positions (GRID: the points of iunfold's
    grid). First the box that holds every patch of the tile. Region mode (not INTERIOR): the box
    is read once from the video, through the border rule, into a register tensor of REG values,
    rows of PITCH pixels in (channel, frame, row) order, RPC rows per channel, and the patch
    elements are gathered from it (through shared memory), one add per element for the address.
    INTERIOR: a tile whose box lies inside the frame reads the video without the border rule,
    one add per element for the address; with FLAT, a tile also within one (batch, head) slice
    writes its output as one flat run of FLAT values at a time (``_flat_pass``), or with ROWS
    reads each patch as chunks of ROWS elements, KB queries at a time (``_rows_pass``, wpsum
    only). Other
    tiles (a box
    that does not fit or is not inside; in region mode, a tile over two (batch, head) slices)
    read the video through the border rule."""
    RPC: tl.constexpr = (REG // PITCH) // C
    # (the rows pass takes KB queries at a time; the other tiles then one neighbour at a time)
    TKB: tl.constexpr = 1 if ROWS else KB
    LO: tl.constexpr = (PS // 2) * DIL
    SPAN: tl.constexpr = (PS - 1) * DIL
    if I64:
        r0 = tl.program_id(0).to(tl.int64) * BLOCK_Q
    else:
        r0 = tl.program_id(0) * BLOCK_Q
    # the box of the tile's positions
    r = r0 + tl.arange(0, BLOCK_Q)
    kk = tl.arange(0, KP)
    m = (r < R)[:, None] & (kk < K)[None, :]
    t, y, x = _tile_pos(
        inds, r[:, None] * K + kk[None, :], m, Q, g_start, g_t0, g_h0, g_w0, g_nh, g_nw,
        STRIDE, GRID,
    )  # fmt: skip
    big = 1 << 30
    tmin = tl.min(tl.where(m, t, big))
    ymin = tl.min(tl.where(m, y, big))
    xmin = tl.min(tl.where(m, x, big))
    nt = tl.max(tl.where(m, t, -big)) - tmin + PT
    nh = tl.max(tl.where(m, y, -big)) - ymin + 1 + SPAN
    nw = tl.max(tl.where(m, x, -big)) - xmin + 1 + SPAN
    bh = r0 // Q
    one = bh == (tl.minimum(r0 + BLOCK_Q, R) - 1) // Q  # the tile lies in one (batch, head)
    if INTERIOR:
        staged = (tmin >= 0) & (tmin + nt <= T) & (ymin >= LO) & (ymin - LO + nh <= H)
        staged = staged & (xmin >= LO) & (xmin - LO + nw <= W)
    else:
        staged = one & (nw <= PITCH) & (nt * nh <= RPC)
    if ROWS and staged and one:
        vbase = vid + (bh // HD).to(tl.int64) * s_b + (bh % HD).to(tl.int64) * s_h
        _rows_pass(
            vbase, weights, inds, out, r0, R, K, s_t, s_c, s_y, s_x, C, PS, PT, DIL, I64, ACC,
            BLOCK_Q, KB, ROWS, PIX,
        )  # fmt: skip
    elif FLAT and staged and one:
        vbase = vid + (bh // HD).to(tl.int64) * s_b + (bh % HD).to(tl.int64) * s_h
        _flat_pass(
            vbase, weights, inds, out, r0, R, K, s_t, s_c, s_y, s_x, C, PS, PT, DIL, I64, ACC,
            WSUM, BLOCK_Q, FLAT, KP, EP, PIX,
        )  # fmt: skip
    elif staged:
        if INTERIOR:
            _tile_pass(
                vid, weights, inds, out, 0, r0, R, Q, K, HD, T, H, W, s_b, s_h, s_t, s_c,
                s_y, s_x, tmin, ymin, xmin, nh, g_start, g_t0, g_h0, g_w0, g_nh, g_nw,
                C, PS, PT, DIL, BORDER, I64, ACC, WSUM, 2, BLOCK_Q, TKB, BLOCK_E, PITCH, RPC,
                STRIDE, GRID,
            )  # fmt: skip
        else:
            vbase = vid + (bh // HD).to(tl.int64) * s_b + (bh % HD).to(tl.int64) * s_h
            i = tl.arange(0, REG)
            row = i // PITCH
            col = i - row * PITCH
            rc = row // RPC
            rr = row - rc * RPC
            # rr // nh by a float reciprocal (exact: rr < 2^12 and the quotient is truncated)
            rt = ((rr.to(tl.float32) + 0.5) * (1.0 / nh.to(tl.float32))).to(tl.int32)
            ry = rr - rt * nh
            ok = (rc < C) & (rt < nt) & (col < nw)
            off, valid = _offset(
                tmin + rt, ymin - LO + ry, xmin - LO + col, T, H, W, s_t, s_y, s_x, BORDER, I64
            )
            region = tl.load(vbase + rc.to(tl.int64) * s_c + off, mask=ok & valid, other=0.0)
            _tile_pass(
                vid, weights, inds, out, region, r0, R, Q, K, HD, T, H, W, s_b, s_h, s_t, s_c,
                s_y, s_x, tmin, ymin, xmin, nh, g_start, g_t0, g_h0, g_w0, g_nh, g_nw,
                C, PS, PT, DIL, BORDER, I64, ACC, WSUM, 1, BLOCK_Q, TKB, BLOCK_E, PITCH, RPC,
                STRIDE, GRID,
            )  # fmt: skip
    else:
        _tile_pass(
            vid, weights, inds, out, 0, r0, R, Q, K, HD, T, H, W, s_b, s_h, s_t, s_c,
            s_y, s_x, tmin, ymin, xmin, nh, g_start, g_t0, g_h0, g_w0, g_nh, g_nw,
            C, PS, PT, DIL, BORDER, I64, ACC, WSUM, 0, BLOCK_Q, TKB, BLOCK_E, PITCH, RPC,
            STRIDE, GRID,
        )  # fmt: skip


@triton.jit
def _wpsum_bwd_kernel(
    vid,  # (B, HD, T, C, H, W), any strides
    weights,  # (R, K) contiguous
    inds,  # (R * K, 3)
    grad,  # (R, E) contiguous
    gvid,  # (B * HD, T, C, H, W) accumulation buffer, strides o_* below
    gw,  # (R, K) output
    gpos,  # (R * K, 3) output (written when not WHOLE)
    R, Q, K, HD, T, H, W,
    s_b, s_h, s_t, s_c, s_y, s_x,
    o_bh, o_t, o_c, o_y, o_x, scale,
    C: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    BORDER: tl.constexpr, I64: tl.constexpr, WHOLE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_E: tl.constexpr, FIXED: tl.constexpr,
):  # fmt: skip
    """BLOCK_Q queries per program; for each neighbour, the weight and position gradients
    (reductions over E) and the video gradient (atomic adds; FIXED: at fixed point ``scale``
    into int64). At whole positions, a neighbour whose patches all lie inside the video is read
    and added at offsets (no border rule)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = r < R
    bh = r // Q
    vbase = vid + (bh // HD) * s_b + (bh % HD) * s_h
    gbase = gvid + bh * o_bh
    for kk in range(K):
        n = r * K + kk
        w = tl.load(weights + n, mask=rmask, other=0.0).to(ACC)
        t, y, x = _load_pos(inds, n, rmask, WHOLE, ACC)
        if WHOLE:
            # where every patch of the tile lies inside the video: offsets, no border rule
            inside = tl.where(rmask, _inside(t, y, x, T, H, W, PT, PS, DIL), 1)
            fast = tl.min(inside.to(tl.int32), axis=0) > 0
            pv = vbase + t.to(tl.int64) * s_t + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
            po = gbase + t.to(tl.int64) * o_t + y.to(tl.int64) * o_y + x.to(tl.int64) * o_x
        # summed per lane over the chunks, across lanes once after them
        acc_w = tl.zeros((BLOCK_Q, BLOCK_E), dtype=ACC)
        acc_y = tl.zeros((BLOCK_Q, BLOCK_E), dtype=ACC)
        acc_x = tl.zeros((BLOCK_Q, BLOCK_E), dtype=ACC)
        for e0 in range(0, PT * C * PS * PS, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            m = rmask[:, None] & (e < PT * C * PS * PS)[None, :]
            dt, c, oy, ox = _element(e, C, PS, DIL)
            c64 = c.to(tl.int64)
            g = tl.load(grad + r[:, None] * (PT * C * PS * PS) + e[None, :], mask=m, other=0.0)
            g = g.to(ACC)
            wg = g * w[:, None]
            tt = t[:, None] + dt[None, :]
            yy = y[:, None] + oy[None, :]
            xx = x[:, None] + ox[None, :]
            if WHOLE:
                if fast:
                    ev = dt * s_t + c * s_c + oy * s_y + ox * s_x
                    v = tl.load(pv[:, None] + ev[None, :], mask=m, other=0.0).to(ACC)
                    eo = dt * o_t + c * o_c + oy * o_y + ox * o_x
                    _accumulate(po[:, None] + eo[None, :], wg, m, scale, FIXED)
                else:
                    v, _, _ = _read(
                        vbase[:, None] + (c64 * s_c)[None, :], tt, yy, xx,
                        T, H, W, s_t, s_y, s_x, m, BORDER, I64, WHOLE, ACC,
                    )  # fmt: skip
                    _add(
                        gbase[:, None] + (c64 * o_c)[None, :], tt, yy, xx,
                        T, H, W, o_t, o_y, o_x, wg, m, scale, BORDER, I64, WHOLE, ACC, FIXED,
                    )  # fmt: skip
            else:
                v, dy, dx = _read(
                    vbase[:, None] + (c64 * s_c)[None, :], tt, yy, xx,
                    T, H, W, s_t, s_y, s_x, m, BORDER, I64, WHOLE, ACC,
                )  # fmt: skip
                acc_y += wg * dy
                acc_x += wg * dx
                _add(
                    gbase[:, None] + (c64 * o_c)[None, :], tt, yy, xx,
                    T, H, W, o_t, o_y, o_x, wg, m, scale, BORDER, I64, WHOLE, ACC, FIXED,
                )  # fmt: skip
            acc_w += g * v
        tl.store(gw + n, tl.sum(acc_w, axis=1).to(gw.dtype.element_ty), mask=rmask)
        if not WHOLE:
            ty = gpos.dtype.element_ty
            tl.store(gpos + n * 3, tl.zeros((BLOCK_Q,), dtype=ty), mask=rmask)
            tl.store(gpos + n * 3 + 1, tl.sum(acc_y, axis=1).to(ty), mask=rmask)
            tl.store(gpos + n * 3 + 2, tl.sum(acc_x, axis=1).to(ty), mask=rmask)


@triton.jit
def _fold_add(acc, cnt, pbase, ubase, q, ok, e, cmask, Qn, E: tl.constexpr, I64: tl.constexpr,
              USED: tl.constexpr):  # fmt: skip
    """The fold kernel's step: adds element ``e`` of patches ``q`` (where ``ok``) to ``acc``,
    and their counts (or, with USED, their use counts) to ``cnt``."""
    ok = ok & (q >= 0) & (q < Qn)
    if I64:
        q = q.to(tl.int64)
    if USED:
        u = tl.load(ubase + q, mask=ok, other=0)
        ok = ok & (u > 0)
    v = tl.load(pbase + q[:, None] * E + e[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
    acc += v.to(acc.dtype)
    if USED:
        cnt += tl.where(ok, u, 0).to(cnt.dtype)
    else:
        cnt += ok.to(cnt.dtype)
    return acc, cnt


@triton.jit
def _fold_store(out, counts, acc, cnt, b, tq, yy, x, pmask, cc, cmask, cb, T, H, W,
                C: tl.constexpr):  # fmt: skip
    """The fold kernel's stores: sums ``acc`` of pixels ``(yy, x)`` (where ``pmask``) and
    channels ``cc`` (where ``cmask``); their counts ``cnt`` from the first channel block."""
    hw = H.to(tl.int64) * W
    pix = (b * T + tq).to(tl.int64) * (C * hw) + yy * W + x
    optr = out + pix[:, None] + (cc * hw)[None, :]
    tl.store(optr, acc.to(out.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])
    cptr = counts + (b * T + tq).to(tl.int64) * hw + yy * W + x
    if cb == 0:
        tl.store(cptr, cnt.to(counts.dtype.element_ty), mask=pmask)


@triton.jit
def _fold_block(
    pbase, ubase, out, counts, Qn, T, H, W, start, rt0, rt1, rh0, rh1, rw0, rw1, nh, nw,
    xb, cb, y_lo, b, tq, cc, cmask,
    STRIDE: tl.constexpr, I64: tl.constexpr, C: tl.constexpr, CP: tl.constexpr,
    PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_X: tl.constexpr, R: tl.constexpr, USED: tl.constexpr,
):  # fmt: skip
    """The fold kernel's program with no reflected source: the PT x PS x PS loads of every row
    unrolled, all in flight at once (they share the patches' lines: each line holds several
    (channel, i, j) of one patch, consecutive i landing on consecutive rows)."""
    p = tl.arange(0, R * BLOCK_X)
    yy = y_lo + p // BLOCK_X
    x = xb * BLOCK_X + p % BLOCK_X
    pmask = (x < W) & (yy < H)
    acc = tl.zeros((R * BLOCK_X, CP), dtype=ACC)
    cnt = tl.zeros((R * BLOCK_X,), dtype=ACC)
    for dt in tl.static_range(PT):
        t0 = tq - dt
        tok = (t0 >= rt0) & (t0 < rt1)
        for i in tl.static_range(PS):
            y0 = yy - (i - PS // 2) * DIL
            yok = pmask & (y0 >= rh0) & (y0 < rh1) & ((y0 - rh0) % STRIDE == 0)
            yok = tl.where(tok, yok, False)  # (a scalar & a block: int under the interpreter)
            qrow = ((t0 - rt0) * nh + (y0 - rh0) // STRIDE) * nw - start
            for j in tl.static_range(PS):
                x0 = x - (j - PS // 2) * DIL
                ok = yok & (x0 >= rw0) & (x0 < rw1) & ((x0 - rw0) % STRIDE == 0)
                e = ((dt * C + cc) * PS + i) * PS + j
                acc, cnt = _fold_add(acc, cnt, pbase, ubase, qrow + (x0 - rw0) // STRIDE,
                                     ok, e, cmask, Qn, PT * C * PS * PS, I64, USED)  # fmt: skip
    _fold_store(out, counts, acc, cnt, b, tq, yy, x, pmask, cc, cmask, cb, T, H, W, C)


@triton.jit
def _fold_kernel(
    patches,  # (B, Qn, PT, C, PS, PS) contiguous: queries [start, start + Qn) of the grid
    out,  # (B, T, C, H, W) contiguous
    counts,  # (B, T, 1, H, W) contiguous
    used,  # USED: (B, Qn) the grid's patches to read (> 0), each counted that many times;
    # the others are taken as zero
    Qn, T, H, W,
    start, rt0, rt1, rh0, rh1, rw0, rw1, nh, nw,
    STRIDE: tl.constexpr, I64: tl.constexpr, C: tl.constexpr, CB: tl.constexpr,
    CP: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
    REFLECT: tl.constexpr, ACC: tl.constexpr, BLOCK_X: tl.constexpr, R: tl.constexpr,
    USED: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """Each program sums, for BLOCK_X pixels of R consecutive rows of one frame and CB channels
    (CP: CB rounded up to a power of two), every patch element that lands there. A pixel at
    coordinate ``p`` is written by the patch pixel at ``p`` and, with reflection, by those at
    ``-p`` and ``2 (n - 1) - p`` (one bounce, which the launcher guarantees is enough); each is
    a patch of the grid if its centre is a grid point of the region among queries
    ``[start, start + Qn)``. With UNROLL, programs with no reflected source take an unrolled,
    branch-free loop over all their rows at once (a patch's consecutive rows share lines of
    memory, and land on consecutive rows of pixels); the others take their rows one by one."""
    ncb: tl.constexpr = (C + CB - 1) // CB
    xb = tl.program_id(0) // ncb
    cb = tl.program_id(0) % ncb
    y_lo = tl.program_id(1) * R
    bt = tl.program_id(2)
    b = bt // T
    tq = bt % T
    cc = cb * CB + tl.arange(0, CP)
    cmask = (tl.arange(0, CP) < CB) & (cc < C)
    lo = (PS // 2) * DIL
    hi = (PS - 1 - PS // 2) * DIL
    # Reflected sources exist only near the borders.
    if REFLECT:
        y_hi = tl.minimum(y_lo + R, H) - 1
        ny = tl.where((y_lo <= lo) | (y_hi >= H - 1 - hi), 3, 1)
        nx = tl.where((xb * BLOCK_X <= lo) | (xb * BLOCK_X + BLOCK_X - 1 >= W - 1 - hi), 3, 1)
        nt = 2 if PT > 1 else 1
    else:
        ny = 1
        nx = 1
        nt = 1
    pbase = patches + b.to(tl.int64) * Qn * (PT * C * PS * PS)
    ubase = used + b.to(tl.int64) * Qn
    if UNROLL and ny * nx * nt == 1:
        _fold_block(
            pbase, ubase, out, counts, Qn, T, H, W, start, rt0, rt1, rh0, rh1, rw0, rw1, nh, nw,
            xb, cb, y_lo, b, tq, cc, cmask, STRIDE, I64, C, CP, PS, PT, DIL, ACC, BLOCK_X, R,
            USED,
        )  # fmt: skip
    else:
        x = xb * BLOCK_X + tl.arange(0, BLOCK_X)
        for r in range(R):
            yq = y_lo + r
            xmask = tl.where(yq < H, x < W, False)  # (a scalar & a block: see above)
            acc = tl.zeros((BLOCK_X, CP), dtype=ACC)
            cnt = tl.zeros((BLOCK_X,), dtype=ACC)
            for dt in tl.static_range(PT):
                for ct in range(nt):
                    tf = tl.where(ct == 0, tq, 2 * (T - 1) - tq)
                    t0 = tf - dt
                    tok = (t0 >= rt0) & (t0 < rt1) & ((ct == 0) | (tf >= T)) & (yq < H)
                    for i in range(PS):
                        oy = (i - PS // 2) * DIL
                        for cy in range(ny):
                            yf = tl.where(cy == 0, yq, tl.where(cy == 1, -yq, 2 * (H - 1) - yq))
                            y0 = yf - oy
                            yok = tok & (y0 >= rh0) & (y0 < rh1) & ((y0 - rh0) % STRIDE == 0)
                            yok = yok & (
                                (cy == 0) | ((cy == 1) & (yq > 0)) | ((cy == 2) & (yq < H - 1))
                            )
                            if yok:
                                qrow = ((t0 - rt0) * nh + (y0 - rh0) // STRIDE) * nw - start
                                for j in range(PS):
                                    ox = (j - PS // 2) * DIL
                                    for cx in range(nx):
                                        xf = tl.where(
                                            cx == 0, x, tl.where(cx == 1, -x, 2 * (W - 1) - x)
                                        )
                                        x0 = xf - ox
                                        ok = xmask & (x0 >= rw0) & (x0 < rw1)
                                        ok = ok & ((x0 - rw0) % STRIDE == 0)
                                        ok = ok & ((cx != 1) | (x > 0)) & ((cx != 2) | (x < W - 1))
                                        e = ((dt * C + cc) * PS + i) * PS + j
                                        acc, cnt = _fold_add(
                                            acc, cnt, pbase, ubase, qrow + (x0 - rw0) // STRIDE,
                                            ok, e, cmask, Qn, PT * C * PS * PS, I64, USED,
                                        )  # fmt: skip
            _fold_store(out, counts, acc, cnt, b, tq, yq, x, xmask, cc, cmask, cb, T, H, W, C)


# ---------------------------------------------------------------------------------------------
# Launchers. Shapes as in ops/patches.py; every launcher returns what the reference returns.
# ---------------------------------------------------------------------------------------------

# Launch configurations on CUDA (the benchmark's sweep sets them; None picks the default):
# elements per program and warps of the flat gather/scatter kernels; the patch elements of a
# wpsum tile (block_e; None: the power of two up to 128 that pads E least), its elements
# (queries x block_e) and warps, forward and backward. Defaults: the best of the sweep on the
# H100 (BENCHMARKS.md): wpsum K14 ps7 C3 1.20 -> 0.73 ms, its backward 4.05 -> 3.42 ms.
#
# The staged kernel (gather and wpsum at whole positions), per op ("gather1": gather of one
# neighbour, as iunfold runs it; "_last": videos of at least CHANNELS_LAST_MIN channels, read
# from their channels-last copy, not in region mode): None (the op's direct kernel), or its
# mode ("region": staged in registers; "interior": tiles inside the frame skip the border rule;
# "flat": as interior, and such a tile within one (batch, head) slice is written as flat runs
# of block_e values, addresses from lookup tables; "flatpix": as flat, the video read from a
# channels-last copy and each patch walked pixel by pixel, channels innermost, so that a
# warp's load of wpsum touches 3.4 128-byte lines on K14 instead of 6.3,
# benchmarks/access_model.py; "rows" (wpsum only; gather takes it as interior): as interior,
# and such a tile within one slice reads each patch as chunks of block_e consecutive elements,
# a warp's lanes along the patch, kb queries at a time, each neighbour's position loaded
# once per query and shared by the lanes, with no lookup tables (flat's tl.gather stores its
# table to shared memory, with two barriers, at every neighbour); "rowspix": as rows, pixel
# by pixel from the channels-last copy), queries per program, neighbours per gather (rows
# modes: queries at a time), patch elements per chunk, region row pitch (pixels) and size
# (values), warps. Defaults: the best of the sweeps on the H200 (BENCHMARKS.md, kernel times):
# wpsum K14 ps7 C3 0.78 -> 0.46 ms and iunfold C3 1024² ps7 0.79 ms (the tile kernel) -> 0.24 ms
# at 0c3da0b; gather K14 0.88 (direct) -> 0.63 ms and K16 ps1 C128 0.299 -> 0.287 ms at
# 6bb1fad (wpsum K16: 0.162 direct, 0.160 at best staged, so direct); on the H100 at e9a95a5,
# gather K14 0.662 (interior) -> 0.476 ms in flat mode, 56% -> 75% of the copy bandwidth (flat
# and flatpix wpsum lost to the interior tile: 0.40 and 0.26 against 0.25 ms). On the H100 at
# 56ca0c7, wpsum K14 0.253 (interior) -> 0.219 ms in rows mode (16, 8, 32, 4), the best of six
# launches; K16 0.171 (direct) against 0.165 at best in rows mode (within 4%: direct kept).
#
# scatter at whole positions: (patches per program, elements per chunk, warps) of its tile
# kernel, or None for the flat kernel (one element per lane, its position decoded per
# element). Measured on the H200 (BENCHMARKS.md, kernels' time): K14 ps7 C3 3.41 ms with the
# tile kernel at (16, 32, 4), 1.74 ms flat (an earlier run); K16 ps1 C128 0.459 / 0.453 ms.
# On the H100 at 8f52d1a, K16's tile adds as 128-bit vectors (no element mask): 0.533 ms at
# (32, 128, 4) against 0.534 flat, so the flat kernel stays.
# (By runs of equal positions, a stable sort and each run summed in registers, then added with
# atomics, lost to by anchors for scatter on every row where either beat the atomics (H100,
# 5157482), and was off by default; removed (2026-12-06).)
# scatter_anchors / wpsum_bwd_anchors: scatter, and wpsum's video gradient, at whole positions
# by anchors (_scatter_anchors: grouped, summed per position, added or folded) where
# _by_anchors says so, launched as (anchors per program, entries per step, warps); None: off.
# On the H100 at 5157482, kernel ms at these launches (the best of six for each op): scatter
# K14 ps7 C3 1.757 -> 1.049, K16 ps3 C16 1.382 -> 0.615, K16 ps7 C8 8.772 -> 1.375; wpsum
# forward+backward 2.186 -> 1.457, 3.670 -> 1.817, 9.196 -> 3.379. By anchors also beat by
# runs for scatter on every row where runs beat the atomics; for wpsum's backward it ties on
# K16 and, on K14, loses in kernel time (1.457 against 1.214) but wins in event time.
# (Per-anchor sums stored element-major, for the fold's loads, lost on every row on the H100:
# scatter K14 0.785 -> 0.971 kernel ms, K16 0.423 -> 0.587; removed.)
# anchors_flush: by anchors with each anchor's sum added into the video with atomics, the
# entries grouped by a counting sort (no stable sort, no per-anchor sums in memory, no fold);
# its bits can vary between runs, so torch.use_deterministic_algorithms(True) keeps the fold;
# one-pixel patches keep it too (_flush). On the H100 at c76db78 (--rows anchorflush, kernel
# ms, folded -> flushed): scatter K14 ps7 C3 0.784 -> 0.531, ps3 C3 0.335 -> 0.215, K16 ps3
# C16 0.511 -> 0.421, K16 ps1 C128 0.421 -> 0.457; wpsum forward+backward K14 ps7 1.210 ->
# 1.134, K16 ps3 C16 1.754 -> 1.694. On the H200 at 6787a9b, K16 ps7 C8 0.908 -> 0.841 (wpsum
# forward+backward 3.231 -> 3.336).
# anchors_stable: folded sums (one-pixel patches, or anchors_flush off) group the entries by a
# stable sort even outside the deterministic mode; off: by the counting sort, as flushed sums
# do (their bits then vary between runs; the deterministic mode still sorts stably). On the
# H100 at 8ea8884 (--rows anchorflush, kernel ms, stable -> counting sort): scatter K16 ps1
# C128 0.417 -> 0.365 (58% -> 63% of the copy bandwidth); folded sums 5-33% faster on the five
# other rows for scatter, 2-19% for wpsum forward+backward; so off.
# dpos: (patches per program, warps) of gather's position gradient (fractional positions).
# Offline (sm_90), the default spills on K14's geometry (255 registers, a 528-632-byte stack);
# (8, 4) takes 127 registers and (16, 8) 160, neither spills. Not timed yet, so unchanged.
CONFIG = {
    "flat_block": 1024, "flat_warps": 4, "scatter_tile": None, "dpos": (32, 4),
    "scatter_anchors": (2, 4, 4), "wpsum_bwd_anchors": (1, 8, 2), "anchors_flush": True,
    "anchors_stable": False,
    "wpsum_block_e": None, "wpsum_tile": 1024, "wpsum_warps": 8,
    "wpsum_bwd_block_e": 128, "wpsum_bwd_tile": 1024, "wpsum_bwd_warps": 4,
    "staged_wpsum": ("rows", 16, 8, 32, 1, 1, 4),
    "staged_gather": ("flat", 8, 1, 1024, 1, 1, 4),
    "staged_gather1": ("region", 32, 1, 32, 39, 1024, 4),
    "staged_wpsum_last": None,
    "staged_gather_last": ("interior", 16, 4, 128, 1, 1, 8),
    "staged_gather1_last": None,
}  # fmt: skip

# The staged kernel under the interpreter, per op in CUDA's modes: small tiles and a small
# region, so that the tests' tiny frames take both the staged and the direct path.
STAGED_INTERPRET = {
    "wpsum": ("rows", 4, 2, 16, 1, 1, 4), "gather": ("flat", 4, 1, 64, 1, 1, 4),
    "gather1": ("region", 4, 1, 16, 9, 256, 4), "wpsum_last": ("interior", 4, 2, 16, 1, 1, 4),
    "gather_last": ("interior", 4, 2, 16, 1, 1, 4), "gather1_last": None,
}  # fmt: skip


# _anchor_sum_kernel's launch under the interpreter (anchors per program, entries per step,
# warps): 3 entries per step, so that anchors of 1 to 7 entries end inside and at a step's end
ANCHORS_INTERPRET = (2, 3, 4)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inds(inds: torch.Tensor) -> torch.Tensor:
    """Positions as a contiguous tensor of int32 (whole) or of their floating dtype."""
    return (inds if inds.is_floating_point() else inds.to(torch.int32)).contiguous()


def _block_e(e: int) -> int:
    return min(128, next_power_of_2(e))


def _least_padding(e: int) -> int:
    """The power of two up to 128 whose multiples cover ``e`` with the least padding (the
    larger on a tie): 32 for E = 147 (160 lanes, against 256 at 128)."""
    return min((128, 64, 32, 16), key=lambda b: -(-e // b) * b)


def _tile(e: int, device: torch.device, op: str) -> tuple[int, int, int]:
    """(block_e, block_q, warps) of a wpsum launch (``op`` "wpsum" or "wpsum_bwd"); under the
    interpreter small tiles of 16 queries."""
    block_e = min(CONFIG[op + "_block_e"] or _least_padding(e), next_power_of_2(e))
    if not cuda_launch(device):
        return block_e, 16, 4
    return block_e, max(1, CONFIG[op + "_tile"] // block_e), CONFIG[op + "_warps"]


# Videos with at least this many channels are read and accumulated channels-last, so that the
# channels of one pixel share memory sectors (a patch element walks the channels).
CHANNELS_LAST_MIN = 8


def _reads(vid: torch.Tensor, last: bool = False) -> torch.Tensor:
    """The video the read kernels take: a channels-last copy for many channels, or for any
    with ``last`` (as a view with the logical shape (B, HD, T, C, H, W)), else the video
    itself."""
    if vid.shape[3] < CHANNELS_LAST_MIN and not last:
        return vid
    return channels_last(vid)


def _buffer(shape6, dtype, device) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A zero accumulation buffer of logical shape ``shape6`` and its strides (b*h, t, c, y,
    x): channels-last for many channels."""
    b, hd, t, c, h, w = shape6
    if c < CHANNELS_LAST_MIN:
        buf = torch.zeros(shape6, dtype=dtype, device=device)
    else:
        buf = torch.zeros(b, hd, t, h, w, c, dtype=dtype, device=device).permute(0, 1, 2, 5, 3, 4)
    st = buf.stride()
    return buf, (st[1], st[2], st[3], st[4], st[5])


def _fixed_scale(name: str, magnitude: torch.Tensor, patches: int, geom, whole: bool) -> float:
    """The fixed-point scale of an atomic accumulation under
    ``torch.use_deterministic_algorithms(True)`` (callers check the mode first, so the default
    path computes no magnitude): the largest power of two (at most 2^126, a finite float32) at
    which ``patches`` patches' contributions to one accumulator, each at most ``magnitude`` in
    size, stay within int64: at most ``pt ps^2`` per patch (times 4 bilinear corners at
    fractional positions, not ``whole``). ``name``: the input ``magnitude`` comes from, for the
    error on a value that is not finite."""
    m = float(magnitude)
    n = patches * geom.pt * geom.ps * geom.ps * (1 if whole else 4)
    return _fixed_point(
        m * max(1, n),
        f"{name} must be finite under torch.use_deterministic_algorithms(True) (its sums are "
        f"fixed-point), got a largest magnitude of {m}",
    )


def _unfixed(buf: torch.Tensor, scale: float | None, dtype: torch.dtype) -> torch.Tensor:
    """An accumulation buffer as a contiguous tensor of ``dtype``: int64 fixed-point sums
    (``scale``) divided back, float sums cast (``.to()`` keeps a 6-D channels-last buffer's
    layout, hence :func:`channels_first`)."""
    if scale is not None:
        buf = buf.double() / scale
    return channels_first(buf.to(dtype))


def _bounce_ok(shape6, geom, extra: int) -> bool:
    """Whether every read (patch offsets, plus ``extra`` for bilinear corners) stays within one
    mirror image of the frame, so the BOUNCE border rule is exact."""
    t, h, w = shape6[2], shape6[4], shape6[5]
    reach = max(geom.ps // 2, geom.ps - 1 - geom.ps // 2) * geom.dilation + extra
    return reach <= min(h, w) - 1 and (geom.pt == 1 or geom.pt <= t)


def _modes(shape6, geom, whole: bool, *big) -> dict:
    """The constexpr border mode and index width of a launch reading a video of ``shape6`` at
    whole (or fractional) positions, with ``big`` the other tensors it indexes."""
    if geom.border == "zero":
        border = ZERO
    else:
        border = BOUNCE if _bounce_ok(shape6, geom, 0 if whole else 1) else REFLECT
    n = max([math.prod(shape6)] + [x.numel() for x in big])
    return dict(BORDER=border, I64=n >= 2**31)


def _staged(op, vid, weights, inds, out, geom, grid=None) -> bool:
    """Run the staged kernel for ``op`` ("wpsum" or "gather") when it applies (whole positions;
    in region mode, fewer than CHANNELS_LAST_MIN channels and a region of at least one row per
    channel; in interior mode, many channels are read from the channels-last copy, where a
    patch element's channels are adjacent); return whether it ran. ``grid``: ``(count, stride,
    start, t0, h0, w0, nh, nw)`` of an iunfold, whose positions are its grid's points (``inds``
    is then None)."""
    b, hd, t, c, h, w = vid.shape
    q, k = inds.shape[2:4] if grid is None else (grid[0], 1)
    last = c >= CHANNELS_LAST_MIN
    name = ("gather1" if op == "gather" and k == 1 else op) + ("_last" if last else "")
    cfg = CONFIG["staged_" + name] if cuda_launch(vid.device) else STAGED_INTERPRET[name]
    if cfg is None or (inds is not None and inds.is_floating_point()):
        return False
    mode, block_q, kb, block_e, pitch, reg, warps = cfg
    if mode == "region" and (last or (reg // pitch) // c < 1):
        return False
    if mode in ("rows", "rowspix") and weights is None:  # (wpsum's modes: gather takes their
        mode = "interior"  # other tiles' pass, the interior tile, for every tile)
    vid = _reads(vid, mode in ("flatpix", "rowspix"))
    r = b * hd * q
    e = geom.pt * c * geom.ps * geom.ps
    stride, *gpar = (1, 0, 0, 0, 0, 1, 1) if grid is None else grid[1:]
    _staged_kernel[(triton.cdiv(r, block_q),)](
        vid, vid if weights is None else weights.contiguous(),
        vid if inds is None else _inds(inds), out, r, q, k, hd, t, h, w, *vid.stride(), *gpar,
        C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation, **_modes(vid.shape, geom, True, out),
        ACC=_TL_DTYPES[_acc(out.dtype)], WSUM=weights is not None, BLOCK_Q=block_q, KB=kb,
        KP=next_power_of_2(k), BLOCK_E=min(block_e, next_power_of_2(e)), PITCH=pitch, REG=reg,
        STRIDE=stride, GRID=grid is not None, INTERIOR=mode != "region",
        FLAT=block_e if mode in ("flat", "flatpix") and grid is None else 0,
        EP=next_power_of_2(e), PIX=mode in ("flatpix", "rowspix"),
        ROWS=min(block_e, next_power_of_2(e)) if mode in ("rows", "rowspix") and grid is None
        else 0, num_warps=warps,
    )  # fmt: skip
    return True


def gather(vid: torch.Tensor, inds: torch.Tensor, geom) -> torch.Tensor:
    b, hd, t, c, h, w = vid.shape
    q, k = inds.shape[2:4]
    out = vid.new_empty(b, hd, q, k, geom.pt, c, geom.ps, geom.ps)
    whole = not inds.is_floating_point()
    if out.numel() and not _staged("gather", vid, None, inds, out, geom):
        block = CONFIG["flat_block"]
        grid = (triton.cdiv(q * k * geom.pt * c * geom.ps * geom.ps, block), b * hd)
        src = _reads(vid)
        _gather_kernel[grid](
            src, _inds(inds), out, q * k, hd, t, h, w, *src.stride(),
            C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation, **_modes(vid.shape, geom, whole, out),
            WHOLE=whole, ACC=_TL_DTYPES[_acc(vid.dtype)], BLOCK=block,
            num_warps=CONFIG["flat_warps"],
        )  # fmt: skip
    return out


def unfold(vid, geom, stride: int, region, start: int, count: int) -> torch.Tensor:
    """iunfold of ``vid (B, T, C, H, W)``: ``(B, count, pt, C, ps, ps)``; few channels take
    the staged gather (positions from the grid), many the tile kernel."""
    b, t, c, h, w = vid.shape
    out = vid.new_empty(b, count, geom.pt, c, geom.ps, geom.ps)
    t0, _, h0, h1, w0, w1 = region
    nh, nw = -(-(h1 - h0) // stride), -(-(w1 - w0) // stride)
    e = geom.pt * c * geom.ps * geom.ps
    grid = (count, stride, start, t0, h0, w0, nh, nw)
    if out.numel() and not _staged("gather", vid[:, None], None, None, out, geom, grid):
        modes = _modes((b, 1, t, c, h, w), geom, True, out, vid)
        block_e = min(64, next_power_of_2(e))
        block_q = 64 if cuda_launch(vid.device) else 16
        grid = (triton.cdiv(count, block_q), triton.cdiv(e, block_e), b)
        _unfold_kernel[grid](
            vid, out, count, t, h, w, vid.stride(0), *vid.stride()[1:],
            start, t0, h0, w0, nh, nw,
            STRIDE=stride, C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation,
            BORDER=modes["BORDER"], I64=modes["I64"], ACC=_TL_DTYPES[_acc(vid.dtype)],
            BLOCK_Q=block_q, BLOCK_E=block_e,
        )  # fmt: skip
    return out


def gather_dpos(vid, inds, grad, geom) -> torch.Tensor:
    if not inds.is_floating_point():
        return torch.zeros_like(inds, memory_format=torch.contiguous_format)
    b, hd, t, c, h, w = vid.shape
    q, k = inds.shape[2:4]
    n = b * hd * q * k
    gpos = torch.empty(inds.shape, dtype=inds.dtype, device=vid.device)
    e = geom.pt * c * geom.ps * geom.ps
    if n:
        block_n, warps = CONFIG["dpos"]
        _gather_dpos_kernel[(triton.cdiv(n, block_n),)](
            vid, _inds(inds), grad.contiguous(), gpos, n, q * k, hd, t, h, w, *vid.stride(),
            C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation,
            **_modes(vid.shape, geom, False, grad),
            ACC=_TL_DTYPES[_acc(vid.dtype)], BLOCK_N=block_n, BLOCK_E=_block_e(e),
            num_warps=warps,
        )  # fmt: skip
    return gpos


def _wide(size: int) -> bool:
    """Whether indices up to ``size`` need 64 bits (scatter by anchors; the tests force it)."""
    return size >= 2**31


def _by_anchors(geom, e: int, weighted: bool = False) -> bool:
    """Whether a scatter of patches of ``e`` elements (``weighted``: wpsum's video gradient)
    goes by anchors where it applies: patches wider than a pixel; one-pixel patches for
    scatter only, with at least 64 elements. Set from six rows on the H100 at c76db78
    (BENCHMARKS.md, kernel ms, atomics against by anchors at the defaults): scatter ps 7 C3
    1.748 -> 0.531, ps 3 C3 0.534 -> 0.215, ps 3 C16 1.370 -> 0.421, ps 1 C128 0.532 -> 0.421
    (folded), ps 1 C3 0.756 against 0.770; wpsum forward+backward ps 7 C3 2.139 -> 1.134, ps 3
    C3 0.759 -> 0.483, ps 3 C16 3.651 -> 1.694, but ps 1 C128 0.660 against 0.800 and ps 1 C3
    1.553 against 1.699."""
    return geom.ps > 1 or (e >= 64 and not weighted)


def _flush(geom) -> bool:
    """Whether scatter by anchors adds each anchor's sum into the video with atomics (else it
    folds the sums): ``anchors_flush`` on, patches wider than a pixel, and not under
    ``torch.use_deterministic_algorithms(True)``. One-pixel patches do not overlap,
    so the fold is a copy: on the H100 at c76db78, scatter at ps 1 with 128 channels took
    0.421 kernel ms folded against 0.457 flushed."""
    return (
        bool(CONFIG["anchors_flush"])
        and geom.ps > 1
        and not torch.are_deterministic_algorithms_enabled()
    )


def _scatter_anchors(
    patches, inds, shape6, geom, const: bool = False, weights=None, vid=None, counts=False
):
    """scatter at whole positions by anchors, or None where it does not apply: the entries
    are grouped by position, each position's patches summed once (:func:`_anchor_sum_kernel`)
    into one patch per pixel of the box that holds every position (for a search's outputs,
    the box it recorded from its geometry; else the positions' bounds, read back to the host:
    a sync). Where :func:`_flush` says so, the entries are grouped by a counting sort and each
    sum is added into the video with atomics, about K times fewer than one per entry. Else
    the sums are folded into the video (:func:`fold`, each pixel summing what lands on it;
    pixels without entries are neither written nor read), with no atomics; the entries are
    grouped by the counting sort too (the order within an anchor, and so the bits, can vary
    between runs) unless ``anchors_stable`` or the deterministic mode sorts them stably: the
    same bits on every run. Applies where :func:`fold` covers the geometry
    and the box has no more pixels than there are entries (its patches then take no more
    memory than the input's). (The whole video as the box, which needs no sync, took twice as
    long on K14 ps7, BENCHMARKS.md.)

    ``const``: ``patches`` is one value, every element's. With ``weights (B, HD, Q, K)`` and
    ``vid``, wpsum's backward: ``patches`` is its output gradient ``(B, HD, Q, E)``, each entry
    adds its row times its weight, and the weights' gradient is returned beside the video's.
    ``counts``: return dnls.scatter's counts ``(B, HD, T, 1, H, W)`` beside the video, from the
    same pass (the fold counts each anchor's patch as many times as it has entries)."""
    b, hd, t, c, h, w = shape6
    shape5 = (b * hd, t, c, h, w)
    if not fold_supported(shape5, geom):
        return None
    pos = _inds(inds)
    n = pos.numel() // 3
    box = _checks.known_box(inds)
    if box is not None:  # (a search's outputs: a box from its geometry, no read-back)
        t0, t1, y0, y1, x0, x1 = box
    else:
        flat = pos.view(n, 3)
        t0, y0, x0, t1, y1, x1 = torch.cat([flat.amin(0), flat.amax(0)]).tolist()
    nt, ny, nx = t1 - t0 + 1, y1 - y0 + 1, x1 - x0 + 1
    rn = nt * ny * nx
    r = b * hd * rn
    if r > n:
        return None
    e = geom.pt * c * geom.ps * geom.ps
    wide = _wide(n)
    itype = torch.int64 if wide else torch.int32
    key = torch.empty(n, dtype=itype, device=pos.device)
    hist = torch.zeros(r, dtype=itype, device=pos.device)
    block = 1024
    _anchor_key_kernel[(triton.cdiv(n, block),)](
        pos, key, hist, n, n // (b * hd), r, t0, y0, x0, nt, ny, nx, WIDE=wide, BLOCK=block
    )
    flush = _flush(geom)
    # (one value per element: each anchor's sum is its count times it, no entry is read)
    ends = hist if const else torch.cumsum(hist, 0, dtype=itype)
    if const:
        order = key
    elif flush or not (CONFIG["anchors_stable"] or torch.are_deterministic_algorithms_enabled()):
        # (the order within an anchor is free: flushed, its sum is added with atomics anyway)
        order = torch.empty(n, dtype=itype, device=pos.device)
        _anchor_place_kernel[(triton.cdiv(n, block),)](
            key, ends - hist, order, n, r, WIDE=wide, BLOCK=block
        )
    else:
        order = torch.sort(key, stable=True).indices
    acc = _acc(patches.dtype if vid is None else vid.dtype)
    if flush:
        sums, strides = _buffer(shape6, acc, pos.device)
        cnt = torch.zeros((b * hd, t, 1, h, w) if counts else (1,), dtype=acc, device=pos.device)
    else:
        sums, strides = torch.empty((r, e), dtype=acc, device=pos.device), (0,) * 5
        cnt = sums
    op = "scatter_anchors" if weights is None else "wpsum_bwd_anchors"
    block_a, u, warps = CONFIG[op] if cuda_launch(pos.device) else ANCHORS_INTERPRET
    ep = next_power_of_2(e)
    block_a = max(block_a, 32 * warps // ep)  # (at least one element per thread)
    src = vid if vid is not None else patches
    gw = torch.empty(n, dtype=weights.dtype, device=pos.device) if weights is not None else sums
    _anchor_sum_kernel[(triton.cdiv(r, block_a),)](
        patches, order, ends, hist, sums, cnt, sums if weights is None else weights.contiguous(),
        src, gw, r, 1 if weights is None else weights.shape[3], hd, t, h, w,
        t0, y0, x0, nt, ny, nx,
        *(src.stride() if vid is not None else (0,) * 6), *strides,
        C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation,
        BORDER=_modes(shape6, geom, True)["BORDER"], E=e, EP=ep,
        I64=_wide(max(n * e, r * e, src.numel(), sums.numel())), ACC=_TL_DTYPES[acc],
        BLOCK_A=block_a, U=u, CONST=const, WEIGHTED=weights is not None, FLUSH=flush,
        COUNTS=flush and counts, num_warps=warps,
    )  # fmt: skip
    if flush:  # (the video and counts are summed already)
        out = channels_first(sums)
    else:
        region = (t0, t1 + 1, y0, y1 + 1, x0, x1 + 1)
        sums = sums.view(b * hd, rn, geom.pt, c, geom.ps, geom.ps)
        out, cnt = fold(sums, shape5, 1, region, 0, geom.dilation, geom.border, used=hist)
        out = out.view(shape6)
    if counts:
        return out, cnt.view(b, hd, t, 1, h, w)
    return out if weights is None else (out, gw.view(weights.shape))


def _scatter_by_anchors(patches, inds, shape6, geom, counts: bool = False):
    """scatter's (``counts``: and dnls.scatter's counts') result by anchors, where the rule
    picks it and it applies; else None."""
    e = geom.pt * patches.shape[5] * geom.ps * geom.ps
    whole = not inds.is_floating_point()
    if not (patches.numel() and whole and CONFIG["scatter_anchors"] and _by_anchors(geom, e)):
        return None
    # one value expanded (a gradient of a sum, or dnls.scatter's counts where they take a
    # scatter of their own): read it once, not as a patches tensor
    const = all(s == 0 for s in patches.stride())
    src = patches.as_strided((1,), (1,)) if const else patches.contiguous()
    return _scatter_anchors(src, inds, shape6, geom, const, counts=counts)


def scatter(patches, inds, shape6, geom, anchors: bool = True) -> torch.Tensor:
    """``anchors``: try scatter by anchors where the rule picks it (False: it did not apply)."""
    b, hd, t, _, h, w = shape6
    c = patches.shape[5]
    q, k = inds.shape[2:4]
    whole = not inds.is_floating_point()
    const = all(s == 0 for s in patches.stride())  # (one value expanded: read once)
    e = geom.pt * c * geom.ps * geom.ps
    out = _scatter_by_anchors(patches, inds, shape6, geom) if anchors else None
    if out is not None:
        return out.to(patches.dtype)
    scale = None
    if patches.numel() and torch.are_deterministic_algorithms_enabled():
        one = patches.as_strided((1,), (1,)) if const else patches
        scale = _fixed_scale("patches", one.detach().abs().amax(), q * k, geom, whole)
    acc = _acc(patches.dtype)
    buf, strides = _buffer(
        (b, hd, t, c, h, w), torch.int64 if scale is not None else acc, patches.device
    )
    fixed = dict(FIXED=scale is not None, ACC=_TL_DTYPES[acc])
    tile = CONFIG["scatter_tile"]
    if tile and not cuda_launch(patches.device):
        tile = (4, 16, 4)  # small tiles under the interpreter
    if patches.numel() and whole and tile:
        block_n, block_e, warps = tile
        block_e = min(block_e, next_power_of_2(e))
        _scatter_tile_kernel[(triton.cdiv(q * k, block_n), b * hd)](
            patches.as_strided((1,), (1,)) if const else patches.contiguous(), _inds(inds), buf,
            q * k, t, h, w, *strides, scale or 1.0,
            C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation,
            **_modes(buf.shape, geom, whole, patches), **fixed,
            BLOCK_N=block_n, BLOCK_E=block_e, CONST=const, num_warps=warps,
        )  # fmt: skip
    elif patches.numel():
        block = CONFIG["flat_block"]
        grid = (triton.cdiv(q * k * e, block), b * hd)
        _scatter_kernel[grid](
            patches.as_strided((1,), (1,)) if const else patches.contiguous(), _inds(inds), buf,
            q * k, t, h, w, *strides, scale or 1.0,
            C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation,
            **_modes(buf.shape, geom, whole, patches), WHOLE=whole, **fixed,
            BLOCK=block, CONST=const, num_warps=CONFIG["flat_warps"],
        )  # fmt: skip
    return _unfixed(buf, scale, patches.dtype)


def scatter_counts(patches, inds, shape6, geom):
    """dnls.scatter's ``(vid, counts)``: by anchors, both from one pass; else two scatters
    (where by anchors does not apply to the patches, it does not to their counts either: the
    same positions, and no more elements)."""
    b, hd, t, c, h, w = shape6
    got = _scatter_by_anchors(patches, inds, shape6, geom, counts=True)
    if got is not None:
        return got[0].to(patches.dtype), got[1]
    counts = scatter(count_ones(patches), inds, (b, hd, t, 1, h, w), geom, anchors=False)
    return scatter(patches, inds, shape6, geom, anchors=False), counts


def wpsum(vid, weights, inds, geom) -> torch.Tensor:
    b, hd, t, c, h, w = vid.shape
    q, k = inds.shape[2:4]
    dtype = torch.promote_types(vid.dtype, weights.dtype)
    out = torch.empty(b, hd, q, geom.pt, c, geom.ps, geom.ps, dtype=dtype, device=vid.device)
    r = b * hd * q
    e = geom.pt * c * geom.ps * geom.ps
    if k == 0:
        return out.zero_()
    whole = not inds.is_floating_point()
    if r and not _staged("wpsum", vid, weights, inds, out, geom):
        block_e, block_q, warps = _tile(e, vid.device, "wpsum")
        grid = (triton.cdiv(r, block_q), triton.cdiv(e, block_e))
        src = _reads(vid)
        _wpsum_kernel[grid](
            src, weights.contiguous(), _inds(inds), out, r, q, k, hd, t, h, w, *src.stride(),
            C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation, **_modes(vid.shape, geom, whole),
            WHOLE=whole, ACC=_TL_DTYPES[_acc(dtype)], BLOCK_Q=block_q, BLOCK_E=block_e,
            num_warps=warps,
        )  # fmt: skip
    return out


def wpsum_backward(grad, vid, weights, inds, geom):
    b, hd, t, c, h, w = vid.shape
    q, k = inds.shape[2:4]
    acc = _acc(vid.dtype)
    whole = not inds.is_floating_point()
    r = b * hd * q
    e = geom.pt * c * geom.ps * geom.ps
    if r and k and e and whole and CONFIG["wpsum_bwd_anchors"] and _by_anchors(geom, e, True):
        got = _scatter_anchors(grad.contiguous(), inds, vid.shape, geom, weights=weights, vid=vid)
        if got is not None:
            gpos = torch.zeros(inds.shape, dtype=inds.dtype, device=vid.device)
            return got[0].to(vid.dtype), got[1], gpos
    scale = None
    if r and k and e and torch.are_deterministic_algorithms_enabled():  # terms: w g
        size = grad.detach().abs().amax() * weights.detach().abs().amax()
        scale = _fixed_scale("grad", size, q * k, geom, whole)
    gvid, strides = _buffer(tuple(vid.shape), torch.int64 if scale is not None else acc, vid.device)
    gw = torch.empty(weights.shape, dtype=weights.dtype, device=vid.device)
    gpos = torch.zeros(inds.shape, dtype=inds.dtype, device=vid.device)
    if r and k:
        block_e, block_q, warps = _tile(e, vid.device, "wpsum_bwd")
        src = _reads(vid)
        _wpsum_bwd_kernel[(triton.cdiv(r, block_q),)](
            src, weights.contiguous(), _inds(inds), grad.contiguous(), gvid, gw,
            gvid if whole else gpos,
            r, q, k, hd, t, h, w, *src.stride(), *strides, scale or 1.0,
            C=c, PS=geom.ps, PT=geom.pt, DIL=geom.dilation, **_modes(vid.shape, geom, whole),
            WHOLE=whole, ACC=_TL_DTYPES[acc], BLOCK_Q=block_q, BLOCK_E=block_e,
            FIXED=scale is not None, num_warps=warps,
        )  # fmt: skip
    return _unfixed(gvid, scale, vid.dtype), gw, gpos


def fold_supported(shape5, geom) -> bool:
    """Whether :func:`fold` covers this geometry: with reflection, one bounce must be enough."""
    b, t, c, h, w = shape5
    return geom.border != "reflect" or (min(h, w) >= 2 and _bounce_ok((b, 1, t, c, h, w), geom, 0))


# Launch configuration of the fold kernel: rows per program (a power of two; None: 4 for up to
# 4 channels, 2 above) and pixels of a row (None: 64 for up to 4 channels, 8 above), channels per
# program (None: 1 for up to 4 channels, all above), warps, and whether programs with no
# reflected source take the unrolled loop, which reads all their rows' elements at once: a line
# of a patch holds parts of its consecutive rows, which land on consecutive rows of pixels, so
# programs of several rows read fewer lines again through the L2 (benchmarks/access_model.py
# --fold). The best of sweeps on the H100 (BENCHMARKS.md, kernel ms): ifold B4 C64 256² ps3
# 1.189 (32 pixels, all channels, not unrolled) -> 0.333 ms (16 pixels, unrolled) -> 0.314
# (2 x 8 pixels; 0.379 at 16 pixels in that run); B1 C3 1024² ps7 0.412 (64 pixels) -> 0.402
# (256 pixels, 1 channel) -> 0.330 ms (4 x 64 pixels).
FOLD_CONFIG = {"block_x": None, "block_c": None, "num_warps": 8, "unroll": True, "rows": None}
# The most loads (PT x PS x PS) the fold kernel unrolls: offline (sm_90, Triton 3.6, this
# repository's 2-core machine) 49 compiled in 2.3 s, 98 in 13 s, 225 in 79 s and 363 in 282 s.
FOLD_UNROLL_MAX = 100


def _fold_unrolled(pt: int, ps: int) -> bool:
    """Whether the fold kernel takes its unrolled loop for patches of ``pt x ps x ps``."""
    return bool(FOLD_CONFIG["unroll"]) and pt * ps * ps <= FOLD_UNROLL_MAX


def fold(patches, shape5, stride: int, region, start: int, dilation: int, border: str,
         used=None):  # fmt: skip
    """``(vid, counts)`` of ifold for patches ``(B, Qn, pt, C, ps, ps)`` of the grid;
    ``used (B, Qn)``: read only the patches where it is positive, each counted ``used`` times
    (scatter by anchors: a patch per position, the sum of that many entries), the others taken
    as zero (their memory is never read)."""
    b, t, c, h, w = shape5
    qn, pt, _, ps = patches.shape[1:5]
    acc = _acc(patches.dtype)
    out = torch.empty(b, t, c, h, w, dtype=patches.dtype, device=patches.device)
    counts = torch.empty(b, t, 1, h, w, dtype=acc, device=patches.device)
    t0, t1, h0, h1, w0, w1 = region
    nh, nw = -(-(h1 - h0) // stride), -(-(w1 - w0) // stride)
    if out.numel():
        block_x = FOLD_CONFIG["block_x"] or (64 if c <= 4 else 8)
        block_x = min(block_x, next_power_of_2(w))
        block_c = min(FOLD_CONFIG["block_c"] or (1 if c <= 4 else c), c)
        rows = FOLD_CONFIG["rows"] or (4 if c <= 4 else 2)
        grid = (triton.cdiv(w, block_x) * triton.cdiv(c, block_c), triton.cdiv(h, rows), b * t)
        _fold_kernel[grid](
            patches.contiguous(), out, counts,
            patches if used is None else used, qn, t, h, w,
            start, t0, t1, h0, h1, w0, w1, nh, nw,
            STRIDE=stride, I64=patches.numel() >= 2**31, C=c, CB=block_c,
            CP=next_power_of_2(block_c), PS=ps, PT=pt, DIL=dilation,
            REFLECT=border == "reflect", ACC=_TL_DTYPES[acc], BLOCK_X=block_x, R=rows,
            USED=used is not None, UNROLL=_fold_unrolled(pt, ps),
            num_warps=FOLD_CONFIG["num_warps"],
        )  # fmt: skip
    return out, counts
