"""The Triton patch kernels (gather, scatter, wpsum, ifold) against the reference layer,
forward and every gradient, per dtype.

Without a GPU they run on CPU tensors under Triton's interpreter, at tiny sizes; on a GPU the
same tests run on CUDA tensors, larger and with more examples."""

import pytest
import torch
from helpers import assert_close, deterministic, rand_video, regions
from hypothesis import given, settings
from hypothesis import strategies as st

import dnls
from dnls._ref import PatchGeom

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EXAMPLES = 20 if CUDA else 8
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def run_both(monkeypatch, fn, inputs):
    """``fn`` on the reference and on the Triton backend: outputs and input gradients (fp64
    loss weights, the same for both)."""
    results = []
    for name in ("torch", "triton"):
        monkeypatch.setenv("DNLS_BACKEND", name)
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(99)
        loss = sum(
            (o.double() * torch.rand(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
            for o in outs
            if o.requires_grad
        )
        grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad], allow_unused=True)
        results.append((outs, grads))
    return results


def check(results, dtype, what, scale=1.0):
    (o0, g0), (o1, g1) = results
    for i, (a, b) in enumerate(zip(o0, o1, strict=True)):
        assert b.dtype == a.dtype, f"{what} output {i}: dtype {b.dtype} != {a.dtype}"
        assert_close(b, a, dtype=dtype, what=f"{what} output {i}", scale=scale)
    for i, (a, b) in enumerate(zip(g0, g1, strict=True)):
        assert (a is None) == (b is None), f"{what} grad {i}: one is None"
        if a is not None:
            assert_close(b, a, dtype=dtype, what=f"{what} grad {i}", scale=scale)


@st.composite
def patch_cases(draw):
    t = draw(st.integers(1, 3))
    h, w = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    nheads = draw(st.sampled_from([1, 2]))
    c = nheads * draw(st.integers(1, 2))
    b = draw(st.integers(1, 2))
    ps = draw(st.integers(1, 4))
    pt = draw(st.integers(1, t))
    return dict(
        shape=(b, t, c, h, w), nheads=nheads, q=draw(st.integers(1, 6)), k=draw(st.integers(1, 4)),
        geom=dict(ps=ps, pt=pt, dilation=draw(st.integers(1, 2)),
                  border=draw(st.sampled_from(["reflect", "zero"]))),
        fractional=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


def make_inds(case):
    b, t, _, h, w = case["shape"]
    hd = case["nheads"]
    g = torch.Generator().manual_seed(case["seed"])
    size = (b, hd, case["q"], case["k"])
    tt = torch.randint(0, t, size, generator=g)
    if case["fractional"]:
        hh = torch.rand(size, generator=g, dtype=torch.float64) * (h - 1)
        ww = torch.rand(size, generator=g, dtype=torch.float64) * (w - 1)
        return torch.stack([tt.double(), hh, ww], -1).float()
    hh, ww = torch.randint(0, h, size, generator=g), torch.randint(0, w, size, generator=g)
    return torch.stack([tt, hh, ww], -1).int()


@settings(max_examples=EXAMPLES)
@given(patch_cases())
def test_gather_scatter_wpsum(case):
    vid = rand_video(case["shape"], seed=case["seed"]).to(DEVICE)
    inds = make_inds(case).to(DEVICE)
    geom, hd = case["geom"], case["nheads"]
    patches = rand_video((*inds.shape[:4], geom["pt"], case["shape"][2] // hd, geom["ps"],
                          geom["ps"]), seed=case["seed"] + 1).to(DEVICE)  # fmt: skip
    weights = rand_video(inds.shape[:4], seed=case["seed"] + 2).to(DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        check(
            run_both(mp, lambda v, i: dnls.gather(v, i, nheads=hd, **geom), [vid, inds]),
            torch.float64, "gather",
        )  # fmt: skip
        sc = dict(dilation=geom["dilation"], border=geom["border"], nheads=hd)
        check(
            run_both(mp, lambda p: dnls.scatter(p, inds, shape=vid.shape, **sc), [patches]),
            torch.float64, "scatter",
        )  # fmt: skip
        check(
            run_both(
                mp, lambda v, w, i: dnls.wpsum(v, w, i, nheads=hd, **geom), [vid, weights, inds]
            ),
            torch.float64, "wpsum",
        )  # fmt: skip


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_iunfold_ifold(data):
    t = data.draw(st.integers(1, 3))
    h, w = data.draw(st.integers(2, 7)), data.draw(st.integers(2, 7))
    shape = (data.draw(st.integers(1, 2)), t, data.draw(st.integers(1, 3)), h, w)
    ps = data.draw(st.integers(1, 4))
    kw = dict(
        stride=data.draw(st.integers(1, 3)), dilation=data.draw(st.integers(1, 2)),
        region=data.draw(regions(t, h, w)), border=data.draw(st.sampled_from(["reflect", "zero"])),
    )  # fmt: skip
    pt = data.draw(st.integers(1, t))
    total = dnls.query_grid(shape, kw["stride"], kw["region"]).count
    start = data.draw(st.integers(0, total - 1))
    count = data.draw(st.integers(1, total - start))
    vid = rand_video(shape, seed=1).to(DEVICE)
    patches = rand_video((shape[0], count, pt, shape[2], ps, ps), seed=2).to(DEVICE)
    from dnls.ops import _patches_triton

    # the fold kernel's channels per program (all, or blocks of 1 or 2: a partial last block),
    # and its unrolled loop for programs with no reflected source, or not (its rows per
    # program: the default here, test_fold_rows_per_program below)
    block_c = data.draw(st.sampled_from([None, 1, 2]))
    unroll = data.draw(st.booleans())
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_patches_triton.FOLD_CONFIG, "block_c", block_c)
        mp.setitem(_patches_triton.FOLD_CONFIG, "unroll", unroll)
        check(
            run_both(
                mp, lambda v: dnls.iunfold(v, ps=ps, pt=pt, start=start, count=count, **kw), [vid]
            ),
            torch.float64, "iunfold",
        )  # fmt: skip
        check(
            run_both(mp, lambda p: dnls.ifold(p, shape=shape, start=start, **kw), [patches]),
            torch.float64, "ifold",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "ps", "stride"),
    [((1, 1, 1, 2, 2), 3, 1), ((1, 1, 2, 3, 3), 3, 1), ((1, 2, 3, 5, 6), 3, 1),
     ((1, 1, 1, 3, 3), 3, 2), ((1, 1, 1, 4, 7), 5, 1)],
)  # fmt: skip
def test_ifold_reflects_at_every_edge(monkeypatch, shape, ps, stride):
    """Every pixel near an edge sums the patch elements reflected onto it, at the right and
    bottom edges as at the left and top (the fold kernel once dropped those reflected off the
    right edge, in its sums and counts, and so in iunfold's gradient): ifold of the whole grid
    and iunfold's gradient against the reference."""
    count = dnls.query_grid(shape, stride).count
    patches = rand_video((shape[0], count, 1, shape[2], ps, ps), seed=12).to(DEVICE)
    fn = lambda p: dnls.ifold(p, shape=shape, stride=stride)  # noqa: E731
    check(run_both(monkeypatch, fn, [patches]), torch.float64, "ifold")
    vid = rand_video(shape, seed=13).to(DEVICE)
    fn = lambda v: dnls.iunfold(v, ps=ps, stride=stride)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid]), torch.float64, "iunfold")


