"""Independent oracles: the contract written as plain Python loops over float64 numpy arrays.

Nothing here imports dnls; every rule (borders, bilinear reads, window sliding, flows, ties,
self matches) is restated from the contract so the library is checked against a second reading.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np


def reflect(i: int, n: int) -> int:
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def pixel(vid: np.ndarray, b: int, c: int, t: int, h: float, w: float, border: str) -> float:
    """``vid`` is ``(B, T, C, H, W)``; ``(h, w)`` may be fractional (bilinear)."""
    nt, nh, nw = vid.shape[1], vid.shape[3], vid.shape[4]

    def whole(tt: int, hh: int, ww: int) -> float:
        if border == "zero":
            if not (0 <= tt < nt and 0 <= hh < nh and 0 <= ww < nw):
                return 0.0
            return float(vid[b, tt, c, hh, ww])
        return float(vid[b, reflect(tt, nt), c, reflect(hh, nh), reflect(ww, nw)])

    h0, w0 = math.floor(h), math.floor(w)
    fh, fw = h - h0, w - w0
    total = 0.0
    for hh, wh in ((h0, 1 - fh), (h0 + 1, fh)):
        for ww, wgt in ((w0, 1 - fw), (w0 + 1, fw)):
            if wh * wgt != 0:
                total += wh * wgt * whole(t, hh, ww)
    return total


def patch(vid, b, chans, pos, ps, pt, dilation, border) -> np.ndarray:
    """``(pt, len(chans), ps, ps)`` patch at ``pos = (t, h, w)``."""
    t, h, w = pos
    out = np.zeros((pt, len(chans), ps, ps))
    for dt in range(pt):
        for ci, c in enumerate(chans):
            for i in range(ps):
                for j in range(ps):
                    hh = h + (i - ps // 2) * dilation
                    ww = w + (j - ps // 2) * dilation
                    out[dt, ci, i, j] = pixel(vid, b, c, int(t) + dt, hh, ww, border)
    return out


FLOAT32_MAX = float(np.finfo(np.float32).max)


def rank(key: float, top: float) -> float:
    """A search key as the library's selection compares it: ``+inf`` at or past ``top`` (or
    NaN), ``-inf`` at or below ``-top``."""
    if not key < top:
        return math.inf
    return -math.inf if key <= -top else key


def grid_positions(thw, stride, region=None):
    nt, nh, nw = thw
    t0, t1, h0, h1, w0, w1 = region or (0, nt, 0, nh, 0, nw)
    return [
        (t, h, w)
        for t in range(t0, t1)
        for h in range(h0, h1, stride)
        for w in range(w0, w1, stride)
    ]


def search(
    qvid,
    kvid,
    *,
    ws,
    wt,
    ps,
    pt,
    k,
    dist,
    stride0,
    stride1,
    dilation,
    nheads,
    flows,
    region,
    self_match,
    border,
    top=FLOAT32_MAX,
):
    """Returns ``(dists (B, HD, Q, K), inds (B, HD, Q, K, 3))``; ``flows`` is per window.
    Candidates rank by distance (l2) or minus the product (dot), ties by window order. ``top``
    is the largest finite value of the dtype the library sums in (float32 for every input but
    float64): a key at or past it, or NaN, ranks last, tied with every other such key, and a
    key at or below ``-top`` (minus infinity there) ties with the others that are. With ``k``
    given, the results ranked last that way are reported infinitely far (+inf for l2, -inf
    for dot)."""
    bsz, nt, nc, nh, nw = qvid.shape
    cph = nc // nheads
    nslots = 2 * wt + 1
    queries = grid_positions((nt, nh, nw), stride0, region)
    all_d, all_i = [], []
    for b in range(bsz):
        hd_d, hd_i = [], []
        for hd in range(nheads):
            chans = list(range(hd * cph, (hd + 1) * cph))

            @cache
            def kpatch(pos, chans=tuple(chans), b=b):
                return patch(kvid, b, chans, pos, ps, pt, dilation, border)

            def distance(a, c):
                return float(((a - c) ** 2).sum()) if dist == "l2" else float((a * c).sum())

            q_d, q_i = [], []
            for t, h, w in queries:
                t0 = min(max(t - wt, 0), nt - nslots)
                cands = []
                for s in range(nslots):
                    tf = t0 + s
                    ch, cw = h, w
                    if flows is not None and tf != t:
                        ch = h + flows[b, t, s, 0, h, w]
                        cw = w + flows[b, t, s, 1, h, w]
                    lo = (ws // 2) * stride1
                    ch = min(max(ch, lo), nh - 1 - (ws - 1 - ws // 2) * stride1)
                    cw = min(max(cw, lo), nw - 1 - (ws - 1 - ws // 2) * stride1)
                    for a in range(ws):
                        for c in range(ws):
                            cands.append(
                                (tf, ch + (a - ws // 2) * stride1, cw + (c - ws // 2) * stride1)
                            )
                qp = patch(qvid, b, chans, (t, h, w), ps, pt, dilation, border)
                ds = [distance(qp, kpatch(c)) for c in cands]
                sign = 1 if dist == "l2" else -1
                own = [c == (t, h, w) for c in cands]
                order = list(range(len(cands)))
                if self_match != "keep":
                    order = [j for j in order if not own[j]]
                keys = [rank(sign * d, top) for d in ds]
                if k is not None:
                    order = sorted(order, key=lambda j: (keys[j], j))
                    order = order[: (k - 1 if self_match == "anchor" else k)]
                # a selected key ranked last for not being finite is infinitely far
                far = [k is not None and keys[j] == math.inf for j in order]
                res_d = [sign * math.inf if f else ds[j] for j, f in zip(order, far, strict=True)]
                res_i = [cands[j] for j in order]
                if self_match == "anchor":
                    res_d.insert(0, distance(qp, kpatch((t, h, w))))
                    res_i.insert(0, (t, h, w))
                q_d.append(res_d)
                q_i.append(res_i)
            hd_d.append(q_d)
            hd_i.append(q_i)
        all_d.append(hd_d)
        all_i.append(hd_i)
    return np.array(all_d, dtype=np.float64), np.array(all_i, dtype=np.float64)


def gather(vid, inds, *, ps, pt, dilation, nheads, border):
    """``inds (B, HD, Q, K, 3)`` -> ``(B, HD, Q, K, pt, C', ps, ps)``."""
    bsz, hds, nq, nk, _ = inds.shape
    cph = vid.shape[2] // nheads
    out = np.zeros((bsz, hds, nq, nk, pt, cph, ps, ps))
    for b in range(bsz):
        for hd in range(hds):
            chans = list(range(hd * cph, (hd + 1) * cph))
            for q in range(nq):
                for j in range(nk):
                    pos = tuple(float(v) for v in inds[b, hd, q, j])
                    out[b, hd, q, j] = patch(vid, b, chans, pos, ps, pt, dilation, border)
    return out


def accumulate_flows(fflow, bflow, wt):
    """Per-window flows from a frame-to-next / frame-to-previous pair, by following them."""
    bsz, nt, _, nh, nw = fflow.shape
    nslots = 2 * wt + 1
    out = np.zeros((bsz, nt, nslots, 2, nh, nw))

    def sample(f, b, u, h, w):
        h = min(max(h, 0.0), nh - 1.0)
        w = min(max(w, 0.0), nw - 1.0)
        h0, w0 = int(math.floor(h)), int(math.floor(w))
        fh, fw = h - h0, w - w0
        h1, w1 = min(h0 + 1, nh - 1), min(w0 + 1, nw - 1)
        return [
            (1 - fh) * (1 - fw) * f[b, u, c, h0, w0]
            + (1 - fh) * fw * f[b, u, c, h0, w1]
            + fh * (1 - fw) * f[b, u, c, h1, w0]
            + fh * fw * f[b, u, c, h1, w1]
            for c in range(2)
        ]

    for b in range(bsz):
        for t in range(nt):
            t0 = min(max(t - wt, 0), nt - nslots)
            for h in range(nh):
                for w in range(nw):
                    for target in range(t0, t0 + nslots):
                        ph, pw = float(h), float(w)
                        u = t
                        while u != target:
                            step = 1 if target > u else -1
                            d = sample(fflow if step == 1 else bflow, b, u, ph, pw)
                            ph, pw = ph + d[0], pw + d[1]
                            u += step
                        out[b, t, target - t0, :, h, w] = (ph - h, pw - w)
    return out
