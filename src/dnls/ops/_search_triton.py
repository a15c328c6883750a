"""Triton kernels for ``search`` (forward): fused distance + running top-k.

Imported only when the Triton backend runs, so ``import dnls`` never needs Triton.

One program handles ``BLOCK_Q`` queries of one ``(batch, head)``. It walks the window in window
order (slot, row, column); for each candidate it accumulates the patch distance over
``pt x ps x ps`` pixels, ``BLOCK_C`` channels at a time, reading both videos through the border
rule (and bilinear taps for sub-pixel positions). Selection keeps, per query, the ``KP`` best
``(key, window index)`` pairs in registers, replacing the current worst:

    worst = max over slots of (key, index)   (lexicographic: a larger index loses a tie)
    insert candidate j iff key_j < worst.key  (j is larger than every stored index, so an
                                               equal key never displaces an earlier candidate)

which keeps exactly the ``k`` smallest ``(key, index)`` pairs: nearest first, ties to the
earlier candidate. ``key = dist`` for l2 and ``-dist`` for dot. The ``Q x W`` distances are
never written (except for ``k=None``, where they are the output). The launcher sorts the ``KP``
survivors by ``(key, index)`` and turns window indices into positions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._common import next_power_of_2


@triton.jit
def _border(i, n, REFLECT: tl.constexpr):
    """Index into [0, n) and its validity (always valid for reflect)."""
    if REFLECT:
        period = tl.maximum(2 * (n - 1), 1)
        i = i % period
        i = tl.where(i < 0, i + period, i)
        i = tl.where(i >= n, period - i, i)
        valid = i >= 0
    else:
        valid = (i >= 0) & (i < n)
        i = tl.minimum(tl.maximum(i, 0), n - 1)
    return i, valid


@triton.jit
def _spatial(y, x, offs, pmask, sy, sx, H, W, REFLECT: tl.constexpr):
    """In-frame offsets (BQ, 1, PSP, PSP) and validity of the patch pixels around whole (y, x)."""
    yi, yv = _border(y[:, None] + offs[None, :], H, REFLECT)
    xi, xv = _border(x[:, None] + offs[None, :], W, REFLECT)
    sp = (yi * sy)[:, None, :, None] + (xi * sx)[:, None, None, :]
    m = (yv & pmask[None, :])[:, None, :, None] & (xv & pmask[None, :])[:, None, None, :]
    return sp, m


@triton.jit
def _patch_dist(
    q_base,
    k_base,
    qt,
    qy,
    qx,
    kt,
    ky,
    kx,
    C,
    sq_t,
    sq_c,
    sq_y,
    sq_x,
    sk_t,
    sk_c,
    sk_y,
    sk_x,
    T,
    H,
    W,
    PS: tl.constexpr,
    PSP: tl.constexpr,
    PT: tl.constexpr,
    DIL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
    REFLECT: tl.constexpr,
    WHOLE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Distance between the query patches at whole (qt, qy, qx) and the key patches at
    (kt, ky, kx) (bilinear when not WHOLE): sum of squared differences, or of products when DOT.
    Patches are read as (BQ, BLOCK_C, PSP, PSP) tiles, the border rule applied per row/column."""
    ii = tl.arange(0, PSP)
    offs = (ii - PS // 2) * DIL
    pmask = ii < PS
    cc = tl.arange(0, BLOCK_C)
    q_sp, q_m = _spatial(qy, qx, offs, pmask, sq_y, sq_x, H, W, REFLECT)
    if WHOLE:
        k_sp, k_m = _spatial(ky, kx, offs, pmask, sk_y, sk_x, H, W, REFLECT)
    else:
        y0f = tl.floor(ky)
        x0f = tl.floor(kx)
        fy = (ky - y0f).to(ACC)[:, None, None, None]
        fx = (kx - x0f).to(ACC)[:, None, None, None]
        y0 = y0f.to(tl.int32)
        x0 = x0f.to(tl.int32)
        sp00, m00 = _spatial(y0, x0, offs, pmask, sk_y, sk_x, H, W, REFLECT)
        sp01, m01 = _spatial(y0, x0 + 1, offs, pmask, sk_y, sk_x, H, W, REFLECT)
        sp10, m10 = _spatial(y0 + 1, x0, offs, pmask, sk_y, sk_x, H, W, REFLECT)
        sp11, m11 = _spatial(y0 + 1, x0 + 1, offs, pmask, sk_y, sk_x, H, W, REFLECT)
    acc = (
        tl.zeros((BLOCK_C, PSP, PSP), dtype=ACC)[None]
        + tl.zeros(qy.shape, ACC)[:, None, None, None]
    )
    for dt in tl.static_range(PT):
        qti, qtv = _border(qt + dt, T, REFLECT)
        kti, ktv = _border(kt + dt, T, REFLECT)
        q_fr = (q_base + qti.to(tl.int64) * sq_t)[:, None, None, None]
        k_fr = (k_base + kti.to(tl.int64) * sk_t)[:, None, None, None]
        qtv4 = qtv[:, None, None, None]
        ktv4 = ktv[:, None, None, None]
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + cc
            cm = (ch < C)[None, :, None, None]
            qc = (ch * sq_c)[None, :, None, None]
            kc = (ch * sk_c)[None, :, None, None]
            qv = tl.load(q_fr + qc + q_sp, mask=q_m & cm & qtv4, other=0.0).to(ACC)
            if WHOLE:
                kv = tl.load(k_fr + kc + k_sp, mask=k_m & cm & ktv4, other=0.0).to(ACC)
            else:
                km = cm & ktv4
                v00 = tl.load(k_fr + kc + sp00, mask=m00 & km, other=0.0).to(ACC)
                v01 = tl.load(k_fr + kc + sp01, mask=m01 & km, other=0.0).to(ACC)
                v10 = tl.load(k_fr + kc + sp10, mask=m10 & km, other=0.0).to(ACC)
                v11 = tl.load(k_fr + kc + sp11, mask=m11 & km, other=0.0).to(ACC)
                kv = (v00 * (1 - fx) + v01 * fx) * (1 - fy) + (v10 * (1 - fx) + v11 * fx) * fy
            if DOT:
                acc += qv * kv
            else:
                diff = qv - kv
                acc += diff * diff
    return tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)


