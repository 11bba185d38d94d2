"""Context parallelism on torch.distributed: attention over a sequence sharded across ranks.

Each rank holds a shard of the global sequence (`shard_sequence`) and calls `ring_attention` on its
shard; key/value shards travel around the ring of ranks with batched point-to-point transfers
(`torch.distributed.batch_isend_irecv`, NCCL on GPUs, gloo on CPUs), the next transfer posted before
the current block is computed so communication overlaps compute. Each block runs on seqkernels'
attention kernels (any backend with kernels: cpu, cuda, triton) and returns its log-sum-exp; the
partial results are merged by `merge_attention_states`. The backward sends dK/dV around the ring with
the key/value shards and accumulates dQ locally, running the backend's backward kernel on each block
with the *global* output and lse, so every block's probabilities are the global ones.

Layouts (the global sequence is cut into chunks):
- "contiguous": rank r holds chunk r of W. Causal work is unbalanced (the last rank does W blocks,
  the first one).
- "zigzag": 2W chunks, rank r holds chunks r and 2W-1-r. Every rank does the same causal work.

Softcap and attention sinks work: softcap is per score, and the sink joins the merged softmax once.
Sliding windows work on every backend without a kernel change: `_block` cuts each (query chunk,
key chunk) pair down to the sub-block the global band leaves visible, where the band is an ordinary
top-left window. ALiBi uses the kernels' own term on blocks whose global offset is 0 and a float
additive mask of the global distances elsewhere (the kernels take no diagonal offset).
Packed (varlen) batches: `allgather_attention_varlen` all-gathers K/V and runs this rank's rows
with `attention_varlen`, as Llama 3 trains.
Dropout is exact under sharding: each block passes the kernels its place in the global attention
(`dropout_grid`), so it draws the single-device keep mask there (ring-flash-attention has no
dropout); `allgather_attention_varlen`'s pieces do the same in their documents. Every kernel
backend (cpu, cuda, triton) takes that argument.

Models: `use_context_parallel(model, group)` puts every `seqkernels.nn.MultiheadAttention` of a model
(`seqkernels.swap_attention` makes them from torch's) in ring mode and returns a handle that undoes it;
Hugging Face models have `seqkernels.integrations.transformers.use_context_parallel`.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends
from .ops import attention as attn_ops
from .ops._common import check_modifiers, draw_seed

LAYOUTS = ("zigzag", "contiguous")


# ---------------------------------------------------------------------------------------------
# Sharding helpers


def _world(group) -> Tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def chunk_ids(rank: int, world: int, layout: str) -> List[int]:
    """The global chunk indices rank `rank` holds, in the order they sit in its shard."""
    if layout == "contiguous":
        return [rank]
    if layout == "zigzag":
        return [rank, 2 * world - 1 - rank]
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _n_chunks(world: int, layout: str) -> int:
    return world if layout == "contiguous" else 2 * world


def _check_length(L: int, world: int, layout: str, name: str = "the global sequence length"):
    n = _n_chunks(world, layout)
    if L % n != 0:
        raise ValueError(
            f"{name} {L} must be divisible by {n} (layout={layout!r} cuts it into "
            f"{'W' if layout == 'contiguous' else '2W'} = {n} equal chunks for W = {world} ranks)"
        )


def shard_sequence(x: Tensor, group=None, layout: str = "zigzag", seq_dim: int = 2) -> Tensor:
    """This rank's shard of the global tensor `x` (the same `x` on every rank) along `seq_dim`."""
    world, rank = _world(group)
    L = x.shape[seq_dim]
    _check_length(L, world, layout)
    c = L // _n_chunks(world, layout)
    parts = [x.narrow(seq_dim, i * c, c) for i in chunk_ids(rank, world, layout)]
    return torch.cat(parts, dim=seq_dim).contiguous()


def shard_positions(length: int, group=None, layout: str = "zigzag", device=None) -> Tensor:
    """The global position ids of this rank's shard (for RoPE and friends), int64 (L_local,)."""
    return shard_sequence(torch.arange(length, device=device), group, layout, seq_dim=0)


