"""How many memory lines a warp's load touches when the staged kernel's flat pass reads patches,
counted on the CPU.

The flat pass (``_flat_pass`` in ``ops/_patches_triton.py``) gives consecutive lanes consecutive
values of a run of patches, and each lane loads its own value: a warp's load reads 32 values of
a patch (or of two) at once. Where those 32 addresses fall decides how many 128-byte lines (and
32-byte sectors) the L1 must serve for that one instruction. This script takes the positions
of a real search on the K14 row of ``benchmarks/patches.py`` (ps 7, 3 channels, 1024², k 14, on
``torch.rand``; a crop of its queries), walks each patch in the kernel's order and counts, per
warp load of wpsum (one neighbour of each query at a time):

- "flat": the video channels-first, values in the patch's own order (channel, row, column);
- "flatpix": the video channels-last, values pixel by pixel (row, column, channel).

    python benchmarks/access_model.py [--queries 4096]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import dnls

ROW = dict(shape=(1, 1, 3, 1024, 1024), ws=21, ps=7, k=14)


def element_offsets(c: int, ps: int, w: int, order: str) -> np.ndarray:
    """In-video offset (elements) of each patch value, in the kernel's walk order."""
    ch, oy, ox = np.meshgrid(np.arange(c), np.arange(ps) - ps // 2, np.arange(ps) - ps // 2,
                             indexing="ij")  # fmt: skip
    if order == "flat":  # (C, H, W) video, walk (channel, row, column)
        return (ch * ROW["shape"][3] * w + oy * w + ox).ravel()
    # (H, W, C) video, walk (row, column, channel)
    ch, oy, ox = (a.transpose(1, 2, 0) for a in (ch, oy, ox))
    return ((oy * w + ox) * c + ch).ravel()


def count(pos: np.ndarray, order: str, c: int, ps: int, w: int) -> tuple[float, float]:
    """Mean distinct 128-byte lines and 32-byte sectors per warp load of wpsum: for each
    neighbour, 32 consecutive values of the run of the queries' patches."""
    eoff = element_offsets(c, ps, w, order)
    scale = 1 if order == "flat" else c
    lines, sectors = [], []
    for j in range(pos.shape[1]):
        base = (pos[:, j, 0] * w + pos[:, j, 1]) * scale
        addr = (base[:, None] + eoff[None, :]).ravel() * 4
        addr = addr[: addr.size // 32 * 32].reshape(-1, 32)
        lines.append(np.mean([np.unique(a // 128).size for a in addr]))
        sectors.append(np.mean([np.unique(a // 32).size for a in addr]))
    return float(np.mean(lines)), float(np.mean(sectors))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    vid = torch.rand(ROW["shape"])
    _, inds = dnls.search(vid, ws=ROW["ws"], ps=ROW["ps"], k=ROW["k"], count=args.queries)
    pos = inds[0, 0, :, :, 1:].numpy().astype(np.int64)  # (Q, K, (y, x)), one frame
    c, ps, w = ROW["shape"][2], ROW["ps"], ROW["shape"][4]
    print(f"K14 ps7 C3 1024², {args.queries} queries of a search, per warp load of wpsum:")
    for order in ("flat", "flatpix"):
        lines, sectors = count(pos, order, c, ps, w)
        print(f"{order:8s} {lines:.2f} lines of 128 B, {sectors:.2f} sectors of 32 B")


if __name__ == "__main__":
    main()
