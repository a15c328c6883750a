"""Triton kernels for ``search``: fused distance + running top-k (forward), atomic adds
(backward).

Imported only when the Triton backend runs, so ``import dnls`` never needs Triton.

One lane handles one query (``BLOCK_Q`` queries of one ``(batch, head)`` per program). It walks
the window in window order (slot, row, column); for each candidate it sums its own query's
patch distance over ``pt x ps x ps`` pixels and the channels, reading both videos through the
border rule (and bilinear taps for sub-pixel positions); nothing is reduced across lanes.
Selection keeps, per query, the ``KP`` best ``(key, window index)`` pairs in registers, as a
tuple sorted by (key, index):

    insert candidate j iff key_j < the last slot's key, shifting the larger slots down one
    (j is larger than every stored index, so an equal key never displaces an earlier candidate)

which keeps exactly the ``k`` smallest ``(key, index)`` pairs, already ranked: nearest first,
ties to the earlier candidate. ``key = dist`` for l2 and ``-dist`` for dot. The ``Q x W``
distances are never written (except for ``k=None``, where they are the output). The row kernel
(whole positions, no flows) shares column sums across the queries of a grid row, windows slid
at the frame's edges included, and patch-row terms between two rows whose windows are one row
apart.

The backward adds each result's patch gradients into the key video with atomics and sums each
query's own gradient over its results in registers (patches of one frame). At whole positions
it runs in two passes: a small kernel first decodes every result's window index into the key
pixel's offset (-1 where the key patch leaves the frame; 4 bytes per query and result, as the
window indices), so the first pass addresses an element with one add; the second takes the
results near the borders through the border rule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._common import next_power_of_2
from ._layout import channels_first, channels_inner


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
        i = _clamp(i, 0, n - 1)
    return i, valid


@triton.jit
def _clamp(x, lo, hi):
    """``x`` moved into ``[lo, hi]``."""
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _key_top(key):
    """The largest finite value of ``key``'s dtype (float32 or float64), shaped like it."""
    if key.dtype == tl.float64:
        top = tl.full(key.shape, 1.7976931348623157e308, tl.float64)
    else:
        top = tl.full(key.shape, 3.4028234663852886e38, tl.float32)
    return top


@triton.jit
def _rank_key(key):
    """The selection's key (``search.rank_key``): keys at or past the largest finite value (an
    overflow, or NaN from the videos) set to it, so that they tie last, in window order, and
    fill the slots no finite key takes (the slots start at +inf, which is never inserted)."""
    return tl.minimum(key, _key_top(key))  # (a minimum that drops NaN operands, as PTX's does)


@triton.jit
def _report_far(dist_ptr, first, mask, KP: tl.constexpr, KEEP, zero, DOT: tl.constexpr):
    """Rewrite the KEEP distances stored from ``first`` on (each lane's) whose key
    :func:`_rank_key` set to the top as infinitely far (+inf for l2, -inf for dot), as
    ``search.reported`` does. They are read back from memory rather than compared in
    registers: a comparison of the slots there took 40 more registers in W3's kernel
    (offline), for a case that is all but absent. Float16 and bfloat16 distances need nothing:
    the top already rounds to infinity there."""
    ty = dist_ptr.dtype.element_ty
    if ty == tl.float32 or ty == tl.float64:
        for i in tl.static_range(KP):
            m = mask & (zero + i < KEEP)
            d = tl.load(dist_ptr + first + i, mask=m, other=0.0)
            key = -d if DOT else d
            far = tl.full(d.shape, -float("inf") if DOT else float("inf"), ty)
            tl.store(dist_ptr + first + i, far, mask=m & (key == _key_top(key)))


@triton.jit
def _pair_term(acc, qv, kv, DOT: tl.constexpr):
    """``acc`` plus one pixel's term of a patch distance: ``q k`` (DOT) or ``(q - k)^2``."""
    if DOT:
        acc += qv * kv
    else:
        diff = qv - kv
        acc += diff * diff
    return acc


@triton.jit
def _pair_grads(g, qv, kv, DOT: tl.constexpr):
    """The gradients ``(d/dq, d/dk)`` of ``g`` times one pixel's term of a patch distance:
    ``(g k, g q)`` (DOT) or ``(2 g (q - k), -2 g (q - k))``."""
    if DOT:
        return g * kv, g * qv
    gq = 2 * g * (qv - kv)
    return gq, -gq


