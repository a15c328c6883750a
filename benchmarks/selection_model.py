"""How often the search row kernel's warps must insert into their top-k, counted on the CPU.

The row kernel (``_search_rows_kernel``) gives each lane one query and walks the window
displacement by displacement; a lane keeps its k best candidates sorted in registers, and the
insert is a branch the whole warp runs when any of its 32 lanes keeps its candidate. This script
computes every window distance of the interior queries of a crop of the benchmark's own data
(``torch.rand``, as ``benchmarks/search.py``), in window order, and counts:

- the per-lane insert rate (a candidate below the lane's current k-th best);
- the rate at which a group of 32 lanes inserts, for the kernel's grouping (32 consecutive
  columns of one row) and others (2 x 16, 4 x 8 blocks; 16 and 8 lanes; 32 random queries);
- the candidates at or below a bound taken from a neighbouring query's result (its k best
  displacements evaluated at this query): the list a lane would keep if it appended instead of
  inserting, with that bound from the start.

    python benchmarks/selection_model.py [--row W3|W1s] [--size 96]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

ROWS = {  # (frames, channels, ps, ws, wt, k): the search rows of benchmarks/search.py
    "W3": (1, 3, 7, 21, 0, 14),
    "W1s": (5, 3, 7, 21, 2, 14),
}


def window_distances(vid: torch.Tensor, ps: int, ws: int, wt: int) -> torch.Tensor:
    """(candidates, h, w) L2 patch distances of the queries of the middle frame of ``vid`` (T,
    C, H, W) at least ``ws // 2 + ps // 2`` pixels inside, in window order (frame, row, column),
    its own position left out (+inf)."""
    t, c, h, w = vid.shape
    r, p = ws // 2, ps // 2
    q = vid[t // 2]
    pad = F.pad(vid, (r, r, r, r), mode="reflect")
    out = []
    for dt in range(-wt, wt + 1):
        for a in range(ws):
            for b in range(ws):
                e = (q - pad[t // 2 + dt, :, a : a + h, b : b + w]).square().sum(0)
                d = F.avg_pool2d(e[None, None], ps, stride=1)[0, 0] * ps * ps  # centres p..h-p
                if dt == 0 and a == r and b == r:
                    d = torch.full_like(d, float("inf"))
                out.append(d[r : h - 2 * p - r, r : w - 2 * p - r])
    return torch.stack(out)


def insert_flags(dist: torch.Tensor, k: int) -> torch.Tensor:
    """(candidates, h, w) bool: the candidate is below the lane's k-th best so far."""
    best = torch.full((k, *dist.shape[1:]), float("inf"))
    flags = torch.empty(dist.shape, dtype=torch.bool)
    for i in range(dist.shape[0]):
        flags[i] = dist[i] < best[-1]
        best = torch.cat([best, dist[i][None]]).topk(k, dim=0, largest=False).values
        best = best.sort(0).values
    return flags


def group_rate(flags: torch.Tensor, rows: int, cols: int) -> float:
    """Fraction of (candidate, group) pairs where some lane of a ``rows x cols`` block inserts."""
    n, h, w = flags.shape
    h, w = h // rows * rows, w // cols * cols
    f = flags[:, :h, :w].reshape(n, h // rows, rows, w // cols, cols).transpose(2, 3)
    return f.reshape(n, h // rows, w // cols, rows * cols).any(-1).float().mean().item()


def seeded_lists(dist: torch.Tensor, k: int, dy: int, dx: int) -> torch.Tensor:
    """Per query, the candidates at or below the largest of its distances at the k best
    displacements of the query ``(dy, dx)`` before it."""
    n, h, w = dist.shape
    best = dist.topk(k, dim=0, largest=False).indices[:, : h - dy, : w - dx]
    here = dist[:, dy:, dx:]
    bound = torch.gather(here, 0, best).max(0).values
    return (here <= bound).sum(0).float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row", choices=sorted(ROWS), default="W3")
    parser.add_argument("--size", type=int, default=96, help="side of the interior crop")
    args = parser.parse_args()
    t, c, ps, ws, wt, k = ROWS[args.row]
    side = args.size + 2 * (ws // 2 + ps // 2)
    torch.manual_seed(0)
    dist = window_distances(torch.rand(t, c, side, side), ps, ws, wt)
    n = dist.shape[0]
    print(f"{args.row}: {n} candidates, k {k}, {dist[0].numel()} queries ({args.size}^2 crop)")
    flags = insert_flags(dist, k)
    print(f"per-lane insert rate: {flags.float().mean().item():.3f}")
    groups = {"1 x 32 (the row kernel)": (1, 32), "2 x 16": (2, 16), "4 x 8": (4, 8),
              "1 x 16": (1, 16), "1 x 8": (1, 8)}  # fmt: skip
    for name, (rows, cols) in groups.items():
        print(f"insert rate of a group of {name} lanes: {group_rate(flags, rows, cols):.3f}")
    perm = torch.randperm(flags[0].numel())
    mixed = flags.reshape(n, -1)[:, perm].reshape(n, 1, -1)
    print(f"insert rate of 32 random queries: {group_rate(mixed, 1, 32):.3f}")
    for name, (dy, dx) in {"row above": (1, 0), "two rows above": (2, 0),
                           "column to the left": (0, 1)}.items():  # fmt: skip
        lists = seeded_lists(dist, k, dy, dx)
        w = lists.shape[1] // 32 * 32
        warp = lists[:, :w].reshape(lists.shape[0], -1, 32).max(-1).values
        print(
            f"bound from the {name}'s result: {lists.mean().item():.1f} candidates per query "
            f"(median {lists.median().item():.0f}, max {lists.max().item():.0f}); fullest lane "
            f"of 32: mean {warp.mean().item():.1f}"
        )


if __name__ == "__main__":
    main()
