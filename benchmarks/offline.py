"""Compile the Triton kernels that one search of a benchmark row launches, for sm_90 (the H100
and H200), on a machine without a GPU, and report what the compiler made of them: compile time,
registers, stack (spills), shared memory, SASS instructions and their mix. No device time: use it
before a GPU run to catch a kernel that spills or takes minutes to compile, and to count what a
change adds or removes.

    python benchmarks/offline.py W3 [--part fwd|bwd] [--config '{"rows_strip": 3}'] [--mix 12]
    TRITON_CACHE_DIR=$PWD/.tcache python benchmarks/offline.py W4 --part bench
                                                # (a cache to carry to a device call)
    python benchmarks/offline.py patches        # every patch kernel, under every setting
    python benchmarks/offline.py search-small   # every search and attention kernel, small

The search runs on CPU tensors of the row's real size with every Triton launch turned into a
compile only (``warmup``), against a stand-in driver that reports an sm_90 target; the launches'
arguments, and so the kernels' specialisations, are the ones a GPU run would make. The tools
(ptxas, cuobjdump) are the ones the Triton wheel carries. Outputs are not computed. A kernel
already in Triton's cache (``~/.triton/cache``) is loaded, not compiled: its time is the load's.
To compile with the device's Triton (3.6 in 2026-12) rather than this machine's:

    python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    /tmp/t36/bin/python benchmarks/offline.py W3

A cache to carry must also be made under the device's Python (3.12 in 2026-12): Triton's cache
key hashes its own ``libtriton.so``, which differs per Python version, so a cache made under
3.11 is never hit there. The key's hash, printed on both machines, tells whether they agree:

    python -c "import hashlib; from triton.runtime.cache import triton_key as k; \
        print(hashlib.sha256(k().encode()).hexdigest())"

On this machine, with pyenv's 3.12 (its local index has torch for 3.12 only as the CUDA build:
4.7 GB in the venv; it runs on the CPU):

    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/t312
    /tmp/t312/bin/pip install torch==2.13.0 numpy && /tmp/t312/bin/pip install --no-deps \
        --force-reinstall triton==3.6.0
    TRITON_CACHE_DIR=$PWD/.tcache PYTHONPATH=src /tmp/t312/bin/python benchmarks/offline.py \
        W4 --part bench
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import tempfile
import time

import search as rows_table
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

import dnls
from dnls import _common
from dnls.ops import attention as attention_op
from dnls.ops import fold as fold_op
from dnls.ops import patches as patches_op
from dnls.ops import search as search_op

# Triton 3.6 (the device's) fuses multiply-adds by default; later versions warn until it is set
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class _Offline:
    """A driver that compiles for sm_90 and launches nothing."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def _resources(cubin: bytes) -> tuple[dict, collections.Counter]:
    """(registers, stack, shared memory) and the opcode counts of a cubin's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res, sass = (
            subprocess.run(
                [os.path.join(TOOLS, "cuobjdump"), flag, f.name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for flag in ("-res-usage", "-sass")
        )
    usage = {}
    for tok in " ".join(line for line in res.splitlines() if "REG:" in line).split():
        key, _, val = tok.partition(":")
        if key in ("REG", "STACK", "SHARED", "LOCAL"):
            usage[key] = int(val)
    mix = collections.Counter()
    for line in sass.splitlines():
        code = line.strip()
        if not (code.startswith("/*") and "*/" in code and ";" in code):
            continue
        words = code.split("*/", 1)[1].strip().rstrip(";").split()
        if words and words[0].startswith("@"):
            words = words[1:]
        if words:
            mix[words[0].split(".")[0]] += 1
    return usage, mix


@contextlib.contextmanager
def compile_only():
    """Within: every Triton launch compiles its kernel for sm_90 and launches nothing, and the
    ops take their Triton path on CPU tensors as on CUDA ones (no interpreter, CUDA's launch
    shapes); yields the list of (kernel name, compile seconds, cubin) it fills."""
    driver.set_active(_Offline())
    _common.CUDA_LAUNCHES = True
    launches = []
    run = JITFunction.run

    def compile_launch(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self.fn.__name__, time.perf_counter() - t0, kernel.asm["cubin"]))
        return kernel

    saved = [(m, m.backend) for m in (search_op, patches_op, fold_op, attention_op)]
    saved += [(m, m.fused_cpu) for m in (patches_op, fold_op)]
    JITFunction.run = compile_launch
    for m, _ in saved[:4]:
        m.backend = lambda device, op: "triton"
    for m, _ in saved[4:]:
        m.fused_cpu = lambda device: False
    try:
        yield launches
    finally:
        JITFunction.run = run
        _common.CUDA_LAUNCHES = False
        for m, fn in saved:
            setattr(m, fn.__name__, fn)


def compile_row(name: str, part: str, config: dict) -> list[tuple[str, float, bytes]]:
    """(kernel name, compile seconds, cubin) of each kernel launch of row ``name``'s search
    (``part`` "bwd": its backward too; "bench": all that ``search.py`` measures) under the
    kernel settings ``config``."""
    from dnls.ops import _search_triton as kernels

    kernels.CONFIG.update(config)
    row = rows_table.ROWS[name]
    if part == "bench":
        return _compile_bench(row)
    with compile_only() as launches:
        vid = torch.rand(row.shape, requires_grad=part == "bwd")
        d, _ = dnls.search(vid, **row.kw)
        if part == "bwd":
            d.sum().backward()
    return launches


def _compile_bench(row) -> list[tuple[str, float, bytes]]:
    """The launches of ``search.py``'s measurement of ``row`` (``measure``): its check's queries
    (``start``, ``count``) forward and backward with weighted distances, the whole search forward
    and backward, and the deterministic backward: compiled here into TRITON_CACHE_DIR. A device
    call that carries that cache compiles none of them if it was made under the device's Triton
    and Python (the module's docstring; device.sh counts its cubins)."""
    calls = [(rows_table.check_kw(row), True, False), (row.kw, False, False),
             (row.kw, False, True)]  # fmt: skip
    launches = []
    try:
        for kw, weighted, det in calls:
            torch.use_deterministic_algorithms(det)
            with compile_only() as done:
                vid = torch.rand(row.shape, requires_grad=True)
                d, _ = dnls.search(vid, **kw)
                (d * torch.rand(d.shape) if weighted else d).sum().backward()
            launches += done
    finally:
        torch.use_deterministic_algorithms(False)
    return launches


def compile_search_small() -> list[tuple[str, str, float, bytes]]:
    """(case, kernel name, compile seconds, cubin) of each launch of searches forward and
    backward at small sizes that reach each search kernel: the row kernel (3 channels, the
    query in registers; 16 channels, channels outermost), the direct kernel (dot product,
    heads; sub-pixel flows), the default and the deterministic backward; and of the fused
    attention, forward and backward. Small patches and windows unroll less, so this compiles
    in seconds (the rows' real kernels take up to a minute each: ``offline.py ROW``)."""
    torch.manual_seed(0)
    flows = torch.rand(1, 3, 3, 2, 16, 16) * 2 - 1
    cases = {
        "rows C3 l2": (torch.rand(1, 3, 3, 24, 24), dict(ws=5, wt=1, ps=3, k=4)),
        "rows C16 l2": (torch.rand(1, 3, 16, 20, 20), dict(ws=5, wt=1, ps=3, k=3)),
        "direct dot, heads": (torch.rand(1, 3, 8, 16, 16),
                              dict(ws=3, wt=1, ps=1, k=4, nheads=2, dist="dot")),
        "direct, sub-pixel flows": (torch.rand(1, 3, 3, 16, 16),
                                    dict(ws=3, wt=1, ps=3, k=4, flows=flows)),
    }  # fmt: skip
    from dnls.ops import _search_triton as kernels

    launches = []
    default = dict(kernels.CONFIG)
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            for name, (vid, kw) in cases.items():
                kernels.CONFIG.update(default)
                with compile_only() as done:
                    v = vid.clone().requires_grad_()
                    d, _ = dnls.search(v, **kw)
                    d.sum().backward()
                label = name + (", deterministic" if det else "")
                launches += [(label, *launch) for launch in done]
    finally:
        torch.use_deterministic_algorithms(False)
        kernels.CONFIG.update(default)
    with compile_only() as done:
        q, k, v = (torch.rand(1, 3, 8, 12, 12, requires_grad=True) for _ in range(3))
        out = dnls.nn.non_local_attention(q, k, v, ws=3, wt=1, nheads=2)
        torch.autograd.grad(out.sum(), (q, k, v))
    return launches + [("attention", *launch) for launch in done]


def _patch_calls(vid, inds, weights, patches, ps):
    """gather, scatter, wpsum (forward and backward) and, on a 5-D grid, iunfold / ifold."""
    v = vid.detach().requires_grad_()
    w = weights.detach().requires_grad_()
    i = inds.detach().requires_grad_(inds.is_floating_point())
    out = dnls.gather(v, i, ps=ps)
    torch.autograd.grad(out, [x for x in (v, i) if x.requires_grad], torch.rand(out.shape))
    dnls.scatter(patches, inds, shape=vid.shape)
    out = dnls.wpsum(v, w, i, ps=ps)
    torch.autograd.grad(out, [x for x in (v, w, i) if x.requires_grad], torch.rand(out.shape))
    unf = dnls.iunfold(vid, ps=ps)
    dnls.ifold(unf, shape=vid.shape)


def compile_patches() -> list[tuple[str, str, float, bytes]]:
    """(setting, kernel name, compile seconds, cubin) of each launch of the patch ops, for
    whole and fractional positions, 3 and 16 channels, under each setting of the kernels that
    CUDA can take (the CUDA launch shapes, not the interpreter's), and in the deterministic
    mode. Small sizes: a kernel's code does not depend on them (below 2^31 elements)."""
    from dnls.ops import _patches_triton as kernels

    default = dict(kernels.CONFIG)
    settings = {
        "default": {},
        "scatter tile": dict(scatter_tile=(16, 32, 4)),
        "staged flat": dict(staged_gather=("flat", 4, 1, 1024, 1, 1, 4),
                            staged_wpsum=("flat", 8, 1, 1024, 1, 1, 4),
                            staged_gather_last=("flat", 4, 1, 1024, 1, 1, 4),
                            staged_wpsum_last=("flat", 4, 1, 1024, 1, 1, 4)),
        "staged flatpix": dict(staged_gather=("flatpix", 4, 1, 1024, 1, 1, 4),
                               staged_wpsum=("flatpix", 8, 1, 1024, 1, 1, 4)),
        "staged interior": dict(staged_gather=("interior", 4, 16, 64, 71, 8192, 4)),
        # (the rows modes are wpsum's: the default takes "rows" for few channels)
        "staged rows": dict(staged_wpsum_last=("rows", 16, 4, 128, 1, 1, 4)),
        "staged rowspix": dict(staged_wpsum=("rowspix", 16, 8, 32, 1, 1, 4)),
        "dpos (8, 4)": dict(dpos=(8, 4)),
        "staged region": dict(staged_gather=("region", 16, 1, 128, 71, 8192, 4),
                              staged_wpsum=("region", 8, 2, 64, 71, 8192, 4)),
        "direct": {k: None for k in default if k.startswith("staged_")},
    }  # fmt: skip
    torch.manual_seed(0)
    cases = []
    for c, ps in ((3, 7), (16, 1)):
        vid = torch.rand(1, 2, c, 40, 40)
        size = (1, 1, 64, 4)
        whole = torch.stack([torch.randint(0, 2, size), torch.randint(0, 40, size),
                             torch.randint(0, 40, size)], -1).int()  # fmt: skip
        # fractional (y, x) inside the frame, whole t
        jitter = torch.rand(whole.shape) * torch.tensor([0.0, 0.5, 0.5])
        frac = whole.float() * torch.tensor([1.0, 0.95, 0.95]) + jitter
        patches = torch.rand(*size, 1, c, ps, ps)
        # whole positions in a box of 2 x 8 x 8, fewer pixels than entries: scatter by anchors
        # applies (at ps 7, by default)
        box = whole % torch.tensor([2, 8, 8], dtype=whole.dtype) + torch.tensor([0, 8, 8]).int()
        cases += [(vid, inds, torch.rand(size), patches, ps) for inds in (whole, frac, box)]
    launches = []
    fold_default = dict(kernels.FOLD_CONFIG)
    try:
        for name, setting in settings.items():
            kernels.CONFIG.update(default, **setting)
            for det in (False, True) if name == "default" else (False,):
                torch.use_deterministic_algorithms(det)
                with compile_only() as done:
                    for case in cases:
                        _patch_calls(*case)
                label = name + (", deterministic" if det else "")
                launches += [(label, *launch) for launch in done]
        # ifold's kernel in channel blocks, its loop not unrolled (kernels.FOLD_CONFIG)
        kernels.FOLD_CONFIG.update(block_c=4, unroll=False)
        with compile_only() as done:
            for vid, _, _, _, ps in cases:
                dnls.ifold(dnls.iunfold(vid, ps=ps), shape=vid.shape)
        launches += [("fold block_c 4, not unrolled", *launch) for launch in done]
    finally:
        torch.use_deterministic_algorithms(False)
        kernels.CONFIG.update(default)
        kernels.FOLD_CONFIG.update(fold_default)
    return launches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("row", choices=[*sorted(rows_table.ROWS), "patches", "search-small"])
    parser.add_argument("--part", choices=("fwd", "bwd", "bench"), default="fwd")
    parser.add_argument("--config", type=json.loads, default={}, help="kernel settings (JSON)")
    parser.add_argument("--mix", type=int, default=10, help="most frequent opcodes to list")
    args = parser.parse_args()
    print(f"{args.row} {args.part} {args.config or ''} (sm_90, triton {triton.__version__})")
    if args.row == "patches":
        launches = compile_patches()
    elif args.row == "search-small":
        launches = compile_search_small()
    else:
        launches = [("", *x) for x in compile_row(args.row, args.part, args.config)]
    seen = set()
    for setting, kname, secs, cubin in launches:
        if cubin in seen:
            continue
        seen.add(cubin)
        usage, mix = _resources(cubin)
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(args.mix))
        label = f"{setting}: " if setting else ""
        print(
            f"{label}{kname}: {secs:.1f} s, {usage.get('REG')} registers, "
            f"stack {usage.get('STACK')} B, shared {usage.get('SHARED')} B, "
            f"{sum(mix.values())} SASS instructions ({top})"
        )


if __name__ == "__main__":
    main()
