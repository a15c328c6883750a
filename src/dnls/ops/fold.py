"""iunfold and ifold: unfold / fold on any rectangular region of a video, in query batches.

Both are :func:`dnls.gather` / :func:`dnls.scatter` at the positions of a query grid, so they
share those ops' kernels, registration and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _checks
from .._grid import query_grid
from .._ref import acc_dtype
from .patches import _add_into, _gather_op, _scatter_op


def _grid_inds(shape5, stride, region, start, count, device) -> torch.Tensor:
    """Positions ``(B, 1, count, 1, 3)`` of queries ``[start, start + count)`` of the grid."""
    grid = query_grid(shape5, stride, region)
    start, count = _checks.check_start_count(start, count, grid.count)
    pos = grid.positions(start, count, device=device)
    return pos.view(1, 1, count, 1, 3).expand(shape5[0], 1, count, 1, 3)


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
    inds = _grid_inds(tuple(vid.shape), stride, region, start, count, vid.device)
    out = _gather_op(vid.unsqueeze(1), inds, ps=ps, pt=pt, dilation=dilation, border=border)
    return out[:, 0, :, 0]


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
    total = query_grid(shape, stride, region).count
    if start + q > total:
        _checks.fail(
            "patches",
            patches,
            f"at most Q - start = {total - start} queries (the grid has Q={total}, start={start})",
        )
    inds = _grid_inds(shape, stride, region, start, q, patches.device)
    kw = dict(frames=shape[1], height=shape[3], width=shape[4], dilation=dilation, border=border)
    vid = _scatter_op(patches.unsqueeze(1).unsqueeze(3), inds, **kw)[:, 0]
    ones = torch.ones((), dtype=acc_dtype(patches.dtype), device=patches.device)
    cnt = _scatter_op(ones.expand(b, 1, q, 1, pt, 1, ps, ps), inds, **kw)[:, 0]
    return _add_into(vid, out, "out"), _add_into(cnt, counts, "counts")
