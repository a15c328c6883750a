"""Every bad input named by the contract raises ValueError/TypeError naming the argument."""

import re

import pytest
import torch

import dnls
from dnls._common import backend

V = torch.rand(1, 3, 4, 8, 8)
INDS = torch.zeros(1, 1, 5, 2, 3, dtype=torch.int32)
PATCHES = torch.rand(1, 1, 5, 2, 1, 4, 3, 3)
FLOWS = torch.zeros(1, 3, 3, 2, 8, 8)
META = torch.empty(1, 3, 4, 8, 8, device="meta")


def _s(**kw):
    return lambda: dnls.search(V, **{"ws": 3, **kw})


def _g(vid=V, inds=INDS, **kw):
    return lambda: dnls.gather(vid, inds, **{"ps": 3, **kw})


def _sc(patches=PATCHES, inds=INDS, **kw):
    return lambda: dnls.scatter(patches, inds, **{"shape": V.shape, **kw})


def _bad_inds(t, h, w, dtype=torch.float32):
    return torch.tensor([t, h, w], dtype=dtype).expand(1, 1, 5, 2, 3)


CASES = [
    # search, videos
    ("qvid", TypeError, lambda: dnls.search([1.0], ws=3)),
    ("qvid", TypeError, lambda: dnls.search(torch.zeros(1, 3, 4, 8, 8, dtype=torch.int64), ws=3)),
    ("qvid", ValueError, lambda: dnls.search(torch.rand(3, 4, 8, 8), ws=3)),
    ("kvid", ValueError, lambda: dnls.search(V, torch.rand(1, 3, 4, 8, 9), ws=3)),
    ("kvid", TypeError, lambda: dnls.search(V, V.double(), ws=3)),
    ("kvid", ValueError, lambda: dnls.search(V, META, ws=3)),
    # search, window and patch
    ("ws", ValueError, _s(ws=9)),
    ("ws", ValueError, _s(ws=0)),
    ("ws", TypeError, _s(ws=3.0)),
    ("ws", ValueError, _s(ws=4, stride1=3)),
    ("wt", ValueError, _s(wt=2)),
    ("wt", ValueError, _s(wt=-1)),
    ("ps", ValueError, _s(ps=0)),
    ("pt", ValueError, _s(pt=0)),
    ("dilation", ValueError, _s(dilation=0)),
    ("k", ValueError, _s(k=0)),
    ("k", ValueError, _s(k=10)),
    ("k", ValueError, _s(k=9, self_match="exclude")),
    ("k", TypeError, _s(k=True)),
    ("dist", ValueError, _s(dist="l1")),
    ("stride0", ValueError, _s(stride0=0)),
    ("stride1", ValueError, _s(stride1=-1)),
    ("stride1", ValueError, _s(stride1=float("nan"))),
    ("stride1", TypeError, _s(stride1="1")),
    ("nheads", ValueError, _s(nheads=3)),
    ("nheads", ValueError, lambda: dnls.search(torch.rand(1, 2, 3, 2, 6, 6), ws=3, nheads=3)),
    ("self_match", ValueError, _s(self_match="drop")),
    ("self_match", ValueError, _s(self_match="exclude", stride1=2)),
    ("border", ValueError, _s(border="wrap")),
    ("qvid", ValueError, lambda: dnls.search(torch.rand(1, 0, 3, 4, 8, 8), ws=3)),
    ("stride1", TypeError, lambda: dnls.nn.non_local_attention(V, V, V, ws=3, stride1=True)),
    # search, flows
    ("flows", ValueError, _s(wt=1, flows=torch.zeros(1, 3, 1, 2, 8, 8))),
    ("flows", ValueError, _s(wt=1, flows=FLOWS.clone().fill_(float("nan")))),
    ("flows", ValueError, _s(wt=1, flows=FLOWS.clone().fill_(float("inf")))),
    ("flows", TypeError, _s(wt=1, flows=FLOWS.bool())),
    ("flows", TypeError, _s(wt=1, flows="flow")),
    ("flows", TypeError, _s(wt=1, flows=(FLOWS,))),
    ("flows", ValueError, _s(wt=1, flows=torch.zeros(1, 3, 3, 2, 8, 8, device="meta"))),
    (
        r"flows\[0\]",
        ValueError,
        _s(wt=1, flows=(torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8, 8))),
    ),
    (
        r"flows\[1\]",
        TypeError,
        _s(wt=1, flows=(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 2, 8, 8, dtype=torch.int32))),
    ),
    # search, grid
    ("region", ValueError, _s(region=(0, 3, 0, 9, 0, 8))),
    ("region", ValueError, _s(region=(1, 1, 0, 8, 0, 8))),
    ("region", TypeError, _s(region=(0, 3, 0, 8))),
    ("region", TypeError, _s(region=(0, 3, 0, 8.0, 0, 8))),
    ("start", ValueError, _s(start=-1)),
    ("start", ValueError, _s(start=1000)),
    ("count", ValueError, _s(start=190, count=10)),
    ("device", ValueError, lambda: dnls.query_grid(V.shape).positions(0, 2, device="bogus")),
    ("stride", ValueError, lambda: dnls.QueryGrid((3, 8, 8), 0, None)),
    ("region", ValueError, lambda: dnls.QueryGrid((3, 8, 8), 1, (0, 3, 0, 20, 0, 8))),
    ("thw", ValueError, lambda: dnls.QueryGrid((3, 8), 1, None)),
    # gather
    ("vid", TypeError, _g(vid=None)),
    ("inds", ValueError, _g(inds=INDS[0])),
    ("inds", ValueError, _g(inds=torch.zeros(2, 1, 5, 2, 3, dtype=torch.int32))),
    ("inds", ValueError, _g(inds=torch.zeros(1, 2, 5, 2, 3, dtype=torch.int32))),
    ("inds", TypeError, _g(inds=INDS.bool())),
    ("inds", ValueError, _g(inds=torch.zeros(1, 1, 5, 2, 2, dtype=torch.int32))),
    ("inds", ValueError, _g(inds=_bad_inds(3, 0, 0, torch.int32))),
    ("inds", ValueError, _g(inds=_bad_inds(0, -1, 0, torch.int32))),
    ("inds", ValueError, _g(inds=_bad_inds(0, 0, 8, torch.int64))),
    ("inds", ValueError, _g(inds=_bad_inds(0, 7.5, 0))),
    ("inds", ValueError, _g(inds=_bad_inds(0.5, 1, 1))),
    ("inds", ValueError, _g(inds=_bad_inds(0, float("nan"), 1))),
    ("inds", ValueError, _g(inds=torch.zeros(1, 1, 5, 2, 3, device="meta"))),
    ("ps", ValueError, _g(ps=0)),
    ("border", ValueError, _g(border="edge")),
    ("nheads", ValueError, _g(nheads=3)),
    # scatter
    ("patches", ValueError, _sc(patches=PATCHES[0])),
    ("patches", TypeError, _sc(patches=PATCHES.int())),
    ("shape", ValueError, _sc(shape=(1, 3, 5, 8, 8))),
    ("shape", TypeError, _sc(shape=5)),
    ("shape", ValueError, _sc(shape=(1, 3, 4, 8))),
    ("inds", ValueError, _sc(inds=torch.zeros(1, 1, 4, 2, 3, dtype=torch.int32))),
    ("nheads", ValueError, _sc(nheads=2)),
    ("out", ValueError, _sc(out=torch.zeros(1, 3, 4, 8, 7))),
    ("counts", ValueError, _sc(counts=torch.zeros(1, 3, 4, 8, 8))),
    ("out", TypeError, _sc(out=torch.zeros(1, 3, 4, 8, 8, dtype=torch.int32))),
    ("out", ValueError, _sc(out=torch.zeros(1, 1, 4, 8, 8).expand(1, 3, 4, 8, 8))),
    ("counts", ValueError, _sc(counts=torch.zeros(1, 3, 1, 8, 8, requires_grad=True))),
    # wpsum
    ("weights", ValueError, lambda: dnls.wpsum(V, torch.rand(1, 1, 5, 3), INDS, ps=3)),
    (
        "weights",
        TypeError,
        lambda: dnls.wpsum(V, torch.ones(1, 1, 5, 2, dtype=torch.int64), INDS, ps=3),
    ),
    ("weights", TypeError, lambda: dnls.wpsum(V, None, INDS, ps=3)),
    # iunfold / ifold
    ("vid", ValueError, lambda: dnls.iunfold(torch.rand(1, 1, 3, 4, 8, 8), ps=3)),
    ("stride", ValueError, lambda: dnls.iunfold(V, ps=3, stride=0)),
    ("region", ValueError, lambda: dnls.iunfold(V, ps=3, region=(0, 4, 0, 8, 0, 8))),
    ("count", ValueError, lambda: dnls.iunfold(V, ps=3, count=1000)),
    (
        "patches",
        ValueError,
        lambda: dnls.ifold(torch.rand(1, 5, 1, 4, 3, 3), shape=V.shape, start=190),
    ),
    ("patches", ValueError, lambda: dnls.ifold(torch.rand(1, 5, 4, 3, 3), shape=V.shape)),
    (
        "start",
        ValueError,
        lambda: dnls.ifold(torch.rand(1, 0, 1, 4, 3, 3), shape=V.shape, start=193),
    ),
    ("shape", ValueError, lambda: dnls.ifold(torch.rand(1, 5, 1, 4, 3, 3), shape=(1, 3, 3, 8, 8))),
    (
        "dilation",
        ValueError,
        lambda: dnls.ifold(torch.rand(1, 5, 1, 4, 3, 3), shape=V.shape, dilation=0),
    ),
    # query_grid
    ("stride", ValueError, lambda: dnls.query_grid(V.shape, 0)),
    ("shape", ValueError, lambda: dnls.query_grid((1, 2), 1)),
    ("size", ValueError, lambda: list(dnls.query_grid(V.shape).batches(0))),
]


