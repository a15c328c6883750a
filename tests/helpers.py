"""Shared test helpers: the tolerance table, a verbose comparison, and the check of a search's
selection against the oracle's."""

from __future__ import annotations

import contextlib

import numpy as np
import oracle
import torch
from hypothesis import strategies as st

# (rtol, atol) per dtype, for results accumulated in float32 (float64 for float64 inputs)
# and rounded to the input dtype.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_close(actual, expected, dtype=torch.float64, what="result", scale=1.0, nan_ok=False):
    """Compare with the tolerance of ``dtype`` (``nan_ok``: NaN equals NaN); on failure print
    where and by how much."""
    actual = torch.as_tensor(np.asarray(actual) if not torch.is_tensor(actual) else actual)
    expected = torch.as_tensor(np.asarray(expected) if not torch.is_tensor(expected) else expected)
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    rtol, atol = TOL[dtype]
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=nan_ok)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        err = (actual - expected).abs().max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (max abs err {err:.3g}, "
            f"rtol {rtol}, atol {atol * scale}); first at {idx}: "
            f"{actual[tuple(idx)].item()!r} vs expected {expected[tuple(idx)].item()!r}"
        )


def rand_video(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def regions(draw, t, h, w):
    """None or a random non-empty region ``(t0, t1, h0, h1, w0, w1)`` of a (t, h, w) video."""
    if not draw(st.booleans()):
        return None
    t0, h0, w0 = (
        draw(st.integers(0, t - 1)),
        draw(st.integers(0, h - 1)),
        draw(st.integers(0, w - 1)),
    )
    return (
        t0,
        draw(st.integers(t0 + 1, t)),
        h0,
        draw(st.integers(h0 + 1, h)),
        w0,
        draw(st.integers(w0 + 1, w)),
    )


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` within, the previous setting after."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def assert_selection(q, k, kw, queries, inds, ed, ei, atol, distinct=False):
    """A search's (or refine's) positions ``inds`` equal the oracle's ``ei``, except where two
    candidates tie: tiny reflected frames make distinct patches hold the same pixels, so both
    sums tie up to rounding. A position that differs (by more than ``atol``) must then be at
    the oracle's distance ``ed`` for its slot; with ``distinct``, no position may repeat in a
    query's list. ``q``, ``k``: the videos (numpy), ``queries``: the query positions."""
    got = inds.double().numpy()
    near = np.isclose(got, ei, rtol=0, atol=atol).all(-1)
    cph = q.shape[2] // kw["nheads"]
    geo = (kw["ps"], kw["pt"], kw["dilation"], kw["border"])
    # fractional positions are float32: the rounding of one moves its distance by about 1e-8
    tol = 1e-6 if inds.is_floating_point() else 1e-9
    for b, hd, qi, j in zip(*np.nonzero(~near), strict=True):
        chans = list(range(hd * cph, (hd + 1) * cph))
        qp = oracle.patch(q, b, chans, queries[qi], *geo)
        kp = oracle.patch(k, b, chans, tuple(got[b, hd, qi, j]), *geo)
        d = ((qp - kp) ** 2).sum() if kw["dist"] == "l2" else (qp * kp).sum()
        assert abs(d - ed[b, hd, qi, j]) < tol, (b, hd, qi, j, got[b, hd, qi, j], ei[b, hd, qi, j])
    if distinct:
        for row in got.reshape(-1, got.shape[3], 3):
            assert len({tuple(r) for r in row}) == len(row), row
