"""search: the k nearest patches of each query in a space-time window.

Layout: parameters -> window geometry -> reference forward/backward (plain PyTorch, chunked so
the workspace never grows with the number of queries) -> ``torch.library`` registration ->
the public function.

Candidates of the query at ``(t, h, w)``: frames ``t0 .. t0 + 2*wt`` (``t0`` slid inward at the
ends of the video); in frame ``t'`` a ``ws x ws`` grid with spacing ``stride1`` centred on
``(h, w) + flow(t -> t')`` (no flow in the query's own frame), the grid slid inward so that it
stays inside the frame. Window index ``j = slot*ws*ws + a*ws + b``.

Backward. With ``q`` the query patch, ``k_j`` the patch of candidate ``j`` at position ``x_j``
and ``g_j = dL/d dist_j``:

    l2:  dist_j = |q - k_j|^2   ->  dL/dq = sum_j 2 g_j (q - k_j),  dL/dk_j = -2 g_j (q - k_j)
    dot: dist_j = <q, k_j>      ->  dL/dq = sum_j g_j k_j,          dL/dk_j = g_j q
    dL/dx_j = <dL/dk_j, d k_j / d x_j> (+ the gradient reaching the returned position)
    x_j = clamp(centre + flow) + offset  ->  dL/dflow = dL/dx_j where the clamp is inactive.

Patch gradients are added into the videos with the adjoint of the patch read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .. import _checks
from .._common import backend, fused_cpu, split_heads
from .._grid import QueryGrid
from .._ref import PatchGeom, flat_video, read, read_dpos, write
from . import _cpu
from .flows import FLOW_LIMIT, accumulate_flows

DISTS = ("l2", "dot")
SELF_MATCH = ("keep", "anchor", "exclude")

# Elements of the largest temporary a reference chunk may build (patches of a chunk of
# queries times candidates). Fixes the workspace whatever the number of queries.
WORKSPACE = 1 << 20


@dataclass(frozen=True)
class SearchParams:
    ws: int
    wt: int
    ps: int
    pt: int
    k: int  # -1: every candidate, in window order
    dist: str
    stride0: int
    stride1: float
    dilation: int
    region: tuple[int, int, int, int, int, int]
    start: int
    count: int
    self_match: str
    border: str

    @property
    def nslots(self) -> int:
        return 2 * self.wt + 1

    @property
    def nwin(self) -> int:
        """``W``, the number of candidates of every query."""
        return self.nslots * self.ws * self.ws

    @property
    def nk(self) -> int:
        """``K``, the number of results per query."""
        if self.k >= 0:
            return self.k
        return self.nwin - 1 if self.self_match == "exclude" else self.nwin

    @property
    def geom(self) -> PatchGeom:
        return PatchGeom(self.ps, self.pt, self.dilation, self.border)

    def grid(self, thw: tuple[int, int, int]) -> QueryGrid:
        return QueryGrid(thw, self.stride0, self.region)

    def op_kwargs(self) -> dict:
        # by fields, not self.__dict__: Dynamo (torch 2.11) cannot trace a dataclass's __dict__
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw["region"] = list(self.region)
        return kw


def _whole(flows: torch.Tensor | None, stride1: float) -> bool:
    """Whether every position is a whole pixel: no floating flows and an integral stride1."""
    return (flows is None or not flows.is_floating_point()) and float(stride1).is_integer()


def _pos_dtype(vid: torch.Tensor, flows: torch.Tensor | None, p: SearchParams) -> torch.dtype:
    """int64 for whole-pixel positions, else the float dtype positions are computed in."""
    if _whole(flows, p.stride1):
        return torch.int64
    if vid.dtype == torch.float64 or (flows is not None and flows.dtype == torch.float64):
        return torch.float64
    return torch.float32


def _inds_dtype(flows: torch.Tensor | None, stride1: float) -> torch.dtype:
    return torch.int32 if _whole(flows, stride1) else torch.float32


# ---------------------------------------------------------------------------------------------
# Window geometry
# ---------------------------------------------------------------------------------------------


@dataclass
class _Window:
    frames: torch.Tensor  # (n, S) frame of each slot
    own: torch.Tensor  # (n,) slot of the query's own frame
    center: torch.Tensor  # (Bf, n, S, 2) slid grid centres; Bf = B with flows, else 1
    free: torch.Tensor  # (Bf, n, S, 2) True where the slide did not move the centre
    offsets: torch.Tensor  # (ws,) grid offsets


def _window(qpos, flows, thw, p: SearchParams, dtype: torch.dtype) -> _Window:
    nframes, height, width = thw
    dev = qpos.device
    t, h, w = qpos.unbind(-1)
    slots = torch.arange(p.nslots, device=dev)
    t0 = (t - p.wt).clamp(0, nframes - p.nslots)
    own = t - t0
    center = torch.stack([h, w], dim=-1)[None, :, None, :].to(dtype)  # (1, n, 1, 2)
    if flows is not None:
        f = flows.permute(0, 1, 4, 5, 2, 3)[:, t, h, w]  # (B, n, S, 2)
        f = f * (slots[None, :] != own[:, None])[None, :, :, None]  # own frame: no flow
        center = center + f.to(dtype)
    else:
        center = center.expand(1, -1, p.nslots, -1)
    lo_steps = p.ws // 2
    hi_steps = p.ws - 1 - lo_steps
    s1 = int(p.stride1) if dtype == torch.int64 else p.stride1
    lo = lo_steps * s1
    hi = torch.tensor([height - 1 - hi_steps * s1, width - 1 - hi_steps * s1], device=dev)
    hi = hi.to(dtype)
    slid = torch.maximum(torch.minimum(center, hi), torch.full_like(hi, lo))
    free = (center >= lo) & (center <= hi)
    offsets = (torch.arange(p.ws, device=dev) - lo_steps) * s1
    return _Window(t0[:, None] + slots, own, slid, free, offsets.to(dtype))


def _candidates(win: _Window, p: SearchParams) -> torch.Tensor:
    """All ``W`` candidate positions ``(Bf, n, W, 3)`` in window order."""
    bf, n, nslots, _ = win.center.shape
    ws = p.ws
    ph = win.center[..., 0, None, None] + win.offsets[:, None]  # (Bf, n, S, ws, 1)
    pw = win.center[..., 1, None, None] + win.offsets[None, :]  # (Bf, n, S, 1, ws)
    pt = win.frames.to(ph.dtype)[None, :, :, None, None]
    shape = (bf, n, nslots, ws, ws)
    pos = torch.stack([pt.expand(shape), ph.expand(shape), pw.expand(shape)], dim=-1)
    return pos.reshape(bf, n, nslots * ws * ws, 3)


def _positions(win: _Window, widx: torch.Tensor, qpos: torch.Tensor, p: SearchParams):
    """Positions ``(B, HD, n, K, 3)`` of window indices ``widx`` ``(B, HD, n, K)``; ``-1`` is
    the query's own position ``qpos`` ``(n, 3)``."""
    b, hd, n, nk = widx.shape
    wi = widx.long().clamp(min=0)
    slot, a, c = wi // (p.ws * p.ws), (wi // p.ws) % p.ws, wi % p.ws
    center = win.center[:, None].expand(b, hd, n, p.nslots, 2)
    center = center.gather(-2, slot[..., None].expand(b, hd, n, nk, 2))
    frames = win.frames.expand(b, hd, n, p.nslots).gather(-1, slot)
    pos = torch.stack(
        [frames.to(center.dtype), center[..., 0] + win.offsets[a], center[..., 1] + win.offsets[c]],
        dim=-1,
    )
    own = qpos.to(pos.dtype)[:, None].expand(b, hd, n, nk, 3)
    return torch.where((widx < 0)[..., None], own, pos)


