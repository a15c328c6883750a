from functools import partial

import oracle
import pytest
import torch
from helpers import assert_close, rand_video
from hypothesis import given, settings
from hypothesis import strategies as st

import dnls


@st.composite
def patch_cases(draw):
    nheads = draw(st.integers(1, 2))
    b = draw(st.integers(1, 2))
    c = nheads * draw(st.integers(1, 2))
    t, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    q, k = draw(st.integers(0, 4)), draw(st.integers(1, 3))
    fractional = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    lead = (b, nheads, q, k)
    tt = torch.randint(0, t, lead, generator=g)
    if fractional:
        hh = torch.rand(lead, generator=g, dtype=torch.float64) * (h - 1)
        ww = torch.rand(lead, generator=g, dtype=torch.float64) * (w - 1)
        inds = torch.stack([tt.double(), hh, ww], -1)
    else:
        hh, ww = torch.randint(0, h, lead, generator=g), torch.randint(0, w, lead, generator=g)
        inds = torch.stack([tt, hh, ww], -1).to(draw(st.sampled_from([torch.int32, torch.int64])))
    kw = dict(
        ps=draw(st.integers(1, 4)),
        pt=draw(st.integers(1, 2)),
        dilation=draw(st.integers(1, 2)),
        nheads=nheads,
        border=draw(st.sampled_from(["reflect", "zero"])),
    )
    return rand_video((b, t, c, h, w), seed=seed), inds, kw


def _oracle_gather(vid, inds, kw):
    return oracle.gather(vid.numpy(), inds.double().numpy(), **kw)


@settings(max_examples=100)
@given(patch_cases())
def test_gather_equals_oracle(case):
    vid, inds, kw = case
    assert_close(dnls.gather(vid, inds, **kw), _oracle_gather(vid, inds, kw), what="gather")


@settings(max_examples=60)
@given(patch_cases(), st.integers(0, 2**16))
def test_scatter_is_adjoint_of_gather(case, seed):
    """<gather(v), p> == <v, scatter(p)>, and counts == scatter of ones."""
    vid, inds, kw = case
    g = torch.Generator().manual_seed(seed)
    patches = dnls.gather(vid, inds, **kw)
    p = torch.rand(patches.shape, generator=g, dtype=torch.float64)
    nheads = kw.pop("nheads")
    out, counts = dnls.scatter(
        p, inds, shape=vid.shape, nheads=nheads, dilation=kw["dilation"], border=kw["border"]
    )
    lhs = (patches * p).sum()
    rhs = (vid * out).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10), (lhs, rhs)
    ones, _ = dnls.scatter(
        torch.ones_like(p),
        inds,
        shape=vid.shape,
        nheads=nheads,
        dilation=kw["dilation"],
        border=kw["border"],
    )
    assert_close(counts.expand_as(ones), ones, what="counts")


@settings(max_examples=60)
@given(patch_cases(), st.integers(0, 2**16))
def test_wpsum_equals_sum_of_gathered(case, seed):
    vid, inds, kw = case
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(inds.shape[:4], generator=g, dtype=torch.float64)
    expected = (weights[..., None, None, None, None] * dnls.gather(vid, inds, **kw)).sum(3)
    assert_close(dnls.wpsum(vid, weights, inds, **kw), expected, what="wpsum")


