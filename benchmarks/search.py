"""Benchmark and real-size check of ``dnls.search`` on a GPU.

For each workload row: the Triton path (forward, forward+backward), a plain-PyTorch
shift-and-box-filter loop (the usual way to write this without dnls), and the reference path
(timed on a slice of the queries and scaled: it is the slow oracle). Median of CUDA-event
timings, peak memory above the inputs. Before timing, the Triton result is checked against the
reference on a slice of the queries at the real size.

    python benchmarks/search.py [--rows W1,W3] [--json out.json]

``--smoke`` runs the same code on tiny rows (each row's channels, heads and distance; small
frames, windows and patches: :func:`smoke_rows`) on the CPU under Triton's interpreter: the
checks, the sweeps (each configuration checked against the default kernels) and nothing timed.
It is a check of the script itself before device time is spent on it (``device.sh
search``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace

if "--smoke" in sys.argv:  # (read when the kernel modules are imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import _timing
import torch
import torch.nn.functional as F
import triton.testing

import dnls

DEV = "cuda"  # "cpu" with --smoke
SMOKE = False


@dataclass
class Row:
    name: str
    shape: tuple  # (B, T, C, H, W)
    kw: dict

    @property
    def queries(self) -> int:
        b, t, c, h, w = self.shape
        return t * h * w

    def floor_ms(self, device_bw=2.9e12, fp32_flops=51e12) -> tuple[float, float]:
        """(memory floor, direct-arithmetic floor) in ms: videos read once and outputs written
        once; 3 flops (sub/mul/add or mul/add) per candidate pixel, no reuse across queries."""
        b, t, c, h, w = self.shape
        k, ws, wt, ps = self.kw["k"], self.kw["ws"], self.kw.get("wt", 0), self.kw["ps"]
        bytes_ = b * t * c * h * w * 4 + b * self.queries * k * (4 + 12)
        flops = 3 * b * self.queries * (2 * wt + 1) * ws * ws * ps * ps * c
        return bytes_ / device_bw * 1e3, flops / fp32_flops * 1e3


ROWS = {
    "W1": Row("W1", (1, 5, 3, 256, 256), dict(ws=21, wt=2, ps=7, k=14)),
    "W1s": Row("W1s", (1, 5, 3, 192, 192), dict(ws=21, wt=2, ps=7, k=14)),
    "W2": Row("W2", (1, 5, 128, 128, 128), dict(ws=9, wt=1, ps=1, k=16, dist="dot", nheads=4)),
    "W3": Row("W3", (1, 1, 3, 1024, 1024), dict(ws=21, ps=7, k=14)),
    "W4": Row("W4", (1, 3, 16, 288, 288), dict(ws=15, wt=1, ps=7, k=10)),
}


def smoke_rows() -> dict[str, Row]:
    """The rows at tiny sizes (--smoke): frames of 10 x 10, a window of 3 x 3 pixels and at
    most 3 frames (as many frames as it takes), k of at most 4, patches of at most 3 x 3;
    channels, heads and distance as the row has them. The interpreter runs a program's Python
    once per displacement, frame and patch row: W1s's forward at 5 frames of 16 x 16, a window
    of 5 x 5 x 5 and patches of 7 x 7, took 337 s, and W4's at 3 frames of 10 x 10 and a window
    of 3 x 3 x 3, 156 s."""
    out = {}
    for name, row in ROWS.items():
        b, t, c, h, w = row.shape
        wt = min(row.kw.get("wt", 0), 1)
        kw = dict(row.kw, ws=3, k=min(row.kw["k"], 4), ps=min(row.kw["ps"], 3))
        kw.update({"wt": wt} if wt else {})
        out[name] = replace(row, shape=(b, 2 * wt + 1, c, 10, 10), kw=kw)
    return out


def baseline(
    vid: torch.Tensor, ws: int, ps: int, k: int, wt: int = 0, dist: str = "l2", nheads: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: for every displacement, a shifted difference, a box filter over the patch
    and a running top-k. Windows are not slid inward at the borders (reflect padding instead)."""
    b, t, c, h, w = vid.shape
    x = vid.view(b * t, nheads, c // nheads, h, w)
    r, pr = ws // 2, ps // 2
    pad = F.pad(vid.view(b * t, c, h, w), (r, r, r, r), mode="reflect").view(
        b * t, nheads, c // nheads, h + 2 * r, w + 2 * r
    )
    sign = 1.0 if dist == "l2" else -1.0
    best = torch.full((b * t, nheads, h, w, k), float("inf"), device=vid.device)
    frames = torch.arange(t, device=vid.device)
    for dt in range(-wt, wt + 1):
        src = (
            (frames + dt).clamp(0, t - 1)[None] + torch.arange(b, device=vid.device)[:, None] * t
        ).flatten()
        for dy in range(ws):
            for dx in range(ws):
                y = pad[src, :, :, dy : dy + h, dx : dx + w]
                e = (x - y).square().sum(2) if dist == "l2" else (x * y).sum(2)
                if ps > 1:
                    e = F.avg_pool2d(F.pad(e, (pr, pr, pr, pr), mode="reflect"), ps, stride=1)
                cand = torch.cat([best, sign * e[..., None]], -1)
                best = cand.topk(k, dim=-1, largest=False).values
    return best, best


# --smoke times nothing: every call has run once, for its check, before it is timed


def bench(fn, reps_ms=300) -> float:
    return float("nan") if SMOKE else _timing.bench(fn, reps_ms, warmup_ms=50)


def peak_mb(fn) -> float:
    return float("nan") if SMOKE else _timing.peak_mb(fn)


def synchronize() -> None:
    if not SMOKE:
        torch.cuda.synchronize()


CHECK_QUERIES = 2048  # --check-queries' default


def check_kw(row: Row, count: int = CHECK_QUERIES) -> dict:
    """The search arguments of ``check``: ``count`` queries of the row from a third of its
    queries on (offline.py compiles the same launch)."""
    start = row.queries // 3
    return dict(row.kw, start=start, count=min(count, row.queries - start))


def check(row: Row, vid: torch.Tensor, count: int) -> str:
    """Triton vs reference on queries [start, start + count) of the real-size problem
    (``check_kw``): the distances, the positions (which may differ only where distances tie)
    and the gradient of a random weighting of the distances with respect to the video."""
    kw = check_kw(row, count)
    out = {}
    for backend in ("torch", "triton"):
        os.environ["DNLS_BACKEND"] = backend
        v = vid.clone().requires_grad_()
        d, i = dnls.search(v, **kw)
        g = torch.Generator(device=vid.device).manual_seed(0)
        weight = torch.rand(d.shape, generator=g, device=vid.device)
        (grad,) = torch.autograd.grad((d * weight).sum(), v)
        out[backend] = (d.detach(), i, grad)
    (d0, i0, g0), (d1, i1, g1) = out["torch"], out["triton"]
    err = ((d1 - d0).norm() / d0.norm().clamp(min=1e-30)).item()
    gerr = ((g1 - g0).norm() / g0.norm().clamp(min=1e-30)).item()
    differ = (i1 != i0).any(-1)
    same = 1 - differ.float().mean().item()
    # a differing position is allowed only where the two distances tie to rounding
    tie_gap = (d1 - d0).abs()[differ].max().item() if differ.any() else 0.0
    # the gradient is compared only when both picked the same candidates (a tie swap moves it)
    grad_ok = gerr < 1e-4 or bool(differ.any())
    ok = err < 1e-5 and grad_ok and tie_gap <= 1e-5 * d0.abs().max().item()
    return (
        f"{'ok' if ok else 'FAIL'} rel-err {err:.1e}, grad rel-err {gerr:.1e}, "
        f"same inds {same:.4f} (ties {tie_gap:.0e})"
    )


def measure(name: str, args: argparse.Namespace, gpu: str) -> dict:
    row = ROWS[name]
    torch.manual_seed(0)
    vid = torch.rand(row.shape, device=DEV)
    res = {"row": name, "gpu": gpu, "shape": row.shape, **row.kw}
    res["check"] = check(row, vid, min(args.check_queries, row.queries))
    os.environ["DNLS_BACKEND"] = "triton"
    res["fwd_ms"] = bench(lambda: dnls.search(vid, **row.kw))
    res["fwd_mb"] = peak_mb(lambda: dnls.search(vid, **row.kw))
    parts = args.parts.split(",")
    nan = float("nan")
    res.update(fwdbwd_ms=nan, fwdbwd_mb=nan, baseline_ms=nan, baseline_mb=nan)
    res.update(reference_ms_scaled=nan)
    res["floor_mem_ms"], res["floor_direct_ms"] = row.floor_ms()
    vg = vid.clone().requires_grad_()

    def fwd_bwd():
        d, _ = dnls.search(vg, **row.kw)
        d.sum().backward()

    if "bwd" in parts:
        fwd_bwd()  # compile and warm up
        synchronize()
        t0 = time.perf_counter()
        fwd_bwd()
        synchronize()
        once = time.perf_counter() - t0
        res["fwdbwd_ms"] = bench(fwd_bwd, 300) if once < 2 or SMOKE else once * 1e3
        res["fwdbwd_mb"] = peak_mb(fwd_bwd)
    if "det" in parts:  # the deterministic backward (fixed-point accumulation)
        torch.use_deterministic_algorithms(True)
        try:
            fwd_bwd()
            res["fwdbwd_det_ms"] = bench(fwd_bwd, 300)
            vg.grad = None
            fwd_bwd()
            first = vg.grad.clone()
            vg.grad = None
            fwd_bwd()
            res["det_same_bits"] = bool(torch.equal(first, vg.grad))
            vg.grad = None
        finally:
            torch.use_deterministic_algorithms(False)
        fwd_bwd()
        res["det_rel_err"] = float((first - vg.grad).abs().max() / vg.grad.abs().max())
        vg.grad = None
    if "base" in parts:
        base_kw = {
            k: v for k, v in row.kw.items() if k in ("ws", "ps", "k", "wt", "dist", "nheads")
        }
        res["baseline_ms"] = bench(lambda: baseline(vid, **base_kw), 500)
        res["baseline_mb"] = peak_mb(lambda: baseline(vid, **base_kw))
    if "ref" in parts:
        n = min(args.ref_queries, row.queries)
        os.environ["DNLS_BACKEND"] = "torch"
        ref_ms = bench(lambda: dnls.search(vid, count=n, **row.kw), 200)
        res["reference_ms_scaled"] = ref_ms * row.queries / n
        os.environ["DNLS_BACKEND"] = "triton"
    return res


# sweep parts timed forward+backward (the others: forward)
BACKWARD_PARTS = ("f+b", "clast", "gq")

# the row kernel's (columns per block, warps, rows per strip) the sweep times
# (strips of 3 and 4 rows at 32 columns: the part "strip")
ROWS_SWEEP = [(32, 1, 1), (32, 1, 2), (64, 2, 1), (64, 2, 2), (128, 4, 2)]


def sweep_configs(row: Row, parts: str = "fwd,f+b,rows,mem") -> list[tuple[str, dict]]:
    """(part, CONFIG update) pairs the sweep times on ``row``: the direct kernel's queries per
    program and warps (never more lanes than queries) and, for one-pixel patches, channels in
    registers or not; the backward's; the row kernel's block width, warps and rows per strip,
    and its channel loop (unrolled, channels outermost); for one-pixel patches the backward's
    channels-last accumulators; its query gradient summed in registers or not and its passes
    at precomputed key offsets; the row kernel's per-lane candidate buffer, and for one-pixel
    patches the direct kernel's (with its skip of candidates no lane keeps); the row kernel's
    channels per load (channel-blocked videos; rows_cpad: zero channels padding C = 3 to 4);
    ``parts``: which of "fwd", "f+b", "rows", "strip", "unroll", "cout", "clast", "gq", "buffer",
    "dsel", "cvec" to include ("mem": the peak-memory runs after the sweep)."""
    out = []
    qregs = (64, 0) if row.kw["ps"] == 1 else (64,)
    for block_q in (32, 64, 128, 256):
        for warps in (1, 2, 4, 8):
            if 32 * warps <= block_q:
                out += [("fwd", dict(block_q=block_q, num_warps=warps, qreg_max=q)) for q in qregs]
    for block_q in (16, 32, 64):
        for warps in (1, 2, 4):
            out.append(("f+b", dict(bwd_block_q=block_q, bwd_warps=warps)))
    if row.kw["ps"] == 1:
        for m in (0, 8):
            out.append(("clast", dict(bwd_clast_min=m)))
    # the backward's query gradient added per result or summed first (at key offsets decoded
    # per element), and the two passes at precomputed key offsets (whole positions)
    for gq in (False, True) if row.kw["ps"] > 1 else (True,):
        out.append(("gq", dict(bwd_keys=False, bwd_gq_sum=gq, bwd_block_q=32, bwd_warps=4)))
    for block_q, warps in ((16, 4), (32, 4), (32, 8), (64, 8)):
        out.append(("gq", dict(bwd_keys=True, bwd_block_q=block_q, bwd_warps=warps)))
    # the direct kernel's selection (one-pixel patches: the rows it runs on whole): inserted at
    # once, with the skip, buffered
    if row.kw["ps"] == 1:
        for nb, skip in ((0, False), (0, True), (2, False), (4, False), (8, False)):
            out.append(("dsel", dict(direct_buffer=nb, direct_skip=skip)))
    if row.kw["ps"] > 1:
        out.append(("rows", dict(rows=False)))
        out.append(("rows", dict(rows_edges=False)))
        out.append(("rows", dict(rows_skip=False)))
        out.append(("rows", dict(rows_skip=True)))
        for bx, warps, strip in ROWS_SWEEP:
            out.append(("rows", dict(rows_bx=bx, rows_warps=warps, rows_strip=strip)))
        for strip in (1, 2, 3, 4):
            out.append(("strip", dict(rows_strip=strip)))
        for nb in (0, 2, 4, 8):
            out.append(("buffer", dict(rows_buffer=nb)))
        if row.shape[2] // row.kw.get("nheads", 1) > 3:  # channels not in registers
            for strip in (2, 4):
                out.append(("unroll", dict(rows_unroll=0, rows_strip=strip)))
            for cout in (0, 3, 8):
                out.append(("cout", dict(rows_cout=cout)))
            for cvec, cout, strip in (
                (1, 3, 2), (2, 3, 2), (4, 3, 2), (4, 5, 2), (4, 2, 2), (4, 4, 2), (4, 3, 1),
            ):  # fmt: skip
                out.append(("cvec", dict(rows_cvec=cvec, rows_cout=cout, rows_strip=strip)))
        else:  # channels padded to a multiple of the vector (C = 3: one load of 4)
            for cvec, strip in ((1, 2), (2, 2), (4, 2), (1, 3), (4, 3), (4, 4)):
                out.append(("cvec", dict(rows_cvec=cvec, rows_strip=strip, rows_cpad=True)))
    return [(part, cfg) for part, cfg in out if part in parts.split(",")]


def _run_config(row: Row, part: str, cfg: dict, device: str) -> None:
    """One search (forward, or forward+backward) of ``row`` under ``cfg``: compiles its
    kernels into Triton's on-disk cache (run in worker processes, many at once)."""
    from dnls.ops import _search_triton as kernels

    os.environ["DNLS_BACKEND"] = "triton"
    kernels.CONFIG.update(cfg)
    vid = torch.rand(row.shape, device=device, requires_grad=part in BACKWARD_PARTS)
    d, _ = dnls.search(vid, **row.kw)
    if part in BACKWARD_PARTS:
        d.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()


def _outputs(row: Row, vid: torch.Tensor, backward: bool) -> tuple[torch.Tensor, ...]:
    """A search's distances and positions (and with ``backward`` the video's gradient of a
    weighted sum of the distances): what --smoke compares across configurations."""
    v = vid.clone().requires_grad_(backward)
    d, i = dnls.search(v, **row.kw)
    if not backward:
        return d, i
    weight = torch.rand(d.shape, generator=torch.Generator().manual_seed(0)).to(d.device)
    (g,) = torch.autograd.grad((d * weight).sum(), v)
    return d.detach(), i, g


def _smoke_check(what: str, got: tuple, want: tuple) -> None:
    """With --smoke, a configuration whose distances or gradient differ from the default
    kernels' by more than 1e-5 (relative), or whose positions differ, fails the run."""
    for name, a, b in zip(("dists", "inds", "grad"), got, want, strict=False):
        if name == "inds":
            ok = torch.equal(a, b)
        else:
            ok = float((a - b).abs().max()) <= 1e-5 * max(float(b.abs().max()), 1e-30)
        if not ok:
            raise AssertionError(f"{what}: {name} differ from the default kernels'")


def sweeps(gpu: str, names: list[str], parts: str) -> None:
    """Launch configurations of the forward and backward kernels on the rows ``names`` (compiled
    first in parallel worker processes, then timed here one by one), and peak memory against
    the window size and the number of queries (it must follow count x K, not the window)."""
    import concurrent.futures
    import multiprocessing

    from dnls.ops import _search_triton as kernels

    os.environ["DNLS_BACKEND"] = "triton"
    defaults = dict(kernels.CONFIG)
    jobs = [(ROWS[n], part, cfg, DEV) for n in names for part, cfg in sweep_configs(ROWS[n], parts)]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    workers = 12
    if SMOKE:  # one job, for the workers' code: the interpreter has nothing to compile
        jobs, workers = jobs[:1], 1
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for job, fut in [(j, pool.submit(_run_config, *j)) for j in jobs]:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - a config that fails is reported, not fatal
                print(f"config {job[0].name, *job[1:3]} failed: {e!r}"[:300], flush=True)
                if SMOKE:
                    raise
    print(f"compiled {len(jobs)} configurations in {time.perf_counter() - t0:.0f} s", flush=True)
    for name in names:
        row = ROWS[name]
        vid = torch.rand(row.shape, device=DEV)
        vg = vid.clone().requires_grad_()

        def fwd_bwd():
            d, _ = dnls.search(vg, **row.kw)  # noqa: B023
            d.sum().backward()

        want = {b: _outputs(row, vid, b) for b in (False, True)} if SMOKE else {}
        for part, cfg in sweep_configs(row, parts):
            kernels.CONFIG.update(defaults)
            kernels.CONFIG.update(cfg)
            backward = part in BACKWARD_PARTS
            if SMOKE:
                _smoke_check(f"{name} {part} {cfg}", _outputs(row, vid, backward), want[backward])
            if not backward:
                ms = bench(lambda: dnls.search(vid, **row.kw))  # noqa: B023
            else:
                ms = bench(fwd_bwd, 300)
            print(f"config {name} {part} {cfg}: {ms:.2f} ms", flush=True)
        kernels.CONFIG.update(defaults)
    if "mem" not in parts.split(",") or SMOKE:
        return
    vid = torch.rand(1, 1, 3, 512, 512, device="cuda")
    q = 512 * 512
    for ws in (7, 15, 31):
        mb = peak_mb(lambda: dnls.search(vid, ws=ws, ps=7, k=14))  # noqa: B023
        print(f"memory {gpu}: 512x512, ws={ws}, k=14, count={q}: {mb:.1f} MB", flush=True)
    for count in (q // 4, q // 2, q):
        mb = peak_mb(lambda: dnls.search(vid, ws=21, ps=7, k=14, count=count))  # noqa: B023
        print(f"memory {gpu}: 512x512, ws=21, k=14, count={count}: {mb:.1f} MB", flush=True)


def profile(names: list[str]) -> None:
    """Each row's forward (``W3``), or backward (``W3:bwd``), once after a warm-up call, between
    cudaProfilerStart and Stop: run under ``ncu --profile-from-start off`` to read the hardware
    counters of those kernels."""
    os.environ["DNLS_BACKEND"] = "triton"
    for spec in names:
        name, _, part = spec.partition(":")
        row = ROWS[name]
        backward = part == "bwd"
        vid = torch.rand(row.shape, device="cuda", requires_grad=backward)
        for profiled in (False, True):  # a warm-up call, then the profiled one
            if backward:
                d, _ = dnls.search(vid, **row.kw)
            torch.cuda.synchronize()
            if profiled:
                torch.cuda.profiler.start()
            if backward:
                d.sum().backward()
            else:
                dnls.search(vid, **row.kw)
            torch.cuda.synchronize()
            if profiled:
                torch.cuda.profiler.stop()


def variants(names: list[str]) -> None:
    """Forward time of each row with one setting changed at a time (k = 1, one channel, a
    one-frame window): the differences place the time among selection, channels and frames."""
    os.environ["DNLS_BACKEND"] = "triton"
    for name in names:
        row = ROWS[name]
        changes = [("as is", {}, row.shape), ("k=1", {"k": 1}, row.shape)]
        b, t, c, h, w = row.shape
        if row.kw.get("nheads", 1) == 1 and c > 1:
            changes.append(("C=1", {}, (b, t, 1, h, w)))
        if row.kw.get("wt", 0):
            changes.append(("wt=0", {"wt": 0}, row.shape))
        for label, kw, shape in changes:
            vid = torch.rand(shape, device="cuda")
            ms = bench(lambda: dnls.search(vid, **{**row.kw, **kw}))  # noqa: B023
            print(f"variant {name} {label}: {ms:.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--check-queries", type=int, default=CHECK_QUERIES)
    parser.add_argument("--ref-queries", type=int, default=256)
    parser.add_argument("--parts", default="bwd,base,ref", help="extra measurements to take")
    parser.add_argument("--sweep", default="", help="rows to sweep launch configs on, and memory")
    parser.add_argument(
        "--sweep-parts", default="fwd,f+b,rows,mem", help="kernels the sweep covers"
    )
    parser.add_argument("--profile", default="", help="rows to run once for ncu (W3:bwd: backward)")
    parser.add_argument("--variants", default="", help="rows to time with one setting changed")
    parser.add_argument(
        "--config",
        type=json.loads,
        default={},
        help="kernel settings for the whole run (JSON: '{\"direct_buffer\": 4}')",
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny rows on the CPU under Triton's interpreter: checks and sweeps, nothing timed",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        global DEV, SMOKE
        DEV, SMOKE = "cpu", True
        ROWS.update(smoke_rows())
        if args.profile or args.variants:
            parser.error("--smoke runs the checks and the sweeps, not --profile or --variants")
    if args.config:
        from dnls.ops import _search_triton as kernels

        unknown = set(args.config) - set(kernels.CONFIG)
        if unknown:
            parser.error(
                f"--config: unknown settings {sorted(unknown)} (known: {list(kernels.CONFIG)})"
            )
        kernels.CONFIG.update(args.config)
    gpu = "cpu (--smoke, Triton's interpreter)" if SMOKE else torch.cuda.get_device_name()
    if args.profile:
        return profile(args.profile.split(","))
    if args.variants:
        variants(args.variants.split(","))
    if args.sweep:
        sweeps(gpu, args.sweep.split(","), args.sweep_parts)
    results = []
    for name in filter(None, args.rows.split(",")):
        res = measure(name, args, gpu)
        results.append(res)
        print(json.dumps(res), flush=True)
    print(f"\n{gpu}, torch {torch.__version__}, triton {triton.__version__}")
    failed = [r["row"] for r in results if not r["check"].startswith("ok")]
    print(
        f"{'row':5} {'fwd ms':>8} {'fwd MB':>8} {'f+b ms':>9} {'f+b MB':>8} {'base ms':>8} "
        f"{'base MB':>8} {'ref ms*':>9} {'floor mem':>9} {'floor dir':>9}  check"
    )
    for r in results:
        print(
            f"{r['row']:5} {r['fwd_ms']:8.2f} {r['fwd_mb']:8.0f} {r['fwdbwd_ms']:9.2f} "
            f"{r['fwdbwd_mb']:8.0f} {r['baseline_ms']:8.2f} {r['baseline_mb']:8.0f} "
            f"{r['reference_ms_scaled']:9.0f} {r['floor_mem_ms']:9.3f} "
            f"{r['floor_direct_ms']:9.2f}  {r['check']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if SMOKE and failed:
        sys.exit(f"--smoke: the checks of {', '.join(failed)} failed")


if __name__ == "__main__":
    main()
