"""Argument validation: every public op checks its inputs here, once, before any dispatch.

Every error names the argument, the value it got and what was expected. Type problems raise
``TypeError``; wrong values, shapes, devices and ranges raise ``ValueError``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_INT_DTYPES = (torch.int32, torch.int64)
BORDERS = ("reflect", "zero")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
    return repr(value)


def fail(name: str, value: object, expected: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{name} must be {expected}, got {_describe(value)}")


def check_data(ok: torch.Tensor, name: str, value: object, expected: str) -> None:
    """Raise ``ValueError`` unless the one-element boolean tensor ``ok`` is true.

    Under ``torch.compile`` a Python branch on tensor data would break the graph, so there the
    check is an asynchronous assert in the graph: a ``RuntimeError`` with the same message,
    raised when the graph runs.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(ok, f"{name} must be {expected}, got {_describe(value)}")
    elif not bool(ok):
        fail(name, value, expected)


def check_int(name: str, value: object, *, min_value: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, value, "an int", TypeError)
    if min_value is not None and value < min_value:
        fail(name, value, f"an int >= {min_value}")
    return int(value)


def check_positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, value, "a positive number", TypeError)
    if not math.isfinite(value) or value <= 0:
        fail(name, value, "a positive finite number")
    return float(value)


def check_device_name(name: str, value: object) -> torch.device:
    """A ``torch.device`` or a device name (``"cpu"``, ``"cuda:0"``)."""
    if not isinstance(value, (str, torch.device)):
        fail(name, value, "a torch.device or a device name such as 'cpu' or 'cuda'", TypeError)
    try:
        return torch.device(value)
    except RuntimeError:
        fail(name, value, "a device name such as 'cpu', 'cuda' or 'cuda:0'")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return str(value)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        fail(name, value, "a torch.Tensor", TypeError)
    return value