@triton.jit
def _inside(t, y, x, T, H, W, PT: tl.constexpr, PS: tl.constexpr, DIL: tl.constexpr):
    """Whether the whole-pixel patches at (t, y, x) lie inside the video (no border rule)."""
    r0 = (PS // 2) * DIL
    r1 = (PS - 1 - PS // 2) * DIL
    return (t >= 0) & (t + PT - 1 < T) & (y >= r0) & (y + r1 < H) & (x >= r0) & (x + r1 < W)


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
    PT: tl.constexpr,
    DIL: tl.constexpr,
    DOT: tl.constexpr,
    REFLECT: tl.constexpr,
    WHOLE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Distance between the query patches at whole (qt, qy, qx) and the key patches at
    (kt, ky, kx) (bilinear when not WHOLE): sum of squared differences, or of products when DOT.
    Every operand is a vector of one value per query, so each lane sums its own query's patch
    (no reduction across lanes): patch rows and columns are unrolled, channels are a loop."""
    acc = tl.zeros(qy.shape, ACC)
    if not WHOLE:
        y0f = tl.floor(ky)
        x0f = tl.floor(kx)
        fy = (ky - y0f).to(ACC)
        fx = (kx - x0f).to(ACC)
        ky = y0f.to(tl.int32)
        kx = x0f.to(tl.int32)
    for dt in tl.static_range(PT):
        qti, qtv = _border(qt + dt, T, REFLECT)
        kti, ktv = _border(kt + dt, T, REFLECT)
        q_fr = q_base + qti.to(tl.int64) * sq_t
        k_fr = k_base + kti.to(tl.int64) * sk_t
        for i in tl.static_range(PS):
            qyi, qyv = _border(qy + (i - PS // 2) * DIL, H, REFLECT)
            kyi, kyv = _border(ky + (i - PS // 2) * DIL, H, REFLECT)
            q_row = q_fr + qyi.to(tl.int64) * sq_y
            k_row = k_fr + kyi.to(tl.int64) * sk_y
            qrv = qtv & qyv
            krv = ktv & kyv
            if not WHOLE:
                kyi1, kyv1 = _border(ky + 1 + (i - PS // 2) * DIL, H, REFLECT)
                k_row1 = k_fr + kyi1.to(tl.int64) * sk_y
                krv1 = ktv & kyv1
            for c in range(C):
                q_c = q_row + c * sq_c
                k_c = k_row + c * sk_c
                for jj in tl.static_range(PS):
                    qxi, qxv = _border(qx + (jj - PS // 2) * DIL, W, REFLECT)
                    kxi, kxv = _border(kx + (jj - PS // 2) * DIL, W, REFLECT)
                    qv = tl.load(q_c + qxi * sq_x, mask=qrv & qxv, other=0.0).to(ACC)
                    kv = tl.load(k_c + kxi * sk_x, mask=krv & kxv, other=0.0).to(ACC)
                    if not WHOLE:
                        kxi1, kxv1 = _border(kx + 1 + (jj - PS // 2) * DIL, W, REFLECT)
                        k_c1 = k_row1 + c * sk_c
                        v01 = tl.load(k_c + kxi1 * sk_x, mask=krv & kxv1, other=0.0).to(ACC)
                        v10 = tl.load(k_c1 + kxi * sk_x, mask=krv1 & kxv, other=0.0).to(ACC)
                        v11 = tl.load(k_c1 + kxi1 * sk_x, mask=krv1 & kxv1, other=0.0).to(ACC)
                        kv = (kv * (1 - fx) + v01 * fx) * (1 - fy) + (
                            v10 * (1 - fx) + v11 * fx
                        ) * fy
                    acc = _pair_term(acc, qv, kv, DOT)
    return acc


@triton.jit
def _pixel_dist(
    qs, k_base, kt, ky, kx, sk_t, sk_c, sk_y, sk_x,
    CQ: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """:func:`_patch_dist` for one-pixel patches at whole positions, the query's ``CQ``
    channels given in registers (``qs``): the same sum, in the same order. The window fits the
    frame and is slid inward, so the key pixel lies in the video: no border rule, no masks.
    The channel's address is the previous one's plus the stride (offsets ``c * sk_c`` kept
    for every channel took 64 registers of the 246, offline)."""
    k_px = k_base + kt.to(tl.int64) * sk_t + ky.to(tl.int64) * sk_y + kx.to(tl.int64) * sk_x
    acc = tl.zeros(ky.shape, ACC)
    for c in tl.static_range(CQ):
        kv = tl.load(k_px).to(ACC)
        k_px += sk_c
        acc = _pair_term(acc, qs[c], kv, DOT)
    return acc


@triton.jit
def _query_position(qi, t0, h0, w0, nh, nw, stride0):
    """(t, h, w) of query ``qi`` of the grid, in raster order t -> h -> w."""
    per_frame = nh * nw
    rem = qi % per_frame
    return t0 + qi // per_frame, h0 + (rem // nw) * stride0, w0 + (rem % nw) * stride0


@triton.jit
def _window_bounds(qt, T, H, W, S, s1, lo_steps, hi_steps, POS: tl.constexpr):
    """First frame of the window of frame ``qt`` and the range the grid centre is slid into."""
    tstart = _clamp(qt - (S // 2), 0, T - S)
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
    cy = _clamp(cy, lo, hi_y)
    cx = _clamp(cx, lo, hi_x)
    return cy, cx, free_y, free_x


@triton.jit
def _offset(cy, cx, sid, lo_steps, s1, WS: tl.constexpr, POS: tl.constexpr):
    """Position of window index ``sid`` on the grid around the centre (cy, cx)."""
    ky = cy + (((sid // WS) % WS - lo_steps) * s1).to(POS)
    kx = cx + ((sid % WS - lo_steps) * s1).to(POS)
    return ky, kx


@triton.jit
def _topk_init(zero, NWIN, KP: tl.constexpr, ACC: tl.constexpr):
    """KP empty slots per query (key +inf; window index NWIN + slot), as tuples of vectors
    shaped like ``zero``: each lane keeps all the slots of its query in registers."""
    keys = ()
    ids = ()
    for i in tl.static_range(KP):
        keys = keys + (tl.zeros(zero.shape, ACC) + float("inf"),)
        ids = ids + (zero + NWIN + i,)
    return keys, ids


@triton.jit
def _topk_insert(keys, ids, key, j, KP: tl.constexpr):
    """Insert candidate ``(key, j)`` into the slots, kept sorted by (key, window index):
    the slots past the first whose key is larger shift down one and the last drops out. ``j``
    is larger than every stored index, so a strict ``<`` puts it after equal keys (ties to the
    earlier candidate); a NaN or +inf key is never inserted."""
    lt = key < keys[0]
    new_keys = (tl.where(lt, key, keys[0]),)
    new_ids = (tl.where(lt, j, ids[0]),)
    for i in tl.static_range(1, KP):
        lt_i = key < keys[i]
        new_keys = new_keys + (tl.where(lt, keys[i - 1], tl.where(lt_i, key, keys[i])),)
        new_ids = new_ids + (tl.where(lt, ids[i - 1], tl.where(lt_i, j, ids[i])),)
        lt = lt_i
    return new_keys, new_ids


@triton.jit
def _topk_offer(keys, ids, key, j, KP: tl.constexpr, SKIP: tl.constexpr):
    """:func:`_topk_insert`, skipped by the whole program (with SKIP) when no lane's key is
    below its last slot's, where the insert would change nothing."""
    if SKIP:
        if tl.sum((key < keys[KP - 1]).to(tl.int32), 0) > 0:
            keys, ids = _topk_insert(keys, ids, key, j, KP)
    else:
        keys, ids = _topk_insert(keys, ids, key, j, KP)
    return keys, ids


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
    row0,
    jl,
    jskip,  # first grid row of the batch; grid columns [jl, jl + jskip) are skipped
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
    CQ: tl.constexpr,
    NB: tl.constexpr,
    SKIP: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HD
    hd = pid_bh % HD
    q_base = q_ptr + b.to(tl.int64) * sq_b + hd.to(tl.int64) * sq_h
    k_base = k_ptr + b.to(tl.int64) * sk_b + hd.to(tl.int64) * sk_h

    # Lanes walk grid rows row0.. and, in each, the columns outside [jl, jl + jskip) (those are
    # left to the row kernel); a lane is live when its query is in [start, start + count).
    lane = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ncol = nw - jskip
    ce = lane % ncol
    qi = (row0 + lane // ncol) * nw + tl.where(ce < jl, ce, ce + jskip)
    qmask = (qi >= start) & (qi < start + count)
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

    zero = qi * 0
    # the selection (:func:`_offer_row`): KP sorted slots, with NB > 0 a buffer per lane too
    keys, ids = _row_init(zero, NWIN, KP, NB, ACC)
    if CQ > 0:
        # one pixel per patch: the query's CQ channels stay in registers for the whole window
        qs = ()
        q_px = q_base + qt.to(tl.int64) * sq_t + qy.to(tl.int64) * sq_y + qx.to(tl.int64) * sq_x
        for c in tl.static_range(CQ):
            qs = qs + (tl.load(q_px + c * sq_c, mask=qmask, other=0.0).to(ACC),)

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
                if CQ > 0:
                    d = _pixel_dist(
                        qs, k_base, tf, ky, kx, sk_t, sk_c, sk_y, sk_x, CQ, DOT, ACC
                    )  # fmt: skip
                else:
                    d = _patch_dist(
                        q_base, k_base, qt, qy, qx, tf, ky, kx, C,
                        sq_t, sq_c, sq_y, sq_x, sk_t, sk_c, sk_y, sk_x, T, H, W,
                        PS, PT, DIL, DOT, REFLECT, WHOLE, ACC,
                    )  # fmt: skip
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
                    key = tl.where(cand, _rank_key(key), float("inf"))
                    keys, ids = _offer_row(keys, ids, key, j, KP, NB, SKIP)
    if not ALL:
        keys, ids = _flush_row(keys, ids, KP, NB)
        # The first KEEP slots, already in (key, index) order, and their positions.
        ity = inds_ptr.dtype.element_ty
        for i in tl.static_range(KP):
            kept = qmask & (zero + i < KEEP)
            out = row * KOUT + i + (1 if ANCHOR else 0)
            sid = tl.where(kept, ids[i], 0)
            s_ = sid // (WS * WS)
            tf = tstart + s_
            cy, cx, _, _ = _centre(
                flow_ptr, pix_off, s_, kept & (tf != qt), qy.to(POS), qx.to(POS),
                lo, hi_y, hi_x, sf_s, sf_c, HAS_FLOW, POS,
            )  # fmt: skip
            ky, kx = _offset(cy, cx, sid, lo_steps, s1, WS, POS)
            dist = -keys[i] if DOT else keys[i]
            tl.store(dist_ptr + out, dist.to(dist_ptr.dtype.element_ty), mask=kept)
            tl.store(widx_ptr + out, ids[i], mask=kept)
            tl.store(inds_ptr + out * 3, tf.to(ity), mask=kept)
            tl.store(inds_ptr + out * 3 + 1, ky.to(ity), mask=kept)
            tl.store(inds_ptr + out * 3 + 2, kx.to(ity), mask=kept)
        _report_far(dist_ptr, row * KOUT + (1 if ANCHOR else 0), qmask, KP, KEEP, zero, DOT)
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
                PT,
                DIL,
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
def _fold(i, n, REFLECT: tl.constexpr):
    """:func:`_border` for indices in ``[-(n - 1), 2 (n - 1)]`` (the launcher checks the row
    kernel stays there): one reflection instead of a modulo. Validity is always True with
    REFLECT, and is not used then."""
    if REFLECT:
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= n, 2 * (n - 1) - i, i)
        valid = True
    else:
        valid = (i >= 0) & (i < n)
        i = _clamp(i, 0, n - 1)
    return i, valid


@triton.jit
def _row_offsets(t, y, T, H, st, sy, NR: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
                 REFLECT: tl.constexpr):  # fmt: skip
    """Offsets (int32 scalars, ``PT x NR`` of them, frame-major) of the rows ``y + r * DIL``,
    r < NR, of frames ``t + dt``, dt < PT, through the border rule, and their validity."""
    offs = ()
    valid = ()
    for dt in tl.static_range(PT):
        ti, tv = _fold(t + dt, T, REFLECT)
        for r in tl.static_range(NR):
            yi, yv = _fold(y + r * DIL, H, REFLECT)
            offs = offs + (ti * st + yi * sy,)
            if REFLECT:
                valid = valid + (True,)
            else:
                valid = valid + ((tv & yv).to(tl.int32),)  # (int: a scalar bool mask
                # trips the interpreter)
    return offs, valid


@triton.jit
def _row_load(base, off, col, col_valid, row_valid, REFLECT: tl.constexpr, ACC: tl.constexpr):
    """Each lane's value at ``base + off + col`` (``off`` a row's scalar offset, ``col`` the
    lane's column offset) as ACC: unmasked for reflect borders, else zero outside the frame
    (``row_valid`` an int 0/1 from :func:`_row_offsets`)."""
    if REFLECT:
        v = tl.load(base + (off + col))
    else:
        m = (col_valid.to(tl.int32) & row_valid) != 0
        v = tl.load(base + (off + col), mask=m, other=0.0)
    return v.to(ACC)


@triton.jit
def _row_term(q_b, k_b, qrows, qrv, krows, krv, qcol, qxv, kcol, kxv, qvals, c, r: tl.constexpr,
              NR: tl.constexpr, sq_c, sk_c, C: tl.constexpr, PT: tl.constexpr,
              DOT: tl.constexpr, REFLECT: tl.constexpr, QREG: tl.constexpr,
              ACC: tl.constexpr):  # fmt: skip
    """Channel ``c``'s part of one patch row's term of the column sums: the sum over frames of
    ``(q - k)^2`` (or ``q k``) between query row ``r`` of ``qrows`` and key row ``r`` of
    ``krows`` (offset tuples of :func:`_row_offsets`, ``NR`` rows per frame), at each lane's
    column. With QREG (``c`` a constant) the query values come from ``qvals`` (same order,
    channels innermost). Row indices are written out as ``dt * NR + r``: a constant assigned to
    a name in a loop becomes a tensor, and tuples take only constant indices."""
    acc = tl.zeros(qcol.shape, ACC)
    for dt in tl.static_range(PT):
        if QREG:
            qv = qvals[(dt * NR + r) * C + c]
        else:
            qv = _row_load(q_b + c * sq_c, qrows[dt * NR + r], qcol, qxv, qrv[dt * NR + r],
                           REFLECT, ACC)  # fmt: skip
        kv = _row_load(k_b + c * sk_c, krows[dt * NR + r], kcol, kxv, krv[dt * NR + r], REFLECT,
                       ACC)  # fmt: skip
        acc = _pair_term(acc, qv, kv, DOT)
    return acc


@triton.jit
def _channel_terms(q_b, k_b, qrows, qrv, krows, krv, qcol, qxv, kcol, kxv, qvals, c, head, mid,
                   tail, sq_c, sk_c, PS: tl.constexpr, NR: tl.constexpr, C: tl.constexpr,
                   PT: tl.constexpr, DOT: tl.constexpr, REFLECT: tl.constexpr,
                   QREG: tl.constexpr, R: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Add channel ``c``'s patch-row terms of a strip of R query rows (``NR = PS + R - 1``
    patch rows, R <= PS): rows ``0 .. R - 2`` to the tuple ``head``, rows ``R - 1 .. PS - 1``
    (those of every query row) to ``mid``, rows ``PS .. PS + R - 2`` to the tuple ``tail``."""
    new_head = ()
    for r in tl.static_range(R - 1):
        new_head = new_head + (
            head[r] + _row_term(q_b, k_b, qrows, qrv, krows, krv, qcol, qxv, kcol, kxv, qvals, c,
                                r, NR, sq_c, sk_c, C, PT, DOT, REFLECT, QREG, ACC),
        )  # fmt: skip
    for r in tl.static_range(R - 1, PS):
        mid += _row_term(q_b, k_b, qrows, qrv, krows, krv, qcol, qxv, kcol, kxv, qvals, c, r, NR,
                         sq_c, sk_c, C, PT, DOT, REFLECT, QREG, ACC)  # fmt: skip
    new_tail = ()
    for r in tl.static_range(R - 1):
        new_tail = new_tail + (
            tail[r] + _row_term(q_b, k_b, qrows, qrv, krows, krv, qcol, qxv, kcol, kxv, qvals, c,
                                PS + r, NR, sq_c, sk_c, C, PT, DOT, REFLECT, QREG, ACC),
        )  # fmt: skip
    return new_head, mid, new_tail


@triton.jit
def _strip_sums(head, mid, tail, R: tl.constexpr):
    """The column sums of each query row ``i < R`` of a strip: ``head[i:] + mid + tail[:i]``
    (suffix sums of the head rows, prefix sums of the tail rows), a tuple of R vectors."""
    suffix = ()  # suffix[m] = mid + head[R - 2 - m] + ... + head[R - 2]
    acc = mid
    for m in tl.static_range(R - 1):
        acc = acc + head[R - 2 - m]
        suffix = suffix + (acc,)
    sums = ()
    pre = mid  # (a placeholder until i = 1)
    for i in tl.static_range(R):
        if i == R - 1:
            e = mid
        else:
            e = suffix[R - 2 - i]
        if i == 1:
            pre = tail[0]
        if i > 1:
            pre = pre + tail[i - 1]
        if i > 0:
            e = e + pre
        sums = sums + (e,)
    return sums


@triton.jit
def _slots(keys, ids, i: tl.constexpr, RS: tl.constexpr):
    """Row ``i``'s RS slots of a strip's flat selection tuples."""
    rk = ()
    ri = ()
    for m in tl.static_range(RS):
        rk = rk + (keys[i * RS + m],)
        ri = ri + (ids[i * RS + m],)
    return rk, ri


@triton.jit
def _set_slots(keys, ids, rk, ri, i: tl.constexpr, RS: tl.constexpr, N: tl.constexpr):
    """The flat selection tuples (N slots) with row ``i``'s RS slots replaced by ``rk, ri``."""
    nk = ()
    ni = ()
    for m in tl.static_range(N):
        if m // RS == i:
            nk = nk + (rk[m - i * RS],)
            ni = ni + (ri[m - i * RS],)
        else:
            nk = nk + (keys[m],)
            ni = ni + (ids[m],)
    return nk, ni


@triton.jit
def _row_init(zero, NWIN, KP: tl.constexpr, NB: tl.constexpr, ACC: tl.constexpr):
    """One query row's selection state (a lane's, in the direct kernel): KP empty slots
    (:func:`_topk_init`) and, with a buffer (NB > 0), NB empty buffer slots and a last slot
    holding the buffer's count (in ``ids``; its key is unused), ``KP + NB + 1`` slots in all."""
    keys, ids = _topk_init(zero, NWIN, KP, ACC)
    if NB > 0:
        for _b in tl.static_range(NB + 1):
            keys = keys + (tl.zeros(zero.shape, ACC) + float("inf"),)
        for _b in tl.static_range(NB):
            ids = ids + (zero + NWIN,)
        ids = ids + (zero,)
    return keys, ids


@triton.jit
def _flush_row(rk, ri, KP: tl.constexpr, NB: tl.constexpr):
    """Insert a row's buffered candidates (in the order they came, so ties still go to the
    earlier one) into its KP sorted slots and empty the buffer."""
    if NB > 0:
        sk, si = _slots(rk, ri, 0, KP)
        for b in tl.static_range(NB):
            sk, si = _topk_insert(sk, si, rk[KP + b], ri[KP + b], KP)
        for b in tl.static_range(NB + 1):
            sk = sk + (tl.zeros_like(rk[KP + b]) + float("inf"),)
        for b in tl.static_range(NB):
            si = si + (ri[KP + b],)
        rk, ri = sk, si + (ri[KP + NB] * 0,)
    return rk, ri


@triton.jit
def _offer_row(rk, ri, key, j, KP: tl.constexpr, NB: tl.constexpr, SKIP: tl.constexpr):
    """Offer candidate ``(key, j)`` to one query row. Without a buffer: :func:`_topk_offer`.
    With one (NB > 0): each lane whose key is below its last sorted slot appends it to its
    buffer, and when some lane's buffer is full every lane's buffer is inserted. The bound is
    the sorted slots' (buffered candidates are not in it yet): looser, never wrong. A lane
    pays for the inserts of its own buffered candidates, NB at a time, instead of an insert
    whenever any lane of the block keeps a candidate."""
    if NB == 0:
        rk, ri = _topk_offer(rk, ri, key, j, KP, SKIP)
    else:
        take = key < rk[KP - 1]
        if tl.sum(take.to(tl.int32), 0) > 0:
            cnt = ri[KP + NB]
            nk, ni = _slots(rk, ri, 0, KP)
            for b in tl.static_range(NB):
                hit = take & (cnt == b)
                nk = nk + (tl.where(hit, key, rk[KP + b]),)
                ni = ni + (tl.where(hit, j, ri[KP + b]),)
            cnt = cnt + take.to(tl.int32)
            nk = nk + (rk[KP + NB],)
            ni = ni + (cnt,)
            if tl.max(cnt, 0) == NB:
                nk, ni = _flush_row(nk, ni, KP, NB)
            rk, ri = nk, ni
    return rk, ri


@triton.jit
def _hsum(e, lane, BX: tl.constexpr, PS: tl.constexpr, DIL: tl.constexpr):
    """Each lane's sum of the PS column sums ``e`` at lanes ``lane + jj * DIL`` (register
    shuffles within a warp); lanes whose patch passes the block's edge get junk (not output)."""
    d = e
    for jj in tl.static_range(1, PS):
        d += tl.gather(e, tl.minimum(lane + jj * DIL, BX - 1), 0)
    return d


@triton.jit
def _offer_strip(keys, ids, head, mid, tail, lane, qmasks, cand, j, PS: tl.constexpr,
                 DIL: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, RS: tl.constexpr,
                 DOT: tl.constexpr, R: tl.constexpr, SKIP: tl.constexpr,
                 BX: tl.constexpr):  # fmt: skip
    """Offer one displacement's candidate (window index ``j``, a candidate where ``cand``) to
    each row of a strip, from its patch-row terms ``head, mid, tail``."""
    sums = _strip_sums(head, mid, tail, R)
    for i in tl.static_range(R):
        d = _hsum(sums[i], lane, BX, PS, DIL)
        key = -d if DOT else d
        rk, ri = _slots(keys, ids, i, RS)
        key = tl.where(qmasks[i] & cand, _rank_key(key), float("inf"))
        rk, ri = _offer_row(rk, ri, key, j, KP, NB, SKIP)
        keys, ids = _set_slots(keys, ids, rk, ri, i, RS, R * RS)
    return keys, ids


@triton.jit
def _zero_terms(lane, R: tl.constexpr, ACC: tl.constexpr):
    """Empty patch-row terms ``head, mid, tail`` of a strip of R rows."""
    head = ()
    tail = ()
    for _r in tl.static_range(R - 1):
        head = head + (tl.zeros(lane.shape, ACC),)
        tail = tail + (tl.zeros(lane.shape, ACC),)
    return head, tl.zeros(lane.shape, ACC), tail


@triton.jit
def _lane_cols(col, valid, CV: tl.constexpr, REFLECT: tl.constexpr):
    """Each lane's column offset ``col`` and its validity (:func:`_fold`), as they are (CV = 1)
    or widened to (BX, CV) tiles of the CV channels of a group, which lie together in a
    channel-blocked video (``(T, C / CV, H, W, CV)``: each lane reads a group's channels in
    one vector load, and a warp's lanes a run of ``32 CV`` values)."""
    if CV > 1:
        ch = tl.arange(0, CV)[None, :]
        col = col[:, None] + ch
        if not REFLECT:
            valid = valid[:, None] | (ch < 0)
    return col, valid


@triton.jit
def _channel_sum(x, CV: tl.constexpr):
    """A (BX, CV) term summed over its channels (a lane's own values: no shuffles)."""
    if CV > 1:
        x = tl.sum(x, axis=1)
    return x


@triton.jit
def _sum_terms(head, mid, tail, CV: tl.constexpr):
    """The patch-row terms ``head, mid, tail`` summed over their CV channels."""
    nh = ()
    nt = ()
    for m in tl.static_range(len(head)):
        nh = nh + (_channel_sum(head[m], CV),)
        nt = nt + (_channel_sum(tail[m], CV),)
    return nh, _channel_sum(mid, CV), nt


@triton.jit
def _window_row(q_b, k_b, keys, ids, qrows, qrv, krows, krv, qcol, qxv, qvals, qmasks, own, xc,
                dmin, nd, base, j0, sq_c, sk_c, sk_x, W, s1, WS: tl.constexpr, PS: tl.constexpr,
                PT: tl.constexpr, DIL: tl.constexpr, C: tl.constexpr, KP: tl.constexpr,
                NB: tl.constexpr, RS: tl.constexpr, DOT: tl.constexpr, REFLECT: tl.constexpr,
                QREG: tl.constexpr, UNROLL: tl.constexpr, R: tl.constexpr, NR: tl.constexpr,
                SKIP: tl.constexpr, ACC: tl.constexpr, BX: tl.constexpr,
                CV: tl.constexpr):  # fmt: skip
    """One window row (key rows ``krows``): ``nd`` displacements, each one's patch-row terms
    summed over the channels, then offered. ``own``: the displacement ``dx = 0`` of this row
    is each query's own position (left out). With CV > 1 (channel-blocked videos, ``sq_c,
    sk_c`` the strides of the channel groups) the channels go CV at a time
    (:func:`_lane_cols`); with QREG too, the query's groups come from ``qvals``."""
    lane = tl.arange(0, BX)
    qcol, qxv = _lane_cols(qcol, qxv, CV, REFLECT)
    for bb in range(nd):
        dx = dmin + bb * s1
        col = base + bb  # each lane's window column
        inwin = (col >= 0) & (col < WS)
        # lanes outside their window may reach past one reflection: clamped (not output)
        kxi, kxv = _fold(_clamp(xc + dx, 1 - W, 2 * W - 2), W, REFLECT)
        kcol, kxv = _lane_cols(kxi * sk_x, kxv, CV, REFLECT)
        head, mid, tail = _zero_terms(kcol, R, ACC)
        # C / CV groups of CV channels (single channels when CV = 1)
        if UNROLL:  # unrolled (with QREG, the query's values from registers)
            for g in tl.static_range(C // CV):
                head, mid, tail = _channel_terms(
                    q_b, k_b, qrows, qrv, krows, krv, qcol, qxv, kcol, kxv, qvals, g, head, mid,
                    tail, sq_c, sk_c, PS, NR, C // CV, PT, DOT, REFLECT, QREG, R, ACC,
                )  # fmt: skip
        else:  # a loop
            for g in range(C // CV):
                head, mid, tail = _channel_terms(
                    q_b, k_b, qrows, qrv, krows, krv, qcol, qxv, kcol, kxv, qvals, g, head, mid,
                    tail, sq_c, sk_c, PS, NR, C // CV, PT, DOT, REFLECT, QREG, R, ACC,
                )  # fmt: skip
        head, mid, tail = _sum_terms(head, mid, tail, CV)
        cand = inwin & ((lane * 0 + (own & (dx == 0)).to(tl.int32)) == 0)
        keys, ids = _offer_strip(keys, ids, head, mid, tail, lane, qmasks, cand, j0 + col, PS,
                                 DIL, KP, NB, RS, DOT, R, SKIP, BX)  # fmt: skip
    return keys, ids


@triton.jit
def _terms_at(terms, u: tl.constexpr, R: tl.constexpr):
    """Displacement ``u``'s patch-row terms ``head, mid, tail`` in the flat tuple ``terms``
    (``2R - 1`` per displacement, in that order)."""
    head = ()
    tail = ()
    for m in tl.static_range(R - 1):
        head = head + (terms[u * (2 * R - 1) + m],)
        tail = tail + (terms[u * (2 * R - 1) + R + m],)
    return head, terms[u * (2 * R - 1) + R - 1], tail


@triton.jit
def _window_row_channels_outer(q_b, k_b, keys, ids, qrows, qrv, krows, krv, qcol, qxv, qmasks,
                               own, xc, dmin, base, j0, sq_c, sk_c, sk_x, W, s1,
                               WS: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr,
                               DIL: tl.constexpr, C: tl.constexpr, KP: tl.constexpr,
                               NB: tl.constexpr, RS: tl.constexpr, DOT: tl.constexpr,
                               REFLECT: tl.constexpr, R: tl.constexpr,
                               NR: tl.constexpr, SKIP: tl.constexpr, ACC: tl.constexpr,
                               BX: tl.constexpr, DXB: tl.constexpr,
                               CV: tl.constexpr):  # fmt: skip
    """:func:`_window_row` for a block whose windows are not slid sideways (WS displacements),
    channels outermost, DXB displacements at a time: channel by channel, the query's patch
    rows are read once into registers and the terms of the DXB displacements accumulate
    (``DXB x (2R - 1)`` vectors), so each pass reads one channel of the key rows (a small
    working set, hits in L1) and a query value once per DXB candidates instead of once per
    candidate; then the DXB candidates are offered in window order. With CV > 1 (channel-blocked
    videos, ``sq_c, sk_c`` the strides of the channel groups) a pass reads a group of CV
    channels of a row with one vector load per lane (:func:`_lane_cols`) and the terms keep
    their CV channels apart until the offer."""
    lane = tl.arange(0, BX)
    qcol, qxv = _lane_cols(qcol, qxv, CV, REFLECT)
    for b0 in tl.static_range(0, WS, DXB):
        kcols = ()
        kxvs = ()
        terms = ()
        for bb in tl.static_range(b0, min(b0 + DXB, WS)):
            kxi, kxv = _fold(_clamp(xc + (dmin + bb * s1), 1 - W, 2 * W - 2), W, REFLECT)
            kcol, kxv = _lane_cols(kxi * sk_x, kxv, CV, REFLECT)
            kcols = kcols + (kcol,)
            kxvs = kxvs + (kxv,)
            for _m in tl.static_range(2 * R - 1):  # head, mid, tail
                terms = terms + (tl.zeros(kcol.shape, ACC),)
        for g in range(C // CV):
            qc = q_b + g * sq_c
            kc = k_b + g * sk_c
            qv = ()
            for at in tl.static_range(PT * NR):
                qv = qv + (_row_load(qc, qrows[at], qcol, qxv, qrv[at], REFLECT, ACC),)
            new = ()
            for u in tl.static_range(min(DXB, WS - b0)):
                # (names of their own: ``mid`` of an earlier pass would be carried by the loop)
                hd_u, md_u, tl_u = _terms_at(terms, u, R)
                hd_u, md_u, tl_u = _channel_terms(
                    qc, kc, qrows, qrv, krows, krv, qcol, qxv, kcols[u], kxvs[u], qv, 0, hd_u,
                    md_u, tl_u, sq_c, sk_c, PS, NR, 1, PT, DOT, REFLECT, True, R, ACC,
                )  # fmt: skip
                new = new + hd_u + (md_u,) + tl_u
            terms = new
        for u in tl.static_range(min(DXB, WS - b0)):
            head, mid, tail = _terms_at(terms, u, R)
            head, mid, tail = _sum_terms(head, mid, tail, CV)
            cand = (lane * 0 + (own & (dmin + (b0 + u) * s1 == 0)).to(tl.int32)) == 0
            keys, ids = _offer_strip(
                keys, ids, head, mid, tail, lane, qmasks, cand, j0 + base + b0 + u, PS, DIL,
                KP, NB, RS, DOT, R, SKIP, BX,
            )  # fmt: skip
    return keys, ids


@triton.jit
def _rows_select(q_b, k_b, qt, qy, qmasks, tstart, cy, xc, qcol, qxv, keys, ids, dmin, nd, base,
                 sq_t, sq_c, sq_y, sk_t, sk_c, sk_y, sk_x, T, H, W, S, s1, lo_steps,
                 WS: tl.constexpr, PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr,
                 C: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, RS: tl.constexpr,
                 DOT: tl.constexpr, REFLECT: tl.constexpr, SKIP_OWN: tl.constexpr,
                 QREG: tl.constexpr, UNROLL: tl.constexpr, COUT: tl.constexpr, R: tl.constexpr,
                 NR: tl.constexpr, SKIP: tl.constexpr, ACC: tl.constexpr,
                 BX: tl.constexpr, CV: tl.constexpr):  # fmt: skip
    """The whole window for a strip of R query rows of one frame, ``qy .. qy + R - 1`` (lanes
    masked by the tuple ``qmasks``): with R > 1 (DIL = 1, no window slid vertically) each
    row's window is the one above it one row down, so the R rows share ``PS - R + 1`` of their
    ``NR = PS + R - 1`` patch-row terms and each query costs ``NR / R`` row terms instead of
    PS. ``keys, ids``: the R rows' selection states (:func:`_row_init`, RS slots each), one
    flat tuple.

    The block walks ``nd`` displacements ``dx = dmin + i * s1`` per window row; at step ``i``
    each lane is at column ``base + i`` of its own window, a candidate only inside it (lanes
    whose windows are slid sideways have their own ``base``), so each lane still meets its
    candidates in window order. With COUT > 0, blocks whose windows are not slid sideways walk
    each window row channels outermost, COUT displacements at a time
    (:func:`_window_row_channels_outer`)."""
    half = (PS // 2) * DIL
    qrows, qrv = _row_offsets(qt, qy - half, T, H, sq_t, sq_y, NR, PT, DIL, REFLECT)
    qvals = ()
    if QREG:  # (with CV > 1: C / CV groups of CV channels, a (BX, CV) tile each)
        qc, qcv = _lane_cols(qcol, qxv, CV, REFLECT)
        for at in tl.static_range(PT * NR):
            for c in tl.static_range(C // CV):
                v = _row_load(q_b + c * sq_c, qrows[at], qc, qcv, qrv[at], REFLECT, ACC)
                qvals = qvals + (v,)
    for s in range(S):
        tf = tstart + s
        for a in range(WS):
            ky = cy + (a - lo_steps) * s1
            krows, krv = _row_offsets(tf, ky - half, T, H, sk_t, sk_y, NR, PT, DIL, REFLECT)
            # the row holding each query's own position (the other rows of a strip: theirs
            # are as many rows down as the query is)
            if SKIP_OWN:
                own = (tf == qt) & (ky == qy)
            else:
                own = tf != tf
            j0 = (s * WS + a) * WS
            if COUT:
                if nd == WS:
                    keys, ids = _window_row_channels_outer(
                        q_b, k_b, keys, ids, qrows, qrv, krows, krv, qcol, qxv, qmasks, own, xc,
                        dmin, base, j0, sq_c, sk_c, sk_x, W, s1, WS, PS, PT, DIL, C, KP, NB, RS,
                        DOT, REFLECT, R, NR, SKIP, ACC, BX, COUT, CV,
                    )  # fmt: skip
                else:
                    keys, ids = _window_row(
                        q_b, k_b, keys, ids, qrows, qrv, krows, krv, qcol, qxv, qvals, qmasks,
                        own, xc, dmin, nd, base, j0, sq_c, sk_c, sk_x, W, s1, WS, PS, PT, DIL, C,
                        KP, NB, RS, DOT, REFLECT, QREG, UNROLL, R, NR, SKIP, ACC, BX, CV,
                    )  # fmt: skip
            else:
                keys, ids = _window_row(
                    q_b, k_b, keys, ids, qrows, qrv, krows, krv, qcol, qxv, qvals, qmasks, own,
                    xc, dmin, nd, base, j0, sq_c, sk_c, sk_x, W, s1, WS, PS, PT, DIL, C, KP, NB,
                    RS, DOT, REFLECT, QREG, UNROLL, R, NR, SKIP, ACC, BX, CV,
                )  # fmt: skip
    return keys, ids


@triton.jit
def _rows_store(dist_ptr, inds_ptr, widx_ptr, keys, ids, row, qmask, zero, tstart, cy, cx, s1,
                lo_steps, KEEP, KOUT, WS: tl.constexpr, KP: tl.constexpr, DOT: tl.constexpr,
                ANCHOR: tl.constexpr):  # fmt: skip
    """Write one query row's selection (its first KEEP slots) and their positions (``cy`` the
    row's window centre, ``cx`` each lane's)."""
    ity = inds_ptr.dtype.element_ty
    for i in tl.static_range(KP):
        kept = qmask & (zero + i < KEEP)
        out = row * KOUT + i + (1 if ANCHOR else 0)
        sid = tl.where(kept, ids[i], 0)
        dist = -keys[i] if DOT else keys[i]
        tl.store(dist_ptr + out, dist.to(dist_ptr.dtype.element_ty), mask=kept)
        tl.store(widx_ptr + out, ids[i], mask=kept)
        tl.store(inds_ptr + out * 3, (tstart + sid // (WS * WS)).to(ity), mask=kept)
        tl.store(
            inds_ptr + out * 3 + 1, (cy + ((sid // WS) % WS - lo_steps) * s1).to(ity), mask=kept
        )
        tl.store(inds_ptr + out * 3 + 2, (cx + (sid % WS - lo_steps) * s1).to(ity), mask=kept)
    _report_far(dist_ptr, row * KOUT + (1 if ANCHOR else 0), qmask & (zero < KEEP), KP, KEEP,
                zero, DOT)  # fmt: skip


@triton.jit
def _rows_anchor(q_base, k_base, dist_ptr, inds_ptr, widx_ptr, row, qmask, qt, qy, qx, zero, C,
                 sq_t, sq_c, sq_y, sq_x, sk_t, sk_c, sk_y, sk_x, T, H, W, KOUT,
                 PS: tl.constexpr, PT: tl.constexpr, DIL: tl.constexpr, DOT: tl.constexpr,
                 REFLECT: tl.constexpr, ACC: tl.constexpr, BX: tl.constexpr):  # fmt: skip
    """The anchored query (its distance to itself) in the first result slot of its row."""
    d = _patch_dist(
        q_base, k_base, zero + qt, zero + qy, qx, zero + qt, zero + qy, qx, C,
        sq_t, sq_c, sq_y, sq_x, sk_t, sk_c, sk_y, sk_x, T, H, W,
        PS, PT, DIL, DOT, REFLECT, True, ACC,
    )  # fmt: skip
    first = row * KOUT
    tl.store(dist_ptr + first, d.to(dist_ptr.dtype.element_ty), mask=qmask)
    tl.store(widx_ptr + first, tl.full((BX,), -1, tl.int32), mask=qmask)
    tl.store(inds_ptr + first * 3, zero + qt, mask=qmask)
    tl.store(inds_ptr + first * 3 + 1, zero + qy, mask=qmask)
    tl.store(inds_ptr + first * 3 + 2, qx, mask=qmask)


@triton.jit
def _search_rows_kernel(
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
    H,
    W,
    start,
    count,
    t0,
    h0,
    w0,
    nh,
    nw,  # query grid (stride0 = 1)
    row0,
    ngroups,
    nrows,  # batch rows, in groups of R
    jl,
    jr,
    nxb,
    nblocks,  # interior grid columns [jl, jr) in blocks
    s1,
    lo_steps,
    hi_steps,
    S,
    NWIN,
    KEEP,
    KOUT,
    WS: tl.constexpr,
    PS: tl.constexpr,
    PT: tl.constexpr,
    DIL: tl.constexpr,
    C: tl.constexpr,
    KP: tl.constexpr,
    NB: tl.constexpr,
    RS: tl.constexpr,
    DOT: tl.constexpr,
    REFLECT: tl.constexpr,
    SKIP_OWN: tl.constexpr,
    ANCHOR: tl.constexpr,
    QREG: tl.constexpr,
    UNROLL: tl.constexpr,
    COUT: tl.constexpr,
    R: tl.constexpr,
    SKIP: tl.constexpr,
    ACC: tl.constexpr,
    BX: tl.constexpr,
    BOUT: tl.constexpr,
    CV: tl.constexpr,
):
    """Reuse across queries, for whole positions without flows and stride0 = 1.

    A block is BOUT consecutive queries of R consecutive grid rows. Where no window
    of the block is slid sideways, every query of a row sees candidate j at the same
    displacement (dt, dy, dx); at the frame's edges the block walks the displacements of all
    its lanes' windows and each lane keeps those in its own (a few more displacements than the
    window has, instead of the direct kernel's O(PS^2) per candidate). For each displacement
    the block computes the column sums
        e(x') = sum over frames, patch rows and channels of (q(x') - k(x' + dx))^2   (or q k)
    over the BX = BOUT + (PS - 1) * DIL columns it needs, once, and each query's distance is
    the sum of PS of them, d(x) = sum_j e(x + (j - PS//2) * DIL): O(PS) work per query and
    candidate instead of O(PS^2). R rows of one frame whose windows are not slid vertically
    share PS - R + 1 of their PS patch-row terms each (DIL = 1, R <= PS): (PS + R - 1) / R row
    terms per query and candidate. Offsets inside one (batch, head) are int32 (the launcher
    checks they fit); with UNROLL the channel loop is unrolled (C is a constant) and, with
    QREG, the query's values stay in registers. With CV > 1 (channel-blocked videos, C a
    multiple of CV, padded with zero channels where needed, no ANCHOR; ``sq_c, sk_c`` the
    strides of the channel groups, and every stride given in units of CV values) each lane
    reads CV channels of a row at once (:func:`_lane_cols`)."""
    if CV > 1:
        sq_b, sq_h, sq_t, sq_c, sq_y, sq_x = (
            sq_b * CV,
            sq_h * CV,
            sq_t * CV,
            sq_c * CV,
            sq_y * CV,
            sq_x * CV,
        )
        sk_b, sk_h, sk_t, sk_c, sk_y, sk_x = (
            sk_b * CV,
            sk_h * CV,
            sk_t * CV,
            sk_c * CV,
            sk_y * CV,
            sk_x * CV,
        )
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BX)
    zero = lane * 0
    half = (PS // 2) * DIL
    lo = lo_steps * s1
    hi = H - 1 - hi_steps * s1
    hi_x = W - 1 - hi_steps * s1
    for blk in range(pid, nblocks, nprog):
        bh = blk // (ngroups * nxb)
        rem = blk % (ngroups * nxb)
        g = rem // nxb  # the block's first row is batch row g * R
        xb = rem % nxb
        b = bh // HD
        hd = bh % HD
        q_b = q_ptr + b.to(tl.int64) * sq_b + hd.to(tl.int64) * sq_h
        k_b = k_ptr + b.to(tl.int64) * sk_b + hd.to(tl.int64) * sk_h
        grow = row0 + g * R
        j0 = jl + xb * BOUT
        jq = j0 + lane
        qx = w0 + jq
        # the columns whose sums the block needs (lanes past the last query's patch repeat its
        # last column: every column and candidate stays within one reflection of the frame)
        xc = tl.minimum(w0 + j0 - half + lane, w0 + jr - 1 + half)
        qxi, qxv = _fold(xc, W, REFLECT)
        qcol = qxi * sq_x
        # Windows slid sideways at the frame's edges: each lane's window centre column ``cx``;
        # the block walks the displacements of all its lanes' windows, from ``dmin`` in ``nd``
        # steps of s1, lane by lane from column ``base`` of its window (the launcher gives
        # blocks with slid windows only when s1 = 1, so these divisions are exact).
        cx = _clamp(qx, lo, hi_x)
        xa = w0 + j0
        xz = w0 + tl.minimum(j0 + BOUT, jr) - 1
        off_a = _clamp(xa, lo, hi_x) - xa
        off_z = _clamp(xz, lo, hi_x) - xz
        dmin = off_z - lo
        nd = (off_a - off_z) // s1 + WS
        base = (dmin - (cx - qx)) // s1 + lo_steps
        nsingle = R
        if R > 1:
            # R rows of one frame (all in the batch) whose windows are not slid vertically:
            # each row's window is the one above it one row down
            qt = t0 + grow // nh
            qy = h0 + grow % nh
            strip = (grow % nh + R - 1 < nh) & (qy >= lo) & (qy + R - 1 <= hi)
            strip = strip & (g * R + R - 1 < nrows)
            if strip:
                qi = grow * nw + jq
                qmasks = ()
                keys = ()
                ids = ()
                for i in tl.static_range(R):
                    qmasks = qmasks + (
                        (lane < BOUT) & (jq < jr) & (qi + i * nw >= start)
                        & (qi + i * nw < start + count),
                    )  # fmt: skip
                    ki, ii = _row_init(zero, NWIN, KP, NB, ACC)
                    keys = keys + ki
                    ids = ids + ii
                tstart = _clamp(qt - (S // 2), 0, T - S)
                keys, ids = _rows_select(
                    q_b, k_b, qt, qy, qmasks, tstart, qy, xc, qcol, qxv, keys, ids, dmin, nd,
                    base, sq_t, sq_c, sq_y, sk_t, sk_c, sk_y, sk_x, T, H, W, S, s1, lo_steps, WS,
                    PS, PT, DIL, C, KP, NB, RS, DOT, REFLECT, SKIP_OWN, QREG, UNROLL, COUT, R,
                    PS + R - 1, SKIP, ACC, BX, CV,
                )  # fmt: skip
                for i in tl.static_range(R):
                    kr, ir = _slots(keys, ids, i, RS)
                    kr, ir = _flush_row(kr, ir, KP, NB)
                    row = bh.to(tl.int64) * count + (qi + i * nw - start).to(tl.int64)
                    _rows_store(dist_ptr, inds_ptr, widx_ptr, kr, ir, row, qmasks[i], zero,
                                tstart, qy + i, cx, s1, lo_steps, KEEP, KOUT, WS, KP, DOT,
                                ANCHOR)  # fmt: skip
                    if ANCHOR:
                        _rows_anchor(q_b, k_b, dist_ptr, inds_ptr, widx_ptr, row, qmasks[i], qt,
                                     qy + i, qx, zero, C, sq_t, sq_c, sq_y, sq_x, sk_t, sk_c,
                                     sk_y, sk_x, T, H, W, KOUT, PS, PT, DIL, DOT, REFLECT, ACC,
                                     BX)  # fmt: skip
            nsingle = tl.where(strip, 0, R)
        # rows one at a time (all rows when R = 1; the rows of a strip that cannot share)
        for r in range(nsingle):
            grow_r = grow + r
            qi = grow_r * nw + jq
            qmask = (lane < BOUT) & (jq < jr) & (qi >= start) & (qi < start + count)
            qmask = qmask & (zero + g * R + r < nrows)
            grow_r = tl.minimum(grow_r, row0 + nrows - 1)
            qt = t0 + grow_r // nh
            qy = h0 + grow_r % nh
            cy = _clamp(qy, lo, hi)
            tstart = _clamp(qt - (S // 2), 0, T - S)
            keys, ids = _row_init(zero, NWIN, KP, NB, ACC)
            keys, ids = _rows_select(
                q_b, k_b, qt, qy, (qmask,), tstart, cy, xc, qcol, qxv, keys, ids, dmin, nd, base,
                sq_t, sq_c, sq_y, sk_t, sk_c, sk_y, sk_x, T, H, W, S, s1, lo_steps, WS, PS, PT,
                DIL, C, KP, NB, RS, DOT, REFLECT, SKIP_OWN, QREG, UNROLL, COUT, 1, PS, SKIP, ACC,
                BX, CV,
            )  # fmt: skip
            keys, ids = _flush_row(keys, ids, KP, NB)
            row = bh.to(tl.int64) * count + (qi - start).to(tl.int64)
            _rows_store(dist_ptr, inds_ptr, widx_ptr, keys, ids, row, qmask, zero, tstart, cy, cx,
                        s1, lo_steps, KEEP, KOUT, WS, KP, DOT, ANCHOR)  # fmt: skip
            if ANCHOR:
                _rows_anchor(q_b, k_b, dist_ptr, inds_ptr, widx_ptr, row, qmask, qt, qy, qx, zero,
                             C, sq_t, sq_c, sq_y, sq_x, sk_t, sk_c, sk_y, sk_x, T, H, W, KOUT,
                             PS, PT, DIL, DOT, REFLECT, ACC, BX)  # fmt: skip


@triton.jit
def _red(ptr, val, mask):
    """Atomic add whose old value is not needed: relaxed order, so it compiles to a
    fire-and-forget ``red`` (Triton's default, acq_rel, is a round-trip ``atom`` per element).
    The sums are only read after the kernel ends, so no ordering is needed."""
    tl.atomic_add(ptr, val, mask=mask, sem="relaxed")


@triton.jit
def _fixed(val, scale):
    """``round(val * scale)`` as int64 (halves away from zero)."""
    v = val.to(tl.float64) * scale
    v = tl.where(v >= 0, v + 0.5, v - 0.5)
    return v.to(tl.int64)


@triton.jit
def _accumulate(ptr, val, mask, scale, FIXED: tl.constexpr):
    """Atomic add of ``val``; with FIXED, of ``round(val * scale)`` into an int64 accumulator.
    Integer addition is associative, so the fixed-point sums have the same bits on every run."""
    if FIXED:
        _red(ptr, _fixed(val, scale), mask)
    else:
        _red(ptr, val, mask)


@triton.jit
def _patch_sum(x):
    """Per query: the sum of a (BQ, BC, PSP, PSP) tile over its channels and pixels."""
    return tl.sum(tl.sum(tl.sum(x, axis=3), axis=2), axis=1)


@triton.jit
def _result_key(widx_ptr, at, rmask, qt, qy, qx, tstart, pix_off, flow_ptr, lo, hi_y, hi_x,
                sf_s, sf_c, lo_steps, s1, WS: tl.constexpr, HAS_FLOW: tl.constexpr,
                POS: tl.constexpr):  # fmt: skip
    """The results at ``at`` (window indices, -1 for the query itself) of the queries at (qt,
    qy, qx): window slot, frame, whether the window centre moved with a flow, position (ky,
    kx) and whether the centre was left where the flow put it (free_y, free_x)."""
    wi = tl.load(widx_ptr + at, mask=rmask, other=-1)
    own = wi < 0
    sid = tl.where(own, 0, wi)
    s_ = sid // (WS * WS)
    tf = tl.where(own, qt, tstart + s_)
    moves = rmask & (own == 0) & (tf != qt)
    cy, cx, free_y, free_x = _centre(
        flow_ptr, pix_off, s_, moves, qy.to(POS), qx.to(POS), lo, hi_y, hi_x, sf_s, sf_c,
        HAS_FLOW, POS,
    )  # fmt: skip
    ky, kx = _offset(cy, cx, sid, lo_steps, s1, WS, POS)
    ky = tl.where(own, qy.to(POS), ky)
    kx = tl.where(own, qx.to(POS), kx)
    return s_, tf, moves, ky, kx, free_y, free_x


@triton.jit
def _search_bwd_keys_kernel(
    widx_ptr,  # (B*HD, count, K) window indices, -1 for the query itself
    ko_ptr,  # out: (B*HD, count, K) key offsets, -1 where the key patch leaves the frame
    flow_ptr,  # (B, T, S, 2, H, W) integer flows, or unused
    sk_t, sk_y, sk_x,  # strides of the key video
    sf_b, sf_t, sf_s, sf_c, sf_y, sf_x,  # strides of the flows
    HD, T, H, W,
    start, count, t0, h0, w0, nh, nw, stride0,  # query grid
    s1, lo_steps, hi_steps, S, K,  # window
    WS: tl.constexpr, PS: tl.constexpr, DIL: tl.constexpr, HAS_FLOW: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """For whole positions (patches of one frame): the offset of each result's key pixel in
    its (b, hd) slice of the key video, where the key patch lies inside the frame, else -1.
    One lane per (query, result); the backward's first pass reads these offsets instead of
    decoding the window index per patch element."""
    pid_bh = tl.program_id(1)
    b = pid_bh // HD
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx // K < count  # (count * K may pass int32; count may be the constant 1)
    qi = start + tl.where(m, idx // K, 0).to(tl.int32)
    qt, qy, qx = _query_position(qi, t0, h0, w0, nh, nw, stride0)
    tstart, lo, hi_y, hi_x = _window_bounds(qt, T, H, W, S, s1, lo_steps, hi_steps, tl.int32)
    pix_off = (
        b.to(tl.int64) * sf_b
        + qt.to(tl.int64) * sf_t
        + qy.to(tl.int64) * sf_y
        + qx.to(tl.int64) * sf_x
    )
    at = pid_bh.to(tl.int64) * count * K + idx
    _, tf, _, ky, kx, _, _ = _result_key(
        widx_ptr, at, m, qt, qy, qx, tstart, pix_off, flow_ptr, lo, hi_y, hi_x, sf_s, sf_c,
        lo_steps, s1, WS, HAS_FLOW, tl.int32,
    )  # fmt: skip
    inside = _inside(tf, ky, kx, T, H, W, 1, PS, DIL)
    off = tf.to(tl.int64) * sk_t + ky.to(tl.int64) * sk_y + kx.to(tl.int64) * sk_x
    tl.store(ko_ptr + at, tl.where(inside, off, -1), mask=m)


@triton.jit
def _search_bwd_kernel(
    q_ptr,
    k_ptr,
    flow_ptr,  # videos (B, HD, T, C, H, W); flows (B, T, S, 2, H, W) or unused
    gd_ptr,  # (B*HD, count, K) gradient of the distances
    gi_ptr,  # (B*HD, count, K, 3) gradient of float positions (HAS_GI only)
    widx_ptr,  # (B*HD, count, K) window indices, -1 for the query itself
    ko_ptr,  # (B*HD, count, K) key offsets of _search_bwd_keys_kernel (KEYS only)
    gq_ptr,
    gk_ptr,  # out: (B, HD, T, C, H, W) accumulators, zeroed, (b, hd) slices of T*C*H*W
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
    sa_t,
    sa_c,
    sa_y,
    sa_x,  # strides of the accumulators gq, gk in a (b, hd) slice (channel-first or -last)
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
    GQ: tl.constexpr,
    KEYS: tl.constexpr,
):
    """For each (query, result): g = dL/d dist, q and k the two patches.
        l2:  dL/dq += 2 g (q - k),  dL/dk = -2 g (q - k);   dot: dL/dq += g k,  dL/dk = g q
    dL/dk is added to the key video through the same taps that read k (bilinear weights and
    border rule: the adjoint of the read); dL/dpos = <dL/dk, dk/dpos> (+ the gradient of the
    returned position) goes to the flow of the candidate's frame where the window was not slid.
    Accumulation is by atomic adds: float ones, or int64 fixed-point ones (FIXED) for the
    deterministic mode. The query's patch is the same for all its results: with GQ > 0 (patches
    of one frame) the channel tiles are the outer loop and each tile's dL/dq is summed in
    registers over the results, then added once (GQ=1: K times fewer adds into gq) or, for
    one-pixel patches in one tile, which no other query touches, stored once (GQ=2)."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HD
    hd = pid_bh % HD
    q_base = q_ptr + b.to(tl.int64) * sq_b + hd.to(tl.int64) * sq_h
    k_base = k_ptr + b.to(tl.int64) * sk_b + hd.to(tl.int64) * sk_h
    # each (b, hd) slice of the accumulators is one block of T * C * H * W
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
    gq_sp, _ = _spatial(qy, qx, offs, pmask, sa_y, sa_x, H, W, REFLECT)
    # GQ > 0: one channel tile at a time (channels ct + cc), its dL/dq summed over the results
    for ct in range(0, C if GQ > 0 else 1, BLOCK_C):
        if GQ > 0:
            gq_sum = tl.zeros((BLOCK_Q, BLOCK_C, PSP, PSP), ACC)
            c_lo = ct
            c_hi = tl.minimum(ct + BLOCK_C, C)
        else:
            c_lo = 0
            c_hi = C
        if KEYS == 1:  # this tile's query values, pointers and in-patch offsets (one frame)
            ch = (ct + cc)[None, :, None, None]
            cm = ch < C
            qm_t = q_m & cm & qmask[:, None, None, None]
            q_at = q_base + qt.to(tl.int64)[:, None, None, None] * sq_t + ch * sq_c + q_sp
            qv_t = tl.load(q_at, mask=qm_t, other=0.0).to(ACC)
            k_c = k_base + ch * sk_c
            gk_c = gk_base + ch * sa_c  # the accumulators have the key video's strides here
            e_k = ((offs * sk_y)[:, None] + (offs * sk_x)[None, :])[None, None, :, :]
            e_m = (pmask[:, None] & pmask[None, :])[None, None, :, :] & cm
        if KEYS == 2:
            brow = lane < 0  # rows with a result the first pass left
        for kk in range(K):
            at = row * K + kk
            if KEYS == 1:
                # first pass: the results whose key patch lies inside the frame, at the key
                # offsets of _search_bwd_keys_kernel (one add per element for its address)
                ko = tl.load(ko_ptr + at, mask=qmask, other=-1)
                fm = qmask & (ko >= 0)
                g4 = tl.load(gd_ptr + at, mask=fm, other=0).to(ACC)[:, None, None, None]
                ko4 = ko[:, None, None, None]
                km = fm[:, None, None, None] & e_m
                kv = tl.load(k_c + ko4 + e_k, mask=km, other=0.0).to(ACC)
                gqp, gkp = _pair_grads(g4, qv_t, kv, DOT)
                gq_sum += tl.where(km, gqp, 0.0)
                _accumulate(gk_c + ko4 + e_k, gkp, km, scale, FIXED)
            else:
                if KEYS == 2:
                    # second pass: the results the first one left (key patch leaves the frame)
                    ko = tl.load(ko_ptr + at, mask=qmask, other=0)
                    rmask = qmask & (ko < 0)
                    brow = brow | rmask
                    run = tl.max(rmask.to(tl.int32), axis=0) > 0
                else:
                    rmask = qmask
                    run = K > 0
                if run:
                    g = tl.load(gd_ptr + at, mask=rmask, other=0).to(ACC)
                    s_, tf, moves, ky, kx, free_y, free_x = _result_key(
                        widx_ptr, at, rmask, qt, qy, qx, tstart, pix_off, flow_ptr, lo,
                        hi_y, hi_x, sf_s, sf_c, lo_steps, s1, WS, HAS_FLOW, POS,
                    )  # fmt: skip
                    if WHOLE:
                        k_sp, k_m = _spatial(ky, kx, offs, pmask, sk_y, sk_x, H, W, REFLECT)
                        gk_sp, _ = _spatial(ky, kx, offs, pmask, sa_y, sa_x, H, W, REFLECT)
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
                        gp00, _ = _spatial(y0, x0, offs, pmask, sa_y, sa_x, H, W, REFLECT)
                        gp01, _ = _spatial(y0, x0 + 1, offs, pmask, sa_y, sa_x, H, W, REFLECT)
                        gp10, _ = _spatial(y0 + 1, x0, offs, pmask, sa_y, sa_x, H, W, REFLECT)
                        gp11, _ = _spatial(y0 + 1, x0 + 1, offs, pmask, sa_y, sa_x, H, W, REFLECT)
                    g4 = g[:, None, None, None]
                    gpos_y = tl.zeros((BLOCK_Q,), ACC)
                    gpos_x = tl.zeros((BLOCK_Q,), ACC)
                    for dt in tl.static_range(PT):
                        qti, qtv = _border(qt + dt, T, REFLECT)
                        kti, ktv = _border(tf + dt, T, REFLECT)
                        q_fr = (q_base + qti.to(tl.int64) * sq_t)[:, None, None, None]
                        k_fr = (k_base + kti.to(tl.int64) * sk_t)[:, None, None, None]
                        gq_fr = (gq_base + qti.to(tl.int64) * sa_t)[:, None, None, None]
                        gk_fr = (gk_base + kti.to(tl.int64) * sa_t)[:, None, None, None]
                        qv4 = (qtv & rmask)[:, None, None, None]
                        kv4 = (ktv & rmask)[:, None, None, None]
                        for c0 in range(c_lo, c_hi, BLOCK_C):
                            ch = c0 + cc
                            cm = (ch < C)[None, :, None, None]
                            qc = (ch * sq_c)[None, :, None, None]
                            kc = (ch * sk_c)[None, :, None, None]
                            gc = (ch * sa_c)[None, :, None, None]
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
                            gqp, gkp = _pair_grads(g4, qv, kv, DOT)
                            if GQ > 0:
                                gq_sum += tl.where(qm, gqp, 0.0)
                            else:
                                _accumulate(gq_fr + gc + gq_sp, gqp, qm, scale, FIXED)
                            if WHOLE:
                                _accumulate(gk_fr + gc + gk_sp, gkp, km, scale, FIXED)
                            else:
                                gk_at = gk_fr + gc
                                _accumulate(gk_at + gp00, gkp * (1 - fy) * (1 - fx), m00 & km,
                                            scale, FIXED)  # fmt: skip
                                _accumulate(gk_at + gp01, gkp * (1 - fy) * fx, m01 & km, scale,
                                            FIXED)  # fmt: skip
                                _accumulate(gk_at + gp10, gkp * fy * (1 - fx), m10 & km, scale,
                                            FIXED)  # fmt: skip
                                _accumulate(gk_at + gp11, gkp * fy * fx, m11 & km, scale, FIXED)
                                if FLOW_GRAD:
                                    dky = bot - top
                                    dkx = (v01 - v00) * (1 - fy) + (v11 - v10) * fy
                                    gpos_y += _patch_sum(gkp * dky)
                                    gpos_x += _patch_sum(gkp * dkx)
                    if FLOW_GRAD:
                        if HAS_GI and ct == 0:  # once: GQ > 0 passes here once per channel tile
                            gi_off = at * 3
                            gpos_y += tl.load(gi_ptr + gi_off + 1, mask=rmask, other=0).to(ACC)
                            gpos_x += tl.load(gi_ptr + gi_off + 2, mask=rmask, other=0).to(ACC)
                        # the flow accumulator is laid out contiguously as the flows
                        gf_off = (((b.to(tl.int64) * T + qt) * S + s_) * 2 * H + qy) * W + qx
                        _accumulate(gf_ptr + gf_off, gpos_y, moves & free_y, scale, FIXED)
                        _accumulate(gf_ptr + gf_off + H * W, gpos_x, moves & free_x, scale, FIXED)
        if GQ > 0:
            # the query's own patch (frame qt, in range), in the results' order
            ch = (ct + cc)[None, :, None, None]
            at = gq_base + qt.to(tl.int64)[:, None, None, None] * sa_t + ch * sa_c + gq_sp
            m = q_m & (ch < C) & qmask[:, None, None, None]
            if KEYS == 2:  # only the rows the second pass took
                m = m & brow[:, None, None, None]
            if GQ == 1:
                _accumulate(at, gq_sum, m, scale, FIXED)
            elif FIXED:
                tl.store(at, _fixed(gq_sum, scale), mask=m)
            else:
                tl.store(at, gq_sum, mask=m)


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


# Launch configuration; ``None`` picks from the case. Direct kernel: queries per program and warps
# (32 on one warp without a patch, else 128 on 4), and the most channels a one-pixel query keeps in
# registers (W2 forward 3.1 -> 1.3 ms), and its selection's per-lane buffer (for those one-pixel
# queries, the case timed) and skip (as the row kernel's below; W2 forward 1.02 ms inserting at
# once, 1.07 skipping, 0.99 / 0.96 / 1.00 with 2 / 4 / 8 slots). Row kernel: whether it takes the
# columns whose windows slide sideways (stride1 = 1; else the direct kernel does), the fewest grid
# columns it takes (narrower rows go to the direct kernel), columns per block (at least twice the
# patch span), warps (one per 32 columns: a lane per column), persistent programs per SM (32 warps'
# worth), rows per strip sharing their patch-row terms, the most query values kept in registers, the
# most channels whose loop is unrolled when they are not, displacements per channels-outer pass when
# they are not (0: channels innermost), and whether a block skips the insert of a candidate no lane
# keeps, and the candidates each lane buffers before inserting (0: inserted at once; None: by
# :func:`_rows_buffer`'s rule), and the channels read per vector load from channel-blocked
# copies where the query is not in registers (1: channel by channel). Measured on the H200
# (BENCHMARKS.md): 32 columns on one warp, strips of 2 (W3 4.58 ms; 1 row 5.82, 3 rows 4.61, 4 rows
# 5.16), the channel loop not unrolled (W4 12.82 ms; unrolled 20.74), channels outermost 3
# displacements at a time (W4 10.77 ms; 0: 12.85, 8: 12.47), and 4 channels per load (W4 6.76 ms;
# 1: 10.78, 2: 8.02; at 4, 2 / 4 / 5 displacements per pass: 7.13 / 6.67 / 9.06, one row per
# strip 9.89); with rows_cpad, queries in registers read that many too, channels padded with zero
# channels to a multiple (C = 3 -> 4): W3 4.59 ms without, 5.44 with, 4.21 with in strips of 3;
# W1s 4.96, 5.14, 5.31, so off. Tried on these rows and taken out: each lane's candidates listed
# in memory and inserted in batches (W3 4.60 -> 4.96 ms at 16 per lane) and a register cap (W3
# 4.58 -> 4.88 at 128 registers, 16 warps per SM instead of 12).
# Backward: queries per program and warps, the fewest channels for which one-pixel patches
# read and accumulate channels-last (0: never), whether patches of one frame sum each query's
# gradient over its results before adding it, and whether whole positions take the two passes
# at precomputed key offsets. Measured on the H200 (BENCHMARKS.md), forward+backward: W3 30.49
# ms per-result adds, 28.34 summed, 14.17 two passes at 16 queries on 4 warps (32 on 4: 14.32;
# offline, sm_90: 156 registers and 27 instructions per patch element, against 163 without the
# key offsets); W2 3.82 ms channels-first, 2.12 channels-last from 8 channels. Tried and taken
# out: the first pass's key gradient by runs of results at the same key (a stable sort, each
# run's sum added once) instead of one atomic add per patch element: on the H100, W3's first
# pass 10.07 -> 2.90 ms without its key adds, but the runs kernel took 14.4 ms at its best launch
# of eight (forward+backward 14.97 -> 23.00 ms).
# Sweeps: benchmarks/search.py (BENCHMARKS.md).
CONFIG = {
    "block_q": None, "num_warps": None, "qreg_max": 64,
    "rows": True, "rows_edges": True, "rows_min": 16, "rows_warps": None, "rows_bx": 32,
    "rows_per_sm": None,
    "rows_strip": 2, "rows_qreg": 48, "rows_unroll": 0, "rows_cout": 3, "rows_skip": True,
    "rows_buffer": None, "rows_cvec": 4, "rows_cpad": False,
    "direct_buffer": 4, "direct_skip": False,
    "bwd_block_q": 16, "bwd_warps": 4, "bwd_clast_min": 8, "bwd_gq_sum": True, "bwd_keys": True,
}  # fmt: skip


# The expected share of a window's candidates that a lane inserts (window of n candidates in a
# random order, k kept: about k ln(n / k) / n) at and above which the row kernel buffers 2 per
# lane. Measured on the H100 (BENCHMARKS.md, forward ms at 0 / 2 / 4 / 8 slots): W3 (0.11) 4.67
# / 4.29 / 4.40 / 5.13; W1s (0.032) 5.07 / 5.60 / 5.29 / 5.62; W1 (0.032) 7.20 / 7.98 / 7.45 /
# 8.02. W4 (0.062) was not swept: it stays at 0, as before.
ROWS_BUFFER_RATE = 0.08


def _rows_buffer(keep: int, nwin: int) -> int:
    """The row kernel's per-lane candidate buffer: CONFIG's, or by the window's insert rate."""
    if CONFIG["rows_buffer"] is not None:
        return CONFIG["rows_buffer"]
    rate = keep * math.log(nwin / keep) / nwin if 0 < keep < nwin else 0.0
    return 2 if rate >= ROWS_BUFFER_RATE else 0


def _channel_blocked(vid: torch.Tensor, cv: int) -> torch.Tensor:
    """``vid`` (B, HD, T, C, H, W) copied to (B, HD, T, ceil(C / cv), H, W, cv): each pixel's
    channels in groups of ``cv`` consecutive values, the last group padded with zeros (a zero
    channel in both videos adds 0 to either distance)."""
    b, hd, t, c, h, w = vid.shape
    pad = -c % cv
    if pad:
        vid = torch.nn.functional.pad(vid, (0, 0, 0, 0, 0, pad))
    return (
        vid.reshape(b, hd, t, (c + pad) // cv, cv, h, w).permute(0, 1, 2, 3, 5, 6, 4).contiguous()
    )


def _channels_first(vid: torch.Tensor) -> torch.Tensor:
    """``vid`` (B, HD, T, C, H, W), copied channel-first when its channels are innermost."""
    if vid.shape[3] > 1 and vid.stride(3) == 1 and vid.stride(5) > 1:
        return channels_first(vid)
    return vid


def _rows_apply(qvid, kvid, flows, p, whole: bool, select_all: bool) -> bool:
    """Whether the row kernel takes the interior columns: whole positions, no flows, stride0 1,
    a patch wider than one pixel, k given; patch overshoot of at most one reflection
    (:func:`_fold`) and int32 offsets inside one (batch, head) of either video."""
    if not (CONFIG["rows"] and whole and flows is None and p.stride0 == 1 and p.ps > 1):
        return False
    t, h, w = qvid.shape[2], qvid.shape[4], qvid.shape[5]
    half = (p.ps // 2) * p.dilation
    reach = max(
        sum((n - 1) * st for n, st in zip(v.shape[2:], v.stride()[2:], strict=True))
        for v in (qvid, kvid)
    )
    return not select_all and half < min(h, w) and p.pt <= t and reach < 2**31 - 1


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
    kp = max(keep, 1)
    dev = qvid.device
    kout = p.nwin if select_all else p.nk
    dists = torch.empty(b, hd, p.count, kout, dtype=qvid.dtype, device=dev)
    all_inds = select_all and p.self_match == "keep"
    if select_all and not all_inds:
        inds = widx = dists
    else:
        inds = torch.empty(b, hd, p.count, kout, 3, dtype=inds_dtype, device=dev)
        widx = torch.empty(b, hd, p.count, kout, dtype=torch.int32, device=dev)
    t0, h0, w0, nh, nw, fl, fstrides, _, _ = _Layout.of(qvid, flows, p)
    block_q = CONFIG["block_q"] or (32 if p.ps == 1 else 128)
    num_warps = CONFIG["num_warps"] or max(1, block_q // 32)
    if p.count == 0 or b * hd == 0:
        return (dists, None, None) if select_all and not all_inds else (dists, inds, widx)
    # each lane walks its own query's channels: with channels innermost (channels-last views,
    # as attention layers make them) those reads would not coalesce across lanes. A search of a
    # video against itself copies it once.
    same = kvid.data_ptr() == qvid.data_ptr() and kvid.stride() == qvid.stride()
    qvid = _channels_first(qvid)
    kvid = qvid if same else _channels_first(kvid)
    row0 = p.start // nw
    nrows = (p.start + p.count - 1) // nw - row0 + 1
    # Grid columns [jl, jr) go to the row kernel: whole rows with stride1 = 1 (its blocks at
    # the frame's edges walk the union of their lanes' slid windows), else the interior
    # columns, whose windows are not slid sideways; the direct kernel takes the rest.
    jl = jr = 0
    s1 = int(p.stride1) if whole else 0
    if _rows_apply(qvid, kvid, flows, p, whole, select_all):
        if s1 == 1 and CONFIG["rows_edges"]:
            jl, jr = 0, nw
        else:
            jl = max(0, (p.ws // 2) * s1 - w0)
            jr = min(nw, width - (p.ws - 1 - p.ws // 2) * s1 - w0)
        if jr - jl < CONFIG["rows_min"]:
            jl = jr = 0
    lanes = nrows * (nw - (jr - jl))
    # The row kernel, where it takes every column and the query is not kept in registers,
    # reads CV channels per load (one vector load per lane) from channel-blocked copies; with
    # rows_cpad also where it is, the channels padded with zeros to a multiple of CV where that
    # adds at most a third (C = 3: one load of 4 instead of 3 of 1)
    strip = min(CONFIG["rows_strip"], p.ps) if p.dilation == 1 else 1
    cv = min(CONFIG["rows_cvec"], next_power_of_2(c))
    cpad = -(-c // cv) * cv if CONFIG["rows_cpad"] else c
    qreg = p.pt * (p.ps + strip - 1) * c <= CONFIG["rows_qreg"]
    blocked = (
        cv > 1 and cpad % cv == 0 and 3 * (cpad - c) <= c and (CONFIG["rows_cpad"] or not qreg)
        and not anchor and lanes == 0 and jr > jl and nframes * cpad * height * width < 2**31
    )  # fmt: skip
    if blocked:
        qreg = p.pt * (p.ps + strip - 1) * cpad <= CONFIG["rows_qreg"]
        qb = _channel_blocked(qvid, cv)
        kb = qb if same else _channel_blocked(kvid, cv)
        # (in units of cv values: the kernel multiplies them back, so it knows each group's
        # address is a multiple of cv values, as a vector load needs)
        rows_strides = tuple(tuple(st // cv for st in v.stride()[:6]) for v in (qb, kb))
    else:
        cv, cpad = 1, c
        qb, kb = qvid, kvid
        rows_strides = qvid.stride(), kvid.stride()
    # one-pixel patches with few channels: the query's channels stay in registers
    cq = c if (p.ps == 1 and p.pt == 1 and whole and c <= CONFIG["qreg_max"]) else 0
    # (its key pixels lie inside: search checks that the window fits the frame)
    assert not cq or (p.ws - 1) * s1 <= min(height, width) - 1
    if lanes > 0:
        _search_fwd_kernel[(triton.cdiv(lanes, block_q), b * hd)](
            qvid, kvid, fl, dists, inds, widx,
            *qvid.stride(), *kvid.stride(), *fstrides,
            hd, nframes, c, height, width,
            p.start, p.count, t0, h0, w0, nh, nw, p.stride0, row0, jl, jr - jl,
            float(p.stride1), p.ws // 2, p.ws - 1 - p.ws // 2, p.nslots,
            p.nwin, keep, kout,
            WS=p.ws, PS=p.ps, PT=p.pt, DIL=p.dilation, KP=kp, ALL=select_all, ALL_INDS=all_inds,
            DOT=p.dist == "dot", REFLECT=p.border == "reflect",
            SKIP_OWN=(not select_all) and p.self_match != "keep", ANCHOR=anchor,
            WHOLE=whole, HAS_FLOW=flows is not None,
            POS=tl.int32 if whole else _TL_DTYPES[pos_dtype], ACC=_TL_DTYPES[acc],
            BLOCK_Q=block_q, CQ=cq, NB=CONFIG["direct_buffer"] if cq else 0,
            SKIP=CONFIG["direct_skip"], num_warps=num_warps,
        )  # fmt: skip
    if jr > jl:
        span = (p.ps - 1) * p.dilation
        bx = max(CONFIG["rows_bx"], next_power_of_2(2 * span))
        bout = bx - span
        nxb = triton.cdiv(jr - jl, bout)
        sms = (
            torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
        )
        rows_warps = CONFIG["rows_warps"] or bx // 32
        nblocks = b * hd * triton.cdiv(nrows, strip) * nxb
        nprog = min(nblocks, sms * (CONFIG["rows_per_sm"] or 32 // rows_warps))
        nb = _rows_buffer(kp, p.nwin)
        _search_rows_kernel[(nprog,)](
            qb, kb, dists, inds, widx,
            *rows_strides[0], *rows_strides[1],
            hd, nframes, height, width,
            p.start, p.count, t0, h0, w0, nh, nw,
            row0, triton.cdiv(nrows, strip), nrows, jl, jr, nxb, nblocks,
            s1, p.ws // 2, p.ws - 1 - p.ws // 2, p.nslots, p.nwin, keep, kout,
            WS=p.ws, PS=p.ps, PT=p.pt, DIL=p.dilation, C=cpad, KP=kp, NB=nb,
            RS=kp + nb + 1 if nb else kp, DOT=p.dist == "dot", REFLECT=p.border == "reflect",
            SKIP_OWN=p.self_match != "keep", ANCHOR=anchor, QREG=qreg,
            # (channel groups of blocked copies are looped unless the query is in registers)
            UNROLL=qreg or (cv == 1 and c <= CONFIG["rows_unroll"]),
            COUT=0 if qreg else CONFIG["rows_cout"], R=strip,
            SKIP=CONFIG["rows_skip"],
            ACC=_TL_DTYPES[acc], BX=bx, BOUT=bout, CV=cv, num_warps=rows_warps,
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
    # one-pixel patches with many channels: channels-last accumulators and reads, so that each
    # query's channels are read from and added into one run of memory (a few sectors per warp)
    last = p.ps == 1 and c >= CONFIG["bwd_clast_min"] > 0
    if last:
        same = kvid is qvid
        qvid = channels_inner(qvid)
        kvid = qvid if same else channels_inner(kvid)
    shape = (b, hd, nframes, height, width, c) if last else qvid.shape
    gq = torch.zeros(shape, dtype=buf, device=dev)
    gk = torch.zeros(shape, dtype=buf, device=dev)
    if last:
        gq, gk = gq.permute(0, 1, 2, 5, 3, 4), gk.permute(0, 1, 2, 5, 3, 4)
    gf = torch.zeros(flows.shape, dtype=buf, device=dev) if flow_grad else gq
    widx = widx.contiguous()
    t0, h0, w0, nh, nw, fl, fstrides, psp, block_c = _Layout.of(qvid, flows, p)
    block_q = CONFIG["bwd_block_q"]
    grid = (triton.cdiv(p.count, block_q), b * hd)
    # patches of one frame: the query's gradient summed over its results in registers
    gq_mode = 0
    if p.pt == 1:
        gq_mode = 2 if p.ps == 1 else int(CONFIG["bwd_gq_sum"])
    # whole positions: a first pass over the results whose key patch lies inside the frame,
    # at key offsets computed once per result; a second one over the others
    keys = whole and gq_mode > 0 and CONFIG["bwd_keys"]
    if keys and kvid.stride()[2:] != gk.stride()[2:] and not last:
        kvid = kvid.contiguous()  # the passes address the key video and gk with one offset
    keys = keys and kvid.stride()[2:] == gk.stride()[2:]
    if p.count > 0 and b * hd > 0 and p.nk > 0:
        ko = gd
        if keys:
            span = sum(
                (n - 1) * st for n, st in zip(kvid.shape[2:], kvid.stride()[2:], strict=True)
            )
            ko_dtype = torch.int32 if span < 2**31 else torch.int64
            ko = torch.empty(b * hd, p.count, p.nk, dtype=ko_dtype, device=dev)
            kgrid = (triton.cdiv(p.count * p.nk, 256), b * hd)
            _search_bwd_keys_kernel[kgrid](
                widx, ko, fl, kvid.stride(2), kvid.stride(4), kvid.stride(5), *fstrides,
                hd, nframes, height, width,
                p.start, p.count, t0, h0, w0, nh, nw, p.stride0,
                float(p.stride1), p.ws // 2, p.ws - 1 - p.ws // 2, p.nslots, p.nk,
                WS=p.ws, PS=p.ps, DIL=p.dilation, HAS_FLOW=flows is not None, BLOCK=256,
            )  # fmt: skip
        for pass_ in (1, 2) if keys else (0,):
            _search_bwd_kernel[grid](
                qvid, kvid, fl, gd, gi, widx, ko, gq, gk, gf,
                *qvid.stride(), *kvid.stride(), *fstrides, *gq.stride()[2:],
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
                # the second pass adds to the first's query gradient
                GQ=1 if pass_ == 2 else gq_mode, KEYS=pass_,
                num_warps=CONFIG["bwd_warps"],
            )  # fmt: skip
    if scale is not None:
        gq, gk = gq.double() / scale, gk.double() / scale
        gf = gf.double() / scale if flow_grad else gf
    gflows = gf.to(flows.dtype) if flow_grad else qvid.new_empty(0)
    return channels_first(gq.to(qvid.dtype)), channels_first(gk.to(kvid.dtype)), gflows


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
    return _fixed_point(bound, "gdists must be finite for the deterministic backward of search")


def _fixed_point(bound: float, error: str) -> float:
    """The largest power of two (at most 2^126, so a finite float32 kernel argument) by which
    sums of at most ``bound`` in size can be scaled and stay within int64; a ``bound`` that is
    not finite is a ValueError with the message ``error``."""
    if not math.isfinite(bound):
        raise ValueError(error)
    return 2.0 ** min(62 - math.ceil(math.log2(bound)), 126) if bound > 0 else 1.0
