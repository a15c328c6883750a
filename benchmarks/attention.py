"""Benchmark: dnls non-local attention against FlexAttention restricted to the same neighbourhood.

Workload (default): bf16, B=1, T=5, 128x128, 4 heads x 32 channels (dim 128), window
3 frames x 9 x 9 (wt=1, ws=9) slid inward at the borders. Providers, in one run:

- ``dnls core``: :func:`dnls.nn.non_local_attention` on given q, k, v, with ``k=None`` (the
  whole window) and ``k=16`` (the 16 best-scoring candidates).
- ``flex core``: ``torch.nn.attention.flex_attention`` (compiled) on the same q, k, v laid out
  as a sequence in raster order ``(t, h, w)``, with a block mask whose ``mask_mod`` keeps exactly
  the same 3x9x9 window (built once, outside the timing).
- ``dnls module`` / ``flex module``: the full layer, 1x1 q/k/v and output projections around
  each core, sharing the same weights.

Before timing, dnls (``k=None``) and Flex are checked against each other at the real size:
outputs and the gradients to q, k, v, both also measured against Flex in float32 on the same
values (the rounding yardstick). Timings are the median of CUDA-event timings after warmup;
peak memory is measured above what was allocated before the call.

    python benchmarks/attention.py [--json out.json] [--reps 50] [--warmup 10]
    python benchmarks/attention.py --tiny     # CPU, tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import _timing
import torch
from torch import nn

import dnls
import dnls.nn as dnn


@dataclass(frozen=True)
class Workload:
    b: int
    t: int
    h: int
    w: int
    heads: int
    head_dim: int
    ws: int
    wt: int
    dtype: str

    @property
    def seq(self) -> int:
        return self.t * self.h * self.w

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


FULL = Workload(b=1, t=5, h=128, w=128, heads=4, head_dim=32, ws=9, wt=1, dtype="bfloat16")
TINY = Workload(b=1, t=3, h=12, w=12, heads=2, head_dim=8, ws=5, wt=1, dtype="float32")


# ---------------------------------------------------------------------------------------------
# Layouts: Flex takes (B, HD, N, D) sequences in raster order (t, h, w); dnls takes head-split
# videos (B, HD, T, D, H, W). The conversions are views, so both get the very same storage.
# ---------------------------------------------------------------------------------------------


def seq_to_video(x: torch.Tensor, wl: Workload) -> torch.Tensor:
    return x.view(wl.b, wl.heads, wl.t, wl.h, wl.w, wl.head_dim).permute(0, 1, 2, 5, 3, 4)


def video_to_seq(y: torch.Tensor, wl: Workload) -> torch.Tensor:
    return y.permute(0, 1, 2, 4, 5, 3).reshape(wl.b, wl.heads, wl.seq, wl.head_dim)


def neighbourhood_mask_mod(wl: Workload):
    """``mask_mod`` of the dnls window: the key is in the query's ``2*wt+1`` frames (slid inward
    at the first and last frames) and in its ``ws x ws`` square (slid inward at the borders)."""
    nslots, lo = 2 * wl.wt + 1, wl.ws // 2
    hi_h, hi_w = wl.h - 1 - (wl.ws - 1 - lo), wl.w - 1 - (wl.ws - 1 - lo)
    plane = wl.h * wl.w

    def split(i):
        return i // plane, (i % plane) // wl.w, i % wl.w

    def mask_mod(b, h, q_idx, kv_idx):
        qt, qh, qw = split(q_idx)
        kt, kh, kw = split(kv_idx)
        t0 = (qt - wl.wt).clamp(0, wl.t - nslots)
        h0 = qh.clamp(lo, hi_h) - lo
        w0 = qw.clamp(lo, hi_w) - lo
        in_t = (kt >= t0) & (kt < t0 + nslots)
        in_h = (kh >= h0) & (kh < h0 + wl.ws)
        in_w = (kw >= w0) & (kw < w0 + wl.ws)
        return in_t & in_h & in_w

    return mask_mod


def make_flex(wl: Workload, device: torch.device) -> Callable:
    """Compiled FlexAttention with the neighbourhood block mask: ``(q, k, v) -> out``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(
        neighbourhood_mask_mod(wl), B=None, H=None, Q_LEN=wl.seq, KV_LEN=wl.seq,
        device=device, _compile=device.type == "cuda",
    )  # fmt: skip
    flex = torch.compile(flex_attention, fullgraph=True)
    scale = 1 / math.sqrt(wl.head_dim)

    def run(q, k, v):
        return flex(q, k, v, block_mask=mask, scale=scale)

    return run