@pytest.mark.parametrize(
    ("rows", "shape", "kw"),
    # 10 rows in blocks of 4: a partial last block; blocks of 4 pixels: with reflection, the
    # programs at the frame's edges loop over their rows, the one inside unrolls
    [(4, (1, 1, 1, 10, 11), dict(ps=3)),
     (2, (1, 2, 2, 10, 6), dict(ps=3, pt=2, stride=2, dilation=2, border="zero",
                                region=(0, 2, 1, 9, 0, 6)))],
)  # fmt: skip
def test_fold_rows_per_program(monkeypatch, rows, shape, kw):
    """The fold kernel's programs of several rows, in both loops (unrolled: the rows' pixels at
    once; else the rows one by one), with reflection, time, strides, dilation, a region and a
    height the rows do not divide: ifold against the reference, forward and gradient."""
    from dnls.ops import _patches_triton

    monkeypatch.setitem(_patches_triton.FOLD_CONFIG, "rows", rows)
    monkeypatch.setitem(_patches_triton.FOLD_CONFIG, "block_x", 4)
    ps, pt = kw["ps"], kw.get("pt", 1)
    geom = {k: v for k, v in kw.items() if k != "ps" and k != "pt"}
    count = dnls.query_grid(shape, geom.get("stride", 1), geom.get("region")).count
    patches = rand_video((shape[0], count, pt, shape[2], ps, ps), seed=14).to(DEVICE)
    for unroll in (True, False):
        monkeypatch.setitem(_patches_triton.FOLD_CONFIG, "unroll", unroll)
        fn = lambda p: dnls.ifold(p, shape=shape, **geom)  # noqa: E731
        check(run_both(monkeypatch, fn, [patches]), torch.float64, f"ifold unroll={unroll}")


def test_fold_unrolls_small_patches_only(monkeypatch):
    """The fold kernel unrolls up to FOLD_UNROLL_MAX loads per pixel (7 x 7, 3 x 3 x 11 and
    9 x 9 patches), not larger ones (their compile time grows to minutes), nor when told not to."""
    from dnls.ops import _patches_triton

    monkeypatch.setitem(_patches_triton.FOLD_CONFIG, "unroll", True)
    assert [_patches_triton._fold_unrolled(pt, ps) for pt, ps in ((1, 7), (11, 3), (1, 9))] == [
        True, True, True,
    ]  # fmt: skip
    assert not any(_patches_triton._fold_unrolled(pt, ps) for pt, ps in ((1, 11), (3, 7)))
    monkeypatch.setitem(_patches_triton.FOLD_CONFIG, "unroll", False)
    assert not _patches_triton._fold_unrolled(1, 3)


def test_ifold_large_reach_falls_back(monkeypatch):
    """Patches wider than the frame (more than one reflection) take the reference path."""
    patches = rand_video((1, 6, 1, 2, 5, 5), seed=4).to(DEVICE)
    kw = dict(shape=(1, 1, 2, 2, 3), dilation=2)
    results = run_both(monkeypatch, lambda p: dnls.ifold(p, **kw), [patches])
    check(results, torch.float64, "ifold")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fractional", [False, True])
def test_dtypes(monkeypatch, dtype, fractional):
    shape = (2, 3, 8, 24, 20) if CUDA else (1, 2, 4, 5, 6)
    case = dict(shape=shape, nheads=2, q=7, k=3, fractional=fractional, seed=5)
    vid = rand_video(shape, dtype, seed=6).to(DEVICE)
    inds = make_inds(case).to(DEVICE)
    weights = rand_video(inds.shape[:4], dtype, seed=7).to(DEVICE)
    geom = dict(ps=3, pt=2, dilation=1, border="reflect")
    fn = lambda v, w, i: dnls.wpsum(v, w, i, nheads=2, **geom)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid, weights, inds]), dtype, f"wpsum {dtype}", scale=10)
    fn = lambda v, i: dnls.gather(v, i, nheads=2, **geom)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid, inds]), dtype, f"gather {dtype}", scale=10)
    patches = rand_video((shape[0], 9, 2, shape[2], 3, 3), dtype, seed=8).to(DEVICE)
    fn = lambda p: dnls.ifold(p, shape=shape, stride=2, start=1)  # noqa: E731
    check(run_both(monkeypatch, fn, [patches]), dtype, f"ifold {dtype}", scale=10)


