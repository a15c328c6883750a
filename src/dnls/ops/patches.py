"""gather, scatter and wpsum: read the patches at given positions, add patches back into a
video, and take weighted sums of the patches of each query.

Layout of this module: the reference kernels (plain PyTorch, on :mod:`dnls._ref`), then the
``torch.library`` registration (ops, fake kernels, autograd), then the public functions.

Backward, with ``P(v, x)`` the patches of video ``v`` at positions ``x`` and ``S = P^T``:

    gather:  dL/dv = S(g, x)                    dL/dx = <g, dP(v, x)/dx>
    scatter: dL/dp = P(g, x)
    wpsum:   out_q = sum_k w_qk P(v, x_qk)
             dL/dv = sum_k S(w_qk g_q, x_qk)    dL/dw_qk = <g_q, P(v, x_qk)>
             dL/dx_qk = <w_qk g_q, dP(v, x_qk)/dx>
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _checks
from .._common import backend, fused_cpu, merge_heads, split_heads
from .._ref import PatchGeom, acc_dtype, count_ones, flat_video, read, read_dpos, write
from . import _cpu

# ---------------------------------------------------------------------------------------------
# Reference kernels. Shapes: vid (B, HD, T, C, H, W); inds (B, HD, Q, K, 3);
# patches (B, HD, Q, K, pt, C, ps, ps).
# ---------------------------------------------------------------------------------------------


def _flat_pos(inds: torch.Tensor) -> torch.Tensor:
    b, hd, q, k, _ = inds.shape
    return inds.reshape(b, hd, q * k, 3)


def _gather_ref(vid: torch.Tensor, inds: torch.Tensor, geom: PatchGeom) -> torch.Tensor:
    b, hd, q, k, _ = inds.shape
    out = read(flat_video(vid), tuple(vid.shape), _flat_pos(inds), geom)
    return out.reshape(b, hd, q, k, *out.shape[3:]).to(vid.dtype).contiguous()


def _gather_dpos_ref(vid, inds, grad, geom: PatchGeom) -> torch.Tensor:
    if not inds.is_floating_point():  # whole positions carry no gradient
        return torch.zeros_like(inds, memory_format=torch.contiguous_format)
    b, hd, q, k, _ = inds.shape
    g = grad.reshape(b, hd, q * k, *grad.shape[4:]).to(acc_dtype(vid.dtype))
    out = read_dpos(flat_video(vid), tuple(vid.shape), _flat_pos(inds), geom, g)
    return out.reshape(b, hd, q, k, 3).to(inds.dtype)


def _scatter_ref(patches, inds, shape6: tuple[int, ...], geom: PatchGeom) -> torch.Tensor:
    b, hd, q, k = inds.shape[:4]
    p = patches.reshape(b, hd, q * k, *patches.shape[4:]).to(acc_dtype(patches.dtype))
    return write(p, _flat_pos(inds), shape6, geom).to(patches.dtype).contiguous()


def _scatter_counts_ref(patches, inds, shape6: tuple[int, ...], geom: PatchGeom):
    b, hd, t, _, h, w = shape6
    counts = _scatter_ref(count_ones(patches), inds, (b, hd, t, 1, h, w), geom)
    return _scatter_ref(patches, inds, shape6, geom), counts


def _wpsum_ref(vid, weights, inds, geom: PatchGeom) -> torch.Tensor:
    flat, shape6 = flat_video(vid), tuple(vid.shape)
    w = weights.to(flat.dtype)
    out = None
    for j in range(inds.shape[3]):  # one neighbour at a time: never all K patches
        term = read(flat, shape6, inds[:, :, :, j], geom) * w[:, :, :, j, None, None, None, None]
        out = term if out is None else out + term
    if out is None:
        b, hd, q = inds.shape[:3]
        size = (b, hd, q, geom.pt, vid.shape[3], geom.ps, geom.ps)
        out = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    return out.to(torch.promote_types(vid.dtype, weights.dtype)).contiguous()


def _wpsum_backward_ref(grad, vid, weights, inds, geom: PatchGeom):
    flat, shape6 = flat_video(vid), tuple(vid.shape)
    g = grad.to(flat.dtype)
    w = weights.to(flat.dtype)
    gvid = torch.zeros(shape6, dtype=flat.dtype, device=vid.device)
    gw = torch.zeros_like(w)
    ginds = torch.zeros(inds.shape, dtype=flat.dtype, device=vid.device)
    for j in range(inds.shape[3]):
        pos = inds[:, :, :, j]
        gw[:, :, :, j] = (read(flat, shape6, pos, geom) * g).sum((3, 4, 5, 6))
        wg = g * w[:, :, :, j, None, None, None, None]
        gvid += write(wg, pos, shape6, geom)
        if inds.is_floating_point():
            ginds[:, :, :, j] = read_dpos(flat, shape6, pos, geom, wg)
    return gvid.to(vid.dtype), gw.to(weights.dtype), ginds.to(inds.dtype)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _run(device: torch.device, op: str, ref, *args, sums: torch.Tensor | None = None):
    """Run ``ref`` or the Triton launcher of the same name (without ``_ref``). Under
    ``torch.use_deterministic_algorithms(True)`` the kernels that add with atomics (``sums``:
    the tensor whose values they add) add fixed-point values into int64, the same bits on every
    run; float64 ``sums`` take the reference then (its ``index_add_`` is deterministic in that
    mode), since a 64-bit fixed point would round them more coarsely than float64 does."""
    exact = sums is not None and sums.dtype == torch.float64
    if backend(device, op) == "triton" and not (
        exact and torch.are_deterministic_algorithms_enabled()
    ):
        from . import _patches_triton as kernels

        return getattr(kernels, ref.__name__[1:].removesuffix("_ref"))(*args)
    return ref(*args)


@torch.library.custom_op("dnls::gather", mutates_args=())
def _gather_op(
    vid: torch.Tensor, inds: torch.Tensor, *, ps: int, pt: int, dilation: int, border: str
) -> torch.Tensor:
    return _run(vid.device, "gather", _gather_ref, vid, inds, PatchGeom(ps, pt, dilation, border))


@_gather_op.register_fake
def _(vid, inds, *, ps, pt, dilation, border):
    b, hd, q, k, _ = inds.shape
    return vid.new_empty(b, hd, q, k, pt, vid.shape[3], ps, ps)


@torch.library.custom_op("dnls::gather_dpos", mutates_args=())
def _gather_dpos_op(
    vid: torch.Tensor,
    inds: torch.Tensor,
    grad: torch.Tensor,
    *,
    ps: int,
    pt: int,
    dilation: int,
    border: str,
) -> torch.Tensor:
    geom = PatchGeom(ps, pt, dilation, border)
    return _run(vid.device, "gather", _gather_dpos_ref, vid, inds, grad, geom)


@_gather_dpos_op.register_fake
def _(vid, inds, grad, *, ps, pt, dilation, border):
    return inds.new_empty(inds.shape)


def _scatter_setup(patches, inds, frames, height, width, dilation, border):
    """``(shape6, geom, cpu)`` of a scatter op's arguments; ``cpu``: the fused CPU kernels run."""
    b, hd = inds.shape[:2]
    pt, c, ps = patches.shape[4], patches.shape[5], patches.shape[6]
    cpu = fused_cpu(patches.device) and _cpu.applies(patches.device, pt, dilation, inds)
    return (b, hd, frames, c, height, width), PatchGeom(ps, pt, dilation, border), cpu


