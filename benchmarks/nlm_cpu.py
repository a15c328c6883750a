"""dnls.apps.nlm on CPU: astronaut 512x512 RGB, sigma 20/255, PSNR, wall time and CPU time
(best and median of N after a warm-up), with scikit-image's NLM (fast and classic) on the same
noisy image. Runs the library as a user gets it: no environment variables are set.

    python benchmarks/nlm_cpu.py [--threads 2] [--repeat 7] [--classic] [--stages]

``--stages`` also times each stage of one whole-image pass (search, weights, wpsum, ifold)
on one thread, in CPU seconds. Wall times on a shared machine are noisy upward: the script
prints the load average before and after, and CPU time (all threads of this process), which
load inflates far less.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numba
import numpy as np
import torch
from skimage import data
from skimage.restoration import denoise_nl_means

from dnls.apps import nlm
from dnls.apps.nlm import PS, WS, H, K, _weights
from dnls.ops.fold import ifold
from dnls.ops.patches import wpsum
from dnls.ops.search import search


def psnr(a, b):
    return float(10 * np.log10(1 / np.mean((np.clip(a, 0, 1) - b) ** 2)))


def stages(x, sigma):
    """CPU seconds of each stage of one whole-image nlm pass, on one thread."""
    threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    out = {}

    def timed(name, fn):
        start = time.process_time()
        res = fn()
        out[name] = out.get(name, 0.0) + time.process_time() - start
        return res

    with torch.no_grad():
        for _ in range(2):  # the first pass warms up; keep the second
            out.clear()
            dists, inds = timed("search", lambda: search(x, ws=WS, ps=PS, k=K))
            npix = PS * PS * x.shape[2]
            weights = timed("weights", lambda: _weights(dists, npix, sigma, H))  # noqa: B023
            patches = timed("wpsum", lambda: wpsum(x, weights, inds, ps=PS)[:, 0])  # noqa: B023
            vid, cnt = timed("ifold", lambda: ifold(patches, shape=x.shape))  # noqa: B023
            timed("divide", lambda: vid / cnt)  # noqa: B023
    torch.set_num_threads(threads[0])
    numba.set_num_threads(threads[1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--classic", action="store_true", help="also scikit-image's slow NLM")
    ap.add_argument("--stages", action="store_true", help="time each stage on one thread")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    commit = (
        os.environ.get("DNLS_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"{os.cpu_count()} cores seen, torch {torch.__version__}, numba {numba.__version__}, "
          f"commit {commit}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    sigma = 20 / 255
    clean = data.astronaut().astype(np.float32) / 255
    noisy = (clean + sigma * np.random.default_rng(0).standard_normal(clean.shape)).astype(
        np.float32
    )
    x = torch.from_numpy(noisy).permute(2, 0, 1)[None, None].contiguous()
    nlm(x[..., :64, :64], sigma)
    walls, cpus = [], []
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        y = nlm(x, sigma)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    out = y[0, 0].permute(1, 2, 0).numpy()
    print(f"dnls nlm ps={PS} ws={WS} k={K} h={H}: PSNR {psnr(out, clean):.2f} dB, "
          f"wall best {min(walls):.3f} s, median {np.median(walls):.3f} s; "
          f"CPU best {min(cpus):.3f} s, median {np.median(cpus):.3f} s "
          f"(N={args.repeat}, numba threading layer {numba.threading_layer()})")  # fmt: skip
    if args.stages:
        parts = stages(x, sigma)
        print("one thread, CPU s: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
              + f", total {sum(parts.values()):.3f}")  # fmt: skip
    for fast in (True, False) if args.classic else (True,):
        t = time.perf_counter()
        sk = denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, patch_size=5,
                              patch_distance=6, fast_mode=fast, channel_axis=-1)  # fmt: skip
        print(f"scikit-image NLM fast_mode={fast}: PSNR {psnr(sk, clean):.2f} dB, "
              f"{time.perf_counter() - t:.3f} s")  # fmt: skip
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
