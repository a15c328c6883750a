"""Fused CPU kernels (numba) for whole-pixel positions: search, wpsum, scatter and ifold.

Why numba. The reference path builds every candidate patch with ``index_select`` and reduces
it: correct, but for a 512x512 image it spends seconds moving memory. A fused kernel must compute
distances straight from the pixels and keep only the ``k`` best in small buffers. numba does
that from Python source, ships as a wheel (no compiler on the user's machine, unlike
``torch.utils.cpp_extension`` or ``torch.compile``'s C++ backend), compiles once per dtype and
caches the machine code on disk (``cache=True``), and runs ``prange`` loops on every core. It is
optional: without it (or with ``DNLS_BACKEND=torch``) the reference path runs.

Scope: CPU tensors, whole-pixel positions (no flows or integer flows, integral ``stride1``),
``pt == 1``, ``dilation == 1``, ``k`` given. Anything else runs the reference path. The
backward passes always run the reference path.

Layout. A video is padded once per call to ``(BH, T, C, H + ps - 1, W + ps - 1)`` (channel
planes, the border rule applied while padding), so the patch of pixel ``(y, x)`` is the block
``[:, y : y + ps, x : x + ps]`` and every read is in bounds and contiguous along a row. wpsum
pads channels-last, ``(BH, T, H + ps - 1, W + ps - 1, C)``, where a patch row is ``ps * C``
contiguous values.

Search works on bands of up to :data:`BAND` consecutive rows of queries whose windows do not
slide vertically (one prange item per band). For each candidate offset of the window, in window
order, it computes the channel-summed squared differences of every pixel row the band's patches
cover, once (vectorised along the row); a vertical sum of ``ps`` of those rows and a horizontal
sum of ``ps`` columns give the distance of every query of the band; each distance below the
query's current ``k``-th is inserted into its sorted top-k buffer (ties keep the earlier
candidate, as the contract requires). Queries whose window slides sideways at the left and right
edges, and every query when flows move the windows, take the direct path: one patch distance per
candidate.

Threads. numba runs ``prange`` loops on its own thread pool and torch runs its ops on another;
both spin-wait for a while when idle, so alternating torch ops and numba kernels on a 2-core
machine leaves each kernel competing with torch's spinning threads (2-4x slower, measured in
BENCHMARKS.md). Two remedies: numba's ``tbb`` threading layer (the ``tbb`` package is a
dependency on x86-64; its workers yield when idle, and it is safe with threads and ``fork``,
unlike GNU OpenMP and numba's ``workqueue``), and :func:`torch_threads_quiet`, which a pipeline
of fused kernels (``dnls.apps.nlm``) uses to run its small torch ops on the calling thread.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading

import numpy as np
import torch

from .._common import fused_cpu
from .._ref import border_index

AVAILABLE = importlib.util.find_spec("numba") is not None

if AVAILABLE:
    import numba as nb

    _jit = nb.njit(cache=True, nogil=True)
    _pjit = nb.njit(cache=True, nogil=True, parallel=True)
    prange = nb.prange
else:  # pragma: no cover - the module is only used when numba is installed

    def _jit(f):
        return f

    _pjit = _jit
    prange = range


# Self-match modes of the kernels.
KEEP, EXCLUDE, ANCHOR = 0, 1, 2
SELF_MODES = {"keep": KEEP, "exclude": EXCLUDE, "anchor": ANCHOR}

# Most rows of queries in one search band, and queries per wpsum work item.
BAND = 16
CHUNK = 256


# ---------------------------------------------------------------------------------------------
# Padding: (B, HD, T, C, H, W) -> (B*HD, T, C, H + ps - 1, W + ps - 1), border rule applied.
# ---------------------------------------------------------------------------------------------


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pad(
    vid6: torch.Tensor,
    ps: int,
    border: str,
    frames=None,
    rows=None,
    dtype=None,
    channels_last: bool = False,
) -> np.ndarray:
    """Frames ``[f0, f1)`` and rows ``[y0, y1)`` (default all) of ``vid6`` in ``dtype``,
    padded by the patch and the border rule: ``(BH, f1 - f0, C, y1 - y0 + ps - 1, W + ps - 1)``,
    or ``(BH, f1 - f0, y1 - y0 + ps - 1, W + ps - 1, C)`` with ``channels_last``."""
    b, hd, t, c, h, w = vid6.shape
    f0, f1 = frames if frames is not None else (0, t)
    y0, y1 = rows if rows is not None else (0, h)
    lo, hi = ps // 2, ps - 1 - ps // 2
    x = vid6.detach().reshape(b * hd, t, c, h, w)[:, f0:f1]
    x = x.to(dtype or kernel_dtype(vid6.dtype))
    hidx, hval = border_index(torch.arange(y0 - lo, y1 + hi), h, border)
    widx, wval = border_index(torch.arange(-lo, w + hi), w, border)
    x = x.index_select(3, hidx).index_select(4, widx)
    if hval is not None:
        x = x * (hval[:, None] & wval[None, :]).to(x.dtype)
    if channels_last:
        x = x.permute(0, 1, 3, 4, 2)
    return x.contiguous().numpy()


def unpad_add(padded: np.ndarray, shape6, ps: int, border: str) -> torch.Tensor:
    """The adjoint of :func:`pad`: fold a padded ``(BH, T, C, Hp, Wp)`` buffer into a video."""
    b, hd, t, _, h, w = shape6
    c = padded.shape[2]
    lo, hi = ps // 2, ps - 1 - ps // 2
    x = torch.from_numpy(padded)
    hidx, hval = border_index(torch.arange(-lo, h + hi), h, border)
    widx, wval = border_index(torch.arange(-lo, w + hi), w, border)
    if hval is not None:
        x = x * (hval[:, None] & wval[None, :]).to(x.dtype)
    out = x.new_zeros(b * hd, t, c, h, x.shape[4]).index_add_(3, hidx, x)
    out = out.new_zeros(b * hd, t, c, h, w).index_add_(4, widx, out)
    return out.view(b, hd, t, c, h, w)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


@_jit
def _insert(td, ti, m, kk, d, j):
    """Insert distance ``d`` of window index ``j`` into query ``m``'s ascending top-``kk``
    (the caller has checked that ``d`` beats the current ``kk``-th; ties stay behind)."""
    pos = kk - 1
    while pos > 0 and td[m, pos - 1] > d:
        td[m, pos] = td[m, pos - 1]
        ti[m, pos] = ti[m, pos - 1]
        pos -= 1
    td[m, pos] = d
    ti[m, pos] = j


@_jit
def _patch_key(q, k, bh, tq, yq, xq, tk, yk, xk, ps, is_dot):
    """Distance key (smaller is nearer: l2, or minus the dot product) of the patches whose
    top-left corners are padded pixels ``(tq, yq, xq)`` of ``q`` and ``(tk, yk, xk)`` of ``k``.
    Indices are cast to unsigned: numba then skips its negative-index wrap-around."""
    s = 0.0
    for cc in range(q.shape[2]):
        for i in range(ps):
            qr = q[bh, tq, cc, np.uint64(yq + i)]
            kr = k[bh, tk, cc, np.uint64(yk + i)]
            for jj in range(ps):
                a = qr[np.uint64(xq + jj)]
                b = kr[np.uint64(xk + jj)]
                if is_dot:
                    s -= a * b
                else:
                    s += (a - b) * (a - b)
    return s


@_jit
def _centre(flows, has_flows, bb, t, h, w, slot, own, lo, hi_h, hi_w):
    """Slid window centre of the query ``(t, h, w)`` in window slot ``slot``."""
    ch, cw = h, w
    if has_flows and slot != own:
        ch = h + flows[bb, t, slot, 0, h, w]
        cw = w + flows[bb, t, slot, 1, h, w]
    return min(max(ch, lo), hi_h), min(max(cw, lo), hi_w)


@_jit
def _pixel_dists(q, k, bh, tq, tk, ra, rb, xa, xb, nd, nx, is_dot, dd):
    """``dd[i, x]``: channel-summed distance of padded pixel ``(ra + i, xa + x)`` of ``q`` to
    ``(rb + i, xb + x)`` of ``k`` (squared difference, or minus the product). Reads go through
    row views indexed from 0, which numba vectorises (an offset index defeats it)."""
    for i in range(nd):
        drow = dd[i]
        for cc in range(q.shape[2]):
            qr = q[bh, tq, cc, ra + i, xa : xa + nx]
            kr = k[bh, tk, cc, rb + i, xb : xb + nx]
            if is_dot:
                if cc == 0:
                    for x in range(nx):
                        drow[x] = -qr[x] * kr[x]
                else:
                    for x in range(nx):
                        drow[x] -= qr[x] * kr[x]
            elif cc == 0:
                for x in range(nx):
                    drow[x] = (qr[x] - kr[x]) * (qr[x] - kr[x])
            else:
                for x in range(nx):
                    drow[x] += (qr[x] - kr[x]) * (qr[x] - kr[x])


@_pjit
def search_bands(
    q,  # (BH, T', C, H' + ps - 1, W + ps - 1) padded queries video (frames f0.., rows y0..)
    k,  # the same for the keys
    geo,  # (T, H, W, f0, y0): the video's size and the band's first frame and row
    flows,  # (B, T, S, 2, H, W) int32 flows, or a dummy (1, 1, 1, 2, 1, 1)
    has_flows,  # whether flows move the windows
    rows,  # (R, 5) int64 rows of queries: t, h, first w, number of queries, first output
    bands,  # (G, 2) int64 bands of rows: first row, number of rows
    hd,  # heads per batch entry (flows are per batch entry)
    s0,  # spacing of the queries (stride0), along rows and columns
    s1,  # spacing of the window grid (stride1, whole)
    ws,
    wt,
    ps,
    mode,  # KEEP, EXCLUDE or ANCHOR
    is_dot,
    top,  # the largest finite value of the keys' dtype: keys at or past it (overflows, NaN)
    # are set to it, tie last, in window order, and are returned as infinitely far, as
    # search.rank_key and search.reported say
    out_d,  # (BH, N, K) distances
    out_w,  # (BH, N, K) int32 window indices (-1: the query itself, anchor)
    out_p,  # (BH, N, K, 3) int32 positions
):
    nbh = q.shape[0]
    nframes, height, width, f0, y0 = geo[0], geo[1], geo[2], geo[3], geo[4]
    nslots = 2 * wt + 1
    nk = out_d.shape[2]
    first = 1 if mode == ANCHOR else 0
    kk = nk - first
    kb = max(kk, 1)
    half = ws // 2
    lo = half * s1
    hi_h = height - 1 - (ws - 1 - half) * s1
    hi_w = width - 1 - (ws - 1 - half) * s1
    nbands = bands.shape[0]
    for item in prange(nbh * nbands):
        bh, g = item // nbands, item % nbands
        bb = bh // hd
        r0, nr = bands[g, 0], bands[g, 1]
        t, h0, w0, n = rows[r0, 0], rows[r0, 1], rows[r0, 2], rows[r0, 3]
        t0 = min(max(t - wt, 0), nframes - nslots)
        own = t - t0
        tq = t - f0
        td = np.full((nr * n, kb), np.inf, dtype=out_d.dtype)
        ti = np.zeros((nr * n, kb), dtype=np.int32)
        thr = np.full(nr * n, np.inf, dtype=out_d.dtype)  # td[:, kk - 1], contiguous
        # Queries with an unslid horizontal window take the band path.
        m_lo, m_hi = 0, 0
        if not has_flows:
            m_lo = min(n, max(0, (lo - w0 + s0 - 1) // s0))
            m_hi = max(m_lo, min(n, (hi_w - w0) // s0 + 1))
        if kk > 0 and m_hi > m_lo:
            dy0 = min(max(h0, lo), hi_h) - h0  # 0 unless a one-row band slides vertically
            xa = w0 + m_lo * s0  # first padded column of the first band-path query
            nm = m_hi - m_lo
            nx = (nm - 1) * s0 + ps
            nd = (nr - 1) * s0 + ps  # padded rows the band's patches cover
            dd = np.empty((nd, nx), dtype=out_d.dtype)
            vs = np.empty(nx, dtype=out_d.dtype)
            box = np.empty(nx - ps + 1, dtype=out_d.dtype)
            ra = h0 - y0
            for slot in range(nslots):
                tk = t0 + slot - f0
                for a in range(ws):
                    dy = dy0 + (a - half) * s1
                    for b in range(ws):
                        dx = (b - half) * s1
                        if mode != KEEP and slot == own and dy == 0 and dx == 0:
                            continue  # every band-path query would meet itself here
                        j = (slot * ws + a) * ws + b
                        _pixel_dists(q, k, bh, tq, tk, ra, ra + dy, xa, xa + dx, nd, nx,
                                     is_dot, dd)  # fmt: skip
                        for rr in range(nr):
                            vs[:] = dd[rr * s0]
                            for i in range(1, ps):
                                drow = dd[rr * s0 + i]
                                for x in range(nx):
                                    vs[x] += drow[x]
                            for x in range(nx - ps + 1):
                                box[x] = vs[x]
                            for jj in range(1, ps):
                                vj = vs[jj:]
                                for x in range(nx - ps + 1):
                                    box[x] += vj[x]
                            base = rr * n
                            for m in range(m_lo, m_hi):
                                d = box[(m - m_lo) * s0]
                                if not d < top:
                                    d = top
                                if d < thr[base + m]:
                                    _insert(td, ti, base + m, kk, d, j)
                                    thr[base + m] = td[base + m, kk - 1]
        # Direct path: queries whose window slid sideways, or every query with flows.
        for rr in range(nr):
            h = rows[r0 + rr, 1]
            for m in range(n):
                if kk == 0 or (m >= m_lo and m < m_hi):
                    continue
                w = w0 + m * s0
                mm = rr * n + m
                for slot in range(nslots):
                    tk = t0 + slot - f0
                    ch, cw = _centre(flows, has_flows, bb, t, h, w, slot, own, lo, hi_h, hi_w)
                    for a in range(ws):
                        yk = ch + (a - half) * s1
                        for b in range(ws):
                            xk = cw + (b - half) * s1
                            if mode != KEEP and slot == own and yk == h and xk == w:
                                continue
                            d = _patch_key(q, k, bh, tq, h - y0, w, tk, yk - y0, xk, ps, is_dot)
                            if not d < top:
                                d = top
                            if d < td[mm, kk - 1]:
                                _insert(td, ti, mm, kk, d, (slot * ws + a) * ws + b)
        # Write the results in final order, with their positions.
        for rr in range(nr):
            h, o0 = rows[r0 + rr, 1], rows[r0 + rr, 4]
            for m in range(n):
                w = w0 + m * s0
                o = o0 + m
                mm = rr * n + m
                if first == 1:
                    d = _patch_key(q, k, bh, tq, h - y0, w, tq, h - y0, w, ps, is_dot)
                    out_d[bh, o, 0] = -d if is_dot else d
                    out_w[bh, o, 0] = -1
                    out_p[bh, o, 0, 0] = t
                    out_p[bh, o, 0, 1] = h
                    out_p[bh, o, 0, 2] = w
                for i in range(kk):
                    j = ti[mm, i]
                    slot, a, b = j // (ws * ws), (j // ws) % ws, j % ws
                    ch, cw = _centre(flows, has_flows, bb, t, h, w, slot, own, lo, hi_h, hi_w)
                    yk, xk = ch + (a - half) * s1, cw + (b - half) * s1
                    d = td[mm, i]
                    if d == top:  # set to it: infinitely far (search.reported)
                        d = np.inf
                    out_d[bh, o, first + i] = -d if is_dot else d
                    out_w[bh, o, first + i] = j
                    out_p[bh, o, first + i, 0] = t0 + slot
                    out_p[bh, o, first + i, 1] = yk
                    out_p[bh, o, first + i, 2] = xk


def query_rows(grid, start: int, count: int) -> np.ndarray:
    """The rows ``(t, h, first w, n, first output)`` covering queries ``[start, start+count)``."""
    _, nh, nw = grid.sizes
    t0, _, h0, _, w0, _ = grid.region
    s = grid.stride
    first_row, last_row = start // nw, (start + count - 1) // nw
    r = np.arange(first_row, last_row + 1, dtype=np.int64)
    begin = np.maximum(r * nw, start)
    end = np.minimum((r + 1) * nw, start + count)
    rows = np.empty((r.size, 5), dtype=np.int64)
    rows[:, 0] = t0 + r // nh
    rows[:, 1] = h0 + (r % nh) * s
    rows[:, 2] = w0 + (begin - r * nw) * s
    rows[:, 3] = end - begin
    rows[:, 4] = begin - start
    return rows


def query_bands(rows: np.ndarray, stride: int, lo: int, hi: int, most: int) -> np.ndarray:
    """Split ``rows`` into bands ``(first row, number of rows)`` of at most ``most``
    consecutive rows with the same frame, columns and queries, ``stride`` apart, whose windows
    do not slide vertically (rows ``h`` in ``[lo, hi]``); any other row is a band of its own."""
    t, h, w0, n = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    inside = (h >= lo) & (h <= hi)
    joins = (t[1:] == t[:-1]) & (w0[1:] == w0[:-1]) & (n[1:] == n[:-1])
    joins &= (h[1:] - h[:-1] == stride) & inside[1:] & inside[:-1]
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    ends = np.append(starts[1:], len(rows))
    out = []
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        for first in range(a, b, most):
            out.append((first, min(most, b - first)))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def search(qvid, kvid, flows, p, grid):
    """Fused search on CPU tensors: ``(dists, inds, widx)`` as the reference returns them."""
    b, hd, nframes, c, height, width = qvid.shape
    nk = p.nk
    dtype = kernel_dtype(qvid.dtype)
    dists = torch.empty((b * hd, p.count, nk), dtype=dtype)
    widx = torch.empty((b * hd, p.count, nk), dtype=torch.int32)
    inds = torch.empty((b * hd, p.count, nk, 3), dtype=torch.int32)
    shape = (b, hd, p.count, nk)
    if p.count == 0:
        return dists.view(shape).to(qvid.dtype), inds.view(*shape, 3), widx.view(shape)
    rows = query_rows(grid, p.start, p.count)
    s1 = int(p.stride1)
    half = p.ws // 2
    most = max(1, min(BAND, -(-len(rows) * b * hd // (4 * nb.get_num_threads()))))
    bands = query_bands(rows, grid.stride, half * s1, height - 1 - (p.ws - 1 - half) * s1, most)
    # Only the frames and rows the batch can reach are padded (all of them with flows).
    reach = (p.ws - 1) * s1
    f0 = max(0, int(rows[0, 0]) - 2 * p.wt)
    f1 = min(nframes, int(rows[-1, 0]) + 2 * p.wt + 1)
    y0, y1 = 0, height
    if flows is None:
        y0 = max(0, int(rows[:, 1].min()) - reach)
        y1 = min(height, int(rows[:, 1].max()) + reach + 1)
    q = pad(qvid, p.ps, p.border, (f0, f1), (y0, y1))
    same = kvid.data_ptr() == qvid.data_ptr() and kvid.stride() == qvid.stride()
    same = same and kvid.dtype == qvid.dtype
    k = q if same else pad(kvid, p.ps, p.border, (f0, f1), (y0, y1), dtype)
    if flows is None:
        f = np.zeros((1, 1, 1, 2, 1, 1), dtype=np.int32)
    else:
        f = flows.to(torch.int32).contiguous().numpy()
    search_bands(
        q,
        k,
        np.array([nframes, height, width, f0, y0], dtype=np.int64),
        f,
        flows is not None,
        rows,
        bands,
        hd,
        grid.stride,
        s1,
        p.ws,
        p.wt,
        p.ps,
        SELF_MODES[p.self_match],
        p.dist == "dot",
        dists.numpy().dtype.type(torch.finfo(dtype).max),
        dists.numpy(),
        widx.numpy(),
        inds.numpy(),
    )
    return dists.view(shape).to(qvid.dtype), inds.view(*shape, 3), widx.view(shape)


# ---------------------------------------------------------------------------------------------
# wpsum, scatter and ifold
# ---------------------------------------------------------------------------------------------


@_pjit
def _wpsum(v, dims, org, weights, inds, ps, out):
    """``out[bh, q] = sum_k weights[bh, q, k] * patch(v, inds[bh, q, k])``, ``(C, ps, ps)``;
    ``v`` is the flat padded channels-last video of shape ``dims`` ``(BH, T', Hp', Wp, C)``,
    its first frame and row at ``org``. A patch row is ``ps * C`` contiguous values, read with
    unsigned indices (which numba vectorises; signed ones it wraps around)."""
    nbh, nq, nk = weights.shape
    nframes, hp, wp, c = dims[1], dims[2], dims[3], dims[4]
    rowlen = wp * c
    pc = ps * c
    nchunks = (nq + CHUNK - 1) // CHUNK
    for item in prange(nbh * nchunks):
        bh, g = item // nchunks, item % nchunks
        acc = np.empty(ps * pc, dtype=out.dtype)
        for qi in range(g * CHUNK, min(nq, (g + 1) * CHUNK)):
            acc[:] = 0
            for j in range(nk):
                wgt = weights[bh, qi, j]
                t = inds[bh, qi, j, 0] - org[0]
                y = inds[bh, qi, j, 1] - org[1]
                base = (((bh * nframes + t) * hp + y) * wp + inds[bh, qi, j, 2]) * c
                for i in range(ps):
                    src, dst = base + i * rowlen, i * pc
                    for e in range(pc):
                        acc[np.uint64(dst + e)] += wgt * v[np.uint64(src + e)]
            for i in range(ps):
                for jj in range(ps):
                    for cc in range(c):
                        out[bh, qi, cc, i, jj] = acc[(i * ps + jj) * c + cc]


@_jit
def _scatter(patches, inds, ps, out):
    """Add ``patches`` ``(BH, N, C, ps, ps)`` at ``inds`` ``(BH, N, 3)`` into padded ``out``."""
    nbh, n = inds.shape[0], inds.shape[1]
    c = out.shape[2]
    for bh in range(nbh):
        for qi in range(n):
            t, y, x = inds[bh, qi, 0], inds[bh, qi, 1], inds[bh, qi, 2]
            for cc in range(c):
                for i in range(ps):
                    for jj in range(ps):
                        out[bh, t, cc, y + i, x + jj] += patches[bh, qi, cc, i, jj]


@_pjit
def _fold(patches, pos, segs, ps, out, cnt):
    """Add ``patches`` ``(B, Q, C, ps, ps)`` at the grid positions ``pos`` ``(Q, 3)`` into the
    padded ``out`` ``(B, T, C, Hp, Wp)``, counting the additions in ``cnt`` ``(T, Hp, Wp)``.
    ``segs`` ``(S, 3)``: runs of queries (first, end, parity) whose patches of the same parity
    never overlap another run's, so runs of one parity run in parallel."""
    nb, c = patches.shape[0], patches.shape[2]
    nsegs = segs.shape[0]
    for parity in range(2):
        for s in prange(nsegs):
            if segs[s, 2] != parity:
                continue
            for qi in range(segs[s, 0], segs[s, 1]):
                t, y, x = pos[qi, 0], pos[qi, 1], pos[qi, 2]
                for i in range(ps):
                    for jj in range(ps):
                        cnt[t, y + i, x + jj] += 1.0
                for bb in range(nb):
                    for cc in range(c):
                        for i in range(ps):
                            for jj in range(ps):
                                out[bb, t, cc, y + i, x + jj] += patches[bb, qi, cc, i, jj]


