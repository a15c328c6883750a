"""attention: fused neighbourhood attention of pixels, the whole-window case of
:func:`dnls.nn.non_local_attention` (``ps = pt = 1``, ``k=None``, no flows, ``stride1 = 1``).

Layout: reference (the library's own ops) -> ``torch.library`` registration -> the function
:mod:`dnls.nn` calls.

The reference composes the registered ops, as the unfused path does:

    dists = search(q, k, k=None)   z = +-scale * dists   L = logsumexp(z)   P = exp(z - L)
    out = wpsum(v, P)

and its backward, with ``g = dLoss/dout`` and ``gL = dLoss/dL``:

    dv, dP = wpsum_backward(g, v, P)         dz = P (dP - sum_j P dP + gL)
    dq, dk = search_backward(+-scale * dz)

so it builds the ``Q x W`` logits, as ``k=None`` outputs do. The Triton kernels
(``_attention_triton``) never do: scores, softmax and sum in one pass, and a backward that
walks each query's window (dq) and each key's inverse window (dk, dv), without atomics.
"""

from __future__ import annotations

import torch

from .._common import backend
from .._ref import acc_dtype
from .search import SearchParams


def _search_kwargs(q6: torch.Tensor, ws: int, wt: int, dist: str) -> dict:
    """The ``dnls::search`` arguments of the whole window of every pixel."""
    _, _, t, _, h, w = q6.shape
    region = (0, t, 0, h, 0, w)
    p = SearchParams(ws, wt, 1, 1, -1, dist, 1, 1.0, 1, region, 0, t * h * w, "keep", "reflect")
    return p.op_kwargs()


def _logits(q6, k6, ws, wt, scale, dist):
    """``(z, inds, widx, sign)``: the logits ``(B, HD, Q, W)`` in float32 (float64), the
    candidates' positions and window indices, and the sign of ``z`` in the distance."""
    dists, inds, widx = torch.ops.dnls.search(q6, k6, None, **_search_kwargs(q6, ws, wt, dist))
    sign = 1.0 if dist == "dot" else -1.0
    return dists.to(acc_dtype(dists.dtype)) * (sign * scale), inds, widx, sign


