"""Reference patch primitives in plain PyTorch: read patches, write (add) patches, and the
derivative of a read with respect to the patch positions.

Every op of dnls is written on these three. A video here is head-split, ``(B, HD, T, C, H, W)``;
positions are ``(B, HD, N, 3)`` tensors of ``(t, h, w)``, whole (integer dtype) or fractional
(floating dtype, read by bilinear interpolation in ``(h, w)``; ``t`` is whole).

A patch at ``(t, h, w)`` covers frames ``t .. t+pt-1`` and pixels ``h + (i - ps//2) * dilation``,
``w + (j - ps//2) * dilation`` for ``i, j in [0, ps)``. Pixels outside the video follow ``border``:
"reflect" mirrors without repeating the edge (``-1 -> 1``, ``H -> H-2``), "zero" reads zero.

A read is a sum over *taps*: for whole positions one tap per patch pixel, for fractional ones
the four bilinear corners. Each tap is an index per pixel plus a weight (``None`` for 1): a
write's index is the row of the ``(B*HD*T*H*W, C)`` layout it adds into, a read's the offset of
the pixel in the video itself (:class:`VideoRows`, no copy of the video). The derivative of the
weight with respect to ``h`` and ``w`` gives the position gradient:

    value(h, w)   = sum_c w_c(h, w) * v_c
    d value / d h = sum_c (d w_c / d h) * v_c,  with w_c = (1 - fh | fh) * (1 - fw | fw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchGeom:
    """Shape of one patch and how pixels outside the video are read."""

    ps: int
    pt: int = 1
    dilation: int = 1
    border: str = "reflect"


@dataclass
class Tap:
    index: torch.Tensor  # (B, HD, N, pt, ps, ps) int64: rows, or offsets (see taps)
    weight: torch.Tensor | None  # broadcastable to index; None means 1
    dweight_h: torch.Tensor | None = None  # d weight / d h (fractional positions only)
    dweight_w: torch.Tensor | None = None  # d weight / d w


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic is carried out in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def count_ones(patches: torch.Tensor) -> torch.Tensor:
    """One value expanded to one-channel patches of ``patches``' geometry ``(B, HD, Q, K, pt,
    C, ps, ps)``: what a scatter of counts adds, in ``patches``' accumulation dtype."""
    one = torch.ones((), dtype=acc_dtype(patches.dtype), device=patches.device)
    return one.expand(*patches.shape[:5], 1, *patches.shape[6:])


