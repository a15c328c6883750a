"""refine: an independent loop oracle, equality with search where the two coincide, gradients,
ties, duplicates and errors."""

import re

import numpy as np
import oracle
import pytest
import torch
from helpers import assert_close, assert_selection, rand_video, regions
from hypothesis import given, settings
from hypothesis import strategies as st

import dnls

# ---------------------------------------------------------------------------------------------
# Oracle: the refine contract as plain loops over float64 numpy arrays.
# ---------------------------------------------------------------------------------------------


def refine_oracle(
    qvid, kvid, inds, *, wr, kr, k, ps, pt, dist, stride0, stride1, dilation, nheads, region,
    start, count, self_match, border,
):  # fmt: skip
    """``inds (B, HD, Q, K, 3)`` float64 -> ``(dists (B, HD, Q, K'), inds (B, HD, Q, K', 3))``."""
    bsz, _, nc, nh, nw = qvid.shape
    cph = nc // nheads
    queries = oracle.grid_positions(qvid.shape[1:2] + qvid.shape[3:], stride0, region)
    queries = queries[start : start + count]
    lo = (wr // 2) * stride1
    hi_h = nh - 1 - (wr - 1 - wr // 2) * stride1
    hi_w = nw - 1 - (wr - 1 - wr // 2) * stride1
    out_d = np.zeros(inds.shape[:3] + (0,)).tolist()
    out_i = np.zeros(inds.shape[:3] + (0,)).tolist()
    for b in range(bsz):
        for hd in range(nheads):
            chans = list(range(hd * cph, (hd + 1) * cph))
            geo = (ps, pt, dilation, border)

            def distance(x, y):
                return float(((x - y) ** 2).sum()) if dist == "l2" else float((x * y).sum())

            for qi, qpos in enumerate(queries):
                cands = []
                for r in range(kr):
                    t, h, w = (float(v) for v in inds[b, hd, qi, r])
                    ch, cw = min(max(h, lo), hi_h), min(max(w, lo), hi_w)
                    for a in range(wr):
                        for c in range(wr):
                            off_a, off_c = (a - wr // 2) * stride1, (c - wr // 2) * stride1
                            cands.append((t, ch + off_a, cw + off_c))
                qp = oracle.patch(qvid, b, chans, qpos, *geo)
                ds = [distance(qp, oracle.patch(kvid, b, chans, c, *geo)) for c in cands]
                sign = 1 if dist == "l2" else -1
                order = list(range(len(cands)))
                if self_match != "keep":
                    order = [j for j in order if cands[j] != tuple(float(v) for v in qpos)]
                if k is not None:
                    order = sorted(order, key=lambda j: (sign * ds[j], j))
                    order = order[: (k - 1 if self_match == "anchor" else k)]
                res_d = [ds[j] for j in order]
                res_i = [cands[j] for j in order]
                if self_match == "anchor":
                    res_d.insert(0, distance(qp, oracle.patch(kvid, b, chans, qpos, *geo)))
                    res_i.insert(0, tuple(float(v) for v in qpos))
                out_d[b][hd][qi] = res_d
                out_i[b][hd][qi] = res_i
    return np.array(out_d, dtype=np.float64), np.array(out_i, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Random configurations
# ---------------------------------------------------------------------------------------------


def random_inds(shape, nk, fractional, seed):
    """Positions ``(B, HD, Q, nk, 3)`` inside a ``(T, H, W)`` video (``shape[2:]``)."""
    b, hd, q, nframes, height, width = shape
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, nframes, (b, hd, q, nk, 1), generator=g)
    hw = torch.rand(b, hd, q, nk, 2, generator=g, dtype=torch.float64)
    hw = hw * torch.tensor([height - 1, width - 1], dtype=torch.float64)
    if fractional:
        return torch.cat([t.double(), hw], -1)
    return torch.cat([t, hw.round().long()], -1).int()


@st.composite
def refine_cases(draw):
    nheads = draw(st.integers(1, 2))
    b = draw(st.integers(1, 3 - nheads))
    c = nheads * draw(st.integers(1, 2))
    t = draw(st.integers(1, 3))
    h, w = draw(st.integers(3, 6)), draw(st.integers(3, 6))
    stride1 = draw(st.sampled_from([1, 1, 2, 0.5]))
    wr = draw(st.integers(1, min(3, int((min(h, w) - 1) / stride1) + 1)))
    nk_given = draw(st.integers(1, 3))
    kr = draw(st.integers(1, nk_given))
    self_match = draw(st.sampled_from(["keep", "keep", "anchor", "exclude"]))
    kmax = {"keep": kr * wr * wr, "exclude": kr * (wr * wr - 1), "anchor": kr * (wr * wr - 1) + 1}
    if kmax[self_match] < 1:
        self_match = "keep"
    k = draw(st.integers(1, kmax[self_match]))
    if self_match == "keep" and draw(st.booleans()):
        k = None
    region = draw(regions(t, h, w))
    stride0 = draw(st.integers(1, 3))
    total = dnls.query_grid((t, h, w), stride0, region).count
    start = draw(st.integers(0, total - 1))
    count = draw(st.integers(1, min(12, total - start)))
    return dict(
        shape=(b, t, c, h, w),
        seed=draw(st.integers(0, 2**16)),
        cross=draw(st.booleans()),
        fractional=draw(st.booleans()),
        nk_given=nk_given,
        kw=dict(
            wr=wr,
            kr=kr,
            k=k,
            ps=draw(st.integers(1, 3)),
            pt=draw(st.integers(1, 2)),
            dist=draw(st.sampled_from(["l2", "dot"])),
            stride0=stride0,
            stride1=stride1,
            dilation=draw(st.integers(1, 2)),
            nheads=nheads,
            region=region,
            start=start,
            count=count,
            self_match=self_match,
            border=draw(st.sampled_from(["reflect", "zero"])),
        ),
    )


@settings(max_examples=60)
@given(refine_cases())
def test_refine_equals_oracle(case):
    kw = case["kw"]
    b, t, c, h, w = case["shape"]
    q = rand_video(case["shape"], seed=case["seed"])
    k = rand_video(case["shape"], seed=case["seed"] + 7) if case["cross"] else None
    shape = (b, kw["nheads"], kw["count"], t, h, w)
    inds = random_inds(shape, case["nk_given"], case["fractional"], case["seed"])
    dists, out = dnls.refine(q, k, inds, **kw)
    knp = q.numpy() if k is None else k.numpy()
    ed, ei = refine_oracle(q.numpy(), knp, inds.double().numpy(), **kw)
    whole = not case["fractional"] and float(kw["stride1"]).is_integer()
    assert out.dtype == (torch.int32 if whole else torch.float32)
    assert dists.dtype == torch.float64
    assert dists.shape == ed.shape and out.shape == ei.shape
    assert_close(dists, ed, what="dists")
    queries = oracle.grid_positions((t, h, w), kw["stride0"], kw["region"])
    queries = queries[kw["start"] : kw["start"] + kw["count"]]
    assert_selection(q.numpy(), knp, kw, queries, out, ed, ei, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Where refine and search coincide
# ---------------------------------------------------------------------------------------------


def window_centres(flows, thw, ws, wt, stride0, stride1, region=None, nheads=1):
    """Given positions ``(B, HD, Q, 2*wt+1, 3)`` that make refine's candidates search's window:
    in each frame of the query's window, the query carried by the flow (none in its own frame),
    clamped into the frame. Differentiable w.r.t. floating ``flows``."""
    nframes, height, width = thw
    nslots = 2 * wt + 1
    qpos = dnls.query_grid(thw, stride0, region).positions()
    t, h, w = qpos.unbind(-1)
    t0 = (t - wt).clamp(0, nframes - nslots)
    frames = t0[:, None] + torch.arange(nslots)  # (Q, S)
    hw = torch.stack([h, w], -1)[:, None, :].expand(-1, nslots, 2)  # (Q, S, 2)
    if flows is None:
        centre = hw[None]
        dtype = torch.int64
    else:
        f = flows.permute(0, 1, 4, 5, 2, 3)[:, t, h, w]  # (B, Q, S, 2)
        own = (frames == t[:, None])[None, :, :, None]
        centre = hw[None] + torch.where(own, torch.zeros_like(f), f)
        dtype = centre.dtype
    hi = torch.tensor([height - 1, width - 1])
    centre = torch.minimum(torch.maximum(centre, torch.zeros_like(hi)), hi.to(centre.dtype))
    frames = frames[None].expand(centre.shape[0], -1, -1).to(dtype)
    inds = torch.cat([frames[..., None], centre], -1)  # (B, Q, S, 3)
    return inds[:, None].expand(-1, nheads, -1, -1, -1)


@settings(max_examples=15)
@given(
    st.integers(0, 1),
    st.integers(1, 3),
    st.sampled_from(["none", "int", "float"]),
    st.sampled_from(["keep", "anchor", "exclude"]),
    st.sampled_from([1, 2, 0.5]),
    st.integers(1, 2),
    st.integers(0, 1000),
)
def test_refine_around_window_centres_equals_search(wt, ws, flow_kind, self_match, s1, s0, seed):
    """kr = 2*wt+1 windows of side ws around the centres of search's per-frame windows are
    exactly search's candidates, in search's window order."""
    shape = (1, 2 * wt + 2, 2, 7, 8)
    q, kv = rand_video(shape, seed=seed), rand_video(shape, seed=seed + 1)
    nslots = 2 * wt + 1
    g = torch.Generator().manual_seed(seed)
    fshape = (1, shape[1], nslots, 2, 7, 8)
    flows = {
        "none": None,
        "int": torch.randint(-2, 3, fshape, generator=g, dtype=torch.int32),
        "float": (torch.rand(fshape, generator=g, dtype=torch.float64) - 0.5) * 4,
    }[flow_kind]
    # refine's bound on k: the own position could be in every window
    kmax = {"keep": nslots * ws * ws, "exclude": nslots * (ws * ws - 1)}
    kmax["anchor"] = kmax["exclude"] + 1
    if kmax[self_match] < 1:
        self_match = "keep"
    k = max(1, kmax[self_match] - seed % 3)
    kw = dict(ps=3, pt=2, stride0=s0, stride1=s1, k=k, self_match=self_match)
    d_s, i_s = dnls.search(q, kv, ws=ws, wt=wt, flows=flows, nheads=2, **kw)
    inds = window_centres(flows, shape[1:2] + shape[3:], ws, wt, s0, s1, nheads=2)
    d_r, i_r = dnls.refine(q, kv, inds, wr=ws, nheads=2, **kw)
    assert_close(d_r, d_s, what="dists")
    assert torch.equal(i_r, i_s)
    if self_match == "keep":  # k=None: every candidate, in window order
        kw.pop("k")
        d_s, i_s = dnls.search(q, kv, ws=ws, wt=wt, flows=flows, nheads=2, **kw)
        d_r, i_r = dnls.refine(q, kv, inds, wr=ws, nheads=2, **kw)
        assert_close(d_r, d_s, what="dists, k=None")
        assert torch.equal(i_r, i_s)


@pytest.mark.parametrize("dist", ["l2", "dot"])
def test_gradients_equal_search_through_flows(dist):
    """With float flows, the gradients of search w.r.t. both videos and the flows equal those
    of refine around the flow-carried centres (through its float positions), for a loss on
    both the distances and the returned positions."""
    shape = (1, 3, 2, 7, 7)
    q = rand_video(shape, seed=3).requires_grad_()
    kv = rand_video(shape, seed=4).requires_grad_()
    g = torch.Generator().manual_seed(5)
    flows = (torch.rand(1, 3, 3, 2, 7, 7, generator=g, dtype=torch.float64) - 0.5) * 3
    flows.requires_grad_()
    kw = dict(ps=3, k=5, dist=dist, self_match="anchor")
    wd = torch.rand(1, 1, 49 * 3, 5, dtype=torch.float64, generator=g)
    wi = torch.rand(1, 1, 49 * 3, 5, 3, dtype=torch.float64, generator=g)

    def loss(d, i):
        return (d * wd).sum() + (i.double() * wi).sum()

    d_s, i_s = dnls.search(q, kv, ws=3, wt=1, flows=flows, **kw)
    expected = torch.autograd.grad(loss(d_s, i_s), (q, kv, flows))
    inds = window_centres(flows, (3, 7, 7), 3, 1, 1, 1)
    d_r, i_r = dnls.refine(q, kv, inds, wr=3, **kw)
    assert torch.equal(i_r, i_s)
    got = torch.autograd.grad(loss(d_r, i_r), (q, kv, flows))
    for name, a, e in zip(("qvid", "kvid", "flows"), got, expected, strict=True):
        assert_close(a, e, what=f"gradient w.r.t. {name}")
    assert expected[2].abs().sum() > 0


@pytest.mark.parametrize("stride1", [1, 0.5])
def test_refine_of_search_with_wr_1_is_the_same(stride1):
    vid = rand_video((2, 4, 3, 9, 8), seed=6)
    kw = dict(ps=3, pt=2, stride0=2, nheads=3, dist="dot")
    d_s, i_s = dnls.search(vid, ws=5, wt=1, k=6, stride1=stride1, **kw)
    d_r, i_r = dnls.refine(vid, None, i_s, wr=1, k=6, stride1=stride1, **kw)
    assert_close(d_r, d_s, what="dists")
    assert torch.equal(i_r, i_s) and i_r.dtype == i_s.dtype
    d_3, i_3 = dnls.refine(vid, None, i_s, wr=1, kr=3, **kw)  # k=None: the first 3, in order
    assert torch.equal(i_3, i_s[..., :3, :]) and torch.equal(d_3, d_r[..., :3])


# ---------------------------------------------------------------------------------------------
# Ties, duplicates, batches, heads, dtypes
# ---------------------------------------------------------------------------------------------


def test_ties_go_to_candidate_order_and_duplicates_are_kept():
    vid = torch.zeros(1, 2, 1, 6, 6, dtype=torch.float64)  # every distance ties
    given = torch.tensor([[1, 3, 3], [0, 2, 2], [1, 3, 3]], dtype=torch.int32)
    inds = given.expand(1, 1, 72, 3, 3)
    dists, out = dnls.refine(vid, None, inds, wr=3, k=27, ps=1)
    _, all_cands = dnls.refine(vid, None, inds, wr=3, ps=1)
    assert torch.equal(out, all_cands) and torch.all(dists == 0)
    offs = torch.tensor([[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 0], [0, 1], [1, -1], [1, 0]])
    offs = torch.cat([offs, torch.tensor([[1, 1]])])
    expected = torch.cat(
        [torch.cat([g[:1].expand(9, 1), g[1:] + offs], -1) for g in given.long()]
    ).int()
    assert torch.equal(out[0, 0, 0], expected)
    # the duplicated window (first and third) yields each position twice
    assert torch.equal(out[..., :9, :], out[..., 18:, :])


def test_windows_slide_inward():
    vid = rand_video((1, 1, 1, 6, 7))
    inds = torch.tensor([0, 0, 6], dtype=torch.int32).expand(1, 1, 42, 1, 3)
    _, out = dnls.refine(vid, None, inds, wr=3, stride1=2, ps=1)
    rows = out[0, 0, 0, :, 1].unique().tolist()
    cols = out[0, 0, 0, :, 2].unique().tolist()
    assert rows == [0, 2, 4] and cols == [2, 4, 6]


@settings(max_examples=15)
@given(refine_cases(), st.integers(1, 5))
def test_batches_equal_one_shot(case, size):
    kw = dict(case["kw"], start=0, count=None)
    b, t, _, h, w = case["shape"]
    q = rand_video(case["shape"], seed=case["seed"])
    total = dnls.query_grid(case["shape"], kw["stride0"], kw["region"]).count
    inds = random_inds((b, kw["nheads"], total, t, h, w), 3, case["fractional"], case["seed"])
    full_d, full_i = dnls.refine(q, None, inds, **kw)
    parts = [
        dnls.refine(q, None, inds[:, :, s : s + n], **dict(kw, start=s, count=n))
        for s in range(0, total, size)
        for n in [min(size, total - s)]
    ]
    assert torch.equal(torch.cat([d for d, _ in parts], 2), full_d)
    assert torch.equal(torch.cat([i for _, i in parts], 2), full_i)


def test_six_d_equals_five_d_and_low_precision():
    vid = rand_video((1, 3, 4, 7, 8))
    inds = random_inds((1, 2, 3 * 56, 3, 7, 8), 2, False, 1)
    d5, i5 = dnls.refine(vid, None, inds, wr=3, k=5, nheads=2, ps=3)
    vid6 = vid.view(1, 3, 2, 2, 7, 8).transpose(1, 2)
    d6, i6 = dnls.refine(vid6, None, inds, wr=3, k=5, ps=3)
    assert torch.equal(d5, d6) and torch.equal(i5, i6)
    for dtype in (torch.float32, torch.bfloat16):
        d, i = dnls.refine(vid.to(dtype), None, inds, wr=3, nheads=2, ps=3)
        d_ref, i_ref = dnls.refine(vid.to(dtype).double(), None, inds, wr=3, nheads=2, ps=3)
        assert d.dtype == dtype and torch.equal(i, i_ref)
        assert_close(d, d_ref, dtype=dtype, what=f"dists {dtype}", scale=10)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _gradcheck(fn, *inputs, fast=False):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


def _interior_fractional(shape, nk, seed):
    """Float positions away from whole pixels and from the frame edges (no slide)."""
    b, hd, q, nframes, height, width = shape
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, nframes, (b, hd, q, nk, 1), generator=g).double()
    base = torch.randint(1, min(height, width) - 2, (b, hd, q, nk, 2), generator=g).double()
    frac = 0.2 + 0.6 * torch.rand(b, hd, q, nk, 2, generator=g, dtype=torch.float64)
    return torch.cat([t, base + frac], -1)


@pytest.mark.parametrize(("dist", "border"), [("l2", "reflect"), ("dot", "zero")])
def test_gradcheck_videos(dist, border):
    q = rand_video((1, 2, 2, 5, 5), seed=1).requires_grad_()
    k = rand_video((1, 2, 2, 5, 5), seed=2).requires_grad_()
    kw = dict(wr=3, ps=3, pt=2, dilation=2, dist=dist, border=border, stride0=2)
    inds = random_inds((1, 1, 18, 2, 5, 5), 2, False, 3)
    _gradcheck(lambda a, b: dnls.refine(a, b, inds, **kw)[0], q, k)
    fn = lambda a, b: dnls.refine(a, b, inds, k=4, self_match="anchor", **kw)[0]  # noqa: E731
    _gradcheck(fn, q, k, fast=True)
    inds2 = random_inds((1, 2, 18, 2, 5, 5), 2, False, 4)
    fn = lambda a: dnls.refine(a, None, inds2, k=3, self_match="exclude", nheads=2, **kw)[0]  # noqa: E731
    _gradcheck(fn, q, fast=True)


@pytest.mark.parametrize("dist", ["l2", "dot"])
def test_gradcheck_float_positions(dist):
    """Gradients w.r.t. the fractional (h, w) of the given positions (t stays whole)."""
    q = rand_video((1, 2, 2, 7, 7), seed=5).requires_grad_()
    inds = _interior_fractional((1, 1, 32, 2, 7, 7), 2, 6)
    t, hw = inds[..., :1], inds[..., 1:].clone().requires_grad_()
    kw = dict(wr=2, ps=3, dist=dist, stride0=2, border="reflect")

    def fn(v, x):
        return dnls.refine(v, None, torch.cat([t, x], -1), k=5, **kw)[0]

    _gradcheck(fn, q, hw, fast=True)
    _gradcheck(lambda x: dnls.refine(q, None, torch.cat([t, x], -1), **kw)[0], hw)


def test_positions_gradient_matches_finite_differences():
    """The returned float positions move with the given ones (and dists through the read):
    a directional derivative of a loss on both equals central differences."""
    q = rand_video((1, 2, 1, 8, 8), seed=8)
    inds = _interior_fractional((1, 1, 128, 2, 8, 8), 3, 9).requires_grad_()
    g = torch.Generator().manual_seed(10)
    wd = torch.rand(1, 1, 128, 27, dtype=torch.float64, generator=g)
    wi = torch.rand(1, 1, 128, 27, 3, dtype=torch.float64, generator=g)
    direction = torch.rand(inds.shape, dtype=torch.float64, generator=g) * torch.tensor([0, 1, 1])

    def loss(i):
        d, out = dnls.refine(q, None, i, wr=3, ps=3)
        return (d * wd).sum() + (out.double() * wi).sum()

    (grad,) = torch.autograd.grad(loss(inds), inds)
    eps = 1e-3  # the positions are float32: a step well above their rounding
    with torch.no_grad():
        numeric = (loss(inds + eps * direction) - loss(inds - eps * direction)) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(analytic.item() - numeric.item()) < 1e-3 * max(1.0, abs(numeric.item()))
    assert grad[..., 1:].abs().sum() > 0 and torch.all(grad[..., 0] == 0)


def test_inputs_not_modified():
    q = rand_video((1, 3, 2, 6, 6)).requires_grad_()
    inds = _interior_fractional((1, 1, 108, 2, 6, 6), 2, 1).requires_grad_()
    q0, i0 = q.detach().clone(), inds.detach().clone()
    dists, out = dnls.refine(q, None, inds, wr=3, k=3)
    (dists.sum() + out.sum()).backward()
    assert torch.equal(q.detach(), q0) and torch.equal(inds.detach(), i0)


def test_forced_triton_backend_says_refine_has_no_kernel(monkeypatch):
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    vid = rand_video((1, 1, 1, 5, 5))
    inds = torch.zeros(1, 1, 25, 1, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="refine has no Triton kernel"):
        dnls.refine(vid, None, inds, wr=3)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

V = torch.rand(1, 3, 2, 8, 8)
INDS = torch.zeros(1, 1, 192, 2, 3, dtype=torch.int32)


def _r(vid=V, kvid=None, inds=INDS, **kw):
    return lambda: dnls.refine(vid, kvid, inds, **{"wr": 3, **kw})


def _pos(t, h, w, dtype=torch.float32):
    return torch.tensor([t, h, w], dtype=dtype).expand(1, 1, 192, 2, 3)


ERRORS = [
    ("qvid", TypeError, _r(vid=V.long())),
    ("kvid", ValueError, _r(kvid=torch.rand(1, 3, 2, 8, 7))),
    ("kvid", TypeError, _r(kvid=V.double())),
    ("wr", ValueError, _r(wr=0)),
    ("wr", TypeError, _r(wr=2.0)),
    ("wr", ValueError, _r(wr=9)),
    ("wr", ValueError, _r(wr=4, stride1=3)),
    ("kr", ValueError, _r(kr=3)),
    ("kr", ValueError, _r(kr=0)),
    ("k", ValueError, _r(k=19)),
    ("k", ValueError, _r(kr=1, k=10)),
    ("k", ValueError, _r(k=17, self_match="exclude")),
    ("k", ValueError, _r(wr=1, k=1, self_match="exclude")),
    ("k", ValueError, _r(k=0)),
    ("self_match", ValueError, _r(self_match="anchor")),
    ("self_match", ValueError, _r(self_match="drop", k=2)),
    ("dist", ValueError, _r(dist="l1")),
    ("ps", ValueError, _r(ps=0)),
    ("stride0", ValueError, _r(stride0=0)),
    ("stride1", ValueError, _r(stride1=0)),
    ("nheads", ValueError, _r(nheads=3)),
    ("inds", TypeError, _r(inds=[0, 0, 0])),
    ("inds", TypeError, _r(inds=INDS.bool())),
    ("inds", ValueError, _r(inds=INDS[..., :2])),
    ("inds", ValueError, _r(inds=INDS[:, :, :100])),
    ("inds", ValueError, _r(inds=INDS, stride0=2)),
    ("inds", ValueError, _r(inds=INDS[:, :, :, :0])),
    ("inds", ValueError, _r(inds=INDS.expand(1, 2, 192, 2, 3))),
    ("inds", ValueError, _r(inds=_pos(0, 8, 0))),
    ("inds", ValueError, _r(inds=_pos(3, 0, 0))),
    ("inds", ValueError, _r(inds=_pos(0.5, 0, 0))),
    ("inds", ValueError, _r(inds=_pos(0, float("nan"), 0))),
    ("inds", ValueError, _r(inds=INDS.to("meta"))),
    ("count", ValueError, _r(inds=INDS, count=193)),
    ("region", ValueError, _r(region=(0, 4, 0, 8, 0, 8))),
]


@pytest.mark.parametrize(("name", "exc", "call"), ERRORS)
def test_errors_name_the_argument(name, exc, call):
    with pytest.raises(exc, match=rf"^{re.escape(name)} must be "):
        call()
