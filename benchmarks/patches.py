"""Benchmark and real-size check of the patch ops on a GPU: iunfold / ifold against
``torch.nn.functional.unfold`` / ``fold`` where they compute the same thing, and gather / wpsum /
scatter against the reference path, forward and backward.

Each row reports the median CUDA-event time, the peak memory above the inputs, the bytes the op
must move (inputs read once, outputs written once) and the bandwidth that makes, as a fraction
of the device's copy bandwidth (measured in the same run, or ``--copy-bw``; 2.9 TB/s on the
H100). Every result is first checked against its baseline at the real size.

    python benchmarks/patches.py [--rows fold,knn,...] [--json out.json]   (rows: ROWS below)

``--smoke`` runs the rows ``fold``, ``knn`` and ``det`` and the sweeps (``foldsweep``, ``knnsweep``,
``stagedsweep``, ``anchors``, ``anchorparts``, ``anchorflush``, ``dpossweep``,
``scattertile``, ``rowssweep``, ``host``, ``layoutcopy``; ``SMOKE_ROWS``) on tiny inputs on
the CPU, under Triton's interpreter, each configuration launched as on CUDA and checked (against the
default kernels, the reference or torch), nothing timed: a check of the script itself before
it costs device time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys

if "--smoke" in sys.argv:  # (read when the kernel modules are imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["DNLS_BACKEND"] = "triton"  # (CPU tensors take the reference path by default)

import _timing
import torch
import torch.nn.functional as F
import triton.testing

import dnls

DEV = "cuda"  # "cpu" with --smoke
SMOKE = False


# --smoke times nothing: each configuration has run once, for its check, before it is timed


def bench(fn, rep_ms=200) -> float:
    return float("nan") if SMOKE else _timing.bench(fn, rep_ms, warmup_ms=25)


def kernel_ms(fn) -> float:
    return float("nan") if SMOKE else _timing.kernel_ms(fn)


def peak_mb(fn) -> float:
    return float("nan") if SMOKE else _timing.peak_mb(fn)


def smoke_check(err: float, what: str, against: str = "the default kernels") -> None:
    """With --smoke, an output that differs from the default kernels' (or from its baseline,
    ``against``) fails the run."""
    if SMOKE and not err <= 1e-4:
        raise AssertionError(f"{what}: rel err {err:.1e} against {against}")


def with_backend(name, fn):
    def run():
        old = os.environ.get("DNLS_BACKEND")
        os.environ["DNLS_BACKEND"] = name
        try:
            return fn()
        finally:
            os.environ["DNLS_BACKEND"] = old or "auto"

    return run


def max_rel(a, b) -> float:
    """Largest error relative to ``b``'s largest value; of tuples (scatter's sums and counts),
    the largest over their parts."""
    if isinstance(a, tuple):
        return max(max_rel(x, y) for x, y in zip(a, b, strict=True))
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def record(results, name, case, provider, ms, mb, nbytes, copy_bw, extra="", fn=None):
    """One row; with ``fn``, also the GPU time of its kernels (``kernel_ms``)."""
    if fn is not None:
        kms = kernel_ms(fn)
        extra = f"kernels {kms:.3f} ms ({nbytes / (kms * 1e-3) / copy_bw:.0%}) {extra}"
    gbs = nbytes / ms / 1e6
    row = dict(
        op=name, case=case, provider=provider, ms=round(ms, 4), peak_mb=round(mb, 1),
        bytes_mb=round(nbytes / 2**20, 1), gb_s=round(gbs, 1),
        frac_copy=round(gbs * 1e9 / copy_bw, 3), note=extra,
    )  # fmt: skip
    results.append(row)
    print(  # noqa: T201
        f"{name:14s} {case:28s} {provider:10s} {ms:9.3f} ms {mb:9.1f} MB  "
        f"{nbytes / 2**20:8.1f} MB moved {gbs:8.1f} GB/s ({row['frac_copy']:.0%} of copy) {extra}"
    )


FOLD = ((4, 64, 256, 3), (1, 3, 1024, 7))  # (B, C, H = W, ps)
FOLD_SMOKE = ((2, 8, 12, 3), (1, 3, 16, 7))  # --smoke: the same channel paths, tiny frames


def fold_rows(results, args):
    """iunfold/ifold vs F.unfold/F.fold: border zero, one frame, odd ps, whole frame."""
    for b, c, hw, ps in FOLD_SMOKE if SMOKE else FOLD:
        fold_case(results, args, b, c, hw, ps)
        torch.cuda.empty_cache()


def fold_case(results, args, b, c, hw, ps):
    case = f"B{b} C{c} {hw}x{hw} ps{ps}"
    x = torch.rand(b, c, hw, hw, device=DEV)
    vid = x[:, None]
    pad = ps // 2
    kw = dict(ps=ps, border="zero")
    q = hw * hw
    e = c * ps * ps
    # --- unfold (forward), and its backward (a fold)
    ours = dnls.iunfold(vid, **kw)
    theirs = F.unfold(x, ps, padding=pad)
    err = max_rel(ours.reshape(b, q, e).transpose(1, 2), theirs)
    smoke_check(err, f"iunfold {case}", "F.unfold")
    nbytes = 4 * (x.numel() + b * q * e)
    for prov, fn in (("dnls", lambda: dnls.iunfold(vid, **kw)),
                     ("torch", lambda: F.unfold(x, ps, padding=pad))):  # fmt: skip
        record(results, "iunfold", case, prov, bench(fn), peak_mb(fn), nbytes, args.copy_bw,
               f"rel err {err:.1e}" if prov == "dnls" else "", fn)  # fmt: skip
    # --- fold (forward); also iunfold's backward
    patches = torch.rand(b, q, 1, c, ps, ps, device=DEV)
    cols = patches.reshape(b, q, e).transpose(1, 2).contiguous()
    ours, _ = dnls.ifold(patches, shape=vid.shape, border="zero")
    theirs = F.fold(cols, (hw, hw), ps, padding=pad)
    err = max_rel(ours[:, 0], theirs)
    smoke_check(err, f"ifold {case}", "F.fold")
    for prov, fn in (("dnls", lambda: dnls.ifold(patches, shape=vid.shape, border="zero")),
                     ("torch", lambda: F.fold(cols, (hw, hw), ps, padding=pad))):  # fmt: skip
        record(results, "ifold", case, prov, bench(fn), peak_mb(fn), nbytes, args.copy_bw,
               f"rel err {err:.1e}" if prov == "dnls" else "", fn)  # fmt: skip
    # --- forward + backward of unfold
    xg = x.detach().requires_grad_()
    vg = xg[:, None]
    g = torch.rand(b, q, 1, c, ps, ps, device=DEV)
    gcols = g.reshape(b, q, e).transpose(1, 2).contiguous()

    def ours_fb():
        torch.autograd.grad(dnls.iunfold(vg, **kw), xg, g)

    def theirs_fb():
        torch.autograd.grad(F.unfold(xg, ps, padding=pad), xg, gcols)

    for prov, fn in (("dnls", ours_fb), ("torch", theirs_fb)):
        record(results, "iunfold f+b", case, prov, bench(fn), peak_mb(fn), 2 * nbytes,
               args.copy_bw, fn=fn)  # fmt: skip


def fold_sweep(results, args):
    """Launch configurations of the per-pixel fold kernel on the ifold rows: the default's loop
    not unrolled; rows, pixels of a row and channels per program, warps. Each is checked
    against the default's result."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.FOLD_CONFIG)
    for b, c, hw, ps in FOLD_SMOKE if SMOKE else FOLD:
        patches = torch.rand(b, hw * hw, 1, c, ps, ps, device=DEV)
        shape = (b, 1, c, hw, hw)
        run = lambda: dnls.ifold(patches, shape=shape, border="zero")[0]  # noqa: E731, B023
        want = run()
        launches = [dict(default, unroll=False)]
        launches += [
            dict(default, block_x=block_x, block_c=block_c, num_warps=warps, rows=rows)
            for rows, block_x in (
                ((1, 16), (2, 8), (2, 16), (4, 4), (4, 8), (4, 16), (8, 8))
                if c > 4
                else ((1, 256), (2, 128), (4, 64), (4, 128), (8, 32), (8, 64))
            )
            for block_c in ((None, c) if c <= 4 else (None,))
            for warps in (4, 8)
        ]
        for cfg in launches:
            kernels.FOLD_CONFIG.update(cfg)
            err = max_rel(run(), want)
            smoke_check(err, f"ifold {cfg}")
            ms = bench(run, 100)
            kms = kernel_ms(run)
            print(f"fold sweep B{b} C{c} {hw}x{hw} ps{ps} {cfg}: {ms:.3f} ms, "  # noqa: T201
                  f"kernels {kms:.3f} ms, rel err {err:.1e}", flush=True)  # fmt: skip
            results.append(dict(op="fold sweep", case=f"B{b} C{c} ps{ps}", ms=ms,
                                kernel_ms=kms, err=err, **cfg))  # fmt: skip
        kernels.FOLD_CONFIG.update(default)