def unshard_sequence(x: Tensor, group=None, layout: str = "zigzag", seq_dim: int = 2) -> Tensor:
    """The global tensor from every rank's shard (an all-gather, then the chunks put in order)."""
    world, _ = _world(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    per = len(chunk_ids(0, world, layout))
    c = x.shape[seq_dim] // per
    chunks = [None] * _n_chunks(world, layout)
    for r, part in enumerate(parts):
        for k, cid in enumerate(chunk_ids(r, world, layout)):
            chunks[cid] = part.narrow(seq_dim, k * c, c)
    return torch.cat(chunks, dim=seq_dim)


# ---------------------------------------------------------------------------------------------
# Merging partial attention results


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint key sets from the results over each: out (..., L, Dv)
    and lse (..., L) (natural log, as `attention(..., return_lse=True)` returns). A row that saw no
    key in one part (lse -inf, out 0) takes the other part's result; a row that saw no key in either
    stays 0 with lse -inf: never NaN. Composite torch ops, so it runs on every device and is
    differentiable; the result is float32 (float64 if either input is)."""
    dtype = torch.promote_types(torch.promote_types(out_a.dtype, out_b.dtype), torch.float32)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    safe = torch.where(total == 0, torch.ones_like(total), total)
    out = (out_a.to(dtype) * (w_a / safe).unsqueeze(-1)) + (out_b.to(dtype) * (w_b / safe).unsqueeze(-1))
    lse = torch.where(total == 0, torch.full_like(m, -math.inf), m + torch.log(safe))
    return out, lse


def _merge_sink(out: Tensor, lse: Tensor, sinks: Tensor) -> Tuple[Tensor, Tensor]:
    """The sink logit joins the merged softmax once: lse' = logaddexp(lse, sink), out scaled by
    exp(lse - lse')."""
    sink = sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    new = torch.logaddexp(lse, sink)
    scale = torch.where(new == -math.inf, torch.zeros_like(new), torch.exp(lse - new))
    return out * scale.unsqueeze(-1), new


# ---------------------------------------------------------------------------------------------
# The ring


class _Ring:
    """Passes tensors one step around the ring: send to rank + 1, receive from rank - 1."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = _world(group)
        # Peers as global ranks (what isend/irecv take), for the default group and subgroups alike.
        peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = peer((self.rank + 1) % self.world)
        self.prev = peer((self.rank - 1) % self.world)

    def start(self, send: Tensor) -> Tuple[Tensor, list]:
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(reqs):
        for r in reqs:
            r.wait()


def _pack(*ts: Tensor) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unpack(buf: Tensor, shapes) -> List[Tensor]:
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(buf[i : i + n].view(s))
        i += n
    return out


@dataclass(frozen=True)
class _Block:
    """One kernel call of the ring: query rows [qa, qb) of a query chunk against keys [ka, kb) of a
    key chunk (offsets inside the chunks), with the window of that sub-block in the kernels' own
    top-left coordinates, and `shift` = global offset of its first query minus that of its first key
    (0: the kernels' own ALiBi distance is the global one)."""

    qa: int
    qb: int
    ka: int
    kb: int
    left: int
    right: int
    shift: int


def _block(q_start: int, k_start: int, c: int, left: int, right: int) -> Optional[_Block]:
    """The part of the (query chunk at global q_start) x (key chunk at global k_start) block, both c
    long, that the global window (left, right) leaves visible (-1: unbounded; causal is right = 0),
    as a sub-block the kernels run exactly with a top-left window; None when no key is visible.

    Query gi sees keys gi - left <= gj <= gi + right. Rows before k_start - right and after
    k_start + c - 1 + left see no key of the chunk; keys before qa - left and after qb - 1 + right are
    seen by no remaining row. In the sub-block's coordinates (li = gi - qa, lj = gj - ka) the band is
    lj >= li - (left - d) and lj <= li + (right + d), d = qa - ka, and the trimming above keeps both
    sides >= 0, so the kernels' window (-1 unbounded, top-left alignment) expresses it; a side that
    covers the whole sub-block becomes -1, so off-diagonal causal blocks run unmasked."""
    qa, qb, ka, kb = q_start, q_start + c, k_start, k_start + c
    if right >= 0:
        qa = max(qa, k_start - right)
    if left >= 0:
        qb = min(qb, k_start + c + left)
    if qa >= qb:
        return None
    if left >= 0:
        ka = max(ka, qa - left)
    if right >= 0:
        kb = min(kb, qb + right)
    if ka >= kb:
        return None
    d = qa - ka
    wl = left - d if left >= 0 else -1
    wr = right + d if right >= 0 else -1
    if wl >= qb - qa - 1:  # the last row's band starts at or before the first key
        wl = -1
    if wr >= kb - ka - 1:  # the first row's band reaches the last key
        wr = -1
    return _Block(qa - q_start, qb - q_start, ka - k_start, kb - k_start, wl, wr, d)


def _blocks(q_ids: List[int], kv_ids: List[int], c: int, left: int, right: int):
    """(query chunk slot, key chunk slot, _Block) for every pair of this rank's query chunks and the
    visiting key chunks that has a visible key."""
    for a, x in enumerate(q_ids):
        for b, y in enumerate(kv_ids):
            blk = _block(x * c, y * c, c, left, right)
            if blk is not None:
                yield a, b, blk


def _grid(q_chunk: int, k_chunk: int, c: int, blk: _Block, L: int, dropout: tuple) -> List[int]:
    """The kernels' dropout_grid of a block: its first query and key at their global positions of the
    (L, L) attention, so its keep mask is the single-device call's there ([] without dropout)."""
    return [q_chunk * c + blk.qa, k_chunk * c + blk.ka, L, L] if dropout[0] > 0 else []


def _alibi_args(slopes: Optional[Tensor], slopes_bh: Optional[Tensor], blk: _Block, B: int, acc: torch.dtype):
    """(attn_mask, alibi_slopes) for one block: the kernels' ALiBi term where the block's top-left
    distance is the global one (shift 0: the diagonal blocks), else the global -slope * |gi - gj| as a
    float additive mask of the sub-block (the kernels take no diagonal offset; this costs Hq x rows x
    keys floats per block, broadcast over the batch when the slopes are per head). `slopes` as the
    caller gave them, `slopes_bh` the kernels' normalized (B, Hq) form of them."""
    if slopes is None:
        return None, None
    if blk.shift == 0:
        return None, slopes_bh
    nq, nk = blk.qb - blk.qa, blk.kb - blk.ka
    i = torch.arange(nq, device=slopes.device, dtype=torch.int64).view(-1, 1) + blk.shift
    j = torch.arange(nk, device=slopes.device, dtype=torch.int64).view(1, -1)
    dist_ = (i - j).abs().to(acc)
    sl = slopes.to(acc)
    bias = -(sl.view(*sl.shape, 1, 1) * dist_)  # (Hq, nq, nk) or (B, Hq, nq, nk)
    if bias.dim() == 3:
        bias = bias.unsqueeze(0)
    return bias.expand(B, -1, nq, nk), None


def _rank0_seed(seed: int, group, device) -> int:
    """Rank 0's dropout seed on every rank of `group` (each rank drew its own from its generator):
    every rank then draws the same keep mask of the global positions."""
    if dist.get_world_size(group) == 1:
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    return int(t.item())


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, meta):
        ring = _Ring(meta["group"])
        W, r = ring.world, ring.rank
        B, Hq, Lq, _ = q.shape
        Dv = v.shape[3]
        layout = meta["layout"]
        q_ids = chunk_ids(r, W, layout)
        c = Lq // len(q_ids)
        fwd = meta["family"][0]
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(B, Hq, Lq, Dv, dtype=acc_dtype, device=q.device)
        lse = torch.full((B, Hq, Lq), -math.inf, dtype=acc_dtype, device=q.device)
        shapes = (k.shape, v.shape)
        block = _pack(k, v)
        for step in range(W):
            reqs = None
            if step + 1 < W:
                nxt, reqs = ring.start(block)  # posted before computing on `block`: overlaps the compute
            kb, vb = _unpack(block, shapes)
            kv_ids = chunk_ids((r - step) % W, W, layout)
            for a, b, blk in _blocks(q_ids, kv_ids, c, *meta["window"]):
                rows = slice(a * c + blk.qa, a * c + blk.qb)
                keys = slice(b * c + blk.ka, b * c + blk.kb)
                mask, slopes = _alibi_args(meta["alibi"], meta["alibi_bh"], blk, B, acc_dtype)
                o, l_ = fwd(
                    q[:, :, rows], kb[:, :, keys], vb[:, :, keys],
                    mask, None, meta["scale"], blk.left, blk.right, False, *meta["dropout"],
                    slopes, None, meta["softcap"], None, None, 0, 0, False,
                    _grid(q_ids[a], kv_ids[b], c, blk, Lq * W, meta["dropout"]),
                )  # fmt: skip
                out[:, :, rows], lse[:, :, rows] = merge_attention_states(out[:, :, rows], lse[:, :, rows], o, l_)
            if reqs is not None:
                _Ring.wait(reqs)
                block = nxt
        if sinks is not None:
            out, lse = _merge_sink(out, lse, sinks)
        out = out.to(q.dtype)
        ctx.meta = meta
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        meta = ctx.meta
        ring = _Ring(meta["group"])
        W, r = ring.world, ring.rank
        layout = meta["layout"]
        bwd = meta["family"][1]
        B, Lq = q.shape[0], q.shape[2]
        q_ids = chunk_ids(r, W, layout)
        c = Lq // len(q_ids)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype).contiguous()
        has_lse_grad = grad_lse is not None and bool((grad_lse != 0).any())
        if has_lse_grad:
            grad_lse = torch.where(torch.isfinite(grad_lse), grad_lse, torch.zeros_like(grad_lse))
        lse32 = lse.to(acc).contiguous()
        det = meta["deterministic"] or torch.are_deterministic_algorithms_enabled()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk_acc = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv_acc = torch.zeros(v.shape, dtype=acc, device=q.device)
        kv_shapes = (k.shape, v.shape)
        kb, vb = k, v
        for step in range(W):
            kv_reqs = None
            if step + 1 < W:  # the next block's keys/values travel while this one is computed
                kv_next, kv_reqs = ring.start(_pack(kb, vb))
            kv_ids = chunk_ids((r - step) % W, W, layout)
            for a, b, blk in _blocks(q_ids, kv_ids, c, *meta["window"]):
                sq = slice(a * c + blk.qa, a * c + blk.qb)
                sk = slice(b * c + blk.ka, b * c + blk.kb)
                mask, slopes = _alibi_args(meta["alibi"], meta["alibi_bh"], blk, B, acc)
                head = (mask, None, meta["scale"], blk.left, blk.right, False)
                tail = (
                    det,
                    slopes,
                    None,
                    meta["softcap"],
                    None,
                    None,
                    0,
                    0,
                    _grid(q_ids[a], kv_ids[b], c, blk, Lq * W, meta["dropout"]),
                )
                qs, ks, vs = q[:, :, sq], kb[:, :, sk], vb[:, :, sk]
                ls = lse32[:, :, sq].contiguous()
                dq_b, dk_b, dv_b, _ = bwd(grad_out[:, :, sq].contiguous(), qs, ks, vs, out[:, :, sq].contiguous(), ls,
                                          *head, *meta["dropout"], *tail)  # fmt: skip
                dq[:, :, sq] += dq_b
                dk_acc[:, :, sk] += dk_b
                dv_acc[:, :, sk] += dv_b
                if has_lse_grad:  # d lse / d s = P (undropped): the backward kernel with V := ones, dO := g, O := 0
                    g = grad_lse[:, :, sq].unsqueeze(-1).to(q.dtype).contiguous()
                    ones = ks.new_ones(ks.shape[:3] + (1,))
                    dq_l, dk_l, _, _ = bwd(g, qs, ks, ones, torch.zeros_like(g), ls, *head, 0.0, 0, 0, *tail)
                    dq[:, :, sq] += dq_l
                    dk_acc[:, :, sk] += dk_l
            # The gradients accumulated for this block follow it around the ring; after W hops they
            # are back at the rank that owns the block.
            if W > 1:
                recv, reqs = ring.start(_pack(dk_acc, dv_acc))
                _Ring.wait(reqs)
                dk_acc, dv_acc = (t.clone() for t in _unpack(recv, (dk_acc.shape, dv_acc.shape)))
            if kv_reqs is not None:
                _Ring.wait(kv_reqs)
                kb, vb = _unpack(kv_next, kv_shapes)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # d sink_h = -sum_i p_sink (dO . O) + sum_i g_lse p_sink over this rank's rows: the
            # local share; a replicated parameter's gradient is summed over ranks by the caller
            # (DDP / all_reduce), as for every other weight.
            # In float64: (B, Hq, L) values summed into Hq, so the sum's rounding stays far below
            # that of the float32 terms.
            f64 = torch.float64
            lse64 = lse.to(f64)
            p_sink = torch.exp(sinks.to(f64).view(1, -1, 1) - lse64)
            p_sink = torch.where(torch.isfinite(lse64), p_sink, torch.zeros_like(p_sink))
            delta = (grad_out.to(f64) * out.to(f64)).sum(-1)
            d = -(p_sink * delta)
            if has_lse_grad:
                d = d + grad_lse.to(f64) * p_sink
            dsinks = d.sum(dim=(0, 2)).to(sinks.dtype)
        return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype), dsinks, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group=None,
    *,
    causal: bool = False,
    layout: str = "zigzag",
    window=None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    deterministic: bool = False,
    backend: Optional[str] = None,
):
    """Attention of this rank's query shard against the whole (sharded) sequence.

    q (B, Hq, L_local, D), k/v (B, Hkv, L_local, D|Dv): this rank's shards in `layout` (see
    `shard_sequence`); every rank of `group` calls this with shards of the same shape. Returns this
    rank's shard of the global output (and, with `return_lse`, of the float32 lse), differentiable
    with respect to q, k, v and `sinks`. `sinks`' gradient is this rank's share (sum it over ranks,
    as for any replicated weight). Causal masking is bottom-right over the global sequence (its
    queries and keys are the same positions, so top-left and bottom-right coincide). `window=(left,
    right)` (-1 unbounded; `causal` caps right at 0) and `alibi_slopes` ((Hq,) or (B, Hq)) are over
    global positions, as `attention` has them on the whole sequence. `deterministic=True` (or torch's
    deterministic flag) asks every block's backward kernel for bitwise repeatable gradients; the ring
    adds the blocks' results in a fixed order, so the whole result is repeatable run to run (across
    world sizes it differs only by the float32 rounding of a different merge order). `dropout_p` is
    exact under sharding: every block draws the keep mask of its global positions (the kernels'
    dropout_grid) with rank 0's seed, so the ring equals the single-device call after the same
    torch.manual_seed (on every kernel backend).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention: torch.distributed is not initialized (call init_process_group first)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    world, _ = _world(group)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v: expected 4-D shards (B, H, L_local, D)")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k: query and key shards must have the same length, got {q.shape[2]} and {k.shape[2]}")
    _check_length(q.shape[2] * world, world, layout, "the global sequence length (L_local * W)")
    call = attn_ops.prepare_attention(
        q, k, v, causal=causal, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
    )  # fmt: skip
    chosen = backends.resolve(attn_ops.OP, q.device, call, backend)
    if chosen == "reference":
        raise backends.BackendError(
            "ring_attention: runs on the kernel backends (cpu, cuda, triton), whose backward takes the global "
            "output and lse; none is available for these inputs: "
            + str(backends.why_not(attn_ops.OP, "cpu", q.device, call))
        )
    _, _, sink_logits = check_modifiers(q, None, None, sinks)
    seed = _rank0_seed(call.seed, group, q.device) if dropout_p else call.seed
    meta = dict(
        dropout=(float(dropout_p), seed, call.offset),
        group=group,
        layout=layout,
        window=(call.window_left, call.window_right),  # global, causal folded in (right = 0)
        # Per head (Hq,) stays so, and the blocks' ALiBi masks broadcast over the batch.
        alibi=None if alibi_slopes is None else alibi_slopes.detach(),
        alibi_bh=call.alibi_slopes,  # (B, Hq) in the accumulation type, as the kernels take them
        deterministic=bool(deterministic),
        scale=call.scale,
        softcap=call.softcap,
        family=attn_ops.FAMILIES[chosen],
    )
    out, lse = _RingAttention.apply(q, k, v, sink_logits, meta)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Packed batches: the all-gather variant


class _AllGather(torch.autograd.Function):
    """Every rank's (T_local, ...) shard, concatenated in rank order (W * T_local, ...); the backward
    sums each rank's gradient of the whole and hands every rank the rows of its own shard
    (reduce-scatter on NCCL; gloo has none, so there an all-reduce and a slice)."""

    @staticmethod
    def forward(ctx, x, group):
        world, _ = _world(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group = group
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        world, rank = _world(ctx.group)
        grad = grad.contiguous()
        n = grad.shape[0] // world
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty((n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        total = grad.clone()  # all_reduce works in place; the incoming gradient is autograd's
        dist.all_reduce(total, group=ctx.group)
        return total[rank * n : (rank + 1) * n].clone(), None


def _global_order(world: int, layout: str, per_rank: int) -> Tensor:
    """Row index turning the rank-order concatenation of every rank's shard back into the global
    sequence (the inverse of shard_sequence's cut, for seq_dim 0)."""
    n_ids = len(chunk_ids(0, world, layout))
    c = per_rank // n_ids
    src = torch.empty(per_rank * world, dtype=torch.int64)
    for r in range(world):  # one slice per chunk: no per-token Python work
        for k_, cid in enumerate(chunk_ids(r, world, layout)):
            src[cid * c : (cid + 1) * c] = torch.arange(r * per_rank + k_ * c, r * per_rank + (k_ + 1) * c)
    return src


@dataclass(frozen=True)
class _Piece:
    """Query rows [qs, qe) of one document (global positions) against its keys [ka, kb), with the
    window those rows need in the kernels' bottom-right alignment."""

    doc: int
    qs: int
    qe: int
    ka: int
    kb: int
    left: int
    right: int


def _pieces(starts: List[int], q_ranges: List[Tuple[int, int]], left: int, right: int) -> List[_Piece]:
    """Cut this rank's query ranges at document edges (`starts`: cu_seqlens as ints). Row gi of
    document [ds, de) sees keys max(ds, gi - left) ..= min(de - 1, gi + right) (-1: unbounded). For rows
    [qs, qe) the keys are [ka, kb) with ka = max(ds, qs - left), kb = min(de, qe + right); bottom-right
    alignment puts row qe - 1's diagonal on key kb - 1 - delta, delta = kb - qe >= 0, so the kernels'
    window is (left + delta, right - delta): both sides stay >= 0 (or -1), and for causal (right = 0)
    delta is 0, the window the caller's."""
    out = []
    for s, e in q_ranges:
        # The documents that meet [s, e): from the one holding s (bisect) to the one holding e - 1.
        for d in range(max(bisect.bisect_right(starts, s) - 1, 0), min(bisect.bisect_left(starts, e), len(starts) - 1)):
            ds, de = starts[d], starts[d + 1]
            qs, qe = max(s, ds), min(e, de)
            if qs >= qe:
                continue
            ka = ds if left < 0 else max(ds, qs - left)
            kb = de if right < 0 else min(de, qe + right)
            delta = kb - qe
            out.append(
                _Piece(d, qs, qe, ka, kb, left + delta if left >= 0 else -1, right - delta if right >= 0 else -1)
            )
    return out


def allgather_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    group=None,
    *,
    causal: bool = False,
    layout: str = "zigzag",
    window=None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    deterministic: bool = False,
    backend: Optional[str] = None,
):
    """Context parallelism for packed batches, as Llama 3 trains: every rank all-gathers the keys and
    values of the whole packed sequence and computes its own query rows against them with
    `seqkernels.attention_varlen` (one call; the rows cut at document edges).

    q (T_local, Hq, D), k (T_local, Hkv, D), v (T_local, Hkv, Dv): this rank's shard, in `layout`
    (`shard_sequence(x, group, layout, seq_dim=0)`), of the token-major packed tensors of T tokens;
    cu_seqlens (int32/int64 (N+1,), 0 ..= T): the documents over global positions, the same on every
    rank (read on the host: pass it on the CPU to avoid a device sync). Every document attends to
    itself only, as `attention_varlen(q, k, v, cu_seqlens, cu_seqlens, causal=..., window=...)` on
    the whole batch. Returns this rank's rows of that (T_local, Hq, Dv), differentiable with respect
    to q, k, v (the keys' and values' gradients are summed over ranks back to their owners) and
    `sinks` (this rank's share), and with `return_lse` the float32 lse (Hq, T_local).

    Memory: the whole sequence's keys and values on every rank (plus the key rows of documents cut by
    a chunk edge twice); communication: one all-gather of K and V forward, one reduce of their
    gradients backward. `dropout_p` is exact: each piece draws the keep mask of its place in its
    document (the kernels' dropout_grid) with rank 0's seed, so the result equals attention_varlen on
    the whole batch (max_seqlen None: the dropout grid of its longest document) after the same
    torch.manual_seed. Refused by name: ALiBi without `causal` (its distance needs the bottom-right
    diagonal of each piece on the global one, which only causal rows have).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("allgather_attention_varlen: torch.distributed is not initialized")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    world, rank = _world(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name}: expected this rank's token-major shard (T_local, H, D), got {tuple(t.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v: shards must have the same number of tokens, got {q.shape[0]}, {k.shape[0]}, "
                         f"{v.shape[0]}")  # fmt: skip
    T = q.shape[0] * world
    _check_length(T, world, layout, "the packed length (T_local * W)")
    if (
        not isinstance(cu_seqlens, Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError("cu_seqlens: expected a 1-D int32 or int64 tensor of document starts (N+1,)")
    starts = [int(x) for x in cu_seqlens.tolist()]
    if not starts or starts[0] != 0 or starts[-1] != T or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(
            f"cu_seqlens: expected 0 = c_0 <= c_1 <= ... <= c_N = T = {T} (the whole packed sequence, every "
            f"rank's T_local * W), got {starts}"
        )
    left, right = attn_ops._combine_window(causal, window)
    if alibi_slopes is not None and right != 0:
        raise NotImplementedError(
            "alibi_slopes: allgather_attention_varlen takes ALiBi with causal=True only (a piece of a document "
            "cut at a chunk edge needs its bottom-right diagonal on the global one)"
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1], got {dropout_p!r}")
    seed = _rank0_seed(draw_seed(), group, q.device) if dropout_p else 0
    longest = max((b - a for a, b in zip(starts, starts[1:])), default=0)  # the dropout grid's dims
    n_ids = len(chunk_ids(rank, world, layout))
    c = q.shape[0] // n_ids
    pieces = _pieces(starts, [(cid * c, (cid + 1) * c) for cid in chunk_ids(rank, world, layout)], left, right)
    # The whole sequence's keys and values, in global order, on every rank.
    order = _global_order(world, layout, q.shape[0]).to(k.device)
    k_all = _AllGather.apply(k, group).index_select(0, order)
    v_all = _AllGather.apply(v, group).index_select(0, order)
    # Local query rows are already in piece order (each chunk cut at document edges, in order).
    # One attention_varlen call per kernel window and, with dropout, per place of the pieces' first
    # query and key in their documents (the dropout_grid offsets); each piece sits at its document's
    # index (empty sequences before it), so the keep mask and the ALiBi slopes are its document's.
    # (A document cut into two pieces of one rank, zigzag, puts the second in another call.)
    groups: dict = {}
    docs_of: dict = {}
    for i, p in enumerate(pieces):
        drop_at = (p.qs - starts[p.doc], p.ka - starts[p.doc]) if dropout_p else (0, 0)
        n = 0
        while p.doc in docs_of.get((p.left, p.right, drop_at, n), ()):
            n += 1
        key = (p.left, p.right, drop_at, n)
        groups.setdefault(key, []).append(i)
        docs_of.setdefault(key, set()).add(p.doc)
    row0 = []
    acc = 0
    for p in pieces:
        row0.append(acc)
        acc += p.qe - p.qs
    slopes_n = None
    if alibi_slopes is not None:
        n_docs = len(starts) - 1
        slopes_n = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.view(1, -1).expand(n_docs, -1)
    dev = q.device
    outs, lses, rows_of = [], [], []
    for (wl, wr, (d_row, d_col), _), idx in groups.items():
        ps = [pieces[i] for i in idx]
        rows = torch.cat([torch.arange(row0[i], row0[i] + pieces[i].qe - pieces[i].qs) for i in idx]).to(dev)
        keys = torch.cat([torch.arange(p.ka, p.kb) for p in ps]).to(dev)
        n_seq = ps[-1].doc + 1
        len_q, len_k = [0] * (n_seq + 1), [0] * (n_seq + 1)
        for p in ps:
            len_q[p.doc + 1], len_k[p.doc + 1] = p.qe - p.qs, p.kb - p.ka
        cu_q = torch.tensor(len_q, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        cu_k = torch.tensor(len_k, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        call = attn_ops.prepare_attention_varlen(
            q if len(groups) == 1 else q.index_select(0, rows),
            k_all.index_select(0, keys),
            v_all.index_select(0, keys),
            cu_q, cu_k, max(len_q), max(len_k),
            window=(wl, wr), scale=scale, dropout_p=dropout_p, softcap=softcap,
            alibi_slopes=None if slopes_n is None else slopes_n[:n_seq], sinks=sinks,
            deterministic=deterministic, seed=seed,
        )  # fmt: skip
        if dropout_p:
            call = dataclasses.replace(call, dropout_grid=(d_row, d_col, longest, longest))
        o, lse = attn_ops.run_varlen(call, backend, True)
        outs.append(o)
        lses.append(lse)
        rows_of.append(rows)
    if len(outs) == 1:
        out, lse = outs[0], lses[0]
    else:  # back to local row order
        inv = torch.empty(q.shape[0], dtype=torch.int64, device=dev)
        inv[torch.cat(rows_of)] = torch.arange(q.shape[0], device=dev)
        out = torch.cat(outs).index_select(0, inv)
        lse = torch.cat(lses, dim=1).index_select(1, inv)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Modules: seqkernels.nn.MultiheadAttention in ring mode


@dataclass(frozen=True)
class ContextParallelSpec:
    """What `use_context_parallel` stores in a module's `context_parallel` attribute."""

    group: Any
    layout: str
    backend: Optional[str] = None


