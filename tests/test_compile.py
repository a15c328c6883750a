"""torch.compile(fullgraph=True) traces models built on dnls with no graph break (CPU,
inductor): compiled equals eager, trains, and data checks still fire inside the graph."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rand_video
from torch import nn

import dnls
import dnls.nn as dnn


class TinyNet(nn.Module):
    """Two residual attention layers: whole-window pixel attention with flows, then top-k
    patch attention (the fold path)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn1 = dnn.NonLocalAttention(8, 2, ws=3, wt=1)
        self.attn2 = dnn.NonLocalAttention(8, 2, ws=3, ps=2, k=4, dist="l2")
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
        y = self.embed(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        y = y + self.attn1(y, flows=flows)
        y = y + self.attn2(y)
        return self.head(y.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)


def _data():
    x = rand_video((1, 3, 3, 6, 6), dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    flows = torch.rand(1, 3, 3, 2, 6, 6, generator=g) * 0.6 + 0.2  # fractional: float inds
    target = rand_video((1, 3, 3, 6, 6), dtype=torch.float32, seed=2)
    return x, flows, target


def test_compiled_model_equals_eager_and_trains():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = TinyNet()
    x, flows, target = _data()
    compiled = torch.compile(net, fullgraph=True)  # any graph break raises

    expected = net(x, flows)
    expected.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    out = compiled(x, flows)
    assert_close(out, expected, dtype=torch.float32, what="compiled vs eager")
    out.square().sum().backward()
    for n, p in net.named_parameters():
        assert_close(p.grad, grads[n], dtype=torch.float32, what=f"grad of {n}", scale=10)

    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = (compiled(x, flows) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_compiled_data_checks_still_raise():
    """Position checks on tensor data become asserts inside the graph (no graph break)."""
    torch._dynamo.reset()
    vid = rand_video((1, 2, 2, 5, 5), dtype=torch.float32, seed=3)

    def attend(vid, weights, inds):
        return dnls.wpsum(vid, weights, inds, ps=1)

    compiled = torch.compile(attend, fullgraph=True)
    _, inds = dnls.search(vid, ws=3, k=4)
    weights = torch.rand(inds.shape[:4])
    assert_close(compiled(vid, weights, inds), attend(vid, weights, inds), dtype=torch.float32)
    bad = inds.clone()
    bad[0, 0, 3, 1, 2] = 5  # w = W
    with pytest.raises(ValueError, match="^inds must be positions inside the video"):
        attend(vid, weights, bad)
    with pytest.raises(RuntimeError, match=r"inds must be positions inside the \(T, H, W\)"):
        compiled(vid, weights, bad)


def test_compiled_under_autocast():
    torch._dynamo.reset()
    torch.manual_seed(1)
    attn = dnn.NonLocalAttention(8, 2, ws=3, wt=1, k=4)
    x = rand_video((1, 3, 8, 5, 5), dtype=torch.float32, seed=4)
    compiled = torch.compile(attn, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn(x)
        out = compiled(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, dtype=torch.bfloat16, what="compiled vs eager under autocast")
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in attn.parameters())