def fold_segments(pos: np.ndarray, ps: int) -> np.ndarray:
    """Runs ``(first, end, parity)`` of raster-ordered queries ``pos`` ``(Q, 3)`` that share a
    frame and a stripe of ``ps`` rows; runs of stripes of one parity touch disjoint pixels."""
    stripe = pos[:, 1] // max(ps, 1)
    key = pos[:, 0] * (stripe.max() + 2) + stripe
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    ends = np.append(starts[1:], len(pos))
    return np.stack([starts, ends, stripe[starts] % 2], axis=1).astype(np.int64)


def fold(patches, pos, shape, border: str):
    """``ifold`` of patches ``(B, Q, 1, C, ps, ps)`` at int grid positions ``pos`` ``(Q, 3)``:
    ``(vid (B, T, C, H, W), counts (B, T, 1, H, W))``."""
    b, q, _, c, ps, _ = patches.shape
    _, t, _, h, w = shape
    dtype = kernel_dtype(patches.dtype)
    p = patches.detach().reshape(b, q, c, ps, ps).to(dtype).contiguous().numpy()
    out = np.zeros((b, t, c, h + ps - 1, w + ps - 1), dtype=p.dtype)
    cnt = np.zeros((1, t, 1, h + ps - 1, w + ps - 1), dtype=p.dtype)
    if q > 0:
        pos = pos.to(torch.int64).contiguous().numpy()
        _fold(p, pos, fold_segments(pos, ps), ps, out, cnt[0, :, 0])
    vid = unpad_add(out, (b, 1, t, c, h, w), ps, border)[:, 0].to(patches.dtype)
    counts = unpad_add(cnt, (1, 1, t, 1, h, w), ps, border)[:, 0]
    return vid, counts.expand(b, t, 1, h, w).contiguous()