class ContextParallel:
    """The handle `use_context_parallel` returns: `modules` are the modules it put in ring mode;
    `remove()` (or leaving the `with` block) gives each back the `context_parallel` it had before
    (None: local attention). Removing twice does nothing."""

    def __init__(self, modules, spec: ContextParallelSpec):
        self.modules = list(modules)
        self.spec = spec
        self._before = [m.context_parallel for m in self.modules]
        for m in self.modules:
            m.context_parallel = spec

    def remove(self) -> None:
        for m, before in zip(self.modules, self._before):
            if before is None:
                m.__dict__.pop("context_parallel", None)  # back to the class default (None)
            else:
                m.context_parallel = before
        self.modules, self._before = [], []

    def __enter__(self) -> "ContextParallel":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"ContextParallel({len(self.modules)} modules, layout={self.spec.layout!r})"


def use_context_parallel(
    model: torch.nn.Module, group=None, *, layout: str = "zigzag", backend: Optional[str] = None
) -> ContextParallel:
    """Run every `seqkernels.nn.MultiheadAttention` in `model` (`model` itself included) as ring
    attention over `group`, until the returned handle's `remove()` (or the end of its `with` block).

    Each rank then feeds the model its shard of every sequence, `shard_sequence(x, group, layout,
    seq_dim=1 if batch_first else 0)`, and gets its shard of the outputs (`unshard_sequence` gathers
    them). Projections and everything per token run locally; the attention runs over the global
    sequence. Causal attention: `is_causal=True` with `attn_mask=None` or the standard causal mask
    (`generate_square_subsequent_mask`, of the shard's length), causal over the global sequence.
    Dropout in training draws the unsharded module's keep mask (the same after the same
    torch.manual_seed). Refused by name, never run as local attention: `key_padding_mask`, any other
    `attn_mask`, `need_weights=True` (torch's default: pass False), `kdim`/`vdim` other than
    `embed_dim`, `add_bias_kv`, `add_zero_attn`, and key/value shards of another length than the query's.
    Parameter gradients are per-rank shares, to be summed over the group (as DDP does). `backend`
    overrides the modules' own for the ring's blocks (a kernel backend: cpu, cuda, triton).

    torch.nn.MultiheadAttention modules would attend within their shard only, so a model that has any
    is refused: call `seqkernels.swap_attention(model)` first.
    """
    from .nn.multihead_attention import MultiheadAttention, _check_backend

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("use_context_parallel: torch.distributed is not initialized (call init_process_group first)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    _check_backend(backend)
    if backend == "reference":
        raise ValueError("backend: ring attention runs on the kernel backends (cpu, cuda, triton), not 'reference'")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    ours, torch_names = [], []
    for name, m in model.named_modules(remove_duplicate=True):
        if isinstance(m, MultiheadAttention):
            ours.append(m)
        elif isinstance(m, torch.nn.MultiheadAttention):
            torch_names.append(name or "<model>")
    if torch_names:
        raise TypeError(
            f"model: has torch.nn.MultiheadAttention modules ({', '.join(torch_names)}), which would attend "
            "within this rank's shard only; call seqkernels.swap_attention(model) first"
        )
    if not ours:
        raise ValueError(
            "model: has no seqkernels.nn.MultiheadAttention to run as ring attention (for a Hugging Face model "
            "use seqkernels.integrations.transformers.use_context_parallel)"
        )
    return ContextParallel(ours, ContextParallelSpec(group, layout, backend))