@pytest.mark.parametrize("name,exc,call", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_names_the_argument(name, exc, call):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert re.match(name + " must be", message), message
    assert "got" in message, message


def test_backend_variable(monkeypatch):
    monkeypatch.setenv("DNLS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="^DNLS_BACKEND must be one of"):
        dnls.search(V, ws=3)
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dnls.search(V, ws=3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dnls.gather(V, INDS, ps=3)
    with pytest.raises(RuntimeError, match="nothing has no Triton kernel"):
        backend(torch.device("cpu"), "nothing")
    monkeypatch.setenv("DNLS_BACKEND", "torch")
    assert dnls.search(V, ws=3, k=2)[0].shape == (1, 1, 192, 2)


def test_search_positions_skip_the_range_check_until_changed():
    """On a GPU the ops that read the positions ``search`` returns do not read their range
    again (two reductions and a device sync saved): ``search`` marks them. A change through
    torch, a copy, a view, a smaller video or an inference tensor brings the check back. The
    mark is per tensor: checked here on the meta device, as this machine has no GPU."""
    from dnls import _checks

    thw = (3, 8, 8)
    inds = torch.zeros(1, 1, 192, 2, 3, dtype=torch.int32, device="meta")
    _checks.mark_positions(inds, thw)
    assert _checks._known_inside(inds, thw)
    assert not _checks._known_inside(inds.clone(), thw)
    assert not _checks._known_inside(inds[:, :, :5], thw)
    assert not _checks._known_inside(inds, (3, 7, 8))  # a smaller video: checked again
    inds[0, 0, 0, 0, 2] = 8  # in place
    assert not _checks._known_inside(inds, thw)
    with torch.inference_mode():
        frozen = torch.zeros(1, 1, 192, 2, 3, dtype=torch.int32, device="meta")
    _checks.mark_positions(frozen, thw)
    assert not _checks._known_inside(frozen, thw)


@pytest.mark.parametrize("how", ["numpy", "data"])
def test_cpu_positions_are_always_checked(how):
    """On the CPU the check costs no sync and the kernels index memory with the positions, so
    even ``search``'s own outputs are checked: a change that bypasses the version counter
    (``.numpy()``, ``.data``) raises instead of reaching a kernel (it wrote out of bounds)."""
    from dnls import _checks

    _, inds = dnls.search(V, ws=3, k=2)
    assert not _checks._known_inside(inds, (3, 8, 8))
    assert dnls.gather(V, inds, ps=3).shape == (1, 1, 192, 2, 1, 4, 3, 3)
    if how == "numpy":
        inds.numpy()[0, 0, 0, 0] = (0, 40, 40)
    else:
        inds.data[0, 0, 0, 0, 1] = 5000
    patches = torch.ones(1, 1, 192, 2, 1, 4, 3, 3)
    with pytest.raises(ValueError, match="^inds must be positions inside the video"):
        dnls.gather(V, inds, ps=3)
    with pytest.raises(ValueError, match="^inds must be positions inside the video"):
        dnls.scatter(patches, inds, shape=V.shape)
    with pytest.raises(ValueError, match="^inds must be positions inside the video"):
        dnls.wpsum(V, torch.ones(1, 1, 192, 2), inds, ps=3)
