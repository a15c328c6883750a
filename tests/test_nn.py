"""dnls.nn: non_local_attention, NonLocalAttention and NonLocalSearch against a float64 oracle
that builds each query's window and softmax explicitly; gradients, autocast, errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, rand_video
from hypothesis import given, settings
from hypothesis import strategies as st

import dnls
import dnls.nn as dnn

# ---------------------------------------------------------------------------------------------
# Oracle: plain float64 PyTorch, each query's candidates listed by a Python loop, the rule
# restated from the contract: 2*wt+1 frames slid inward at the ends; in each a ws x ws grid
# centred on the query (moved by the flow in the other frames), slid inward to stay inside the
# frame. Patches are read with the reflect border and folded back with the same rule, then
# averaged.
# ---------------------------------------------------------------------------------------------


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return torch.zeros_like(i)
    i = i.abs()  # -j reads j
    i = i % (2 * (n - 1))
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def _window(t, h, w, thw, ws, wt, flow=None):
    """Candidate positions of the query ``(t, h, w)``; ``flow(s)`` -> ``(dh, dw)`` of slot s."""
    nt, nh, nw = thw
    nslots = 2 * wt + 1
    t0 = min(max(t - wt, 0), nt - nslots)
    lo, up = ws // 2, ws - 1 - ws // 2
    out = []
    for s in range(nslots):
        ch, cw = h, w
        if flow is not None and t0 + s != t:
            dh, dw = flow(s)
            ch, cw = h + dh, w + dw
        ch = min(max(ch, lo), nh - 1 - up)
        cw = min(max(cw, lo), nw - 1 - up)
        out += [(t0 + s, ch - lo + a, cw - lo + c) for a in range(ws) for c in range(ws)]
    return out


def oracle_attention(q, k, v, *, nheads, ws, wt=0, ps=1, pt=1, topk=None, dist="dot",
                     scale=None, flows=None):  # fmt: skip
    """``q, k, v (B, T, C, H, W)`` float64 -> attention output ``(B, T, C, H, W)``."""
    q, k, v = (x.double() for x in (q, k, v))
    b_, nt, nc, nh, nw = q.shape
    cph = nc // nheads
    if scale is None:
        scale = 1 / math.sqrt(cph * ps * ps * pt)
    offs = torch.arange(ps) - ps // 2
    tt = _reflect(torch.arange(nt)[:, None] + torch.arange(pt), nt)  # (T, pt)
    hh = _reflect(torch.arange(nh)[:, None] + offs, nh)  # (H, ps)
    ww = _reflect(torch.arange(nw)[:, None] + offs, nw)  # (W, ps)

    def all_patches(x):  # (B, T, H, W, HD, pt * C' * ps * ps): the patch at every pixel
        x = x.permute(0, 1, 3, 4, 2)  # (B, T, H, W, C)
        p = x[:, tt[:, None, None, :, None, None], hh[None, :, None, None, :, None],
              ww[None, None, :, None, None, :]]  # (B, T, H, W, pt, ps, ps, C)  # fmt: skip
        p = p.reshape(b_, nt, nh, nw, pt, ps, ps, nheads, cph)
        return p.permute(0, 1, 2, 3, 7, 4, 8, 5, 6).reshape(b_, nt, nh, nw, nheads, -1)

    qp, kp_all, vp_all = all_patches(q), all_patches(k), all_patches(v)
    cands = torch.empty(b_, nt, nh, nw, (2 * wt + 1) * ws * ws, 3, dtype=torch.long)
    for b in range(b_):
        for t in range(nt):
            for h in range(nh):
                for w in range(nw):
                    flow = None
                    if flows is not None:

                        def flow(s, b=b, t=t, h=h, w=w):
                            return tuple(int(flows[b, t, s, i, h, w]) for i in range(2))

                    cands[b, t, h, w] = torch.tensor(_window(t, h, w, (nt, nh, nw), ws, wt, flow))
    bi = torch.arange(b_).view(b_, 1, 1, 1, 1)
    ct, ch, cw = cands.unbind(-1)
    kp, vp = kp_all[bi, ct, ch, cw], vp_all[bi, ct, ch, cw]  # (B, T, H, W, Wn, HD, P)
    qp = qp[:, :, :, :, None]
    score = (qp * kp).sum(-1) if dist == "dot" else -(qp - kp).square().sum(-1)
    logits = scale * score  # (B, T, H, W, Wn, HD)
    if topk is not None:
        idx = logits.topk(topk, dim=4).indices
        logits = logits.gather(4, idx)
        vp = vp.gather(4, idx[..., None].expand(*idx.shape, vp.shape[-1]))
    op = (torch.softmax(logits, 4)[..., None] * vp).sum(4)  # (B, T, H, W, HD, P)
    op = op.reshape(b_, nt, nh, nw, nheads, pt, cph, ps, ps)
    out = torch.zeros_like(v)
    counts = torch.zeros(nt, nh, nw, dtype=torch.float64)
    for dt in range(pt):
        for i in range(ps):
            for j in range(ps):
                ti = tt[:, dt, None, None].expand(nt, nh, nw)
                hi = hh[None, :, i, None].expand(nt, nh, nw)
                wj = ww[None, None, :, j].expand(nt, nh, nw)
                vals = op[:, :, :, :, :, dt, :, i, j].reshape(b_, nt, nh, nw, nc)
                out.permute(1, 3, 4, 0, 2).index_put_(
                    (ti, hi, wj), vals.permute(1, 2, 3, 0, 4), accumulate=True
                )
                counts.index_put_((ti, hi, wj), torch.ones(nt, nh, nw, dtype=torch.float64),
                                  accumulate=True)  # fmt: skip
    return out / counts[None, :, None]


def oracle_module(attn: dnn.NonLocalAttention, x: torch.Tensor, flows=None) -> torch.Tensor:
    """The module in float64: per-pixel projections around :func:`oracle_attention`."""
    wq, bq = attn.qkv.weight.double(), attn.qkv.bias.double()
    wo, bo = attn.proj.weight.double(), attn.proj.bias.double()
    pix = x.double().permute(0, 1, 3, 4, 2)  # (B, T, H, W, C)
    q, k, v = (pix @ wq.T + bq).chunk(3, dim=-1)
    q, k, v = (y.permute(0, 1, 4, 2, 3) for y in (q, k, v))
    o = oracle_attention(q, k, v, nheads=attn.nheads, ws=attn.ws, wt=attn.wt, ps=attn.ps,
                         pt=attn.pt, topk=attn.k, dist=attn.dist, scale=attn.scale,
                         flows=flows)  # fmt: skip
    return (o.permute(0, 1, 3, 4, 2) @ wo.T + bo).permute(0, 1, 4, 2, 3)


def _qkv(shape, seed, dtype=torch.float64):
    return tuple(rand_video(shape, dtype=dtype, seed=seed + i) - 0.5 for i in range(3))


# ---------------------------------------------------------------------------------------------
# Functional core vs oracle
# ---------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    nheads = draw(st.integers(1, 2))
    c = nheads * draw(st.integers(1, 3))
    t, h, w = draw(st.integers(1, 3)), draw(st.integers(3, 6)), draw(st.integers(3, 6))
    ws = draw(st.integers(1, min(h, w, 4)))
    wt = draw(st.integers(0, (t - 1) // 2))
    nwin = (2 * wt + 1) * ws * ws
    kw = dict(
        ws=ws,
        wt=wt,
        ps=draw(st.integers(1, 3)),
        pt=draw(st.integers(1, 2)),
        k=draw(st.one_of(st.none(), st.integers(1, nwin))),
        dist=draw(st.sampled_from(["dot", "l2"])),
        nheads=nheads,
    )
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.1, 3.0))
    return (draw(st.integers(1, 2)), t, c, h, w), draw(st.integers(0, 2**16)), kw


@settings(max_examples=30)
@given(attention_cases())
def test_attention_equals_oracle(case):
    shape, seed, kw = case
    q, k, v = _qkv(shape, seed)
    out = dnn.non_local_attention(q, k, v, **kw)
    kw = dict(kw)
    expected = oracle_attention(q, k, v, topk=kw.pop("k"), **kw)
    assert out.shape == shape and out.dtype == torch.float64
    assert_close(out, expected, what=f"non_local_attention {kw}")


def test_head_split_input_equals_merged():
    """A 6-D head-split input gives the 6-D form of the 5-D result."""
    q, k, v = _qkv((1, 3, 6, 7, 6), seed=3)
    kw = dict(ws=3, wt=1, ps=2, k=5)
    out5 = dnn.non_local_attention(q, k, v, nheads=3, **kw)
    q6, k6, v6 = (x.view(1, 3, 3, 2, 7, 6).transpose(1, 2) for x in (q, k, v))
    out6 = dnn.non_local_attention(q6, k6, v6, **kw)
    assert out6.shape == (1, 3, 3, 2, 7, 6)
    assert_close(out6.transpose(1, 2).reshape(out5.shape), out5, what="6-D vs 5-D")


def test_whole_window_is_neighbourhood_attention():
    """k=None at a corner pixel: the window slid inward covers rows/cols 0..ws-1 and the
    frames 0..2*wt; the output is the softmax-weighted mean of v over exactly those pixels."""
    q, k, v = _qkv((1, 4, 2, 6, 7), seed=5)
    out = dnn.non_local_attention(q, k, v, ws=3, wt=1, scale=0.7)
    logits = 0.7 * (q[0, 0, None, :, 0:1, 0:1] * k[0, 0:3, :, 0:3, 0:3]).sum(1)
    wts = torch.softmax(logits.flatten(), 0).view(3, 1, 3, 3)
    expected = (wts * v[0, 0:3, :, 0:3, 0:3]).sum((0, 2, 3))
    assert_close(out[0, 0, :, 0, 0], expected, what="corner pixel")


def test_integer_flows_equal_oracle():
    shape = (1, 3, 2, 6, 6)
    q, k, v = _qkv(shape, seed=11)
    g = torch.Generator().manual_seed(0)
    flows = torch.randint(-2, 3, (1, 3, 3, 2, 6, 6), generator=g, dtype=torch.int32)
    out = dnn.non_local_attention(q, k, v, ws=3, wt=1, k=6, flows=flows)
    expected = oracle_attention(q, k, v, nheads=1, ws=3, wt=1, topk=6, flows=flows)
    assert_close(out, expected, what="attention with integer flows")


# ---------------------------------------------------------------------------------------------
# Module vs oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(k=None),  # neighbourhood attention over the whole window
        dict(k=16),
        dict(k=None, ps=3, dist="l2"),
        dict(k=7, ps=2, pt=2),
    ],
    ids=["window", "k16", "ps3-l2", "ps2-pt2-k7"],
)
def test_module_equals_oracle(kw):
    torch.manual_seed(0)
    attn = dnn.NonLocalAttention(8, 2, ws=3, wt=1, dtype=torch.float64, **kw)
    x = rand_video((2, 3, 8, 5, 6), seed=1)
    out = attn(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    assert_close(out, oracle_module(attn, x), what=f"NonLocalAttention {kw}")


def test_module_equals_functional_and_leaves_input_alone():
    torch.manual_seed(1)
    attn = dnn.NonLocalAttention(6, 3, ws=3, k=4, dtype=torch.float64)
    base = rand_video((1, 2, 6, 6, 6), seed=2)
    x = base.transpose(3, 4).contiguous().transpose(3, 4)  # same values, non-contiguous
    assert not x.is_contiguous()
    keep = x.clone()
    out = attn(x)
    q, k, v = (attn.qkv(base.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)).chunk(3, dim=2)
    core = dnn.non_local_attention(q, k, v, ws=3, k=4, nheads=3)
    expected = attn.proj(core.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
    assert_close(out, expected, what="module vs functional")
    out.sum().backward()
    assert torch.equal(x, keep)


def test_module_holds_hyperparameters_only():
    attn = dnn.NonLocalAttention(16, 4, ws=5, wt=1, k=8, bias=False)
    names = sorted(n for n, _ in attn.named_parameters())
    assert names == ["proj.weight", "qkv.weight"]
    assert list(attn.buffers()) == []
    assert attn.scale == pytest.approx(1 / math.sqrt(4))
    text = repr(attn)
    for part in ("dim=16", "nheads=4", "ws=5", "wt=1", "k=8", "dist='dot'"):
        assert part in text
    search = dnn.NonLocalSearch(ws=5, k=3, dist="dot")
    assert list(search.parameters()) == [] and list(search.buffers()) == []
    assert "ws=5" in repr(search) and "k=3" in repr(search)


def test_nonlocal_search_equals_search():
    vid = rand_video((1, 3, 4, 8, 8), seed=4)
    kvid = rand_video((1, 3, 4, 8, 8), seed=5)
    kw = dict(ws=5, wt=1, ps=3, k=6, nheads=2, self_match="exclude", stride0=2)
    layer = dnn.NonLocalSearch(**kw)
    for args in [(vid,), (vid, kvid)]:
        d, i = layer(*args, start=3, count=17)
        d_ref, i_ref = dnls.search(*args, start=3, count=17, **kw)
        assert torch.equal(d, d_ref) and torch.equal(i, i_ref)


# ---------------------------------------------------------------------------------------------
# Gradients, in float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [dict(k=None), dict(k=5, dist="l2"), dict(k=None, ps=2, pt=2)],
    ids=["window", "k5-l2", "ps2-pt2"],
)
def test_attention_gradcheck(kw):
    q, k, v = (x.requires_grad_() for x in _qkv((1, 3, 2, 5, 5), seed=7))
    fn = lambda q, k, v: dnn.non_local_attention(q, k, v, ws=3, wt=1, nheads=2, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_attention_gradcheck_fractional_flows():
    """Float positions are float32 by contract (even for float64 videos), so the numerical
    derivative takes a larger step; flows stay away from whole pixels, where bilinear reads
    have kinks."""
    q, k, v = (x.requires_grad_() for x in _qkv((1, 3, 1, 6, 6), seed=9))
    g = torch.Generator().manual_seed(1)
    flows = torch.rand(1, 3, 3, 2, 6, 6, generator=g, dtype=torch.float64) * 0.6 + 0.2
    flows.requires_grad_()
    fn = lambda q, k, v, f: dnn.non_local_attention(q, k, v, ws=3, wt=1, k=4, flows=f)  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, (q, k, v, flows), eps=1e-3, atol=1e-4, rtol=1e-3, fast_mode=True
    )


def test_module_gradcheck():
    torch.manual_seed(2)
    attn = dnn.NonLocalAttention(4, 2, ws=3, k=5, dtype=torch.float64)
    x = rand_video((1, 2, 4, 4, 5), seed=8).requires_grad_()
    names = [n for n, _ in attn.named_parameters()]

    def fn(x, *p):
        return torch.func.functional_call(attn, dict(zip(names, p, strict=True)), (x,))

    inputs = (x, *(p.detach().requires_grad_() for p in attn.parameters()))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Low precision and autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    """Low-precision q, k, v: the result is the float64 oracle on the same (rounded) inputs, to
    the dtype's tolerance; summing in low precision over 27 neighbours would miss it."""
    q, k, v = _qkv((1, 3, 8, 6, 6), seed=13, dtype=dtype)
    out = dnn.non_local_attention(q, k, v, ws=3, wt=1, nheads=2)
    assert out.dtype == dtype
    expected = oracle_attention(q, k, v, nheads=2, ws=3, wt=1)
    assert_close(out, expected, dtype=dtype, what=f"{dtype} attention")