def check_video(name: str, value: object) -> torch.Tensor:
    """A video ``(B, T, C, H, W)`` or a head-split video ``(B, HD, T, C, H, W)``."""
    x = check_tensor(name, value)
    if x.dtype not in FLOAT_DTYPES:
        fail(name, x, "float16, bfloat16, float32 or float64", TypeError)
    if x.ndim not in (5, 6):
        fail(name, x, "5-D (B, T, C, H, W) or 6-D (B, HD, T, C, H, W)")
    if any(s == 0 for s in x.shape[-3:]):
        fail(name, x, "a video with C, H and W of at least 1")
    if x.shape[-4] == 0:
        fail(name, x, "a video with at least one frame")
    if x.ndim == 6 and x.shape[1] == 0:
        fail(name, x, "a video with at least one head (HD >= 1)")
    return x


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must match ``ref`` in shape, dtype and device."""
    if x.device != ref.device:
        fail(name, x, f"on the same device as {ref_name} ({ref.device})")
    if x.dtype != ref.dtype:
        fail(name, x, f"of the same dtype as {ref_name} ({ref.dtype})", TypeError)
    if x.shape != ref.shape:
        fail(name, x, f"of the same shape as {ref_name} {tuple(ref.shape)}")


def check_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        fail(name, x, f"on the same device as {ref_name} ({ref.device})")


def check_nheads(nheads: object, video: torch.Tensor, name: str) -> int:
    """Number of heads of ``video``: its axis 1 when 6-D, else ``nheads`` (which must divide C)."""
    nheads = check_int("nheads", nheads, min_value=1)
    if video.ndim == 6:
        if nheads not in (1, video.shape[1]):
            fail("nheads", nheads, f"1 or {video.shape[1]} for the 6-D {name} (its head axis)")
        return video.shape[1]
    if video.shape[2] % nheads:
        fail("nheads", nheads, f"a divisor of the channel count C={video.shape[2]} of {name}")
    return nheads


def check_region(region: object, thw: tuple[int, int, int]) -> tuple[int, int, int, int, int, int]:
    """``(t0, t1, h0, h1, w0, w1)``, half-open and non-empty inside a ``(T, H, W)`` video."""
    t_, h_, w_ = thw
    if region is None:
        return (0, t_, 0, h_, 0, w_)
    if isinstance(region, torch.Tensor) or not isinstance(region, Sequence) or len(region) != 6:
        fail("region", region, "None or a sequence of 6 ints (t0, t1, h0, h1, w0, w1)", TypeError)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in region):
        fail("region", region, "6 ints (t0, t1, h0, h1, w0, w1)", TypeError)
    for i, size in enumerate(thw):
        lo, hi = region[2 * i], region[2 * i + 1]
        if not 0 <= lo < hi <= size:
            axis = "thw"[i]
            fail(
                "region",
                tuple(region),
                f"non-empty and inside the video: 0 <= {axis}0 < {axis}1 <= {size}",
            )
    return tuple(int(v) for v in region)  # type: ignore[return-value]


def check_start_count(start: object, count: object, total: int) -> tuple[int, int]:
    start = check_int("start", start, min_value=0)
    if start > total:
        fail("start", start, f"at most the number of queries Q={total}")
    if count is None:
        return start, total - start
    count = check_int("count", count, min_value=0)
    if start + count > total:
        fail("count", count, f"at most Q - start = {total - start} (Q={total}, start={start})")
    return start, count


# Position tensors known to lie inside a video, as they are now: id -> (weak reference, version
# counter, (T, H, W), a box that holds them or None). ``search`` records its outputs, whose
# positions are inside the frame by construction, so the ops that read them on a GPU skip the
# range check (two reductions and a device sync per call), and scatter by anchors takes the box
# (from the search's geometry) instead of reading their bounds back. An in-place change through
# torch bumps the version counter and brings the check back; one through ``.data``,
# ``.numpy()`` or DLPack does not, so CPU tensors, whose check costs no sync, are always
# checked (their kernels index memory with the positions), the Triton kernels read any
# position through the border rule, never outside the video, and scatter by anchors leaves out
# a position outside its box rather than index outside its buffers.
_INSIDE: dict[int, tuple[weakref.ref, int, tuple[int, int, int], tuple[int, ...] | None]] = {}


def mark_positions(
    inds: torch.Tensor, thw: tuple[int, int, int], box: tuple[int, ...] | None = None
) -> None:
    """Record that ``inds`` holds positions inside a ``(T, H, W) = thw`` video, and within
    ``box`` ``(t0, t1, h0, h1, w0, w1)`` (inclusive) where given (the caller guarantees
    both). Not for inference tensors, which have no version counter."""
    if torch.compiler.is_compiling() or inds.is_inference():
        return
    key = id(inds)
    ref = weakref.ref(inds, lambda _, key=key: _INSIDE.pop(key, None))
    _INSIDE[key] = (ref, inds._version, tuple(thw), None if box is None else tuple(box))


def _entry(inds: torch.Tensor):
    """The record of :func:`mark_positions` for ``inds`` while it holds (the same tensor,
    unchanged since), else None."""
    entry = _INSIDE.get(id(inds))
    if entry is None or inds.is_inference():
        return None
    ref, version, known, box = entry
    return entry if ref() is inds and inds._version == version else None


def known_box(inds: torch.Tensor) -> tuple[int, ...] | None:
    """The box ``(t0, t1, h0, h1, w0, w1)`` (inclusive) recorded for ``inds`` by
    :func:`mark_positions`, if any (and ``inds`` unchanged since): every position lies in it."""
    entry = _entry(inds)
    return None if entry is None else entry[3]


def _known_inside(inds: torch.Tensor, thw: tuple[int, int, int]) -> bool:
    entry = _entry(inds)
    if entry is None or inds.device.type == "cpu":
        return False
    return all(k <= n for k, n in zip(entry[2], thw, strict=True))


def check_positions(
    name: str, inds: torch.Tensor, thw: tuple[int, int, int], lead: tuple[int, ...]
) -> None:
    """Index tensor ``lead + (3,)`` of positions ``(t, h, w)`` inside a ``(T, H, W)`` video.
    The range is not read again for the outputs of ``search`` on a GPU (:func:`mark_positions`)."""
    if inds.dtype not in INDEX_INT_DTYPES and not inds.is_floating_point():
        fail(name, inds, "int32, int64 or a floating dtype", TypeError)
    if tuple(inds.shape) != (*lead, 3):
        fail(name, inds, f"of shape {(*lead, 3)}")
    if inds.numel() == 0 or (not torch.compiler.is_compiling() and _known_inside(inds, thw)):
        return
    flat = inds.detach().reshape(-1, 3)
    if inds.is_floating_point():
        check_data(torch.isfinite(flat).all(), name, inds, "finite positions")
        whole_t = (flat[:, 0] == flat[:, 0].round()).all()
        check_data(whole_t, name, inds, "positions with whole frame indices t")
    if torch.compiler.is_compiling():
        top = torch.tensor(thw, device=flat.device) - 1
        inside = ((flat >= 0) & (flat <= top)).all()
        check_data(inside, name, inds, f"positions inside the (T, H, W) = {thw} video")
        return
    lo = flat.amin(0).tolist()
    hi = flat.amax(0).tolist()
    for i, size in enumerate(thw):
        if lo[i] < 0 or hi[i] > size - 1:
            axis = "thw"[i]
            fail(
                name,
                inds,
                f"positions inside the video, 0 <= {axis} <= {size - 1} "
                f"(found {axis} in [{lo[i]}, {hi[i]}])",
            )


def check_patch_geometry(ps: object, pt: object, dilation: object, border: object) -> None:
    check_int("ps", ps, min_value=1)
    check_int("pt", pt, min_value=1)
    check_int("dilation", dilation, min_value=1)
    check_choice("border", border, BORDERS)


def check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, torch.Tensor) or not isinstance(shape, Sequence):
        fail("shape", shape, "a sequence of 5 or 6 ints", TypeError)
    if len(shape) not in (5, 6) or any(
        isinstance(s, bool) or not isinstance(s, int) for s in shape
    ):
        fail("shape", shape, "5 ints (B, T, C, H, W) or 6 ints (B, HD, T, C, H, W)")
    if shape[0] < 0 or any(s < 1 for s in shape[1:]):
        fail("shape", tuple(shape), "a batch size >= 0 and all other sizes >= 1")
    return tuple(int(s) for s in shape)
