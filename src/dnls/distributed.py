"""Search a video whose frames are split across the ranks of a process group.

Every rank holds a contiguous block of frames of the same video: rank ``r`` of the group holds
global frames ``[a_r, a_r + T_r)``, blocks in rank order, ``T_r >= 1`` (blocks may differ in
size). A query at global frame ``t`` reads the key frames ``t0 .. t0 + 2*wt + pt - 1``
(``t0`` its window's first frame, slid inward at the ends of the video) and its own frames
``t .. t + pt - 1``, so each rank needs a few frames of its neighbours: its *halo*.

:func:`gather_halo` works out, on every rank, which global frames each rank needs (the same
plan everywhere, from the block sizes shared once with ``all_gather``), and moves them with
point-to-point sends and receives (``torch.distributed.batch_isend_irecv``). The exchange is an
autograd function: in the backward pass the gradient of every received frame is sent back to
the rank that owns it and added there, so the gradients on each rank's own frames are exactly
the single-process gradients. :func:`sharded_search` runs :func:`dnls.search` on the local
frames plus halo, restricted to the rank's own query frames, and returns positions in global
frame coordinates.

Every rank of the group must make the same calls with the same arguments (shapes may differ
only in ``T``), and must run the backward pass through them when any rank does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from . import _checks
from ._common import split_heads
from .ops.search import search

# ---------------------------------------------------------------------------------------------
# The plan: which frames each rank needs, and who sends them
# ---------------------------------------------------------------------------------------------


def _reflect(i: int, n: int) -> int:
    """Mirror a frame index into ``[0, n)`` without repeating the edge (the ``reflect`` rule)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i %= period
    return period - i if i >= n else i


def frame_span(
    block: tuple[int, int], nframes: int, *, wt: int, pt: int, border: str
) -> tuple[int, int]:
    """The global frames ``[lo, hi)`` that the queries of frames ``block = [a, b)`` read.

    The span is chosen so that :func:`dnls.search` on those frames alone reads exactly what it
    reads on the whole video: it reaches the last frame whenever a patch would pass it (so the
    ``border`` rule applies at the same place), and under ``reflect`` it starts early enough
    that mirrored frames are mirrored the same way.

    Args:
        block: ``(a, b)``, the global frames of the queries, ``0 <= a < b <= nframes``.
        nframes: ``T`` of the whole video, at least ``2*wt + 1``.
        wt, pt, border: as in :func:`dnls.search`.

    Returns:
        ``(lo, hi)`` with ``lo <= a`` and ``hi >= b``.
    """
    a, b = block
    nslots = 2 * wt + 1

    def first(t: int) -> int:
        return min(max(t - wt, 0), nframes - nslots)

    lo, last = first(a), first(b - 1) + 2 * wt + pt - 1  # ``last``: the last frame read, inclusive
    if last <= nframes - 1:
        return lo, last + 1
    if border == "zero":
        return lo, nframes
    beyond = range(nframes, last + 1)
    lo = min([lo] + [_reflect(f, nframes) for f in beyond])
    if any(_reflect(f - lo, nframes - lo) + lo != _reflect(f, nframes) for f in beyond):
        lo = 0  # patches longer than the video: mirrored more than once
    return lo, nframes


@dataclass(frozen=True)
class _Plan:
    group: tdist.ProcessGroup
    me: int  # this process's rank in the group
    peers: tuple[int, ...]  # global rank of each group rank
    blocks: tuple[tuple[int, int], ...]  # global frames held by each group rank
    spans: tuple[tuple[int, int], ...]  # global frames needed by each group rank

    def transfers(self):
        """``(src, dst, f0, f1)``: group rank ``src`` sends frames ``[f0, f1)`` to ``dst``, in
        one order shared by every rank (so sends and receives pair up)."""
        for dst, (lo, hi) in enumerate(self.spans):
            for src, (a, b) in enumerate(self.blocks):
                f0, f1 = max(lo, a), min(hi, b)
                if src != dst and f0 < f1:
                    yield src, dst, f0, f1


def _run(ops: list) -> None:
    if ops:
        for work in tdist.batch_isend_irecv(ops):
            work.wait()


