"""The channels-last and channels-first copies of the Triton launchers (dnls.ops._layout):
the same values as the input in the asked layout, over random shapes, layouts and dtypes,
across tile edges, with 32- and 64-bit offsets; the input is never modified."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64]


def make(shape, layout, dtype, seed):
    """A (B, HD, T, C, H, W) tensor of ``layout``: "dense", "heads" (a head split of a
    (B, T, HD * C, H, W) video), "last" (dense channels-last), "cropped" (a crop of a wider
    frame: its pixels take two strides), "offset" (a slice past the storage's start)."""
    b, hd, t, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    full = lambda *s: (torch.rand(*s, generator=g) * 200 - 100).to(dtype)  # noqa: E731
    if layout == "heads":
        x = full(b, t, hd * c, h, w).view(b, t, hd, c, h, w).transpose(1, 2)
    elif layout == "last":
        x = full(b, hd, t, h, w, c).permute(0, 1, 2, 5, 3, 4)
    elif layout == "cropped":
        x = full(b, hd, t, c, h + 1, w + 2)[..., 1:, 2:]
    elif layout == "offset":
        x = full(b + 1, hd, t, c, h, w)[1:]
    else:
        x = full(b, hd, t, c, h, w)
    return x.to(DEVICE)


@st.composite
def cases(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2)),
             draw(st.sampled_from([1, 2, 3, 8, 20, 40])), draw(st.integers(1, 24)),
             draw(st.integers(1, 30)))  # fmt: skip
    layout = draw(st.sampled_from(["dense", "heads", "last", "cropped", "offset"]))
    return dict(shape=shape, layout=layout, dtype=draw(st.sampled_from(DTYPES)),
                wide=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))  # fmt: skip


@settings(max_examples=60)
@given(cases())
def test_layout_copies(case):
    from dnls.ops import _layout

    x = make(case["shape"], case["layout"], case["dtype"], case["seed"])
    before = x.clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_layout, "CUDA_MIN", 0)  # (the kernel at every size on CUDA too)
        if case["wide"]:
            mp.setattr(_layout, "WIDE", 0)
        last = _layout.channels_last(x)
        assert last.shape == x.shape and torch.equal(last, x)
        assert last.permute(0, 1, 2, 4, 5, 3).is_contiguous(), last.stride()
        first = _layout.channels_first(last)
        assert first.is_contiguous() and torch.equal(first, x)
        again = _layout.channels_first(x)
        assert again.is_contiguous() and torch.equal(again, x)
    assert torch.equal(x, before), "the input was modified"


def test_layout_keeps_what_is_laid_out():
    """A tensor already in the asked layout is returned as is (no copy); others are copied."""
    from dnls.ops import _layout

    x = make((1, 2, 2, 5, 4, 3), "dense", torch.float32, 0)
    assert _layout.channels_first(x) is x
    y = make((1, 2, 2, 5, 4, 3), "last", torch.float32, 0)
    assert _layout.channels_last(y) is y
    # channels_inner: channels contiguous (other strides free) or a single channel, as is
    cropped_last = y[..., 1:, :2]
    assert _layout.channels_inner(cropped_last) is cropped_last
    one = make((1, 2, 2, 1, 4, 3), "cropped", torch.float32, 0)
    assert _layout.channels_inner(one) is one
    inner = _layout.channels_inner(x)
    assert torch.equal(inner, x) and inner.permute(0, 1, 2, 4, 5, 3).is_contiguous()


def test_layout_tiles_cross_edges():
    """Transposes of many tiles along both dimensions (small tiles), both directions."""
    from dnls.ops import _layout

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_layout, "CUDA_MIN", 0)
        mp.setattr(_layout, "TILE", 64)
        x = make((1, 1, 2, 20, 9, 7), "heads", torch.float32, 3)
        last = _layout.channels_last(x)
        assert torch.equal(last, x) and last.permute(0, 1, 2, 4, 5, 3).is_contiguous()
        first = _layout.channels_first(last)
        assert torch.equal(first, x) and first.is_contiguous()


def test_layout_many_frames():
    """More frames (times batch and heads) than the grid's second axis holds: PyTorch's copy,
    the same values and layouts."""
    from dnls.ops import _layout

    x = make((1, 1, 65536 + 3, 2, 1, 2), "dense", torch.float32, 5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_layout, "CUDA_MIN", 0)
        last = _layout.channels_last(x)
        assert torch.equal(last, x) and last.permute(0, 1, 2, 4, 5, 3).is_contiguous()
        first = _layout.channels_first(last)
        assert torch.equal(first, x) and first.is_contiguous()


def test_channels_last_video_skips_the_copy(monkeypatch):
    """gather and wpsum of many channels (one head) copy a contiguous video channels-last once
    per call, and read a video whose channels are innermost as it is (docs/API.md)."""
    import dnls
    from dnls.ops import _layout

    monkeypatch.setenv("DNLS_BACKEND", "triton")
    monkeypatch.setattr(_layout, "CUDA_MIN", 0)
    copies = []
    transposed = _layout._transposed
    monkeypatch.setattr(_layout, "_transposed", lambda src: copies.append(1) or transposed(src))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 8, 6, 7, generator=g).to(DEVICE)
    size = (1, 1, 5, 3)
    inds = torch.stack([torch.randint(0, 2, size, generator=g),
                        torch.randint(0, 6, size, generator=g),
                        torch.randint(0, 7, size, generator=g)], -1).int().to(DEVICE)  # fmt: skip
    weights = torch.rand(size, generator=g).to(DEVICE)
    last = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    ops = (lambda v: dnls.gather(v, inds, ps=1), lambda v: dnls.wpsum(v, weights, inds, ps=1))
    for vid, expected in ((x, 1), (last, 0)):
        for op in ops:
            copies.clear()
            out = op(vid)
            assert len(copies) == expected, (vid.stride(), len(copies))
            assert torch.equal(out, op(x))
