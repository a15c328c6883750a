"""The ``dnls`` command line: ``dnls demo`` and ``dnls denoise INPUT -o OUTPUT``.

Bad input (a missing or unreadable file, frames of different sizes, sigma <= 0, an output that
exists without ``--overwrite``, a memory budget too small for one batch, a bad device) prints
one line, ``dnls: error: ...``, writes nothing and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .apps import media
from .apps.nlm import PS, WS, K, batch_for_memory, nlm

# Neighbours per patch when the search spans several frames: more candidates, more neighbours.
K_VIDEO = 30
# The demo clip's motion, pixels a frame (rows, columns).
DEMO_STEP = (0.6, 1.3)


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r}: not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name!r}: this machine has {torch.cuda.device_count()} GPUs")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: dnls runs on cpu or cuda")
    return dev


def _memory(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise CLIError(f"--max-memory {text!r}: expected a size like 512MB or 2GB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.clip(a, 0, 1) - b) ** 2)))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of ``(T, H, W, C)`` frames (scikit-image's)."""
    from skimage.metrics import structural_similarity

    a = np.clip(a, 0, 1)
    pairs = zip(a, b, strict=True)
    return float(np.mean([structural_similarity(x, y, data_range=1.0, channel_axis=-1)
                          for x, y in pairs]))  # fmt: skip


def _estimate_sigma(frames: np.ndarray) -> float:
    """Gaussian noise level of ``(T, H, W, C)`` frames by Immerkaer's method (1996): the mean
    absolute response to a Laplacian difference mask that cancels smooth image content."""
    f = frames.astype(np.float64)
    resp = (
        f[:, :-2, :-2] - 2 * f[:, :-2, 1:-1] + f[:, :-2, 2:]
        - 2 * f[:, 1:-1, :-2] + 4 * f[:, 1:-1, 1:-1] - 2 * f[:, 1:-1, 2:]
        + f[:, 2:, :-2] - 2 * f[:, 2:, 1:-1] + f[:, 2:, 2:]
    )  # fmt: skip
    return float(np.sqrt(np.pi / 2) * np.abs(resp).mean() / 6)


