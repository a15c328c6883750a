"""Fused CPU kernels (numba) for whole-pixel positions: search, wpsum and scatter.

Why numba. The reference path builds every candidate patch with ``index_select`` and reduces
it: correct, but for a 512x512 image it spends seconds moving memory. A fused kernel must compute
distances straight from the pixels and keep only the ``k`` best in registers-sized buffers.
numba does that from Python source, ships as a wheel (no compiler on the user's machine, unlike
``torch.utils.cpp_extension`` or ``torch.compile``'s C++ backend), compiles once per dtype and
caches the machine code on disk (``cache=True``), and runs ``prange`` loops on every core. It is
optional: without it (or with ``DNLS_BACKEND=torch``) the reference path runs.

Scope: CPU tensors, whole-pixel positions (no flows or integer flows, integral ``stride1``),
``pt == 1``, ``dilation == 1``, ``k`` given. Anything else runs the reference path. The
backward passes always run the reference path.

Layout. A video is padded once per call to ``(BH, T, H + ps - 1, W + ps - 1, C)`` (channels
last, the border rule applied while padding), so the patch of pixel ``(y, x)`` is the block
``[y : y + ps, x : x + ps]`` and every read is in bounds.

Search, per row of queries (one ``prange`` item): for each candidate offset of the window, in
window order, the squared differences of the ``ps`` rows of the query and candidate rows are
summed down the rows into column sums (contiguous, vectorised), and a box sum of ``ps`` column
sums gives the distance of every query of the row at once; each distance is inserted into the
query's sorted top-k buffer (ties keep the earlier candidate, as the contract requires). Queries
whose window slides sideways at the left and right edges, and every query when flows move the
windows, take the direct path: one patch distance per candidate.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from .._ref import border_index

AVAILABLE = importlib.util.find_spec("numba") is not None

if AVAILABLE:
    import numba as nb

    _jit = nb.njit(cache=True, nogil=True, fastmath=False)
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


# ---------------------------------------------------------------------------------------------
# Padding: (B, HD, T, C, H, W) -> (B*HD, T, H + ps - 1, W + ps - 1, C), border rule applied.
# ---------------------------------------------------------------------------------------------


_NP = {torch.float32: np.float32, torch.float64: np.float64}


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pad(vid6: torch.Tensor, ps: int, border: str, frames=None, rows=None) -> np.ndarray:
    """Frames ``[f0, f1)`` and rows ``[y0, y1)`` (default all) of ``vid6``, padded by the
    patch and the border rule: ``(BH, f1 - f0, y1 - y0 + ps - 1, W + ps - 1, C)``."""
    b, hd, t, c, h, w = vid6.shape
    f0, f1 = frames if frames is not None else (0, t)
    y0, y1 = rows if rows is not None else (0, h)
    lo, hi = ps // 2, ps - 1 - ps // 2
    x = vid6.detach().reshape(b * hd, t, c, h, w)[:, f0:f1].permute(0, 1, 3, 4, 2)
    hidx, hval = border_index(torch.arange(y0 - lo, y1 + hi), h, border)
    widx, wval = border_index(torch.arange(-lo, w + hi), w, border)
    x = x[:, :, hidx][:, :, :, widx].to(kernel_dtype(vid6.dtype))
    if hval is not None:
        mask = (hval[:, None] & wval[None, :]).to(x.dtype)
        x = x * mask[None, None, :, :, None]
    return np.ascontiguousarray(x.numpy())


def unpad_add(padded: np.ndarray, shape6, ps: int, border: str) -> torch.Tensor:
    """The adjoint of :func:`pad`: fold a padded ``(BH, T, Hp, Wp, C)`` buffer into a video."""
    b, hd, t, _, h, w = shape6
    c = padded.shape[-1]
    lo, hi = ps // 2, ps - 1 - ps // 2
    x = torch.from_numpy(padded)
    hidx, hval = border_index(torch.arange(-lo, h + hi), h, border)
    widx, wval = border_index(torch.arange(-lo, w + hi), w, border)
    if hval is not None:
        x = x * (hval[:, None] & wval[None, :]).to(x.dtype)[None, None, :, :, None]
    out = x.new_zeros(b * hd, t, h, x.shape[3], c).index_add_(2, hidx, x)
    out = out.new_zeros(b * hd, t, h, w, c).index_add_(3, widx, out)
    return out.permute(0, 1, 4, 2, 3).reshape(b, hd, t, c, h, w)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


@_jit
def _insert(td, ti, m, kk, d, j):
    """Insert distance ``d`` of window index ``j`` into query ``m``'s ascending top-``kk``."""
    if not d < td[m, kk - 1]:
        return
    pos = kk - 1
    while pos > 0 and td[m, pos - 1] > d:
        td[m, pos] = td[m, pos - 1]
        ti[m, pos] = ti[m, pos - 1]
        pos -= 1
    td[m, pos] = d
    ti[m, pos] = j


