import os
import subprocess
import sys
import textwrap

import numpy as np
import oracle
import pytest
import torch
from helpers import assert_close, assert_selection, rand_video, regions
from hypothesis import given, settings
from hypothesis import strategies as st

import dnls


@st.composite
def search_cases(draw, max_hw=6):
    nheads = draw(st.integers(1, 2))
    b = draw(st.integers(1, 3 - nheads))
    c = nheads * draw(st.integers(1, 2))
    wt = draw(st.integers(0, 1))
    t = draw(st.integers(2 * wt + 1, 2 * wt + 2))
    h, w = draw(st.integers(3, max_hw)), draw(st.integers(3, max_hw))
    stride1 = draw(st.sampled_from([1, 1, 1, 2, 0.5, 0.75]))
    ws_max = min(3, int((min(h, w) - 1) / stride1) + 1)
    ws = draw(st.integers(1, ws_max))
    flow_kind = draw(st.sampled_from(["none", "none", "int", "float"]))
    self_match = draw(st.sampled_from(["keep", "anchor", "exclude"]))
    nwin = (2 * wt + 1) * ws * ws
    if self_match == "exclude" and nwin == 1:
        self_match = "keep"
    kmax = nwin - 1 if self_match == "exclude" else nwin
    k_values = st.integers(1, kmax)
    if self_match == "keep" or stride1 == 1:  # else k=None is refused (own not a candidate)
        k_values = st.one_of(st.none(), k_values)
    k = draw(k_values)
    region = draw(regions(t, h, w))
    return dict(
        shape=(b, t, c, h, w),
        seed=draw(st.integers(0, 2**16)),
        cross=draw(st.booleans()),
        flow_kind=flow_kind,
        kw=dict(
            ws=ws,
            wt=wt,
            ps=draw(st.integers(1, 3)),
            pt=draw(st.integers(1, 2)),
            k=k,
            dist=draw(st.sampled_from(["l2", "dot"])),
            stride0=draw(st.integers(1, 3)),
            stride1=stride1,
            dilation=draw(st.integers(1, 2)),
            nheads=nheads,
            region=region,
            self_match=self_match,
            border=draw(st.sampled_from(["reflect", "zero"])),
        ),
    )


def make_flows(kind, shape, wt, seed):
    b, t, _, h, w = shape
    g = torch.Generator().manual_seed(seed + 1)
    size = (b, t, 2 * wt + 1, 2, h, w)
    if kind == "int":
        return torch.randint(-2, 3, size, generator=g, dtype=torch.int32)
    if kind == "float":
        return (torch.rand(size, generator=g, dtype=torch.float64) - 0.5) * 5
    return None


def run_both(case):
    q = rand_video(case["shape"], seed=case["seed"])
    k = rand_video(case["shape"], seed=case["seed"] + 7) if case["cross"] else None
    kw = case["kw"]
    flows = make_flows(case["flow_kind"], case["shape"], kw["wt"], case["seed"])
    dists, inds = dnls.search(q, k, flows=flows, **kw)
    np_flows = None if flows is None else flows.double().numpy()
    knp = q.numpy() if k is None else k.numpy()
    ed, ei = oracle.search(q.numpy(), knp, flows=np_flows, **kw)
    return dists, inds, ed, ei, flows


@settings(max_examples=200)
@given(search_cases())
def test_search_equals_oracle(case):
    dists, inds, ed, ei, flows = run_both(case)
    whole = (flows is None or not flows.is_floating_point()) and float(
        case["kw"]["stride1"]
    ).is_integer()
    assert inds.dtype == (torch.int32 if whole else torch.float32)
    assert dists.shape == ed.shape[:4] if ed.size else dists.numel() == 0
    # inside the frames (search marks its positions so, and the patch ops trust the mark)
    t, h, w = case["shape"][1], case["shape"][3], case["shape"][4]
    assert ((inds >= 0) & (inds <= torch.tensor([t - 1, h - 1, w - 1]).to(inds))).all()
    if ed.size == 0:
        return
    assert_close(dists, ed, what="dists")
    q = rand_video(case["shape"], seed=case["seed"]).numpy()
    k = rand_video(case["shape"], seed=case["seed"] + 7).numpy() if case["cross"] else q
    shape = case["shape"][1:2] + case["shape"][3:]
    queries = oracle.grid_positions(shape, case["kw"]["stride0"], case["kw"]["region"])
    assert_selection(q, k, case["kw"], queries, inds, ed, ei, atol=1e-4, distinct=True)