def make_dnls(wl: Workload, k: int | None) -> Callable:
    """dnls attention core on sequences: ``(q, k, v) -> out``, both ``(B, HD, N, D)``."""
    scale = 1 / math.sqrt(wl.head_dim)

    def run(q, kk, v):
        q6, k6, v6 = (seq_to_video(x, wl) for x in (q, kk, v))
        out = dnn.non_local_attention(q6, k6, v6, ws=wl.ws, wt=wl.wt, k=k, scale=scale)
        return video_to_seq(out, wl)

    return run


class FlexLayer(nn.Module):
    """The full layer with FlexAttention as its core, using the projections of ``ref``."""

    def __init__(self, ref: dnn.NonLocalAttention, core: Callable, wl: Workload) -> None:
        super().__init__()
        self.ref, self.core, self.wl = ref, core, wl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wl = self.wl
        qkv = self.ref.qkv(x.permute(0, 1, 3, 4, 2))  # (B, T, H, W, 3C)
        qkv = qkv.view(wl.b, wl.seq, 3, wl.heads, wl.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = (y.contiguous() for y in qkv.unbind(0))
        out = self.core(q, k, v).transpose(1, 2).reshape(wl.b, wl.t, wl.h, wl.w, wl.dim)
        return self.ref.proj(out).permute(0, 1, 4, 2, 3)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn: Callable, device: torch.device) -> float:
    """:func:`_timing.peak_mb` on CUDA; NaN on the CPU (``--tiny``), which has no such count."""
    return _timing.peak_mb(fn) if device.type == "cuda" else float("nan")