def test_autocast_bf16_module():
    torch.manual_seed(3)
    attn = dnn.NonLocalAttention(16, 4, ws=3, wt=1, k=8)
    x = rand_video((1, 3, 16, 6, 6), dtype=torch.float32, seed=14)
    ref = attn(x)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16  # the output projection ran in bf16
    assert attn.qkv.weight.dtype == torch.float32
    assert_close(out, ref, dtype=torch.bfloat16, what="autocast output")
    out.float().square().mean().backward()
    for p, g_ref in zip(attn.parameters(), ref_grads, strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
        rel = (p.grad - g_ref).norm() / g_ref.norm()
        assert rel < 0.05, f"autocast gradient off by {rel:.3g} (relative)"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kw, exc, name",
    [
        ((8, 3), dict(ws=3), ValueError, "nheads"),
        ((8, 2), dict(ws=0), ValueError, "ws"),
        ((8, 2), dict(ws=3, k=0), ValueError, "k"),
        ((8, 2), dict(ws=3, dist="cos"), ValueError, "dist"),
        ((8, 2), dict(ws=3, scale=-1.0), ValueError, "scale"),
        ((8.0, 2), dict(ws=3), TypeError, "dim"),
        ((8, 2), dict(ws=3, ps="3"), TypeError, "ps"),
        ((8, 2), dict(ws=3, border="wrap"), ValueError, "border"),
    ],
)
def test_module_arguments_are_checked(args, kw, exc, name):
    with pytest.raises(exc, match=f"^{name} must be"):
        dnn.NonLocalAttention(*args, **kw)