@pytest.mark.parametrize("launch", [(32, 4), (8, 4), (16, 8)])
def test_gather_position_gradient_launches(monkeypatch, launch):
    """gather's position gradient (fractional positions) at launches of its kernel whose
    programs end past the last patch (42 patches): the same as the reference's."""
    from dnls.ops import _patches_triton

    monkeypatch.setitem(_patches_triton.CONFIG, "dpos", launch)
    shape = (1, 2, 4, 9, 8)
    case = dict(shape=shape, nheads=2, q=7, k=3, fractional=True, seed=23)
    vid = rand_video(shape, seed=24).to(DEVICE)
    inds = make_inds(case).to(DEVICE)
    geom = dict(ps=3, pt=2, dilation=1, border="reflect")
    fn = lambda v, i: dnls.gather(v, i, nheads=2, **geom)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid, inds]), torch.float64, "gather")


@pytest.mark.parametrize("tile", [None, (4, 16, 4), "anchors"])
@pytest.mark.parametrize("fractional", [False, True])
def test_deterministic_mode(monkeypatch, tile, fractional):
    """Under torch.use_deterministic_algorithms the kernels that add with atomics (scatter's
    flat and tile kernels, wpsum's backward) add fixed-point values into int64, and scatter by
    anchors folds its sums, with no atomics: repeated runs give the same bits, and the results
    equal the reference's."""
    use_scatter(monkeypatch, tile)
    shape = (1, 2, 3, 16, 16) if CUDA else (1, 2, 2, 5, 6)
    vid = rand_video(shape, torch.float32, seed=9).to(DEVICE)
    case = dict(shape=shape, nheads=1, q=30, k=4, fractional=fractional, seed=10)
    inds = make_inds(case).to(DEVICE)
    weights = rand_video(inds.shape[:4], torch.float32, seed=11).to(DEVICE)
    patches = rand_video((*inds.shape[:4], 2, shape[2], 3, 3), torch.float32, seed=12).to(DEVICE)
    geom = dict(ps=3, pt=2, border="reflect")

    def run():
        v = vid.clone().requires_grad_()
        w = weights.clone().requires_grad_()
        out = dnls.wpsum(v, w, inds, **geom)
        grads = torch.autograd.grad((out * out.detach().flip(-1)).sum(), (v, w))
        sums = dnls.scatter(patches, inds, shape=shape, dilation=1, border="reflect")
        return (*grads, *sums)

    with deterministic():
        monkeypatch.setenv("DNLS_BACKEND", "triton")
        runs = [run(), run()]
        monkeypatch.setenv("DNLS_BACKEND", "torch")
        ref = run()
    names = ("wpsum's video gradient", "wpsum's weight gradient", "scatter", "scatter's counts")
    for name, a, b, r in zip(names, *runs, ref, strict=True):
        assert torch.equal(a, b), f"{name}: two runs differ"
        assert_close(a, r, dtype=torch.float32, what=f"{name} (deterministic)")


@settings(max_examples=EXAMPLES, deadline=None)
@given(patch_cases())
def test_deterministic_random(case):
    """The fixed-point mode over random configurations (float32): scatter and wpsum's
    gradients equal the reference's, and a second run gives the same bits."""
    vid = rand_video(case["shape"], torch.float32, seed=case["seed"]).to(DEVICE)
    inds = make_inds(case).to(DEVICE)
    geom, hd = case["geom"], case["nheads"]
    patches = rand_video((*inds.shape[:4], geom["pt"], case["shape"][2] // hd, geom["ps"],
                          geom["ps"]), torch.float32, seed=case["seed"] + 1).to(DEVICE)  # fmt: skip
    weights = rand_video(inds.shape[:4], torch.float32, seed=case["seed"] + 2).to(DEVICE)
    sc = dict(dilation=geom["dilation"], border=geom["border"], nheads=hd)
    with deterministic():
        with pytest.MonkeyPatch.context() as mp:
            fn = lambda p: dnls.scatter(p, inds, shape=vid.shape, **sc)  # noqa: E731
            check(run_both(mp, fn, [patches]), torch.float32, "scatter (deterministic)")
            fn = lambda v, w, i: dnls.wpsum(v, w, i, nheads=hd, **geom)  # noqa: E731
            runs = [run_both(mp, fn, [vid, weights, inds]) for _ in range(2)]
        check(runs[0], torch.float32, "wpsum (deterministic)", scale=10)
        for a, b in zip(runs[0][1][1], runs[1][1][1], strict=True):
            assert a is None or torch.equal(a, b), "wpsum's gradients differ between two runs"


def test_deterministic_float64_takes_the_reference(monkeypatch):
    """Float64 sums under deterministic algorithms are the reference's (its deterministic
    index_add_), not a 64-bit fixed point: the same bits as the reference backend."""
    shape = (1, 1, 2, 5, 5)
    case = dict(shape=shape, nheads=1, q=6, k=3, fractional=False, seed=15)
    inds = make_inds(case).to(DEVICE)
    patches = rand_video((1, 1, 6, 3, 1, 2, 3, 3), torch.float64, seed=16).to(DEVICE)
    outs = []
    with deterministic():
        for name in ("triton", "torch"):
            monkeypatch.setenv("DNLS_BACKEND", name)
            outs.append(dnls.scatter(patches, inds, shape=shape)[0])
    assert torch.equal(outs[0], outs[1])