@_jit
def _patch_key(q, k, qo, ko, ps, rowlen, c, is_dot):
    """Distance key of the patches at flat offsets ``qo`` of ``q`` and ``ko`` of ``k``
    (smaller is nearer): l2, or minus the dot product. ``rowlen``: elements of a padded row."""
    s = 0.0
    for i in range(ps):
        qa, ka = qo + i * rowlen, ko + i * rowlen
        for e in range(ps * c):
            if is_dot:
                s -= q[qa + e] * k[ka + e]
            else:
                diff = q[qa + e] - k[ka + e]
                s += diff * diff
    return s


@_jit
def _centre(flows, has_flows, bb, t, h, w, slot, own, lo, hi_h, hi_w):
    """Slid window centre of the query ``(t, h, w)`` in window slot ``slot``."""
    ch, cw = h, w
    if has_flows and slot != own:
        ch = h + flows[bb, t, slot, 0, h, w]
        cw = w + flows[bb, t, slot, 1, h, w]
    return min(max(ch, lo), hi_h), min(max(cw, lo), hi_w)


@_pjit
def search_rows(
    q,  # (BH * T * Hp * Wp * C,) flat padded queries video
    k,  # the same for the keys
    dims,  # (BH, T', H' + ps - 1, W + ps - 1, C): frames and rows of the padded band
    geo,  # (T, H, W, first frame, first row) of the video and of the band
    flows,  # (B, T, S, 2, H, W) int32 flows, or a dummy (1, 1, 1, 2, 1, 1)
    has_flows,  # whether flows move the windows
    rows,  # (R, 5) int64 rows of queries: t, h, first w, number of queries, first output
    hd,  # heads per batch entry (flows are per batch entry)
    s0,  # column spacing of the queries in a row (stride0)
    s1,  # spacing of the window grid (stride1, whole)
    ws,
    wt,
    ps,
    mode,  # KEEP, EXCLUDE or ANCHOR
    is_dot,
    out_d,  # (BH, N, K) distances
    out_w,  # (BH, N, K) int32 window indices (-1: the query itself, anchor)
    out_p,  # (BH, N, K, 3) int32 positions
):
    nbh, bframes, hp, wp, c = dims[0], dims[1], dims[2], dims[3], dims[4]
    nframes, height, width, f0, y0 = geo[0], geo[1], geo[2], geo[3], geo[4]
    rowlen = wp * c
    nslots = 2 * wt + 1
    nk = out_d.shape[2]
    first = 1 if mode == ANCHOR else 0
    kk = nk - first
    half = ws // 2
    lo = half * s1
    hi_h = height - 1 - (ws - 1 - half) * s1
    hi_w = width - 1 - (ws - 1 - half) * s1
    nrows = rows.shape[0]
    for item in prange(nbh * nrows):
        bh, r = item // nrows, item % nrows
        bb = bh // hd
        t, h, w0, n, o0 = rows[r, 0], rows[r, 1], rows[r, 2], rows[r, 3], rows[r, 4]
        t0 = min(max(t - wt, 0), nframes - nslots)
        own = t - t0
        kb = max(kk, 1)
        td = np.full((n, kb), np.inf, dtype=out_d.dtype)
        ti = np.zeros((n, kb), dtype=np.int32)
        qrow = ((bh * bframes + t - f0) * hp + h - y0) * rowlen  # flat offset of the query row
        # Queries of this row with an unslid horizontal window take the row path.
        m_lo, m_hi = 0, 0
        if not has_flows:
            m_lo = min(n, max(0, (lo - w0 + s0 - 1) // s0))
            m_hi = max(m_lo, min(n, (hi_w - w0) // s0 + 1))
        if kk > 0 and m_hi > m_lo:
            ch = min(max(h, lo), hi_h)
            xa = w0 + m_lo * s0  # first padded column of the first row-path query
            xb = w0 + (m_hi - 1) * s0 + ps  # one past the last padded column
            ne = (xb - xa) * c
            colsum = np.empty(ne, dtype=out_d.dtype)
            cs = np.empty(xb - xa, dtype=out_d.dtype)
            for slot in range(nslots):
                tk = t0 + slot
                for a in range(ws):
                    yk = ch + (a - half) * s1
                    krow = ((bh * bframes + tk - f0) * hp + yk - y0) * rowlen
                    for b in range(ws):
                        dx = (b - half) * s1
                        colsum[:] = 0
                        for i in range(ps):
                            qa = qrow + i * rowlen + xa * c
                            ka = krow + i * rowlen + (xa + dx) * c
                            if is_dot:
                                for e in range(ne):
                                    colsum[e] -= q[qa + e] * k[ka + e]
                            else:
                                for e in range(ne):
                                    diff = q[qa + e] - k[ka + e]
                                    colsum[e] += diff * diff
                        for x in range(xb - xa):
                            s = colsum[x * c]
                            for cc in range(1, c):
                                s += colsum[x * c + cc]
                            cs[x] = s
                        j = (slot * ws + a) * ws + b
                        skip_own = mode != KEEP and slot == own and yk == h and dx == 0
                        if skip_own:
                            continue  # every row-path query would meet itself here
                        for m in range(m_lo, m_hi):
                            x0 = (m - m_lo) * s0
                            d = cs[x0]
                            for jj in range(1, ps):
                                d += cs[x0 + jj]
                            if d < td[m, kk - 1]:
                                _insert(td, ti, m, kk, d, j)
        # Direct path: queries whose window slid sideways, or every query with flows.
        for m in range(n):
            if kk == 0 or (m >= m_lo and m < m_hi):
                continue
            w = w0 + m * s0
            for slot in range(nslots):
                tk = t0 + slot
                ch, cw = _centre(flows, has_flows, bb, t, h, w, slot, own, lo, hi_h, hi_w)
                for a in range(ws):
                    yk = ch + (a - half) * s1
                    for b in range(ws):
                        xk = cw + (b - half) * s1
                        if mode != KEEP and slot == own and yk == h and xk == w:
                            continue
                        ko = (((bh * bframes + tk - f0) * hp + yk - y0) * wp + xk) * c
                        d = _patch_key(q, k, qrow + w * c, ko, ps, rowlen, c, is_dot)
                        _insert(td, ti, m, kk, d, (slot * ws + a) * ws + b)
        # Write the results in final order, with their positions.
        for m in range(n):
            w = w0 + m * s0
            o = o0 + m
            if first == 1:
                d = _patch_key(q, k, qrow + w * c, qrow + w * c, ps, rowlen, c, is_dot)
                out_d[bh, o, 0] = -d if is_dot else d
                out_w[bh, o, 0] = -1
                out_p[bh, o, 0, 0] = t
                out_p[bh, o, 0, 1] = h
                out_p[bh, o, 0, 2] = w
            for i in range(kk):
                j = ti[m, i]
                slot, a, b = j // (ws * ws), (j // ws) % ws, j % ws
                ch, cw = _centre(flows, has_flows, bb, t, h, w, slot, own, lo, hi_h, hi_w)
                d = td[m, i]
                out_d[bh, o, first + i] = -d if is_dot else d
                out_w[bh, o, first + i] = j
                out_p[bh, o, first + i, 0] = t0 + slot
                out_p[bh, o, first + i, 1] = ch + (a - half) * s1
                out_p[bh, o, first + i, 2] = cw + (b - half) * s1


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


def search(qvid, kvid, flows, p, grid):
    """Fused search on CPU tensors: ``(dists, inds, widx)`` as the reference returns them."""
    b, hd, nframes, c, height, width = qvid.shape
    nk = p.nk
    dists = np.empty((b * hd, p.count, nk), dtype=_NP[kernel_dtype(qvid.dtype)])
    widx = np.empty((b * hd, p.count, nk), dtype=np.int32)
    inds = np.empty((b * hd, p.count, nk, 3), dtype=np.int32)
    shape = (b, hd, p.count, nk)
    if p.count == 0:
        return (
            torch.from_numpy(dists).view(shape).to(qvid.dtype),
            torch.from_numpy(inds).view(*shape, 3),
            torch.from_numpy(widx).view(shape),
        )
    rows = query_rows(grid, p.start, p.count)
    # Only the frames and rows the batch can reach are padded (all of them with flows).
    reach = (p.ws - 1) * int(p.stride1)
    f0 = max(0, int(rows[0, 0]) - 2 * p.wt)
    f1 = min(nframes, int(rows[-1, 0]) + 2 * p.wt + 1)
    y0, y1 = 0, height
    if flows is None:
        y0 = max(0, int(rows[:, 1].min()) - reach)
        y1 = min(height, int(rows[:, 1].max()) + reach + 1)
    q = pad(qvid, p.ps, p.border, (f0, f1), (y0, y1))
    same = kvid.data_ptr() == qvid.data_ptr() and kvid.stride() == qvid.stride()
    same = same and kvid.dtype == qvid.dtype
    k = q if same else pad(kvid, p.ps, p.border, (f0, f1), (y0, y1))
    if flows is None:
        f = np.zeros((1, 1, 1, 2, 1, 1), dtype=np.int32)
    else:
        f = np.ascontiguousarray(flows.to(torch.int32).numpy())
    search_rows(
        q.reshape(-1),
        k.reshape(-1),
        np.array(q.shape, dtype=np.int64),
        np.array([nframes, height, width, f0, y0], dtype=np.int64),
        f,
        flows is not None,
        rows,
        hd,
        grid.stride,
        int(p.stride1),
        p.ws,
        p.wt,
        p.ps,
        SELF_MODES[p.self_match],
        p.dist == "dot",
        dists,
        widx,
        inds,
    )
    return (
        torch.from_numpy(dists).view(shape).to(qvid.dtype),
        torch.from_numpy(inds).view(*shape, 3),
        torch.from_numpy(widx).view(shape),
    )


# ---------------------------------------------------------------------------------------------
# wpsum and scatter
# ---------------------------------------------------------------------------------------------


@_pjit
def _wpsum(v, dims, org, weights, inds, ps, out):
    """``out[bh, q] = sum_k weights[bh, q, k] * patch(v, inds[bh, q, k])``, ``(C, ps, ps)``;
    ``v`` is the flat padded video of shape ``dims``."""
    nbh, nq, nk = weights.shape
    nframes, hp, wp, c = dims[1], dims[2], dims[3], dims[4]
    rowlen = wp * c
    pc = ps * c
    for item in prange(nbh * nq):
        bh, qi = item // nq, item % nq
        acc = np.zeros(ps * pc, dtype=out.dtype)
        for j in range(nk):
            wgt = weights[bh, qi, j]
            t, y, x = inds[bh, qi, j, 0], inds[bh, qi, j, 1], inds[bh, qi, j, 2]
            base = (((bh * nframes + t - org[0]) * hp + y - org[1]) * wp + x) * c
            for i in range(ps):
                for e in range(pc):
                    acc[i * pc + e] += wgt * v[base + i * rowlen + e]
        for i in range(ps):
            for jj in range(ps):
                for cc in range(c):
                    out[bh, qi, cc, i, jj] = acc[i * pc + jj * c + cc]


@_jit
def _scatter(patches, inds, ps, out):
    """Add ``patches`` ``(BH, N, C, ps, ps)`` at ``inds`` ``(BH, N, 3)`` into padded ``out``."""
    nbh, n = inds.shape[0], inds.shape[1]
    c = out.shape[-1]
    for bh in range(nbh):
        for qi in range(n):
            t, y, x = inds[bh, qi, 0], inds[bh, qi, 1], inds[bh, qi, 2]
            for i in range(ps):
                for jj in range(ps):
                    for cc in range(c):
                        out[bh, t, y + i, x + jj, cc] += patches[bh, qi, cc, i, jj]


@_jit
def _fold(patches, pos, ps, out, cnt):
    """Add ``patches`` ``(B, Q, C, ps, ps)`` at the grid positions ``pos`` ``(Q, 3)`` into the
    padded ``out`` ``(B, T, Hp, Wp, C)``; count the additions in ``cnt`` ``(T, Hp, Wp)``."""
    nb, nq, c = patches.shape[0], patches.shape[1], patches.shape[2]
    for qi in range(nq):
        t, y, x = pos[qi, 0], pos[qi, 1], pos[qi, 2]
        for i in range(ps):
            for jj in range(ps):
                cnt[t, y + i, x + jj] += 1.0
                for bb in range(nb):
                    for cc in range(c):
                        out[bb, t, y + i, x + jj, cc] += patches[bb, qi, cc, i, jj]


def fold(patches, pos, shape, border: str):
    """``ifold`` of patches ``(B, Q, 1, C, ps, ps)`` at int grid positions ``pos`` ``(Q, 3)``:
    ``(vid (B, T, C, H, W), counts (B, T, 1, H, W))``."""
    b, q, _, c, ps, _ = patches.shape
    _, t, _, h, w = shape
    dtype = kernel_dtype(patches.dtype)
    p = np.ascontiguousarray(patches.detach().reshape(b, q, c, ps, ps).to(dtype).numpy())
    out = np.zeros((b, t, h + ps - 1, w + ps - 1, c), dtype=p.dtype)
    cnt = np.zeros((1, t, h + ps - 1, w + ps - 1, 1), dtype=p.dtype)
    if q > 0:
        _fold(p, np.ascontiguousarray(pos.to(torch.int32).numpy()), ps, out, cnt[0, ..., 0])
    vid = unpad_add(out, (b, 1, t, c, h, w), ps, border)[:, 0].to(patches.dtype)
    counts = unpad_add(cnt, (1, 1, t, 1, h, w), ps, border)[:, 0]
    return vid.contiguous(), counts.expand(b, t, 1, h, w).contiguous()


def wpsum(vid6, weights, inds, ps: int, border: str) -> torch.Tensor:
    """``(B, HD, Q, 1, C, ps, ps)`` weighted patch sums (pt == 1, dilation == 1, int inds)."""
    b, hd, _, c, _, _ = vid6.shape
    q, nk = inds.shape[2], inds.shape[3]
    t_lo = h_lo = 0
    t_hi, h_hi = vid6.shape[2], vid6.shape[4]
    if inds.numel() > 0:
        t_lo, t_hi = int(inds[..., 0].min()), int(inds[..., 0].max()) + 1
        h_lo, h_hi = int(inds[..., 1].min()), int(inds[..., 1].max()) + 1
    v = pad(vid6, ps, border, (t_lo, t_hi), (h_lo, h_hi))
    dtype = kernel_dtype(torch.promote_types(vid6.dtype, weights.dtype))
    w = np.ascontiguousarray(weights.detach().reshape(b * hd, q, nk).to(dtype).numpy())
    i = np.ascontiguousarray(inds.reshape(b * hd, q, nk, 3).to(torch.int32).numpy())
    out = np.empty((b * hd, q, c, ps, ps), dtype=w.dtype)
    if q > 0:
        dims = np.array(v.shape, dtype=np.int64)
        org = np.array([t_lo, h_lo], dtype=np.int64)
        _wpsum(v.astype(w.dtype, copy=False).reshape(-1), dims, org, w, i, ps, out)
    result = torch.from_numpy(out).view(b, hd, q, 1, c, ps, ps)
    return result.to(torch.promote_types(vid6.dtype, weights.dtype))


def scatter(patches, inds, shape6, border: str) -> torch.Tensor:
    """Add patches ``(B, HD, Q, K, 1, C, ps, ps)`` at int ``inds`` into a zero video."""
    b, hd, q, nk = inds.shape[:4]
    c, ps = patches.shape[5], patches.shape[6]
    _, _, t, _, h, w = shape6
    dtype = kernel_dtype(patches.dtype)
    p = patches.detach().reshape(b * hd, q * nk, c, ps, ps).to(dtype).numpy()
    i = np.ascontiguousarray(inds.reshape(b * hd, q * nk, 3).to(torch.int32).numpy())
    out = np.zeros((b * hd, t, h + ps - 1, w + ps - 1, c), dtype=p.dtype)
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