def _exchange(plan: _Plan, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Local blocks ``(B, T_r, ...)`` -> the rank's span ``(B, hi - lo, ...)``."""
    lo, hi = plan.spans[plan.me]
    a, b = plan.blocks[plan.me]
    outs = []
    for x in xs:
        out = x.new_empty(x.shape[0], hi - lo, *x.shape[2:])
        out[:, a - lo : b - lo] = x
        outs.append(out)
    ops, received = [], []
    for src, dst, f0, f1 in plan.transfers():
        for x, out in zip(xs, outs, strict=True):
            if src == plan.me:
                block = x[:, f0 - a : f1 - a].contiguous()
                ops.append(tdist.P2POp(tdist.isend, block, plan.peers[dst], plan.group))
            elif dst == plan.me:
                buf = x.new_empty(x.shape[0], f1 - f0, *x.shape[2:])
                ops.append(tdist.P2POp(tdist.irecv, buf, plan.peers[src], plan.group))
                received.append((out, f0 - lo, buf))
    _run(ops)
    for out, i0, buf in received:
        out[:, i0 : i0 + buf.shape[1]] = buf
    return outs


def _exchange_back(plan: _Plan, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The adjoint of :func:`_exchange`: span gradients -> gradients of the local blocks, each
    frame's gradient summed over every rank that used it."""
    lo, _ = plan.spans[plan.me]
    a, b = plan.blocks[plan.me]
    outs = [g[:, a - lo : b - lo].clone() for g in grads]
    ops, received = [], []
    for src, dst, f0, f1 in plan.transfers():
        for g, out in zip(grads, outs, strict=True):
            if dst == plan.me:
                part = g[:, f0 - lo : f1 - lo].contiguous()
                ops.append(tdist.P2POp(tdist.isend, part, plan.peers[src], plan.group))
            elif src == plan.me:
                buf = g.new_empty(g.shape[0], f1 - f0, *g.shape[2:])
                ops.append(tdist.P2POp(tdist.irecv, buf, plan.peers[dst], plan.group))
                received.append((out, f0 - a, buf))
    _run(ops)
    for out, i0, buf in received:
        out[:, i0 : i0 + buf.shape[1]] += buf
    return outs


class _HaloExchange(torch.autograd.Function):
    """Forward: receive the halo frames of floating tensors. Backward: send their gradients
    back to their owners and add them there. One round of messages each way."""

    @staticmethod
    def forward(ctx, plan: _Plan, *xs: torch.Tensor):
        ctx.plan = plan
        return tuple(_exchange(plan, xs))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return (None, *_exchange_back(ctx.plan, grads))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Halo:
    """A rank's frames plus the halo frames its queries read.

    Attributes:
        qvid, kvid: global frames ``[lo, hi)``, head-split ``(B, HD, hi - lo, C', H, W)``;
            ``kvid`` is ``qvid`` itself for a self-search.
        flows: the flows of those frames for :func:`dnls.search` (``None`` without flows).
        region: the rank's own frames as a :func:`dnls.search` region of the local frames.
        offset: ``lo``, to add to local frame indices to make them global.
        block: ``(a, b)``, the rank's own global frames. nframes: ``T`` of the whole video.
    """

    qvid: torch.Tensor
    kvid: torch.Tensor
    flows: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
    region: tuple[int, int, int, int, int, int]
    offset: int
    block: tuple[int, int]
    nframes: int


def _meta_device(x: object, group) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    if tdist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_local(qvid, kvid, flows, nheads, wt, pt, border):
    """Local checks; returns the head-split videos and the meta row shared with all ranks."""
    qvid = _checks.check_video("qvid", qvid)
    hd = _checks.check_nheads(nheads, qvid, "qvid")
    if kvid is not None:
        kvid = _checks.check_video("kvid", kvid)
        _checks.check_same("kvid", kvid, "qvid", qvid)
    _checks.check_int("wt", wt, min_value=0)
    _checks.check_patch_geometry(1, pt, 1, border)
    q6 = split_heads(qvid, hd)
    b, _, t, _, h, w = q6.shape
    if flows is not None:
        pair = isinstance(flows, (tuple, list))
        tensors = list(flows) if pair else [flows]
        if pair and len(tensors) != 2:
            _checks.fail("flows", flows, "a tensor or a pair (fflow, bflow)", TypeError)
        for i, f in enumerate(tensors):
            name = f"flows[{i}]" if pair else "flows"
            f = _checks.check_tensor(name, f)
            shape = (b, t, 2, h, w) if pair else (b, t, 2 * wt + 1, 2, h, w)
            if tuple(f.shape) != shape:
                _checks.fail(name, f, f"of shape {shape}: this rank's frames (T_r = {t})")
            if f.device != qvid.device:
                _checks.fail(name, f, f"on the video's device ({qvid.device})")
            if f.dtype not in _checks.FLOAT_DTYPES + _checks.INDEX_INT_DTYPES:
                _checks.fail(name, f, "a floating or int32/int64 tensor", TypeError)
            if f.is_floating_point() and not torch.isfinite(f).all():
                _checks.fail(name, f, "finite (it holds inf or nan)")
    meta = [1, b, hd, t, q6.shape[3], h, w, int(kvid is not None), int(flows is not None)]
    return qvid, kvid, hd, meta


def gather_halo(
    qvid: torch.Tensor,
    kvid: torch.Tensor | None = None,
    *,
    wt: int = 0,
    pt: int = 1,
    nheads: int = 1,
    flows: torch.Tensor | Sequence[torch.Tensor] | None = None,
    border: str = "reflect",
    group: tdist.ProcessGroup | None = None,
) -> Halo:
    """Receive the halo frames the queries of this rank's frames read, from the ranks that
    hold them.

    Collective: every rank of ``group`` must call it with the same arguments. Use it directly to
    search a rank's frames in query batches (``start``/``count``) with one exchange::

        halo = gather_halo(vid, wt=wt, pt=pt, group=group)
        for start, count in dnls.query_grid(halo.qvid.shape, region=halo.region).batches(n):
            dists, inds = dnls.search(halo.qvid, halo.kvid, ws=ws, wt=wt, pt=pt,
                                      flows=halo.flows, region=halo.region,
                                      start=start, count=count)
            # global frames: inds[..., 0] + halo.offset

    Args:
        qvid: this rank's frames ``(B, T_r, C, H, W)`` or ``(B, HD, T_r, C', H, W)``.
        kvid: keys of the same shape, or ``None`` for a self-search.
        wt, pt, border: the search's temporal window, patch length and border rule; they fix
            which frames are read.
        nheads: heads of 5-D videos.
        flows: this rank's flows: ``(B, T_r, 2*wt+1, 2, H, W)`` (entries of frame ``t`` refer
            to the frames of ``t``'s window, so they need no exchange) or a pair
            ``(fflow, bflow)`` of ``(B, T_r, 2, H, W)`` (exchanged like the frames).
        group: the process group (default the world); blocks are in group-rank order.

    Returns:
        A :class:`Halo`. Gradients reaching its tensors flow back to the inputs of the ranks
        that own the frames.
    """
    if not tdist.is_available() or not tdist.is_initialized():
        raise RuntimeError("gather_halo needs an initialised torch.distributed process group")
    group = group if group is not None else tdist.group.WORLD
    size, me = tdist.get_world_size(group), tdist.get_rank(group)
    error, meta = None, [0] * 9
    try:
        qvid, kvid, hd, meta = _check_local(qvid, kvid, flows, nheads, wt, pt, border)
    except (TypeError, ValueError) as e:
        error = e
    device = _meta_device(qvid, group)
    rows = [torch.zeros(9, dtype=torch.int64, device=device) for _ in range(size)]
    tdist.all_gather(rows, torch.tensor(meta, dtype=torch.int64, device=device), group=group)
    metas = [r.tolist() for r in rows]
    if error is not None:
        raise error
    bad = [r for r, m in enumerate(metas) if not m[0]]
    if bad:
        _checks.fail(
            "qvid", qvid, f"valid on every rank, with valid arguments (ranks {bad} refused theirs)"
        )
    for r, m in enumerate(metas):
        if m[1:3] + m[4:] != meta[1:3] + meta[4:]:
            _checks.fail(
                "qvid",
                qvid,
                f"the same (B, HD, C, H, W), kvid and flows on every rank (rank {r} has "
                f"B, HD, C, H, W = {m[1:3] + m[4:7]} and {'a' if m[7] else 'no'} kvid, "
                f"{'' if m[8] else 'no '}flows)",
            )
    sizes = [m[3] for m in metas]
    nframes = sum(sizes)
    if nframes < 2 * wt + 1:
        _checks.fail(
            "wt", wt, f"at most (T - 1) // 2 = {(nframes - 1) // 2} for T={nframes} frames in all"
        )
    starts = [sum(sizes[:r]) for r in range(size)]
    blocks = tuple((s, s + n) for s, n in zip(starts, sizes, strict=True))
    spans = tuple(frame_span(blk, nframes, wt=wt, pt=pt, border=border) for blk in blocks)
    peers = tuple(tdist.get_global_rank(group, r) for r in range(size))
    plan = _Plan(group, me, peers, blocks, spans)

    q6 = split_heads(qvid, hd)
    k6 = q6 if kvid is None else split_heads(kvid, hd)
    lo, hi = spans[me]
    a, b = blocks[me]
    # frames first: (B, T_r, HD, C', H, W), like the flows
    videos = [v.transpose(1, 2) for v in ([q6] if kvid is None else [q6, k6])]
    pair = isinstance(flows, (tuple, list))
    floating = videos + ([f for f in flows if f.is_floating_point()] if pair else [])
    whole = [f for f in flows if not f.is_floating_point()] if pair else []
    moved = list(_HaloExchange.apply(plan, *floating))
    moved_whole = _exchange(plan, whole)
    q_ext = moved.pop(0).transpose(1, 2)
    k_ext = q_ext if kvid is None else moved.pop(0).transpose(1, 2)
    if pair:
        flows = tuple((moved if f.is_floating_point() else moved_whole).pop(0) for f in flows)
    elif flows is not None:  # only the rank's own queries use flows: zeros for the halo
        before = flows.new_zeros(flows.shape[0], a - lo, *flows.shape[2:])
        after = flows.new_zeros(flows.shape[0], hi - b, *flows.shape[2:])
        flows = torch.cat([before, flows, after], 1)
    height, width = q6.shape[-2:]
    return Halo(q_ext, k_ext, flows, (a - lo, b - lo, 0, height, 0, width), lo, (a, b), nframes)


def sharded_search(
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
    start: int = 0,
    count: int | None = None,
    self_match: str = "keep",
    border: str = "reflect",
    group: tdist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dnls.search` of a video whose frames are split across the ranks of ``group``.

    Rank ``r`` holds global frames ``[a_r, a_r + T_r)`` (blocks in group-rank order, any sizes
    ``T_r >= 1``). Its queries are the global query points (spacing ``stride0``, whole frames)
    in its own frames, in raster order; ``start``/``count`` select a batch of them. The result
    equals the matching slice of a single-process search of the whole video, with positions in
    global frames; gradients summed over ranks equal the single-process gradients.

    Collective: every rank must call it with the same arguments (videos differing only in
    ``T_r``) and, when any rank runs a backward pass through the result, every rank must.

    Args:
        qvid, kvid: this rank's frames, ``(B, T_r, C, H, W)`` or ``(B, HD, T_r, C', H, W)``.
        flows: this rank's flows, ``(B, T_r, 2*wt+1, 2, H, W)`` or a pair of
            ``(B, T_r, 2, H, W)`` (see :func:`gather_halo`).
        group: the process group (default the world).
        ws, wt, ps, pt, k, dist, stride0, stride1, dilation, nheads, self_match, border:
            as in :func:`dnls.search`.

    Returns:
        ``dists (B, HD, Q_r, K)`` and ``inds (B, HD, Q_r, K, 3)`` with global frame indices,
        ``Q_r`` the number of this rank's queries (or ``count``).

    Example:
        >>> # torchrun --nproc-per-node 2 script.py; each rank holds half of the frames
        >>> torch.distributed.init_process_group("nccl")
        >>> mine = video[:, rank * 8 : (rank + 1) * 8].cuda()
        >>> dists, inds = dnls.distributed.sharded_search(mine, ws=9, wt=2, k=16)
    """
    halo = gather_halo(
        qvid, kvid, wt=wt, pt=pt, nheads=nheads, flows=flows, border=border, group=group
    )
    dists, inds = search(
        halo.qvid,
        halo.kvid if kvid is not None else None,
        ws=ws,
        wt=wt,
        ps=ps,
        pt=pt,
        k=k,
        dist=dist,
        stride0=stride0,
        stride1=stride1,
        dilation=dilation,
        flows=halo.flows,
        region=halo.region,
        start=start,
        count=count,
        self_match=self_match,
        border=border,
    )
    shift = torch.tensor([halo.offset, 0, 0], device=inds.device, dtype=inds.dtype)
    return dists, inds + shift
