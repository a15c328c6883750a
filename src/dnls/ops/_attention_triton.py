"""Triton kernels for fused neighbourhood attention of pixels (``ps = pt = 1``, ``k=None``, no
flows, ``stride1 = 1``): scores, softmax and the weighted sum in one pass, and a backward
without atomics.

Imported only when the Triton backend runs, so ``import dnls`` never needs Triton.

Window of the query at ``(t, y, x)`` (as :func:`dnls.search`; the launcher checks that it fits
the video): frames ``t0 .. t0 + S - 1`` with ``t0 = clamp(t - wt, 0, T - S)``, ``S = 2 wt + 1``;
rows ``y0 .. y0 + ws - 1`` with ``y0 = clamp(y - ws // 2, 0, H - ws)``; columns likewise. So
every candidate is inside the video and no border rule is needed.

Forward, per query ``i`` and candidate ``j`` of its window (``z`` the logits):

    z_ij = scale <q_i, k_j>  (dot)   or  -scale |q_i - k_j|^2  (l2)
    P_ij = exp(z_ij - L_i),   L_i = logsumexp_j z_ij,   o_i = sum_j P_ij v_j

computed online in base 2 (``exp2``, logits times log2 e), one rescale of the running sum per
window row. ``L`` is stored (natural log) for the backward.

Backward, with ``g_i = dLoss/do_i`` and ``gL_i = dLoss/dL_i``:

    dP_ij = <g_i, v_j>,   D_i = <g_i, o_i> - gL_i,   dz_ij = P_ij (dP_ij - D_i)
    dq_i = sum_j dz_ij dz/dq        dz/dq = scale k_j  (dot)   or  -2 scale (q_i - k_j)  (l2)
    dk_j = sum_i dz_ij dz/dk        dz/dk = scale q_i  (dot)   or   2 scale (q_i - k_j)  (l2)
    dv_j = sum_i P_ij g_i

``dq`` walks each query's window; ``dk`` and ``dv`` walk each key's inverse window, the queries
whose window holds it. ``t0(t)`` is non-decreasing in ``t`` (likewise rows and columns), so
the inverse of a window axis is an interval: for ``n`` positions around ``h = n // 2`` on an
axis of length ``N``, key ``j`` is in the windows of queries

    i_lo = 0 if j <= n - 1 else j - n + 1 + h,      i_hi = N - 1 if j >= N - n else j + h

Every output element is a sum computed by one lane, so the backward needs no atomics and gives
the same bits on every run.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .._common import cuda_launch, next_power_of_2
from ._layout import channels_inner

LOG2E = 1.4426950408889634

# Launch configuration on CUDA, per kernel (forward, dq, dk/dv): queries (keys) per program
# and warps. Defaults: the best of the sweep (`benchmarks/attention.py --sweep`, BENCHMARKS.md);
# dq on 2 warps instead of 4 took forward+backward from 4.96 to 4.32 ms.
CONFIG = {
    "fwd_block": 32, "fwd_warps": 4, "dq_block": 32, "dq_warps": 2,
    "dkv_block": 32, "dkv_warps": 4,
}  # fmt: skip


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """A float argument passed as two float32 (Triton passes float scalars as float32); in
    float32 the sum rounds to ``hi``."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _start(i, N, n, h):
    """First position of the window of ``n`` around ``i`` (half-width ``h``), slid inward."""
    return tl.minimum(tl.maximum(i - h, 0), N - n)


@triton.jit
def _inverse(j, N, n, h):
    """The interval ``[lo, hi]`` of positions whose window (of ``n`` around them) holds ``j``."""
    lo = tl.where(j <= n - 1, 0, j - n + 1 + h)
    hi = tl.where(j >= N - n, N - 1, j + h)
    return lo, hi


