"""The fused attention kernels (``dnls::attention``: ``ps = pt = 1``, ``k=None``) against the
reference path, forward and every gradient, per dtype, and against the float64 oracle.

On a machine without a GPU they run on CPU tensors under Triton's interpreter, at tiny sizes;
on a GPU the same tests run on CUDA tensors at larger sizes."""

import pytest
import torch
from helpers import assert_close, rand_video
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nn import oracle_attention

import dnls.nn as dnn
from dnls.ops import attention as fused

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EXAMPLES = 30 if CUDA else 4
MAX_HW = 20 if CUDA else 5


def _qkv(shape, seed, dtype=torch.float64):
    return tuple(
        (rand_video(shape, seed=seed + i) - 0.5).to(dtype).to(DEVICE).requires_grad_()
        for i in range(3)
    )


def _run(backend, mp, qkv, grad, **kw):
    """Output and gradients to q, k, v of :func:`non_local_attention` on one backend."""
    mp.setenv("DNLS_BACKEND", backend)
    out = dnn.non_local_attention(*qkv, **kw)
    return (out, *torch.autograd.grad(out, qkv, grad))


@st.composite
def cases(draw):
    nheads = draw(st.integers(1, 2))
    c = nheads * draw(st.integers(1, 5))
    t = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, MAX_HW)), draw(st.integers(1, MAX_HW))
    kw = dict(
        ws=draw(st.integers(1, min(h, w, 5))),
        wt=draw(st.integers(0, (t - 1) // 2)),
        dist=draw(st.sampled_from(["dot", "l2"])),
        nheads=nheads,
        scale=draw(st.floats(0.1, 3.0)),
    )
    return (draw(st.integers(1, 2)), t, c, h, w), draw(st.integers(0, 2**16)), kw


@settings(max_examples=EXAMPLES)
@given(cases())
def test_kernels_equal_reference(case):
    shape, seed, kw = case
    qkv = _qkv(shape, seed)
    grad = (rand_video(shape, seed=seed + 3) - 0.5).to(DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        ref = _run("torch", mp, qkv, grad, **kw)
        got = _run("triton", mp, qkv, grad, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert_close(a, b, what=f"{name} {shape} {kw}")


def test_kernels_equal_oracle(monkeypatch):
    """The float64 loops of the nn tests: independent of every dnls op."""
    shape = (1, 3, 4, 7, 6)
    q, k, v = _qkv(shape, seed=11)
    kw = dict(ws=3, wt=1, nheads=2, dist="dot", scale=0.8)
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    out = dnn.non_local_attention(q, k, v, **kw)
    expected = oracle_attention(*(x.detach().cpu() for x in (q, k, v)), ps=1, pt=1, topk=None, **kw)
    assert_close(out, expected, what="fused vs oracle")


# bf16 and fp16 scores and weights stay in float32 in the kernels, while the reference rounds
# the distances to the input dtype: compare both to float64 instead, on values of order 1.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(monkeypatch, dtype):
    shape = (1, 3, 8, 12, 10) if CUDA else (1, 3, 4, 4, 5)
    kw = dict(ws=3, wt=1, nheads=2, scale=1.0)
    exact = _qkv(shape, seed=5)
    grad = (rand_video(shape, seed=9) - 0.5).to(DEVICE)
    want = _run("torch", monkeypatch, exact, grad, **kw)
    low = tuple(x.detach().to(dtype).requires_grad_() for x in exact)
    got = _run("triton", monkeypatch, low, grad.to(dtype), **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype, name
        assert_close(a, b, dtype=dtype, what=f"{name} {dtype}")


def test_logsumexp_gradient(monkeypatch):
    """The op's second output, the logsumexp, carries its gradient too."""
    shape = (1, 2, 1, 4, 5, 4)
    q, k, v = _qkv(shape, seed=21)
    g_out = (rand_video(shape, seed=22) - 0.5).to(DEVICE)
    g_lse = (rand_video((1, 2, 1, 5, 4), seed=23) - 0.5).to(DEVICE)
    kw = dict(ws=3, wt=0, scale=0.9, dist="l2")
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DNLS_BACKEND", backend)
        out, lse = torch.ops.dnls.attention(q, k, v, **kw)
        loss = (out * g_out).sum() + (lse * g_lse).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v))))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *reversed(results), strict=True):
        assert_close(a, b, what=name)


def test_gradcheck(monkeypatch):
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    q, k, v = _qkv((1, 1, 3, 1, 2, 3), seed=31)
    for dist in ("dot", "l2"):

        def f(q, k, v, dist=dist):
            return fused.attention(q, k, v, ws=2, wt=1, scale=0.7, dist=dist)

        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=not CUDA)


def test_strided_views_and_module(monkeypatch):
    """The module's q, k, v are channels-innermost views of one projection; head-split
    channels-first views get copied channels-last. Both give the reference's results."""
    torch.manual_seed(0)
    attn = dnn.NonLocalAttention(8, 2, ws=3, wt=1, dtype=torch.float64).to(DEVICE)
    x = (rand_video((1, 3, 8, 5, 7), seed=41) - 0.5).to(DEVICE).requires_grad_()
    grads = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DNLS_BACKEND", backend)
        out = attn(x)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (x, *attn.parameters()))))
    for i, (a, b) in enumerate(zip(*reversed(grads), strict=True)):
        assert_close(a, b, what=f"module output/gradient {i}")


def test_deterministic(monkeypatch):
    """No atomics: the same bits on every run."""
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    shape = (1, 4, 8, 16, 16) if CUDA else (1, 3, 2, 4, 4)
    qkv = _qkv(shape, seed=51, dtype=torch.float32)
    grad = torch.ones(shape, device=DEVICE)
    kw = dict(ws=3, wt=1, nheads=2)
    first = _run("triton", monkeypatch, qkv, grad, **kw)
    second = _run("triton", monkeypatch, qkv, grad, **kw)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_outside_scope_takes_the_unfused_path():
    assert fused.applies(1, 1, None, None, 1.0, 0.5)
    for args in [(3, 1, None, None, 1, 1.0), (1, 2, None, None, 1, 1.0), (1, 1, 4, None, 1, 1.0),
                 (1, 1, None, torch.zeros(1), 1, 1.0), (1, 1, None, None, 2, 1.0),
                 (1, 1, None, None, 1, 1e300)]:  # fmt: skip
        assert not fused.applies(*args), args


def test_window_errors_name_the_argument(monkeypatch):
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    q, k, v = _qkv((1, 3, 2, 4, 5), seed=61)
    with pytest.raises(ValueError, match="ws"):
        dnn.non_local_attention(q, k, v, ws=5)
    with pytest.raises(ValueError, match="wt"):
        dnn.non_local_attention(q, k, v, ws=3, wt=2)


def test_opcheck_on_the_kernels(monkeypatch):
    monkeypatch.setenv("DNLS_BACKEND", "triton")
    q, k, v = _qkv((1, 1, 3, 2, 3, 4), seed=71)
    kw = dict(ws=2, wt=1, scale=0.6, dist="dot")
    for op, args in [
        (torch.ops.dnls.attention.default, (q, k, v)),
        (torch.ops.dnls.attention_backward.default, (
            torch.rand_like(q), None, *(x.detach() for x in (q, k, v)),
            *(x.detach() for x in torch.ops.dnls.attention(q, k, v, **kw)))),
    ]:  # fmt: skip
        result = torch.library.opcheck(op, args, kw)
        assert all(r == "SUCCESS" for r in result.values()), result