def knn_sweep(results, args):
    """Launch configurations of the flat gather/scatter kernels, of scatter's tile kernel and
    of the wpsum tiles, forward and backward, on the knn rows' real positions."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    configs = [("gather", dict(flat_block=b, flat_warps=w)) for b in (512, 1024, 2048)
               for w in (4, 8)]  # fmt: skip
    configs += [("scatter", dict(cfg, scatter_tile=None, **NO_ANCHORS)) for _, cfg in configs]
    # scatter's tile kernel (whole positions, few channels): patches, elements, warps
    for tile in ((8, 32, 4), (16, 32, 4), (32, 32, 4), (16, 64, 4), (32, 32, 8), (64, 32, 8)):
        configs.append(("scatter", dict(scatter_tile=tile, **NO_ANCHORS)))
    for block_e in (32, 64, 128):
        for tile in (1024, 4096):
            for w in (4, 8):
                fwd = dict(wpsum_block_e=block_e, wpsum_tile=tile, wpsum_warps=w)
                bwd = dict(wpsum_bwd_block_e=block_e, wpsum_bwd_tile=tile, wpsum_bwd_warps=w)
                configs += [("wpsum", fwd), ("wpsum f+b", bwd)]
    if args.ops:
        configs = [(op, cfg) for op, cfg in configs if op in args.ops.split(",")]
    _run_sweep(results, args, configs, default)


def staged_sweep(results, args):
    """The staged gather/wpsum kernel against the direct one, and its tiles: (mode, queries,
    neighbours per gather, elements per chunk (mode "flat": per step), region pitch, region
    size, warps). The K16 row (128 channels) takes the keys ending in "_last" (read
    channels-last, not in region mode)."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    tiles = {
        "gather": [("interior", 16, 1, 128, 71, 8192, 4), ("interior", 4, 16, 64, 71, 8192, 4),
                   ("interior", 4, 16, 64, 71, 8192, 8), ("interior", 2, 16, 64, 71, 8192, 4),
                   ("interior", 8, 16, 64, 71, 8192, 8), ("flat", 4, 1, 1024, 1, 1, 4),
                   ("flat", 8, 1, 1024, 1, 1, 4), ("flat", 16, 1, 1024, 1, 1, 4),
                   ("flat", 16, 1, 2048, 1, 1, 8), ("flat", 32, 1, 2048, 1, 1, 8),
                   ("flat", 8, 1, 512, 1, 1, 4), ("flat", 4, 1, 512, 1, 1, 2),
                   ("flatpix", 4, 1, 1024, 1, 1, 4), ("flatpix", 16, 1, 2048, 1, 1, 8)],
        "wpsum": [("interior", 8, 2, 64, 71, 8192, 4), ("flat", 8, 1, 1024, 1, 1, 4),
                  ("flat", 16, 1, 1024, 1, 1, 4), ("flat", 4, 1, 512, 1, 1, 4),
                  ("flat", 16, 1, 2048, 1, 1, 8), ("flat", 32, 1, 1024, 1, 1, 4),
                  ("flatpix", 8, 1, 1024, 1, 1, 4), ("flatpix", 16, 1, 1024, 1, 1, 4),
                  ("flatpix", 4, 1, 512, 1, 1, 4), ("flatpix", 16, 1, 2048, 1, 1, 8)],
        "gather_last": [("interior", 16, 1, 128, 1, 1, 4), ("interior", 16, 4, 128, 1, 1, 8),
                        ("interior", 4, 16, 128, 1, 1, 8), ("interior", 8, 16, 128, 1, 1, 8),
                        ("flat", 4, 1, 1024, 1, 1, 4), ("flat", 16, 1, 2048, 1, 1, 8)],
        "wpsum_last": [("interior", 16, 1, 128, 1, 1, 4), ("flat", 4, 1, 1024, 1, 1, 4),
                       ("flat", 16, 1, 1024, 1, 1, 4)],
    }  # fmt: skip
    for row, last in ((KNN[:1], ""), (KNN[1:], "_last")):
        configs = []
        for op in ("gather", "wpsum"):
            key = f"staged_{op}{last}"
            configs += [(op, {key: None})] + [(op, {key: tile}) for tile in tiles[op + last]]
        _run_sweep(results, args, configs, default, row)
    # iunfold with few channels runs the staged gather of one neighbour
    side = 24 if SMOKE else 1024
    x = torch.rand(1, 1, 3, side, side, device=DEV)
    kernels.CONFIG.update(default, staged_gather1=None)
    expect = dnls.iunfold(x, ps=7, border="zero")
    for tile in [None, ("region", 32, 1, 64, 39, 1024, 4), ("region", 32, 1, 32, 39, 1024, 4),
                 ("region", 16, 1, 64, 23, 1024, 4), ("interior", 32, 1, 64, 39, 1024, 4),
                 ("interior", 64, 1, 64, 39, 1024, 4)]:  # fmt: skip
        cfg = dict(staged_gather1=tile)
        kernels.CONFIG.update(default)
        kernels.CONFIG.update(cfg)
        err = max_rel(dnls.iunfold(x, ps=7, border="zero"), expect)
        smoke_check(err, f"iunfold {cfg}")
        ms = bench(lambda: dnls.iunfold(x, ps=7, border="zero"), 100)
        case = f"C3 {side}x{side} ps7"
        print(f"iunfold sweep {case} {cfg}: {ms:.3f} ms, rel err {err:.1e}", flush=True)  # noqa: T201
        results.append(dict(op="iunfold sweep", case=case, ms=ms, err=err, **cfg))
    kernels.CONFIG.update(default)