@triton.jit
def _program(HD, H, W, C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr):
    """The pixels of program ``(x block, t * H + y, b * HD + hd)``: ``(bh, b, hd, t, y, x, c,
    xm, cm)`` with ``x`` the BLOCK columns (those past the row, masked by ``xm``, repeat its
    last one), ``c`` the CP channel slots and ``cm`` (shape ``(1, CP)``) the real ones."""
    ty = tl.program_id(1)
    bh = tl.program_id(2)
    x = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.arange(0, CP)
    xm = x < W
    return bh, bh // HD, bh % HD, ty // H, ty % H, tl.where(xm, x, W - 1), c, xm, (c < C)[None, :]


@triton.jit
def _logit(qv, kv, qk_scale, DOT: tl.constexpr):
    """Logits in base 2 (times log2 e) of each lane's query against its key: ``qv`` is
    pre-multiplied by ``qk_scale`` for dot, not for l2."""
    if DOT:
        return tl.sum(qv * kv, 1)
    d = qv - kv
    return -tl.sum(d * d, 1) * qk_scale


@triton.jit
def _row(ptr, b, hd, t, y, s_b, s_h, s_t, s_y):
    """Pointer to row ``y`` of frame ``t`` of slice ``(b, hd)`` (scalars; int64 offsets)."""
    return (
        ptr + tl.cast(b, tl.int64) * s_b + tl.cast(hd, tl.int64) * s_h
        + tl.cast(t, tl.int64) * s_t + tl.cast(y, tl.int64) * s_y
    )  # fmt: skip


