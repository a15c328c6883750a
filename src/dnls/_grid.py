"""The query grid: the points of a region visited with a stride, in raster order t -> h -> w."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import _checks


@dataclass(frozen=True)
class QueryGrid:
    """Query points ``(t, h0 + i*stride, w0 + j*stride)`` of a region, in raster order.

    Attributes:
        thw: ``(T, H, W)`` of the video.
        stride: spacing of the points in ``h`` and ``w`` (every frame of the region is visited).
        region: ``(t0, t1, h0, h1, w0, w1)``, half-open.
    """

    thw: tuple[int, int, int]
    stride: int
    region: tuple[int, int, int, int, int, int]

    def __post_init__(self) -> None:
        thw = self.thw
        if (
            not isinstance(thw, Sequence)
            or len(thw) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in thw)
        ):
            _checks.fail("thw", thw, "3 ints (T, H, W) >= 1")
        object.__setattr__(self, "stride", _checks.check_int("stride", self.stride, min_value=1))
        object.__setattr__(self, "thw", tuple(thw))
        object.__setattr__(self, "region", _checks.check_region(self.region, tuple(thw)))

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Number of query points along ``t``, ``h`` and ``w``."""
        t0, t1, h0, h1, w0, w1 = self.region
        s = self.stride
        return t1 - t0, -(-(h1 - h0) // s), -(-(w1 - w0) // s)

    @property
    def count(self) -> int:
        """``Q``, the number of query points."""
        nt, nh, nw = self.sizes
        return nt * nh * nw

    def bounds(self, start: int, count: int) -> tuple[int, int, int, int, int, int]:
        """``(t0, t1, h0, h1, w0, w1)``, inclusive: a box that holds the query points
        ``[start, start + count)`` (``count >= 1``)."""
        nt, nh, nw = self.sizes
        t0, _, h0, _, w0, _ = self.region
        s = self.stride
        first, last = start, start + count - 1
        ta, tb = first // (nh * nw), last // (nh * nw)
        ya, yb = (first // nw) % nh, (last // nw) % nh
        if ta != tb:  # the batch crosses frames: every row of the region
            ya, yb = 0, nh - 1
        xa, xb = (first % nw, last % nw) if ya == yb and ta == tb else (0, nw - 1)
        return t0 + ta, t0 + tb, h0 + ya * s, h0 + yb * s, w0 + xa * s, w0 + xb * s

    def positions(
        self, start: int = 0, count: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The ``(count, 3)`` int64 positions ``(t, h, w)`` of queries ``[start, start+count)``."""
        start, count = _checks.check_start_count(start, count, self.count)
        if device is not None:
            device = _checks.check_device_name("device", device)
        return self.positions_unchecked(start, count, device)

    def positions_unchecked(self, start, count, device=None) -> torch.Tensor:
        """:meth:`positions` for a ``start``/``count`` already checked (may be symbolic)."""
        _, nh, nw = self.sizes
        t0, _, h0, _, w0, _ = self.region
        idx = torch.arange(start, start + count, device=device, dtype=torch.int64)
        t = t0 + idx // (nh * nw)
        rem = idx % (nh * nw)
        h = h0 + (rem // nw) * self.stride
        w = w0 + (rem % nw) * self.stride
        return torch.stack([t, h, w], dim=-1)

    def batches(self, size: int) -> Iterator[tuple[int, int]]:
        """Yield ``(start, count)`` pairs of at most ``size`` queries that cover the grid."""
        size = _checks.check_int("size", size, min_value=1)
        for start in range(0, self.count, size):
            yield start, min(size, self.count - start)


def query_grid(
    shape: Sequence[int], stride: int = 1, region: Sequence[int] | None = None
) -> QueryGrid:
    """Describe the query grid of a video.

    Args:
        shape: the video's shape, ``(B, T, C, H, W)`` or ``(B, HD, T, C, H, W)``, or ``(T, H, W)``.
        stride: spacing of the query points in ``h`` and ``w``.
        region: ``(t0, t1, h0, h1, w0, w1)``, half-open; default the whole video.

    Returns:
        A :class:`QueryGrid`; ``grid.count`` is ``Q``.

    Example:
        >>> grid = query_grid((1, 2, 3, 8, 8), stride=2)
        >>> grid.count, grid.positions(0, 2).tolist()
        (32, [[0, 0, 0], [0, 0, 2]])
    """
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, Sequence) and len(shape) == 3:
        dims = tuple(shape)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in dims):
            _checks.fail("shape", shape, "3 ints (T, H, W) >= 1")
        thw = dims
    else:
        full = _checks.check_shape(shape)
        thw = full[-4], full[-2], full[-1]
    return QueryGrid(thw, stride, region)  # type: ignore[arg-type]  (it checks stride, region)
