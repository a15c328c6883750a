"""Optical flows for the search window.

``search`` takes flows per window, ``(B, T, 2*wt + 1, 2, H, W)``: the displacement ``(dh, dw)``
of every pixel of frame ``t`` to each frame of its window (frames ``t_start .. t_start + 2*wt``,
the window slid inward at the ends of the video). :func:`accumulate_flows` builds that from a
pair of frame-to-next / frame-to-previous flows by following them frame by frame:

    p_t = (h, w),   p_{u+1} = p_u + fflow[u](p_u),   p_{u-1} = p_u + bflow[u](p_u)

where a flow is read at a fractional point by bilinear interpolation, the point clamped into the
frame first. Integer flows stay integer (no interpolation). It is plain autograd code, so
gradients reach ``fflow`` and ``bflow``.
"""

from __future__ import annotations

import torch

# Whole flows are clamped to +-FLOW_LIMIT: farther than any frame reaches (a window centre is
# clamped into the frame), and a position plus such a flow still fits int32.
FLOW_LIMIT = 2**30


def window_start(t: int, wt: int, nframes: int) -> int:
    """First frame of the ``2*wt + 1`` frame window of frame ``t``, slid inward at the ends."""
    return min(max(t - wt, 0), nframes - (2 * wt + 1))


def _sample(flow: torch.Tensor, ph: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    """Read ``flow`` ``(B, 2, H, W)`` at points ``(B, H, W)``, clamped into the frame."""
    b, _, h, w = flow.shape
    rows = flow.flatten(2)  # (B, 2, H*W)

    def at(hi: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
        idx = (hi * w + wi).flatten(1)[:, None, :].expand(b, 2, -1)
        return rows.gather(2, idx).view(b, 2, h, w)

    if not flow.is_floating_point():
        return at(ph.clamp(0, h - 1), pw.clamp(0, w - 1))
    ph, pw = ph.clamp(0, h - 1), pw.clamp(0, w - 1)
    h0, w0 = ph.detach().floor().long(), pw.detach().floor().long()
    fh, fw = (ph - h0)[:, None], (pw - w0)[:, None]
    h1, w1 = (h0 + 1).clamp(max=h - 1), (w0 + 1).clamp(max=w - 1)
    return (
        at(h0, w0) * (1 - fh) * (1 - fw)
        + at(h0, w1) * (1 - fh) * fw
        + at(h1, w0) * fh * (1 - fw)
        + at(h1, w1) * fh * fw
    )


def accumulate_flows(fflow: torch.Tensor, bflow: torch.Tensor, wt: int) -> torch.Tensor:
    """Per-window flows ``(B, T, 2*wt + 1, 2, H, W)`` from frame-to-next and frame-to-previous
    flows ``(B, T, 2, H, W)`` (``fflow[:, t]`` maps frame ``t`` to ``t+1``, ``bflow[:, t]`` to
    ``t-1``; ``fflow[:, T-1]`` and ``bflow[:, 0]`` are never read)."""
    b, nframes, _, h, w = fflow.shape
    dev = fflow.device
    base_h = torch.arange(h, device=dev).view(1, h, 1).expand(b, h, w)
    base_w = torch.arange(w, device=dev).view(1, 1, w).expand(b, h, w)
    if fflow.is_floating_point():
        base_h, base_w = base_h.to(fflow.dtype), base_w.to(fflow.dtype)
    zero = torch.zeros_like(fflow[:, 0])
    per_frame = []
    for t in range(nframes):
        t0 = window_start(t, wt, nframes)
        slots = {t: zero}
        for flow, step in ((fflow, 1), (bflow, -1)):
            ph, pw = base_h, base_w
            u = t
            while t0 <= u + step <= t0 + 2 * wt:
                d = _sample(flow[:, u], ph, pw)
                ph, pw = ph + d[:, 0], pw + d[:, 1]
                u += step
                slots[u] = torch.stack([ph - base_h, pw - base_w], dim=1)
        per_frame.append(torch.stack([slots[t0 + s] for s in range(2 * wt + 1)], dim=1))
    out = torch.stack(per_frame, dim=1)
    if not fflow.is_floating_point():  # sums of whole flows, kept within int32
        out = out.clamp(-FLOW_LIMIT, FLOW_LIMIT)
    return out.to(fflow.dtype)