def _video(frames: np.ndarray, dev: torch.device) -> torch.Tensor:
    """``(T, H, W, C)`` -> ``(1, T, C, H, W)`` on ``dev``."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None].to(dev)


def _frames(vid: torch.Tensor) -> np.ndarray:
    return vid[0].permute(0, 2, 3, 1).float().cpu().numpy()


def _opencv_flows(frames: np.ndarray, dev: torch.device):
    """Frame-to-next and frame-to-previous flows ``(1, T, 2, H, W)`` (Farneback), rounded to
    whole pixels: the search window absorbs the rest, and whole positions keep the fast path."""
    if importlib.util.find_spec("cv2") is None:
        raise CLIError("--flow opencv needs OpenCV: pip install 'dnls[flow]'")
    import cv2

    gray = [np.ascontiguousarray((f.mean(-1) * 255).astype(np.uint8)) for f in frames]
    t = len(gray)
    fwd = np.zeros((t, 2) + gray[0].shape, np.float32)
    bwd = np.zeros_like(fwd)
    for i in range(t):
        for j, out in ((i + 1, fwd), (i - 1, bwd)):
            if 0 <= j < t:
                f = cv2.calcOpticalFlowFarneback(gray[i], gray[j], None, 0.5, 3, 15, 3, 5, 1.2, 0)
                out[i] = f[..., ::-1].transpose(2, 0, 1)  # (dx, dy) -> (dh, dw)
    to = lambda a: torch.from_numpy(np.rint(a)).to(torch.int32)[None].to(dev)  # noqa: E731
    return to(fwd), to(bwd)


# ---------------------------------------------------------------------------------------------
# dnls denoise
# ---------------------------------------------------------------------------------------------


def denoise(args: argparse.Namespace) -> int:
    if args.sigma is not None and not args.sigma > 0:
        raise CLIError(f"--sigma {args.sigma:g}: must be > 0 (on the 0-255 scale)")
    for name in ("ps", "ws", "k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.wt < 0:
        raise CLIError(f"--wt {args.wt}: must be >= 0")
    dev = _device(args.device)
    budget = _memory(args.max_memory) if args.max_memory else None
    try:
        src = media.read(args.input)
        out_path = media.check_writable(args.output, src, args.overwrite)
    except media.MediaError as err:
        raise CLIError(str(err)) from None
    frames = src.frames
    nframes, height, width, _ = frames.shape
    wt = min(args.wt, (nframes - 1) // 2)
    if args.k is None:
        args.k = K_VIDEO if wt > 0 else K
    if min(height, width) < max(args.ws, args.ps):
        raise CLIError(f"{args.input}: {height}x{width} frames are smaller than --ws/--ps")
    if budget is not None:
        try:
            shape = (1, nframes, frames.shape[3], height, width)
            batch_for_memory(shape, budget, ps=args.ps, k=args.k)
        except ValueError as err:
            raise CLIError(f"--max-memory {args.max_memory}: {err}") from None
    if args.sigma is not None:
        sigma = args.sigma / 255.0
    else:
        sigma = _estimate_sigma(frames)
        sigma = max(sigma, 1e-3)
    flows = None
    if args.flow == "opencv" and wt > 0:
        flows = _opencv_flows(frames, dev)
    bar = None
    if not args.quiet and not args.json:
        from tqdm import tqdm

        bar = tqdm(total=nframes * height * width, unit="px", unit_scale=True, desc="denoise")

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    start = time.perf_counter()
    k = min(args.k, (2 * wt + 1) * args.ws * args.ws)
    vid = _video(frames, dev)
    try:
        out = nlm(vid, sigma, ps=args.ps, ws=args.ws, wt=wt, k=k, flows=flows,
                  max_memory=budget, progress=progress)  # fmt: skip
    except ValueError as err:
        raise CLIError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    try:
        media.write(out_path, src, _frames(out))
    except (media.MediaError, OSError) as err:
        raise CLIError(f"{out_path}: cannot write ({err})") from None
    report = {
        "input": str(args.input),
        "output": str(out_path),
        "kind": src.kind,
        "frames": nframes,
        "height": height,
        "width": width,
        "channels": int(frames.shape[3]),
        "bits": src.bits,
        "sigma": sigma * 255.0,
        "sigma_estimated": args.sigma is None,
        "ps": args.ps,
        "ws": args.ws,
        "wt": wt,
        "k": k,
        "flow": args.flow if flows is not None else "none",
        "device": str(dev),
        "seconds": seconds,
    }
    if args.json:
        print(json.dumps(report))
    elif not args.quiet:
        print(
            f"dnls: wrote {out_path} ({src.kind}, {nframes}x{height}x{width}, sigma "
            f"{report['sigma']:.2f}/255, {seconds:.2f} s on {dev})"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# dnls demo
# ---------------------------------------------------------------------------------------------


def _demo_clip(clean: np.ndarray, frames: int = 5, size: int = 160, step=DEMO_STEP):
    """A clip cut from ``clean`` by a window moving ``step`` pixels a frame (sub-pixel, by
    spline interpolation): ``(T, size, size, C)``. Frame ``t`` shows at ``(y, x)`` what
    ``clean`` holds at ``(y, x) + t * step`` (plus the crop's corner)."""
    from scipy.ndimage import shift

    h, w, _ = clean.shape
    top, left = (h - size) // 2, (w - size) // 2
    clip = []
    for t in range(frames):
        moved = shift(clean, (-step[0] * t, -step[1] * t, 0), order=3, mode="reflect")
        clip.append(moved[top : top + size, left : left + size])
    return np.clip(np.stack(clip), 0, 1).astype(np.float32)


def _demo_flows(frames: int, size: int, wt: int, step=DEMO_STEP) -> torch.Tensor:
    """The clip's true flows to every frame of each window, ``(1, T, 2 * wt + 1, 2, H, W)``
    int32, rounded to whole pixels (the window absorbs the rest). Content seen at ``(y, x)``
    in frame ``t`` is at ``(y, x) - (t' - t) * step`` in frame ``t'``."""
    t = torch.arange(frames)
    first = (t - wt).clamp(0, frames - 2 * wt - 1)
    slots = first[:, None] + torch.arange(2 * wt + 1)[None]  # (T, S): the window's frames
    moved = -(slots - t[:, None]).double()[..., None] * torch.tensor(step, dtype=torch.float64)
    flows = torch.round(moved).to(torch.int32)[None, :, :, :, None, None]
    return flows.expand(1, frames, 2 * wt + 1, 2, size, size).contiguous()


def demo(args: argparse.Namespace) -> int:
    from skimage import data
    from skimage.restoration import denoise_nl_means

    dev = _device(args.device)
    out_png = Path(args.out)
    if not out_png.parent.exists():
        raise CLIError(f"--out {out_png}: no such folder")
    sigma = 20 / 255
    rng = np.random.default_rng(0)
    clean = data.astronaut().astype(np.float32) / 255.0
    noisy = (clean + sigma * rng.standard_normal(clean.shape)).astype(np.float32)
    print(f"dnls demo: scikit-image's astronaut, {clean.shape[1]}x{clean.shape[0]} RGB, "
          f"Gaussian noise sigma 20/255, device {dev}")  # fmt: skip
    print(f"  noisy                    PSNR {_psnr(noisy, clean):6.2f} dB  "
          f"SSIM {_ssim(noisy[None], clean[None]):.3f}")  # fmt: skip

    vid = _video(noisy[None], dev)
    nlm(vid[..., :64, :64], sigma)  # compile / warm up the kernels (cached on disk)
    start = time.perf_counter()
    den = _frames(nlm(vid, sigma))[0]
    secs = time.perf_counter() - start
    print(f"  dnls k-NN NLM            PSNR {_psnr(den, clean):6.2f} dB  "
          f"SSIM {_ssim(den[None], clean[None]):.3f}  {secs:6.2f} s "
          f"(ps={PS} ws={WS} k={K})")  # fmt: skip
    start = time.perf_counter()
    sk = denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                          fast_mode=True, channel_axis=-1)  # fmt: skip
    secs = time.perf_counter() - start
    print(f"  scikit-image NLM (fast)  PSNR {_psnr(sk, clean):6.2f} dB  "
          f"SSIM {_ssim(sk[None], clean[None]):.3f}  {secs:6.2f} s")  # fmt: skip

    clip = _demo_clip(clean)
    noisy_clip = (clip + sigma * rng.standard_normal(clip.shape)).astype(np.float32)
    t, size = clip.shape[0], clip.shape[1]
    wt = min(2, (t - 1) // 2)
    flows = _demo_flows(t, size, wt).to(dev)
    nv = _video(noisy_clip, dev)
    # The same k for both, so the gain comes from the frames the search sees, not from k.
    start = time.perf_counter()
    single = _frames(nlm(nv, sigma, k=K_VIDEO))
    s_single = time.perf_counter() - start
    start = time.perf_counter()
    spacetime = _frames(nlm(nv, sigma, wt=wt, k=K_VIDEO, flows=flows))
    s_st = time.perf_counter() - start
    p_single, p_st = _psnr(single, clip), _psnr(spacetime, clip)
    print(f"dnls demo: a {t}-frame {size}x{size} clip cut from it, moving "
          f"({DEMO_STEP[0]}, {DEMO_STEP[1]}) px a frame; k={K_VIDEO} for both")  # fmt: skip
    print(f"  noisy                    PSNR {_psnr(noisy_clip, clip):6.2f} dB  "
          f"SSIM {_ssim(noisy_clip, clip):.3f}")  # fmt: skip
    print(f"  frame by frame (wt=0)    PSNR {p_single:6.2f} dB  "
          f"SSIM {_ssim(single, clip):.3f}  {s_single:6.2f} s")  # fmt: skip
    print(f"  {f'space-time, flows, wt={wt}':25s}PSNR {p_st:6.2f} dB  "
          f"SSIM {_ssim(spacetime, clip):.3f}  {s_st:6.2f} s")  # fmt: skip
    print(f"  space-time gain          {p_st - p_single:+6.2f} dB")

    side = np.concatenate([np.clip(noisy, 0, 1), np.clip(den, 0, 1), clean], axis=1)
    import imageio.v3 as iio

    iio.imwrite(out_png, (side * 255).round().astype(np.uint8))
    print(f"  wrote {out_png} (noisy | dnls | clean)")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        raise CLIError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dnls", description="Patch-based non-local means denoising with dnls.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("demo", help="denoise a built-in photograph and clip; print PSNR/SSIM")
    p.add_argument("--out", default="dnls-demo.png", help="side-by-side PNG to write")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.set_defaults(run=demo)
    p = sub.add_parser("denoise", help="denoise an image, a folder of frames or a video")
    p.add_argument("input", help="image (PNG/JPEG/TIFF), folder of frames or video file")
    p.add_argument("-o", "--output", required=True, help="where to write the result")
    p.add_argument("--sigma", type=float, help="noise on the 0-255 scale (default: estimated)")
    p.add_argument("--ps", type=int, default=PS, help="patch size")
    p.add_argument("--ws", type=int, default=WS, help="search window (pixels)")
    p.add_argument("--wt", type=int, default=2, help="temporal half-window (frames; video)")
    p.add_argument("--k", type=int, help=f"neighbours per patch ({K}; {K_VIDEO} with wt > 0)")
    p.add_argument("--flow", choices=("none", "opencv"), default="none", help="optical flow")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--max-memory", help="memory budget, e.g. 2GB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(run=denoise)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return args.run(args)
    except CLIError as err:
        print(f"dnls: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