def _channels_last(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense channels-last tensor (strides of ``(B, HD, T, H, W, C)``) with the values of
    ``x``, or an empty one of its shape with ``dtype``: every output of the ops is laid out so,
    on every backend."""
    b, hd, t, c, h, w = x.shape
    y = x.new_empty(b, hd, t, h, w, c, dtype=dtype or x.dtype).permute(0, 1, 2, 5, 3, 4)
    return y if dtype is not None else y.copy_(x)


def _lse_dtype(*vids: torch.Tensor) -> torch.dtype:
    """The logsumexp's dtype: float64 when an input is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in vids) else torch.float32


def _attention_ref(q6, k6, v6, ws, wt, scale, dist):
    b, hd, t, c, h, w = v6.shape
    z, inds, _, _ = _logits(q6, k6, ws, wt, scale, dist)
    lse = torch.logsumexp(z, dim=-1)
    weights = torch.exp(z - lse[..., None])
    patches = torch.ops.dnls.wpsum(v6, weights, inds, ps=1, pt=1, dilation=1, border="reflect")
    out = patches.view(b, hd, t, h, w, c).permute(0, 1, 2, 5, 3, 4).to(v6.dtype)
    return out, lse.view(b, hd, t, h, w).to(_lse_dtype(q6, k6, v6))


def _attention_backward_ref(gout, glse, q6, k6, v6, ws, wt, scale, dist):
    b, hd, t, c, h, w = v6.shape
    z, inds, widx, sign = _logits(q6, k6, ws, wt, scale, dist)
    weights = torch.softmax(z, dim=-1)
    g = gout.permute(0, 1, 2, 4, 5, 3).reshape(b, hd, t * h * w, 1, c, 1, 1)
    dv, dp, _ = torch.ops.dnls.wpsum_backward(
        g, v6, weights, inds, ps=1, pt=1, dilation=1, border="reflect"
    )
    delta = (weights * dp).sum(-1, keepdim=True)
    if glse is not None:
        delta = delta - glse.reshape(b, hd, t * h * w, 1).to(delta.dtype)
    gdists = (weights * (dp - delta) * (sign * scale)).to(q6.dtype)
    dq, dk, _ = torch.ops.dnls.search_backward(
        gdists, None, q6, k6, None, widx, **_search_kwargs(q6, ws, wt, dist)
    )
    return _channels_last(dq), _channels_last(dk), _channels_last(dv.to(v6.dtype))


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _triton(*vids: torch.Tensor) -> bool:
    if backend(vids[0].device, "attention") != "triton":
        return False
    from . import _attention_triton as kernels

    return kernels.applies(*vids)


@torch.library.custom_op("dnls::attention", mutates_args=())
def _attention_op(
    q6: torch.Tensor,
    k6: torch.Tensor,
    v6: torch.Tensor,
    *,
    ws: int,
    wt: int,
    scale: float,
    dist: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton(q6, k6, v6):
        from . import _attention_triton as kernels

        return kernels.forward(q6, k6, v6, ws, wt, scale, dist == "dot")
    return _attention_ref(q6, k6, v6, ws, wt, scale, dist)


@_attention_op.register_fake
def _(q6, k6, v6, *, ws, wt, scale, dist):
    b, hd, t, _, h, w = v6.shape
    lse = v6.new_empty(b, hd, t, h, w, dtype=_lse_dtype(q6, k6, v6))
    return _channels_last(v6, v6.dtype), lse


@torch.library.custom_op("dnls::attention_backward", mutates_args=())
def _attention_backward_op(
    gout: torch.Tensor,
    glse: torch.Tensor | None,
    q6: torch.Tensor,
    k6: torch.Tensor,
    v6: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    ws: int,
    wt: int,
    scale: float,
    dist: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _triton(q6, k6, v6, gout):
        from . import _attention_triton as kernels

        return kernels.backward(gout, glse, q6, k6, v6, out, lse, ws, wt, scale, dist == "dot")
    return _attention_backward_ref(gout, glse, q6, k6, v6, ws, wt, scale, dist)


@_attention_backward_op.register_fake
def _(gout, glse, q6, k6, v6, out, lse, *, ws, wt, scale, dist):
    return tuple(_channels_last(x, x.dtype) for x in (q6, k6, v6))


def _setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs, *output)
    ctx.kw = dict(keyword_only_inputs)


def _backward(ctx, gout, glse):
    q6, k6, v6, out, lse = ctx.saved_tensors
    if gout is None:
        gout = torch.zeros_like(out)
    return _attention_backward_op(gout, glse, q6, k6, v6, out, lse, **ctx.kw)


_attention_op.register_autograd(_backward, setup_context=_setup)


def applies(ps, pt, k, flows, stride1, scale: float) -> bool:
    """Whether :func:`attention` covers a :func:`dnls.nn.non_local_attention` call: pixels
    (``ps = pt = 1``), the whole window, no flows, ``stride1 = 1`` and a scale within
    float32's range. (The backend is chosen inside the op, so that a compiled graph holds
    the op whichever runs it.)"""
    return ps == 1 and pt == 1 and k is None and flows is None and stride1 == 1 and scale < 1e30


def attention(q6, k6, v6, *, ws: int, wt: int, scale: float, dist: str) -> torch.Tensor:
    """Neighbourhood attention of head-split ``(B, HD, T, C', H, W)`` videos over the whole
    ``(2*wt + 1) x ws x ws`` window (arguments checked by the caller); the output in ``v6``'s
    dtype. Differentiable w.r.t. the three videos."""
    return _attention_op(q6, k6, v6, ws=ws, wt=wt, scale=scale, dist=dist)[0]
