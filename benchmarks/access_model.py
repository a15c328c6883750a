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

Then two floors for any kernel that gathers the patches from memory, whatever its walk:

- "patch rows": each patch row read at once (a warp's load never splits a row, never joins two
  patches): the lines of a patch's own rows, channels-first (3 x 7 runs of 28 bytes) or
  channels-last (7 runs of 84 bytes);
- "tile union": a tile of consecutive queries reads the union of its patches once (staged in
  shared memory, then read from there): the lines of that union, per value gathered.

Each count becomes a time for the benchmark row's 131072 queries at one 128-byte line per SM
and cycle (the L1's rate the eighth session's profile agrees with; the H100 and the H200 both
have 132 SMs at 1.98 GHz, so the same time on both), against the time at which wpsum would
reach 50% of the copy bandwidth on the bytes ``benchmarks/patches.py`` counts for it. Last,
gather's flat pass: the lines of its loads and of its stores (it writes every value it
gathers), against the time its bytes take at the copy bandwidth.

    python benchmarks/access_model.py [--queries 4096]

With ``--fold``, the sectors that ifold's fold kernel reads per byte of patches, by its launch
(rows, pixels and channels per program): a line holds parts of consecutive rows of a patch,
which land on consecutive rows of pixels, so programs of more rows read fewer sectors again.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import dnls

ROW = dict(shape=(1, 1, 3, 1024, 1024), ws=21, ps=7, k=14)
BENCH_QUERIES = 1 << 17  # benchmarks/patches.py's default --queries
SMS, CLOCK = 132, 1.98e9  # H100 SXM and H200: SMs, boost clock (Hz)
COPY = {"H100": 2.9e12, "H200": 4.25e12}  # copy bandwidth (B/s): the issue's; measured


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
        ln, sec = _per_warp((base[:, None] + eoff[None, :]).ravel() * 4)
        lines.append(ln)
        sectors.append(sec)
    return float(np.mean(lines)), float(np.mean(sectors))


