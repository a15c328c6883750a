"""The fused CPU kernels (numba) against the reference path, on the arguments they cover."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rand_video

import dnls
from dnls.apps import nlm
from dnls.apps.nlm import _weights
from dnls.ops import _cpu

pytest.importorskip("numba")

SEARCH_CASES = [
    dict(ws=5, ps=3, k=6),
    dict(ws=7, ps=4, k=10, wt=1),
    dict(ws=3, ps=5, k=4, stride0=2, self_match="exclude"),
    dict(ws=5, ps=3, k=5, self_match="anchor", dist="dot", wt=1, stride1=2),
    dict(ws=5, ps=3, k=6, border="zero", nheads=2, start=37, count=300),
    dict(ws=5, ps=3, k=6, region=(1, 3, 2, 15, 3, 20), stride0=3),
    # nlm's defaults: bands of many rows, and a batch that starts and ends inside rows
    dict(ws=7, ps=5, k=14, start=50, count=700),
    dict(ws=7, ps=5, k=14, stride0=2, self_match="exclude"),
]


def _both(monkeypatch, fn):
    monkeypatch.setenv("DNLS_BACKEND", "torch")
    expected = fn()
    monkeypatch.setenv("DNLS_BACKEND", "auto")
    return fn(), expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", SEARCH_CASES)
@pytest.mark.parametrize("two_videos", [False, True])
def test_search_matches_reference(monkeypatch, kw, dtype, two_videos):
    x = rand_video((2, 3, 4, 20, 23), dtype, seed=1)
    y = rand_video((2, 3, 4, 20, 23), dtype, seed=2) if two_videos else None
    (d, i), (d_ref, i_ref) = _both(monkeypatch, lambda: dnls.search(x, y, **kw))
    assert d.dtype == d_ref.dtype and i.dtype == i_ref.dtype
    assert_close(d, d_ref, dtype, "dists", scale=10)
    same = (i == i_ref).all(-1)
    # A different selection is allowed only where distances tie within rounding.
    assert same.float().mean() > 0.999
    assert_close(d[~same], d_ref[~same], dtype, "dists of swapped ties", scale=10)


def test_search_integer_flows(monkeypatch):
    x = rand_video((2, 3, 4, 20, 23), torch.float32, seed=3)
    g = torch.Generator().manual_seed(0)
    flows = torch.randint(-3, 4, (2, 3, 3, 2, 20, 23), generator=g, dtype=torch.int32)
    (d, i), (d_ref, i_ref) = _both(
        monkeypatch, lambda: dnls.search(x, ws=5, ps=3, k=6, wt=1, flows=flows)
    )
    assert_close(d, d_ref, torch.float32, "dists", scale=10)
    assert torch.equal(i, i_ref)


@pytest.mark.parametrize("border", ["reflect", "zero"])
def test_wpsum_scatter_ifold_match_reference(monkeypatch, border):
    x = rand_video((2, 3, 4, 20, 23), torch.float32, seed=4)
    _, inds = dnls.search(x, ws=5, ps=3, k=6, wt=1)
    w = rand_video(inds.shape[:4], torch.float32, seed=5)
    out, ref = _both(monkeypatch, lambda: dnls.wpsum(x, w, inds, ps=3, border=border))
    assert_close(out, ref, torch.float32, "wpsum")
    p = dnls.gather(x, inds, ps=4, border=border)
    out, ref = _both(monkeypatch, lambda: dnls.scatter(p, inds, shape=x.shape, border=border))
    assert_close(out[0], ref[0], torch.float32, "scatter", scale=10)
    assert_close(out[1], ref[1], torch.float32, "scatter counts")
    for kw in (dict(), dict(stride=2, start=5), dict(region=(1, 3, 2, 15, 3, 20))):
        n = dnls.query_grid(x.shape, kw.get("stride", 1), kw.get("region")).count
        patches = rand_video((2, n - kw.get("start", 0), 1, 4, 5, 5), torch.float32, seed=6)
        out, ref = _both(
            monkeypatch,
            lambda: dnls.ifold(patches, shape=x.shape, border=border, **kw),  # noqa: B023
        )
        assert_close(out[0], ref[0], torch.float32, "ifold", scale=10)
        assert_close(out[1], ref[1], torch.float32, "ifold counts")


def test_nlm_denoises_with_fused_kernels(monkeypatch):
    clean = rand_video((1, 1, 3, 8, 8), torch.float32).repeat_interleave(4, -1)
    clean = clean.repeat_interleave(4, -2)
    noisy = clean + 0.1 * rand_video(clean.shape, torch.float32, seed=7).sub(0.5)
    out, ref = _both(monkeypatch, lambda: nlm(noisy, 0.05, ws=7))
    assert_close(out, ref, torch.float32, "nlm", scale=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nlm_weights_are_the_softmax_of_the_formula(dtype):
    g = torch.Generator().manual_seed(0)
    dists = torch.rand(2, 1, 50, 14, generator=g, dtype=torch.float64).to(dtype) * 3
    sigma, h, npix = 0.08, 0.9, 75
    excess = (dists.double() / npix - 2 * sigma**2).clamp(min=0)
    expected = torch.softmax(-excess / (h * sigma) ** 2, dim=-1)
    got = _weights(dists, npix, sigma, h)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, expected, dtype, "weights")
    # Far-away patches only: the largest weight is still 1 / (number of equal distances).
    far = torch.full((1, 1, 1, 4), 1e6, dtype=dtype)
    assert_close(_weights(far, npix, sigma, h), torch.full_like(far, 0.25), dtype, "far")


@pytest.mark.parametrize(
    ("kwargs", "name", "error"),
    [
        (dict(sigma=0.0), "sigma", ValueError),
        (dict(sigma=float("inf")), "sigma", ValueError),
        (dict(h=-1.0), "h", ValueError),
        (dict(flows=5), "flows", TypeError),
        (dict(progress=5), "progress", TypeError),
        (dict(batch=0), "batch", ValueError),
    ],
)
def test_nlm_errors(kwargs, name, error):
    args = dict(sigma=0.1) | kwargs
    with pytest.raises(error, match=f"^{name} must be"):
        nlm(torch.rand(1, 1, 3, 8, 8), args.pop("sigma"), **args)


@pytest.mark.parametrize(("sigma", "h"), [(1e-30, 1.0), (0.1, 1e-20), (1e-200, 1.0)])
def test_nlm_tiny_filter_keeps_the_nearest_patch(sigma, h):
    """As ``h * sigma`` goes to 0 every weight but the nearest neighbour's vanishes; the
    smallest positive values (their scale past float32's range) give that limit, not NaN: each
    patch is its own nearest neighbour, so the output is the input."""
    noisy = rand_video((1, 1, 3, 12, 12), torch.float32, seed=3)
    assert_close(nlm(noisy, sigma, h=h), noisy, torch.float32, "nlm")


@pytest.mark.parametrize(("sigma", "h"), [(1e200, 1.0), (1e20, 1.0), (0.1, 1e300)])
def test_nlm_huge_filter_averages_uniformly(sigma, h):
    """As ``h * sigma`` grows every weight tends to 1 / k; the largest finite values (their
    squares past float64's range) give that limit instead of an OverflowError or NaN."""
    noisy = rand_video((1, 1, 3, 12, 12), torch.float32, seed=3)
    dists = torch.rand(1, 1, 5, 4, dtype=torch.float32)
    assert torch.equal(_weights(dists, 75, sigma, h), torch.full_like(dists, 0.25))
    out = nlm(noisy, sigma, h=h)
    assert torch.isfinite(out).all()
    assert torch.equal(out, nlm(noisy, 1.0, h=1e300))


def test_torch_threads_quiet_restores_and_nests(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _cpu.torch_threads_quiet(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            with _cpu.torch_threads_quiet(torch.device("cpu")):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        # The reference path keeps torch's threads: it is where the work is.
        monkeypatch.setenv("DNLS_BACKEND", "torch")
        with _cpu.torch_threads_quiet(torch.device("cpu")):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_nlm_leaves_torch_threads_as_it_found_them():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        noisy = rand_video((1, 1, 3, 12, 12), torch.float32, seed=8)
        nlm(noisy, 0.1, ws=5, k=4)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="sigma"):
            nlm(noisy, -1.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fold_segments_of_one_parity_never_touch_the_same_pixel():
    grid = dnls.query_grid((1, 3, 1, 17, 9), 2, (0, 3, 1, 16, 0, 9))
    pos = grid.positions(3, grid.count - 5).numpy()
    ps = 4
    segs = _cpu.fold_segments(pos, ps)
    assert segs[0, 0] == 0 and segs[-1, 1] == len(pos)
    assert (segs[1:, 0] == segs[:-1, 1]).all()
    for parity in (0, 1):
        seen = set()
        for first, end, par in segs.tolist():
            if par != parity:
                continue
            pixels = {(t, y + i) for t, y, _ in pos[first:end].tolist() for i in range(ps)}
            assert not pixels & seen
            seen |= pixels
