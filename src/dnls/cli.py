"""The ``dnls`` command line."""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from .apps.nlm import nlm


def _test_image(size: int = 96) -> torch.Tensor:
    """A built-in RGB test image ``(1, 1, 3, size, size)`` in [0, 1]: shapes, edges, texture."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.06).float()
    square = ((x - 0.72).abs() < 0.16) & ((y - 0.7).abs() < 0.16)
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * 6 * (x + 0.5 * y))
    r = 0.15 + 0.7 * disc + 0.1 * stripes * (y > 0.75)
    g = 0.2 + 0.6 * square.float() + 0.2 * x
    b = 0.3 + 0.4 * y * (1 - disc) + 0.2 * stripes * (x < 0.2)
    return torch.stack([r, g, b]).clamp(0, 1)[None, None]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).square().mean()))


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    clean = _test_image(args.size)
    sigma = 20 / 255
    noisy = clean + sigma * torch.randn_like(clean)
    start = time.perf_counter()
    denoised = nlm(noisy, sigma, ps=5, ws=11, k=14)
    seconds = time.perf_counter() - start
    print(
        f"dnls demo: built-in {args.size}x{args.size} RGB image, noise sigma 20/255, "
        f"device {denoised.device}"
    )
    print(f"  PSNR noisy    {_psnr(noisy.clamp(0, 1), clean):6.2f} dB")
    print(
        f"  PSNR denoised {_psnr(denoised.clamp(0, 1), clean):6.2f} dB  ({seconds:.2f} s, "
        "k-NN non-local means: search -> wpsum -> ifold)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnls", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="denoise a built-in image and print PSNR")
    p_demo.add_argument("--size", type=int, default=96, help="image side in pixels")
    p_demo.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
