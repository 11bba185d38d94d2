"""KV cache in Triton: the append kernel (contiguous and paged caches) and split-K decode attention.

Contract: docs/INTERNALS.md ("KV cache"). Launchers: ``kv_cache_append``, ``decode_attention``;
``append_unsupported_reason`` / ``decode_unsupported_reason`` say when inputs cannot run here;
``STATIC_CONFIGS`` lists every compiled variant for the ahead-of-time report.

Append: one program per (sequence, kv head, BLOCK_T tokens) copies the K and V rows to the slots
their positions map to; a token whose position or block id is out of range is skipped (masked
store), so nothing is ever written out of bounds even without the host check.

Decode: the rows of one program are (query token t, query head g) pairs of one KV head's group,
``r = t * G + g``, so each K/V tile is loaded once for every query head that reads it, and a row
tile spans a contiguous range of query positions (a prefill chunk stops at its last row's key).
Query t sits at ``pos = len - Tq + t`` and sees key j iff ``pos - wl <= j <= pos + wr`` and
``j < len`` (``wr = 0``: causal)::

    len = 6, Tq = 2, G = 2, wl = -1, wr = 0      key j: 0 1 2 3 4 5
    r=0 (t=0, g=0, pos 4)                               x x x x x .
    r=1 (t=0, g=1, pos 4)                               x x x x x .
    r=2 (t=1, g=0, pos 5)                               x x x x x x
    r=3 (t=1, g=1, pos 5)                               x x x x x x

The visible key range of the tile is cut into ``num_splits`` chunks (a multiple of BLOCK_N each),
one program per chunk (grid axis 2). With one split the program writes the output and lse
directly; otherwise it writes a float32 partial output and its lse, and ``_decode_merge_kernel``
combines them: ``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``. Scores
``q.k * scale`` and the running max stay in the natural domain and only differences go through
``exp2``: ``p = exp2((s - m) * log2(e))`` (folding ``log2(e)`` into the scale would overflow float32
for scores beyond FLT_MAX / log2(e) ~ 2.36e38); ``lse = m + log(l)``. Slots at or past ``len`` are
never loaded (masked loads with ``other=0``), and masked scores are selected to ``-inf``, so
garbage there cannot leak into the result.

Score modifiers (constexpr switches, off: the plain kernel): softcap ``s <- c * tanh(s / c)``, then
ALiBi ``s <- s - slope[b, h] * |pos - j|``, before visibility; a sink per query head joins the
softmax denominator with no value, merged after the key loop with one split, and once by the merge
pass (``lse = log(sum_s exp(lse_s) + exp(sink))``) with several, whose partials leave it out.

Packed batches (VARLEN, docs/INTERNALS.md "Packed sequences"): the new rows and q are (1, H, total, D)
views of token-major tensors, sequence b owns rows ``[cu[b], cu[b+1])`` clamped into ``[0, total]``.
The append finds each row's sequence by binary search over ``cu``; decode has no padded
``B x max_Tq`` grid and no host sync: ``ceil(G * total_q / BLOCK_M) + B`` row tiles per kv head, each
program finds its (sequence, tile) by binary search over the cumulative tile counts (built with
torch ops on the device), programs past the last tile mask everything; out has ``(total_q, Hq, Dv)``
storage and rows in no sequence keep 0 / -inf.

Interpreter (TRITON_INTERPRET=1, CPU tensors): tiles are cast to float32 right after loading
(``UPCAST``: the interpreter's bfloat16 arithmetic is wrong) and one small config runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import capabilities
from ..ops._common import packed_tile_offsets
from ._common import (
    INTERPRET,
    TRITON_DTYPE,
    StaticConfig,
    block_dim,
    dot_precision,
    lazy_static_configs,
    refusal,
    static_signature,
    tanh,
)

__all__ = [
    "kv_cache_append",
    "decode_attention",
    "append_unsupported_reason",
    "decode_unsupported_reason",
    "STATIC_CONFIGS",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = capabilities.TABLE["decode_attention"]["triton"].max_head_dim

# Every decode buffer comes from here; the tests swap in a NaN-filled allocator to prove that the
# kernels write every element.
_alloc = torch.empty

# --------------------------------------------------------------------------------------------
# Append
# --------------------------------------------------------------------------------------------


@triton.jit
def _last_at_most(Arr, n, x, n_iter, cap, CLAMP: tl.constexpr):
    """The largest b in [0, n) with ``Arr[b] <= x`` (CLAMP: ``min(max(Arr[b], 0), cap) <= x``, the
    clamped starts of seq_span), elementwise for a tensor x; 0 when none. Binary search over the
    B + 1 entries of cumulative counts, ``n_iter >= bit_length(n)`` steps; every probe lies in
    [0, n), so unchecked (decreasing, oversized) offsets give some b in range, never a stray load."""
    lo = x * 0
    hi = lo + n
    for _ in range(n_iter):
        active = hi - lo > 1
        mid = (lo + hi) // 2
        v = tl.load(Arr + mid).to(tl.int64)
        if CLAMP:
            v = tl.minimum(tl.maximum(v, 0), cap)
        lo = tl.where(active & (v <= x), mid, lo)
        hi = tl.where(active & (v > x), mid, hi)
    return lo


@triton.jit
def _packed_span(Cu, b, total):
    """Rows [q0, q1) of sequence b of a packed batch, clamped into [0, total] as seq_span does."""
    q0 = tl.minimum(tl.maximum(tl.load(Cu + b).to(tl.int64), 0), total)
    q1 = tl.minimum(tl.maximum(tl.load(Cu + b + 1).to(tl.int64), q0), total)
    return q0, q1


def _search_steps(n: int) -> int:
    """Steps of _last_at_most over n entries."""
    return max(1, int(n).bit_length())


@triton.jit
def _kv_cache_append_kernel(
    KCache,
    VCache,
    KNew,
    VNew,
    Seqlens,
    BlockTable,
    Cu,
    nseq,
    n_iter,
    H,
    T,
    capacity,
    block_size,
    max_blocks,
    num_blocks,
    stride_kc0,
    stride_kc1,
    stride_kc2,
    stride_vc0,
    stride_vc1,
    stride_vc2,
    stride_kn0,
    stride_kn1,
    stride_kn2,
    stride_kn3,
    stride_vn0,
    stride_vn1,
    stride_vn2,
    stride_vn3,
    stride_bt0,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """VARLEN: k_new / v_new are (1, H, total, D) views of packed rows (T = total); row t belongs
    to the sequence whose span of Cu holds it (a row in none is skipped) and goes to position
    cache_seqlens[seq] + t - start. Otherwise row t of batch entry b goes to cache_seqlens[b] + t."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    if VARLEN:
        seq = _last_at_most(Cu, nseq, t, n_iter, T, CLAMP=True)
        q0, q1 = _packed_span(Cu, seq, T)
        p = tl.load(Seqlens + seq).to(tl.int64) + t - q0
        ok = (t < T) & (t >= q0) & (t < q1) & (p >= 0) & (p < capacity)
    else:
        seq = b
        p = tl.load(Seqlens + b).to(tl.int64) + t
        ok = (t < T) & (p >= 0) & (p < capacity)
    if PAGED:
        col = tl.where(ok, p // block_size, 0)
        blk = tl.load(BlockTable + seq * stride_bt0 + col, mask=ok, other=-1).to(tl.int64)
        ok = ok & (blk >= 0) & (blk < num_blocks)
        outer = tl.where(ok, blk, 0)
        slot = p % block_size
    else:
        outer = tl.zeros([BLOCK_T], dtype=tl.int64) + seq
        slot = p
    d = tl.arange(0, BLOCK_D)
    dm = ok[:, None] & (d[None, :] < D)
    x = tl.load(KNew + b * stride_kn0 + h * stride_kn1 + t[:, None] * stride_kn2 + d[None, :] * stride_kn3, mask=dm)
    tl.store(
        KCache + outer[:, None] * stride_kc0 + h * stride_kc1 + slot[:, None] * stride_kc2 + d[None, :], x, mask=dm
    )
    dv = tl.arange(0, BLOCK_DV)
    dvm = ok[:, None] & (dv[None, :] < DV)
    y = tl.load(VNew + b * stride_vn0 + h * stride_vn1 + t[:, None] * stride_vn2 + dv[None, :] * stride_vn3, mask=dvm)
    tl.store(
        VCache + outer[:, None] * stride_vc0 + h * stride_vc1 + slot[:, None] * stride_vc2 + dv[None, :], y, mask=dvm
    )


def _append_block_t(T: int, D: int, Dv: int, interpret: bool = INTERPRET) -> int:
    if interpret:
        return min(16, triton.next_power_of_2(max(T, 1)))
    # About 4K elements (K and V) per program: 16-byte accesses with few registers of addresses each.
    per_row = triton.next_power_of_2(D) + triton.next_power_of_2(Dv)
    return max(1, min(triton.next_power_of_2(max(T, 1)), 4096 // per_row))


def kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cu_seqlens=None) -> None:
    """Arguments as normalized by seqkernels.ops.kv_cache.prepare_append (docs/INTERNALS.md). With
    cu_seqlens (int32 (N+1,), values unchecked), k_new / v_new are the (1, H, total, D) views of the
    packed rows and N = cache_seqlens.numel()."""
    B, H, T, D = k_new.shape
    Dv = v_new.shape[-1]
    varlen = cu_seqlens is not None
    nseq = cache_seqlens.numel() if varlen else B
    if B == 0 or H == 0 or T == 0 or nseq == 0:
        return
    paged = block_table is not None
    if paged:
        block_size, max_blocks = k_cache.shape[2], block_table.shape[1]
        capacity, bt, bt_stride = max_blocks * block_size, block_table, block_table.stride(0)
    else:
        block_size, max_blocks, capacity = 1, 1, k_cache.shape[2]
        bt, bt_stride = cache_seqlens, 0  # never read
    block_t = _append_block_t(T, D, Dv)
    grid = (B * H, triton.cdiv(T, block_t))
    _kv_cache_append_kernel[grid](
        k_cache,
        v_cache,
        k_new,
        v_new,
        cache_seqlens,
        bt,
        cu_seqlens if varlen else cache_seqlens,  # never read unless VARLEN
        nseq,
        _search_steps(nseq),
        H,
        T,
        capacity,
        block_size,
        max_blocks,
        k_cache.shape[0],
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        *k_new.stride(),
        *v_new.stride(),
        bt_stride,
        D=D,
        DV=Dv,
        BLOCK_T=block_t,
        BLOCK_D=triton.next_power_of_2(D),
        BLOCK_DV=triton.next_power_of_2(Dv),
        PAGED=paged,
        VARLEN=varlen,
        num_warps=4,
    )


# --------------------------------------------------------------------------------------------
# Decode attention
# --------------------------------------------------------------------------------------------


@triton.jit
def _decode_attention_kernel(
    Q,
    KCache,
    VCache,
    Seqlens,
    BlockTable,
    Cu,
    TileCu,
    nseq,
    n_iter,
    Alibi,
    Sinks,
    Out,
    Lse,
    scale,
    softcap,
    Tq,
    G,
    n_rows,
    Hkv,
    capacity,
    block_size,
    num_blocks,
    window_left,
    window_right,
    num_splits,
    stride_q0,
    stride_q1,
    stride_q2,
    stride_q3,
    stride_k0,
    stride_k1,
    stride_k2,
    stride_v0,
    stride_v1,
    stride_v2,
    stride_o0,
    stride_o1,
    stride_o2,
    stride_o3,
    stride_os,
    stride_l0,
    stride_l1,
    stride_l2,
    stride_ls,
    stride_bt0,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """SOFTCAP / ALIBI modify the scores as attention_ref does (cap, then ``- slope * |pos - j|``,
    then visibility). SINKS merges the row's sink into the denominator after the keys; the launcher
    sets it only without splits, since with splits the merge pass adds the sink once.

    VARLEN: q, Out, Lse (and the partials) are (1, Hq, total_q, .) views of packed rows (Tq =
    total_q); axis 0 enumerates (row tile, kv head) pairs over all sequences, TileCu (nseq + 1,)
    holds the cumulative row tiles per sequence, and a program finds its sequence b by binary
    search, then works on rows [q0, q0 + Tq_b) of the views exactly as the padded kernel does on
    batch entry b. Programs past the last tile mask everything."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(2)
    hkv = (pid_bh % Hkv).to(tl.int64)
    if VARLEN:
        tile = pid_bh // Hkv
        valid = tile < tl.load(TileCu + nseq)
        b = _last_at_most(TileCu, nseq, tile, n_iter, 0, CLAMP=False).to(tl.int64)
        pid_m = tile - tl.load(TileCu + b)
        q0, q1 = _packed_span(Cu, b, Tq)
        Tq_b = q1 - q0
        n_rows_b = tl.where(valid, G * Tq_b, 0)
        b_io = b * 0  # the views' one batch entry
    else:
        pid_m = tl.program_id(1)
        b = (pid_bh // Hkv).to(tl.int64)
        q0 = 0
        Tq_b = Tq
        n_rows_b = n_rows
        b_io = b

    r0 = pid_m * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows_b
    t = (rows // G).to(tl.int64)
    hq = hkv * G + (rows % G)
    length = tl.minimum(tl.maximum(tl.load(Seqlens + b).to(tl.int64), 0), capacity)
    pos = length - Tq_b + t
    t_io = q0 + t  # row of the tensors

    # Keys any row of this tile can see, then this program's share of them.
    r_last = tl.maximum(tl.minimum(r0 + BLOCK_M, n_rows_b) - 1, r0)
    hi = length
    if window_right >= 0:
        hi = tl.minimum(hi, length - Tq_b + r_last // G + window_right + 1)
    lo = length * 0
    if window_left >= 0:
        lo = tl.maximum(lo, length - Tq_b + r0 // G - window_left)
    hi = tl.maximum(hi, lo)
    if VARLEN:
        hi = tl.where(r0 < n_rows_b, hi, lo)  # a program past the last tile reads no key
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    k_lo = tl.minimum(hi, lo + split * chunk)
    k_hi = tl.minimum(hi, k_lo + chunk)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b_io * stride_q0 + hq[:, None] * stride_q1 + t_io[:, None] * stride_q2 + d[None, :] * stride_q3,
        mask=row_ok[:, None] & (d[None, :] < D),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    vis_lo = tl.where(window_left >= 0, pos - window_left, -1)
    vis_hi = tl.where(window_right >= 0, pos + window_right, capacity)
    if ALIBI:
        slope = tl.load(Alibi + b * (Hkv * G) + hq, mask=row_ok, other=0.0)

    for start in range(k_lo, k_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < k_hi
        if PAGED:
            blk = tl.load(BlockTable + b * stride_bt0 + j // block_size, mask=j_ok, other=-1).to(tl.int64)
            j_ok = j_ok & (blk >= 0) & (blk < num_blocks)
            outer = tl.where(j_ok, blk, 0)
            slot = j % block_size
        else:
            outer = tl.zeros([BLOCK_N], dtype=tl.int64) + b
            slot = j
        k = tl.load(
            KCache + outer[:, None] * stride_k0 + hkv * stride_k1 + slot[:, None] * stride_k2 + d[None, :],
            mask=j_ok[:, None] & (d[None, :] < D),
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if SOFTCAP:
            s = softcap * tanh(s * tl.fdiv(1.0, softcap, ieee_rounding=False))
        if ALIBI:
            s = s - slope[:, None] * tl.abs(pos[:, None] - j[None, :]).to(tl.float32)
        visible = j_ok[None, :] & (j[None, :] >= vis_lo[:, None]) & (j[None, :] <= vis_hi[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Differences before the log2(e) factor: scores near FLT_MAX cannot overflow.
        alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
        p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            VCache + outer[:, None] * stride_v0 + hkv * stride_v1 + slot[:, None] * stride_v2 + dv[None, :],
            mask=j_ok[:, None] & (dv[None, :] < DV),
            other=0.0,
        )
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SINKS:
        # One more online-softmax step with the sink's logit and no value (-inf: adds 0).
        sink = tl.load(Sinks + hq, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m_i, sink)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
        l_i = l_i * alpha + tl.exp2((sink - m_safe) * 1.4426950408889634)
        acc = acc * alpha[:, None]
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_ptr = (
        Out
        + split * stride_os
        + b_io * stride_o0
        + hq[:, None] * stride_o1
        + t_io[:, None] * stride_o2
        + dv[None, :] * stride_o3
    )
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(Lse + split * stride_ls + b_io * stride_l0 + hq * stride_l1 + t_io * stride_l2, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    OPart,
    LPart,
    Sinks,
    Cu,
    nseq,
    n_iter,
    Out,
    Lse,
    Hq,
    Tq,
    num_splits,
    stride_p0,
    stride_p1,
    stride_p2,
    stride_p3,
    stride_ps,
    stride_lp0,
    stride_lp1,
    stride_lp2,
    stride_lps,
    stride_o0,
    stride_o1,
    stride_o2,
    stride_l0,
    stride_l1,
    stride_l2,
    DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SINKS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Combines the splits' partial outputs; SINKS adds the head's sink to the denominator here,
    once (the split programs leave it out). VARLEN: one batch entry of Tq = total_q packed rows; a
    row in no sequence of Cu is left as initialized (0 / -inf)."""
    row = tl.program_id(0)
    t = (row % Tq).to(tl.int64)
    hq = ((row // Tq) % Hq).to(tl.int64)
    b = (row // (Tq * Hq)).to(tl.int64)
    if VARLEN:
        seq = _last_at_most(Cu, nseq, t, n_iter, Tq, CLAMP=True)
        q0, q1 = _packed_span(Cu, seq, Tq)
        covered = (t >= q0) & (t < q1)
    else:
        covered = True
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(
        LPart + s * stride_lps + b * stride_lp0 + hq * stride_lp1 + t * stride_lp2, mask=s_ok, other=float("-inf")
    )
    mx = tl.max(lse_s, 0)
    if SINKS:
        sink = tl.load(Sinks + hq)
        mx = tl.maximum(mx, sink)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse_s - mx_safe)
    total = tl.sum(w, 0)
    if SINKS:
        total += tl.exp(sink - mx_safe)
    o = tl.load(
        OPart + s[:, None] * stride_ps + b * stride_p0 + hq * stride_p1 + t * stride_p2 + dv[None, :] * stride_p3,
        mask=s_ok[:, None] & (dv[None, :] < DV),
        other=0.0,
    )
    # Weights are selected (not multiplied) away for empty splits, whose partial output is 0 anyway.
    merged = tl.sum(tl.where((w > 0.0)[:, None], w[:, None] * o, 0.0), 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), mx_safe + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(
        Out + b * stride_o0 + hq * stride_o1 + t * stride_o2 + dv,
        merged.to(Out.dtype.element_ty),
        mask=(dv < DV) & covered,
    )
    tl.store(Lse + b * stride_l0 + hq * stride_l1 + t * stride_l2, lse, mask=covered)


def _decode_config(n_rows: int, D: int, Dv: int, dtype: torch.dtype, interpret: bool = INTERPRET, mods: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen so that no variant spills (checked by the static
    report for sm_80 and sm_90): float32 tiles with exact (IEEE) products live in registers, so they stay
    16 x 16; 16-bit tiles grow to 64 query rows (a GQA group or a prefill chunk) with 8 warps at wide
    heads. `mods` (softcap or ALiBi): the variants where their registers made ptxas spill or keep a stack
    frame get more warps (float32, 64-wide) or half the key tile (16-bit, 256-wide, 32+ rows)."""
    block_m = max(16, min(64, triton.next_power_of_2(n_rows)))
    if interpret:
        return block_m, 16, 4, 1
    widest = max(block_dim(D), block_dim(Dv))
    if dtype == torch.float32:
        return 16, 16, (8 if widest > 128 or (mods and widest <= 64) else 4), 2
    if widest <= 64:
        return block_m, 64, 4, 2
    if widest <= 128:
        return block_m, 64, (8 if block_m == 64 else 4), 2
    return block_m, (16 if mods and block_m >= 32 else 32), (8 if block_m >= 32 else 4), 2


def decode_attention(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    block_table,
    scale,
    window_left,
    window_right,
    num_splits,
    alibi_slopes=None,
    sinks=None,
    softcap=0.0,
    cu_seqlens_q=None,
    max_seqlen_q=0,
):
    """Arguments as normalized by seqkernels.ops.kv_cache.prepare_decode; returns (out, lse).
    alibi_slopes (B, Hq) or (Hq,), sinks (Hq,): read as float32; softcap > 0 caps the scores.

    Packed (cu_seqlens_q int32 (B+1,), values unchecked; B = cache_seqlens.numel()): q is the
    (1, Hq, total_q, D) view of token-major queries, sequence b's rows are [cu[b], cu[b+1]);
    out is (1, Hq, total_q, Dv) with (total_q, Hq, Dv) storage, lse (1, Hq, total_q), rows in no
    sequence 0 / -inf. max_seqlen_q (0: unknown) sizes the row tile. No host sync: the grid covers
    ceil(G * total_q / BLOCK_M) + B row tiles per kv head and each program finds its sequence."""
    varlen = cu_seqlens_q is not None
    B, Hq, Tq, D = q.shape
    if varlen:
        B = cache_seqlens.numel()
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.detach().to(device=q.device, dtype=torch.float32).expand(B, Hq).contiguous()
    if sinks is not None:
        sinks = sinks.detach().to(device=q.device, dtype=torch.float32).reshape(Hq).contiguous()
    has_cap = bool(softcap and softcap > 0.0)
    Hkv, Dv = k_cache.shape[1], v_cache.shape[-1]
    G = Hq // Hkv
    n_rows = G * Tq
    if varlen:
        # Rows in no sequence (unchecked offsets only) keep these values.
        out = torch.zeros((Tq, Hq, Dv), device=q.device, dtype=q.dtype).permute(1, 0, 2).unsqueeze(0)
        lse = torch.full((1, Hq, Tq), float("-inf"), device=q.device, dtype=torch.float32)
        per_seq = max_seqlen_q if max_seqlen_q > 0 else -(-Tq // max(B, 1))
        if out.numel() == 0 and lse.numel() == 0 or B == 0:
            return out, lse
    else:
        out = _alloc((B, Hq, Tq, Dv), device=q.device, dtype=q.dtype)
        lse = _alloc((B, Hq, Tq), device=q.device, dtype=torch.float32)
        per_seq = Tq
        if out.numel() == 0 and lse.numel() == 0:
            return out, lse
    paged = block_table is not None
    if paged:
        block_size, capacity = k_cache.shape[2], block_table.shape[1] * k_cache.shape[2]
        bt, bt_stride = block_table, block_table.stride(0)
    else:
        block_size, capacity, bt, bt_stride = 1, k_cache.shape[2], cache_seqlens, 0
    block_m, block_n, warps, stages = _decode_config(
        G * per_seq, D, Dv, q.dtype, mods=has_cap or alibi_slopes is not None
    )
    # Decode attention is causal: the right side of the window is clamped to 0 (-1 included), as in
    # decode_attention_ref; a query never sees the later queries of its own chunk.
    window_right = 0
    split = num_splits > 1
    OB = q.shape[0]  # packed: the views' one batch entry
    if split:
        o_dst = _alloc((num_splits, OB, Hq, Tq, Dv), device=q.device, dtype=torch.float32)
        l_dst = _alloc((num_splits, OB, Hq, Tq), device=q.device, dtype=torch.float32)
        o_strides = (*o_dst.stride()[1:], o_dst.stride(0))
        l_strides = (*l_dst.stride()[1:], l_dst.stride(0))
    else:
        o_dst, l_dst = out, lse
        o_strides = (*out.stride(), 0)
        l_strides = (*lse.stride(), 0)
    if varlen:
        # Cumulative row tiles per sequence, on the device (no host sync); Tq is total_q here.
        tile_cu = packed_tile_offsets(cu_seqlens_q, G, block_m, Tq)
        grid = ((triton.cdiv(n_rows, block_m) + B) * Hkv, 1, num_splits)
        cu_arg = cu_seqlens_q
    else:
        grid = (B * Hkv, triton.cdiv(n_rows, block_m), num_splits)
        tile_cu = cu_arg = cache_seqlens  # never read
    _decode_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        bt,
        cu_arg,
        tile_cu,
        B,
        _search_steps(B),
        q if alibi_slopes is None else alibi_slopes,  # unused pointers: never read
        q if sinks is None else sinks,
        o_dst,
        l_dst,
        float(scale),
        float(softcap) if has_cap else 0.0,
        Tq,
        G,
        n_rows,
        Hkv,
        capacity,
        block_size,
        k_cache.shape[0],
        window_left,
        window_right,
        num_splits,
        *q.stride(),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        *o_strides,
        *l_strides,
        bt_stride,
        D=D,
        DV=Dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_dim(D),
        BLOCK_DV=block_dim(Dv),
        PAGED=paged,
        UPCAST=INTERPRET,
        DOT_PRECISION=dot_precision(q.dtype),
        SOFTCAP=has_cap,
        ALIBI=alibi_slopes is not None,
        SINKS=sinks is not None and not split,
        VARLEN=varlen,
        num_warps=warps,
        num_stages=stages,
    )
    if split:
        _decode_merge_kernel[(OB * Hq * Tq,)](
            o_dst,
            l_dst,
            q if sinks is None else sinks,
            cu_arg,
            B,
            _search_steps(B),
            out,
            lse,
            Hq,
            Tq,
            num_splits,
            *o_strides,
            *l_strides,
            *out.stride()[:3],
            *lse.stride(),
            DV=Dv,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            BLOCK_DV=triton.next_power_of_2(Dv),
            SINKS=sinks is not None,
            VARLEN=varlen,
            num_warps=4 if Dv >= 128 else 2,
        )
    return out, lse


# --------------------------------------------------------------------------------------------
# Backend limits
# --------------------------------------------------------------------------------------------


def append_unsupported_reason(k_cache, k_new) -> str | None:
    """Why the Triton append refuses this cache, or None (the capability table's answer)."""
    return refusal("kv_cache_append", capabilities.Features(dtype=k_cache.dtype, device=k_cache.device))


def decode_unsupported_reason(q, k_cache, v_cache) -> str | None:
    """Why Triton decode refuses these inputs, or None (the capability table's answer)."""
    return refusal(
        "decode_attention",
        capabilities.Features(dtype=q.dtype, device=q.device, head_dims=(q.shape[-1], v_cache.shape[-1])),
    )


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile list
# --------------------------------------------------------------------------------------------


# Strides of a contiguous last dimension are 1, which Triton specializes into a constant at run time.
_UNIT_STRIDES = {"stride_q3", "stride_kn3", "stride_vn3", "stride_o3", "stride_p3"}
_POINTERS = {
    "Q",
    "KCache",
    "VCache",
    "KNew",
    "VNew",
    "Seqlens",
    "BlockTable",
    "Alibi",
    "Sinks",
    "Out",
    "Lse",
    "OPart",
    "LPart",
    "Cu",
    "TileCu",
}
_INDEX_POINTERS = {"Seqlens", "BlockTable", "Cu", "TileCu"}
_FP32_POINTERS = {"Lse", "OPart", "LPart", "Alibi", "Sinks"}
_FLOAT_ARGS = {"scale", "softcap"}
# Integer arguments that are multiples of 16 for the usual head dims (row strides); lengths, counts
# and windows are not.
_ALIGNED_INTS = {
    "stride_q0",
    "stride_q1",
    "stride_q2",
    "stride_k0",
    "stride_k1",
    "stride_k2",
    "stride_v0",
    "stride_v1",
    "stride_v2",
    "stride_kc0",
    "stride_kc1",
    "stride_kc2",
    "stride_vc0",
    "stride_vc1",
    "stride_vc2",
}


def _static_signature(fn, dtype: torch.dtype, constexprs: dict, out_fp32: bool = False):
    def pointer_type(name):
        if name not in _POINTERS:
            return None
        if name in _INDEX_POINTERS:
            return "*i32"
        if name in _FP32_POINTERS or (out_fp32 and name == "Out"):
            return "*fp32"
        return f"*{TRITON_DTYPE[dtype]}"

    return static_signature(
        fn, constexprs, pointer_type, lambda name: name in _ALIGNED_INTS, _UNIT_STRIDES, _FLOAT_ARGS
    )


def _static_configs() -> list:
    """The variants the launchers pick on a GPU, each listed once (the report compiles every entry for
    every arch): decode for head-dim buckets 64/128/256, one decode row (BLOCK_M 16) and, for 16-bit
    inputs, a full GQA/prefill tile (BLOCK_M 64), paged (the gathers make it the heavier one) for every
    combination plus the contiguous layout at D=128; the split writer (float32 partials); the merge
    pass; the append copy. The paged variants again with every score modifier ("mods": softcap,
    ALiBi, and sinks except in the split writer, whose merge pass adds them; the merge with sinks).
    The packed (VARLEN) forms at D=128, paged: decode at both row tiles and the split writer, the
    merge with sinks, the append.

    Tensor cores are expected of the 16-bit 64-row tiles (mma.sync on sm_80, wgmma on sm_90). The
    16-row tiles of single-token decode use mma.sync on both archs, since wgmma needs 64 rows per warp
    group; that kernel is bound by reading the cache, so they are not held to it. float32 runs exact
    (IEEE) FMA products, not TF32 tensor cores."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        elt = TRITON_DTYPE[dtype]
        for bucket in (64, 128, 256):
            for rows in (1,) if dtype == torch.float32 else (1, 64):
                layouts = (True, False) if (bucket == 128 and rows == 1) else (True,)
                variants = [(p, False, False) for p in layouts] + [(True, True, False)]
                if bucket == 128:
                    variants.append((True, False, True))
                for paged, mods, varlen in variants:
                    bm, bn, warps, stages = _decode_config(rows, bucket, bucket, dtype, interpret=False, mods=mods)
                    for split in (False, True) if (bucket == 128 and rows == 1 and paged) else (False,):
                        constexprs = dict(
                            D=bucket,
                            DV=bucket,
                            BLOCK_M=bm,
                            BLOCK_N=bn,
                            BLOCK_D=bucket,
                            BLOCK_DV=bucket,
                            PAGED=paged,
                            UPCAST=False,
                            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                            SOFTCAP=mods,
                            ALIBI=mods,
                            SINKS=mods and not split,
                            VARLEN=varlen,
                        )
                        sig, consts, attrs = _static_signature(
                            _decode_attention_kernel, dtype, constexprs, out_fp32=split
                        )
                        name = (
                            f"_decode_attention_kernel {elt} D{bucket} BLOCK_M={bm} BLOCK_N={bn} "
                            f"{'paged' if paged else 'contiguous'}{' split' if split else ''}"
                            f"{' mods' if mods else ''}{' varlen' if varlen else ''} warps={warps} stages={stages}"
                        )
                        mma = dtype != torch.float32 and bm >= 64
                        out.append(
                            StaticConfig(
                                _decode_attention_kernel,
                                sig,
                                consts,
                                warps,
                                stages,
                                mma,
                                arch=None,
                                attrs=attrs,
                                name=name,
                            )
                        )
    for bucket in (64, 128, 256):
        for sinks, varlen in ((False, False), (True, False)) + (((True, True),) if bucket == 128 else ()):
            constexprs = dict(DV=bucket, BLOCK_S=16, BLOCK_DV=bucket, SINKS=sinks, VARLEN=varlen)
            sig, consts, attrs = _static_signature(_decode_merge_kernel, torch.bfloat16, constexprs)
            warps = 4 if bucket >= 128 else 2
            out.append(
                StaticConfig(
                    _decode_merge_kernel,
                    sig,
                    consts,
                    warps,
                    1,
                    False,
                    arch=None,
                    attrs=attrs,
                    name=f"_decode_merge_kernel bf16 D{bucket} BLOCK_S=16{' sinks' if sinks else ''}"
                    f"{' varlen' if varlen else ''} warps={warps}",
                )
            )
        for paged, varlen in ((False, False), (True, False)) + (((True, True),) if bucket == 128 else ()):
            bt = _append_block_t(512, bucket, bucket, interpret=False)
            constexprs = dict(
                D=bucket, DV=bucket, BLOCK_T=bt, BLOCK_D=bucket, BLOCK_DV=bucket, PAGED=paged, VARLEN=varlen
            )
            sig, consts, attrs = _static_signature(_kv_cache_append_kernel, torch.bfloat16, constexprs)
            out.append(
                StaticConfig(
                    _kv_cache_append_kernel,
                    sig,
                    consts,
                    4,
                    1,
                    False,
                    arch=None,
                    attrs=attrs,
                    name=f"_kv_cache_append_kernel bf16 D{bucket} BLOCK_T={bt} "
                    f"{'paged' if paged else 'contiguous'}{' varlen' if varlen else ''} warps=4",
                )
            )
    return out


STATIC_CONFIGS: list  # the ahead-of-time compile list, built on first access
__getattr__ = lazy_static_configs(globals(), _static_configs)
