"""iunfold and ifold: unfold / fold on any rectangular region of a video, in query batches.

Both are registered ops of their own (``dnls::iunfold``, ``dnls::ifold``), each the other's
backward. ``iunfold`` reads with :func:`dnls.gather`'s kernels at the grid positions. ``ifold``
has a Triton kernel that works per output pixel (each pixel sums the patch elements that land
on it: no atomics, the same bits on every run); its reference is :func:`dnls.scatter`'s at
the grid positions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _checks
from .._common import backend, fused_cpu
from .._grid import query_grid
from .._ref import PatchGeom, acc_dtype
from . import _cpu
from .patches import _add_into, _check_into, _gather_ref, _run, _scatter_ref


def iunfold(
    vid: torch.Tensor,
    *,
    ps: int,
    stride: int = 1,
    dilation: int = 1,
    pt: int = 1,
    region: Sequence[int] | None = None,
    start: int = 0,
    count: int | None = None,
    border: str = "reflect",
) -> torch.Tensor:
    """The patches at the query grid of ``region`` with spacing ``stride``.

    Args:
        vid: ``(B, T, C, H, W)``.
        ps, pt, dilation, border: the patch; stride, region: the query grid;
        start, count: the batch of queries ``[start, start + count)`` of the grid's raster order.

    Returns:
        ``(B, Q, pt, C, ps, ps)`` with ``Q = count``. With ``border="zero"``, one frame, odd
        ``ps`` and the whole frame, this is ``torch.nn.functional.unfold(x, ps,
        dilation=dilation, padding=dilation * (ps // 2), stride=stride)`` (reshaped).

    Example:
        >>> x = torch.rand(2, 1, 3, 32, 32)
        >>> dnls.iunfold(x, ps=3, start=0, count=100).shape
        torch.Size([2, 100, 1, 3, 3, 3])
    """
    vid = _checks.check_video("vid", vid)
    if vid.ndim != 5:
        _checks.fail("vid", vid, "5-D (B, T, C, H, W)")
    _checks.check_patch_geometry(ps, pt, dilation, border)
    grid = query_grid(tuple(vid.shape), stride, region)
    start, count = _checks.check_start_count(start, count, grid.count)
    return torch.ops.dnls.iunfold(
        vid, ps=ps, pt=pt, stride=stride, dilation=dilation, region=grid.region, start=start,
        count=count, border=border,
    )  # fmt: skip


def ifold(
    patches: torch.Tensor,
    *,
    shape: Sequence[int],
    stride: int = 1,
    dilation: int = 1,
    region: Sequence[int] | None = None,
    start: int = 0,
    out: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    border: str = "reflect",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add patches at the query grid back into a video: the adjoint of :func:`iunfold`.

    Args:
        patches: ``(B, Q, pt, C, ps, ps)``, the queries ``[start, start + Q)`` of the grid.
        shape: the video's shape ``(B, T, C, H, W)``.
        out, counts: tensors to add into (in place), e.g. from the previous batch.

    Returns:
        ``(vid, counts)``: ``vid`` of ``shape`` and ``counts`` ``(B, T, 1, H, W)`` (float32, or
        float64 for float64 patches), how much landed on each pixel; ``vid / counts`` averages.
        With the case of :func:`iunfold`'s note this equals ``torch.nn.functional.fold``.
    """
    patches = _checks.check_tensor("patches", patches)
    if patches.dtype not in _checks.FLOAT_DTYPES:
        _checks.fail("patches", patches, "float16, bfloat16, float32 or float64", TypeError)
    if patches.ndim != 6 or patches.shape[-1] != patches.shape[-2]:
        _checks.fail("patches", patches, "6-D (B, Q, pt, C, ps, ps)")
    shape = _checks.check_shape(shape)
    b, q, pt, c, ps, _ = patches.shape
    if len(shape) != 5 or shape[0] != b or shape[2] != c:
        _checks.fail("shape", shape, f"5 ints (B={b}, T, C={c}, H, W) to match patches")
    _checks.check_patch_geometry(ps, pt, dilation, border)
    start = _checks.check_int("start", start, min_value=0)
    grid = query_grid(shape, stride, region)
    total = grid.count
    if start > total:
        _checks.fail("start", start, f"at most the grid's query count Q={total}")
    if start + q > total:
        _checks.fail(
            "patches",
            patches,
            f"at most Q - start = {total - start} queries (the grid has Q={total}, start={start})",
        )
    _check_into(out, counts, shape, (b, shape[1], 1, shape[3], shape[4]), patches.device)
    vid, cnt = torch.ops.dnls.ifold(
        patches, shape=shape, stride=stride, dilation=dilation, region=grid.region, start=start,
        border=border,
    )  # fmt: skip
    return _add_into(vid, out, cnt, counts)


def _grid_pos(shape, stride, region, start, count, device) -> torch.Tensor:
    """``(B, 1, count, 1, 3)`` positions of grid queries ``[start, start + count)``, unchecked
    (the public functions checked them; here they may be symbolic)."""
    grid = query_grid(tuple(shape), stride, region)
    pos = grid.positions_unchecked(start, count, device=device)
    return pos.view(1, 1, count, 1, 3).expand(shape[0], 1, count, 1, 3)


@torch.library.custom_op("dnls::iunfold", mutates_args=())
def _iunfold_op(
    vid: torch.Tensor,
    *,
    ps: int,
    pt: int,
    stride: int,
    dilation: int,
    region: list[int],
    start: int,
    count: int,
    border: str,
) -> torch.Tensor:
    geom = PatchGeom(ps, pt, dilation, border)
    if backend(vid.device, "gather") == "triton":
        from . import _patches_triton as kernels

        return kernels.unfold(vid, geom, stride, tuple(region), start, count)
    inds = _grid_pos(vid.shape, stride, region, start, count, vid.device)
    return _run(vid.device, "gather", _gather_ref, vid.unsqueeze(1), inds, geom)[:, 0, :, 0]


@_iunfold_op.register_fake
def _(vid, *, ps, pt, stride, dilation, region, start, count, border):
    return vid.new_empty(vid.shape[0], count, pt, vid.shape[2], ps, ps)


def _iunfold_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.kw = dict(keyword_only_inputs)
    ctx.shape = list(inputs[0].shape)


def _iunfold_backward(ctx, grad):
    kw = {k: v for k, v in ctx.kw.items() if k not in ("ps", "pt", "count")}
    return torch.ops.dnls.ifold(grad.contiguous(), shape=ctx.shape, **kw)[0]


_iunfold_op.register_autograd(_iunfold_backward, setup_context=_iunfold_setup)


def _ifold_ref(patches, shape, stride, dilation, region, start, border):
    b, q, pt, c, ps, _ = patches.shape
    inds = _grid_pos(shape, stride, region, start, q, patches.device)
    geom = PatchGeom(ps, pt, dilation, border)
    shape6 = (b, 1, shape[1], c, shape[3], shape[4])
    vid = _scatter_ref(patches[:, None, :, None], inds, shape6, geom)[:, 0]
    ones = torch.ones((), dtype=acc_dtype(patches.dtype), device=patches.device)
    cnt = _scatter_ref(ones.expand(b, 1, q, 1, pt, 1, ps, ps), inds, shape6, geom)[:, 0]
    return vid, cnt


@torch.library.custom_op("dnls::ifold", mutates_args=())
def _ifold_op(
    patches: torch.Tensor,
    *,
    shape: list[int],
    stride: int,
    dilation: int,
    region: list[int],
    start: int,
    border: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape, region = tuple(shape), tuple(region)
    ps, pt = patches.shape[4], patches.shape[2]
    if backend(patches.device, "ifold") == "triton":
        from . import _patches_triton as kernels

        if kernels.fold_supported(shape, PatchGeom(ps, pt, dilation, border)):
            return kernels.fold(patches, shape, stride, region, start, dilation, border)
    if fused_cpu(patches.device) and _cpu.applies(patches.device, pt, dilation):
        pos = query_grid(shape, stride, region).positions(start, patches.shape[1])
        return _cpu.fold(patches, pos, shape, border)
    return _ifold_ref(patches, shape, stride, dilation, region, start, border)


@_ifold_op.register_fake
def _(patches, *, shape, stride, dilation, region, start, border):
    b, t, c, h, w = shape
    cnt = patches.new_empty(b, t, 1, h, w, dtype=acc_dtype(patches.dtype))
    return patches.new_empty(b, t, c, h, w), cnt


def _ifold_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.kw = dict(keyword_only_inputs)
    ctx.geom = inputs[0].shape


def _ifold_backward(ctx, gvid, _gcounts):
    _, q, pt, _, ps, _ = ctx.geom
    kw = {k: v for k, v in ctx.kw.items() if k != "shape"}
    return torch.ops.dnls.iunfold(gvid, ps=ps, pt=pt, count=q, **kw)


_ifold_op.register_autograd(_ifold_backward, setup_context=_ifold_setup)