@_jit
def _frame_row_bounds(pos):
    """``(first frame, last frame + 1, first row, last row + 1)`` of positions ``(N, 3)``."""
    t_lo, t_hi, h_lo, h_hi = pos[0, 0], pos[0, 0], pos[0, 1], pos[0, 1]
    for n in range(pos.shape[0]):
        t_lo, t_hi = min(t_lo, pos[n, 0]), max(t_hi, pos[n, 0])
        h_lo, h_hi = min(h_lo, pos[n, 1]), max(h_hi, pos[n, 1])
    return int(t_lo), int(t_hi) + 1, int(h_lo), int(h_hi) + 1


def wpsum(vid6, weights, inds, ps: int, border: str) -> torch.Tensor:
    """``(B, HD, Q, 1, C, ps, ps)`` weighted patch sums (pt == 1, dilation == 1, int inds)."""
    b, hd, _, c, _, _ = vid6.shape
    q, nk = inds.shape[2], inds.shape[3]
    t_lo = h_lo = 0
    t_hi, h_hi = vid6.shape[2], vid6.shape[4]
    i = inds.reshape(b * hd, q, nk, 3).to(torch.int32).contiguous().numpy()
    if inds.numel() > 0:
        t_lo, t_hi, h_lo, h_hi = _frame_row_bounds(i.reshape(-1, 3))
    out_dtype = torch.promote_types(vid6.dtype, weights.dtype)
    dtype = kernel_dtype(out_dtype)
    v = pad(vid6, ps, border, (t_lo, t_hi), (h_lo, h_hi), dtype, channels_last=True)
    w = weights.detach().reshape(b * hd, q, nk).to(dtype).contiguous().numpy()
    out = torch.empty((b * hd, q, c, ps, ps), dtype=dtype)
    if q > 0:
        org = np.array([t_lo, h_lo], dtype=np.int64)
        _wpsum(v.reshape(-1), np.array(v.shape, dtype=np.int64), org, w, i, ps, out.numpy())
    return out.view(b, hd, q, 1, c, ps, ps).to(out_dtype)


