"""The ops are registered with torch.library: schema, fake kernels and autograd pass opcheck."""

import pytest
import torch
from helpers import rand_video

from dnls.ops.search import SearchParams

GEOM = dict(ps=3, pt=2, dilation=1, border="reflect")


def _opcheck(op, args, kwargs):
    result = torch.library.opcheck(op, args, kwargs)
    assert all(v == "SUCCESS" for v in result.values()), result


def _inds(fractional):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2, (1, 2, 4, 3, 1), generator=g)
    hw = torch.rand(1, 2, 4, 3, 2, generator=g, dtype=torch.float64) * 4
    if fractional:
        return torch.cat([t.double(), hw], -1)
    return torch.cat([t, hw.long()], -1).int()


@pytest.mark.parametrize("fractional", [False, True])
def test_patch_ops(fractional):
    vid = rand_video((1, 2, 2, 3, 5, 5)).requires_grad_()
    inds = _inds(fractional).requires_grad_(fractional)
    _opcheck(torch.ops.dnls.gather.default, (vid, inds), GEOM)
    grad = torch.rand(1, 2, 4, 3, 2, 3, 3, 3, dtype=torch.float64)
    _opcheck(torch.ops.dnls.gather_dpos.default, (vid.detach(), inds.detach(), grad), GEOM)
    patches = grad.clone().requires_grad_()
    kw = dict(frames=2, height=5, width=5, dilation=1, border="zero")
    _opcheck(torch.ops.dnls.scatter.default, (patches, inds.detach()), kw)
    _opcheck(torch.ops.dnls.scatter_counts.default, (patches, inds.detach()), kw)
    weights = torch.rand(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    _opcheck(torch.ops.dnls.wpsum.default, (vid, weights, inds), GEOM)
    g = torch.rand(1, 2, 4, 2, 3, 3, 3, dtype=torch.float64)
    args = (g, vid.detach(), weights.detach(), inds.detach())
    _opcheck(torch.ops.dnls.wpsum_backward.default, args, GEOM)


@pytest.mark.parametrize("flow_kind", ["none", "int", "float"])
def test_search_ops(flow_kind):
    q = rand_video((1, 1, 3, 2, 6, 6), seed=1).requires_grad_()
    k = rand_video((1, 1, 3, 2, 6, 6), seed=2).requires_grad_()
    flows = {
        "none": None,
        "int": torch.ones(1, 3, 3, 2, 6, 6, dtype=torch.int32),
        "float": torch.full((1, 3, 3, 2, 6, 6), 0.4, dtype=torch.float64, requires_grad=True),
    }[flow_kind]
    p = SearchParams(3, 1, 3, 1, 4, "l2", 2, 1.0, 1, (0, 3, 0, 6, 0, 6), 0, 27, "anchor", "reflect")
    _opcheck(torch.ops.dnls.search.default, (q, k, flows), p.op_kwargs())
    dists, inds, widx = torch.ops.dnls.search(q, k, flows, **p.op_kwargs())
    gi = torch.rand(inds.shape, dtype=torch.float32) if flow_kind == "float" else None
    flows = None if flows is None else flows.detach()
    args = (torch.rand_like(dists), gi, q.detach(), k.detach(), flows, widx)
    _opcheck(torch.ops.dnls.search_backward.default, args, p.op_kwargs())


@pytest.mark.parametrize("border", ["reflect", "zero"])
def test_ifold_op(border):
    patches = rand_video((2, 6, 2, 3, 3, 3), seed=3).requires_grad_()
    kw = dict(
        shape=[2, 3, 3, 5, 5], stride=2, dilation=1, region=[0, 3, 1, 5, 0, 4], start=2,
        border=border,
    )  # fmt: skip
    _opcheck(torch.ops.dnls.ifold.default, (patches,), kw)


@pytest.mark.parametrize("fractional", [False, True])
def test_refine_ops(fractional):
    from dnls.ops.refine import RefineParams

    q = rand_video((1, 2, 2, 2, 5, 5), seed=3).requires_grad_()
    k = rand_video((1, 2, 2, 2, 5, 5), seed=4).requires_grad_()
    inds = _inds(fractional)
    inds = torch.cat([inds] * 2, 2)[:, :, :, :2].contiguous().requires_grad_(fractional)
    p = RefineParams(3, 2, 5, 3, 1, "l2", 3, 1.0, 1, (0, 2, 0, 5, 0, 5), 0, 8, "anchor", "zero")
    kw = dict(p.__dict__, region=list(p.region))
    _opcheck(torch.ops.dnls.refine.default, (q, k, inds), kw)
    dists, out, widx = torch.ops.dnls.refine(q, k, inds, **kw)
    gi = torch.rand(out.shape, dtype=torch.float32) if fractional else None
    args = (torch.rand_like(dists), gi, q.detach(), k.detach(), inds.detach(), widx)
    _opcheck(torch.ops.dnls.refine_backward.default, args, kw)


def test_iunfold_op():
    vid = rand_video((2, 3, 3, 5, 5), seed=4).requires_grad_()
    kw = dict(
        ps=3, pt=2, stride=2, dilation=1, region=[0, 3, 1, 5, 0, 4], start=2, count=4,
        border="reflect",
    )  # fmt: skip
    _opcheck(torch.ops.dnls.iunfold.default, (vid,), kw)


@pytest.mark.parametrize("dist", ["dot", "l2"])
def test_attention_ops(dist):
    q, k, v = (rand_video((1, 2, 3, 2, 4, 5), seed=s).requires_grad_() for s in (1, 2, 3))
    kw = dict(ws=3, wt=1, scale=0.6, dist=dist)
    _opcheck(torch.ops.dnls.attention.default, (q, k, v), kw)
    out, lse = torch.ops.dnls.attention(q, k, v, **kw)
    grads = (torch.rand_like(out), torch.rand_like(lse))
    saved = (q.detach(), k.detach(), v.detach(), out.detach(), lse.detach())
    _opcheck(torch.ops.dnls.attention_backward.default, (*grads, *saved), kw)


@pytest.mark.parametrize(
    "op",
    ["search", "search_backward", "refine", "refine_backward", "gather", "gather_dpos", "scatter",
     "scatter_counts", "wpsum", "wpsum_backward", "iunfold", "ifold", "attention",
     "attention_backward"],
)  # fmt: skip
def test_every_device_has_a_kernel(op):
    """Every op has a kernel for every device type (the reference path where no faster one
    applies), not only CPU and CUDA: an MPS or XPU tensor reaches it instead of the
    dispatcher's missing-kernel error."""
    import dnls  # noqa: F401  (registers the ops)

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(f"dnls::{op}", "CompositeExplicitAutograd")