def _own_index(win: _Window, qpos: torch.Tensor, p: SearchParams) -> torch.Tensor:
    """Window index ``(Bf, n)`` of each query's own position (``stride1 == 1`` only)."""
    n = qpos.shape[0]
    center = win.center.gather(2, win.own.view(1, n, 1, 1).expand(win.center.shape[0], n, 1, 2))
    a = qpos[None, :, 1:] - center[:, :, 0].long() + p.ws // 2  # (Bf, n, 2)
    return (win.own[None] * p.ws + a[..., 0]) * p.ws + a[..., 1]


def _chunks(count: int, per_query: int):
    n = max(1, WORKSPACE // max(1, per_query))
    for c0 in range(0, count, n):
        yield c0, min(n, count - c0)


def _stable_argsort(key: torch.Tensor) -> torch.Tensor:
    return torch.sort(key, dim=-1, stable=True).indices


def rank_key(d: torch.Tensor, dist: str) -> torch.Tensor:
    """What the selection sorts by, smaller first: the distance (l2) or minus the product
    (dot), with every key at or past the dtype's largest finite value (an overflow, or a NaN
    from the videos) set to that value, so that all of them tie last, in window order. The
    kernels compare the same keys."""
    key = d if dist == "l2" else -d
    top = torch.finfo(key.dtype).max
    return torch.where(key < top, key, top)


def reported(d: torch.Tensor, dist: str) -> torch.Tensor:
    """The distances of selected results as returned: those whose :func:`rank_key` is the top
    (overflowed, or NaN) are infinitely far, ``+inf`` for l2 and ``-inf`` for dot."""
    far = rank_key(d, dist) == torch.finfo(d.dtype).max
    return torch.where(far, torch.inf if dist == "l2" else -torch.inf, d)


def _selected_dists(d: torch.Tensor, picked: torch.Tensor, k: int, dist: str) -> torch.Tensor:
    """The distances ``d`` at the window indices ``picked``: as :func:`reported` where ``k`` is
    given (a selection), as computed for every candidate (``k`` < 0)."""
    out = d.gather(-1, picked)
    return reported(out, dist) if k >= 0 else out


def _select(d: torch.Tensor, own: torch.Tensor, p: SearchParams) -> torch.Tensor:
    """Window indices ``(B, HD, n, K)`` of the results; ``-1`` stands for the query's own
    position (the first result with ``self_match="anchor"``)."""
    own = own.expand_as(d)
    window_order = torch.arange(d.shape[-1], device=d.device).expand_as(d)
    if p.k >= 0:
        order = _stable_argsort(rank_key(d, p.dist))
    else:
        order = window_order
    if p.self_match == "keep":
        return order[..., : p.nk]
    own_last = order.gather(-1, _stable_argsort(own.gather(-1, order).to(torch.uint8)))
    if p.self_match == "exclude":
        return own_last[..., : p.nk]
    return torch.cat([torch.full_like(order[..., :1], -1), own_last[..., : p.nk - 1]], dim=-1)


def _distance(qp: torch.Tensor, kp: torch.Tensor, dist: str) -> torch.Tensor:
    """Distances between patches; the last four axes ``(pt, C, ps, ps)`` are summed."""
    if dist == "l2":
        return (qp - kp).square().sum((-4, -3, -2, -1))
    return (qp * kp).sum((-4, -3, -2, -1))


# ---------------------------------------------------------------------------------------------
# Reference forward and backward. qvid, kvid: (B, HD, T, C, H, W); flows: (B, T, S, 2, H, W).
# ---------------------------------------------------------------------------------------------


def _search_ref(qvid, kvid, flows, p: SearchParams):
    b, hd, nframes, c, height, width = qvid.shape
    thw = (nframes, height, width)
    shape6, geom = tuple(qvid.shape), p.geom
    qflat, kflat = flat_video(qvid), flat_video(kvid)
    pdtype = _pos_dtype(qvid, flows, p)
    nwin, nk = p.nwin, p.nk
    patch = p.pt * c * p.ps * p.ps
    dists = torch.empty((b, hd, p.count, nk), dtype=qflat.dtype, device=qflat.device)
    inds = torch.empty(
        b, hd, p.count, nk, 3, dtype=_inds_dtype(flows, p.stride1), device=qvid.device
    )
    widx = torch.empty(b, hd, p.count, nk, dtype=torch.int32, device=qvid.device)
    wchunk = max(1, min(nwin, WORKSPACE // max(1, b * hd * patch)))
    for c0, n in _chunks(p.count, b * hd * nwin * patch):
        qpos = p.grid(thw).positions(p.start + c0, n, device=qvid.device)
        win = _window(qpos, flows, thw, p, pdtype)
        cands = _candidates(win, p)  # (Bf, n, W, 3)
        qpos6 = qpos.to(pdtype).expand(b, hd, n, 3)
        qp = read(qflat, shape6, qpos6, geom)[:, :, :, None]  # (B, HD, n, 1, pt, C, ps, ps)
        d = torch.empty((b, hd, n, nwin), dtype=qflat.dtype, device=qflat.device)
        for w0 in range(0, nwin, wchunk):
            w1 = min(nwin, w0 + wchunk)
            pos = cands[:, None, :, w0:w1].expand(b, hd, n, w1 - w0, 3)
            kp = read(kflat, shape6, pos.reshape(b, hd, n * (w1 - w0), 3), geom)
            d[..., w0:w1] = _distance(qp, kp.view(b, hd, n, w1 - w0, *kp.shape[3:]), p.dist)
        own = (cands == qpos[None, :, None, :].to(pdtype)).all(-1)[:, None]  # (Bf, 1, n, W)
        sel = _select(d, own, p)
        chunk = slice(c0, c0 + n)
        widx[:, :, chunk] = sel.to(torch.int32)
        picked = sel.clamp(min=0)
        dists[:, :, chunk] = _selected_dists(d, picked, p.k, p.dist)
        inds[:, :, chunk] = (
            cands[:, None]
            .expand(b, hd, n, nwin, 3)
            .gather(-2, picked[..., None].expand(*picked.shape, 3))
        )
        if p.self_match == "anchor":  # the query itself, wherever it is in the window
            own_kp = read(kflat, shape6, qpos6, geom)[:, :, :, None]
            dists[:, :, chunk, 0] = _distance(qp, own_kp, p.dist)[..., 0]
            inds[:, :, chunk, 0] = qpos6
    return dists.to(qvid.dtype), inds, widx


def _search_triton(qvid, kvid, flows, p: SearchParams):
    """Forward with the Triton kernel: fused distances and top-k, written in final order."""
    from . import _search_triton as kernels

    b, hd, nframes, _, height, width = qvid.shape
    pdtype = _pos_dtype(qvid, flows, p)
    whole = pdtype == torch.int64
    dists, inds, widx = kernels.search_forward(
        qvid, kvid, flows, p, whole, pdtype, _inds_dtype(flows, p.stride1)
    )
    if inds is not None:
        return dists, inds, widx
    # k=None: every candidate in window order, the query's own position moved or dropped
    thw = (nframes, height, width)
    qpos = p.grid(thw).positions(p.start, p.count, device=qvid.device)
    win = _window(qpos, flows, thw, p, pdtype)
    widx = torch.arange(p.nwin, device=qvid.device).expand(b, hd, p.count, p.nwin)
    if p.self_match != "keep":
        own_idx = _own_index(win, qpos, p)[:, None, :, None]  # (Bf, 1, count, 1)
        rest = torch.arange(p.nwin - 1, device=qvid.device)
        rest = rest + (rest >= own_idx).long()  # every index but the own one, in order
        first = [own_idx.expand(b, hd, p.count, 1)] if p.self_match == "anchor" else []
        widx = torch.cat(first + [rest.expand(b, hd, p.count, p.nwin - 1)], dim=-1)
        dists = dists.gather(-1, widx)
        if p.self_match == "anchor":
            widx = torch.cat([torch.full_like(widx[..., :1], -1), widx[..., 1:]], dim=-1)
    inds = _positions(win, widx, qpos, p).to(_inds_dtype(flows, p.stride1))
    return dists.contiguous(), inds.contiguous(), widx.to(torch.int32).contiguous()


def _distance_backward(qflat, kflat, shape6, geom, qpos6, pos_flat, g, dist: str):
    """Backward of the patch distances between the query patches at ``qpos6`` ``(B, HD, n, 3)``
    and the key patches at ``pos_flat`` ``(B, HD, n * K, 3)``, for their gradient ``g``
    ``(B, HD, n, K)``: the gradients of the query and key videos, and that of the key patches
    (for the position gradient)."""
    b, hd, n, nk = g.shape
    qp = read(qflat, shape6, qpos6, geom)[:, :, :, None]  # (B, HD, n, 1, pt, C, ps, ps)
    kp = read(kflat, shape6, pos_flat, geom).view(b, hd, n, nk, *qp.shape[4:])
    g = g[..., None, None, None, None]
    if dist == "l2":
        gkp = -2 * g * (qp - kp)
        gqp = -gkp.sum(3)
    else:
        gkp = g * qp
        gqp = (g * kp).sum(3)
    gkp = gkp.reshape(b, hd, n * nk, *gkp.shape[4:])
    return write(gqp, qpos6, shape6, geom), write(gkp, pos_flat, shape6, geom), gkp


def _search_backward_ref(gdists, ginds, qvid, kvid, flows, widx, p: SearchParams):
    b, hd, nframes, c, height, width = qvid.shape
    thw = (nframes, height, width)
    shape6, geom = tuple(qvid.shape), p.geom
    qflat, kflat = flat_video(qvid), flat_video(kvid)
    acc = qflat.dtype
    pdtype = _pos_dtype(qvid, flows, p)
    nk, ws2 = p.nk, p.ws * p.ws
    gq = torch.zeros(shape6, dtype=acc, device=qvid.device)
    gk = torch.zeros(shape6, dtype=acc, device=qvid.device)
    flow_grad = flows is not None and flows.is_floating_point()
    if flow_grad:
        gflows = torch.zeros(b, nframes, height, width, p.nslots, 2, dtype=acc, device=qvid.device)
    patch = p.pt * c * p.ps * p.ps
    for c0, n in _chunks(p.count, b * hd * max(nk, 1) * patch):
        chunk = slice(c0, c0 + n)
        qpos = p.grid(thw).positions(p.start + c0, n, device=qvid.device)
        win = _window(qpos, flows, thw, p, pdtype)
        wi = widx[:, :, chunk].long()
        qpos6 = qpos.to(pdtype).expand(b, hd, n, 3)
        pos = _positions(win, wi, qpos, p)
        pos_flat = pos.reshape(b, hd, n * nk, 3)
        g = gdists[:, :, chunk].to(acc)
        dq, dk, gkp = _distance_backward(qflat, kflat, shape6, geom, qpos6, pos_flat, g, p.dist)
        gq += dq
        gk += dk
        if not flow_grad:
            continue
        gpos = read_dpos(kflat, shape6, pos_flat, geom, gkp).view(b, hd, n, nk, 3)
        if ginds is not None:
            gpos = gpos + ginds[:, :, chunk].to(acc)
        slot = wi.clamp(min=0) // ws2
        moves = (wi >= 0) & (slot != win.own[:, None])  # positions that follow the flow
        free = win.free[:, None].expand(b, hd, n, p.nslots, 2)
        free = free.gather(-2, slot[..., None].expand(b, hd, n, nk, 2))
        contrib = gpos[..., 1:] * (free & moves[..., None])
        tq, hq, wq = qpos.unbind(-1)
        bidx = torch.arange(b, device=qvid.device).view(b, 1, 1, 1)
        pix = ((tq * height + hq) * width + wq).view(1, 1, n, 1)
        row = ((bidx * nframes * height * width + pix) * p.nslots) + slot
        gflows.view(-1, 2).index_add_(0, row.reshape(-1), contrib.reshape(-1, 2))
    gf = (
        gflows.permute(0, 1, 4, 5, 2, 3).to(flows.dtype).contiguous()
        if flow_grad
        else qvid.new_empty(0)
    )
    return gq.to(qvid.dtype), gk.to(kvid.dtype), gf


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _schema_params(params: type | None = None) -> str:
    """The keyword part of an op's schema, from the fields of a parameter dataclass
    (:class:`SearchParams` by default)."""
    types = {"int": "int", "float": "float", "str": "str"}
    fs = fields(params or SearchParams)
    return ", ".join(f"{types.get(f.type, 'int[]')} {f.name}" for f in fs)


torch.library.define(
    "dnls::search",
    f"(Tensor qvid, Tensor kvid, Tensor? flows, *, {_schema_params()}) -> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "dnls::search_backward",
    "(Tensor gdists, Tensor? ginds, Tensor qvid, Tensor kvid, Tensor? flows, Tensor widx, *, "
    f"{_schema_params()}) -> (Tensor, Tensor, Tensor)",
)


def _int32_frames(*vids: torch.Tensor) -> bool:
    """Whether every offset inside one frame of these videos fits int32, as the Triton search
    kernels assume (frame, head and batch offsets are int64 there); larger frames (2^31
    elements or more) take the reference path."""
    for v in vids:
        inside = sum((n - 1) * abs(s) for n, s in zip(v.shape[3:], v.stride()[3:], strict=True))
        if max(inside + 1, v.shape[3] * v.shape[4] * v.shape[5]) >= 2**31:
            return False
    return True


@torch.library.impl("dnls::search", "default")
def _search_impl(qvid, kvid, flows, **kw):
    p = SearchParams(**{**kw, "region": tuple(kw["region"])})
    if qvid.shape[0] == 0:  # an empty batch
        b, hd = qvid.shape[:2]
        return (
            qvid.new_empty(b, hd, p.count, p.nk),
            qvid.new_empty(b, hd, p.count, p.nk, 3, dtype=_inds_dtype(flows, p.stride1)),
            qvid.new_empty(b, hd, p.count, p.nk, dtype=torch.int32),
        )
    if backend(qvid.device, "search") == "triton" and _int32_frames(qvid, kvid):
        return _search_triton(qvid, kvid, flows, p)
    if _fused_cpu_applies(qvid, flows, p):
        thw = tuple(qvid.shape[i] for i in (2, 4, 5))
        return _cpu.search(qvid, kvid, flows, p, p.grid(thw))
    return _search_ref(qvid, kvid, flows, p)


def _fused_cpu_applies(qvid, flows, p: SearchParams) -> bool:
    """The fused CPU kernel's scope: whole positions, pt == 1, dilation == 1, ``k`` given."""
    return (
        fused_cpu(qvid.device)
        and _cpu.applies(qvid.device, p.pt, p.dilation, flows)
        and _whole(flows, p.stride1)
        and p.k >= 0
    )


@torch.library.register_fake("dnls::search")
def _(qvid, kvid, flows, *, k, count, self_match, ws, wt, stride1, **_):
    b, hd = qvid.shape[:2]
    nwin = (2 * wt + 1) * ws * ws
    nk = k if k >= 0 else nwin - (self_match == "exclude")
    return (
        qvid.new_empty(b, hd, count, nk),
        qvid.new_empty(b, hd, count, nk, 3, dtype=_inds_dtype(flows, stride1)),
        qvid.new_empty(b, hd, count, nk, dtype=torch.int32),
    )


@torch.library.impl("dnls::search_backward", "default")
def _search_backward_impl(gdists, ginds, qvid, kvid, flows, widx, **kw):
    p = SearchParams(**{**kw, "region": tuple(kw["region"])})
    # The deterministic mode (torch.use_deterministic_algorithms) of the Triton backward is a
    # fixed-point one; float64 keeps its precision on the (deterministic) reference path.
    if qvid.shape[0] == 0:  # an empty batch
        gf = torch.zeros_like(flows) if flows is not None and flows.is_floating_point() else None
        gf = qvid.new_empty(0) if gf is None else gf
        return torch.zeros_like(qvid), torch.zeros_like(kvid), gf
    exact = qvid.dtype == torch.float64 and torch.are_deterministic_algorithms_enabled()
    if backend(qvid.device, "search") == "triton" and not exact and _int32_frames(qvid, kvid):
        from . import _search_triton as kernels

        pdtype = _pos_dtype(qvid, flows, p)
        return kernels.search_backward(
            gdists, ginds, qvid, kvid, flows, widx, p, pdtype == torch.int64, pdtype
        )
    return _search_backward_ref(gdists, ginds, qvid, kvid, flows, widx, p)


@torch.library.register_fake("dnls::search_backward")
def _(gdists, ginds, qvid, kvid, flows, widx, **_):
    flow_grad = flows is not None and flows.is_floating_point()
    gf = flows.new_empty(flows.shape) if flow_grad else qvid.new_empty(0)
    return qvid.new_empty(qvid.shape), kvid.new_empty(kvid.shape), gf


def _search_setup(ctx, inputs, keyword_only_inputs, output):
    qvid, kvid, flows = inputs
    ctx.has_flows = flows is not None
    ctx.kw = dict(keyword_only_inputs)
    saved = (qvid, kvid, output[2]) + ((flows,) if flows is not None else ())
    ctx.save_for_backward(*saved)


def _search_backward(ctx, gdists, ginds, _gwidx):
    qvid, kvid, widx, *rest = ctx.saved_tensors
    flows = rest[0] if ctx.has_flows else None
    float_flows = flows is not None and flows.is_floating_point()
    ginds = ginds if (float_flows and ginds is not None and ginds.is_floating_point()) else None
    gq, gk, gf = torch.ops.dnls.search_backward(gdists, ginds, qvid, kvid, flows, widx, **ctx.kw)
    return gq, gk, (gf if float_flows else None)


torch.library.register_autograd("dnls::search", _search_backward, setup_context=_search_setup)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_flows(flows, b, nframes, height, width, wt, device) -> torch.Tensor | None:
    if flows is None:
        return None
    if isinstance(flows, (tuple, list)):
        if len(flows) != 2:
            _checks.fail("flows", flows, "a tensor or a pair (fflow, bflow)", TypeError)
        pair = []
        for i, (f, role) in enumerate(
            zip(flows, ("frame-to-next", "frame-to-previous"), strict=True)
        ):
            f = _checks.check_tensor(f"flows[{i}]", f)
            if tuple(f.shape) != (b, nframes, 2, height, width):
                expected = f"the {role} flow, of shape {(b, nframes, 2, height, width)}"
                _checks.fail(f"flows[{i}]", f, expected)
            pair.append(f)
        if pair[0].dtype != pair[1].dtype:
            _checks.fail("flows[1]", pair[1], f"of dtype {pair[0].dtype} like flows[0]", TypeError)
        tensors = pair
    else:
        f = _checks.check_tensor("flows", flows)
        expected = (b, nframes, 2 * wt + 1, 2, height, width)
        if tuple(f.shape) != expected:
            _checks.fail("flows", f, f"of shape {expected} (B, T, 2*wt+1, 2, H, W) or a pair")
        tensors = [f]
    for i, f in enumerate(tensors):
        name = "flows" if len(tensors) == 1 else f"flows[{i}]"
        if f.dtype not in _checks.FLOAT_DTYPES + _checks.INDEX_INT_DTYPES:
            _checks.fail(name, f, "a floating or int32/int64 tensor", TypeError)
        if f.device != device:
            _checks.fail(name, f, f"on the video's device ({device})")
        if f.is_floating_point():
            _checks.check_data(torch.isfinite(f).all(), name, f, "finite (it holds inf or nan)")
    # whole flows past any frame move a window as far as the frame's edge does (windows are
    # slid inside): clamped, so that the kernels' int32 positions cannot wrap around
    tensors = [f if f.is_floating_point() else f.clamp(-FLOW_LIMIT, FLOW_LIMIT) for f in tensors]
    if len(tensors) == 2:
        return accumulate_flows(tensors[0], tensors[1], wt)
    return tensors[0]


def check_window(ws: int, wt: int, stride1: float, thw: tuple[int, int, int]) -> None:
    """The window must fit the video: ``2*wt + 1`` frames and ``(ws - 1) * stride1 + 1``
    rows and columns."""
    nframes, height, width = thw
    if nframes < 2 * wt + 1:
        _checks.fail(
            "wt", wt, f"at most (T - 1) // 2 = {(nframes - 1) // 2} for T={nframes} frames"
        )
    check_span("ws", ws, stride1, height, width)


def check_span(name: str, n: int, stride1: float, height: int, width: int) -> None:
    """``n`` positions spaced by ``stride1`` (the argument ``name``) must fit the frame."""
    span = (n - 1) * stride1
    if span > min(height, width) - 1:
        _checks.fail(
            name,
            n,
            f"a window that fits the {height}x{width} frame: ({name} - 1) * stride1 = {span:g} "
            f"must be at most {min(height, width) - 1}",
        )


def _check_videos(qvid, kvid, nheads) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key videos (``kvid=None``: the query video), checked and head-split."""
    qvid = _checks.check_video("qvid", qvid)
    hd = _checks.check_nheads(nheads, qvid, "qvid")
    if kvid is None:
        kvid = qvid
    else:
        kvid = _checks.check_video("kvid", kvid)
        _checks.check_same("kvid", kvid, "qvid", qvid)
    return split_heads(qvid, hd), split_heads(kvid, hd)


def search(
    qvid: torch.Tensor,
    kvid: torch.Tensor | None = None,
    *,
    ws: int,
    wt: int = 0,
    ps: int = 7,
    pt: int = 1,
    k: int | None = None,
    dist: str = "l2",
    stride0: int = 1,
    stride1: float = 1,
    dilation: int = 1,
    nheads: int = 1,
    flows: torch.Tensor | Sequence[torch.Tensor] | None = None,
    region: Sequence[int] | None = None,
    start: int = 0,
    count: int | None = None,
    self_match: str = "keep",
    border: str = "reflect",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest patches of each query in a space-time window.

    Args:
        qvid: queries, ``(B, T, C, H, W)`` or head-split ``(B, HD, T, C', H, W)``.
        kvid: keys of the same shape; ``None`` searches ``qvid`` against itself.
        ws: the window is ``ws x ws`` positions spaced by ``stride1`` in each of ``2*wt + 1``
            frames, slid inward where it would leave the video.
        ps, pt, dilation, border: the patch. k: results per query (``None``: all ``W``
            candidates in window order). dist: ``"l2"`` (sum of squared differences, smaller
            is nearer) or ``"dot"`` (sum of products, larger is nearer).
        stride0, region, start, count: the query grid and the batch of it to search.
        nheads: heads of 5-D inputs. flows: ``(B, T, 2*wt+1, 2, H, W)`` or a pair
            ``(fflow, bflow)`` of ``(B, T, 2, H, W)``; integer flows keep whole positions.
        self_match: ``"keep"``, ``"anchor"`` (the query's own position first) or
            ``"exclude"`` (its own position left out).

    Returns:
        ``dists (B, HD, Q, K)`` in the input dtype and ``inds (B, HD, Q, K, 3)`` positions
        ``(t, h, w)``: int32, or float32 with floating flows or a fractional ``stride1``.
        Ties go to the earlier candidate in window order. Differentiable w.r.t. ``qvid``,
        ``kvid`` and floating ``flows`` (through ``dists`` and float ``inds``).

    Example:
        >>> vid = torch.rand(1, 3, 3, 32, 32)
        >>> dists, inds = dnls.search(vid, ws=7, wt=1, ps=5, k=8)
        >>> dists.shape, inds.shape
        (torch.Size([1, 1, 3072, 8]), torch.Size([1, 1, 3072, 8, 3]))
    """
    q6, k6 = _check_videos(qvid, kvid, nheads)
    b, _, nframes, _, height, width = q6.shape

    ws = _checks.check_int("ws", ws, min_value=1)
    wt = _checks.check_int("wt", wt, min_value=0)
    _checks.check_patch_geometry(ps, pt, dilation, border)
    dist = _checks.check_choice("dist", dist, DISTS)
    self_match = _checks.check_choice("self_match", self_match, SELF_MATCH)
    stride0 = _checks.check_int("stride0", stride0, min_value=1)
    stride1 = _checks.check_positive_number("stride1", stride1)
    check_window(ws, wt, stride1, (nframes, height, width))
    nwin = (2 * wt + 1) * ws * ws
    if self_match != "keep" and k is None and stride1 != 1:
        _checks.fail(
            "self_match",
            self_match,
            "'keep' when k is None and stride1 != 1 (the query's own position is then not "
            "always a candidate); pass k",
        )
    kmax = nwin - 1 if self_match == "exclude" else nwin
    if k is not None:
        k = _checks.check_int("k", k, min_value=1)
        if k > kmax:
            _checks.fail(
                "k", k, f"at most {kmax}, the candidates per query (self_match={self_match!r})"
            )
    region = _checks.check_region(region, (nframes, height, width))
    grid = QueryGrid((nframes, height, width), stride0, region)
    start, count = _checks.check_start_count(start, count, grid.count)
    flows = _check_flows(flows, b, nframes, height, width, wt, qvid.device)

    p = SearchParams(
        ws,
        wt,
        ps,
        pt,
        -1 if k is None else k,
        dist,
        stride0,
        stride1,
        dilation,
        region,
        start,
        count,
        self_match,
        border,
    )
    dists, inds, _ = torch.ops.dnls.search(q6, k6, flows, **p.op_kwargs())
    # every position is inside kvid's frames (windows slide inward): gather, scatter and wpsum
    # need not read them again
    _checks.mark_positions(inds, (nframes, height, width), _box(grid, p, flows, inds))
    return dists, inds


def _box(grid: QueryGrid, p: SearchParams, flows, inds) -> tuple[int, ...] | None:
    """The box ``(t0, t1, h0, h1, w0, w1)`` (inclusive) of every position a search's windows
    hold, from its geometry alone (no read of ``inds``): without flows, a query's window
    (frames from ``t - wt``, positions ``ws // 2`` steps of ``stride1`` either side of the
    query), slid inward where it would leave the video (see :func:`_window`), moves with the
    query, so the windows of the batch's queries (within ``grid.bounds``) span from the first
    query's window to the last's, per axis. None with flows (they move the windows) or
    fractional positions."""
    if flows is not None or inds.is_floating_point() or p.count < 1:
        return None
    nt, nh, nw = grid.thw
    ta, tb, ya, yb, xa, xb = grid.bounds(p.start, p.count)
    s1 = int(p.stride1)
    lo, hi = (p.ws // 2) * s1, (p.ws - 1 - p.ws // 2) * s1

    def span(a: int, b: int, n: int) -> tuple[int, int]:  # a slid window's first and last
        return max(0, min(a, n - 1 - hi) - lo), min(n - 1, max(b, lo) + hi)

    t0, t1 = (min(max(t - p.wt, 0), nt - p.nslots) for t in (ta, tb))
    return (max(0, t0), min(nt - 1, t1 + p.nslots - 1), *span(ya, yb, nh), *span(xa, xb, nw))