def rows_sweep(results, args):
    """wpsum in the staged kernel's rows modes (each patch read in chunks of consecutive
    elements, a warp's lanes along it, kb queries at a time; "rowspix" pixel by pixel from a
    channels-last copy) against the direct kernel and, on K14, the interior tile (the earlier
    defaults): (mode, queries per program, queries at a time, elements per chunk, -, -,
    warps). The K16 row (128 channels) takes the key ending in "_last"."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    tiles = {
        "": [("rows", 16, 4, 32, 1, 1, 4), ("rows", 16, 8, 32, 1, 1, 4),
             ("rows", 32, 8, 32, 1, 1, 8), ("rows", 16, 4, 64, 1, 1, 4),
             ("rowspix", 16, 4, 32, 1, 1, 4), ("rowspix", 16, 8, 32, 1, 1, 4)],
        "_last": [("rows", 16, 4, 128, 1, 1, 4), ("rows", 16, 8, 128, 1, 1, 4),
                  ("rows", 32, 8, 128, 1, 1, 8), ("rows", 16, 4, 32, 1, 1, 4)],
    }  # fmt: skip
    rows = KNN_SMOKE if SMOKE else KNN
    for row, last in ((rows[:1], ""), (rows[1:], "_last")):
        key = f"staged_wpsum{last}"
        before = [None] + ([("interior", 8, 2, 64, 71, 8192, 4)] if last == "" else [])
        configs = [("wpsum", {key: t}) for t in before + tiles[last]]
        _run_sweep(results, args, configs, default, row)


def dpos_sweep(results, args):
    """gather's position gradient (positions a quarter pixel off the search's) at the launches
    of its kernel: (patches per program, warps); the default spills offline."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    launches = ((32, 4), (32, 8), (16, 4), (16, 8), (8, 4), (8, 8))
    _run_sweep(results, args, [("gather dpos", dict(dpos=d)) for d in launches], default)


@contextlib.contextmanager
def _anchors_everywhere():
    """Scatter by anchors wherever it applies, whatever the patch size (its rule, _by_anchors,
    bypassed) inside the block."""
    from dnls.ops import _patches_triton as kernels

    rule = kernels._by_anchors
    kernels._by_anchors = lambda geom, e, weighted=False: True
    try:
        yield
    finally:
        kernels._by_anchors = rule


