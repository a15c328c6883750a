"""Every Triton kernel compiles for sm_90 (the H100 and H200) on this machine without a GPU,
with Triton's own ptxas: the patch kernels under every setting CUDA can take and in the
deterministic mode, the search and attention kernels at small sizes.

The interpreter runs the kernels' Python, not Triton's compiler: code that the interpreter
accepts can still fail to compile (a name bound to an int before a branch and to a tensor
inside it did, in the sixteenth session). ``benchmarks/offline.py`` runs the ops with each
launch turned into a compile only; it runs in its own process, since the interpreter
(``TRITON_INTERPRET=1``, set for the other tests) is chosen when a kernel module is imported."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _kernels(*modules: str) -> set[str]:
    """The names of the launched kernels (``_*_kernel``) of the kernel modules."""
    names = set()
    for module in modules:
        tree = ast.parse((ROOT / "src/dnls/ops" / f"{module}.py").read_text())
        names |= {f.name for f in tree.body
                  if isinstance(f, ast.FunctionDef) and f.name.endswith("_kernel")}  # fmt: skip
    return names


def _compile(mode: str, timeout: int = 1800) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/offline.py"), mode],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize(
    ("mode", "modules"),
    [
        ("patches", ["_patches_triton", "_layout"]),
        ("search-small", ["_search_triton", "_attention_triton"]),
    ],
)
def test_kernels_compile_for_sm90(mode, modules):
    out = _compile(mode)
    compiled = {line.split(": ")[1] for line in out.splitlines() if ": _" in line}
    missing = _kernels(*modules) - compiled
    assert not missing, f"kernels never compiled: {sorted(missing)}\n{out[-2000:]}"


def test_real_size_row_kernel_compiles_in_minutes():
    """W3's forward row kernel at its real size (ps 7, ws 21, k 14: every patch row and
    result slot unrolled) compiles within five minutes, without spilling. A change that
    inlined a whole patch distance per result slot took over 30 minutes to compile here
    (seventeenth session), which the small kernels above did not show."""
    out = _compile("W3", timeout=300)
    line = next(x for x in out.splitlines() if "_search_rows_kernel" in x)
    assert "stack 0 B" in line, line