def test_deterministic_mode_needs_finite_values(monkeypatch):
    """Fixed-point sums need a bound on their terms: a value that is not finite is a
    ValueError naming the input, under deterministic algorithms only."""
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    shape = (1, 1, 1, 5, 5)
    case = dict(shape=shape, nheads=1, q=3, k=2, fractional=False, seed=13)
    inds = make_inds(case).to(DEVICE)
    patches = rand_video((1, 1, 3, 2, 1, 1, 3, 3), torch.float32, seed=14).to(DEVICE)
    patches[0, 0, 1, 1, 0, 0, 1, 1] = float("inf")
    assert torch.isinf(dnls.scatter(patches, inds, shape=shape)[0]).any()
    with deterministic(), pytest.raises(ValueError, match="patches must be finite"):
        dnls.scatter(patches, inds, shape=shape)


def test_channels_last_layout(monkeypatch):
    """Videos with many channels are read and accumulated channels-last (and iunfold takes its
    tile kernel); force that at a tiny size and compare with the reference."""
    from dnls.ops import _patches_triton

    monkeypatch.setattr(_patches_triton, "CHANNELS_LAST_MIN", 1)
    shape = (1, 2, 3, 5, 6)
    case = dict(shape=shape, nheads=1, q=5, k=3, fractional=True, seed=12)
    vid = rand_video(shape, seed=13).to(DEVICE)
    inds = make_inds(case).to(DEVICE)
    weights = rand_video(inds.shape[:4], seed=14).to(DEVICE)
    geom = dict(ps=3, pt=2, dilation=1, border="reflect")
    fn = lambda v, w, i: dnls.wpsum(v, w, i, **geom)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid, weights, inds]), torch.float64, "wpsum")
    fn = lambda v, i: dnls.gather(v, i, **geom)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid, inds]), torch.float64, "gather")
    fn = lambda v: dnls.iunfold(v, stride=2, region=(0, 2, 1, 5, 0, 6), start=1, **geom)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid]), torch.float64, "iunfold (tile kernel)")


def use_scatter(mp, kind):
    """How scatter (and wpsum's video gradient) add at whole positions: ``None`` the flat
    kernel, a tuple scatter's tile kernel at that tile, ``"anchors"`` scatter by anchors (both
    ops) where it applies, whatever the patch size (:func:`_scatter_anchors`, else the flat
    kernel)."""
    from dnls.ops import _patches_triton

    anchors = kind == "anchors"
    mp.setitem(_patches_triton.CONFIG, "scatter_tile", None if anchors else kind)
    for op in ("scatter_anchors", "wpsum_bwd_anchors"):
        mp.setitem(_patches_triton.CONFIG, op, (2, 4, 4) if anchors else None)
    if anchors:  # every patch size, not only those the rule picks
        mp.setattr(_patches_triton, "_by_anchors", lambda geom, e, weighted=False: True)


def use_staged(mp, cfg, last=False):
    """Run gather and wpsum through the staged kernel at ``cfg`` (under the interpreter and on
    CUDA); ``last``: every video counts as many-channelled (read channels-last)."""
    from dnls.ops import _patches_triton

    if last:
        mp.setattr(_patches_triton, "CHANNELS_LAST_MIN", 1)
    for op in ("gather", "wpsum"):
        name = op + ("_last" if last else "")
        mp.setitem(_patches_triton.STAGED_INTERPRET, name, cfg)
        mp.setitem(_patches_triton.CONFIG, f"staged_{name}", cfg)


@pytest.mark.parametrize(
    "cfg",
    [("region", 4, 2, 16, 16, 4096, 4), ("region", 4, 2, 16, 9, 64, 4),
     ("interior", 4, 2, 16, 9, 64, 4), ("region", 4, 1, 32, 16, 4096, 4),
     ("flat", 4, 2, 16, 9, 64, 4), ("flatpix", 4, 2, 16, 9, 64, 4),
     ("rows", 4, 2, 16, 9, 64, 4), ("rowspix", 8, 4, 4, 9, 64, 4), None],
)  # fmt: skip
@pytest.mark.parametrize("central", [False, True])
@pytest.mark.parametrize("last", [False, True])
def test_staged_modes(monkeypatch, cfg, central, last):
    """gather and wpsum at whole positions through the staged kernel: a region every tile's box
    fits in (the staged path, except tiles that span two slices), one no box fits in (the
    direct path), the interior mode (tiles inside the frame skip the border rule; "flat": such
    a tile's output is written as flat runs, addresses from lookup tables; "flatpix": read
    channels-last, pixel by pixel, stored through a table; "rows" / "rowspix", wpsum's (gather
    takes them as interior): each patch read in chunks of block_e elements, kb queries at a
    time, in the patch's order or pixel by pixel, chunks that end inside the patch or past
    it), and without
    the staged kernel (the ops' direct kernels); positions over the whole frame or only where
    every patch lies inside it. ``last``: the video read channels-last (many channels), where
    the region modes take the direct kernels."""
    use_staged(monkeypatch, cfg, last)
    shape = (2, 2, 4, 12, 11)
    case = dict(shape=shape, nheads=2, q=9, k=5, fractional=False, seed=15)
    vid = rand_video(shape, seed=16).to(DEVICE)
    inds = make_inds(case)
    if central:  # frame 0, rows and columns 2..8: a pt 2, ps 3, dilation 2 patch stays inside
        inds[..., 0] = 0
        inds[..., 1:] = inds[..., 1:] % 7 + 2
    inds = inds.to(DEVICE)
    weights = rand_video(inds.shape[:4], seed=17).to(DEVICE)
    # float32 too: the flat pass packs each weight with its patch's offset (float accumulation)
    for dtype in (torch.float64, torch.float32):
        v, wt = vid.to(dtype), weights.to(dtype)
        for border in ("reflect", "zero"):
            geom = dict(ps=3, pt=2, dilation=2, border=border)
            fn = lambda v, w, i: dnls.wpsum(v, w, i, nheads=2, **geom)  # noqa: E731, B023
            check(run_both(monkeypatch, fn, [v, wt, inds]), dtype, "wpsum")
            fn = lambda v, i: dnls.gather(v, i, nheads=2, **geom)  # noqa: E731, B023
            check(run_both(monkeypatch, fn, [v, inds]), dtype, "gather")


