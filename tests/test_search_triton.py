"""The Triton search kernels against the reference layer, forward and backward, per dtype.

On a machine without a GPU they run on CPU tensors under Triton's interpreter, at tiny sizes;
on a GPU the same tests run on CUDA tensors at larger sizes and with more examples."""

import pytest
import torch
from helpers import assert_close, rand_video
from hypothesis import given, settings
from hypothesis import strategies as st
from test_search import make_flows, search_cases

import dnls

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EXAMPLES = 40 if CUDA else 10
MAX_HW = 12 if CUDA else 5


def both(monkeypatch, *args, **kwargs):
    """(reference result, Triton result) of the same search."""
    monkeypatch.setenv("DNLS_BACKEND", "torch")
    ref = dnls.search(*args, **kwargs)
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    return ref, dnls.search(*args, **kwargs)


@settings(max_examples=EXAMPLES)
@given(search_cases(max_hw=MAX_HW))
def test_forward_equals_reference(case):
    with pytest.MonkeyPatch.context() as mp:
        q = rand_video(case["shape"], seed=case["seed"]).to(DEVICE)
        k = rand_video(case["shape"], seed=case["seed"] + 7).to(DEVICE) if case["cross"] else None
        flows = make_flows(case["flow_kind"], case["shape"], case["kw"]["wt"], case["seed"])
        flows = None if flows is None else flows.to(DEVICE)
        (d0, i0), (d1, i1) = both(mp, q, k, flows=flows, **case["kw"])
    assert i1.dtype == i0.dtype and i1.device == i0.device
    assert_close(d1, d0, what="dists")
    assert torch.equal(i1, i0), "inds differ"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [None, 4])
def test_dtypes(monkeypatch, dtype, k):
    shape = (1, 3, 4, 24, 20) if CUDA else (1, 1, 4, 4, 5)
    vid = rand_video(shape, dtype, seed=3).to(DEVICE)
    kw = dict(ws=3, wt=1 if CUDA else 0, ps=3, k=k, nheads=2)
    (d0, i0), (d1, i1) = both(monkeypatch, vid, **kw)
    assert d1.dtype == dtype
    assert_close(d1, d0, dtype=dtype, what=f"dists {dtype}", scale=10)
    if k is None or dtype in (torch.float32, torch.float64):
        assert torch.equal(i1, i0)