def anchors_sweep(results, args):
    """scatter and wpsum forward+backward by anchors (the entries grouped by position, each
    position's patches summed once, the sums added into the video: anchors_flush) against
    atomics, at launches of its sum kernel (anchors per program, entries per step, warps),
    on the knn rows and the rule's, whatever the patch size (its rule, _by_anchors, is
    bypassed); then peak memory, the host's time per call and each kernel's time. The kernel
    times include the grouping (and, anchors_flush off, the fold)."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    launches = ((2, 4, 4), (4, 4, 4), (1, 8, 2), (4, 2, 8))
    configs = [("scatter", NO_ANCHORS)] + [("scatter", dict(scatter_anchors=a)) for a in launches]
    configs += [("wpsum f+b", NO_ANCHORS)]
    configs += [("wpsum f+b", dict(wpsum_bwd_anchors=a)) for a in launches]
    rows = KNN_SMOKE if SMOKE else KNN + RULE_ROWS
    with _anchors_everywhere():
        _run_sweep(results, args, configs, default, rows)
        _anchors_parts(results, args, rows, default)


def anchors_flush(results, args):
    """scatter and wpsum forward+backward by anchors with each anchor's sum added into the
    video with atomics (``anchors_flush``: a counting sort, no per-anchor sums in memory, no
    fold; one-pixel patches fold) against the folded sums (grouped by a stable sort, or by the
    counting sort: ``anchors_stable`` off) and against the atomics (no anchors), at the default
    launches, on the knn rows and the rule's, whatever the patch size (the rule
    bypassed): the data of the rule, _by_anchors."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    ways = (NO_ANCHORS, dict(anchors_flush=False), dict(anchors_flush=False, anchors_stable=False),
            dict(anchors_flush=True))  # fmt: skip
    configs = [(op, cfg) for op in ("scatter", "wpsum f+b") for cfg in ways]
    with _anchors_everywhere():
        _run_sweep(results, args, configs, default, KNN_SMOKE if SMOKE else KNN + RULE_ROWS)


def anchors_parts(results, args):
    """The second half of ``anchors`` alone (no sweep of launches): peak memory, host time per
    call and each kernel's time, atomics against by anchors, on the same rows."""
    from dnls.ops import _patches_triton as kernels

    with _anchors_everywhere():
        _anchors_parts(results, args, KNN_SMOKE if SMOKE else KNN + RULE_ROWS, dict(kernels.CONFIG))


def _anchors_parts(results, args, rows, default):
    """Peak memory, the host's time per call and each kernel's time of scatter and wpsum
    forward+backward, with atomics and by anchors at the default launches."""
    from dnls.ops import _patches_triton as kernels

    for label, vid, inds, ps in _knn_inputs(args, rows):
        ops = _knn_ops(vid, inds, ps)
        for cfg in (NO_ANCHORS, {}):
            kernels.CONFIG.update(default, **cfg)
            for name in ("scatter", "wpsum f+b"):
                mb = peak_mb(ops[name])
                parts = [] if SMOKE else _timing.kernel_breakdown(ops[name])
                host = float("nan") if SMOKE else _timing.host_ms(ops[name])
                top = ", ".join(f"{k[:40]} {ms:.3f}" for k, ms in parts[:8])
                way = "atomics" if cfg else "anchors"
                print(f"{name} {label} {way}: peak {mb:.1f} MB, host {host:.3f} ms per call; "  # noqa: T201
                      f"kernels ms: {top}", flush=True)  # fmt: skip
                results.append(dict(op=f"{name} peak", case=label, way=way, mb=mb,
                                    host_ms=host, kernels=parts))  # fmt: skip
        kernels.CONFIG.update(default)
        del ops
        torch.cuda.empty_cache()


def host_rows(results, args):
    """Where each knn op's CUDA-event time exceeds its kernels' time: the host's time per call
    (launches, torch calls, Python), and the host functions that take it: cProfile of 50 calls
    (the 12 largest by own time) and the torch profiler's host events of 20 (the 15 largest by
    own time: launches, torch ops, any synchronisation)."""
    import cProfile
    import pstats

    for label, vid, inds, ps in _knn_inputs(args):
        ops = _knn_ops(vid, inds, ps)
        for name in ("gather", "scatter", "wpsum", "wpsum f+b"):
            fn = ops[name]
            fn()
            ms = float("nan") if SMOKE else bench(fn, 100)
            kms = float("nan") if SMOKE else kernel_ms(fn)
            host = float("nan") if SMOKE else _timing.host_ms(fn)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2 if SMOKE else 50):
                fn()
            prof.disable()
            if not SMOKE:
                torch.cuda.synchronize()
            print(f"host {name} {label}: event {ms:.3f} ms, kernels {kms:.3f} ms, "  # noqa: T201
                  f"host {host:.3f} ms per call", flush=True)  # fmt: skip
            stats = pstats.Stats(prof, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(12)
            if not SMOKE:  # the host's CUDA calls and torch ops (a synchronisation shows here)
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as tprof:
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))  # noqa: T201
            results.append(dict(op=f"{name} host", case=label, ms=ms, kernel_ms=kms, host_ms=host))
        del ops
        if not SMOKE:
            torch.cuda.empty_cache()


