"""Memory planning: how many queries one batch of a patch pipeline may hold within a budget.

Every op that walks the query grid takes ``start``/``count``, so a pipeline (search -> weights
-> wpsum -> ifold, or search -> gather -> ...) runs in batches whose working set grows with the
batch, not with the video. :func:`plan_batches` turns a byte budget into a batch size from the
shapes alone, by the sizes of what each step holds per query (its outputs and temporaries)
plus what the whole call holds whatever the batch (the video, the folded output and counts, the
CPU kernels' padded frames and the reference path's fixed workspace).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks

STEPS = ("search", "weights", "gather", "wpsum", "ifold")

# The reference (pure PyTorch) search works in chunks of this many elements (ops/search.py);
# its temporaries are about four int64/float64 tensors of that size.
_REFERENCE_WORKSPACE = 4 * 8 * 2**20
# Allocator slack on top of the model.
_MARGIN = 1.25


def plan_batches(
    shape: Sequence[int],
    max_memory: int,
    *,
    k: int,
    ps: int = 1,
    pt: int = 1,
    dtype: torch.dtype = torch.float32,
    steps: Sequence[str] = ("search", "weights", "wpsum", "ifold"),
    device: torch.device | str = "cpu",
) -> int:
    """Queries per batch that keep a pipeline over the query grid within ``max_memory`` bytes.

    Args:
        shape: the video's shape ``(B, T, C, H, W)``.
        max_memory: the budget in bytes for the whole call, the input video included.
        k: neighbours per query; ps, pt: the patch.
        dtype: the video's dtype.
        steps: what each batch runs, among ``"search"`` (dists, positions, window indices),
            ``"weights"`` (a softmax over the K distances), ``"gather"`` (the K patches),
            ``"wpsum"`` (one weighted patch) and ``"ifold"`` (a folded output and counts the
            size of the video, held across batches).
        device: where it runs; on CPU the fused kernels' padded frames and the reference
            path's workspace are counted.

    Returns:
        The batch size, at least 1: use it with ``dnls.query_grid(shape).batches(size)``.

    Raises:
        ValueError: when the budget does not hold the fixed part and one query.

    Example:
        >>> dnls.plan_batches((1, 1, 3, 512, 512), 2**30, k=14, ps=5)
        778686
    """
    shape = _checks.check_shape(shape)
    if len(shape) != 5:
        _checks.fail("shape", shape, "5 ints (B, T, C, H, W)")
    max_memory = _checks.check_int("max_memory", max_memory, min_value=1)
    k = _checks.check_int("k", k, min_value=1)
    ps = _checks.check_int("ps", ps, min_value=1)
    pt = _checks.check_int("pt", pt, min_value=1)
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        _checks.fail("steps", steps, f"a sequence of names among {STEPS}", TypeError)
    if not steps or any(s not in STEPS for s in steps):
        _checks.fail("steps", steps, f"a non-empty sequence of names among {STEPS}")
    if dtype not in _checks.FLOAT_DTYPES:
        _checks.fail("dtype", dtype, "float16, bfloat16, float32 or float64", TypeError)
    device = _checks.check_device_name("device", device)
    b, t, c, h, w = shape
    size = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    frames = b * t * h * w
    patch = pt * c * ps * ps
    fixed = size * frames * c  # the input video
    per_query = 0
    if "search" in steps:
        per_query += k * (size + 12 + 4)  # dists, positions (int32 or float32), window indices
    if "weights" in steps:
        per_query += 3 * k * acc
    if "gather" in steps:
        per_query += k * patch * size
    if "wpsum" in steps:
        per_query += patch * (size + acc)
    if "ifold" in steps:
        fixed += 2 * size * frames * c + acc * frames  # output, counts, the averaged result
    if device.type == "cpu":
        # padded frames of the fused CPU kernels, and the reference path's workspace
        fixed += 3 * acc * b * t * (h + ps) * (w + ps) * c + _REFERENCE_WORKSPACE
    need = fixed + per_query * _MARGIN
    if max_memory < need:
        _checks.fail("max_memory", max_memory, f"at least {int(need) + 1} bytes for this video")
    if per_query == 0:  # ("ifold" alone holds nothing per query): the whole grid at once
        return b * t * h * w
    return max(1, int((max_memory - fixed) / (per_query * _MARGIN)))
