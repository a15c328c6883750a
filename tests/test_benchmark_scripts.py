"""The GPU benchmark scripts run, at tiny sizes on the CPU under Triton's interpreter
(``--smoke``: their checks against the reference and their sweeps, each configuration checked
against the default kernels, nothing timed). Device time is scarce: a script that fails on the
device wastes a call, and these scripts are otherwise only run there."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", DNLS_COMMIT="test")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, script, "--smoke", *args],
        capture_output=True, text=True, env=env, cwd=ROOT / "benchmarks", timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_search_script():
    """W3's row (the row kernel, l2): the check, forward+backward, the plain-PyTorch baseline
    and the sweep of the backward's query-gradient modes and launches."""
    out = _run("search.py", "--rows", "W3", "--parts", "bwd,base", "--sweep", "W3",
               "--sweep-parts", "gq")  # fmt: skip
    assert "W3" in out and " ok rel-err" in out, out[-2000:]
    assert out.count("config W3 gq") == 6, out[-2000:]


def test_patches_script():
    """iunfold / ifold against torch, gather / scatter / wpsum against the reference, and the
    deterministic mode's bits (the rows fold, knn and det; det on its second input only)."""
    out = _run("patches.py", "--rows", "fold,knn,det")
    assert out.count("same bits twice: True") == 2, out[-2000:]
    assert out.count("grad rel err vid") == 2 and out.count("ifold ") == 4, out[-2000:]