def profile(name: str, fn: Callable, device: torch.device, rows: int = 12) -> None:
    """The kernels of one call of ``fn`` that took the most device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {name}, forward+backward:", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def forward_backward(fn: Callable, inputs: tuple, grad: torch.Tensor) -> Callable:
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, [x for x in inputs if x.requires_grad], grad)

    return run


def forward_only(fn: Callable, inputs: tuple) -> Callable:
    detached = tuple(x.detach() for x in inputs)

    def run():
        with torch.no_grad():
            fn(*detached)

    return run


# ---------------------------------------------------------------------------------------------
# Check at the real size
# ---------------------------------------------------------------------------------------------


def check(
    dnls_core: Callable, flex_core: Callable, qkv: tuple, grad: torch.Tensor, grads: bool
) -> dict:
    """dnls (k=None) vs Flex: outputs and (with ``grads``) the gradients to q, k, v, each also
    against Flex in float32."""

    def run(fn, inputs):
        if not grads:
            with torch.no_grad():
                return [fn(*(x.detach() for x in inputs)).float()]
        inputs = [x.detach().requires_grad_() for x in inputs]
        out = fn(*inputs)
        dq, dk, dv = torch.autograd.grad(out, inputs, grad.to(out.dtype))
        return [out.detach().float(), dq.float(), dk.float(), dv.float()]

    d = run(dnls_core, qkv)
    f = run(flex_core, qkv)
    f32 = run(flex_core, [x.float() for x in qkv])
    res = {}
    for i, name in enumerate(("out", "dq", "dk", "dv")[: len(d)]):
        scale = f32[i].abs().max().item()
        res[name] = {
            "max_abs_err_dnls_vs_flex": (d[i] - f[i]).abs().max().item(),
            "max_abs_err_dnls_vs_fp32": (d[i] - f32[i]).abs().max().item(),
            "max_abs_err_flex_vs_fp32": (f[i] - f32[i]).abs().max().item(),
            "max_abs_fp32": scale,
        }
    # A wrong window or weight shows as errors of the order of the values themselves. dnls
    # rounds the scores to the input dtype before the softmax (search returns its distances
    # in that dtype; Flex keeps them in float32), so in bf16 it lands a few times farther from
    # float32 than Flex: allow 3% of the largest value (bf16 spacing is 2^-8 relative).
    res["ok"] = all(
        r["max_abs_err_dnls_vs_fp32"]
        <= max(4 * r["max_abs_err_flex_vs_fp32"], 3e-2 * r["max_abs_fp32"])
        for r in res.values()
    )
    return res


# Launch configurations of the fused kernels: (queries per program, warps).
SWEEP = [(16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4)]


def sweep(core: Callable, qkv: tuple, grad: torch.Tensor, device, args) -> list[dict]:
    """Per launch configuration: the forward with it, and forward+backward with it given to
    the dq kernel only and to the dk/dv kernel only (the others at their defaults)."""
    from dnls.ops import _attention_triton as kernels

    saved = dict(kernels.CONFIG)
    rows = []
    try:
        for block, warps in SWEEP:
            row = {"block": block, "warps": warps}
            for op in ("fwd", "dq", "dkv"):
                kernels.CONFIG.update(saved)
                kernels.CONFIG[op + "_block"], kernels.CONFIG[op + "_warps"] = block, warps
                if op == "fwd":
                    fn = forward_only(core, qkv)
                else:
                    fn = forward_backward(core, qkv, grad)
                key = "fwd_ms" if op == "fwd" else f"fwdbwd_ms_{op}"
                row[key] = median_ms(fn, device, args.warmup, args.reps)
            rows.append(row)
            print(json.dumps({"sweep": row}), flush=True)
    finally:
        kernels.CONFIG.clear()
        kernels.CONFIG.update(saved)
    return rows


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    root = Path(__file__).resolve().parent.parent

    def git(*args) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    def backend_of(op: str) -> str:
        from dnls._common import backend

        try:
            return backend(device, op)
        except RuntimeError as e:
            return f"unavailable ({e})"

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}"
    # DNLS_COMMIT names the commit where the tree was copied without its git history
    commit = os.environ.get("DNLS_COMMIT") or git("rev-parse", "HEAD") or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "dnls": dnls.__version__,
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "dnls_backends": {op: backend_of(op) for op in ("search", "wpsum", "scatter")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--topk", type=int, default=16, help="the k of the top-k rows")
    parser.add_argument("--no-module", action="store_true", help="time the attention core only")
    parser.add_argument(
        "--compile-dnls", action="store_true", help="also time the dnls layers under torch.compile"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="time the fused k=None core over launch configurations (queries per program x "
        "warps) of each kernel",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the top kernels of each core's forward+backward",
    )
    args = parser.parse_args()

    wl = TINY if args.tiny else FULL
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to try the script on the CPU")
    env = environment(device)
    print(json.dumps(env), flush=True)
    print(json.dumps({"workload": asdict(wl)}), flush=True)

    dtype = wl.torch_dtype
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (wl.b, wl.heads, wl.seq, wl.head_dim)
    qkv = tuple(
        torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    x = torch.randn(wl.b, wl.t, wl.dim, wl.h, wl.w, generator=gen, device=device, dtype=dtype)
    x.requires_grad_()
    gx = torch.randn(x.shape, generator=gen, device=device, dtype=dtype)

    providers: dict[str, tuple[Callable, tuple, torch.Tensor]] = {}
    dnls_window = make_dnls(wl, None)
    providers["dnls core k=None"] = (dnls_window, qkv, grad)
    providers[f"dnls core k={args.topk}"] = (make_dnls(wl, args.topk), qkv, grad)
    flex = None
    try:
        flex = make_flex(wl, device)
        flex(*(t.detach() for t in qkv))  # compiles; fails here if Flex cannot run
    except Exception as e:  # noqa: BLE001 -- report any failure and keep the other rows
        note = f"FlexAttention unavailable on {device.type}: {type(e).__name__}: {e}"
        if not args.tiny:
            raise SystemExit(note) from e
        print(json.dumps({"flex": note.splitlines()[0][:300]}), flush=True)
        flex = None
    if flex is not None:
        providers["flex core"] = (flex, qkv, grad)

    if not args.no_module:
        torch.manual_seed(0)
        for k in (None, args.topk):
            layer = dnn.NonLocalAttention(
                wl.dim, wl.heads, ws=wl.ws, wt=wl.wt, k=k, device=device, dtype=dtype
            )
            providers[f"dnls module k={k}"] = (layer, (x,), gx)
            if args.compile_dnls:
                compiled = torch.compile(layer, fullgraph=True)
                providers[f"dnls module k={k} compiled"] = (compiled, (x,), gx)
        if flex is not None:
            providers["flex module"] = (FlexLayer(layer, flex, wl), (x,), gx)

    results = {"environment": env, "workload": asdict(wl), "rows": []}
    if flex is not None:
        # FlexAttention has no backward on the CPU (torch 2.13): tiny mode checks outputs only
        grads = device.type == "cuda"
        results["check"] = check(dnls_window, flex, qkv, grad, grads)
        for name in ("out", "dq", "dk", "dv") if grads else ("out",):
            r = results["check"][name]
            print(
                f"check {name}: max |dnls - flex| {r['max_abs_err_dnls_vs_flex']:.3e}; "
                f"vs float32: dnls {r['max_abs_err_dnls_vs_fp32']:.3e}, "
                f"flex {r['max_abs_err_flex_vs_fp32']:.3e} (max |value| {r['max_abs_fp32']:.3g})",
                flush=True,
            )
        if not results["check"]["ok"]:
            print("check FAILED: dnls and Flex disagree beyond rounding", flush=True)
    else:
        results["check"] = "skipped: FlexAttention did not run (tiny mode only)"

    for name, (fn, inputs, g) in providers.items():
        row = {"provider": name}
        try:
            fwd, fwdbwd = forward_only(fn, inputs), forward_backward(fn, inputs, g)
            row["fwd_ms"] = median_ms(fwd, device, args.warmup, args.reps)
            row["fwd_mb"] = peak_mb(fwd, device)
            if name.startswith("flex") and device.type == "cpu":
                row["fwdbwd"] = "skipped: FlexAttention has no backward on the CPU"
            else:
                row["fwdbwd_ms"] = median_ms(fwdbwd, device, args.warmup, args.reps)
                row["fwdbwd_mb"] = peak_mb(fwdbwd, device)
        except Exception as e:  # noqa: BLE001 -- one failing provider must not hide the rest
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    if args.sweep:
        results["sweep"] = sweep(dnls_window, qkv, grad, device, args)

    dirty = {True: " (uncommitted changes)", False: "", None: " (no git checkout)"}[env["dirty"]]
    print(
        f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit'][:10]}{dirty}"
    )
    if args.profile:
        for name, (fn, inputs, g) in providers.items():
            if "core" in name and not (name.startswith("flex") and device.type == "cpu"):
                profile(name, forward_backward(fn, inputs, g), device)
    print(f"{'provider':30} {'fwd ms':>9} {'fwd MB':>9} {'f+b ms':>9} {'f+b MB':>9}")
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['provider']:30} {r['error']}")
            continue
        nan = float("nan")
        print(
            f"{r['provider']:30} {r['fwd_ms']:9.3f} {r['fwd_mb']:9.1f} "
            f"{r.get('fwdbwd_ms', nan):9.3f} {r.get('fwdbwd_mb', nan):9.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