@torch.library.custom_op("dnls::scatter", mutates_args=())
def _scatter_op(
    patches: torch.Tensor,
    inds: torch.Tensor,
    *,
    frames: int,
    height: int,
    width: int,
    dilation: int,
    border: str,
) -> torch.Tensor:
    shape6, geom, cpu = _scatter_setup(patches, inds, frames, height, width, dilation, border)
    if cpu:
        return _cpu.scatter(patches, inds, shape6, border)
    return _run(patches.device, "scatter", _scatter_ref, patches, inds, shape6, geom, sums=patches)


@_scatter_op.register_fake
def _(patches, inds, *, frames, height, width, dilation, border):
    b, hd = inds.shape[:2]
    return patches.new_empty(b, hd, frames, patches.shape[5], height, width)


@torch.library.custom_op("dnls::scatter_counts", mutates_args=())
def _scatter_counts_op(
    patches: torch.Tensor,
    inds: torch.Tensor,
    *,
    frames: int,
    height: int,
    width: int,
    dilation: int,
    border: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dnls.scatter's two results in one op, ``(vid, counts)``: where the kernels group the
    entries by position (scatter by anchors), the counts come from the same pass."""
    shape6, geom, cpu = _scatter_setup(patches, inds, frames, height, width, dilation, border)
    if cpu:
        counts = _cpu.scatter(count_ones(patches), inds, (*shape6[:3], 1, *shape6[4:]), border)
        return _cpu.scatter(patches, inds, shape6, border), counts
    return _run(
        patches.device, "scatter", _scatter_counts_ref, patches, inds, shape6, geom, sums=patches
    )


@_scatter_counts_op.register_fake
def _(patches, inds, *, frames, height, width, dilation, border):
    b, hd = inds.shape[:2]
    vid = patches.new_empty(b, hd, frames, patches.shape[5], height, width)
    return vid, patches.new_empty(b, hd, frames, 1, height, width, dtype=acc_dtype(patches.dtype))


@torch.library.custom_op("dnls::wpsum", mutates_args=())
def _wpsum_op(
    vid: torch.Tensor,
    weights: torch.Tensor,
    inds: torch.Tensor,
    *,
    ps: int,
    pt: int,
    dilation: int,
    border: str,
) -> torch.Tensor:
    geom = PatchGeom(ps, pt, dilation, border)
    if fused_cpu(vid.device) and _cpu.applies(vid.device, pt, dilation, inds):
        return _cpu.wpsum(vid, weights, inds, ps, border)
    return _run(vid.device, "wpsum", _wpsum_ref, vid, weights, inds, geom)


@_wpsum_op.register_fake
def _(vid, weights, inds, *, ps, pt, dilation, border):
    b, hd, q = inds.shape[:3]
    dtype = torch.promote_types(vid.dtype, weights.dtype)
    return vid.new_empty(b, hd, q, pt, vid.shape[3], ps, ps, dtype=dtype)


@torch.library.custom_op("dnls::wpsum_backward", mutates_args=())
def _wpsum_backward_op(
    grad: torch.Tensor,
    vid: torch.Tensor,
    weights: torch.Tensor,
    inds: torch.Tensor,
    *,
    ps: int,
    pt: int,
    dilation: int,
    border: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geom = PatchGeom(ps, pt, dilation, border)
    return _run(vid.device, "wpsum", _wpsum_backward_ref, grad, vid, weights, inds, geom, sums=vid)


@_wpsum_backward_op.register_fake
def _(grad, vid, weights, inds, *, ps, pt, dilation, border):
    return vid.new_empty(vid.shape), weights.new_empty(weights.shape), inds.new_empty(inds.shape)


def _save_geom(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.kw = dict(keyword_only_inputs)


def _gather_backward(ctx, grad):
    vid, inds = ctx.saved_tensors
    kw = ctx.kw
    b, hd, t, _, h, w = vid.shape
    gvid = ginds = None
    if ctx.needs_input_grad[0]:
        gvid = _scatter_op(
            grad, inds, frames=t, height=h, width=w, dilation=kw["dilation"], border=kw["border"]
        ).to(vid.dtype)
    if ctx.needs_input_grad[1] and inds.is_floating_point():
        ginds = _gather_dpos_op(vid, inds, grad, **kw)
    return gvid, ginds


def _scatter_backward(ctx, grad):
    patches, inds = ctx.saved_tensors
    kw = ctx.kw
    gp = _gather_op(
        grad,
        inds,
        ps=patches.shape[6],
        pt=patches.shape[4],
        dilation=kw["dilation"],
        border=kw["border"],
    )
    return gp.to(patches.dtype), None


def _save_counts(ctx, inputs, keyword_only_inputs, output):
    _save_geom(ctx, inputs, keyword_only_inputs, output)
    ctx.mark_non_differentiable(output[1])


def _scatter_counts_backward(ctx, grad, _grad_counts):
    return _scatter_backward(ctx, grad)


def _wpsum_backward(ctx, grad):
    vid, weights, inds = ctx.saved_tensors
    gvid, gw, ginds = _wpsum_backward_op(grad, vid, weights, inds, **ctx.kw)
    return gvid, gw, (ginds if inds.is_floating_point() else None)


_gather_op.register_autograd(_gather_backward, setup_context=_save_geom)
_scatter_op.register_autograd(_scatter_backward, setup_context=_save_geom)
_wpsum_op.register_autograd(_wpsum_backward, setup_context=_save_geom)
_scatter_counts_op.register_autograd(_scatter_counts_backward, setup_context=_save_counts)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_inds(inds: object, vid_shape6: Sequence[int], device, name: str = "inds"):
    inds = _checks.check_tensor(name, inds)
    b, hd, t, _, h, w = vid_shape6
    if inds.ndim != 5 or inds.shape[0] != b or inds.shape[1] != hd:
        _checks.fail(name, inds, f"5-D (B, HD, Q, K, 3) with B={b} and HD={hd}")
    if inds.device != device:
        _checks.fail(name, inds, f"on the video's device ({device})")
    _checks.check_positions(name, inds, (t, h, w), tuple(inds.shape[:4]))
    return inds


def _check_vid(vid: object, nheads: object, name: str = "vid") -> torch.Tensor:
    vid = _checks.check_video(name, vid)
    return split_heads(vid, _checks.check_nheads(nheads, vid, name))


def gather(
    vid: torch.Tensor,
    inds: torch.Tensor,
    *,
    ps: int,
    pt: int = 1,
    dilation: int = 1,
    nheads: int = 1,
    border: str = "reflect",
) -> torch.Tensor:
    """Read the patch at every position of ``inds``.

    Args:
        vid: video ``(B, T, C, H, W)``, or head-split ``(B, HD, T, C', H, W)``.
        inds: positions ``(B, HD, Q, K, 3)`` of ``(t, h, w)``; integer, or floating for
            sub-pixel positions (bilinear in ``h, w``).
        ps, pt, dilation, border: the patch (see the docs); nheads: heads of a 5-D ``vid``.

    Returns:
        ``(B, HD, Q, K, pt, C', ps, ps)``, ``C' = C // HD``. Differentiable w.r.t. ``vid`` and
        floating ``inds``.

    Example:
        >>> vid = torch.rand(1, 2, 3, 16, 16)
        >>> _, inds = dnls.search(vid, ws=5, k=4)
        >>> dnls.gather(vid, inds, ps=7).shape
        torch.Size([1, 1, 512, 4, 1, 3, 7, 7])
    """
    v = _check_vid(vid, nheads)
    _checks.check_patch_geometry(ps, pt, dilation, border)
    inds = _check_inds(inds, v.shape, v.device)
    return _gather_op(v, inds, ps=ps, pt=pt, dilation=dilation, border=border)


def _counts_view(counts6: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Counts ``(B, HD, T, 1, H, W)`` in the layout that broadcasts against a video of ``shape``."""
    if len(shape) == 6:
        return counts6
    b, hd, t, _, h, w = counts6.shape
    if hd == 1:
        return counts6[:, 0]
    c = shape[2] // hd
    return merge_heads(counts6.expand(b, hd, t, c, h, w))


def _check_into(
    out: torch.Tensor | None,
    counts: torch.Tensor | None,
    shape: tuple[int, ...],
    counts_shape: tuple[int, ...],
    device: torch.device,
) -> None:
    """``out`` and ``counts``, tensors to add a result of ``shape`` and counts of
    ``counts_shape`` into, where given: checked before anything is computed or changed."""
    for into, name, size in ((out, "out", shape), (counts, "counts", counts_shape)):
        if into is None:
            continue
        into = _checks.check_tensor(name, into)
        if tuple(into.shape) != tuple(size):
            _checks.fail(name, into, f"of shape {tuple(size)}")
        if into.device != device:
            _checks.fail(name, into, f"on device {device}")
        if not into.is_floating_point():
            _checks.fail(name, into, "a floating tensor", TypeError)
        if any(st == 0 and n > 1 for n, st in zip(into.shape, into.stride(), strict=True)):
            _checks.fail(name, into, "a tensor with distinct elements in memory (not expanded)")
        if into.requires_grad and into.is_leaf and torch.is_grad_enabled():
            _checks.fail(name, into, "a tensor autograd lets change in place (not a leaf that "
                         "requires grad)")  # fmt: skip


def _add_into(
    vid: torch.Tensor, out: torch.Tensor | None, cnt: torch.Tensor, counts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out + vid, counts + cnt)`` in place where given (:func:`_check_into`), else the
    results themselves."""
    return (vid if out is None else out.add_(vid), cnt if counts is None else counts.add_(cnt))


def scatter(
    patches: torch.Tensor,
    inds: torch.Tensor,
    *,
    shape: Sequence[int],
    dilation: int = 1,
    nheads: int = 1,
    border: str = "reflect",
    out: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add every patch into a video at its position: the adjoint of :func:`gather`.

    Args:
        patches: ``(B, HD, Q, K, pt, C', ps, ps)``.
        inds: positions ``(B, HD, Q, K, 3)``.
        shape: the video's shape, ``(B, T, HD*C', H, W)`` or ``(B, HD, T, C', H, W)``.
        out, counts: tensors to add into (in place), as returned by an earlier call.

    Returns:
        ``(vid, counts)``: ``vid`` of ``shape``; ``counts``, how much weight landed on each
        pixel, broadcastable to ``vid`` (``(B, T, 1, H, W)``, ``(B, T, C, H, W)`` with several
        heads, or ``(B, HD, T, 1, H, W)`` for a 6-D shape), in float32 (float64 for float64).
        ``vid / counts`` is the average. Differentiable w.r.t. ``patches``.
    """
    patches = _checks.check_tensor("patches", patches)
    if patches.dtype not in _checks.FLOAT_DTYPES:
        _checks.fail("patches", patches, "float16, bfloat16, float32 or float64", TypeError)
    if patches.ndim != 8 or patches.shape[-1] != patches.shape[-2]:
        _checks.fail("patches", patches, "8-D (B, HD, Q, K, pt, C, ps, ps)")
    b, hd, _, _, pt, c, ps, _ = patches.shape
    shape = _checks.check_shape(shape)
    nheads = _checks.check_int("nheads", nheads, min_value=1)
    if nheads not in (1, hd):
        _checks.fail("nheads", nheads, f"1 or the head count of patches ({hd})")
    expected = (
        (b, hd, shape[2], c, shape[4], shape[5])
        if len(shape) == 6
        else (b, shape[1], hd * c, shape[3], shape[4])
    )
    if shape != expected:
        _checks.fail("shape", shape, f"{expected} to match patches {tuple(patches.shape)}")
    t, h, w = shape[-4], shape[-2], shape[-1]
    _checks.check_patch_geometry(ps, pt, dilation, border)
    inds = _check_inds(inds, (b, hd, t, c, h, w), patches.device)
    if inds.shape[:4] != patches.shape[:4]:
        _checks.fail("inds", inds, f"of shape {(*patches.shape[:4], 3)} to match patches")
    counts_shape = _counts_view(torch.empty(b, hd, t, 1, h, w, device="meta"), shape).shape
    _check_into(out, counts, shape, tuple(counts_shape), patches.device)
    kw = dict(frames=t, height=h, width=w, dilation=dilation, border=border)
    vid6, counts6 = _scatter_counts_op(patches, inds, **kw)
    vid = vid6 if len(shape) == 6 else merge_heads(vid6)
    return _add_into(vid, out, _counts_view(counts6, shape), counts)


def wpsum(
    vid: torch.Tensor,
    weights: torch.Tensor,
    inds: torch.Tensor,
    *,
    ps: int,
    pt: int = 1,
    dilation: int = 1,
    nheads: int = 1,
    border: str = "reflect",
) -> torch.Tensor:
    """Weighted sum of each query's K patches, without holding the K patches.

    ``wpsum(vid, w, inds)[b, h, q] == sum_k w[b, h, q, k] * gather(vid, inds)[b, h, q, k]``.

    Args:
        vid: video ``(B, T, C, H, W)`` or ``(B, HD, T, C', H, W)``.
        weights: ``(B, HD, Q, K)``, floating.
        inds: positions ``(B, HD, Q, K, 3)``.

    Returns:
        ``(B, HD, Q, pt, C', ps, ps)`` in the promoted dtype of ``vid`` and ``weights``.
        Differentiable w.r.t. ``vid``, ``weights`` and floating ``inds``.
    """
    v = _check_vid(vid, nheads)
    _checks.check_patch_geometry(ps, pt, dilation, border)
    inds = _check_inds(inds, v.shape, v.device)
    weights = _checks.check_tensor("weights", weights)
    if not weights.is_floating_point():
        _checks.fail("weights", weights, "a floating tensor", TypeError)
    if weights.shape != inds.shape[:4]:
        _checks.fail("weights", weights, f"of shape {tuple(inds.shape[:4])} to match inds")
    _checks.check_device("weights", weights, "vid", v)
    return _wpsum_op(v, weights, inds, ps=ps, pt=pt, dilation=dilation, border=border)