def layout_copies(results, args):
    """The channels-last copies of the Triton launchers (dnls.ops._layout) by the transpose
    kernel against PyTorch's copies (``KERNEL`` off): the copy of K16's video alone, both
    ways, then the ops that take it (gather, wpsum and its backward on the K16 row) and the
    search row W2's forward+backward (heads of 32 channels: channels-last accumulators),
    each checked against the other way's result."""
    from dnls.ops import _layout

    shape, label = ((1, 3, 8, 10, 10), "C8 3x10x10") if SMOKE else ((1, 5, 128, 128, 128), "K16")
    vid = torch.rand(shape, device=DEV)
    v6 = vid.unsqueeze(1)
    nbytes = 2 * vid.numel() * 4
    calls = {"channels-last copy": lambda: _layout.channels_last(v6),
             "channels-first copy": lambda: _layout.channels_first(last)}  # fmt: skip
    for knn, v, inds, ps in _knn_inputs(args, KNN[1:]):
        ops = _knn_ops(v, inds, ps)
        calls.update({f"{name} {knn}": ops[name] for name in ("gather", "wpsum", "wpsum f+b")})
    w2 = dict(ws=9, wt=1, ps=1, k=16, nheads=4, dist="dot")
    q = torch.rand(shape, device=DEV).requires_grad_()

    def search_fb():
        d, _ = dnls.search(q, **w2)
        return torch.autograd.grad(d.sum(), q)

    calls["search W2 f+b"] = search_fb
    for name, fn in calls.items():
        got = {}
        for kernel in (False, True):
            _layout.KERNEL = kernel
            last = _layout.channels_last(v6)
            out = fn()
            ms = float("nan") if SMOKE else bench(fn, 100)
            kms = float("nan") if SMOKE else kernel_ms(fn)
            got[kernel] = (out, ms, kms)
        _layout.KERNEL = True
        err = max_rel(got[True][0], got[False][0])
        smoke_check(err, f"{name} by the transpose kernel", "PyTorch's copies")
        (_, ms0, k0), (_, ms1, k1) = got[False], got[True]
        rate = f", {nbytes / k1 / 1e6:.0f} GB/s" if "copy" in name and not SMOKE else ""
        print(f"layout {name} {label}: PyTorch's copies {ms0:.3f} ms (kernels {k0:.3f}), "  # noqa: T201
              f"transpose kernel {ms1:.3f} ms (kernels {k1:.3f}{rate}), rel diff {err:.1e}",
              flush=True)  # fmt: skip
        results.append(dict(op=f"{name} layout", case=label, torch_ms=ms0, torch_kernel_ms=k0,
                             ms=ms1, kernel_ms=k1, err=err))  # fmt: skip


def scatter_tiles(results, args):
    """scatter's tile kernel (patches per program, elements per chunk, warps) against the
    default on the knn rows: where a chunk covers whole patches (K16: 128 channels), its loads
    and atomic adds compile to 128-bit vector ones (offline, sm_90)."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    tiles = ((16, 128, 4), (8, 128, 4), (32, 128, 4), (16, 128, 8), (4, 128, 4), (16, 32, 4))
    configs = [("scatter", {}), ("scatter", NO_ANCHORS)]
    configs += [("scatter", dict(scatter_tile=t, **NO_ANCHORS)) for t in tiles]
    _run_sweep(results, args, configs, default)


def det_rows(results, args):
    """scatter and wpsum forward+backward on the knn rows under
    ``torch.use_deterministic_algorithms(True)`` (int64 fixed-point sums) against the default
    (float atomics): time, the same bits on two runs, the difference to the default."""
    for label, vid, inds, ps in _knn_inputs(args, DET_SMOKE if SMOKE else None):
        ops = _knn_ops(vid, inds, ps)
        for name in ("scatter", "wpsum f+b"):
            default = ops[name]()
            ms = bench(ops[name], 100)
            torch.use_deterministic_algorithms(True)
            try:
                first, second = ops[name](), ops[name]()
                det_ms = bench(ops[name], 100)
            finally:
                torch.use_deterministic_algorithms(False)
            same = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
            err = max_rel(tuple(first), tuple(default))
            smoke_check(err if same else float("inf"), f"deterministic {name} {label}",
                        "the default (or not the same bits twice)")  # fmt: skip
            print(f"deterministic {name} {label}: {det_ms:.3f} ms against {ms:.3f} ms "  # noqa: T201
                  f"({det_ms / ms:.2f}x), same bits twice: {same}, rel diff {err:.1e}",
                  flush=True)  # fmt: skip
            results.append(dict(op=f"{name} deterministic", case=label, ms=det_ms,
                                default_ms=ms, same_bits=same, err=err))  # fmt: skip
        del ops
        torch.cuda.empty_cache()


def profile_rows(results, args):
    """Both knn rows' gather, scatter, wpsum and wpsum forward+backward at the defaults, and
    wpsum in the staged kernel's flat and flatpix modes, each run once between
    ``torch.cuda.profiler.start()`` and ``stop()`` after a warm-up (compiles), for a profiler
    around this script (``ncu --profile-from-start off``; device.sh part ``patchprofile``)."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    variants = [("", {})] + [
        (f" {mode}", dict(staged_wpsum=(mode, 16, 1, 1024, 1, 1, 4)))
        for mode in ("flat", "flatpix")
    ]
    for label, vid, inds, ps in _knn_inputs(args):
        ops = _knn_ops(vid, inds, ps)
        for suffix, cfg in variants:
            if cfg and ps == 1:
                continue  # (the modes are those of the 1024² row's three channels)
            names = ("wpsum",) if cfg else ("gather", "scatter", "wpsum", "wpsum f+b")
            kernels.CONFIG.update(default, **cfg)
            for name in names:
                ops[name]()  # warm-up: compiles
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                ops[name]()
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                print(f"profiled {name}{suffix} {label}", flush=True)  # noqa: T201
        kernels.CONFIG.update(default)
        del ops
        torch.cuda.empty_cache()


