"""Channels-last and channels-first copies of 6-D videos ``(B, HD, T, C, H, W)`` for the Triton
launchers, by one tiled transpose kernel.

Kernels that read many channels per pixel take a channels-last copy of the video (each pixel's
channels one run of memory), and their channels-last results are copied back. PyTorch's copy of
a permuted tensor moved about 0.94 TB/s on the H100 (ncu: 77 us for a 42 MB video of 128
channels, BENCHMARKS.md); a transpose by tiles reads and writes whole lines on both sides.

Imported only by the Triton launchers, so ``import dnls`` never needs Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import next_power_of_2

# Elements per tile of the transpose kernel, and its warps.
TILE = 4096
WARPS = 4
# Offsets from this size on are 64-bit (the tests lower it to take that path at small sizes).
WIDE = 2**31
# False: PyTorch's copies instead of the kernel (benchmarks/patches.py --rows layoutcopy).
KERNEL = True
# CUDA tensors of fewer elements take PyTorch's copy: on the H100 the kernel's launch cost the
# host about 40 us more per copy, and the kernel saves about 0.6 ns of GPU time per element
# (1.0 against 2.9 TB/s, 8 bytes moved per fp32 element), so it pays from about this size.
# (The interpreter runs the kernel at every size: that is how the tests reach it.)
CUDA_MIN = 1 << 22


@triton.jit
def _transpose_kernel(
    src, dst, I, J, N1, N2, s_0, s_1, s_2, s_i, s_j, TILES_J,
    BI: tl.constexpr, BJ: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """``dst[n, j, i] = src[n0, n1, n2, i, j]``, ``n = (n0 * N1 + n1) * N2 + n2``, ``dst``
    contiguous ``(N, J, I)``, ``src`` any strides: one ``BI x BJ`` tile per program (read along
    ``j``, written along ``i``; Triton exchanges the two layouts through shared memory), ``n``
    on the grid's second axis."""
    tile = tl.program_id(0)
    n = tl.program_id(1)
    if I64:
        n = n.to(tl.int64)
    base = (n // (N1 * N2)) * s_0 + ((n // N2) % N1) * s_1 + (n % N2) * s_2
    i = (tile // TILES_J) * BI + tl.arange(0, BI)
    j = (tile % TILES_J) * BJ + tl.arange(0, BJ)
    m = (i < I)[:, None] & (j < J)[None, :]
    if I64:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    v = tl.load(src + base + i[:, None] * s_i + j[None, :] * s_j, mask=m)
    tl.store(dst + n * (I * J) + j[None, :] * I + i[:, None], v, mask=m)


def _transposed(src: torch.Tensor) -> torch.Tensor:
    """``src (N0, N1, N2, I, J)``, any strides, as a contiguous ``(N0 * N1 * N2, J, I)``
    tensor."""
    n0, n1, n2, i, j = src.shape
    n = n0 * n1 * n2
    out = torch.empty(n, j, i, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    if n > 65535:  # (the grid's second axis)
        return out.view(n0, n1, n2, j, i).copy_(src.transpose(3, 4)).view(n, j, i)
    bi = min(next_power_of_2(i), TILE // 16)
    bj = min(next_power_of_2(j), TILE // bi)
    bi = min(next_power_of_2(i), TILE // bj)
    tiles_j = triton.cdiv(j, bj)
    span = sum((s - 1) * abs(st) for s, st in zip(src.shape, src.stride(), strict=True))
    _transpose_kernel[(triton.cdiv(i, bi) * tiles_j, n)](
        src, out, i, j, n1, n2, *src.stride(), tiles_j, BI=bi, BJ=bj,
        I64=max(out.numel(), span + 1) >= WIDE, num_warps=WARPS,
    )  # fmt: skip
    return out


def _transposes(x: torch.Tensor) -> bool:
    """Whether the transpose kernel copies ``x`` (else PyTorch's copy)."""
    return KERNEL and (x.device.type != "cuda" or x.numel() >= CUDA_MIN)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x (B, HD, T, C, H, W)`` itself when it is a dense channels-last tensor, else a view,
    with the same logical shape, of a channels-last copy (strides of ``(B, HD, T, H, W, C)``)."""
    b, hd, t, c, h, w = x.shape
    if x.permute(0, 1, 2, 4, 5, 3).is_contiguous():
        return x
    step = x.stride(5) if w > 1 else x.stride(4)  # (one stride must walk the pixels)
    if not _transposes(x) or (h > 1 and w > 1 and x.stride(4) != w * step):
        return x.permute(0, 1, 2, 4, 5, 3).contiguous().permute(0, 1, 2, 5, 3, 4)
    src = x.as_strided((b, hd, t, c, h * w), (*x.stride()[:4], step), x.storage_offset())
    return _transposed(src).view(b, hd, t, h, w, c).permute(0, 1, 2, 5, 3, 4)


def channels_inner(x: torch.Tensor) -> torch.Tensor:
    """``x (B, HD, T, C, H, W)`` itself when its channels are contiguous (or one), whatever its
    other strides (kernels that take every stride and read each pixel's channels as one run),
    else :func:`channels_last`."""
    if x.stride(3) == 1 or x.shape[3] == 1:
        return x
    return channels_last(x)


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """``x (B, HD, T, C, H, W)`` as a contiguous tensor: itself, a transposed copy of a dense
    channels-last tensor, or (other layouts) ``x.contiguous()``."""
    b, hd, t, c, h, w = x.shape
    if x.is_contiguous():
        return x
    if not (_transposes(x) and x.permute(0, 1, 2, 4, 5, 3).is_contiguous()):
        return x.contiguous()
    src = x.permute(0, 1, 2, 4, 5, 3).reshape(b, hd, t, h * w, c)  # (a view: dense)
    return _transposed(src).view(x.shape)