def scatter(patches, inds, shape6, border: str) -> torch.Tensor:
    """Add patches ``(B, HD, Q, K, 1, C, ps, ps)`` at int ``inds`` into a zero video."""
    b, hd, q, nk = inds.shape[:4]
    c, ps = patches.shape[5], patches.shape[6]
    _, _, t, _, h, w = shape6
    dtype = kernel_dtype(patches.dtype)
    p = patches.detach().reshape(b * hd, q * nk, c, ps, ps).to(dtype).contiguous().numpy()
    i = inds.reshape(b * hd, q * nk, 3).to(torch.int32).contiguous().numpy()
    out = np.zeros((b * hd, t, c, h + ps - 1, w + ps - 1), dtype=p.dtype)
    if q * nk > 0:
        _scatter(p, i, ps, out)
    return unpad_add(out, (b, hd, t, c, h, w), ps, border).to(patches.dtype).contiguous()


def applies(device: torch.device, pt: int, dilation: int, *positions) -> bool:
    """Whether the fused CPU kernels run: numba, CPU, pt == 1, dilation == 1, whole positions."""
    return (
        AVAILABLE
        and device.type == "cpu"
        and pt == 1
        and dilation == 1
        and all(x is None or not x.is_floating_point() for x in positions)
    )


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = 1


@contextlib.contextmanager
def torch_threads_quiet(device: torch.device):
    """Run torch's CPU ops on the calling thread only, for a pipeline of fused kernels.

    numba's kernels run on numba's thread pool and torch's ops on torch's OpenMP pool; after
    each parallel op, OpenMP's idle threads keep spinning on their cores for a while, so the
    next numba kernel shares the cores with them (on 2 cores, a 2-4x slowdown). The torch ops
    between the kernels are small (weights, padding, adding into the output), so running them
    on one thread costs little and leaves the cores to numba. torch's thread count is global:
    the first entrant sets it to 1, the last one out restores it (safe across threads). A no-op
    unless the fused CPU kernels run on ``device``.
    """
    global _quiet_depth, _quiet_saved
    if not (AVAILABLE and fused_cpu(device)):
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                torch.set_num_threads(_quiet_saved)