@settings(max_examples=30)
@given(search_cases(), st.integers(1, 7))
def test_batches_equal_one_shot(case, size):
    q = rand_video(case["shape"], seed=case["seed"])
    kw = case["kw"]
    flows = make_flows(case["flow_kind"], case["shape"], kw["wt"], case["seed"])
    full_d, full_i = dnls.search(q, flows=flows, **kw)
    grid = dnls.query_grid(q.shape, kw["stride0"], kw["region"])
    assert grid.count == full_d.shape[2]
    parts = [dnls.search(q, flows=flows, start=s, count=n, **kw) for s, n in grid.batches(size)]
    assert torch.equal(torch.cat([d for d, _ in parts], 2), full_d)
    assert torch.equal(torch.cat([i for _, i in parts], 2), full_i)


def test_search_defaults_and_shapes():
    vid = rand_video((2, 3, 4, 9, 10), torch.float32)
    dists, inds = dnls.search(vid, ws=3, wt=1, ps=3, k=5, nheads=2, stride0=2)
    q = 3 * 5 * 5
    assert dists.shape == (2, 2, q, 5) and dists.dtype == torch.float32
    assert inds.shape == (2, 2, q, 5, 3) and inds.dtype == torch.int32
    # self-search l2: the query itself is at distance 0, the nearest
    assert torch.all(dists[..., 0] == 0)
    d_all, _ = dnls.search(vid, ws=3, wt=1, ps=3, nheads=2)
    assert d_all.shape == (2, 2, 3 * 9 * 10, 27)


def test_six_d_input_equals_split_five_d():
    vid = rand_video((1, 3, 4, 7, 8))
    d5, i5 = dnls.search(vid, ws=3, wt=1, k=4, nheads=2, ps=3)
    vid6 = vid.view(1, 3, 2, 2, 7, 8).transpose(1, 2)
    d6, i6 = dnls.search(vid6, ws=3, wt=1, k=4, ps=3)
    assert torch.equal(d5, d6) and torch.equal(i5, i6)


def test_self_match_modes():
    vid = rand_video((1, 1, 2, 8, 8))
    kw = dict(ws=5, ps=3, k=4)
    d_keep, i_keep = dnls.search(vid, **kw)
    d_anchor, i_anchor = dnls.search(vid, self_match="anchor", **kw)
    d_excl, i_excl = dnls.search(vid, self_match="exclude", **kw)
    own = dnls.query_grid(vid.shape).positions().to(torch.int32)
    # l2 self-search: keep and anchor both put the query first; exclude never returns it
    assert torch.equal(i_keep[0, 0, :, 0], own) and torch.equal(i_anchor, i_keep)
    assert not (i_excl == own[:, None]).all(-1).any()
    assert torch.equal(i_excl[..., :3, :], i_keep[..., 1:, :])
    # dot: the query is not its own nearest, anchor forces it first anyway
    _, i_dot = dnls.search(vid, dist="dot", self_match="anchor", **kw)
    assert torch.equal(i_dot[0, 0, :, 0], own)


def test_ties_go_to_earlier_candidate():
    vid = torch.zeros(1, 1, 1, 6, 6, dtype=torch.float64)  # every distance ties
    dists, inds = dnls.search(vid, ws=3, ps=1, k=9)
    _, window = dnls.search(vid, ws=3, ps=1)
    assert torch.equal(inds, window) and torch.all(dists == 0)