def layout_rows(results, args):
    """scatter's accumulation buffer channels-first (the default below 8 channels) against
    channels-last, on the knn rows (atomics: scatter by anchors off)."""
    from dnls.ops import _patches_triton as kernels

    default = kernels.CHANNELS_LAST_MIN
    config = dict(kernels.CONFIG)
    kernels.CONFIG.update(NO_ANCHORS)
    for label, vid, inds, ps in _knn_inputs(args):
        patches = dnls.gather(vid, inds, ps=ps)
        expect = dnls.scatter(patches, inds, shape=vid.shape)[0]
        for cl_min in (1, 4096):
            kernels.CHANNELS_LAST_MIN = cl_min
            err = max_rel(dnls.scatter(patches, inds, shape=vid.shape)[0], expect)
            ms = bench(lambda: dnls.scatter(patches, inds, shape=vid.shape), 100)  # noqa: B023
            layout = "channels-last" if cl_min == 1 else "channels-first"
            print(f"scatter {label} {layout}: {ms:.3f} ms, rel err {err:.1e}", flush=True)  # noqa: T201
            results.append(dict(op="scatter layout", case=label, layout=layout, ms=ms, err=err))
        kernels.CHANNELS_LAST_MIN = default
    kernels.CONFIG.update(config)


def _run_sweep(results, args, configs, default, rows=None):
    from dnls.ops import _patches_triton as kernels

    for label, vid, inds, ps in _knn_inputs(args, rows):
        ops = _knn_ops(vid, inds, ps)
        # forward outputs to check each configuration against: the direct kernels'
        direct = {
            f"staged_{op}{last}": None for op in ("gather", "wpsum") for last in ("", "_last")
        }
        kernels.CONFIG.update(default, scatter_tile=None, **NO_ANCHORS, **direct)
        # outputs of the ops this sweep times only
        expect = {name: ops[name]() for name in {name for name, _ in configs}}
        for name, cfg in configs:
            kernels.CONFIG.update(default)
            kernels.CONFIG.update(cfg)
            err = max_rel(ops[name](), expect[name])
            smoke_check(err, f"{name} {label} {cfg}")
            ms = bench(ops[name], 100)
            kms = kernel_ms(ops[name])
            print(f"knn sweep {name} {label} {cfg}: {ms:.3f} ms, kernels {kms:.3f} ms, "  # noqa: T201
                  f"rel err {err:.1e}", flush=True)  # fmt: skip
            results.append(
                dict(op=f"{name} sweep", case=label, ms=ms, kernel_ms=kms, err=err, **cfg)
            )
        del expect
        kernels.CONFIG.update(default)
        del ops
        torch.cuda.empty_cache()


def _knn_ops(vid, inds, ps) -> dict:
    """The timed calls of the knn sweep on one input."""
    weights = torch.softmax(torch.rand(inds.shape[:-1], device=DEV), -1)
    patches = dnls.gather(vid, inds, ps=ps)
    vg = vid.detach().requires_grad_()
    g = torch.rand(*inds.shape[:3], 1, vid.shape[2], ps, ps, device=DEV)
    # fractional positions a quarter pixel off the search's (inside the frame), for gather's
    # position gradient
    top = torch.tensor([0.0, vid.shape[-2] - 1, vid.shape[-1] - 1], device=inds.device)
    frac = torch.minimum(inds.float() + torch.tensor([0.0, 0.25, 0.25], device=inds.device), top)
    frac.requires_grad_()
    gp = torch.rand_like(patches)
    return {
        "gather": lambda: dnls.gather(vid, inds, ps=ps),
        "scatter": lambda: dnls.scatter(patches, inds, shape=vid.shape),
        "wpsum": lambda: dnls.wpsum(vid, weights, inds, ps=ps),
        "wpsum f+b": lambda: torch.autograd.grad(dnls.wpsum(vg, weights, inds, ps=ps), vg, g),
        "gather dpos": lambda: torch.autograd.grad(dnls.gather(vid, frac, ps=ps), frac, gp),
    }


def _knn_inputs(args, rows=None):
    """(label, video, positions, ps) of the knn rows: the positions of a real search."""
    for label, shape, skw in rows or KNN:
        torch.manual_seed(0)
        vid = torch.rand(shape, device=DEV)
        _, inds = dnls.search(vid, count=_knn_count(args, skw, shape), **skw)
        yield label, vid, inds, skw["ps"]


# scatter and wpsum's video gradient without scatter by anchors (by atomics)
NO_ANCHORS = dict(scatter_anchors=None, wpsum_bwd_anchors=None)
KNN = (
    ("K14 ps7 C3 1024x1024", (1, 1, 3, 1024, 1024), dict(ws=21, ps=7, k=14)),
    ("K16 ps1 C128 5x128x128", (1, 5, 128, 128, 128), dict(ws=9, wt=1, ps=1, k=16)),
)


# the rule's rows (scatter by anchors, _by_anchors): patches of 1, 3 and 7 pixels into
# channels-first (3 channels) and channels-last (16, 8) buffers
RULE_ROWS = (
    ("K14 ps3 C3 1024x1024", (1, 1, 3, 1024, 1024), dict(ws=21, ps=3, k=14)),
    ("K14 ps1 C3 1024x1024", (1, 1, 3, 1024, 1024), dict(ws=21, ps=1, k=14)),
    ("K16 ps3 C16 5x128x128", (1, 5, 16, 128, 128), dict(ws=9, wt=1, ps=3, k=16)),
    ("K16 ps7 C8 5x128x128", (1, 5, 8, 128, 128), dict(ws=9, wt=1, ps=7, k=16)),
)
# --smoke: the same ops, patch sizes and channel layouts (3 channels; 8, read channels-last),
# tiny frames
KNN_SMOKE = (
    ("K14 ps7 C3 (smoke)", (1, 1, 3, 24, 24), dict(ws=5, ps=7, k=14)),
    ("K16 ps1 C8 (smoke)", (1, 3, 8, 10, 10), dict(ws=3, wt=1, ps=1, k=16)),
)
# --smoke, the row det: its second input only. The first's deterministic sums (scatter by
# anchors folding patches of 7 pixels, all of a tiny frame near its reflected borders) take
# about 25 s a call under the interpreter; tests/test_patches_triton.py checks that mode.
DET_SMOKE = KNN_SMOKE[1:]
SMOKE_ROWS = (
    "fold", "knn", "det", "foldsweep", "knnsweep", "stagedsweep", "dpossweep",
    "scattertile", "anchors", "anchorparts", "anchorflush", "rowssweep", "host",
    "layoutcopy",
)  # fmt: skip