def test_bad_inputs_name_the_argument():
    attn = dnn.NonLocalAttention(8, 2, ws=3)
    with pytest.raises(ValueError, match=r"^x must be 5-D \(B, T, C, H, W\) with C = dim = 8"):
        attn(torch.rand(1, 2, 6, 5, 5))
    with pytest.raises(TypeError, match="^x must be float16"):
        attn(torch.ones(1, 2, 8, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="^ws must be a window that fits"):
        attn(torch.rand(1, 2, 8, 2, 5))
    q, k, v = _qkv((1, 1, 2, 5, 5), seed=0)
    with pytest.raises(TypeError, match="^vvid must be of the same dtype as qvid"):
        dnn.non_local_attention(q, k, v.float(), ws=3)
    with pytest.raises(ValueError, match="^kvid must be of the same shape as qvid"):
        dnn.non_local_attention(q, k[..., :4], v, ws=3)
    with pytest.raises(TypeError, match="^ps must be an int"):
        dnn.non_local_attention(q, k, v, ws=3, ps="3")
    with pytest.raises(ValueError, match="^scale must be a positive finite number"):
        dnn.non_local_attention(q, k, v, ws=3, scale=float("inf"))
    with pytest.raises(ValueError, match="^self_match must be one of"):
        dnn.NonLocalSearch(ws=3, self_match="drop")
    with pytest.raises(ValueError, match="^stride0 must be an int >= 1"):
        dnn.NonLocalSearch(ws=3, stride0=0)