def border_index(i: torch.Tensor, n: int, border: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map integer coordinates onto ``[0, n)``; returns the index and a validity mask (zero)."""
    if border == "reflect":
        if n == 1:
            return torch.zeros_like(i), None
        period = 2 * (n - 1)
        i = torch.remainder(i, period)
        return torch.where(i >= n, period - i, i), None
    valid = (i >= 0) & (i < n)
    return i.clamp(0, n - 1), valid


def _and(*masks: torch.Tensor | None) -> torch.Tensor | None:
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def taps(
    pos: torch.Tensor,
    shape6: tuple[int, ...],
    geom: PatchGeom,
    strides: tuple[int, ...] | None = None,
) -> list[Tap]:
    """The taps that read the patches at ``pos`` (``(B, HD, N, 3)``) of a video of ``shape6``.
    Their index is the row of the ``(B*HD*T*H*W, C)`` layout, or with ``strides`` (of ``B, HD,
    T, H, W``) the offset of the pixel's first channel in a video of those strides."""
    b_, hd_, t_, _, h_, w_ = shape6
    sb, shd, st, sy, sx = strides or (hd_ * t_ * h_ * w_, t_ * h_ * w_, h_ * w_, w_, 1)
    dev = pos.device
    offs = (torch.arange(geom.ps, device=dev) - geom.ps // 2) * geom.dilation
    frames = pos[..., 0].round().long()[..., None] + torch.arange(geom.pt, device=dev)
    tt, tvalid = border_index(frames, t_, geom.border)  # (B, HD, N, pt)
    base = torch.arange(b_, device=dev).view(b_, 1, 1, 1) * sb
    base = base + torch.arange(hd_, device=dev).view(1, hd_, 1, 1) * shd
    frame_off = (base + tt * st)[..., :, None, None]  # (B, HD, N, pt, 1, 1)
    tmask = None if tvalid is None else tvalid[..., :, None, None]

    def rows(hi: torch.Tensor, wi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hh, hv = border_index(hi, h_, geom.border)
        ww, wv = border_index(wi, w_, geom.border)
        index = frame_off + hh[..., None, :, None] * sy + ww[..., None, None, :] * sx
        hv = None if hv is None else hv[..., None, :, None]
        wv = None if wv is None else wv[..., None, None, :]
        return index, _and(tmask, hv, wv)

    if not pos.is_floating_point():
        hi = pos[..., 1, None].long() + offs  # (B, HD, N, ps)
        wi = pos[..., 2, None].long() + offs
        index, valid = rows(hi, wi)
        return [Tap(index, None if valid is None else valid.to(torch.float32))]

    hf = pos[..., 1, None] + offs
    wf = pos[..., 2, None] + offs
    h0, w0 = hf.floor(), wf.floor()
    fh, fw = hf - h0, wf - w0
    h0, w0 = h0.long(), w0.long()
    out = []
    for dh, wh, sh in ((0, 1 - fh, -1.0), (1, fh, 1.0)):
        for dw, ww, sw in ((0, 1 - fw, -1.0), (1, fw, 1.0)):
            index, valid = rows(h0 + dh, w0 + dw)
            wh_, ww_ = wh[..., None, :, None], ww[..., None, None, :]
            weight, dwh, dww = wh_ * ww_, sh * ww_, wh_ * sw
            if valid is not None:
                weight, dwh, dww = weight * valid, dwh * valid, dww * valid
            out.append(Tap(index, weight, dwh, dww))
    return out


def _at(pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fractional positions in the accumulation dtype, so float64 work has float64 weights."""
    return pos.to(dtype) if pos.is_floating_point() and dtype == torch.float64 else pos


class VideoRows:
    """A video ``(B, HD, T, C, H, W)`` read as the rows ``(B*HD*T*H*W, C)`` of the taps, in the
    accumulation dtype, without a copy of the video: each read gathers only the rows it asks
    for, so the memory a reference op uses follows its batch, not the video."""

    def __init__(self, vid6: torch.Tensor) -> None:
        self.shape6 = tuple(vid6.shape)
        self.dtype = acc_dtype(vid6.dtype)
        self.device = vid6.device
        sb, shd, st, sc, sy, sx = vid6.stride()
        self.strides = (sb, shd, st, sy, sx)  # what :func:`taps` indexes with
        # every element of the video, as one flat view of its storage from its first element
        span = 1 + sum((n - 1) * s for n, s in zip(vid6.shape, vid6.stride(), strict=True))
        self._flat = vid6.as_strided((span if vid6.numel() else 0,), (1,))
        self._chan = torch.arange(self.shape6[3], device=vid6.device) * sc

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The pixels at the offsets ``index`` (int64, any shape, from :func:`taps` with
        :attr:`strides`) as ``index.shape + (C,)``."""
        return self._flat[index[..., None] + self._chan].to(self.dtype)


def flat_video(vid6: torch.Tensor) -> VideoRows:
    """``(B, HD, T, C, H, W)`` -> its rows ``(B*HD*T*H*W, C)`` in the accumulation dtype."""
    return VideoRows(vid6)


def read(flat: VideoRows, shape6: tuple[int, ...], pos: torch.Tensor, geom: PatchGeom):
    """Patches ``(B, HD, N, pt, C, ps, ps)`` at ``pos`` of the video whose rows are ``flat``."""
    out = None
    for tap in taps(_at(pos, flat.dtype), shape6, geom, flat.strides):
        v = flat.rows(tap.index)
        if tap.weight is not None:
            v = v * tap.weight[..., None].to(v.dtype)
        out = v if out is None else out + v
    return out.permute(0, 1, 2, 3, 6, 4, 5)


def read_dpos(
    flat: VideoRows,
    shape6: tuple[int, ...],
    pos: torch.Tensor,
    geom: PatchGeom,
    grad: torch.Tensor,
) -> torch.Tensor:
    """``d <grad, read(pos)> / d pos``: ``(B, HD, N, 3)`` (zero for ``t``; needs float ``pos``)."""
    g = grad.permute(0, 1, 2, 3, 5, 6, 4)  # (B, HD, N, pt, ps, ps, C)
    gh = gw = None
    for tap in taps(_at(pos, flat.dtype), shape6, geom, flat.strides):
        v = flat.rows(tap.index)
        s = (v * g).sum(-1)
        th = (s * tap.dweight_h.to(s.dtype)).sum((3, 4, 5))
        tw = (s * tap.dweight_w.to(s.dtype)).sum((3, 4, 5))
        gh = th if gh is None else gh + th
        gw = tw if gw is None else gw + tw
    return torch.stack([torch.zeros_like(gh), gh, gw], dim=-1)


def write(values: torch.Tensor, pos: torch.Tensor, shape6: tuple[int, ...], geom: PatchGeom):
    """Add the patches ``values`` ``(B, HD, N, pt, C, ps, ps)`` at ``pos`` into a zero video.

    The adjoint of :func:`read`. Returns ``(B, HD, T, C, H, W)`` in the dtype of ``values``;
    ``C`` is taken from ``values`` (``shape6``'s channel count is ignored).
    """
    b_, hd_, t_, _, h_, w_ = shape6
    c = values.shape[4]
    out = values.new_zeros(b_ * hd_ * t_ * h_ * w_, c)
    v = values.permute(0, 1, 2, 3, 5, 6, 4)  # (B, HD, N, pt, ps, ps, C)
    for tap in taps(_at(pos, values.dtype), shape6, geom):
        w = v if tap.weight is None else v * tap.weight[..., None].to(v.dtype)
        out.index_add_(0, tap.index.reshape(-1), w.reshape(-1, c))
    return out.view(b_, hd_, t_, h_, w_, c).permute(0, 1, 2, 5, 3, 4)
