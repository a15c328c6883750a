"""dnls.apps.nlm on CPU: astronaut 512x512 RGB, sigma 20/255, PSNR and wall time (best of N
after a warm-up), with scikit-image's NLM (fast and classic) on the same noisy image.

    python benchmarks/nlm_cpu.py [--threads 2] [--repeat 5] [--classic]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np
import torch
from skimage import data
from skimage.restoration import denoise_nl_means

from dnls.apps import nlm
from dnls.apps.nlm import PS, WS, H, K


def psnr(a, b):
    return float(10 * np.log10(1 / np.mean((np.clip(a, 0, 1) - b) ** 2)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--classic", action="store_true", help="also scikit-image's slow NLM")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"{os.cpu_count()} cores seen, torch {torch.__version__}, commit {commit}")  # fmt: skip
    sigma = 20 / 255
    clean = data.astronaut().astype(np.float32) / 255
    noisy = (clean + sigma * np.random.default_rng(0).standard_normal(clean.shape)).astype(
        np.float32
    )
    x = torch.from_numpy(noisy).permute(2, 0, 1)[None, None].contiguous()
    nlm(x[..., :64, :64], sigma)
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        y = nlm(x, sigma)
        times.append(time.perf_counter() - t)
    out = y[0, 0].permute(1, 2, 0).numpy()
    print(f"dnls nlm ps={PS} ws={WS} k={K} h={H}: PSNR {psnr(out, clean):.2f} dB, "
          f"best {min(times):.3f} s, median {np.median(times):.3f} s")  # fmt: skip
    for fast in (True, False) if args.classic else (True,):
        t = time.perf_counter()
        sk = denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, patch_size=5,
                              patch_distance=6, fast_mode=fast, channel_axis=-1)  # fmt: skip
        print(f"scikit-image NLM fast_mode={fast}: PSNR {psnr(sk, clean):.2f} dB, "
              f"{time.perf_counter() - t:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
