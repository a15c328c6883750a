"""Compile the Triton kernels that one search of a benchmark row launches, for sm_90 (the H100
and H200), on a machine without a GPU, and report what the compiler made of them: compile time,
registers, stack (spills), shared memory, SASS instructions and their mix. No device time: use it
before a GPU run to catch a kernel that spills or takes minutes to compile, and to count what a
change adds or removes.

    python benchmarks/offline.py W3 [--part fwd|bwd] [--config '{"rows_strip": 3}'] [--mix 12]

The search runs on CPU tensors of the row's real size with every Triton launch turned into a
compile only (``warmup``), against a stand-in driver that reports an sm_90 target; the launches'
arguments, and so the kernels' specialisations, are the ones a GPU run would make. The tools
(ptxas, cuobjdump) are the ones the Triton wheel carries. Outputs are not computed. A kernel
already in Triton's cache (``~/.triton/cache``) is loaded, not compiled: its time is the load's.
"""

from __future__ import annotations

import argparse
import collections
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


def compile_row(name: str, part: str, config: dict) -> list[tuple[str, float, bytes]]:
    """(kernel name, compile seconds, cubin) of each kernel launch of row ``name``'s search
    (``part`` "bwd": its backward too) under the kernel settings ``config``."""
    from dnls.ops import _search_triton as kernels

    kernels.CONFIG.update(config)
    search_op.backend = lambda device, op: "triton"  # (CPU tensors: no interpreter wanted)
    driver.set_active(_Offline())
    launches = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self.fn.__name__, time.perf_counter() - t0, kernel.asm["cubin"]))
        return kernel

    JITFunction.run = compile_only
    try:
        row = rows_table.ROWS[name]
        vid = torch.rand(row.shape, requires_grad=part == "bwd")
        d, _ = dnls.search(vid, **row.kw)
        if part == "bwd":
            d.sum().backward()
    finally:
        JITFunction.run = run
    return launches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("row", choices=sorted(rows_table.ROWS))
    parser.add_argument("--part", choices=("fwd", "bwd"), default="fwd")
    parser.add_argument("--config", type=json.loads, default={}, help="kernel settings (JSON)")
    parser.add_argument("--mix", type=int, default=10, help="most frequent opcodes to list")
    args = parser.parse_args()
    print(f"{args.row} {args.part} {args.config or ''} (sm_90, triton {triton.__version__})")
    seen = set()
    for kname, secs, cubin in compile_row(args.row, args.part, args.config):
        if cubin in seen:
            continue
        seen.add(cubin)
        usage, mix = _resources(cubin)
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(args.mix))
        print(
            f"{kname}: {secs:.1f} s, {usage.get('REG')} registers, stack {usage.get('STACK')} B, "
            f"shared {usage.get('SHARED')} B, {sum(mix.values())} SASS instructions ({top})"
        )


if __name__ == "__main__":
    main()