@triton.jit
def _tile(row, x, s_x, c, s_c, mask, ACC: tl.constexpr):
    """The ``(lanes, channels)`` values at columns ``x`` of a row, as ACC (zero where
    masked)."""
    return tl.load(row + x[:, None] * s_x + c[None, :] * s_c, mask=mask, other=0.0).to(ACC)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, HD, T, C, H, W), strides below
    o_ptr,  # (B, HD, T, C, H, W) output, strides below
    lse_ptr,  # (B, HD, T, H, W) in ACC, contiguous: the logsumexp in base 2
    HD, T, H, W, WT,
    sq_b, sq_h, sq_t, sq_c, sq_y, sq_x,
    sk_b, sk_h, sk_t, sk_c, sk_y, sk_x,
    sv_b, sv_h, sv_t, sv_c, sv_y, sv_x,
    so_b, so_h, so_t, so_c, so_y, so_x,
    qk_hi, qk_lo,  # scale * log2(e) as a sum of two float32 (exact enough for float64)
    WS: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, DOT: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK queries of one row of one frame of one (batch, head) per program, one query per
    lane (its channels along the second axis)."""
    qk_scale = _scalar(qk_hi, qk_lo, ACC)
    bh, b, hd, t, y, x, c, xm, cm = _program(HD, H, W, C, CP, BLOCK)
    m2 = xm[:, None] & cm
    qv = _tile(_row(q_ptr, b, hd, t, y, sq_b, sq_h, sq_t, sq_y), x, sq_x, c, sq_c, m2, ACC)
    if DOT:
        qv = qv * qk_scale
    S = 2 * WT + 1
    t0 = _start(t, T, S, WT)
    y0 = _start(y, H, WS, WS // 2)
    x0 = _start(x, W, WS, WS // 2)
    m_i = tl.full((BLOCK,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK,), ACC)
    acc = tl.zeros((BLOCK, CP), ACC)
    for s in range(S):
        for a in range(WS):
            krow = _row(k_ptr, b, hd, t0 + s, y0 + a, sk_b, sk_h, sk_t, sk_y)
            vrow = _row(v_ptr, b, hd, t0 + s, y0 + a, sv_b, sv_h, sv_t, sv_y)
            # the logits of the window row's WS candidates, then one rescale for all of them
            z = ()
            for bb in tl.static_range(WS):
                z = z + (_logit(qv, _tile(krow, x0 + bb, sk_x, c, sk_c, m2, ACC), qk_scale, DOT),)
            m_row = z[0]
            for bb in tl.static_range(1, WS):
                m_row = tl.maximum(m_row, z[bb])
            m_new = tl.maximum(m_i, m_row)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            for bb in tl.static_range(WS):
                p = tl.exp2(z[bb] - m_new)
                l_i += p
                acc += p[:, None] * _tile(vrow, x0 + bb, sv_x, c, sv_c, m2, ACC)
            m_i = m_new
    out = acc / l_i[:, None]
    orow = _row(o_ptr, b, hd, t, y, so_b, so_h, so_t, so_y)
    tl.store(orow + x[:, None] * so_x + c[None, :] * so_c, out.to(o_ptr.dtype.element_ty), mask=m2)
    lrow = lse_ptr + (bh.to(tl.int64) * T + t) * H * W + y * W
    tl.store(lrow + x, (m_i + tl.log2(l_i)).to(lse_ptr.dtype.element_ty), mask=xm)


@triton.jit
def _attn_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr,  # (B, HD, T, C, H, W): q, k, v, dLoss/dout; strides below
    lse_ptr, delta_ptr,  # (B, HD, T, H, W) in ACC, contiguous: L in base 2, and D
    dq_ptr,  # (B, HD, T, C, H, W) output, strides so_*
    HD, T, H, W, WT,
    sq_b, sq_h, sq_t, sq_c, sq_y, sq_x,
    sk_b, sk_h, sk_t, sk_c, sk_y, sk_x,
    sv_b, sv_h, sv_t, sv_c, sv_y, sv_x,
    sg_b, sg_h, sg_t, sg_c, sg_y, sg_x,
    so_b, so_h, so_t, so_c, so_y, so_x,  # of the outputs
    scale_hi, scale_lo, qk_hi, qk_lo,  # scale and scale * log2(e), each as two float32
    WS: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, DOT: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dq: BLOCK queries of one row per program; each lane walks its query's window."""
    qk_scale = _scalar(qk_hi, qk_lo, ACC)
    bh, b, hd, t, y, x, c, xm, cm = _program(HD, H, W, C, CP, BLOCK)
    m2 = xm[:, None] & cm
    qrow = _row(q_ptr, b, hd, t, y, sq_b, sq_h, sq_t, sq_y)
    qv = _tile(qrow, x, sq_x, c, sq_c, m2, ACC)
    qs = qv * qk_scale if DOT else qv
    gv = _tile(_row(g_ptr, b, hd, t, y, sg_b, sg_h, sg_t, sg_y), x, sg_x, c, sg_c, m2, ACC)
    pix = (bh.to(tl.int64) * T + t) * H * W + y * W + x
    lse2 = tl.load(lse_ptr + pix).to(ACC)
    delta = tl.load(delta_ptr + pix).to(ACC)
    S = 2 * WT + 1
    t0 = _start(t, T, S, WT)
    y0 = _start(y, H, WS, WS // 2)
    x0 = _start(x, W, WS, WS // 2)
    dq = tl.zeros((BLOCK, CP), ACC)
    for s in range(S):
        for a in range(WS):
            krow = _row(k_ptr, b, hd, t0 + s, y0 + a, sk_b, sk_h, sk_t, sk_y)
            vrow = _row(v_ptr, b, hd, t0 + s, y0 + a, sv_b, sv_h, sv_t, sv_y)
            for bb in tl.static_range(WS):
                kv = _tile(krow, x0 + bb, sk_x, c, sk_c, m2, ACC)
                p = tl.exp2(_logit(qs, kv, qk_scale, DOT) - lse2)
                dz = p * (tl.sum(gv * _tile(vrow, x0 + bb, sv_x, c, sv_c, m2, ACC), 1) - delta)
                dq += dz[:, None] * (kv if DOT else qv - kv)
    scale = _scalar(scale_hi, scale_lo, ACC)
    dq = dq * (scale if DOT else -2 * scale)
    drow = _row(dq_ptr, b, hd, t, y, so_b, so_h, so_t, so_y)
    tl.store(drow + x[:, None] * so_x + c[None, :] * so_c, dq.to(dq_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _attn_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr,  # (B, HD, T, C, H, W): q, k, v, dLoss/dout; strides below
    lse_ptr, delta_ptr,  # (B, HD, T, H, W) in ACC, contiguous: L in base 2, and D
    dk_ptr, dv_ptr,  # (B, HD, T, C, H, W) outputs, strides so_*
    HD, T, H, W, WT,
    sq_b, sq_h, sq_t, sq_c, sq_y, sq_x,
    sk_b, sk_h, sk_t, sk_c, sk_y, sk_x,
    sv_b, sv_h, sv_t, sv_c, sv_y, sv_x,
    sg_b, sg_h, sg_t, sg_c, sg_y, sg_x,
    so_b, so_h, so_t, so_c, so_y, so_x,  # of the outputs
    scale_hi, scale_lo, qk_hi, qk_lo,  # scale and scale * log2(e), each as two float32
    WS: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, DOT: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dk and dv: BLOCK keys of one row per program; each lane walks its key's inverse window
    (an interval per axis; the frames and rows are the same for the whole program)."""
    qk_scale = _scalar(qk_hi, qk_lo, ACC)
    bh, b, hd, t, y, x, c, xm, cm = _program(HD, H, W, C, CP, BLOCK)
    m2 = xm[:, None] & cm
    krow = _row(k_ptr, b, hd, t, y, sk_b, sk_h, sk_t, sk_y)
    vrow = _row(v_ptr, b, hd, t, y, sv_b, sv_h, sv_t, sv_y)
    kv = _tile(krow, x, sk_x, c, sk_c, m2, ACC)
    vv = _tile(vrow, x, sv_x, c, sv_c, m2, ACC)
    S = 2 * WT + 1
    t_lo, t_hi = _inverse(t, T, S, WT)
    y_lo, y_hi = _inverse(y, H, WS, WS // 2)
    x_lo, x_hi = _inverse(x, W, WS, WS // 2)
    nx = tl.max(tl.where(xm, x_hi - x_lo + 1, 0), 0)
    dk = tl.zeros((BLOCK, CP), ACC)
    dv = tl.zeros((BLOCK, CP), ACC)
    dz_sum = tl.zeros((BLOCK,), ACC)
    for tq in range(t_lo, t_hi + 1):
        for yq in range(y_lo, y_hi + 1):
            qrow = _row(q_ptr, b, hd, tq, yq, sq_b, sq_h, sq_t, sq_y)
            grow = _row(g_ptr, b, hd, tq, yq, sg_b, sg_h, sg_t, sg_y)
            pix = (bh.to(tl.int64) * T + tq) * H * W + yq * W
            for o in range(nx):
                xq = x_lo + o
                ok = xm & (xq <= x_hi)
                xq = tl.where(ok, xq, x)
                mq = ok[:, None] & cm
                qv = _tile(qrow, xq, sq_x, c, sq_c, mq, ACC)
                gv = _tile(grow, xq, sg_x, c, sg_c, mq, ACC)
                lse2 = tl.load(lse_ptr + pix + xq, mask=ok, other=0.0).to(ACC)
                delta = tl.load(delta_ptr + pix + xq, mask=ok, other=0.0).to(ACC)
                qs = qv * qk_scale if DOT else qv
                p = tl.where(ok, tl.exp2(_logit(qs, kv, qk_scale, DOT) - lse2), 0.0)
                dz = p * (tl.sum(gv * vv, 1) - delta)
                dv += p[:, None] * gv
                dk += dz[:, None] * qv
                dz_sum += dz
    scale = _scalar(scale_hi, scale_lo, ACC)
    if DOT:
        dk = dk * scale
    else:
        dk = (dk - dz_sum[:, None] * kv) * (2 * scale)
    offs = x[:, None] * so_x + c[None, :] * so_c
    tl.store(_row(dk_ptr, b, hd, t, y, so_b, so_h, so_t, so_y) + offs,
             dk.to(dk_ptr.dtype.element_ty), mask=m2)  # fmt: skip
    tl.store(_row(dv_ptr, b, hd, t, y, so_b, so_h, so_t, so_y) + offs,
             dv.to(dv_ptr.dtype.element_ty), mask=m2)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers. Videos are head-split (B, HD, T, C, H, W); any strides, read channels-last.
# ---------------------------------------------------------------------------------------------


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc(*vids: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in vids) else torch.float32


def _split(x: float) -> tuple[float, float]:
    """``x`` as ``hi + lo``, two float32 values (about 48 bits of its mantissa)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _empty(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A dense channels-last tensor of ``x``'s logical shape."""
    b, hd, t, c, h, w = x.shape
    return torch.empty(b, hd, t, h, w, c, dtype=dtype, device=x.device).permute(0, 1, 2, 5, 3, 4)


def _launch(x: torch.Tensor, op: str) -> dict:
    """Grid, block and warps of a launch over the pixels of ``x`` (``op`` "fwd", "dq" or
    "dkv"); small blocks on one warp under the interpreter (:func:`cuda_launch`)."""
    b, hd, t, _, h, w = x.shape
    if cuda_launch(x.device):
        block, warps = CONFIG[op + "_block"], CONFIG[op + "_warps"]
    else:
        block, warps = 32, 1
    block = min(block, next_power_of_2(w))
    return dict(grid=(triton.cdiv(w, block), t * h, b * hd), BLOCK=block, num_warps=warps)


def forward(q, k, v, ws: int, wt: int, scale: float, dot: bool):
    """``(out, lse)``: the attention output in ``v``'s dtype (channels-last) and the
    logsumexp of each query's logits (``(B, HD, T, H, W)``, float32; float64 for float64
    inputs). Accumulates in float32 (float64)."""
    q, k, v = (channels_inner(x) for x in (q, k, v))
    b, hd, t, c, h, w = q.shape
    acc = _acc(q, k, v)
    out = _empty(v, v.dtype)
    lse2 = torch.empty(b, hd, t, h, w, dtype=acc, device=q.device)
    if out.numel():
        launch = _launch(q, "fwd")
        _attn_fwd_kernel[launch.pop("grid")](
            q, k, v, out, lse2, hd, t, h, w, wt,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_split(scale * LOG2E),
            WS=ws, C=c, CP=next_power_of_2(c), DOT=dot, ACC=_TL[acc], **launch,
        )  # fmt: skip
    return out, lse2 * (1 / LOG2E)


def backward(gout, glse, q, k, v, out, lse, ws: int, wt: int, scale: float, dot: bool):
    """``(dq, dk, dv)`` of :func:`forward` (channels-last, in the dtypes of q, k, v), given
    the gradients of its two outputs (``glse`` may be None)."""
    q, k, v, gout = (channels_inner(x) for x in (q, k, v, gout))
    b, hd, t, c, h, w = q.shape
    acc = _acc(q, k, v)
    delta = (gout.to(acc) * out.to(acc)).sum(3)
    if glse is not None:
        delta = delta - glse.to(acc)
    delta = delta.contiguous()
    lse2 = (lse.to(acc) * LOG2E).contiguous()
    dq, dk, dv = (_empty(x, x.dtype) for x in (q, k, v))
    if q.numel():
        common = (
            hd, t, h, w, wt, *q.stride(), *k.stride(), *v.stride(), *gout.stride(),
            *dq.stride(), *_split(scale), *_split(scale * LOG2E),
        )  # fmt: skip
        meta = dict(WS=ws, C=c, CP=next_power_of_2(c), DOT=dot, ACC=_TL[acc])
        launch = _launch(q, "dq")
        _attn_bwd_q_kernel[launch.pop("grid")](
            q, k, v, gout, lse2, delta, dq, *common, **meta, **launch
        )
        launch = _launch(q, "dkv")
        _attn_bwd_kv_kernel[launch.pop("grid")](
            q, k, v, gout, lse2, delta, dk, dv, *common, **meta, **launch
        )
    return dq, dk, dv


def applies(*vids: torch.Tensor) -> bool:
    """Whether the kernels' int32 offsets inside a row of a frame (column and channel) hold
    for these videos (and for the dense outputs, whose rows are smaller)."""
    for x in vids:
        c, w = x.shape[3], x.shape[5]
        if (w - 1) * abs(x.stride(5)) + (c - 1) * abs(x.stride(3)) + c * w >= 2**31:
            return False
    return True
