"""Scale: non-local means on very large images and search over long videos, in bounded memory.

Workloads (issue "Scale"):
- ``nlm``: k-NN non-local means of an RGB image of ``--size`` (default 5000x5000 on CUDA),
  ps 11, ws 21, k 14, through :func:`dnls.apps.nlm` with a memory budget (``--budget``).
- ``video``: search over ``--frames`` frames of 540x960 RGB (wt 3, ws 15, ps 7, k 10), in query
  batches planned for the budget; each batch's results are reduced (a checksum) and dropped,
  as a consumer that streams them would.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the whole run (inputs included);
on CPU the process's peak RSS (``ru_maxrss``) and its growth over the run. Time: wall clock,
synchronised, one run after a small warm-up.

    python benchmarks/scale.py nlm --size 5000 --budget 4e9
    python benchmarks/scale.py video --frames 128 --budget 8e9
    python benchmarks/scale.py nlm --device cpu --size 2048 --budget 2.5e9
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

import dnls
from dnls.apps.nlm import nlm


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def test_image(size_h: int, size_w: int, device) -> torch.Tensor:
    """A smooth-plus-edges RGB image in [0, 1], built in place on the device (no big host copy)."""
    y = torch.linspace(0, 1, size_h, device=device)[:, None]
    x = torch.linspace(0, 1, size_w, device=device)[None, :]
    img = torch.empty(1, 1, 3, size_h, size_w, device=device)
    img[0, 0, 0] = 0.5 + 0.4 * torch.sin(40 * x + 7 * y)
    img[0, 0, 1] = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).float() * 0.6 + 0.2
    img[0, 0, 2] = 0.3 + 0.4 * (x > y).float()
    return img


def run_nlm(args, device) -> dict:
    h, w = (args.size, args.size) if args.height is None else (args.height, args.size)
    sigma = 20 / 255
    warm = test_image(64, 64, device)
    nlm(warm, sigma, ps=args.ps, ws=args.ws, k=args.k)  # compile / load kernels
    sync(device)
    gen = torch.Generator(device=device).manual_seed(0)
    clean = test_image(h, w, device)
    noisy = clean + sigma * torch.randn(clean.shape, generator=gen, device=device)
    del gen
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_bytes(device)
    start = time.perf_counter()
    out = nlm(noisy, sigma, ps=args.ps, ws=args.ws, k=args.k, max_memory=int(args.budget))
    sync(device)
    seconds = time.perf_counter() - start
    peak = peak_bytes(device)
    psnr_in = -10 * math.log10(float((noisy.clamp(0, 1) - clean).square().mean()))
    psnr_out = -10 * math.log10(float((out.clamp(0, 1) - clean).square().mean()))
    return dict(
        workload=f"nlm {h}x{w} RGB ps{args.ps} ws{args.ws} k{args.k}", seconds=round(seconds, 2),
        peak_gb=round(peak / 1e9, 3), growth_gb=round((peak - before) / 1e9, 3),
        budget_gb=args.budget / 1e9, psnr_noisy=round(psnr_in, 2), psnr_out=round(psnr_out, 2),
        unfolded_knn_patches_gb=round(h * w * args.k * 3 * args.ps**2 * 4 / 1e9, 1),
    )  # fmt: skip


def run_video(args, device) -> dict:
    t, h, w = args.frames, 540, 960
    kw = dict(ws=15, wt=3, ps=7, k=10)
    dnls.search(torch.rand(1, 7, 3, 32, 32, device=device), **kw)  # compile / load kernels
    vid = torch.rand(1, t, 3, h, w, device=device)
    grid = dnls.query_grid(vid.shape)
    # Per query the search returns K distances (4 B), positions (12 B) and window indices
    # (4 B); half the budget left after the video goes to one batch.
    free = args.budget - vid.numel() * 4
    batch = max(w, int(free / 2 / (kw["k"] * 20)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_bytes(device)
    sync(device)
    start = time.perf_counter()
    check = torch.zeros((), device=device, dtype=torch.float64)
    nbatches = 0
    for s, c in grid.batches(batch):
        dists, inds = dnls.search(vid, start=s, count=c, **kw)
        check += dists.double().sum()
        nbatches += 1
        del dists, inds
    sync(device)
    seconds = time.perf_counter() - start
    peak = peak_bytes(device)
    return dict(
        workload=f"search {t}x540x960 RGB wt3 ws15 ps7 k10", seconds=round(seconds, 2),
        queries=grid.count, batch=batch, batches=nbatches, peak_gb=round(peak / 1e9, 3),
        growth_gb=round((peak - before) / 1e9, 3), budget_gb=args.budget / 1e9,
        all_outputs_gb=round(grid.count * kw["k"] * 20 / 1e9, 1), checksum=float(check),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["nlm", "video"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=5000, help="image width (and height)")
    parser.add_argument("--height", type=int, default=None, help="image height if not square")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--budget", type=float, default=4e9, help="bytes")
    parser.add_argument("--ps", type=int, default=11)
    parser.add_argument("--ws", type=int, default=21)
    parser.add_argument("--k", type=int, default=14)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = run_nlm(args, device) if args.workload == "nlm" else run_video(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result.update(device=name, threads=torch.get_num_threads(), torch=torch.__version__)
    print(json.dumps(result))  # noqa: T201
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