def _per_warp(addr: np.ndarray) -> tuple[float, float]:
    """Mean distinct lines and sectors of each run of 32 consecutive byte addresses."""
    addr = addr[: addr.size // 32 * 32].reshape(-1, 32)
    return (float(np.mean([np.unique(a // 128).size for a in addr])),
            float(np.mean([np.unique(a // 32).size for a in addr])))  # fmt: skip


def count_gather(pos: np.ndarray, order: str, c: int, ps: int, w: int) -> tuple[float, float]:
    """Mean lines per warp load and per warp store of gather's flat pass: 32 consecutive values
    of the run of the patches in (query, neighbour) order; the output is that run in the
    patch's own order, so the stores of the pixel-major walk ("flatpix") are scattered."""
    eoff = element_offsets(c, ps, w, order)
    scale = 1 if order == "flat" else c
    base = (pos[..., 0] * w + pos[..., 1]).ravel() * scale
    loads = _per_warp((base[:, None] + eoff[None, :]).ravel() * 4)[0]
    e = c * ps * ps
    if order == "flat":
        dst = np.arange(e)
    else:  # the pixel-major walk's place in the patch's own order (channel, row, column)
        p, ch = np.divmod(np.arange(e), c)
        dst = ch * ps * ps + p
    stores = _per_warp((np.arange(base.size)[:, None] * e + dst[None, :]).ravel() * 4)[0]
    return loads, stores


def lines_of(addr: np.ndarray) -> int:
    return np.unique(addr // 128).size


def floors(pos: np.ndarray, c: int, ps: int, w: int, tiles=(8, 32)) -> dict[str, float]:
    """Lines per value gathered when each patch's rows are read whole, channels-first and
    channels-last, and when a tile of consecutive queries reads the union of its patches."""
    q, k = pos.shape[:2]
    e = c * ps * ps
    base = pos[..., 0] * w + pos[..., 1]  # (Q, K) pixel offsets
    first = element_offsets(c, ps, w, "flat")  # channel planes of w * 1024 pixels
    last = element_offsets(c, ps, w, "flatpix")
    out = {}
    for name, eoff, scale in (("patch rows, channels-first", first, 1),
                              ("patch rows, channels-last", last, c)):  # fmt: skip
        rows = eoff.reshape(-1, ps * (c if scale > 1 else 1))  # one patch row each
        n = 0
        for b in base.ravel():
            n += sum(lines_of((b * scale + r) * 4) for r in rows)
        out[name] = n / (q * k * e)
    for t in tiles:
        n = 0
        for q0 in range(0, q - t + 1, t):
            b = base[q0 : q0 + t].ravel()
            n += lines_of(((b[:, None] * c) + last[None, :]).ravel() * 4)
        out[f"tile union, {t} queries, channels-last"] = n / ((q // t) * t * k * e)
    return out


def fold_sectors(c: int, ps: int, hw: int, rows: int, block_x: int, block_c: int,
                 programs: int = 8) -> float:  # fmt: skip
    """ifold's fold kernel (``_fold_kernel``, no reflected source): the 32-byte sectors of the
    patches ``(hw * hw, c, ps, ps)`` that its programs of ``rows x block_x`` pixels and
    ``block_c`` channels read, each counted once per program (as if a program's L1 kept every
    sector it touched, and nothing were shared between programs), per byte of the patches.
    Counted on ``programs`` bands of rows in the middle of the frame."""
    e, half = c * ps * ps, ps // 2
    i = np.arange(ps)[None, None, :, None]
    j = np.arange(ps)[None, None, None, :]
    sectors = pixels = 0
    for y0 in range(hw // 2, hw // 2 + programs * rows, rows):
        ys = np.arange(y0, y0 + rows)[:, None, None, None]
        for x0 in range(0, hw, block_x):
            xs = (x0 + np.arange(block_x))[None, :, None, None]
            qy, qx = ys - (i - half), xs - (j - half)
            ok = np.broadcast_to(
                (qx >= 0) & (qx < hw) & (qy >= 0) & (qy < hw), (rows, block_x, ps, ps)
            )
            q = qy * hw + qx
            for c0 in range(0, c, block_c):
                cs = np.arange(c0, min(c0 + block_c, c))
                addr = (q[..., None] * e + ((cs * ps + i[..., None]) * ps + j[..., None])) * 4
                sectors += np.unique(addr[ok] // 32).size
                pixels += rows * block_x * cs.size
    return sectors * 32 / (pixels * ps * ps * 4)


def fold_main() -> None:
    """The fold kernel's sectors per byte of patches on ifold's two rows of
    ``benchmarks/patches.py``, by rows, pixels and channels per program."""
    print("ifold: 32-byte sectors read per byte of patches (each program's own, once)")
    for c, ps, hw, launches in (
        (3, 7, 1024, ((1, 256, 1), (2, 128, 1), (4, 64, 1), (4, 128, 1), (8, 32, 1), (8, 64, 1),
                      (8, 64, 3))),
        (64, 3, 256, ((1, 16, 64), (2, 8, 64), (2, 16, 64), (4, 8, 64), (4, 16, 64), (8, 8, 64))),
    ):  # fmt: skip
        for rows, block_x, block_c in launches:
            got = fold_sectors(c, ps, hw, rows, block_x, block_c)
            print(f"  C{c} ps{ps} {hw}²: {rows} rows x {block_x} pixels, {block_c} channels: "
                  f"{got:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--fold", action="store_true", help="ifold's sectors instead")
    args = parser.parse_args()
    if args.fold:
        fold_main()
        return
    torch.manual_seed(0)
    vid = torch.rand(ROW["shape"])
    _, inds = dnls.search(vid, ws=ROW["ws"], ps=ROW["ps"], k=ROW["k"], count=args.queries)
    pos = inds[0, 0, :, :, 1:].numpy().astype(np.int64)  # (Q, K, (y, x)), one frame
    c, ps, w = ROW["shape"][2], ROW["ps"], ROW["shape"][4]
    print(f"K14 ps7 C3 1024², {args.queries} queries of a search, per warp load of wpsum:")
    for order in ("flat", "flatpix"):
        lines, sectors = count(pos, order, c, ps, w)
        print(f"{order:8s} {lines:.2f} lines of 128 B, {sectors:.2f} sectors of 32 B")
    values = BENCH_QUERIES * ROW["k"] * c * ps * ps
    moved = 4 * c * ROW["shape"][3] * w + 16 * BENCH_QUERIES * ROW["k"] + 4 * values // ROW["k"]
    target = ", ".join(f"{moved / (bw / 2) * 1e6:.0f} us on the {d}" for d, bw in COPY.items())
    print(f"wpsum's row: {BENCH_QUERIES} queries, {values / 1e6:.0f} M values gathered, "
          f"{moved / 1e6:.0f} MB moved; 50% of the copy bandwidth is {target}.")  # fmt: skip
    per_value = {order: count(pos, order, c, ps, w)[0] / 32 for order in ("flat", "flatpix")}
    per_value.update(floors(pos[: args.queries // 4], c, ps, w))
    print("Lines per value gathered, and the time at one line per SM and cycle:")
    for name, lines in per_value.items():
        print(f"  {name:40s} {lines:.4f} {lines * values / SMS / CLOCK * 1e6:5.0f} us")
    smem = values * 4 / 128 / SMS / CLOCK * 1e6
    print(f"The gathered values read from shared memory at 128 B per SM and cycle: {smem:.0f} us")
    # gather writes every gathered value: its L1 serves the loads' lines and the stores'
    moved = 4 * c * ROW["shape"][3] * w + 16 * BENCH_QUERIES * ROW["k"] + 4 * values
    dram = ", ".join(f"{moved / bw * 1e6:.0f} us on the {d}" for d, bw in COPY.items())
    print(f"gather's row: {moved / 1e6:.0f} MB moved, at the copy bandwidth {dram}.")
    print("Lines per warp load and store, and the L1's time for both:")
    for order in ("flat", "flatpix"):
        loads, stores = count_gather(pos, order, c, ps, w)
        l1 = (loads + stores) * values / 32 / SMS / CLOCK * 1e6
        print(f"  {order:40s} {loads:.2f} {stores:.2f} {l1:5.0f} us")


if __name__ == "__main__":
    main()