@pytest.mark.parametrize(("ps", "gq_sum"), [(1, True), (3, False), (3, True)])
@pytest.mark.parametrize("dist", ["l2", "dot"])
def test_backward_equals_reference(monkeypatch, dist, ps, gq_sum):
    """Gradients to both videos and the flows. Each query's gradient is summed over its
    results in registers, then stored (one-pixel patches: no other query touches its pixel)
    or added once (``bwd_gq_sum``); or added result by result."""
    from dnls.ops import _search_triton as kernels

    monkeypatch.setitem(kernels.CONFIG, "bwd_gq_sum", gq_sum)
    shape = (1, 3, 2, 16, 14) if CUDA else (1, 3, 1, 5, 5)
    q = rand_video(shape, seed=4).to(DEVICE).requires_grad_()
    k = rand_video(shape, seed=5).to(DEVICE).requires_grad_()
    g = torch.Generator().manual_seed(6)
    flows = ((torch.rand(shape[0], shape[1], 3, 2, *shape[3:], generator=g) - 0.5) * 3).double()
    flows = flows.to(DEVICE).requires_grad_()
    kw = dict(ws=3, wt=1, ps=ps, k=4, dist=dist, self_match="anchor")
    nq = shape[1] * shape[3] * shape[4]
    weight = torch.rand(1, 1, nq, 4, generator=g, dtype=torch.float64).to(DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DNLS_BACKEND", backend)
        dists, inds = dnls.search(q, k, flows=flows, **kw)
        loss = (dists * weight).sum() + inds.double().sum()
        grads.append(torch.autograd.grad(loss, (q, k, flows)))
    for name, a, b in zip(("qvid", "kvid", "flows"), *grads, strict=True):
        assert_close(b, a, what=f"grad {name}")


@pytest.mark.parametrize(
    ("channels", "ps", "gq_sum", "fractional"),
    [(6, 3, True, True), (6, 3, False, True), (66, 1, True, True), (3, 7, True, False)],
)
def test_backward_channel_tiles(monkeypatch, channels, ps, gq_sum, fractional):
    """Channels in several tiles (4 per tile at ps 3, 64 at ps 1, 1 at ps 7): with the query's
    gradient summed per tile, each tile adds (or, one-pixel patches, stores) its own channels,
    and the positions' gradient (to fractional flows) is the sum over the tiles. Whole-pixel
    flows take the whole-position path."""
    from dnls.ops import _search_triton as kernels

    monkeypatch.setitem(kernels.CONFIG, "bwd_gq_sum", gq_sum)
    shape = (1, 3, channels, 9, 10) if CUDA else (1, 3, channels, 4, 4)
    q = rand_video(shape, seed=27).to(DEVICE).requires_grad_()
    k = rand_video(shape, seed=28).to(DEVICE).requires_grad_()
    g = torch.Generator().manual_seed(29)
    flows = ((torch.rand(shape[0], shape[1], 3, 2, *shape[3:], generator=g) - 0.5) * 3).double()
    if fractional:
        flows = flows.to(DEVICE).requires_grad_()
    else:
        flows = flows.round().long().to(DEVICE)
    kw = dict(ws=3, wt=1, ps=ps, k=3, self_match="anchor")
    inputs = (q, k, flows) if fractional else (q, k)
    grads = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DNLS_BACKEND", backend)
        dists, inds = dnls.search(q, k, flows=flows, **kw)
        loss = (dists * torch.linspace(1, 2, 3, device=DEVICE)).sum() + inds.double().sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for name, a, b in zip(("qvid", "kvid", "flows"), *grads, strict=False):
        assert_close(b, a, what=f"grad {name}")


def assert_cross_grads_match(mp, shape, seed, deterministic, contiguous=False, **kw):
    """The gradients of a weighted cross search of two random videos to both videos equal the
    reference's: float64, or float32 under torch.use_deterministic_algorithms (float64 would
    take the exact reference path there) in the Triton run, with 10x the tolerance; with
    ``contiguous``, the Triton gradients are contiguous."""
    dtype = torch.float32 if deterministic else torch.float64
    q = rand_video(shape, dtype, seed=seed).to(DEVICE).requires_grad_()
    k = rand_video(shape, dtype, seed=seed + 1).to(DEVICE).requires_grad_()
    old = torch.are_deterministic_algorithms_enabled()
    grads = []
    for backend in ("torch", "triton"):
        mp.setenv("DNLS_BACKEND", backend)
        torch.use_deterministic_algorithms(deterministic and backend == "triton")
        try:
            dists, _ = dnls.search(q, k, **kw)
            w = torch.linspace(1, 2, dists.shape[-1], device=DEVICE)
            grads.append(torch.autograd.grad((dists * w).sum(), (q, k)))
        finally:
            torch.use_deterministic_algorithms(old)
    for name, a, b in zip(("qvid", "kvid"), *grads, strict=True):
        assert not contiguous or b.is_contiguous(), f"grad {name} is not contiguous"
        assert_close(b, a, dtype=dtype, what=f"grad {name}", scale=10 if deterministic else 1)


@pytest.mark.parametrize(
    ("kw", "keys", "deterministic"),
    [
        (dict(ws=3, ps=3, k=4), True, False),
        (dict(ws=3, ps=3, k=4), False, False),
        (dict(ws=5, ps=3, k=3, dist="dot", border="zero", nheads=2), True, False),
        (dict(ws=3, ps=2, k=3, dilation=2, stride0=2, self_match="anchor"), True, False),
        (dict(ws=3, ps=3, k=4, wt=1, stride1=2), True, True),
        (dict(ws=3, ps=1, k=3, nheads=2, dist="dot"), True, False),
    ],
)
def test_backward_whole_positions(monkeypatch, kw, keys, deterministic):
    """Whole positions: the first pass takes the results whose key patch lies inside the frame
    at precomputed key offsets, the second the others (near the borders, through the border
    rule); together they equal the reference's gradients, float or fixed point."""
    from dnls.ops import _search_triton as kernels

    monkeypatch.setitem(kernels.CONFIG, "bwd_keys", keys)
    shape = (1, 3, 4, 12, 11) if CUDA else (1, 3, 4, 7, 6)
    assert_cross_grads_match(monkeypatch, shape, 30, deterministic, **kw)


REG = (0, 3, 1, 5, 2, 38)  # a region whose first and last columns are not the frame's


def assert_rows_match(mp, config, shape, seed, levels=0, **kw):
    """Under the kernel settings ``config`` (row or direct kernel), a cross search of two random
    videos equals the reference: distances within tolerance, positions identical. ``levels``
    > 0 (a power of two: every sum exact) quantises the videos to that many values, so that
    many distances tie."""
    from dnls.ops import _search_triton as kernels

    for key, value in config.items():
        mp.setitem(kernels.CONFIG, key, value)
    q = rand_video(shape, seed=seed).to(DEVICE)
    k = rand_video(shape, seed=seed + 1).to(DEVICE)
    if levels:
        q, k = (torch.floor(v * levels) / levels for v in (q, k))
    (d0, i0), (d1, i1) = both(mp, q, k, **kw)
    assert_close(d1, d0, what="dists")
    assert torch.equal(i1, i0)


@pytest.mark.parametrize(
    ("kw", "strip"),
    [
        (dict(ws=3, wt=1, ps=3, k=5), 2),
        (dict(ws=3, ps=2, k=4, dist="dot", self_match="anchor", border="zero", region=REG), 2),
        (dict(ws=3, ps=2, k=4, dist="dot", self_match="anchor", border="zero", region=REG), 1),
        (dict(ws=3, ps=3, k=4, pt=2, dilation=2, self_match="exclude", nheads=2), 2),
        (dict(ws=3, ps=3, k=3, stride1=2, region=(1, 3, 1, 4, 3, 37), start=5, count=50), 2),
        (dict(ws=3, ps=3, k=4, self_match="anchor", border="zero", start=57, count=150), 2),
        (dict(ws=3, ps=3, k=4, self_match="anchor", border="zero", start=57, count=150), 1),
    ],
)
def test_row_kernel_equals_reference(monkeypatch, kw, strip):
    """Frames wide enough for the row kernel (reuse across queries): with stride1 = 1 it takes
    whole rows, its edge blocks walking the union of their lanes' slid windows; with stride1 = 2
    it takes the interior columns and the direct kernel the columns where windows slide. With
    ``strip`` 2 two rows share their patch-row terms where neither window is slid vertically
    (rows of one frame; the rows whose windows slide vertically run one at a time either way,
    and dilation 2 never shares); batches that start or end inside a row leave some lanes of
    either row idle."""
    shape = (2, 3, 4, 9, 150) if CUDA else (1, 3, 2, 5, 40)
    assert_rows_match(monkeypatch, dict(rows_strip=strip), shape, 11, **kw)


@pytest.mark.parametrize(
    ("kw", "strip"),
    [
        (dict(ws=3, ps=3, k=4), 3),
        (dict(ws=3, ps=5, k=3, dist="dot", border="zero", self_match="anchor"), 4),
        (dict(ws=5, ps=4, k=4, start=70, count=300), 4),
        (dict(ws=3, ps=3, k=4, self_match="exclude"), 8),
    ],
)
def test_row_kernel_strips(monkeypatch, kw, strip):
    """Strips of 3, 4 (and 8, more rows than the patch: capped at ps) rows sharing their
    patch-row terms, in frames tall enough for whole strips whose windows are not slid
    vertically, and strips cut by the frame's edges, the window's slide or the batch's ends
    (rows one at a time)."""
    shape = (1, 2, 2, 21, 40) if CUDA else (1, 2, 1, 14, 36)
    assert_rows_match(monkeypatch, dict(rows_strip=strip), shape, 18, **kw)


@pytest.mark.parametrize(
    ("kw", "cout", "strip", "cvec", "nch"),
    [
        (dict(ws=5, ps=3, k=4), 2, 2, 1, 2),
        (dict(ws=5, ps=3, k=4, dist="dot", border="zero", self_match="exclude"), 5, 1, 2, 2),
        (dict(ws=3, wt=1, ps=3, k=3, self_match="exclude", start=33, count=500), 3, 2, 2, 4),
        (dict(ws=5, ps=3, k=4), 0, 2, 2, 2),
    ],
)
def test_row_kernel_channels_outer(monkeypatch, kw, cout, strip, cvec, nch):
    """With the query's values not in registers, blocks whose windows are not slid sideways
    walk each window row channels outermost, ``rows_cout`` displacements at a time (the last
    chunk shorter when it does not divide ws); the edge blocks keep the channel-inner loop.
    With ``rows_cvec`` 2 both loops read two channels per load from channel-blocked copies
    (``nch`` 4: two groups). Same selection, ties and order included."""
    config = dict(rows_qreg=0, rows_cout=cout, rows_strip=strip, rows_cvec=cvec)
    # (on the CPU two frames where the window has one: the interpreter's time is per query)
    frames = 3 if CUDA or kw.get("wt") else 2
    # (on the CPU 6 rows: one strip of 2 whose windows are not slid vertically, 2 slid above
    # and below; 70 columns: one block of 30 whose windows are not slid sideways)
    shape = (1, frames, 3 * nch // 2, 9, 150) if CUDA else (1, frames, nch, 6, 70)
    assert_rows_match(monkeypatch, config, shape, 20, **kw)


@pytest.mark.parametrize(
    ("kw", "nch", "qreg", "blocked"),
    [
        (dict(ws=5, ps=3, k=4), 3, 48, True),
        (dict(ws=5, ps=3, k=4, dist="dot", border="zero", self_match="exclude"), 3, 0, True),
        (dict(ws=3, wt=1, ps=2, k=3, self_match="anchor", start=20, count=300), 3, 48, False),
        (dict(ws=3, ps=3, k=4, border="zero", start=33, count=200), 6, 48, True),
        (dict(ws=3, ps=3, k=4), 5, 48, False),
    ],
)
def test_row_kernel_padded_channels(monkeypatch, kw, nch, qreg, blocked):
    """Channel counts that are not a multiple of ``rows_cvec`` (4): 3 and 6 are padded with zero
    channels to 4 and 8 (at most a third more) and read 4 per load, the query in registers
    (``rows_qreg`` 48) or channels outermost (0); 5 would need 8 and keeps one channel per
    load, and so does an anchored search. ``blocked`` says which path must have run."""
    from dnls.ops import _search_triton as kernels

    copies = []
    real = kernels._channel_blocked
    monkeypatch.setattr(kernels, "_channel_blocked", lambda v, cv: copies.append(cv) or real(v, cv))
    config = dict(rows_qreg=qreg, rows_cout=3, rows_strip=2, rows_cvec=4, rows_cpad=True)
    frames = 3 if kw.get("wt") else 1
    shape = (1, frames, nch, 9, 150) if CUDA else (1, frames, nch, 6, 40)
    assert_rows_match(monkeypatch, config, shape, 23, **kw)
    assert bool(copies) == blocked and all(cv == 4 for cv in copies)


@st.composite
def row_kernel_cases(draw):
    """Searches the row kernel takes (whole positions, no flows, stride0 = 1, ps > 1), with its
    launch settings drawn too: rows per strip, displacements per channels-outer pass, the query
    in registers or not, the channel loop unrolled or not, channels per load."""
    wt = draw(st.integers(0, 1))
    ws = draw(st.integers(2, 5))
    ps = draw(st.integers(2, 5))
    nheads = draw(st.sampled_from([1, 1, 2]))
    h = draw(st.integers(max(ws, ps) + 1, 16 if CUDA else 12))
    w = draw(st.integers(36, 140 if CUDA else 72))
    shape = (1, 2 * wt + 1, nheads * draw(st.integers(1, 2)), h, w)
    nq = shape[1] * h * w
    start = draw(st.integers(0, nq - 1))
    kmax = (2 * wt + 1) * ws * ws - 1
    kw = dict(
        ws=ws,
        wt=wt,
        ps=ps,
        k=draw(st.integers(1, min(kmax, 6))),
        dist=draw(st.sampled_from(["l2", "dot"])),
        self_match=draw(st.sampled_from(["keep", "anchor", "exclude"])),
        border=draw(st.sampled_from(["reflect", "zero"])),
        nheads=nheads,
        start=start,
        # (on the CPU, at most a few block rows: each runs under the interpreter)
        count=draw(st.integers(1, nq - start if CUDA else min(nq - start, 256))),
    )
    config = dict(
        rows_strip=draw(st.integers(1, 4)),
        rows_cout=draw(st.integers(0, 5)),
        rows_qreg=draw(st.sampled_from([0, 48])),
        rows_unroll=draw(st.sampled_from([0, 64])),
        rows_buffer=draw(st.sampled_from([0, 0, 2, 3])),
        rows_cvec=draw(st.sampled_from([1, 2])),
        rows_cpad=draw(st.booleans()),
    )
    return shape, kw, config, draw(st.integers(0, 2**16))


@settings(max_examples=4 if CUDA else 3, deadline=None)
@given(row_kernel_cases())
def test_row_kernel_random_configs(case):
    """Random searches under random launch settings of the row kernel equal the reference (few
    examples: on a GPU each setting compiles its own kernel, tens of seconds)."""
    shape, kw, config, seed = case
    with pytest.MonkeyPatch.context() as mp:
        assert_rows_match(mp, config, shape, seed, **kw)


@pytest.mark.parametrize("kw", [dict(ws=5, ps=3, k=3), dict(ws=4, ps=2, k=4, border="zero")])
def test_row_kernel_narrow_frame(monkeypatch, kw):
    """A frame narrower than one block: the block's windows slide at both edges, and its idle
    lanes reach columns past one reflection (clamped; they are never output)."""
    from dnls.ops import _search_triton as kernels

    monkeypatch.setitem(kernels.CONFIG, "rows_min", 1)
    shape = (1, 3, 2, 7, 6) if CUDA else (1, 1, 1, 5, 5)
    q = rand_video(shape, seed=16).to(DEVICE)
    (d0, i0), (d1, i1) = both(monkeypatch, q, **kw)
    assert_close(d1, d0, what="dists")
    assert torch.equal(i1, i0)


@pytest.mark.parametrize(("skip", "dist"), [(False, "l2"), (True, "dot")])
def test_row_kernel_skips_unkept_candidates(monkeypatch, skip, dist):
    """With ``rows_skip`` (the default) a block skips the insert of a candidate no lane would
    keep; without it every candidate is inserted: the same selection, ties and order included."""
    from dnls.ops import _search_triton as kernels

    monkeypatch.setitem(kernels.CONFIG, "rows_skip", skip)
    shape = (1, 3, 3, 9, 70) if CUDA else (1, 2, 1, 5, 40)
    q = rand_video(shape, seed=17).to(DEVICE)
    kw = dict(ws=3, wt=1 if CUDA else 0, ps=3, k=4, dist=dist, self_match="exclude")
    (d0, i0), (d1, i1) = both(monkeypatch, q, **kw)
    assert_close(d1, d0, what="dists")
    assert torch.equal(i1, i0)


@pytest.mark.parametrize(
    ("kw", "buffer", "strip", "levels"),
    [
        (dict(ws=5, ps=3, k=4), 2, 2, 0),
        (dict(ws=3, wt=1, ps=3, k=3, dist="dot", self_match="exclude"), 4, 1, 0),
        (dict(ws=5, ps=2, k=6, border="zero", self_match="anchor", start=20, count=300), 1, 2, 0),
        (dict(ws=3, wt=1, ps=2, k=5, dist="dot", self_match="exclude"), 3, 2, 4),
        (dict(ws=5, ps=2, k=4, start=9, count=200), 4, 1, 2),
    ],
)
def test_row_kernel_buffered_selection(monkeypatch, kw, buffer, strip, levels):
    """Each lane buffering ``rows_buffer`` candidates below its bound before inserting them:
    the same selection, ties and order included (the buffer is inserted in window order; with
    ``levels``, videos of few values whose distances tie)."""
    shape = (1, 3, 3, 9, 70) if CUDA else (1, 3, 1, 8, 40)
    config = dict(rows_buffer=buffer, rows_strip=strip)
    assert_rows_match(monkeypatch, config, shape, 27, levels, **kw)


def test_row_kernel_buffer_rule(monkeypatch):
    """Unset, the row kernel's buffer follows the window's expected insert rate: 2 slots for
    W3's window (14 of 441 candidates), none for W1s's (14 of 2205) or W4's (10 of 675), none
    where every candidate is kept; a set value wins."""
    from dnls.ops import _search_triton as kernels

    monkeypatch.setitem(kernels.CONFIG, "rows_buffer", None)
    assert [kernels._rows_buffer(k, n) for k, n in ((14, 441), (14, 2205), (10, 675))] == [2, 0, 0]
    assert kernels._rows_buffer(9, 9) == 0
    monkeypatch.setitem(kernels.CONFIG, "rows_buffer", 3)
    assert kernels._rows_buffer(14, 2205) == 3


@pytest.mark.parametrize(
    ("kw", "buffer", "skip"),
    [
        (dict(ws=5, wt=1, ps=1, k=6, dist="dot", nheads=2), 2, False),
        (dict(ws=3, ps=1, k=4, self_match="exclude", border="zero"), 3, False),
        (dict(ws=5, ps=1, k=5, self_match="anchor", start=7, count=40), 0, True),
        (dict(ws=3, wt=1, ps=1, k=4, stride0=2, dist="dot"), 1, False),
        (dict(ws=3, wt=1, ps=2, k=4, stride0=2, dist="dot", stride1=1.5), 0, True),
    ],
)
@pytest.mark.parametrize("levels", [0, 2])
def test_direct_kernel_buffered_selection(monkeypatch, kw, buffer, skip, levels):
    """The direct kernel's selection with a per-lane buffer of ``direct_buffer`` candidates
    (one-pixel patches), or skipping the insert of a candidate no lane keeps (here also at
    fractional positions, 4 warps): the same selection as the reference, ties and order
    included (with ``levels``, videos of few values whose distances tie)."""
    config = dict(direct_buffer=buffer, direct_skip=skip)
    shape = (1, 3, 4, 9, 12) if CUDA else (1, 3, 2, 5, 6)
    assert_rows_match(monkeypatch, config, shape, 29, levels, **kw)


@pytest.mark.parametrize("bx", [32, 64, 128])
def test_row_kernel_widths(monkeypatch, bx):
    """Row-kernel blocks of 32 columns on one warp (the default), 64 on two and 128 on four
    tile the interior columns exactly."""
    from dnls.ops import _search_triton as kernels

    monkeypatch.setitem(kernels.CONFIG, "rows_bx", bx)
    shape = (1, 3, 3, 6, 300) if CUDA else (1, 1, 2, 4, 140)
    q = rand_video(shape, seed=13).to(DEVICE)
    kw = dict(ws=3, wt=1 if CUDA else 0, ps=3, k=4, self_match="exclude")
    (d0, i0), (d1, i1) = both(monkeypatch, q, **kw)
    assert_close(d1, d0, what="dists")
    assert torch.equal(i1, i0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["nan", "overflow"])
@pytest.mark.parametrize(
    ("shape", "kw", "config"),
    [
        # the direct kernel: one-pixel patches (channels in registers), then whole patches
        ((1, 3, 2, 5, 6), dict(ws=3, wt=1, ps=1, k=6, dist="dot", self_match="exclude"), {}),
        ((1, 1, 2, 6, 7), dict(ws=5, ps=3, k=8, self_match="anchor"), {}),
        # the row kernel: the query in registers; channel-blocked copies, channels outermost
        ((1, 1, 3, 5, 24), dict(ws=3, ps=3, k=9), {}),
        ((1, 1, 8, 4, 24), dict(ws=3, ps=3, k=5, dist="dot", border="zero"), dict(rows_qreg=0)),
    ],
)
def test_nonfinite_distances_rank_last(monkeypatch, kind, shape, kw, config):
    """NaN distances and those past float32's range tie after every finite one, in window
    order, and are reported infinitely far: the kernels' selection equals the reference's
    (which tests/test_search.py checks against the oracle), so no slot stays empty."""
    from test_search import nonfinite_video

    from dnls.ops import _search_triton as kernels

    for key, value in config.items():
        monkeypatch.setitem(kernels.CONFIG, key, value)
    vid = nonfinite_video(kind, shape, seed=12).to(DEVICE)
    (d0, i0), (d1, i1) = both(monkeypatch, vid, **kw)
    assert_close(d1, d0, dtype=torch.float32, what="dists", nan_ok=True)
    assert torch.equal(i1, i0)


@pytest.mark.parametrize("ps", [1, 3])
def test_channels_last_views(monkeypatch, ps):
    """Videos whose channels are innermost (as attention layers make them) give the same
    search as contiguous ones; with ps=1 the query's channels sit in registers."""
    shape = (1, 3, 16, 6, 20) if CUDA else (1, 3, 4, 4, 6)
    q = rand_video(shape, seed=14).to(DEVICE)
    k = rand_video(shape, seed=15).to(DEVICE)
    kw = dict(ws=3, wt=1, ps=ps, k=5, dist="dot", nheads=2)
    last = [x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) for x in (q, k)]
    assert last[0].stride(2) == 1
    (d0, i0), (d1, i1) = both(monkeypatch, q, k, **kw)
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    d2, i2 = dnls.search(*last, **kw)
    assert_close(d1, d0, what="dists")
    assert torch.equal(d2, d1) and torch.equal(i2, i1) and torch.equal(i1, i0)


@pytest.mark.parametrize("ps", [1, 3])
@pytest.mark.parametrize("dist", ["l2", "dot"])
def test_deterministic_backward(monkeypatch, dist, ps):
    """Under torch.use_deterministic_algorithms the backward accumulates in fixed point: the
    same bits on every run, and the reference's gradients within float32 tolerance."""
    shape = (1, 3, 2, 16, 14) if CUDA else (1, 3, 1, 5, 5)
    q = rand_video(shape, torch.float32, seed=21).to(DEVICE).requires_grad_()
    g = torch.Generator().manual_seed(22)
    flows = ((torch.rand(shape[0], shape[1], 3, 2, *shape[3:], generator=g) - 0.5) * 3).float()
    flows = flows.to(DEVICE).requires_grad_()
    kw = dict(ws=3, wt=1, ps=ps, k=4, dist=dist)
    old = torch.are_deterministic_algorithms_enabled()
    grads = []
    for backend, deterministic in (("torch", False), ("triton", True), ("triton", True)):
        monkeypatch.setenv("DNLS_BACKEND", backend)
        torch.use_deterministic_algorithms(deterministic)
        try:
            dists, inds = dnls.search(q, flows=flows, **kw)
            loss = (dists * torch.linspace(0, 1, dists.shape[-1], device=DEVICE)).sum()
            grads.append(torch.autograd.grad(loss + inds.sum(), (q, flows)))
        finally:
            torch.use_deterministic_algorithms(old)
    for a, b in zip(grads[1], grads[2], strict=True):
        assert torch.equal(a, b), "deterministic runs differ"
    for name, a, b in zip(("qvid", "flows"), grads[0], grads[1], strict=True):
        assert_close(b, a, dtype=torch.float32, what=f"grad {name}", scale=10)


def test_backward_one_pixel_batches(monkeypatch):
    """One-pixel patches, stride0 2, two heads, a region and batches: each batch's query-side
    gradient is stored pixel by pixel, and the batches add up to the one-shot gradient."""
    shape = (2, 3, 4, 12, 14) if CUDA else (1, 3, 4, 6, 7)
    q = rand_video(shape, seed=23).to(DEVICE).requires_grad_()
    k = rand_video(shape, seed=24).to(DEVICE).requires_grad_()
    kw = dict(ws=3, wt=1, ps=1, k=3, nheads=2, stride0=2, region=(0, 2, 1, 6, 0, 7))
    grid = dnls.query_grid(shape, 2, region=kw["region"])
    grads = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DNLS_BACKEND", backend)
        total = 0
        for start, count in grid.batches(5):
            dists, _ = dnls.search(q, k, start=start, count=count, **kw)
            total = total + (dists * torch.linspace(1, 2, 3, device=DEVICE)).sum()
        grads.append(torch.autograd.grad(total, (q, k)))
    for name, a, b in zip(("qvid", "kvid"), *grads, strict=True):
        assert_close(b, a, what=f"grad {name}")


@pytest.mark.parametrize(
    ("kw", "deterministic"),
    [
        (dict(ws=3, wt=1, ps=1, k=4, dist="dot", nheads=2), False),
        (dict(ws=3, wt=1, ps=1, k=3, self_match="anchor", stride0=2, start=3, count=12), False),
        (dict(ws=3, wt=1, ps=1, k=4, dist="dot", nheads=2), True),
    ],
)
@pytest.mark.parametrize("clast_min", [0, 8])
def test_backward_channels_last_accumulators(monkeypatch, kw, deterministic, clast_min):
    """One-pixel patches with at least ``bwd_clast_min`` channels (0: never) read and
    accumulate channels-last (float or fixed point); the gradients come back contiguous and
    equal the reference's either way."""
    from dnls.ops import _search_triton as kernels

    monkeypatch.setitem(kernels.CONFIG, "bwd_clast_min", clast_min)
    shape = (1, 3, 32, 10, 12) if CUDA else (1, 3, 16, 4, 5)
    assert_cross_grads_match(monkeypatch, shape, 25, deterministic, contiguous=True, **kw)


def test_frames_past_int32_take_the_reference():
    """A frame whose offsets would pass int32 inside the kernels takes the reference path
    (the predicate, on a small video and on a meta tensor of 2^32 elements)."""
    from dnls.ops.search import _int32_frames

    small = torch.empty(1, 1, 1, 3, 8, 8)
    assert _int32_frames(small)
    huge = torch.empty(1, 1, 1, 64, 8192, 8192, device="meta")  # shape and strides only
    assert not _int32_frames(small, huge)