@st.composite
def staged_cases(draw):
    """A staged-kernel configuration and a problem where many tiles lie inside the frame."""
    ps = draw(st.integers(1, 4))
    dil = draw(st.integers(1, 2))
    reach = (ps // 2) * dil
    h, w = (reach + ps * dil + draw(st.integers(1, 6)) for _ in range(2))
    t = draw(st.integers(1, 3))
    nheads = draw(st.sampled_from([1, 2]))
    mode = draw(st.sampled_from(["interior", "flat", "flatpix", "region", "rows", "rowspix"]))
    block_q = draw(st.sampled_from([1, 2, 4]))
    kb = draw(st.sampled_from([1, 2, 4]))
    block_e = draw(st.sampled_from([4, 16, 32]))
    cfg = (mode, block_q, kb, block_e, 9, draw(st.sampled_from([64, 256])), 4)
    return dict(
        shape=(draw(st.integers(1, 2)), t, nheads * draw(st.integers(1, 3)), h, w),
        nheads=nheads, q=draw(st.integers(1, 9)), k=draw(st.integers(1, 5)),
        geom=dict(ps=ps, pt=draw(st.integers(1, t)), dilation=dil,
                  border=draw(st.sampled_from(["reflect", "zero"]))),
        cfg=cfg, last=draw(st.booleans()), central=draw(st.floats(0.0, 1.0)),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


@settings(max_examples=EXAMPLES, deadline=None)
@given(staged_cases())
def test_staged_random(case):
    """The staged kernel over random configurations (mode, tile sizes, channels-first or
    -last, dtype) and problems whose positions mostly keep the patches inside the frame: gather
    and wpsum, outputs and gradients, equal the reference's."""

    b, t, c, h, w = case["shape"]
    geom, hd = case["geom"], case["nheads"]
    g = torch.Generator().manual_seed(case["seed"])
    size = (b, hd, case["q"], case["k"])
    reach = (geom["ps"] // 2) * geom["dilation"]
    span = (geom["ps"] - 1) * geom["dilation"]
    tt = torch.randint(0, t - geom["pt"] + 1, size, generator=g)
    yy = torch.randint(reach, h - span + reach, size, generator=g)
    xx = torch.randint(reach, w - span + reach, size, generator=g)
    stray = torch.rand(size, generator=g) > case["central"]  # anywhere in the frame
    yy = torch.where(stray, torch.randint(0, h, size, generator=g), yy)
    xx = torch.where(stray, torch.randint(0, w, size, generator=g), xx)
    inds = torch.stack([tt, yy, xx], -1).int().to(DEVICE)
    dtype = case["dtype"]
    vid = rand_video(case["shape"], dtype, seed=case["seed"] + 1).to(DEVICE)
    weights = rand_video(size, dtype, seed=case["seed"] + 2).to(DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        use_staged(mp, case["cfg"], case["last"])
        fn = lambda v, i: dnls.gather(v, i, nheads=hd, **geom)  # noqa: E731
        check(run_both(mp, fn, [vid, inds]), dtype, f"gather {dtype}", scale=10)
        fn = lambda v, wt, i: dnls.wpsum(v, wt, i, nheads=hd, **geom)  # noqa: E731
        check(run_both(mp, fn, [vid, weights, inds]), dtype, f"wpsum {dtype}", scale=10)


@pytest.mark.parametrize(
    ("cfg", "scatter"),
    [
        (("interior", 4, 2, 16, 9, 64, 4), None),
        (("flat", 4, 2, 16, 9, 64, 4), "anchors"),
        (("flatpix", 4, 2, 16, 9, 64, 4), None),
        (("rows", 4, 2, 16, 9, 64, 4), None),
        (("rowspix", 4, 2, 16, 9, 64, 4), None),
    ],
)
def test_wide_offsets(monkeypatch, cfg, scatter):
    """The kernels' 64-bit addressing (taken for tensors of 2^31 elements or more), forced on
    tiny tensors: gather, wpsum and scatter (flat, or by anchors), staged (most
    tiles inside the frame) and direct, forward and gradients, equal the reference's."""
    from dnls.ops import _patches_triton

    modes = _patches_triton._modes
    monkeypatch.setattr(_patches_triton, "_modes", lambda *a: {**modes(*a), "I64": True})
    use_staged(monkeypatch, cfg)
    use_scatter(monkeypatch, scatter)
    shape = (2, 2, 4, 12, 11)
    case = dict(shape=shape, nheads=2, q=9, k=5, fractional=False, seed=19)
    vid = rand_video(shape, seed=20).to(DEVICE)
    inds = make_inds(case)
    inds[..., 0] = 0
    inds[..., 1:] = inds[..., 1:] % 7 + 2
    inds[0, 0, -1, -1, 1:] = 0  # one tile reaches past the frame's corner
    inds = inds.to(DEVICE)
    weights = rand_video(inds.shape[:4], seed=21).to(DEVICE)
    geom = dict(ps=3, pt=2, dilation=2, border="reflect")
    fn = lambda v, w, i: dnls.wpsum(v, w, i, nheads=2, **geom)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid, weights, inds]), torch.float64, "wpsum")
    fn = lambda v, i: dnls.gather(v, i, nheads=2, **geom)  # noqa: E731
    check(run_both(monkeypatch, fn, [vid, inds]), torch.float64, "gather")


@pytest.mark.parametrize(
    ("dilation", "last", "tile"),
    [(1, False, (4, 16, 4)), (2, False, (4, 16, 4)), (1, True, (4, 16, 4)), (1, True, (4, 2, 4)),
     (2, False, (4, 2, 4)), (2, False, None), (2, False, "anchors"), (1, True, "anchors")],
)  # fmt: skip
def test_tiles_inside_and_at_the_border(monkeypatch, dilation, last, tile):
    """Whole positions: scatter's tile kernel (or, with ``tile`` None, its flat kernel) and
    wpsum's backward address the patches of a program by offsets where they all lie inside the
    video, else through the border rule (most positions are inside, a few at the edges, so both
    kinds of program run), channels-first or -last, in chunks of 16 of a patch's 54
    elements (the last one masked) or of 2 (none masked); ``"anchors"``: both add each
    position's sum through the border rule. Outputs and gradients equal the reference's."""
    from dnls.ops import _patches_triton

    use_scatter(monkeypatch, tile)
    if last:
        monkeypatch.setattr(_patches_triton, "CHANNELS_LAST_MIN", 1)
    b, t, c, h, w = shape = (1, 3, 3, 14, 15)
    g = torch.Generator().manual_seed(40)
    size = (b, 1, 24, 3)
    reach = dilation
    tt = torch.randint(0, t - 1, size, generator=g)
    yy = torch.randint(reach, h - reach, size, generator=g)
    xx = torch.randint(reach, w - reach, size, generator=g)
    yy[0, 0, -2:] = 0  # the last programs reach past the frame's top-left corner
    xx[0, 0, -1] = w - 1
    inds = torch.stack([tt, yy, xx], -1).int().to(DEVICE)
    patches = rand_video((*size, 2, c, 3, 3), seed=41).to(DEVICE)
    vid = rand_video(shape, seed=42).to(DEVICE)
    weights = rand_video(size, seed=43).to(DEVICE)
    for border in ("reflect", "zero"):
        sc = dict(dilation=dilation, border=border)
        fn = lambda p: dnls.scatter(p, inds, shape=shape, **sc)  # noqa: E731, B023
        check(run_both(monkeypatch, fn, [patches]), torch.float64, "scatter")
        fn = lambda v, w: dnls.wpsum(v, w, inds, ps=3, pt=2, **sc)  # noqa: E731, B023
        check(run_both(monkeypatch, fn, [vid, weights]), torch.float64, "wpsum")


@st.composite
def pooled_cases(draw):
    """Whole positions drawn from a few (so that many entries share a position), some at the
    frame's edges; a launch of scatter by anchors; a dtype."""
    case = draw(patch_cases())
    return dict(
        case, fractional=False, pool=draw(st.integers(1, 4)),
        launch=(draw(st.sampled_from([1, 2, 4])), draw(st.integers(1, 9)), 4),
        dtype=draw(st.sampled_from(DTYPES)),
    )  # fmt: skip


def pooled_inputs(case, q, k):
    """The inputs of a pooled case (:func:`pooled_cases`) with ``q`` queries of ``k`` entries:
    positions drawn from its pool, a video, weights and patches of its dtype, and scatter's
    keywords."""
    b, t, c, h, w = case["shape"]
    geom, hd = case["geom"], case["nheads"]
    g = torch.Generator().manual_seed(case["seed"])
    size = (b, hd, q, k)
    pool = torch.stack([torch.randint(0, t - geom["pt"] + 1, (case["pool"],), generator=g),
                        torch.randint(0, h, (case["pool"],), generator=g),
                        torch.randint(0, w, (case["pool"],), generator=g)], -1)  # fmt: skip
    inds = pool[torch.randint(0, case["pool"], size, generator=g)].int().to(DEVICE)
    dtype = case["dtype"]
    vid = rand_video(case["shape"], dtype, seed=case["seed"] + 1).to(DEVICE)
    weights = rand_video(size, dtype, seed=case["seed"] + 2).to(DEVICE)
    patches = rand_video((*size, geom["pt"], c // hd, geom["ps"], geom["ps"]), dtype,
                         seed=case["seed"] + 3).to(DEVICE)  # fmt: skip
    sc = dict(dilation=geom["dilation"], border=geom["border"], nheads=hd)
    return inds, vid, weights, patches, sc


def spy_anchors(mp):
    """Record, per call of scatter by anchors, whether it applied (returned a video)."""
    from dnls.ops import _patches_triton

    ran = []
    inner = _patches_triton._scatter_anchors

    def spy(*args, **kwargs):
        out = inner(*args, **kwargs)
        ran.append(out is not None)
        return out

    mp.setattr(_patches_triton, "_scatter_anchors", spy)
    return ran


def spy_folds(mp):
    """Record, per call of the fold kernels' launcher, 1."""
    from dnls.ops import _patches_triton

    seen = []
    inner = _patches_triton.fold

    def spy(*args, **kwargs):
        seen.append(1)
        return inner(*args, **kwargs)

    mp.setattr(_patches_triton, "fold", spy)
    return seen


@settings(max_examples=EXAMPLES, deadline=None)
@given(pooled_cases(), st.booleans(), st.booleans(), st.booleans())
def test_anchors_random(case, wide, flush, stable):
    """scatter by anchors over random configurations, positions with many repeats (so that
    the box that holds them has fewer pixels than there are entries, and the path applies
    wherever ifold's kernel covers the geometry) and launches, with 32- or 64-bit indices, the
    sums folded or (``flush``, patches wider than a pixel) added into the video with atomics,
    the entries grouped by a stable sort or (folded, not ``stable``) a counting sort: scatter,
    its counts, gather's video gradient (a scatter) and wpsum's gradients equal the
    reference's, per dtype. Under deterministic algorithms the sums are sorted stably and
    folded, whatever the settings: two runs give the same bits."""
    from dnls.ops import _patches_triton

    b, t, c, h, w = case["shape"]
    geom, hd, dtype = case["geom"], case["nheads"], case["dtype"]
    inds, vid, weights, patches, sc = pooled_inputs(case, max(case["q"], 3), case["k"] + 4)
    # the box: the positions' bounds
    box = (inds.amax((0, 1, 2, 3)) - inds.amin((0, 1, 2, 3)) + 1).prod().item()
    geometry = PatchGeom(geom["ps"], geom["pt"], geom["dilation"], geom["border"])
    applies = b * hd * box <= inds.numel() // 3 and _patches_triton.fold_supported(
        (b * hd, t, c // hd, h, w), geometry
    )
    with pytest.MonkeyPatch.context() as mp:
        use_scatter(mp, "anchors")
        mp.setattr(_patches_triton, "ANCHORS_INTERPRET", case["launch"])
        mp.setitem(_patches_triton.CONFIG, "scatter_anchors", case["launch"])
        mp.setitem(_patches_triton.CONFIG, "wpsum_bwd_anchors", case["launch"])
        mp.setitem(_patches_triton.CONFIG, "anchors_flush", flush)
        mp.setitem(_patches_triton.CONFIG, "anchors_stable", stable)
        if wide:
            mp.setattr(_patches_triton, "_wide", lambda size: True)
        ran = spy_anchors(mp)
        folds = spy_folds(mp)
        fn = lambda p: dnls.scatter(p, inds, shape=vid.shape, **sc)  # noqa: E731
        check(run_both(mp, fn, [patches]), dtype, f"scatter {dtype}", scale=10)
        fn = lambda v: dnls.gather(v, inds, **geom, nheads=hd)  # noqa: E731
        check(run_both(mp, fn, [vid]), dtype, f"gather {dtype}", scale=10)
        fn = lambda v, wt: dnls.wpsum(v, wt, inds, nheads=hd, **geom)  # noqa: E731
        check(run_both(mp, fn, [vid, weights]), dtype, f"wpsum {dtype}", scale=10)
        assert len(ran) == 3, ran  # scatter with its counts, gather's and wpsum's backward
        assert all(r == applies for r in ran), f"by anchors: {ran}, expected {applies}"
        folded = applies and not (flush and geom["ps"] > 1)  # (one-pixel patches fold)
        assert len(folds) == (3 if folded else 0), f"folds: {folds}"
        folds.clear()
        mp.setenv("DNLS_BACKEND", "triton")
        with deterministic():
            runs = [dnls.scatter(patches, inds, shape=vid.shape, **sc) for _ in range(2)]
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b), "scatter by anchors: two runs differ"
        # (float64 takes the reference there: its index_add_ is deterministic then)
        folds_expected = [1, 1] if applies and dtype != torch.float64 else []
        assert folds == folds_expected, f"folds under deterministic: {folds}"


def test_anchors_box(monkeypatch):
    """Fewer entries than the video has pixels, but their positions within a box of as many
    pixels: scatter by anchors sums over that box (its bounds read back to the host), and
    scatter and its counts equal the reference's."""
    use_scatter(monkeypatch, "anchors")
    ran = spy_anchors(monkeypatch)
    shape = (1, 2, 3, 12, 12)  # 288 pixels
    g = torch.Generator().manual_seed(8)
    size = (1, 1, 10, 4)  # 40 entries
    inds = torch.stack([torch.randint(0, 2, size, generator=g),
                        torch.randint(3, 7, size, generator=g),
                        torch.randint(4, 9, size, generator=g)], -1)  # fmt: skip
    inds[0, 0, 0, 0] = torch.tensor([0, 3, 4])
    inds[0, 0, 0, 1] = torch.tensor([1, 6, 8])  # the box: 2 x 4 x 5 = 40 pixels
    inds = inds.int().to(DEVICE)
    patches = rand_video((*size, 1, 3, 5, 5), seed=9).to(DEVICE)
    for border in ("reflect", "zero"):
        fn = lambda p: dnls.scatter(p, inds, shape=shape, border=border)  # noqa: E731, B023
        check(run_both(monkeypatch, fn, [patches]), torch.float64, "scatter")
    assert ran == [True] * 2, ran  # (scatter and its counts in one pass, per border)


def check_at_search(mp, shape, seed, ps, **search):
    """scatter of random patches, and wpsum (forward and gradients), at the outputs of a search
    (keywords ``search``) of a random video of ``shape`` (float64): each equals the
    reference's."""
    vid = rand_video(shape, seed=seed).to(DEVICE)
    _, inds = dnls.search(vid, ps=ps, **search)
    patches = rand_video((*inds.shape[:4], 1, shape[2], ps, ps), seed=seed + 1).to(DEVICE)
    fn = lambda p: dnls.scatter(p, inds, shape=shape)  # noqa: E731
    check(run_both(mp, fn, [patches]), torch.float64, "scatter")
    weights = rand_video(inds.shape[:4], seed=seed + 2).to(DEVICE)
    fn = lambda v, w: dnls.wpsum(v, w, inds, ps=ps)  # noqa: E731
    check(run_both(mp, fn, [vid, weights]), torch.float64, "wpsum")


def test_anchors_search_box(monkeypatch):
    """scatter by anchors of a search's outputs (a batch of its queries) sums over the box the
    search recorded from its geometry, with no read-back of the positions: scatter, its
    counts, gather's and wpsum's backward equal the reference's."""
    from dnls import _checks

    use_scatter(monkeypatch, "anchors")
    ran = spy_anchors(monkeypatch)
    boxes = []
    known_box = _checks.known_box

    def spy(inds):
        box = known_box(inds)
        boxes.append(box)
        return box

    monkeypatch.setattr(_checks, "known_box", spy)
    check_at_search(monkeypatch, (1, 3, 3, 14, 12), 12, ws=3, wt=1, ps=3, k=6, start=40, count=90)
    assert ran == [True] * 2, ran  # scatter with its counts, wpsum's backward
    assert len(boxes) == 2 and all(b is not None for b in boxes), boxes


def test_anchors_rule_at_one_pixel(monkeypatch):
    """At the default settings, one-pixel patches of 64 channels (a search's outputs) are
    scattered by anchors with their sums folded, and equal the reference's, but wpsum's video
    gradient of them takes the atomics (the rule's split, from the H100's K16 ps1 C128 row)."""
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    ran = spy_anchors(monkeypatch)
    folds = spy_folds(monkeypatch)
    check_at_search(monkeypatch, (1, 2, 64, 6, 6), 21, ws=3, wt=0, ps=1, k=4)
    # scatter went by anchors, folded; wpsum's backward did not try it
    assert ran == [True] and folds == [1], (ran, folds)


def test_anchors_rule_small_patches(monkeypatch):
    """At the default settings, patches wider than a pixel go by anchors however few their
    elements (ps 3, one channel: 9), scatter and wpsum's video gradient, each anchor's sum
    added into the video (no fold); the results equal the reference's."""
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    ran = spy_anchors(monkeypatch)
    folds = spy_folds(monkeypatch)
    check_at_search(monkeypatch, (1, 3, 1, 7, 6), 24, ws=3, wt=1, ps=3, k=5)
    assert ran == [True, True] and folds == [], (ran, folds)


def test_anchors_fallback(monkeypatch):
    """Positions spread over a box with more pixels than there are entries: scatter by
    anchors does not apply (its sums would outgrow the patches), and the flat kernel's result
    equals the reference's."""
    use_scatter(monkeypatch, "anchors")
    ran = spy_anchors(monkeypatch)
    shape = (1, 2, 3, 9, 10)
    case = dict(shape=shape, nheads=1, q=6, k=2, fractional=False, seed=5)
    inds = make_inds(case)
    inds[0, 0, 0, 0] = torch.tensor([0, 0, 0])
    inds[0, 0, -1, -1] = torch.tensor([1, 8, 9])  # the box: the whole video, 180 > 12
    inds = inds.to(DEVICE)
    patches = rand_video((1, 1, 6, 2, 1, 3, 3, 3), seed=6).to(DEVICE)
    fn = lambda p: dnls.scatter(p, inds, shape=shape)  # noqa: E731
    check(run_both(monkeypatch, fn, [patches]), torch.float64, "scatter")
    assert ran == [False], ran  # (tried once: not again for the counts)


@pytest.mark.parametrize("tile", [None, (4, 16, 4), "anchors"])
def test_scatter_of_one_value_expanded(monkeypatch, tile):
    """A patches tensor that is one value expanded (a gradient of a sum, or dnls.scatter's
    counts where they take a scatter of their own) is read as that value, not materialised, by
    the flat, tile and anchors kernels; the sums equal the reference's."""
    use_scatter(monkeypatch, tile)
    ran = spy_anchors(monkeypatch)
    shape = (1, 2, 3, 6, 7)
    case = dict(shape=shape, nheads=1, q=5, k=3, fractional=False, seed=18)
    inds = make_inds(case)
    if tile == "anchors":  # positions in a box of 2 x 2 x 3 pixels, fewer than the 15 entries
        inds = inds % torch.tensor([2, 2, 3], dtype=inds.dtype) + torch.tensor([0, 2, 3])
    inds = inds.to(DEVICE)
    patches = torch.full((), 2.5, dtype=torch.float64, device=DEVICE).expand(1, 1, 5, 3, 2, 3, 3, 3)
    results = []
    for name in ("torch", "triton"):
        monkeypatch.setenv("DNLS_BACKEND", name)
        results.append(dnls.scatter(patches, inds, shape=shape, border="zero"))
        # a gradient of a sum: one value expanded
        v = rand_video(shape, seed=19).to(DEVICE).requires_grad_()
        results[-1] += torch.autograd.grad(dnls.gather(v, inds, ps=3, pt=2).sum(), v)
    assert ran == ([True] * 2 if tile == "anchors" else []), ran
    for what, a, b in zip(("vid", "counts", "gather's gradient"), *results, strict=True):
        assert_close(b, a, dtype=torch.float64, what=f"scatter of one value: {what}")
