"""The fused CPU kernels (numba) against the reference path, on the arguments they cover."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rand_video

import dnls
from dnls.apps import nlm

pytest.importorskip("numba")

SEARCH_CASES = [
    dict(ws=5, ps=3, k=6),
    dict(ws=7, ps=4, k=10, wt=1),
    dict(ws=3, ps=5, k=4, stride0=2, self_match="exclude"),
    dict(ws=5, ps=3, k=5, self_match="anchor", dist="dot", wt=1, stride1=2),
    dict(ws=5, ps=3, k=6, border="zero", nheads=2, start=37, count=300),
    dict(ws=5, ps=3, k=6, region=(1, 3, 2, 15, 3, 20), stride0=3),
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
            monkeypatch, lambda: dnls.ifold(patches, shape=x.shape, border=border, **kw)  # noqa: B023
        )
        assert_close(out[0], ref[0], torch.float32, "ifold", scale=10)
        assert_close(out[1], ref[1], torch.float32, "ifold counts")


def test_nlm_denoises_with_fused_kernels(monkeypatch):
    clean = rand_video((1, 1, 3, 8, 8), torch.float32).repeat_interleave(4, -1)
    clean = clean.repeat_interleave(4, -2)
    noisy = clean + 0.1 * rand_video(clean.shape, torch.float32, seed=7).sub(0.5)
    out, ref = _both(monkeypatch, lambda: nlm(noisy, 0.05, ws=7))
    assert_close(out, ref, torch.float32, "nlm", scale=10)