@triton.jit
def _query_position(qi, t0, h0, w0, nh, nw, stride0):
    """(t, h, w) of query ``qi`` of the grid, in raster order t -> h -> w."""
    per_frame = nh * nw
    rem = qi % per_frame
    return t0 + qi // per_frame, h0 + (rem // nw) * stride0, w0 + (rem % nw) * stride0


@triton.jit
def _window_bounds(qt, T, H, W, S, s1, lo_steps, hi_steps, POS: tl.constexpr):
    """First frame of the window of frame ``qt`` and the range the grid centre is slid into."""
    tstart = tl.minimum(tl.maximum(qt - (S // 2), 0), T - S)
    lo = (lo_steps * s1).to(POS)
    hi_y = (H - 1 - hi_steps * s1).to(POS)
    hi_x = (W - 1 - hi_steps * s1).to(POS)
    return tstart, lo, hi_y, hi_x


@triton.jit
def _centre(
    flow_ptr,
    pix_off,
    slot,
    moves,
    cy,
    cx,
    lo,
    hi_y,
    hi_x,
    sf_s,
    sf_c,
    HAS_FLOW: tl.constexpr,
    POS: tl.constexpr,
):
    """Window centre in the frame of ``slot``: (cy, cx) moved by the flow where ``moves``, then
    slid inward. Returns (cy, cx, free_y, free_x); free_* is True where the slide left it."""
    if HAS_FLOW:
        off = pix_off + slot * sf_s
        cy = cy + tl.load(flow_ptr + off, mask=moves, other=0).to(POS)
        cx = cx + tl.load(flow_ptr + off + sf_c, mask=moves, other=0).to(POS)
    free_y = (cy >= lo) & (cy <= hi_y)
    free_x = (cx >= lo) & (cx <= hi_x)
    cy = tl.minimum(tl.maximum(cy, lo), hi_y)
    cx = tl.minimum(tl.maximum(cx, lo), hi_x)
    return cy, cx, free_y, free_x


@triton.jit
def _offset(cy, cx, sid, lo_steps, s1, WS: tl.constexpr, POS: tl.constexpr):
    """Position of window index ``sid`` on the grid around the centre (cy, cx)."""
    ky = cy + (((sid // WS) % WS - lo_steps) * s1).to(POS)
    kx = cx + ((sid % WS - lo_steps) * s1).to(POS)
    return ky, kx


@triton.jit
def _worst(keys, ids):
    """The current worst kept pair of each query: largest key, then largest index."""
    worst = tl.max(keys, axis=1)
    worst_id = tl.max(tl.where(keys == worst[:, None], ids, -1), axis=1)
    return worst, worst_id


@triton.jit
def _insert(keys, ids, worst, worst_id, key, j, cand):
    """Keep the KP smallest (key, window index) pairs per query: candidate j replaces the
    current worst (largest key, then largest index) when its key is strictly smaller. The
    worst pair is carried and recomputed only when some query of the block took a candidate
    (after the first few candidates, most take none)."""
    take = cand & (key < worst)
    if tl.max(take.to(tl.int32), axis=0) > 0:
        hit = (ids == worst_id[:, None]) & take[:, None]
        keys = tl.where(hit, key[:, None], keys)
        ids = tl.where(hit, j, ids)
        worst, worst_id = _worst(keys, ids)
    return keys, ids, worst, worst_id


@triton.jit
def _rank(keys, ids):
    """Rank of each kept pair in (key, index) order."""
    less = (keys[:, None, :] < keys[:, :, None]) | (
        (keys[:, None, :] == keys[:, :, None]) & (ids[:, None, :] < ids[:, :, None])
    )
    return tl.sum(less.to(tl.int32), axis=2)


@triton.jit
def _search_fwd_kernel(
    q_ptr,
    k_ptr,
    flow_ptr,  # videos (B, HD, T, C, H, W); flows (B, T, S, 2, H, W) or unused
    dist_ptr,  # out: (B*HD, count, KOUT) distances, nearest first; (B*HD, count, NWIN) when ALL
    inds_ptr,  # out: (B*HD, count, KOUT, 3) positions (when ALL: NWIN, written if ALL_INDS)
    widx_ptr,  # out: (B*HD, count, KOUT) window indices, -1 for the anchored query
    sq_b,
    sq_h,
    sq_t,
    sq_c,
    sq_y,
    sq_x,  # strides of q
    sk_b,
    sk_h,
    sk_t,
    sk_c,
    sk_y,
    sk_x,  # strides of k
    sf_b,
    sf_t,
    sf_s,
    sf_c,
    sf_y,
    sf_x,  # strides of flows
    HD,
    T,
    C,
    H,
    W,
    start,
    count,
    t0,
    h0,
    w0,
    nh,
    nw,
    stride0,  # query grid
    s1,
    lo_steps,
    hi_steps,
    S,  # window: stride1, steps before/after the centre, frames
    NWIN,
    KEEP,  # how many candidates the selection keeps (<= KP)
    KOUT,  # results per query: KEEP, plus one for the anchored query
    WS: tl.constexpr,
    PS: tl.constexpr,
    PT: tl.constexpr,
    DIL: tl.constexpr,
    KP: tl.constexpr,
    ALL: tl.constexpr,
    ALL_INDS: tl.constexpr,
    DOT: tl.constexpr,
    REFLECT: tl.constexpr,
    SKIP_OWN: tl.constexpr,
    ANCHOR: tl.constexpr,
    WHOLE: tl.constexpr,
    HAS_FLOW: tl.constexpr,
    POS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PSP: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HD
    hd = pid_bh % HD
    q_base = q_ptr + b.to(tl.int64) * sq_b + hd.to(tl.int64) * sq_h
    k_base = k_ptr + b.to(tl.int64) * sk_b + hd.to(tl.int64) * sk_h

    lane = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qi = start + lane
    qmask = lane < count
    qi = tl.where(qmask, qi, start)
    qt, qy, qx = _query_position(qi, t0, h0, w0, nh, nw, stride0)
    row = pid_bh.to(tl.int64) * count + (qi - start).to(tl.int64)

    tstart, lo, hi_y, hi_x = _window_bounds(qt, T, H, W, S, s1, lo_steps, hi_steps, POS)
    # offset of each query's pixel in the flows (slot 0)
    pix_off = (
        b.to(tl.int64) * sf_b
        + qt.to(tl.int64) * sf_t
        + qy.to(tl.int64) * sf_y
        + qx.to(tl.int64) * sf_x
    )

    slot = tl.arange(0, KP)
    keys = tl.where(slot < KEEP, float("inf"), float("-inf")).to(ACC)
    keys = tl.zeros((BLOCK_Q, KP), dtype=ACC) + keys[None, :]
    ids = tl.zeros((BLOCK_Q, KP), dtype=tl.int32) + tl.where(slot < KEEP, NWIN + slot, -1)[None, :]
    worst, worst_id = _worst(keys, ids)

    for s in range(S):
        tf = tstart + s
        cy, cx, _, _ = _centre(
            flow_ptr,
            pix_off,
            s,
            qmask & (tf != qt),
            qy.to(POS),
            qx.to(POS),
            lo,
            hi_y,
            hi_x,
            sf_s,
            sf_c,
            HAS_FLOW,
            POS,
        )
        for a in range(WS):
            ky = cy + ((a - lo_steps) * s1).to(POS)
            for bb in range(WS):
                kx = cx + ((bb - lo_steps) * s1).to(POS)
                d = _patch_dist(
                    q_base,
                    k_base,
                    qt,
                    qy,
                    qx,
                    tf,
                    ky,
                    kx,
                    C,
                    sq_t,
                    sq_c,
                    sq_y,
                    sq_x,
                    sk_t,
                    sk_c,
                    sk_y,
                    sk_x,
                    T,
                    H,
                    W,
                    PS,
                    PSP,
                    PT,
                    DIL,
                    BLOCK_C,
                    DOT,
                    REFLECT,
                    WHOLE,
                    ACC,
                )
                key = -d if DOT else d
                j = (s * WS + a) * WS + bb
                if ALL:
                    tl.store(dist_ptr + row * NWIN + j, d.to(dist_ptr.dtype.element_ty), mask=qmask)
                    if ALL_INDS:
                        ity = inds_ptr.dtype.element_ty
                        at = row * NWIN + j
                        tl.store(widx_ptr + at, tl.zeros_like(qi) + j, mask=qmask)
                        tl.store(inds_ptr + at * 3, tf.to(ity), mask=qmask)
                        tl.store(inds_ptr + at * 3 + 1, ky.to(ity), mask=qmask)
                        tl.store(inds_ptr + at * 3 + 2, kx.to(ity), mask=qmask)
                else:
                    cand = qmask
                    if SKIP_OWN:
                        own = (tf == qt) & (ky == qy.to(POS)) & (kx == qx.to(POS))
                        cand = cand & (own == 0)
                    keys, ids, worst, worst_id = _insert(keys, ids, worst, worst_id, key, j, cand)
    if not ALL:
        # Rank of each kept (key, index) pair; the KP - KEEP padding slots (-inf) rank first.
        rank = _rank(keys, ids)
        kept = qmask[:, None] & (rank >= KP - KEEP)
        col = rank - (KP - KEEP) + (1 if ANCHOR else 0)
        out = row[:, None] * KOUT + col
        # positions of the kept window indices
        sid = tl.where(kept, ids, 0)
        s_ = sid // (WS * WS)
        tf = tstart[:, None] + s_
        cy = qy[:, None].to(POS) + tl.zeros((BLOCK_Q, KP), POS)
        cx = qx[:, None].to(POS) + tl.zeros((BLOCK_Q, KP), POS)
        moves = kept & (tf != qt[:, None])
        cy, cx, _, _ = _centre(
            flow_ptr, pix_off[:, None], s_, moves, cy, cx, lo, hi_y, hi_x, sf_s, sf_c, HAS_FLOW, POS
        )
        ky, kx = _offset(cy, cx, sid, lo_steps, s1, WS, POS)
        dist = -keys if DOT else keys
        tl.store(dist_ptr + out, dist.to(dist_ptr.dtype.element_ty), mask=kept)
        tl.store(widx_ptr + out, ids, mask=kept)
        ity = inds_ptr.dtype.element_ty
        tl.store(inds_ptr + out * 3, tf.to(ity), mask=kept)
        tl.store(inds_ptr + out * 3 + 1, ky.to(ity), mask=kept)
        tl.store(inds_ptr + out * 3 + 2, kx.to(ity), mask=kept)
        if ANCHOR:
            d = _patch_dist(
                q_base,
                k_base,
                qt,
                qy,
                qx,
                qt,
                qy.to(POS),
                qx.to(POS),
                C,
                sq_t,
                sq_c,
                sq_y,
                sq_x,
                sk_t,
                sk_c,
                sk_y,
                sk_x,
                T,
                H,
                W,
                PS,
                PSP,
                PT,
                DIL,
                BLOCK_C,
                DOT,
                REFLECT,
                WHOLE,
                ACC,
            )
            first = row * KOUT
            tl.store(dist_ptr + first, d.to(dist_ptr.dtype.element_ty), mask=qmask)
            tl.store(widx_ptr + first, tl.full((BLOCK_Q,), -1, tl.int32), mask=qmask)
            tl.store(inds_ptr + first * 3, qt.to(ity), mask=qmask)
            tl.store(inds_ptr + first * 3 + 1, qy.to(ity), mask=qmask)
            tl.store(inds_ptr + first * 3 + 2, qx.to(ity), mask=qmask)


@triton.jit
def _tf32_parts(x):
    """``x`` as the sum of three float32 values whose products with 0/1 are exact in tf32."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    rest = x - hi
    mid = (rest.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, mid, rest - mid


@triton.jit
def _box(e, by, bx, TC: tl.constexpr):
    """Box sums of ``e``: ``by @ e @ bx.T`` for 0/1 band matrices whose rows are outputs, with
    exact products and float32 sums. The first product runs on tensor cores (``e`` in three
    tf32 parts), the second in float32 FMA: a tensor-core result would be laid out with 16
    values per thread, and the kept top-k with it."""
    if TC:
        e1, e2, e3 = _tf32_parts(e)
        r = tl.dot(by, e1, input_precision="tf32")
        r = tl.dot(by, e2, r, input_precision="tf32")
        r = tl.dot(by, e3, r, input_precision="tf32")
    else:
        r = tl.dot(by, e, input_precision="ieee")
    return tl.dot(r, tl.trans(bx), input_precision="ieee")


@triton.jit
def _band(n: tl.constexpr, PS: tl.constexpr, DIL: tl.constexpr):
    """(n, n) 0/1 matrix with 1 at (output o, input e) when e is tap i of o: e - o = i DIL, i < PS."""
    i = tl.arange(0, n)
    gap = i[None, :] - i[:, None]
    return ((gap >= 0) & (gap % DIL == 0) & (gap < (PS - 1) * DIL + 1)).to(tl.float32)


@triton.jit
def _insert_sorted(keys, ids, key, j, KEEP: tl.constexpr):
    """Insert (key, j) into the ascending tuples ``keys``/``ids``, dropping the last. Strictly
    smaller keys move ahead, so an equal key stays behind the earlier candidate."""
    c = key < keys[0]
    new_keys = (tl.where(c, key, keys[0]),)
    new_ids = (tl.where(c, j, ids[0]),)
    for s in tl.static_range(1, KEEP):
        cs = key < keys[s]
        new_keys = new_keys + (tl.where(c, keys[s - 1], tl.where(cs, key, keys[s])),)
        new_ids = new_ids + (tl.where(c, ids[s - 1], tl.where(cs, j, ids[s])),)
        c = cs
    return new_keys, new_ids


@triton.jit
def _window_steps(d, off, s1, lo_steps, WS: tl.constexpr, UNIT: tl.constexpr):
    """Window step index of displacement ``d`` for queries whose centre the slide moved by
    ``off``, and whether it is on their window's grid."""
    a = d - off
    if UNIT:
        step = a + lo_steps
        on = (step >= 0) & (step < WS)
    else:
        step = a // s1 + lo_steps
        on = (a % s1 == 0) & (step >= 0) & (step < WS)
    return step, on


@triton.jit
def _search_tile_kernel(
    q_ptr,
    k_ptr,  # videos (B, HD, T, C, H, W)
    dist_ptr,
    inds_ptr,
    widx_ptr,  # outputs, as in _search_fwd_kernel (never ALL here)
    sq_b,
    sq_h,
    sq_t,
    sq_c,
    sq_y,
    sq_x,  # strides of q
    sk_b,
    sk_h,
    sk_t,
    sk_c,
    sk_y,
    sk_x,  # strides of k
    HD,
    T,
    C,
    H,
    W,
    start,
    count,
    t0,
    h0,
    w0,
    nh,
    nw,  # query grid (stride0 = 1)
    tile0,
    nty,
    ntx,  # first tile of the batch; tiles per frame in y and x
    s1,
    lo_steps,
    hi_steps,
    S,
    NWIN,
    KOUT,
    WS: tl.constexpr,
    PS: tl.constexpr,
    PT: tl.constexpr,
    DIL: tl.constexpr,
    KEEP: tl.constexpr,
    DOT: tl.constexpr,
    REFLECT: tl.constexpr,
    SKIP_OWN: tl.constexpr,
    ANCHOR: tl.constexpr,
    UNIT: tl.constexpr,
    TY: tl.constexpr,
    TX: tl.constexpr,
    TC: tl.constexpr,
):
    """Reuse across queries by displacement, for whole positions without flows, stride0 = 1.

    A program owns a tile of (TY - span + 1) x (TX - span + 1) queries of one frame and walks
    every displacement (dt, dy, dx) that is a candidate of some query of the tile, in window
    order. For each it forms the (TY, TX) image of per-pixel terms
        e(y, x) = sum over channels and patch frames of (q(y, x) - k(y + dy, x + dx))^2  (or q k)
    and box-sums it to every query's patch distance with two matrix products by 0/1 band
    matrices (tensor cores, exact products): O(C) work per pixel instead of O(C ps^2) per
    query. Where the slide moved a query's window (tiles at the frame's edges) the range of
    displacements widens and each query keeps only those on its own window's grid. Each query
    keeps its KEEP best in ascending tuples (insertion, ties to the earlier candidate)."""
    SPAN: tl.constexpr = (PS - 1) * DIL + 1
    OH: tl.constexpr = TY - SPAN + 1
    OW: tl.constexpr = TX - SPAN + 1
    HALF: tl.constexpr = (PS // 2) * DIL
    tile = tl.program_id(0) + tile0
    bh = tl.program_id(1)
    b = bh // HD
    hd = bh % HD
    q_base = q_ptr + b.to(tl.int64) * sq_b + hd.to(tl.int64) * sq_h
    k_base = k_ptr + b.to(tl.int64) * sk_b + hd.to(tl.int64) * sk_h
    f = tile // (nty * ntx)
    gy0 = (tile // ntx) % nty * OH
    gx0 = tile % ntx * OW
    ey = tl.arange(0, TY)
    ex = tl.arange(0, TX)
    gy = gy0 + ey
    gx = gx0 + ex
    qi = (f * nh + gy)[:, None] * nw + gx[None, :]
    live = ((ey < OH) & (gy < nh))[:, None] & ((ex < OW) & (gx < nw))[None, :]
    live = live & (qi >= start) & (qi < start + count)
    qt = t0 + f
    qy = h0 + gy
    qx = w0 + gx
    tstart = tl.minimum(tl.maximum(qt - (S // 2), 0), T - S)
    lo = lo_steps * s1
    hi_y = H - 1 - hi_steps * s1
    hi_x = W - 1 - hi_steps * s1
    cy = tl.maximum(tl.minimum(qy, hi_y), lo)
    cx = tl.maximum(tl.minimum(qx, hi_x), lo)
    off_y = cy - qy
    off_x = cx - qx
    # the slide's offsets at the tile's first and last live row/column bound the displacements
    y_first = h0 + gy0
    y_last = h0 + tl.minimum(gy0 + OH, nh) - 1
    x_first = w0 + gx0
    x_last = w0 + tl.minimum(gx0 + OW, nw) - 1
    oy_hi = tl.maximum(tl.minimum(y_first, hi_y), lo) - y_first
    oy_lo = tl.maximum(tl.minimum(y_last, hi_y), lo) - y_last
    ox_hi = tl.maximum(tl.minimum(x_first, hi_x), lo) - x_first
    ox_lo = tl.maximum(tl.minimum(x_last, hi_x), lo) - x_last
    step_y = tl.where((oy_lo == 0) & (oy_hi == 0), s1, 1)
    step_x = tl.where((ox_lo == 0) & (ox_hi == 0), s1, 1)

    # pixels of the (TY, TX) image: the queries' patches start HALF before them
    py = qy - HALF
    px = qx - HALF
    qyi, qyv = _border(py, H, REFLECT)
    qxi, qxv = _border(px, W, REFLECT)
    q_sp = qyi[:, None] * sq_y + qxi[None, :] * sq_x
    q_m = qyv[:, None] & qxv[None, :]
    if SPAN > 1:
        by = _band(TY, PS, DIL)
        bx = _band(TX, PS, DIL)

    keys = ()
    ids = ()
    for s in tl.static_range(KEEP):
        keys = keys + (tl.full((TY, TX), float("inf"), tl.float32),)
        ids = ids + (tl.full((TY, TX), NWIN + s, tl.int32),)
    own_d = tl.zeros((TY, TX), tl.float32)
    for s in range(S):
        tf = tstart + s
        for dy in range(oy_lo - lo, oy_hi + hi_steps * s1 + 1, step_y):
            wy, on_y = _window_steps(dy, off_y, s1, lo_steps, WS, UNIT)
            kyi, kyv = _border(py + dy, H, REFLECT)
            for dx in range(ox_lo - lo, ox_hi + hi_steps * s1 + 1, step_x):
                wx, on_x = _window_steps(dx, off_x, s1, lo_steps, WS, UNIT)
                kxi, kxv = _border(px + dx, W, REFLECT)
                k_sp = kyi[:, None] * sk_y + kxi[None, :] * sk_x
                k_m = kyv[:, None] & kxv[None, :]
                e = tl.zeros((TY, TX), tl.float32)
                for dt in tl.static_range(PT):
                    qti, qtv = _border(qt + dt, T, REFLECT)
                    kti, ktv = _border(tf + dt, T, REFLECT)
                    q_fr = q_base + qti.to(tl.int64) * sq_t
                    k_fr = k_base + kti.to(tl.int64) * sk_t
                    # (a scalar mask is broadcast by value: the interpreter rejects scalar & tensor)
                    qm = q_m & (qtv.to(tl.int32) + q_sp * 0 > 0)
                    km = k_m & (ktv.to(tl.int32) + k_sp * 0 > 0)
                    for c in range(C):
                        qv = tl.load(q_fr + c * sq_c + q_sp, mask=qm, other=0.0)
                        kv = tl.load(k_fr + c * sk_c + k_sp, mask=km, other=0.0)
                        if DOT:
                            e += qv.to(tl.float32) * kv.to(tl.float32)
                        else:
                            diff = qv.to(tl.float32) - kv.to(tl.float32)
                            e += diff * diff
                if SPAN > 1:
                    d = _box(e, by, bx, TC)
                else:
                    d = e
                key = -d if DOT else d
                cand = live & on_y[:, None] & on_x[None, :]
                if SKIP_OWN:
                    own = (tf == qt) & (dy == 0) & (dx == 0)
                    cand = cand & (own == 0)
                    if ANCHOR:
                        own_d = tl.where(own, d, own_d)
                key = tl.where(cand, key, float("inf"))
                j = (s * WS + wy)[:, None] * WS + wx[None, :]
                keys, ids = _insert_sorted(keys, ids, key, j, KEEP)

    row = bh.to(tl.int64) * count + (qi - start).to(tl.int64)
    dty = dist_ptr.dtype.element_ty
    ity = inds_ptr.dtype.element_ty
    for s in tl.static_range(KEEP):
        out = row * KOUT + (s + ANCHOR)
        sid = ids[s]
        dist = -keys[s] if DOT else keys[s]
        tl.store(dist_ptr + out, dist.to(dty), mask=live)
        tl.store(widx_ptr + out, sid, mask=live)
        tl.store(inds_ptr + out * 3, (tstart + sid // (WS * WS)).to(ity), mask=live)
        ky = cy[:, None] + ((sid // WS) % WS - lo_steps) * s1
        kx = cx[None, :] + (sid % WS - lo_steps) * s1
        tl.store(inds_ptr + out * 3 + 1, ky.to(ity), mask=live)
        tl.store(inds_ptr + out * 3 + 2, kx.to(ity), mask=live)
    if ANCHOR:
        first = row * KOUT
        tl.store(dist_ptr + first, own_d.to(dty), mask=live)
        tl.store(widx_ptr + first, tl.full((TY, TX), -1, tl.int32), mask=live)
        tl.store(inds_ptr + first * 3, (qt + ey[:, None] * 0).to(ity), mask=live)
        tl.store(inds_ptr + first * 3 + 1, (qy[:, None] + ex[None, :] * 0).to(ity), mask=live)
        tl.store(inds_ptr + first * 3 + 2, (qx[None, :] + ey[:, None] * 0).to(ity), mask=live)


@triton.jit
def _accumulate(ptr, val, mask, scale, FIXED: tl.constexpr):
    """Atomic add of ``val``; with FIXED, of ``round(val * scale)`` into an int64 accumulator.
    Integer addition is associative, so the fixed-point sums have the same bits on every run."""
    if FIXED:
        v = val.to(tl.float64) * scale
        v = tl.where(v >= 0, v + 0.5, v - 0.5)
        tl.atomic_add(ptr, v.to(tl.int64), mask=mask)
    else:
        tl.atomic_add(ptr, val, mask=mask)


@triton.jit
def _search_bwd_kernel(
    q_ptr,
    k_ptr,
    flow_ptr,  # videos (B, HD, T, C, H, W); flows (B, T, S, 2, H, W) or unused
    gd_ptr,  # (B*HD, count, K) gradient of the distances
    gi_ptr,  # (B*HD, count, K, 3) gradient of float positions (HAS_GI only)
    widx_ptr,  # (B*HD, count, K) window indices, -1 for the query itself
    gq_ptr,
    gk_ptr,  # out: (B, HD, T, C, H, W) contiguous accumulators, zeroed
    gf_ptr,  # out: (B, T, S, 2, H, W) contiguous accumulator (FLOW_GRAD only)
    sq_b,
    sq_h,
    sq_t,
    sq_c,
    sq_y,
    sq_x,  # strides of q
    sk_b,
    sk_h,
    sk_t,
    sk_c,
    sk_y,
    sk_x,  # strides of k
    sf_b,
    sf_t,
    sf_s,
    sf_c,
    sf_y,
    sf_x,  # strides of flows
    HD,
    T,
    C,
    H,
    W,
    start,
    count,
    t0,
    h0,
    w0,
    nh,
    nw,
    stride0,  # query grid
    s1,
    lo_steps,
    hi_steps,
    S,  # window
    K,
    scale,  # fixed-point scale of the accumulators (FIXED only)
    WS: tl.constexpr,
    PS: tl.constexpr,
    PT: tl.constexpr,
    DIL: tl.constexpr,
    DOT: tl.constexpr,
    REFLECT: tl.constexpr,
    WHOLE: tl.constexpr,
    HAS_FLOW: tl.constexpr,
    FLOW_GRAD: tl.constexpr,
    HAS_GI: tl.constexpr,
    FIXED: tl.constexpr,
    POS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PSP: tl.constexpr,
):
    """For each (query, result): g = dL/d dist, q and k the two patches.
        l2:  dL/dq += 2 g (q - k),  dL/dk = -2 g (q - k);   dot: dL/dq += g k,  dL/dk = g q
    dL/dk is added to the key video through the same taps that read k (bilinear weights and
    border rule: the adjoint of the read); dL/dpos = <dL/dk, dk/dpos> (+ the gradient of the
    returned position) goes to the flow of the candidate's frame where the window was not slid.
    Accumulation is by atomic adds: float ones, or int64 fixed-point ones (FIXED) for the
    deterministic mode."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HD
    hd = pid_bh % HD
    q_base = q_ptr + b.to(tl.int64) * sq_b + hd.to(tl.int64) * sq_h
    k_base = k_ptr + b.to(tl.int64) * sk_b + hd.to(tl.int64) * sk_h
    # accumulators are contiguous (B, HD, T, C, H, W)
    g_base = pid_bh.to(tl.int64) * T * C * H * W
    gq_base = gq_ptr + g_base
    gk_base = gk_ptr + g_base

    lane = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = lane < count
    qi = start + tl.where(qmask, lane, 0)
    qt, qy, qx = _query_position(qi, t0, h0, w0, nh, nw, stride0)
    row = pid_bh.to(tl.int64) * count + lane.to(tl.int64)
    tstart, lo, hi_y, hi_x = _window_bounds(qt, T, H, W, S, s1, lo_steps, hi_steps, POS)
    # offset of each query's pixel in the flows (slot 0)
    pix_off = (
        b.to(tl.int64) * sf_b
        + qt.to(tl.int64) * sf_t
        + qy.to(tl.int64) * sf_y
        + qx.to(tl.int64) * sf_x
    )

    ii = tl.arange(0, PSP)
    offs = (ii - PS // 2) * DIL
    pmask = ii < PS
    cc = tl.arange(0, BLOCK_C)
    q_sp, q_m = _spatial(qy, qx, offs, pmask, sq_y, sq_x, H, W, REFLECT)
    gq_sp, _ = _spatial(qy, qx, offs, pmask, W, 1, H, W, REFLECT)

    for kk in range(K):
        g = tl.load(gd_ptr + row * K + kk, mask=qmask, other=0).to(ACC)
        wi = tl.load(widx_ptr + row * K + kk, mask=qmask, other=-1)
        own = wi < 0
        sid = tl.where(own, 0, wi)
        s_ = sid // (WS * WS)
        tf = tl.where(own, qt, tstart + s_)
        moves = qmask & (own == 0) & (tf != qt)
        cy, cx, free_y, free_x = _centre(
            flow_ptr,
            pix_off,
            s_,
            moves,
            qy.to(POS),
            qx.to(POS),
            lo,
            hi_y,
            hi_x,
            sf_s,
            sf_c,
            HAS_FLOW,
            POS,
        )
        ky, kx = _offset(cy, cx, sid, lo_steps, s1, WS, POS)
        ky = tl.where(own, qy.to(POS), ky)
        kx = tl.where(own, qx.to(POS), kx)
        if WHOLE:
            k_sp, k_m = _spatial(ky, kx, offs, pmask, sk_y, sk_x, H, W, REFLECT)
            gk_sp, _ = _spatial(ky, kx, offs, pmask, W, 1, H, W, REFLECT)
        else:
            y0f = tl.floor(ky)
            x0f = tl.floor(kx)
            fy = (ky - y0f).to(ACC)[:, None, None, None]
            fx = (kx - x0f).to(ACC)[:, None, None, None]
            y0 = y0f.to(tl.int32)
            x0 = x0f.to(tl.int32)
            sp00, m00 = _spatial(y0, x0, offs, pmask, sk_y, sk_x, H, W, REFLECT)
            sp01, m01 = _spatial(y0, x0 + 1, offs, pmask, sk_y, sk_x, H, W, REFLECT)
            sp10, m10 = _spatial(y0 + 1, x0, offs, pmask, sk_y, sk_x, H, W, REFLECT)
            sp11, m11 = _spatial(y0 + 1, x0 + 1, offs, pmask, sk_y, sk_x, H, W, REFLECT)
            gp00, _ = _spatial(y0, x0, offs, pmask, W, 1, H, W, REFLECT)
            gp01, _ = _spatial(y0, x0 + 1, offs, pmask, W, 1, H, W, REFLECT)
            gp10, _ = _spatial(y0 + 1, x0, offs, pmask, W, 1, H, W, REFLECT)
            gp11, _ = _spatial(y0 + 1, x0 + 1, offs, pmask, W, 1, H, W, REFLECT)
        g4 = g[:, None, None, None]
        gpos_y = tl.zeros((BLOCK_Q,), ACC)
        gpos_x = tl.zeros((BLOCK_Q,), ACC)
        for dt in tl.static_range(PT):
            qti, qtv = _border(qt + dt, T, REFLECT)
            kti, ktv = _border(tf + dt, T, REFLECT)
            q_fr = (q_base + qti.to(tl.int64) * sq_t)[:, None, None, None]
            k_fr = (k_base + kti.to(tl.int64) * sk_t)[:, None, None, None]
            gq_fr = (gq_base + qti.to(tl.int64) * (C * H * W))[:, None, None, None]
            gk_fr = (gk_base + kti.to(tl.int64) * (C * H * W))[:, None, None, None]
            qv4 = (qtv & qmask)[:, None, None, None]
            kv4 = (ktv & qmask)[:, None, None, None]
            for c0 in range(0, C, BLOCK_C):
                ch = c0 + cc
                cm = (ch < C)[None, :, None, None]
                qc = (ch * sq_c)[None, :, None, None]
                kc = (ch * sk_c)[None, :, None, None]
                gc = (ch * (H * W))[None, :, None, None]
                qm = q_m & cm & qv4
                qv = tl.load(q_fr + qc + q_sp, mask=qm, other=0.0).to(ACC)
                if WHOLE:
                    km = k_m & cm & kv4
                    kv = tl.load(k_fr + kc + k_sp, mask=km, other=0.0).to(ACC)
                else:
                    km = cm & kv4
                    v00 = tl.load(k_fr + kc + sp00, mask=m00 & km, other=0.0).to(ACC)
                    v01 = tl.load(k_fr + kc + sp01, mask=m01 & km, other=0.0).to(ACC)
                    v10 = tl.load(k_fr + kc + sp10, mask=m10 & km, other=0.0).to(ACC)
                    v11 = tl.load(k_fr + kc + sp11, mask=m11 & km, other=0.0).to(ACC)
                    top = v00 * (1 - fx) + v01 * fx
                    bot = v10 * (1 - fx) + v11 * fx
                    kv = top * (1 - fy) + bot * fy
                if DOT:
                    gqp = g4 * kv
                    gkp = g4 * qv
                else:
                    gqp = 2 * g4 * (qv - kv)
                    gkp = -gqp
                _accumulate(gq_fr + gc + gq_sp, gqp, qm, scale, FIXED)
                if WHOLE:
                    _accumulate(gk_fr + gc + gk_sp, gkp, km, scale, FIXED)
                else:
                    gk_at = gk_fr + gc
                    _accumulate(gk_at + gp00, gkp * (1 - fy) * (1 - fx), m00 & km, scale, FIXED)
                    _accumulate(gk_at + gp01, gkp * (1 - fy) * fx, m01 & km, scale, FIXED)
                    _accumulate(gk_at + gp10, gkp * fy * (1 - fx), m10 & km, scale, FIXED)
                    _accumulate(gk_at + gp11, gkp * fy * fx, m11 & km, scale, FIXED)
                    if FLOW_GRAD:
                        dky = bot - top
                        dkx = (v01 - v00) * (1 - fy) + (v11 - v10) * fy
                        gpos_y += tl.sum(tl.sum(tl.sum(gkp * dky, axis=3), axis=2), axis=1)
                        gpos_x += tl.sum(tl.sum(tl.sum(gkp * dkx, axis=3), axis=2), axis=1)
        if FLOW_GRAD:
            if HAS_GI:
                gi_off = (row * K + kk) * 3
                gpos_y += tl.load(gi_ptr + gi_off + 1, mask=qmask, other=0).to(ACC)
                gpos_x += tl.load(gi_ptr + gi_off + 2, mask=qmask, other=0).to(ACC)
            # the flow accumulator is laid out contiguously as the flows
            gf_off = (((b.to(tl.int64) * T + qt) * S + s_) * 2 * H + qy) * W + qx
            _accumulate(gf_ptr + gf_off, gpos_y, moves & free_y, scale, FIXED)
            _accumulate(gf_ptr + gf_off + H * W, gpos_x, moves & free_x, scale, FIXED)


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


class _Layout(NamedTuple):
    """What both launchers derive from the shapes: the query grid, the flows argument (the
    query video stands in when there are none) and the patch tile sizes."""

    t0: int
    h0: int
    w0: int
    nh: int
    nw: int
    flows: torch.Tensor
    flow_strides: tuple
    psp: int
    block_c: int

    @staticmethod
    def of(qvid: torch.Tensor, flows: torch.Tensor | None, p) -> _Layout:
        t0, _, h0, h1, w0, w1 = p.region
        psp = next_power_of_2(p.ps)
        return _Layout(
            t0, h0, w0, -(-(h1 - h0) // p.stride0), -(-(w1 - w0) // p.stride0),
            flows if flows is not None else qvid,
            flows.stride() if flows is not None else (0,) * 6,
            psp, max(1, min(next_power_of_2(qvid.shape[3]), 64 // (psp * psp))),
        )  # fmt: skip


# Launch configuration; ``block_q=None`` picks by the size of the kept top-k. ``tiles``: the
# tile kernel (reuse across queries) takes every search it can; ``tile`` is its (TY, TX) image.
CONFIG = {"block_q": None, "num_warps": 4, "tiles": True, "tile": (32, 32), "tile_warps": 8, "tile_tc": True}
MAX_TILE_KEEP = 32


def _tiles(p, whole: bool, flows, keep: int, qvid) -> tuple[int, int] | None:
    """(TY, TX) of the tile kernel when it applies: whole positions, no flows, stride0 = 1,
    k given, float32 accumulation, a patch span of at most half the tile, a window that fits
    in the frame."""
    ty, tx = CONFIG["tile"]
    span = (p.ps - 1) * p.dilation + 1
    fits = (p.ws - 1) * int(p.stride1) < min(qvid.shape[-2:]) if whole else False
    ok = (
        CONFIG["tiles"] and whole and flows is None and p.stride0 == 1 and fits
        and 1 <= keep <= MAX_TILE_KEEP and qvid.dtype != torch.float64 and 2 * span <= min(ty, tx)
    )  # fmt: skip
    return (ty, tx) if ok else None


def search_forward(qvid, kvid, flows, p, whole: bool, pos_dtype, inds_dtype):
    """Run the kernel. With ``k`` given, returns the final ``(dists, inds, widx)`` of shapes
    ``(B, HD, count, K)``, ``(B, HD, count, K, 3)`` and ``(B, HD, count, K)``; with ``k=None``,
    every candidate in window order: the same with ``K = W`` for ``self_match="keep"``, else
    ``(dists, None, None)`` (the caller reorders)."""
    b, hd, nframes, c, height, width = qvid.shape
    acc = torch.float64 if qvid.dtype == torch.float64 else torch.float32
    select_all = p.k < 0
    anchor = p.self_match == "anchor" and not select_all
    keep = 0 if select_all else p.nk - anchor
    kp = next_power_of_2(max(keep, 1))
    dev = qvid.device
    kout = p.nwin if select_all else p.nk
    dists = torch.empty(b, hd, p.count, kout, dtype=qvid.dtype, device=dev)
    all_inds = select_all and p.self_match == "keep"
    if select_all and not all_inds:
        inds = widx = dists
    else:
        inds = torch.empty(b, hd, p.count, kout, 3, dtype=inds_dtype, device=dev)
        widx = torch.empty(b, hd, p.count, kout, dtype=torch.int32, device=dev)
    t0, h0, w0, nh, nw, fl, fstrides, psp, block_c = _Layout.of(qvid, flows, p)
    block_q = CONFIG["block_q"] or (64 if kp <= 16 else 32)
    if p.count == 0 or b * hd == 0:
        return (dists, None, None) if select_all and not all_inds else (dists, inds, widx)
    tiles = None if select_all else _tiles(p, whole, flows, keep, qvid)
    if tiles is not None:
        ty, tx = tiles
        span = (p.ps - 1) * p.dilation + 1
        oh, ow = ty - span + 1, tx - span + 1
        nty, ntx = -(-nh // oh), -(-nw // ow)
        first, last = divmod(p.start, nh * nw), divmod(p.start + p.count - 1, nh * nw)
        tile0 = (first[0] * nty + first[1] // nw // oh) * ntx
        tile1 = (last[0] * nty + last[1] // nw // oh) * ntx + ntx - 1
        _search_tile_kernel[(tile1 - tile0 + 1, b * hd)](
            qvid, kvid, dists, inds, widx,
            *qvid.stride(), *kvid.stride(),
            hd, nframes, c, height, width,
            p.start, p.count, t0, h0, w0, nh, nw, tile0, nty, ntx,
            int(p.stride1), p.ws // 2, p.ws - 1 - p.ws // 2, p.nslots, p.nwin, kout,
            WS=p.ws, PS=p.ps, PT=p.pt, DIL=p.dilation, KEEP=keep,
            DOT=p.dist == "dot", REFLECT=p.border == "reflect",
            SKIP_OWN=p.self_match != "keep", ANCHOR=anchor, UNIT=int(p.stride1) == 1,
            TY=ty, TX=tx, TC=CONFIG["tile_tc"], num_warps=CONFIG["tile_warps"],
        )  # fmt: skip
    else:
        _search_fwd_kernel[(triton.cdiv(p.count, block_q), b * hd)](
            qvid, kvid, fl, dists, inds, widx,
            *qvid.stride(), *kvid.stride(), *fstrides,
            hd, nframes, c, height, width,
            p.start, p.count, t0, h0, w0, nh, nw, p.stride0,
            float(p.stride1), p.ws // 2, p.ws - 1 - p.ws // 2, p.nslots,
            p.nwin, keep, kout,
            WS=p.ws, PS=p.ps, PT=p.pt, DIL=p.dilation, KP=kp, ALL=select_all, ALL_INDS=all_inds,
            DOT=p.dist == "dot", REFLECT=p.border == "reflect",
            SKIP_OWN=(not select_all) and p.self_match != "keep", ANCHOR=anchor,
            WHOLE=whole, HAS_FLOW=flows is not None,
            POS=tl.int32 if whole else _TL_DTYPES[pos_dtype], ACC=_TL_DTYPES[acc],
            BLOCK_Q=block_q, BLOCK_C=block_c, PSP=psp, num_warps=CONFIG["num_warps"],
        )  # fmt: skip
    if select_all and not all_inds:
        return dists, None, None
    return dists, inds, widx


def search_backward(gdists, ginds, qvid, kvid, flows, widx, p, whole: bool, pos_dtype):
    """Gradients ``(gq, gk, gflows)`` of the search for the results ``widx``; ``gflows`` is an
    empty tensor unless ``flows`` is floating."""
    b, hd, nframes, c, height, width = qvid.shape
    acc = torch.float64 if qvid.dtype == torch.float64 else torch.float32
    dev = qvid.device
    flow_grad = flows is not None and flows.is_floating_point() and not whole
    gd = gdists.contiguous()
    gi = ginds.contiguous() if (flow_grad and ginds is not None) else gd
    scale = _fixed_point_scale(gd, gi if flow_grad and ginds is not None else None, qvid, kvid, p)
    buf = acc if scale is None else torch.int64
    gq = torch.zeros(qvid.shape, dtype=buf, device=dev)
    gk = torch.zeros(kvid.shape, dtype=buf, device=dev)
    gf = torch.zeros(flows.shape, dtype=buf, device=dev) if flow_grad else gq
    widx = widx.contiguous()
    t0, h0, w0, nh, nw, fl, fstrides, psp, block_c = _Layout.of(qvid, flows, p)
    block_q = 32
    grid = (triton.cdiv(p.count, block_q), b * hd)
    if p.count > 0 and b * hd > 0 and p.nk > 0:
        _search_bwd_kernel[grid](
            qvid, kvid, fl, gd, gi, widx, gq, gk, gf,
            *qvid.stride(), *kvid.stride(), *fstrides,
            hd, nframes, c, height, width,
            p.start, p.count, t0, h0, w0, nh, nw, p.stride0,
            float(p.stride1), p.ws // 2, p.ws - 1 - p.ws // 2, p.nslots,
            p.nk, 1.0 if scale is None else scale,
            WS=p.ws, PS=p.ps, PT=p.pt, DIL=p.dilation,
            DOT=p.dist == "dot", REFLECT=p.border == "reflect",
            WHOLE=whole, HAS_FLOW=flows is not None, FLOW_GRAD=flow_grad,
            HAS_GI=flow_grad and ginds is not None, FIXED=scale is not None,
            POS=tl.int32 if whole else _TL_DTYPES[pos_dtype], ACC=_TL_DTYPES[acc],
            BLOCK_Q=block_q, BLOCK_C=block_c, PSP=psp,
        )  # fmt: skip
    if scale is not None:
        gq, gk = gq.double() / scale, gk.double() / scale
        gf = gf.double() / scale if flow_grad else gf
    gflows = gf.to(flows.dtype) if flow_grad else qvid.new_empty(0)
    return gq.to(qvid.dtype), gk.to(kvid.dtype), gflows


def _fixed_point_scale(gd, gi, qvid, kvid, p) -> float | None:
    """The fixed-point scale of the deterministic backward, or None for the default (float
    atomics). Under ``torch.use_deterministic_algorithms(True)`` the accumulators are int64
    and every contribution is rounded to ``1 / scale``: ``scale`` is the largest power of two
    for which no sum can leave int64, bounding each contribution by
    ``max|g| * 2 (max|q| + max|k|)`` (times the patch size for a flow) and the number of
    contributions to one accumulator by ``count * K * patch size``."""
    if not torch.are_deterministic_algorithms_enabled():
        return None
    patch = p.pt * qvid.shape[3] * p.ps * p.ps
    big = 2 * (qvid.detach().abs().amax() + kvid.detach().abs().amax()).double()
    bound = gd.detach().abs().amax().double() * big * 2 * patch
    if gi is not None:
        bound = bound + gi.detach().abs().amax().double()
    bound = float(bound) * max(1, p.count * p.nk * patch)
    if not math.isfinite(bound):
        raise ValueError("gdists must be finite for the deterministic backward of search")
    return 2.0 ** (62 - math.ceil(math.log2(bound))) if bound > 0 else 1.0