def _knn_count(args, skw, shape) -> int | None:
    """Queries of a knn row: ``--queries`` of a patch row with more queries than that, every
    query otherwise (and without a patch)."""
    queries = math.prod(shape) // shape[2]  # (B, T, C, H, W)
    return args.queries if skw["ps"] > 1 and queries > args.queries else None


def knn_rows(results, args):
    """gather / wpsum / scatter at the positions of a real search, against the reference."""
    for case, shape, skw in KNN:
        knn_case(results, args, case, shape, skw, skw["ps"], _knn_count(args, skw, shape))
        torch.cuda.empty_cache()


def _index_ops(vid, inds, weights) -> dict:
    """gather, scatter and wpsum of one-pixel patches (one batch, one head) as PyTorch's
    indexing ops on a channels-last copy of ``vid``: ``index_select``, ``index_add_`` and
    ``embedding_bag`` with per-sample weights (sum): a function per op (scatter's takes the
    patches), and under "flat" the copy they read."""
    _, t, c, h, w = vid.shape
    flat = vid[0].permute(0, 2, 3, 1).reshape(-1, c).contiguous()
    pos = inds[0, 0].long()
    lin = ((pos[..., 0] * h + pos[..., 1]) * w + pos[..., 2]).contiguous()  # (Q, K)
    wts = weights[0, 0].contiguous()
    return {
        "flat": flat,
        "gather": lambda: flat.index_select(0, lin.view(-1)),
        "scatter": lambda p: torch.zeros_like(flat).index_add_(0, lin.view(-1), p.reshape(-1, c)),
        "wpsum": lambda: F.embedding_bag(lin, flat, mode="sum", per_sample_weights=wts),
    }


def _index_row(results, args, name, case, index, ours, nbytes, patches=None):
    """Time PyTorch's indexing op for ``name`` (:func:`_index_ops`) after checking it against
    dnls's output ``ours``."""
    c = index["flat"].shape[1]
    if patches is None:
        fn = index[name]
        got = fn().reshape(-1, c)
        want = ours.reshape(-1, c)
    else:
        fn = lambda: index[name](patches)  # noqa: E731
        got = fn()
        want = ours[0].permute(0, 2, 3, 1).reshape(-1, c)  # (T, C, H, W) -> pixels x channels
    err = max_rel(got, want)
    smoke_check(err, f"torch's {name} {case}", "dnls's")
    record(results, name, case, "torch index", bench(fn), peak_mb(fn), nbytes, args.copy_bw,
           f"rel diff {err:.1e}", fn)  # fmt: skip