def _fractional_inds(b, hd, q, k, thw, seed):
    """Positions away from whole pixels, as float64 so gradcheck can perturb them."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, thw[0], (b, hd, q, k), generator=g).double()
    hw = []
    for size in thw[1:]:
        whole = torch.randint(0, size - 1, (b, hd, q, k), generator=g).double()
        hw.append(whole + 0.2 + 0.6 * torch.rand(b, hd, q, k, generator=g, dtype=torch.float64))
    return torch.stack([t, *hw], -1)


@pytest.mark.parametrize("border", ["reflect", "zero"])
@pytest.mark.parametrize("fractional", [False, True])
def test_gradcheck(border, fractional):
    vid = rand_video((1, 2, 4, 5, 6), seed=1).requires_grad_()
    if fractional:
        inds = _fractional_inds(1, 2, 3, 2, (2, 5, 6), 2)
    else:
        inds = torch.stack([torch.randint(0, n, (1, 2, 3, 2)) for n in (2, 5, 6)], -1).int()
    weights = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    kw = dict(ps=3, pt=2, dilation=2, nheads=2, border=border)

    def run(fn, *args):
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4)

    if fractional:  # perturb (h, w) only: t is whole by contract
        t, hw = inds[..., :1].detach(), inds[..., 1:].detach().requires_grad_()
        run(lambda v, x: dnls.gather(v, torch.cat([t, x], -1), **kw), vid, hw)
        run(lambda v, w, x: dnls.wpsum(v, w, torch.cat([t, x], -1), **kw), vid, weights, hw)
    else:
        run(lambda v: dnls.gather(v, inds, **kw), vid)
        run(lambda v, w: dnls.wpsum(v, w, inds, **kw), vid, weights)
    p = torch.rand(1, 2, 3, 2, 2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    run(
        lambda x: dnls.scatter(
            x, inds.detach(), shape=vid.shape, nheads=2, dilation=2, border=border
        )[0],
        p,
    )


def test_wpsum_dtype_and_mixed_weights():
    vid = rand_video((1, 1, 3, 6, 6), torch.bfloat16)
    _, inds = dnls.search(vid, ws=3, ps=3, k=4)
    w = torch.softmax(torch.randn(1, 1, 36, 4), -1)
    out = dnls.wpsum(vid, w, inds, ps=3)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 36, 1, 3, 3, 3)
    expected = dnls.wpsum(vid.double(), w.double(), inds, ps=3)
    assert_close(out, expected, dtype=torch.float32, what="wpsum bf16 video, fp32 weights")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision(dtype):
    vid = rand_video((1, 2, 3, 6, 6))
    inds = _fractional_inds(1, 1, 5, 3, (2, 6, 6), 3).float()
    p = dnls.gather(vid.to(dtype), inds, ps=3, pt=2)
    assert p.dtype == dtype
    assert_close(p, dnls.gather(vid.to(dtype).double(), inds, ps=3, pt=2), dtype=dtype)
    out, counts = dnls.scatter(p, inds, shape=vid.shape)
    assert out.dtype == dtype and counts.dtype == torch.float32
    ref, _ = dnls.scatter(p.double(), inds, shape=vid.shape)
    assert_close(out, ref, dtype=dtype, scale=10)


def test_scatter_heads_layouts_and_accumulation():
    vid = rand_video((2, 2, 4, 5, 5))
    _, inds = dnls.search(vid, ws=3, ps=3, k=2, nheads=2)
    p = dnls.gather(vid, inds, ps=3, nheads=2)
    out5, c5 = dnls.scatter(p, inds, shape=vid.shape, nheads=2)
    out6, c6 = dnls.scatter(p, inds, shape=(2, 2, 2, 2, 5, 5))
    assert out5.shape == vid.shape and c5.shape == vid.shape
    assert out6.shape == (2, 2, 2, 2, 5, 5) and c6.shape == (2, 2, 2, 1, 5, 5)
    assert torch.equal(out5, out6.transpose(1, 2).reshape(vid.shape))
    # given out/counts, scatter adds into them in place and returns them
    acc, cnt = out5.clone(), c5.clone()
    r_out, r_cnt = dnls.scatter(p, inds, shape=vid.shape, nheads=2, out=acc, counts=cnt)
    assert r_out is acc and r_cnt is cnt
    assert torch.allclose(acc, 2 * out5) and torch.allclose(cnt, 2 * c5)


def test_inputs_not_modified():
    vid = rand_video((1, 2, 2, 5, 5))
    inds = _fractional_inds(1, 1, 4, 2, (2, 5, 5), 4)
    v0, i0 = vid.clone(), inds.clone()
    w = torch.rand(1, 1, 4, 2, dtype=torch.float64)
    w0 = w.clone()
    dnls.gather(vid, inds, ps=3)
    dnls.wpsum(vid, w, inds, ps=3)
    assert torch.equal(vid, v0) and torch.equal(inds, i0) and torch.equal(w, w0)


@pytest.mark.parametrize("op", ["scatter", "ifold"])
def test_bad_counts_leave_out_unchanged(op):
    """``out`` and ``counts`` are both checked before either is added into: a wrong ``counts``
    raises with ``out`` as it was."""
    vid = rand_video((1, 2, 2, 5, 5))
    out = torch.zeros(vid.shape, dtype=torch.float64)
    if op == "scatter":
        inds = torch.zeros(1, 1, 4, 2, 3, dtype=torch.int32)
        patches = torch.rand(1, 1, 4, 2, 1, 2, 3, 3, dtype=torch.float64)
        call = partial(dnls.scatter, patches, inds, shape=vid.shape)
    else:
        call = partial(dnls.ifold, dnls.iunfold(vid, ps=3), shape=vid.shape)
    with pytest.raises(ValueError, match="^counts must be"):
        call(out=out, counts=torch.zeros(2))
    assert torch.count_nonzero(out) == 0


def test_gather_batch_sizes_zero_one_two():
    for b in (1, 2):
        vid = rand_video((b, 1, 1, 4, 4))
        inds = torch.zeros(b, 1, 0, 3, 3, dtype=torch.int32)
        assert dnls.gather(vid, inds, ps=3).shape == (b, 1, 0, 3, 1, 1, 3, 3)
    vid = rand_video((0, 1, 1, 4, 4))
    inds = torch.zeros(0, 1, 2, 3, 3, dtype=torch.int32)
    assert dnls.gather(vid, inds, ps=3).shape == (0, 1, 2, 3, 1, 1, 3, 3)