def nonfinite_video(kind: str, shape, seed: int) -> torch.Tensor:
    """A float32 video whose distances are partly not finite: ``"nan"``, a NaN pixel in it;
    ``"overflow"``, a block of values near 1e20 whose squared differences pass float32's
    largest value (their products too: minus infinity for dot)."""
    vid = rand_video(shape, seed=seed).float()
    b, t, c, h, w = shape
    if kind == "nan":
        vid[0, t // 2, c // 2, h // 2, w // 3] = float("nan")
    else:
        vid[..., : h // 2, : w // 2] *= 1e20
    return vid


def assert_nonfinite_match(d, i, ed, ei, shape, anchor):
    """Results of a search on :func:`nonfinite_video` against the oracle's: the same positions
    (all inside the video, none twice for one query), and the same distances, an infinity of
    the oracle's sign where its float64 value passes float32's range."""
    assert torch.equal(i.double(), torch.as_tensor(ei)), "inds differ"
    t, h, w = shape[1], shape[3], shape[4]
    assert ((i >= 0) & (i <= torch.tensor([t - 1, h - 1, w - 1]).to(i))).all()
    flat = i.reshape(-1, i.shape[-2], 3)
    assert all(len(set(map(tuple, q.tolist()))) == len(q) for q in flat), "a repeated position"
    top = float(np.finfo(np.float32).max)
    expected = torch.as_tensor(ed)
    expected = torch.where(expected.abs() >= top, expected.sign() * torch.inf, expected)
    ranked = d[..., 1:] if anchor else d  # (the anchored query's own distance is not ranked)
    assert not ranked.isnan().any(), "a NaN distance among the ranked results"
    assert_close(d, expected, dtype=torch.float32, what="dists", nan_ok=True)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("kind", ["nan", "overflow"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(ws=3, ps=3, k=6),
        dict(ws=3, wt=1, ps=3, k=9, dist="dot", self_match="exclude"),
        dict(ws=5, ps=1, k=20, self_match="anchor", border="zero"),
    ],
)
def test_nonfinite_distances_rank_last(monkeypatch, backend, kind, kw):
    """Distances that are NaN or pass the largest finite value rank after every other
    candidate, tied, so in window order: every query gets k distinct positions inside the
    video, those reported infinitely far (both CPU backends: the reference and the fused
    kernels)."""
    monkeypatch.setenv("DNLS_BACKEND", backend)
    shape = (1, 3, 2, 8, 9)
    vid = nonfinite_video(kind, shape, seed=11)
    full = dict(wt=0, pt=1, dist="l2", stride0=1, stride1=1, dilation=1, nheads=1, region=None,
                self_match="keep", border="reflect") | kw  # fmt: skip
    d, i = dnls.search(vid, **kw)
    ed, ei = oracle.search(vid.double().numpy(), vid.double().numpy(), flows=None, **full)
    assert_nonfinite_match(d, i, ed, ei, shape, kw.get("self_match") == "anchor")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_matches_float64(dtype):
    vid = rand_video((1, 3, 3, 8, 8))
    kw = dict(ws=3, wt=1, ps=3, pt=2)
    d64, i64 = dnls.search(vid, **kw)
    d, i = dnls.search(vid.to(dtype), **kw)
    assert d.dtype == dtype and torch.equal(i, i64)
    # inputs are rounded to dtype: compare against the float64 search of the rounded video
    d_ref, _ = dnls.search(vid.to(dtype).double(), **kw)
    assert_close(d, d_ref, dtype=dtype, what=f"dists {dtype}", scale=10)


def _gradcheck(fn, *inputs, fast=False):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


@pytest.mark.parametrize("dist", ["l2", "dot"])
@pytest.mark.parametrize("border", ["reflect", "zero"])
def test_gradcheck_videos(dist, border):
    q = rand_video((1, 3, 2, 5, 6), seed=1).requires_grad_()
    k = rand_video((1, 3, 2, 5, 6), seed=2).requires_grad_()
    kw = dict(ws=3, wt=1, ps=3, pt=2, dilation=2, dist=dist, border=border, stride0=2)
    _gradcheck(lambda a, b: dnls.search(a, b, **kw)[0], q, k)
    _gradcheck(lambda a, b: dnls.search(a, b, k=4, self_match="anchor", **kw)[0], q, k)
    _gradcheck(lambda a: dnls.search(a, k=3, self_match="exclude", nheads=2, **kw)[0], q)


def _fractional(size, seed):
    g = torch.Generator().manual_seed(seed)
    whole = torch.randint(-2, 3, size, generator=g).double()
    return whole + 0.2 + 0.6 * torch.rand(size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("dist", ["l2", "dot"])
def test_gradcheck_flows(dist):
    q = rand_video((1, 3, 2, 7, 7), seed=3).requires_grad_()
    flows = _fractional((1, 3, 3, 2, 7, 7), 4).requires_grad_()
    kw = dict(ws=3, wt=1, ps=3, dist=dist)
    _gradcheck(lambda v, f: dnls.search(v, flows=f, **kw)[0], q, flows, fast=True)
    _gradcheck(
        lambda f: dnls.search(q, flows=f, k=5, self_match="anchor", **kw)[0], flows, fast=True
    )


def test_gradcheck_flow_pair():
    q = rand_video((1, 3, 1, 6, 6), seed=5).requires_grad_()
    fflow = (_fractional((1, 3, 2, 6, 6), 6) * 0.4).requires_grad_()
    bflow = (_fractional((1, 3, 2, 6, 6), 7) * 0.4).requires_grad_()
    kw = dict(ws=3, wt=1, ps=1)
    _gradcheck(lambda v, f, b: dnls.search(v, flows=(f, b), **kw)[0], q, fflow, bflow, fast=True)


def test_inds_gradient_reaches_flows():
    """Float ``inds`` are differentiable w.r.t. ``flows``: compare the gradient with central
    differences (``inds`` are piecewise linear in the flows, so a small step is exact)."""
    q = rand_video((1, 3, 1, 8, 8), seed=8)
    flows = _fractional((1, 3, 3, 2, 8, 8), 9).requires_grad_()
    weight = torch.rand(1, 1, 192, 27, 3, dtype=torch.float64)
    direction = torch.rand_like(flows)
    _, inds = dnls.search(q, flows=flows, ws=3, wt=1, ps=1)
    (grad,) = torch.autograd.grad((inds.double() * weight).sum(), flows)
    eps = 1e-2
    with torch.no_grad():
        _, ip = dnls.search(q, flows=flows + eps * direction, ws=3, wt=1, ps=1)
        _, im = dnls.search(q, flows=flows - eps * direction, ws=3, wt=1, ps=1)
    numeric = ((ip.double() - im.double()) * weight).sum() / (2 * eps)
    assert abs((grad * direction).sum().item() - numeric.item()) < 1e-3 * max(1, abs(numeric))
    assert grad.abs().sum() > 0


def test_flow_pair_equals_accumulated_oracle():
    g = torch.Generator().manual_seed(11)
    fflow = (torch.rand(1, 4, 2, 5, 6, generator=g, dtype=torch.float64) - 0.5) * 3
    bflow = (torch.rand(1, 4, 2, 5, 6, generator=g, dtype=torch.float64) - 0.5) * 3
    got = dnls.accumulate_flows(fflow, bflow, wt=1)
    assert_close(got, oracle.accumulate_flows(fflow.numpy(), bflow.numpy(), 1), what="flows")
    ints = dnls.accumulate_flows(fflow.round().int(), bflow.round().int(), wt=1)
    expected = oracle.accumulate_flows(fflow.round().numpy(), bflow.round().numpy(), 1)
    assert ints.dtype == torch.int32 and np.array_equal(ints.numpy(), expected)
    vid = rand_video((1, 4, 1, 5, 6))
    a = dnls.search(vid, ws=3, wt=1, ps=1, k=4, flows=(fflow, bflow))
    b = dnls.search(vid, ws=3, wt=1, ps=1, k=4, flows=got)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_inputs_not_modified():
    q = rand_video((1, 3, 2, 6, 6)).requires_grad_()
    flows = _fractional((1, 3, 3, 2, 6, 6), 1)
    q0, f0 = q.detach().clone(), flows.clone()
    dists, _ = dnls.search(q, flows=flows, ws=3, wt=1, k=3)
    dists.sum().backward()
    assert torch.equal(q.detach(), q0) and torch.equal(flows, f0)


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch, dnls
    torch.set_num_threads(1)
    dnls.search(torch.rand(1, 1, 1, 64, 64), ws=21, ps=1, k=4)  # warm up: lazy init
    vid = torch.rand(1, 1, 1, int(sys.argv[1]), int(sys.argv[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dnls.search(vid, ws=21, ps=1, k=4)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """
)


def _peak_kib(probe: str, size: int) -> int:
    """The peak RSS growth (KiB) the script ``probe`` prints for ``size``, in a process of its
    own. A fixed mmap threshold makes glibc return freed chunk workspaces to the system, so peak
    RSS measures live memory rather than heap fragmentation."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-c", probe, str(size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip())


def test_search_memory_does_not_grow_with_queries():
    """Peak RSS growth of one search at 128x128 and 384x384 (9x the queries). A Q x W float32
    tensor alone (W = 441) would add 232 MB between the two; the chunked search adds only its
    O(Q x K) outputs (dists, inds, and the window indices kept for the backward)."""

    small, large = _peak_kib(_MEMORY_PROBE, 128), _peak_kib(_MEMORY_PROBE, 384)
    outputs = 384 * 384 * 4 * (4 + 12 + 4)  # dists, inds and window indices, in bytes
    assert large - small < (outputs + 24 * 2**20) / 1024, (small, large)


_BATCH_PROBE = textwrap.dedent(
    """
    import os, resource, sys, torch, dnls
    torch.set_num_threads(1)
    os.environ["DNLS_BACKEND"] = "torch"
    v = torch.rand(1, 1, 3, 32, 32).half()
    d, i = dnls.search(v, ws=5, ps=5, k=4, count=64)  # warm up: lazy init
    dnls.gather(v, i, ps=5), dnls.wpsum(v, d, i, ps=5)
    n = int(sys.argv[1])
    vid = torch.rand(1, 1, 3, n, n).half()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d, i = dnls.search(vid, ws=5, ps=5, k=4, start=n * n // 2, count=256)
    dnls.gather(vid, i, ps=5), dnls.wpsum(vid, d, i, ps=5)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """
)


def test_reference_batch_memory_does_not_grow_with_the_video():
    """The reference path (every op's oracle, and the CPU backend where no fused kernel
    applies) reads patches straight from the video: a batch of 256 queries of a float16
    video of 1024x1024 peaks no higher than of 256x256. (It used to copy the whole video to
    float32 rows on every call, twice for a search of a video against itself: 25 MB here.)"""

    small, large = _peak_kib(_BATCH_PROBE, 256), _peak_kib(_BATCH_PROBE, 1024)
    assert large - small < 4 * 1024, (small, large)


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
@pytest.mark.parametrize("pair", [False, True])
def test_whole_flows_past_int32(monkeypatch, backend, pair):
    """Whole flows past int32's range move a window to the frame's edge, as any flow past the
    frame does (they used to wrap around in the kernels' int32 positions)."""
    monkeypatch.setenv("DNLS_BACKEND", backend)
    vid = rand_video((1, 3, 1, 6, 7), seed=5)
    size = (1, 3, 2, 6, 7) if pair else (1, 3, 3, 2, 6, 7)
    sign = torch.where(torch.rand(size, generator=torch.Generator().manual_seed(6)) < 0.5, -1, 1)
    huge = [sign * (2**32 + 1), sign * (2**62)]
    far = sign * 100  # past the frame, well inside int32
    kw = dict(ws=3, wt=1, ps=3, k=4)

    def flows(f):
        return (f, -f) if pair else f

    expected = dnls.search(vid, flows=flows(far), **kw)
    for f in huge:
        d, i = dnls.search(vid, flows=flows(f), **kw)
        assert torch.equal(i, expected[1])
        assert_close(d, expected[0], what="dists")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(monkeypatch, backend):
    """B = 0: every op returns empty results of the right shapes, and gradients flow."""
    monkeypatch.setenv("DNLS_BACKEND", backend)
    v = torch.rand(0, 1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    dists, inds = dnls.search(v, ws=3, k=2, nheads=2)
    assert dists.shape == (0, 2, 64, 2) and inds.shape == (0, 2, 64, 2, 3)
    assert dnls.search(v, ws=3)[0].shape == (0, 1, 64, 9)
    patches = dnls.iunfold(v, ps=3)
    assert patches.shape == (0, 64, 1, 4, 3, 3)
    out, counts = dnls.ifold(patches, shape=v.shape)
    assert out.shape == v.shape and counts.shape == (0, 1, 1, 8, 8)
    w = dnls.wpsum(v, torch.softmax(-dists, -1), inds, ps=3, nheads=2)
    assert w.shape == (0, 2, 64, 1, 2, 3, 3)
    monkeypatch.setenv("DNLS_BACKEND", "torch")  # (refine has no Triton kernel)
    rd, ri = dnls.refine(v, None, inds, wr=3, ps=3, k=3, nheads=2)
    assert rd.shape == (0, 2, 64, 3) and ri.shape == (0, 2, 64, 3, 3)
    (dists.sum() + out.sum() + w.sum() + rd.sum()).backward()
    assert v.grad.shape == v.shape


@settings(max_examples=30, deadline=None)
@given(search_cases(max_hw=9), st.data())
def test_recorded_box_holds_every_position(case, data):
    """The box a search records for its outputs from its geometry alone (scatter by anchors
    takes it rather than reading the positions back) holds every position it returns, for
    any batch of queries, and is the bounds of its queries' windows, no larger; none is
    recorded with flows or fractional positions."""
    from dnls import _checks

    q = rand_video(case["shape"], seed=case["seed"])
    kw = case["kw"]
    flows = make_flows(case["flow_kind"], case["shape"], kw["wt"], case["seed"])
    total = dnls.search(q, flows=flows, **kw)[1].shape[2]
    start = data.draw(st.integers(0, total - 1))
    count = data.draw(st.integers(1, total - start))
    _, inds = dnls.search(q, flows=flows, start=start, count=count, **kw)
    box = _checks.known_box(inds)
    if flows is not None or inds.is_floating_point():
        assert box is None
        return
    lo = torch.tensor(box[0::2])
    hi = torch.tensor(box[1::2])
    flat = inds.reshape(-1, 3).long()
    assert ((flat >= lo) & (flat <= hi)).all(), (box, flat.amin(0), flat.amax(0))
    # and no larger than the windows: the bounds of every candidate of the batch's queries
    every = dict(kw, k=None, self_match="keep")
    flat = dnls.search(q, start=start, count=count, **every)[1].reshape(-1, 3).long()
    tight = torch.stack([flat.amin(0), flat.amax(0)], 1).flatten().tolist()
    assert list(box) == tight, (box, tight)