def knn_case(results, args, case, shape, skw, ps, count):
    torch.manual_seed(0)
    vid = torch.rand(shape, device=DEV)
    dists, inds = dnls.search(vid, count=count, **skw)
    b, hd, q, k = dists.shape
    c = shape[2]
    e = c * ps * ps
    weights = torch.softmax(-dists, -1)
    vbytes = 4 * vid.numel()
    ibytes = 16 * b * q * k  # int32 positions + float32 weight
    case = f"{case} Q{q}"
    nref = min(q, 4096)  # the reference is checked and timed on a slice, and scaled
    sl = slice(0, nref)

    def ref_ms(fn):
        return bench(with_backend("torch", fn), 100) * q / nref

    # gather
    ours = dnls.gather(vid, inds, ps=ps)
    ref = with_backend("torch", lambda: dnls.gather(vid, inds[:, :, sl], ps=ps))()
    err = max_rel(ours[:, :, sl], ref)
    smoke_check(err, f"gather {case}", "the reference")
    nbytes = vbytes + ibytes + 4 * b * q * k * e
    fn = lambda: dnls.gather(vid, inds, ps=ps)  # noqa: E731
    record(results, "gather", case, "dnls", bench(fn), peak_mb(fn), nbytes, args.copy_bw,
           f"rel err {err:.1e}", fn)  # fmt: skip
    # the same positions copied: not marked by search, so their range is checked on each call
    copied = inds.clone()
    fn = lambda: dnls.gather(vid, copied, ps=ps)  # noqa: E731
    record(results, "gather", case, "checked", bench(fn), peak_mb(fn), nbytes,
           args.copy_bw, "positions range-checked", fn)  # fmt: skip
    record(results, "gather", case, "reference",
           ref_ms(lambda: dnls.gather(vid, inds[:, :, sl], ps=ps)), float("nan"), nbytes,
           args.copy_bw, f"timed on {nref} queries, scaled")  # fmt: skip
    # one-pixel patches: the same ops as PyTorch's indexing (on a channels-last copy, made
    # outside the timing), whose kernels meet the same limits
    index = _index_ops(vid, inds, weights) if ps == 1 and b * hd == 1 else None
    if index is not None:
        _index_row(results, args, "gather", case, index, ours, nbytes)
    # scatter (gather's backward)
    patches = ours
    del ours
    vs, _ = dnls.scatter(patches, inds, shape=vid.shape)
    fn = lambda: dnls.scatter(patches, inds, shape=vid.shape)  # noqa: E731
    record(results, "scatter", case, "dnls", bench(fn), peak_mb(fn), nbytes, args.copy_bw, "", fn)
    record(results, "scatter", case, "reference",
           ref_ms(lambda: dnls.scatter(patches[:, :, sl], inds[:, :, sl], shape=vid.shape)),
           float("nan"), nbytes, args.copy_bw, f"timed on {nref} queries, scaled")  # fmt: skip
    ref = with_backend("torch", lambda: dnls.scatter(patches, inds, shape=vid.shape))()[0]
    err = max_rel(vs, ref)
    smoke_check(err, f"scatter {case}", "the reference")
    record(results, "scatter check", case, "dnls", 0.0 + 1e-9, 0.0, 0, args.copy_bw,
           f"rel err {err:.1e}")  # fmt: skip
    if index is not None:
        _index_row(results, args, "scatter", case, index, vs, nbytes, patches)
    # wpsum forward and forward+backward
    ours = dnls.wpsum(vid, weights, inds, ps=ps)
    ref = with_backend("torch", lambda: dnls.wpsum(vid, weights[:, :, sl], inds[:, :, sl],
                                                   ps=ps))()  # fmt: skip
    err = max_rel(ours[:, :, sl], ref)
    smoke_check(err, f"wpsum {case}", "the reference")
    nbytes = vbytes + ibytes + 4 * b * q * e
    fn = lambda: dnls.wpsum(vid, weights, inds, ps=ps)  # noqa: E731
    record(results, "wpsum", case, "dnls", bench(fn), peak_mb(fn), nbytes, args.copy_bw,
           f"rel err {err:.1e}", fn)  # fmt: skip
    record(results, "wpsum", case, "reference",
           ref_ms(lambda: dnls.wpsum(vid, weights[:, :, sl], inds[:, :, sl], ps=ps)),
           float("nan"), nbytes, args.copy_bw, f"timed on {nref} queries, scaled")  # fmt: skip
    if index is not None:
        _index_row(results, args, "wpsum", case, index, ours, nbytes)
    vg = vid.detach().requires_grad_()
    wg = weights.detach().requires_grad_()
    g = torch.rand_like(ours)

    def fb():
        torch.autograd.grad(dnls.wpsum(vg, wg, inds, ps=ps), (vg, wg), g)

    # backward moves: grad read, vid read, gvid written, weights/inds read, gw written
    fb_bytes = nbytes + (4 * b * q * e + 2 * vbytes + ibytes + 4 * b * q * k)
    grads = torch.autograd.grad(dnls.wpsum(vg, wg, inds, ps=ps), (vg, wg), g)
    refg = with_backend("torch", lambda: torch.autograd.grad(
        dnls.wpsum(vg, wg, inds, ps=ps), (vg, wg), g))()  # fmt: skip
    for x, ref, what in zip(grads, refg, ("video", "weights"), strict=True):
        smoke_check(max_rel(x, ref), f"wpsum's {what} gradient {case}", "the reference")
    errs = f"grad rel err vid {max_rel(grads[0], refg[0]):.1e}"
    errs += f" w {max_rel(grads[1], refg[1]):.1e}"
    record(results, "wpsum f+b", case, "dnls", bench(fb), peak_mb(fb), fb_bytes,
           args.copy_bw, errs, fb)  # fmt: skip


ROWS = {
    "fold": fold_rows, "knn": knn_rows, "foldsweep": fold_sweep, "knnsweep": knn_sweep,
    "stagedsweep": staged_sweep,
    "scattertile": scatter_tiles, "anchors": anchors_sweep,
    "anchorparts": anchors_parts, "anchorflush": anchors_flush, "dpossweep": dpos_sweep,
    "layout": layout_rows, "det": det_rows, "rowssweep": rows_sweep,
    "profile": profile_rows, "host": host_rows, "layoutcopy": layout_copies,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="fold,knn")
    parser.add_argument("--json", default=None)
    parser.add_argument("--queries", type=int, default=1 << 17, help="queries of the 1024² rows")
    parser.add_argument("--ops", default="", help="knnsweep: only these ops (scatter,wpsum,...)")
    parser.add_argument(
        "--smoke", action="store_true", help=f"{','.join(SMOKE_ROWS)}: tiny, on the CPU, untimed"
    )
    parser.add_argument(
        "--copy-bw",
        type=float,
        default=None,
        help="copy bandwidth in B/s (default: measured here, a 1 GiB copy)",
    )
    args = parser.parse_args()
    if args.smoke:
        global DEV, SMOKE, KNN
        DEV, SMOKE, KNN = "cpu", True, KNN_SMOKE
        from dnls import _common

        _common.CUDA_LAUNCHES = True  # the interpreter takes the CUDA launch shapes
        args.queries, args.copy_bw = 48, 1.0
        if not set(args.rows.split(",")) <= set(SMOKE_ROWS):
            parser.error(f"--smoke runs only the rows {', '.join(SMOKE_ROWS)}")
    if args.copy_bw is None:
        src, dst = torch.empty(2**28, device=DEV), torch.empty(2**28, device=DEV)
        args.copy_bw = 2 * src.numel() * 4 / (bench(lambda: dst.copy_(src)) * 1e-3)
        del src, dst
    # DNLS_COMMIT first: the device's copy of the tree may carry a stale .git
    commit = (
        os.environ.get("DNLS_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    gpu = "cpu (--smoke, Triton's interpreter)" if SMOKE else torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, triton {triton.__version__}, commit {commit}, "  # noqa: T201
          f"copy {args.copy_bw / 1e12:.2f} TB/s")  # fmt: skip
    results: list[dict] = []
    rows = args.rows.split(",")
    for name, run in ROWS.items():  # in this order, whatever the order asked
        if name in rows:
            run(results, args)
    if args.json:
        with open(args.json, "w") as f:
            meta = dict(gpu=gpu, commit=commit, copy_bw=args.copy_bw)
            json.dump(dict(**meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
