import oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, rand_video, regions
from hypothesis import given, settings
from hypothesis import strategies as st

import dnls


@st.composite
def unfold_cases(draw):
    """Cases where iunfold/ifold must equal torch's unfold/fold: zero border, one frame,
    odd ps, the whole frame."""
    ps = draw(st.sampled_from([1, 3, 5]))
    return dict(
        shape=(
            draw(st.integers(1, 2)),
            1,
            draw(st.integers(1, 3)),
            draw(st.integers(1, 9)),
            draw(st.integers(1, 9)),
        ),
        ps=ps,
        stride=draw(st.integers(1, 3)),
        dilation=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=80)
@given(unfold_cases())
def test_iunfold_equals_torch_unfold(case):
    vid = rand_video(case["shape"], seed=case["seed"])
    ps, stride, dil = case["ps"], case["stride"], case["dilation"]
    b, _, c, h, w = vid.shape
    got = dnls.iunfold(vid, ps=ps, stride=stride, dilation=dil, border="zero")
    ref = F.unfold(vid[:, 0], ps, dilation=dil, padding=dil * (ps // 2), stride=stride)
    q = ref.shape[-1]
    assert got.shape == (b, q, 1, c, ps, ps)
    assert_close(got.reshape(b, q, -1).transpose(1, 2), ref, what="iunfold")


@settings(max_examples=80)
@given(unfold_cases())
def test_ifold_equals_torch_fold(case):
    ps, stride, dil = case["ps"], case["stride"], case["dilation"]
    b, _, c, h, w = case["shape"]
    grid = dnls.query_grid(case["shape"], stride)
    g = torch.Generator().manual_seed(case["seed"])
    patches = torch.rand(b, grid.count, 1, c, ps, ps, generator=g, dtype=torch.float64)
    got, counts = dnls.ifold(
        patches, shape=case["shape"], stride=stride, dilation=dil, border="zero"
    )
    cols = patches.reshape(b, grid.count, -1).transpose(1, 2)
    kw = dict(
        output_size=(h, w), kernel_size=ps, dilation=dil, padding=dil * (ps // 2), stride=stride
    )
    assert_close(got[:, 0], F.fold(cols, **kw), what="ifold")
    assert_close(counts[:, 0], F.fold(torch.ones_like(cols[:, : ps * ps]), **kw), what="counts")


@st.composite
def region_cases(draw):
    b, t, c = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    return dict(
        shape=(b, t, c, h, w),
        region=draw(regions(t, h, w)),
        kw=dict(
            ps=draw(st.integers(1, 4)),
            pt=draw(st.integers(1, 2)),
            stride=draw(st.integers(1, 3)),
            dilation=draw(st.integers(1, 2)),
            border=draw(st.sampled_from(["reflect", "zero"])),
        ),
        seed=draw(st.integers(0, 2**16)),
        batch=draw(st.integers(1, 5)),
    )


@settings(max_examples=60)
@given(region_cases())
def test_iunfold_equals_oracle_on_regions(case):
    vid = rand_video(case["shape"], seed=case["seed"])
    kw = case["kw"]
    got = dnls.iunfold(vid, region=case["region"], **kw)
    pos = oracle.grid_positions(
        case["shape"][1:2] + case["shape"][3:], kw["stride"], case["region"]
    )
    inds = torch.tensor(pos, dtype=torch.float64).expand(vid.shape[0], 1, len(pos), 3)
    inds = inds[:, :, :, None]
    geo = {k: kw[k] for k in ("ps", "pt", "dilation", "border")}
    ref = oracle.gather(vid.numpy(), inds.numpy(), nheads=1, **geo)
    assert_close(got, ref[:, 0, :, 0], what="iunfold")


@settings(max_examples=40)
@given(region_cases())
def test_batches_equal_one_shot(case):
    """Looping over start/count batches and accumulating gives the one-shot result."""
    vid = rand_video(case["shape"], seed=case["seed"])
    kw, region = case["kw"], case["region"]
    full = dnls.iunfold(vid, region=region, **kw)
    grid = dnls.query_grid(vid.shape, kw["stride"], region)
    parts = [
        dnls.iunfold(vid, region=region, start=s, count=n, **kw)
        for s, n in grid.batches(case["batch"])
    ]
    assert torch.equal(torch.cat(parts, 1), full)
    fkw = {k: kw[k] for k in ("stride", "dilation", "border")}
    one, one_counts = dnls.ifold(full, shape=vid.shape, region=region, **fkw)
    out = counts = None
    for (s, _), p in zip(grid.batches(case["batch"]), parts, strict=True):
        res = dnls.ifold(p, shape=vid.shape, region=region, start=s, out=out, counts=counts, **fkw)
        out, counts = res
    assert_close(out, one, what="batched ifold")
    assert torch.equal(counts, one_counts)


@settings(max_examples=30)
@given(region_cases())
def test_ifold_is_adjoint_of_iunfold(case):
    vid = rand_video(case["shape"], seed=case["seed"])
    kw, region = case["kw"], case["region"]
    patches = dnls.iunfold(vid, region=region, **kw)
    p = torch.rand_like(patches)
    out, _ = dnls.ifold(
        p,
        shape=vid.shape,
        region=region,
        stride=kw["stride"],
        dilation=kw["dilation"],
        border=kw["border"],
    )
    assert torch.allclose((patches * p).sum(), (vid * out).sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("border", ["reflect", "zero"])
def test_gradcheck(border):
    vid = rand_video((1, 2, 2, 5, 6)).requires_grad_()
    kw = dict(ps=3, pt=2, stride=2, dilation=2, region=(0, 2, 1, 5, 0, 6), border=border)
    assert torch.autograd.gradcheck(lambda v: dnls.iunfold(v, start=2, count=5, **kw), (vid,))
    p = torch.rand(1, 5, 2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    kw.pop("ps"), kw.pop("pt")
    assert torch.autograd.gradcheck(
        lambda x: dnls.ifold(x, shape=vid.shape, start=2, **kw)[0], (p,)
    )


def test_fold_average_reconstructs_video():
    vid = rand_video((2, 3, 3, 9, 7), torch.float32)
    patches = dnls.iunfold(vid, ps=5, pt=2, dilation=2)
    out, counts = dnls.ifold(patches, shape=vid.shape, dilation=2)
    assert_close(out / counts, vid, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision(dtype):
    vid = rand_video((1, 2, 3, 6, 6))
    got = dnls.iunfold(vid.to(dtype), ps=3, pt=2)
    assert got.dtype == dtype
    assert torch.equal(got, dnls.iunfold(vid.to(dtype).double(), ps=3, pt=2).to(dtype))
    out, counts = dnls.ifold(got, shape=vid.shape)
    assert out.dtype == dtype and counts.dtype == torch.float32
    ref, _ = dnls.ifold(got.double(), shape=vid.shape)
    assert_close(out, ref, dtype=dtype, scale=10)


def test_non_contiguous_input():
    vid = rand_video((1, 2, 3, 8, 6)).transpose(-1, -2)
    assert not vid.is_contiguous()
    assert torch.equal(dnls.iunfold(vid, ps=3), dnls.iunfold(vid.contiguous(), ps=3))


def test_query_grid():
    grid = dnls.query_grid((1, 3, 2, 7, 5), stride=2, region=(1, 3, 1, 6, 0, 5))
    expected = oracle.grid_positions((3, 7, 5), 2, (1, 3, 1, 6, 0, 5))
    assert grid.count == len(expected)
    assert grid.positions().tolist() == [list(p) for p in expected]
    assert grid.positions(3, 4).tolist() == [list(p) for p in expected[3:7]]
    assert list(grid.batches(5)) == [(0, 5), (5, 5), (10, 5), (15, 3)]
    assert dnls.query_grid((3, 7, 5)).count == 105
