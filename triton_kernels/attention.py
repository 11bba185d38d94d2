"""Fused attention in Triton: FlashAttention-2 style forward and recomputing backward.

Contract: docs/INTERNALS.md (normalized arguments, visibility rule, dropout Philox rule).
Launchers: ``attention_fwd``, ``attention_bwd``; ``unsupported_reason`` says when an input cannot
run here; ``STATIC_CONFIGS`` lists every compiled variant for the ahead-of-time report.

Visibility of key ``j`` from query row ``i`` of batch ``b`` (``off_b = Lk_b - Lq`` bottom-right,
``0`` top-left; ``wl``/``wr`` the window, ``-1`` unbounded)::

          keys j ->            visible iff  i + off_b - wl <= j <= i + off_b + wr
    rows  . . x x x . . .                   and j < Lk_b and mask[b, h, i, j]
     i    . . . x x x . .
     |    . . . . x x x .      x: visible (wl = 2, wr = 0, off_b = 2)
     v    . . . . . x x x

Tiling. Each query block of BLOCK_M rows walks only the key tiles that can hold a visible key
(``_key_range``): tiles wholly inside the band and below ``Lk_b`` run without any visibility
test or bounds check ("full" tiles); the tiles that straddle an edge of the band or the end of
the keys run the masked variant. The dK/dV kernel does the same per key block over query tiles
(``_query_range``). A float or bool ``attn_mask`` is read blockwise through its strides (stride 0
on broadcast dimensions, never materialized) on every visited tile.

Numerics. Scores ``s = q.k * scale + mask`` and the running row max ``m`` stay in the natural
domain; only differences are taken to base 2: ``p = exp2((s - m) * log2(e))``, ``alpha =
exp2((m_old - m_new) * log2(e))``, ``lse = m + log(l)``. Folding ``log2(e)`` into the scale (one
multiply less per score) would overflow float32 for scores or masks beyond FLT_MAX / log2(e)
(~2.36e38): a row whose visible keys all carry ``finfo.min`` (the Hugging Face mask value) would
turn into a "no visible key" row. The dK/dV kernel likewise evaluates ``exp2((s - lse) * log2(e))``
with the natural lse. Accumulation is float32. A row that sees no key has ``l == 0``: its output
is written as 0 and its lse as -inf, and the backward treats such a row's lse as +inf so its
probabilities, hence its gradients, are 0.
Rows with ``|lse| > 128`` (every visible key under a large mask, or huge scores) take two fix-up
passes that do nothing elsewhere: the float32 lse cannot carry ``log(l)`` accurately there
(``-1e9 + log(Lk)`` rounds to ``-1e9``; at ``-65504``, float16's mask value, the rounding of lse is
2^-9, a per-row factor on P that float16 gradients already show), so
``_attention_bwd_fixup_kernel`` sums ``exp(s - lse)`` over the row and rescales its dO and delta
(on which the gradients are linear) by the inverse; the dQ kernel keeps 16-bit inputs' scores in
the log2 domain (right on every other row, and its tightest configs leave no register for the extra
multiply; float32 inputs run it in the natural domain, see _bwd_dq_tiles), and
``_attention_bwd_fixup_dq_kernel`` recomputes dQ on those rows.
Dropout zeroes probabilities after normalization (the denominator uses the undropped ones, as
torch does); kept ones are scaled by ``1 / (1 - p)``; the keep mask is regenerated in the
backward from ``(seed, offset, b, h, i, j)``.

Score modifiers (constexpr switches SOFTCAP, ALIBI, SINKS: off, the plain kernels are unchanged), on
the scaled score before the mask, in this order: ``s <- c * tanh(s / c)`` (softcap ``c``), then
``s <- s - slope[b, h] * |i + off_b - j|`` (ALiBi, no gradient to the slopes). A sink is one more
logit per head in the softmax denominator with no value: the forward merges it after the key loop
(one more online-softmax step), so lse includes it and a row that sees no key gets output 0 and
lse = sink (-inf sink: no sink). The backward recomputes P = exp(s - lse) with the same modifiers;
dS gets the cap's factor ``1 - tanh^2`` before it meets Q or K; ``dsink[h] = -sum_(b, i) p_sink *
delta`` with ``p_sink = exp(sink - lse)``, per row in the preprocess kernel (rescaled with the row by
the lse fix-up) and summed per head by the launcher (deterministic). Calls with softcap or ALiBi use
the heavy tuning lists, where _MODS_TABLES replaces the entries that spill with them.

Backward: ``delta = rowsum(dO * O)`` (one small kernel, which also copies dO), the lse fix-up
above, then a dK/dV kernel (one program per key block and kv head, walking the query tiles of
every query head of its GQA group in one flat loop, so the group sum needs no atomics and is
deterministic), a dQ kernel (one program per query block and query head, walking key tiles) and
the dQ fix-up. 256-wide heads run dK and dV as two launches of the dK/dV kernel, since both
float32 accumulators do not fit in registers beside the tile math.
Every kernel is deterministic, so the ``deterministic`` flag of the op is always honoured.

Packed sequences (``cu_seqlens``, constexpr VARLEN; docs/INTERNALS.md): q, k, v are (1, H, total, D)
views of token-major tensors. The same kernels run with a 1-D tile grid over the packed rows
(``ceil(total / BLOCK) + N`` programs, no host sync); each program finds its sequence and local tile
(``_varlen_tile``), clamps the sequence's spans into the tensors (``_seq_span``) and from there is
the one-sequence kernel with local indices: ``lq``/``lk_b`` the sequence's lengths (``off_b = lk_b -
lq``), ``q_start``/``k_start`` its first rows, ``s64`` its index for ALiBi and the dropout index
(whose dims Lq, Lk are max_seqlen_q/k). Outputs start as 0 / -inf, so rows in no sequence (unchecked
cu_seqlens) are defined; the backward's preprocess kernel works per row and runs unchanged.

Precision: float16/bfloat16 products on tensor cores (wgmma on sm_90, mma.sync on sm_80) with
float32 accumulation; float32 inputs use exact IEEE products (FMA units) unless
SEQKERNELS_TRITON_TF32=1 asks for TF32 tensor cores (faster, 10-bit mantissa products).

Tuning: per architecture class (sm_80, sm_90), element size and head-dim bucket, the tables
below list the autotune candidates, separately for calls with an attn_mask or dropout (the mask
tile and the Philox state need registers that the largest tiles do not have). The autotune key
is the head dims, the feature flags and the power-of-two buckets of Lq and Lk.

Interpreter (TRITON_INTERPRET=1, CPU tensors): tiles are cast to float32 right after loading
(``UPCAST``), since the interpreter's bfloat16 arithmetic is wrong and float16 matmuls in numpy
are slow, and autotuning is pruned to one small config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import capabilities
from ._common import (
    INTERPRET,
    TRITON_DTYPE,
    StaticConfig,
    block_dim,
    device_arch,
    dot_precision,
    lazy_static_configs,
    length_bucket,
    refusal,
    static_signature,
    tanh,
)
from .philox import dropout_keep, dropout_threshold, split_u64

__all__ = ["MAX_HEAD_DIM", "STATIC_CONFIGS", "attention_bwd", "attention_fwd", "unsupported_reason"]

MAX_HEAD_DIM = capabilities.TABLE["attention"]["triton"].max_head_dim
_LOG2E = 1.4426950408889634

# Every output buffer comes from here; the tests swap in a NaN-filled allocator to prove that the
# kernels write every element.
_alloc = torch.empty


# --------------------------------------------------------------------------------------------
# Tile ranges
# --------------------------------------------------------------------------------------------


@triton.jit
def _key_range(
    m0,
    Lq,
    lk_b,
    off_b,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
):
    """Key tiles for query rows [m0, m0 + BLOCK_M): returns (lo, full_lo, full_hi, hi).

    [lo, full_lo) and [full_hi, hi) are walked with visibility masks, [full_lo, full_hi) without;
    lo, full_lo, full_hi are multiples of BLOCK_N, hi is the exclusive end of the visible keys.
    """
    m_end = tl.minimum(m0 + BLOCK_M, Lq)  # rows past Lq are never stored, so they do not widen the band
    lo = m0 * 0
    hi = lk_b
    full_lo = m0 * 0
    full_hi = lk_b
    if WINDOW_LEFT:
        lo = tl.maximum(m0 + off_b - window_left, 0)
        full_lo = tl.maximum(m_end - 1 + off_b - window_left, 0)
    if WINDOW_RIGHT:
        hi = tl.maximum(tl.minimum(hi, m_end + off_b + window_right), 0)
        full_hi = tl.maximum(tl.minimum(full_hi, m0 + off_b + window_right + 1), 0)
    lo = tl.minimum(lo, hi)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    no_full = full_hi <= full_lo
    full_lo = tl.where(no_full, lo, full_lo)
    full_hi = tl.where(no_full, lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(
    n0,
    Lq,
    lk_b,
    off_b,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
):
    """Query tiles that see some key of [n0, n0 + BLOCK_N): returns (lo, full_lo, full_hi, hi),
    with the same meaning as ``_key_range`` (full tiles: every row sees every key of the block,
    and every row is < Lq)."""
    n_end = tl.minimum(n0 + BLOCK_N, lk_b)
    lo = n0 * 0
    hi = tl.where(n0 < lk_b, Lq, 0)
    full_lo = n0 * 0
    full_hi = tl.where(n0 + BLOCK_N <= lk_b, (Lq // BLOCK_M) * BLOCK_M, 0)
    if WINDOW_RIGHT:
        lo = tl.maximum(n0 - off_b - window_right, 0)
        full_lo = tl.maximum(n0 + BLOCK_N - 1 - off_b - window_right, 0)
    if WINDOW_LEFT:
        hi = tl.maximum(tl.minimum(hi, n_end + window_left - off_b), 0)
        full_hi = tl.maximum(tl.minimum(full_hi, n0 + window_left - off_b + 1), 0)
    lo = tl.minimum(lo, hi)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
    full_hi = (full_hi // BLOCK_M) * BLOCK_M
    no_full = full_hi <= full_lo
    full_lo = tl.where(no_full, lo, full_lo)
    full_hi = tl.where(no_full, lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _seq_span(Cu, b, total):
    """Rows [s0, s0 + n) of packed sequence ``b``: ``cu[b]`` and ``cu[b + 1]`` clamped into [0, total]
    (the end no lower than the start), so unchecked cu_seqlens never reach memory outside the tensor."""
    s0 = tl.minimum(tl.maximum(tl.load(Cu + b), 0), total)
    s1 = tl.minimum(tl.maximum(tl.load(Cu + b + 1), s0), total)
    return s0, s1 - s0


@triton.jit
def _varlen_tile(pid, Cu, n_seqs, total, BLOCK: tl.constexpr):
    """Packed sequences: program ``pid`` of the 1-D tile grid -> (b, t0, s0, n): sequence ``b``, the
    local start ``t0`` of its tile, the sequence's rows [s0, s0 + n) (``_seq_span``). The caller
    returns unless 0 <= t0 < n.

    Sequence b's tiles are numbered from ``first(b) = b + s0_b // BLOCK``: a closed form of cu_seqlens
    (no cumulative tile counts to build per BLOCK, which the autotuner picks after the launch) that
    leaves room for its ceil(n_b / BLOCK) tiles, since first(b + 1) - first(b) = 1 + floor((r + n_b) /
    BLOCK) with r = s0_b mod BLOCK. The grid is first(N) <= N + ceil(total / BLOCK) programs, at most
    one idle per sequence; the program finds b by binary search over first(). Decreasing (unchecked)
    values only make first() non-monotonic: b stays in [0, N), every index stays clamped."""
    lo = pid * 0
    hi = lo + n_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = mid + tl.minimum(tl.maximum(tl.load(Cu + mid), 0), total) // BLOCK
        ok = first <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    s0, n = _seq_span(Cu, lo, total)
    t0 = (pid - lo - s0 // BLOCK) * BLOCK
    return lo, t0, s0, n


@triton.jit
def _dropout_grid(Lq, Lk, n_seqs, total_q, total_k, DropAt, DROPOUT: tl.constexpr, VARLEN: tl.constexpr):
    """(drop_lq, drop_lk, drop_at): the grid the dropout keep mask is indexed on (docs/INTERNALS.md
    "Dropout keep mask", the C++ kernels' dropout_grid): element (s, h, i, j) of the call draws
    n = ((s * Hq + h) * drop_lq + i) * drop_lk + j + drop_at, drop_at = row0 * drop_lk + col0 for a
    call that is the block at (row0, col0) of a larger attention. They come in arguments the call
    leaves unused (_Varlen.set_dropout_grid), so no variant gains a parameter: packed, Lq and Lk
    (the index's dims, nothing else there) and drop_at loaded through the kv_lengths pointer;
    padded, the three packed-sequence scalars."""
    if VARLEN:
        drop_at = 0
        if DROPOUT:
            # Two int32 words (the pointer keeps kv_lengths' type): low (unsigned), then high.
            lo = tl.load(DropAt).to(tl.int64) & 0xFFFFFFFF
            drop_at = (tl.load(DropAt + 1).to(tl.int64) << 32) | lo
        return Lq, Lk, drop_at
    else:
        return n_seqs, total_q, total_k


@triton.jit
def _load_2d(
    base,
    offs_r,
    offs_c,
    stride_r,
    stride_c,
    n_r,
    n_c,
    CHECK_R: tl.constexpr,
    CHECK_C: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Tile load; rows/columns past n_r/n_c read as 0. Offsets are relative to ``base`` (which
    carries the int64 part), so they stay small."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if CHECK_R and CHECK_C:
        x = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
    elif CHECK_R:
        x = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
    elif CHECK_C:
        x = tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _apply_attn_mask(
    s,
    mask_base,
    offs_r,
    offs_c,
    stride_r,
    stride_c,
    n_r,
    n_c,
    CHECK_C: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    LOG2: tl.constexpr,
):
    """Add (float) or apply (bool) the attn_mask tile to the scores ``s``: natural domain, or log2
    domain with LOG2 (the mask scaled by log2(e)). Rows are always bounds-checked (the last query
    tile runs past Lq); columns only on boundary tiles."""
    ptrs = mask_base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    inb = offs_r[:, None] < n_r
    if CHECK_C:
        inb = inb & (offs_c[None, :] < n_c)
    if MASK_BOOL:
        m = tl.load(ptrs, mask=inb, other=0)
        s = tl.where(m != 0, s, float("-inf"))
    else:
        m = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
        if LOG2:
            s = s + m * 1.4426950408889634
        else:
            s = s + m
    return s


@triton.jit
def _scores(
    q,
    k,
    Mask_n,
    start_n,
    offs_m,
    offs_n,
    win_lo,
    win_hi,
    stride_mm,
    stride_mn,
    m_rows,
    Lk,
    lk_b,
    qk_scale,
    diag,
    slope,
    softcap,
    MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LOG2: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """Scores ``q.k * qk_scale + mask`` of a (query tile, key tile) pair with the attn_mask applied
    and, on a boundary tile (MASKED), keys past lk_b and outside the causal/sliding window set to
    -inf: natural domain (qk_scale = scale), or log2 domain with LOG2 (qk_scale = scale * log2(e), the
    mask scaled too; the dQ kernel). Shared by the forward, the dQ kernel and the fix-up passes,
    which must agree on every visible position.

    Modifiers, before the mask: SOFTCAP caps the score, ``c * tanh(s / c)``; ALIBI subtracts
    ``slope * |diag - j|`` (``diag = i + off_b``, per row). Returns ``(s, th)``, ``th = tanh(s / c)``
    of the cap (the backward's factor ``1 - th^2``; ``s`` itself without SOFTCAP, unused then)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    th = s
    if SOFTCAP:
        # In the log2 domain qk_scale carries log2(e): the cap applies to s / log2(e), and the
        # capped score gets the factor back.
        cap = softcap
        if LOG2:
            cap = softcap * 1.4426950408889634
        th = tanh(s * tl.fdiv(1.0, cap, ieee_rounding=False))
        s = th * cap
    if ALIBI:
        dist = tl.abs(diag[:, None] - (start_n + offs_n)[None, :]).to(tl.float32)
        if LOG2:
            s = s - (slope * 1.4426950408889634) * dist
        else:
            s = s - slope * dist
    if HAS_MASK:
        s = _apply_attn_mask(
            s, Mask_n, offs_m, offs_n, stride_mm, stride_mn, m_rows, Lk - start_n, MASKED, MASK_BOOL, LOG2
        )
    if MASKED:
        cols = start_n + offs_n
        visible = (cols < lk_b)[None, :]
        if WINDOW_LEFT:
            visible = visible & (cols[None, :] >= win_lo[:, None])
        if WINDOW_RIGHT:
            visible = visible & (cols[None, :] <= win_hi[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s, th


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    K_bh,
    V_bh,
    Mask_bm,
    start,
    end,
    offs_m,
    offs_n,
    offs_d,
    offs_dv,
    rows,
    win_lo,
    win_hi,
    drop_row,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mm,
    stride_mn,
    m_rows,
    Lk,
    lk_b,
    D,
    Dv,
    scale,
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    drop_threshold,
    diag,
    slope,
    softcap,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n64 = start_n.to(tl.int64)
        k = _load_2d(
            K_bh + n64 * stride_kn, offs_n, offs_d, stride_kn, stride_kd, lk_b - start_n, D, MASKED, not EVEN_D, UPCAST
        )
        s, _th = _scores(
            q,
            k,
            Mask_bm + n64 * stride_mn,
            start_n,
            offs_m,
            offs_n,
            win_lo,
            win_hi,
            stride_mm,
            stride_mn,
            m_rows,
            Lk,
            lk_b,
            scale,
            diag,
            slope,
            softcap,
            MASKED,
            HAS_MASK,
            MASK_BOOL,
            WINDOW_LEFT,
            WINDOW_RIGHT,
            DOT_PRECISION,
            False,
            SOFTCAP,
            ALIBI,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0
        # rather than exp2(-inf - -inf) = NaN. The differences are taken before the log2(e)
        # factor, so scores near FLT_MAX (finfo.min masks) cannot overflow.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_use[:, None]) * 1.4426950408889634)
        # m_i <= m_use, so the clamp changes nothing; written this way the float32 variants compile
        # without spilling (ptxas allocates registers differently).
        alpha = tl.math.exp2(tl.minimum(m_i - m_use, 0.0) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = dropout_keep(
                drop_row[:, None] + (start_n + offs_n)[None, :], seed_lo, seed_hi, offset_lo, offset_hi, drop_threshold
            )
            p = tl.where(keep, p, 0.0)
        v = _load_2d(
            V_bh + n64 * stride_vn,
            offs_n,
            offs_dv,
            stride_vn,
            stride_vd,
            lk_b - start_n,
            Dv,
            MASKED,
            not EVEN_DV,
            UPCAST,
        )
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(
    do_not_specialize=[
        "seed_lo",
        "seed_hi",
        "offset_lo",
        "offset_hi",
        "drop_threshold",
        "window_left",
        "window_right",
        "tune_lq",
        "tune_lk",
        "n_seqs",
        "total_q",
        "total_k",
    ]
)
def _attention_fwd_kernel(
    Q,
    K,
    V,
    Mask,
    KVLens,
    Out,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    Hq,
    Lq,
    Lk,
    D,
    Dv,
    GROUP,
    scale,
    window_left,
    window_right,
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    drop_threshold,
    drop_scale,
    tune_lq,
    tune_lk,
    # Modifier arguments last: the plain variants keep the parameter layout (and ptxas its allocation).
    Alibi,
    Sinks,
    softcap,
    # Packed sequences (VARLEN), after the modifiers for the same reason.
    CuSeqQ,
    CuSeqK,
    n_seqs,
    total_q,
    total_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)

    # s64: the batch row (sequence) of the dropout index and the ALiBi slopes; lq: its query rows;
    # q_start / k_start: its first query / key row in memory; lse_bh: its (b, h) row of lse.
    s64 = b64
    lq = Lq
    q_start = b64 * 0
    k_start = b64 * 0
    lse_bh = (b64 * Hq + h64) * Lq
    lk_b = Lk
    if VARLEN:
        sb, m0, q0, lq = _varlen_tile(pid_m, CuSeqQ, n_seqs, total_q, BLOCK_M)
        if (m0 < 0) | (m0 >= lq):
            return
        k0, lk_b = _seq_span(CuSeqK, sb, total_k)
        s64 = sb.to(tl.int64)
        # The sequence's first rows go into the base pointers (q_start, k_start and lse_bh stay the
        # constant 0: no extra register lives through the tile loops).
        q64 = q0.to(tl.int64)
        k64 = k0.to(tl.int64)
        Q += q64 * stride_qm
        K += k64 * stride_kn
        V += k64 * stride_vn
        # Out and LSE are only written after the key loops: their rows come from this one 32-bit
        # scalar then (shifted pointers would keep two more 64-bit values live through the loops).
        g0 = q0 + m0
    if HAS_KVLENS:
        lk_b = tl.minimum(tl.maximum(tl.load(KVLens + b), 0), Lk)
    off_b = 0
    if BOTTOM_RIGHT:
        off_b = lk_b - lq

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m
    m_rows = lq - m0

    q = _load_2d(
        Q + b64 * stride_qb + h64 * stride_qh + (q_start + m0) * stride_qm,
        offs_m,
        offs_d,
        stride_qm,
        stride_qd,
        m_rows,
        D,
        True,
        not EVEN_D,
        UPCAST,
    )
    K_bh = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    V_bh = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
    Mask_bm = Mask
    if HAS_MASK:
        Mask_bm = Mask + b64 * stride_mb + h64 * stride_mh + m0.to(tl.int64) * stride_mm
    win_lo = rows + off_b - window_left
    win_hi = rows + off_b + window_right
    drop_lq, drop_lk, drop_at = _dropout_grid(Lq, Lk, n_seqs, total_q, total_k, KVLens, DROPOUT, VARLEN)
    drop_row = ((s64 * Hq + h64) * drop_lq + rows) * drop_lk + drop_at
    diag = rows + off_b
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + s64 * Hq + h64)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_range(
        m0, lq, lk_b, off_b, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        K_bh,
        V_bh,
        Mask_bm,
        lo,
        full_lo,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        rows,
        win_lo,
        win_hi,
        drop_row,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_mm,
        stride_mn,
        m_rows,
        Lk,
        lk_b,
        D,
        Dv,
        scale,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        diag,
        slope,
        softcap,
        BLOCK_N,
        EVEN_D,
        EVEN_DV,
        True,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        SOFTCAP,
        ALIBI,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        K_bh,
        V_bh,
        Mask_bm,
        full_lo,
        full_hi,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        rows,
        win_lo,
        win_hi,
        drop_row,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_mm,
        stride_mn,
        m_rows,
        Lk,
        lk_b,
        D,
        Dv,
        scale,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        diag,
        slope,
        softcap,
        BLOCK_N,
        EVEN_D,
        EVEN_DV,
        False,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        SOFTCAP,
        ALIBI,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        K_bh,
        V_bh,
        Mask_bm,
        full_hi,
        hi,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        rows,
        win_lo,
        win_hi,
        drop_row,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_mm,
        stride_mn,
        m_rows,
        Lk,
        lk_b,
        D,
        Dv,
        scale,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        diag,
        slope,
        softcap,
        BLOCK_N,
        EVEN_D,
        EVEN_DV,
        True,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        SOFTCAP,
        ALIBI,
    )

    if SINKS:
        # The sink joins the denominator once, after the keys: one more online-softmax step with a
        # logit and no value. A row that saw no key gets l = 1 (output 0, lse = sink); a -inf sink
        # adds exactly 0.
        sink = tl.load(Sinks + h64)
        m_new = tl.maximum(m_i, sink)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m_i - m_use) * 1.4426950408889634)
        l_i = l_i * alpha + tl.math.exp2((sink - m_use) * 1.4426950408889634)
        acc = acc * alpha[:, None]
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc * (drop_scale / l_safe)[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))

    row_ok = offs_m < m_rows
    if VARLEN:
        g64 = g0.to(tl.int64)
        o_ptrs = Out + h64 * stride_oh + g64 * stride_om + offs_m[:, None] * stride_om + offs_dv[None, :]
        lse_ptrs = LSE + h64 * total_q + g64 + offs_m
    else:
        o_ptrs = (
            Out
            + b64 * stride_ob
            + h64 * stride_oh
            + (q_start + m0) * stride_om
            + offs_m[:, None] * stride_om
            + offs_dv[None, :]
        )
        lse_ptrs = LSE + lse_bh + rows
    if EVEN_DV:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < Dv))
    tl.store(lse_ptrs, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out,
    DO,
    Delta,
    DOS,
    LSE,
    Sinks,
    DSinkRows,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dsb,
    stride_dsh,
    stride_dsm,
    Hq,
    Lq,
    Dv,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_DV: tl.constexpr,
    SINKS: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[i, d] * O[i, d]: the softmax-backward row term. With dropout O is
    the dropped output, which makes delta = sum_j P_ij * dP_ij with the dropped dP, as needed.
    Also copies dO to the contiguous DOS, which the dK/dV and dQ kernels read (and
    _attention_bwd_fixup_kernel rescales on the rows whose lse lost its low bits).

    SINKS: the sink's share of the row term, -p_sink * delta with p_sink = exp(sink - lse), goes to
    DSinkRows (B, Hq, Lq); the launcher sums it per head (deterministic, no atomics). O carries no
    sink value, so delta itself is unchanged."""
    pid_m = tl.program_id(0)
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_rows = Lq - m0
    o = _load_2d(
        Out + b64 * stride_ob + h64 * stride_oh + m0.to(tl.int64) * stride_om,
        offs_m,
        offs_dv,
        stride_om,
        stride_od,
        m_rows,
        Dv,
        True,
        not EVEN_DV,
        True,
    )
    do = _load_2d(
        DO + b64 * stride_dob + h64 * stride_doh + m0.to(tl.int64) * stride_dom,
        offs_m,
        offs_dv,
        stride_dom,
        stride_dod,
        m_rows,
        Dv,
        True,
        not EVEN_DV,
        True,
    )
    delta = tl.sum(o * do, 1)
    tl.store(Delta + (b64 * Hq + h64) * Lq + m0 + offs_m, delta, mask=offs_m < m_rows)
    if SINKS:
        lse = tl.load(LSE + (b64 * Hq + h64) * Lq + m0 + offs_m, mask=offs_m < m_rows, other=float("-inf"))
        sink = tl.load(Sinks + h64)
        # -inf lse (no key, no sink) or -inf sink: no sink probability (and no -inf - -inf NaN).
        no_sink = (lse == float("-inf")) | (tl.zeros_like(lse) + sink == float("-inf"))
        p_sink = tl.where(no_sink, 0.0, tl.exp(sink - lse))
        tl.store(DSinkRows + (b64 * Hq + h64) * Lq + m0 + offs_m, -p_sink * delta, mask=offs_m < m_rows)
    ds_ptrs = (
        DOS
        + b64 * stride_dsb
        + h64 * stride_dsh
        + m0.to(tl.int64) * stride_dsm
        + offs_m[:, None] * stride_dsm
        + offs_dv[None, :]
    )
    if EVEN_DV:
        tl.store(ds_ptrs, do.to(DOS.dtype.element_ty), mask=(offs_m < m_rows)[:, None])
    else:
        tl.store(ds_ptrs, do.to(DOS.dtype.element_ty), mask=(offs_m < m_rows)[:, None] & (offs_dv[None, :] < Dv))


@triton.jit(do_not_specialize=["n_seqs", "total_q", "total_k"])
def _attention_bwd_fixup_kernel(
    Q,
    K,
    Mask,
    KVLens,
    Alibi,
    Sinks,
    LSE,
    Delta,
    DOS,
    DSinkRows,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dsb,
    stride_dsh,
    stride_dsm,
    Hq,
    Lq,
    Lk,
    D,
    Dv,
    GROUP,
    scale,
    softcap,
    window_left,
    window_right,
    CuSeqQ,
    CuSeqK,
    n_seqs,
    total_q,
    total_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    SINKS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Rows whose float32 lse is too large to carry log(l): the backward's P = exp(S - lse) is then
    off by a per-row factor (a row whose every key carries a -1e9 mask has lse = -1e9 + log(Lk),
    which rounds to -1e9, so P would be 1 instead of 1 / Lk). For rows with |lse| > 128 (below, the
    rounding of lse, at most 2^-17, is a per-row factor on P no gradient in the parity tests can
    see; above, e.g. at float16's -65504 mask, it is; the CPU and CUDA backends recompute from 2^16,
    lse_needs_recompute in csrc/common/attention_math.h), this sums
    c = sum_j exp(S_ij - lse_i) over the row's visible keys and scales dO_i (in DOS) and delta_i by
    1 / c: dV and dS = P (dP - delta), hence dK and dQ, are linear in (dO_i, delta_i) for a fixed
    row factor, so the dK/dV kernel needs no change. Every other block does nothing. With SINKS the
    sum includes exp(sink - lse), and the row's dsink term (-p_sink * delta, p_sink off by the same
    factor) is scaled by 1 / c too."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    # As in the forward kernel: s64, lq, q_start, k_start, lse_bh.
    s64 = b64
    lq = Lq
    q_start = b64 * 0
    k_start = b64 * 0
    lse_bh = (b64 * Hq + h64) * Lq
    lk_b = Lk
    if VARLEN:
        sb, m0, q0, lq = _varlen_tile(pid_m, CuSeqQ, n_seqs, total_q, BLOCK_M)
        if (m0 < 0) | (m0 >= lq):
            return
        k0, lk_b = _seq_span(CuSeqK, sb, total_k)
        s64 = sb.to(tl.int64)
        # The sequence's first rows go into the base pointers (q_start, k_start and lse_bh stay the
        # constant 0: no extra register lives through the tile loops).
        q64 = q0.to(tl.int64)
        k64 = k0.to(tl.int64)
        Q += q64 * stride_qm
        DOS += q64 * stride_dsm
        K += k64 * stride_kn
        LSE += h64 * total_q + q64
        Delta += h64 * total_q + q64
        DSinkRows += h64 * total_q + q64
        lse_bh = b64 * 0
    offs_m = tl.arange(0, BLOCK_M)
    rows = m0 + offs_m
    m_rows = lq - m0
    row_ok = offs_m < m_rows
    lse = tl.load(LSE + lse_bh + rows, mask=row_ok, other=0.0)
    # NaN compares false, so NaN rows stay as they are; -inf (no visible key) rows too.
    bad = row_ok & (tl.abs(lse) > 128.0) & (tl.abs(lse) < float("inf"))
    if tl.max(bad.to(tl.int32), 0) > 0:
        if HAS_KVLENS:
            lk_b = tl.minimum(tl.maximum(tl.load(KVLens + b), 0), Lk)
        off_b = 0
        if BOTTOM_RIGHT:
            off_b = lk_b - lq
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_2d(
            Q + b64 * stride_qb + h64 * stride_qh + (q_start + m0) * stride_qm,
            offs_m,
            offs_d,
            stride_qm,
            stride_qd,
            m_rows,
            D,
            True,
            not EVEN_D,
            UPCAST,
        )
        K_bh = K + b64 * stride_kb + (h // GROUP).to(tl.int64) * stride_kh + k_start * stride_kn
        Mask_bm = Mask
        if HAS_MASK:
            Mask_bm = Mask + b64 * stride_mb + h64 * stride_mh + m0.to(tl.int64) * stride_mm
        win_lo = rows + off_b - window_left
        win_hi = rows + off_b + window_right
        diag = rows + off_b
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + s64 * Hq + h64)
        shift = tl.where(bad, lse, float("inf"))  # other rows: exp2(-inf) = 0, nothing to sum
        c = tl.zeros([BLOCK_M], dtype=tl.float32)
        if SINKS:
            c += tl.math.exp2((tl.load(Sinks + h64) - shift) * 1.4426950408889634)
        lo, _full_lo, _full_hi, hi = _key_range(
            m0, lq, lk_b, off_b, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT
        )
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            n64 = start_n.to(tl.int64)
            k = _load_2d(
                K_bh + n64 * stride_kn,
                offs_n,
                offs_d,
                stride_kn,
                stride_kd,
                lk_b - start_n,
                D,
                True,
                not EVEN_D,
                UPCAST,
            )
            s, _th = _scores(
                q,
                k,
                Mask_bm + n64 * stride_mn,
                start_n,
                offs_m,
                offs_n,
                win_lo,
                win_hi,
                stride_mm,
                stride_mn,
                m_rows,
                Lk,
                lk_b,
                scale,
                diag,
                slope,
                softcap,
                True,
                HAS_MASK,
                MASK_BOOL,
                WINDOW_LEFT,
                WINDOW_RIGHT,
                DOT_PRECISION,
                False,
                SOFTCAP,
                ALIBI,
            )
            c += tl.sum(tl.math.exp2((s - shift[:, None]) * 1.4426950408889634), 1)
        # c >= ~1 for a row with a visible key (the max term is exp(m - lse) ~ 1 / l); guard anyway.
        r = tl.where(bad & (c > 0.0), 1.0 / c, 1.0)
        d_ptrs = Delta + lse_bh + rows
        tl.store(d_ptrs, tl.load(d_ptrs, mask=bad, other=0.0) * r, mask=bad)
        if SINKS:
            s_ptrs = DSinkRows + lse_bh + rows
            tl.store(s_ptrs, tl.load(s_ptrs, mask=bad, other=0.0) * r, mask=bad)
        offs_dv = tl.arange(0, BLOCK_DV)
        ds_ptrs = (
            DOS
            + b64 * stride_dsb
            + h64 * stride_dsh
            + (q_start + m0) * stride_dsm
            + offs_m[:, None] * stride_dsm
            + offs_dv[None, :]
        )
        ds_mask = bad[:, None] & (offs_dv[None, :] < Dv)
        do = tl.load(ds_ptrs, mask=ds_mask, other=0.0).to(tl.float32)
        tl.store(ds_ptrs, (do * r[:, None]).to(DOS.dtype.element_ty), mask=ds_mask)


@triton.jit
def _bwd_dkdv_tiles(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    LSE,
    Delta,
    Mask,
    Alibi,
    start,
    end,
    b64,
    hk64,
    GROUP,
    Hq,
    offs_m,
    offs_n,
    offs_d,
    offs_dv,
    cols,
    drop_col,
    drop_lq,
    drop_lk,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    n64,
    Lq,
    lq,
    s64,
    q_start,
    lse_b,
    lse_sh,
    Lk,
    lk_b,
    off_b,
    D,
    Dv,
    scale,
    window_left,
    window_right,
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    drop_threshold,
    drop_scale,
    softcap,
    BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Transposed tiles (keys along dim 0, queries along dim 1): dV += P^T dO, dK += dS^T Q, over
    the query tiles [start, end) of every query head of the kv head's group: ``lq`` query rows from
    row ``q_start`` of Q and dO; the (b, h) row of lse and delta at ``lse_b + h * lse_sh``; ``s64``
    the batch row (sequence) of the dropout index and ALiBi; drop_lq, drop_lk the dropout index's
    dims and drop_col the tile's key columns in it (_dropout_grid).

    One flat loop over (head, tile) pairs rather than a head loop around a tile loop: nested,
    the compiler hoists the tile loop's invariants out of the head loop and keeps them live in
    registers for the whole kernel, which made every variant with masks or dropout spill."""
    n_tiles = tl.cdiv(end - start, BLOCK_M)
    for it in range(n_tiles * GROUP):
        g = it // n_tiles
        start_m = start + (it - g * n_tiles) * BLOCK_M
        start_m = tl.multiple_of(start_m, BLOCK_M)
        h64 = hk64 * GROUP + g
        bh = s64 * Hq + h64
        if VARLEN:
            # q_start: the sequence's first row (32 bits, the one extra value live through the loop;
            # batch row 0). Global rows index Q, dO, lse and delta; ``rows`` stays local.
            m_rows = lq - start_m
            rows = start_m + offs_m
            m64 = (q_start + start_m).to(tl.int64)
            Q_bh = Q + h64 * stride_qh
            DO_bh = DO + h64 * stride_doh
            LSE_bh = LSE + h64 * lse_sh + q_start
            Delta_bh = Delta + h64 * lse_sh + q_start
        else:
            # The padded variants' code exactly as before packed sequences (q_start = 0, lq = Lq,
            # lse rows at bh * Lq): ptxas allocates it without spilling, the rewritten form not.
            m64 = start_m.to(tl.int64)
            m_rows = Lq - start_m
            Q_bh = Q + b64 * stride_qb + h64 * stride_qh
            DO_bh = DO + b64 * stride_dob + h64 * stride_doh
            LSE_bh = LSE + (b64 * Hq + h64) * Lq
            Delta_bh = Delta + (b64 * Hq + h64) * Lq
        q = _load_2d(
            Q_bh + m64 * stride_qm, offs_m, offs_d, stride_qm, stride_qd, m_rows, D, MASKED, not EVEN_D, UPCAST
        )
        do = _load_2d(
            DO_bh + m64 * stride_dom, offs_m, offs_dv, stride_dom, stride_dod, m_rows, Dv, MASKED, not EVEN_DV, UPCAST
        )
        if not VARLEN:
            rows = start_m + offs_m
        if MASKED:
            lse = tl.load(LSE_bh + rows, mask=offs_m < m_rows, other=float("inf"))
            delta = tl.load(Delta_bh + rows, mask=offs_m < m_rows, other=0.0)
        else:
            lse = tl.load(LSE_bh + rows)
            delta = tl.load(Delta_bh + rows)
        # Rows that saw no key have lse = -inf; +inf makes their probabilities exactly 0.
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale
        # The modifiers as _scores applies them, transposed.
        if SOFTCAP:
            thT = tanh(sT * tl.fdiv(1.0, softcap, ieee_rounding=False))
            sT = thT * softcap
        if ALIBI:
            slope = tl.load(Alibi + bh)
            sT = sT - slope * tl.abs((rows + off_b)[None, :] - cols[:, None]).to(tl.float32)
        if HAS_MASK:
            # Transposed mask tile: keys are dim 0, query rows dim 1.
            ptrs = (
                Mask
                + b64 * stride_mb
                + h64 * stride_mh
                + n64 * stride_mn
                + m64 * stride_mm
                + offs_m[None, :] * stride_mm
                + offs_n[:, None] * stride_mn
            )
            inb = (offs_m < m_rows)[None, :] & (cols < Lk)[:, None]
            if MASK_BOOL:
                mv = tl.load(ptrs, mask=inb, other=0)
                sT = tl.where(mv != 0, sT, float("-inf"))
            else:
                mv = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
                sT = sT + mv
        if MASKED:
            visible = (cols < lk_b)[:, None] & (offs_m < m_rows)[None, :]
            if WINDOW_LEFT:
                visible = visible & (cols[:, None] >= (rows + off_b - window_left)[None, :])
            if WINDOW_RIGHT:
                visible = visible & (cols[:, None] <= (rows + off_b + window_right)[None, :])
        # exp2 of the differences (natural domain: scores near FLT_MAX cannot overflow); the
        # invisible positions are selected away afterwards (an inf there is discarded, never summed).
        pT = tl.math.exp2((sT - lse[None, :]) * 1.4426950408889634)
        if MASKED:
            pT = tl.where(visible, pT, 0.0)
        if DROPOUT:
            keep = dropout_keep(
                ((bh * drop_lq + rows) * drop_lk)[None, :] + drop_col[:, None],
                seed_lo,
                seed_hi,
                offset_lo,
                offset_hi,
                drop_threshold,
            )
        if COMPUTE_DV:
            if DROPOUT:
                pdT = tl.where(keep, pT * drop_scale, 0.0)
            else:
                pdT = pT
            dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if COMPUTE_DK:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:
                dpT = tl.where(keep, dpT * drop_scale, 0.0)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                # d(c * tanh(s / c)) / ds = 1 - tanh^2: the chain rule through the cap.
                dsT = dsT * (1.0 - thT * thT)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(
    do_not_specialize=[
        "seed_lo",
        "seed_hi",
        "offset_lo",
        "offset_hi",
        "drop_threshold",
        "window_left",
        "window_right",
        "tune_lq",
        "tune_lk",
        "n_seqs",
        "total_q",
        "total_k",
    ]
)
def _attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    Mask,
    KVLens,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    Hq,
    Lq,
    Lk,
    D,
    Dv,
    GROUP,
    scale,
    window_left,
    window_right,
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    drop_threshold,
    drop_scale,
    tune_lq,
    tune_lk,
    # Modifier arguments last: the plain variants keep the parameter layout (and ptxas its allocation).
    Alibi,
    softcap,
    # Packed sequences (VARLEN), after the modifiers for the same reason.
    CuSeqQ,
    CuSeqK,
    n_seqs,
    total_q,
    total_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    KV_PART: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dK and dV of one key block (KV_PART 0), or only dK (1) / only dV (2): head dims of 256 run
    the two as separate launches, since both float32 accumulators do not fit in registers."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    # As in the forward kernel (key tiles here); lse_b + h * lse_sh: the (b, h) row of lse and delta;
    # n_store: keys of this batch row (sequence) whose dK/dV the program writes.
    s64 = b64
    lq = Lq
    q_start = b64 * 0
    k_start = b64 * 0
    lse_b = b64 * Hq * Lq
    lse_sh = Lq
    lk_b = Lk
    n_store = Lk
    if VARLEN:
        sb, n0, k0, lk_b = _varlen_tile(pid_n, CuSeqK, n_seqs, total_k, BLOCK_N)
        if (n0 < 0) | (n0 >= lk_b):
            return
        q0, lq = _seq_span(CuSeqQ, sb, total_q)
        # Only 32-bit scalars live through the query loops: the sequence index (s64: sb * Hq + h
        # promotes in the loop), its first query row (q_start, added to the global rows of Q, dO,
        # lse and delta in the loop) and its first key row + n0 (g0, for the dK/dV stores after the
        # loops). Pointers shifted ahead of the loops would each keep a 64-bit value live. K and V
        # are read before the loops; the batch row is 0 (k_start and lse_b stay the constant 0).
        s64 = sb
        b64 = b64 * 0
        k64 = k0.to(tl.int64)
        K += k64 * stride_kn
        V += k64 * stride_vn
        q_start = q0
        g0 = k0 + n0
        lse_b = b64 * 0
        lse_sh = total_q
        n_store = lk_b
    if HAS_KVLENS:
        lk_b = tl.minimum(tl.maximum(tl.load(KVLens + b), 0), Lk)
    off_b = 0
    if BOTTOM_RIGHT:
        off_b = lk_b - lq

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = n0 + offs_n
    n64 = k_start + n0

    # Keys past Lk_b are never visible: not reading them keeps padding garbage out of dK/dV.
    k = _load_2d(
        K + b64 * stride_kb + hk64 * stride_kh + n64 * stride_kn,
        offs_n,
        offs_d,
        stride_kn,
        stride_kd,
        lk_b - n0,
        D,
        True,
        not EVEN_D,
        UPCAST,
    )
    v = _load_2d(
        V + b64 * stride_vb + hk64 * stride_vh + n64 * stride_vn,
        offs_n,
        offs_dv,
        stride_vn,
        stride_vd,
        lk_b - n0,
        Dv,
        True,
        not EVEN_DV,
        UPCAST,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _query_range(
        n0, lq, lk_b, off_b, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT
    )
    drop_lq, drop_lk, drop_at = _dropout_grid(Lq, Lk, n_seqs, total_q, total_k, KVLens, DROPOUT, VARLEN)
    drop_col = cols.to(tl.int64) + drop_at
    dk, dv = _bwd_dkdv_tiles(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        Delta,
        Mask,
        Alibi,
        lo,
        full_lo,
        b64,
        hk64,
        GROUP,
        Hq,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        cols,
        drop_col,
        drop_lq,
        drop_lk,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        stride_mb,
        stride_mh,
        stride_mm,
        stride_mn,
        n64,
        Lq,
        lq,
        s64,
        q_start,
        lse_b,
        lse_sh,
        Lk,
        lk_b,
        off_b,
        D,
        Dv,
        scale,
        window_left,
        window_right,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        drop_scale,
        softcap,
        BLOCK_M,
        EVEN_D,
        EVEN_DV,
        True,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        KV_PART != 2,
        KV_PART != 1,
        SOFTCAP,
        ALIBI,
        VARLEN,
    )
    dk, dv = _bwd_dkdv_tiles(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        Delta,
        Mask,
        Alibi,
        full_lo,
        full_hi,
        b64,
        hk64,
        GROUP,
        Hq,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        cols,
        drop_col,
        drop_lq,
        drop_lk,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        stride_mb,
        stride_mh,
        stride_mm,
        stride_mn,
        n64,
        Lq,
        lq,
        s64,
        q_start,
        lse_b,
        lse_sh,
        Lk,
        lk_b,
        off_b,
        D,
        Dv,
        scale,
        window_left,
        window_right,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        drop_scale,
        softcap,
        BLOCK_M,
        EVEN_D,
        EVEN_DV,
        False,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        KV_PART != 2,
        KV_PART != 1,
        SOFTCAP,
        ALIBI,
        VARLEN,
    )
    dk, dv = _bwd_dkdv_tiles(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        Delta,
        Mask,
        Alibi,
        full_hi,
        hi,
        b64,
        hk64,
        GROUP,
        Hq,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        cols,
        drop_col,
        drop_lq,
        drop_lk,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_dob,
        stride_doh,
        stride_dom,
        stride_dod,
        stride_mb,
        stride_mh,
        stride_mm,
        stride_mn,
        n64,
        Lq,
        lq,
        s64,
        q_start,
        lse_b,
        lse_sh,
        Lk,
        lk_b,
        off_b,
        D,
        Dv,
        scale,
        window_left,
        window_right,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        drop_scale,
        softcap,
        BLOCK_M,
        EVEN_D,
        EVEN_DV,
        True,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        KV_PART != 2,
        KV_PART != 1,
        SOFTCAP,
        ALIBI,
        VARLEN,
    )

    col_ok = (offs_n < n_store - n0)[:, None]
    if VARLEN:
        n64 = g0.to(tl.int64)
    if KV_PART != 2:
        dk = dk * scale
        dk_ptrs = (
            DK
            + b64 * stride_dkb
            + hk64 * stride_dkh
            + n64 * stride_dkn
            + offs_n[:, None] * stride_dkn
            + offs_d[None, :]
        )
        if EVEN_D:
            tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok)
        else:
            tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok & (offs_d[None, :] < D))
    if KV_PART != 1:
        dv_ptrs = (
            DV
            + b64 * stride_dvb
            + hk64 * stride_dvh
            + n64 * stride_dvn
            + offs_n[:, None] * stride_dvn
            + offs_dv[None, :]
        )
        if EVEN_DV:
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok)
        else:
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok & (offs_dv[None, :] < Dv))


@triton.jit(
    do_not_specialize=[
        "seed_lo",
        "seed_hi",
        "offset_lo",
        "offset_hi",
        "drop_threshold",
        "window_left",
        "window_right",
        "n_seqs",
        "total_q",
        "total_k",
    ]
)
def _attention_bwd_fixup_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    Mask,
    KVLens,
    Alibi,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    Hq,
    Lq,
    Lk,
    D,
    Dv,
    GROUP,
    scale,
    softcap,
    window_left,
    window_right,
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    drop_threshold,
    drop_scale,
    CuSeqQ,
    CuSeqK,
    n_seqs,
    total_q,
    total_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dQ of the rows with |lse| > 128 (after the dQ kernel, whose log2-domain scores cannot resolve
    them: it writes garbage there), with the scores in the natural domain, P = exp2((S - lse) log2(e)),
    from the dO and delta that _attention_bwd_fixup_kernel rescaled. Every other block does nothing.
    One pass over the row block's visible keys, all with visibility masks (a rare path)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    # As in the forward kernel: s64, lq, q_start, k_start, lse_bh.
    s64 = b64
    lq = Lq
    q_start = b64 * 0
    k_start = b64 * 0
    lse_bh = (b64 * Hq + h64) * Lq
    lk_b = Lk
    if VARLEN:
        sb, m0, q0, lq = _varlen_tile(pid_m, CuSeqQ, n_seqs, total_q, BLOCK_M)
        if (m0 < 0) | (m0 >= lq):
            return
        k0, lk_b = _seq_span(CuSeqK, sb, total_k)
        s64 = sb.to(tl.int64)
        # The sequence's first rows go into the base pointers (q_start, k_start and lse_bh stay the
        # constant 0: no extra register lives through the tile loops).
        q64 = q0.to(tl.int64)
        k64 = k0.to(tl.int64)
        Q += q64 * stride_qm
        DO += q64 * stride_dom
        DQ += q64 * stride_dqm
        K += k64 * stride_kn
        V += k64 * stride_vn
        LSE += h64 * total_q + q64
        Delta += h64 * total_q + q64
        lse_bh = b64 * 0
    m64 = q_start + m0
    offs_m = tl.arange(0, BLOCK_M)
    rows = m0 + offs_m
    m_rows = lq - m0
    row_ok = offs_m < m_rows
    lse = tl.load(LSE + lse_bh + rows, mask=row_ok, other=0.0)
    bad = row_ok & (tl.abs(lse) > 128.0) & (tl.abs(lse) < float("inf"))
    if tl.max(bad.to(tl.int32), 0) > 0:
        if HAS_KVLENS:
            lk_b = tl.minimum(tl.maximum(tl.load(KVLens + b), 0), Lk)
        off_b = 0
        if BOTTOM_RIGHT:
            off_b = lk_b - lq
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = _load_2d(
            Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qm,
            offs_m,
            offs_d,
            stride_qm,
            stride_qd,
            m_rows,
            D,
            True,
            not EVEN_D,
            UPCAST,
        )
        do = _load_2d(
            DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dom,
            offs_m,
            offs_dv,
            stride_dom,
            stride_dod,
            m_rows,
            Dv,
            True,
            not EVEN_DV,
            UPCAST,
        )
        delta = tl.load(Delta + lse_bh + rows, mask=row_ok, other=0.0)
        shift = tl.where(bad, lse, float("inf"))  # other rows: P = 0, their dQ is not stored
        K_bh = K + b64 * stride_kb + (h // GROUP).to(tl.int64) * stride_kh + k_start * stride_kn
        V_bh = V + b64 * stride_vb + (h // GROUP).to(tl.int64) * stride_vh + k_start * stride_vn
        Mask_bm = Mask
        if HAS_MASK:
            Mask_bm = Mask + b64 * stride_mb + h64 * stride_mh + m64 * stride_mm
        win_lo = rows + off_b - window_left
        win_hi = rows + off_b + window_right
        drop_lq, drop_lk, drop_at = _dropout_grid(Lq, Lk, n_seqs, total_q, total_k, KVLens, DROPOUT, VARLEN)
        drop_row = ((s64 * Hq + h64) * drop_lq + rows) * drop_lk + drop_at
        diag = rows + off_b
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + s64 * Hq + h64)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo, _full_lo, _full_hi, hi = _key_range(
            m0, lq, lk_b, off_b, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT
        )
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            n64 = start_n.to(tl.int64)
            k = _load_2d(
                K_bh + n64 * stride_kn,
                offs_n,
                offs_d,
                stride_kn,
                stride_kd,
                lk_b - start_n,
                D,
                True,
                not EVEN_D,
                UPCAST,
            )
            v = _load_2d(
                V_bh + n64 * stride_vn,
                offs_n,
                offs_dv,
                stride_vn,
                stride_vd,
                lk_b - start_n,
                Dv,
                True,
                not EVEN_DV,
                UPCAST,
            )
            s, th = _scores(
                q,
                k,
                Mask_bm + n64 * stride_mn,
                start_n,
                offs_m,
                offs_n,
                win_lo,
                win_hi,
                stride_mm,
                stride_mn,
                m_rows,
                Lk,
                lk_b,
                scale,
                diag,
                slope,
                softcap,
                True,
                HAS_MASK,
                MASK_BOOL,
                WINDOW_LEFT,
                WINDOW_RIGHT,
                DOT_PRECISION,
                False,
                SOFTCAP,
                ALIBI,
            )
            p = tl.math.exp2((s - shift[:, None]) * 1.4426950408889634)
            if SOFTCAP:
                # The cap's chain-rule factor 1 - tanh^2, folded into P before dP (one tile less live).
                p = p * (1.0 - th * th)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if DROPOUT:
                keep = dropout_keep(
                    drop_row[:, None] + (start_n + offs_n)[None, :],
                    seed_lo,
                    seed_hi,
                    offset_lo,
                    offset_hi,
                    drop_threshold,
                )
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        dq = dq * scale
        dq_ptrs = (
            DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dqm + offs_m[:, None] * stride_dqm + offs_d[None, :]
        )
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=bad[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dq_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    K_bh,
    V_bh,
    Mask_bm,
    start,
    end,
    offs_m,
    offs_n,
    offs_d,
    offs_dv,
    win_lo,
    win_hi,
    drop_row,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mm,
    stride_mn,
    m_rows,
    Lk,
    lk_b,
    D,
    Dv,
    qk_scale,
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    drop_threshold,
    drop_scale,
    diag,
    slope,
    softcap,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    LOG2: tl.constexpr,
):
    """dQ += dS K with dS = P * (dP - delta), dP = dO V^T (dropped). 16-bit inputs (LOG2): scores in
    the log2 domain (the code as before the natural-domain forward: the tightest tensor-core configs
    have no register left for the extra multiply; qk_scale and lse2 carry log2(e)), right for every
    row with |lse| <= 128: a score or mask beyond FLT_MAX / log2(e) then only overflows to -inf, where
    P is 0 anyway. float32 inputs: the natural domain, P = exp2((s - lse) * log2(e)) as the dK/dV
    kernel, since the log2-domain exponent rounds at |lse| * log2(e) (s * scale * log2(e) and lse *
    log2(e) each), which put float32 dQ at several times torch's error from |lse| of about 30. Rows
    with |lse| > 128, garbage here, are recomputed by _attention_bwd_fixup_dq_kernel."""
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n64 = start_n.to(tl.int64)
        k = _load_2d(
            K_bh + n64 * stride_kn, offs_n, offs_d, stride_kn, stride_kd, lk_b - start_n, D, MASKED, not EVEN_D, UPCAST
        )
        v = _load_2d(
            V_bh + n64 * stride_vn,
            offs_n,
            offs_dv,
            stride_vn,
            stride_vd,
            lk_b - start_n,
            Dv,
            MASKED,
            not EVEN_DV,
            UPCAST,
        )
        s, th = _scores(
            q,
            k,
            Mask_bm + n64 * stride_mn,
            start_n,
            offs_m,
            offs_n,
            win_lo,
            win_hi,
            stride_mm,
            stride_mn,
            m_rows,
            Lk,
            lk_b,
            qk_scale,
            diag,
            slope,
            softcap,
            MASKED,
            HAS_MASK,
            MASK_BOOL,
            WINDOW_LEFT,
            WINDOW_RIGHT,
            DOT_PRECISION,
            LOG2,
            SOFTCAP,
            ALIBI,
        )
        if LOG2:
            p = tl.math.exp2(s - lse2[:, None])
        else:
            p = tl.math.exp2((s - lse2[:, None]) * 1.4426950408889634)
        if SOFTCAP:
            # The cap's chain-rule factor 1 - tanh^2, folded into P before dP (one tile less live).
            p = p * (1.0 - th * th)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(
                drop_row[:, None] + (start_n + offs_n)[None, :], seed_lo, seed_hi, offset_lo, offset_hi, drop_threshold
            )
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(
    do_not_specialize=[
        "seed_lo",
        "seed_hi",
        "offset_lo",
        "offset_hi",
        "drop_threshold",
        "window_left",
        "window_right",
        "tune_lq",
        "tune_lk",
        "n_seqs",
        "total_q",
        "total_k",
    ]
)
def _attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    Mask,
    KVLens,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    Hq,
    Lq,
    Lk,
    D,
    Dv,
    GROUP,
    qk_scale,
    scale,
    window_left,
    window_right,
    seed_lo,
    seed_hi,
    offset_lo,
    offset_hi,
    drop_threshold,
    drop_scale,
    tune_lq,
    tune_lk,
    # Modifier arguments last: the plain variants keep the parameter layout (and ptxas its allocation).
    Alibi,
    softcap,
    # Packed sequences (VARLEN), after the modifiers for the same reason.
    CuSeqQ,
    CuSeqK,
    n_seqs,
    total_q,
    total_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    HAS_KVLENS: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    # As in the forward kernel: s64, lq, q_start, k_start, lse_bh.
    s64 = b64
    lq = Lq
    q_start = b64 * 0
    k_start = b64 * 0
    lse_bh = (b64 * Hq + h64) * Lq
    lk_b = Lk
    if VARLEN:
        sb, m0, q0, lq = _varlen_tile(pid_m, CuSeqQ, n_seqs, total_q, BLOCK_M)
        if (m0 < 0) | (m0 >= lq):
            return
        k0, lk_b = _seq_span(CuSeqK, sb, total_k)
        s64 = sb.to(tl.int64)
        # The sequence's first rows go into the base pointers (q_start, k_start and lse_bh stay the
        # constant 0: no extra register lives through the tile loops).
        q64 = q0.to(tl.int64)
        k64 = k0.to(tl.int64)
        Q += q64 * stride_qm
        DO += q64 * stride_dom
        K += k64 * stride_kn
        V += k64 * stride_vn
        LSE += h64 * total_q + q64
        Delta += h64 * total_q + q64
        lse_bh = b64 * 0
        # DQ is only written after the key loops: its rows come from this one 32-bit scalar then.
        g0 = q0 + m0
    m64 = q_start + m0

    if HAS_KVLENS:
        lk_b = tl.minimum(tl.maximum(tl.load(KVLens + b), 0), Lk)
    off_b = 0
    if BOTTOM_RIGHT:
        off_b = lk_b - lq

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m
    m_rows = lq - m0
    row_ok = offs_m < m_rows

    q = _load_2d(
        Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qm,
        offs_m,
        offs_d,
        stride_qm,
        stride_qd,
        m_rows,
        D,
        True,
        not EVEN_D,
        UPCAST,
    )
    do = _load_2d(
        DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dom,
        offs_m,
        offs_dv,
        stride_dom,
        stride_dod,
        m_rows,
        Dv,
        True,
        not EVEN_DV,
        UPCAST,
    )
    lse = tl.load(LSE + lse_bh + rows, mask=row_ok, other=float("inf"))
    # 16-bit inputs: the log2 domain (see _bwd_dq_tiles); float32 the natural one.
    LOG2 = Q.dtype.element_ty != tl.float32
    if LOG2:
        lse2 = lse * 1.4426950408889634
    else:
        lse2 = lse
        qk_scale = scale
    # Rows that saw no key have lse = -inf; +inf makes their probabilities exactly 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse2)
    delta = tl.load(Delta + lse_bh + rows, mask=row_ok, other=0.0)
    K_bh = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    V_bh = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
    Mask_bm = Mask
    if HAS_MASK:
        Mask_bm = Mask + b64 * stride_mb + h64 * stride_mh + m64 * stride_mm
    win_lo = rows + off_b - window_left
    win_hi = rows + off_b + window_right
    drop_lq, drop_lk, drop_at = _dropout_grid(Lq, Lk, n_seqs, total_q, total_k, KVLens, DROPOUT, VARLEN)
    drop_row = ((s64 * Hq + h64) * drop_lq + rows) * drop_lk + drop_at
    diag = rows + off_b
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + s64 * Hq + h64)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(
        m0, lq, lk_b, off_b, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT
    )
    dq = _bwd_dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        K_bh,
        V_bh,
        Mask_bm,
        lo,
        full_lo,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        win_lo,
        win_hi,
        drop_row,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_mm,
        stride_mn,
        m_rows,
        Lk,
        lk_b,
        D,
        Dv,
        qk_scale,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        drop_scale,
        diag,
        slope,
        softcap,
        BLOCK_N,
        EVEN_D,
        EVEN_DV,
        True,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        SOFTCAP,
        ALIBI,
        LOG2,
    )
    dq = _bwd_dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        K_bh,
        V_bh,
        Mask_bm,
        full_lo,
        full_hi,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        win_lo,
        win_hi,
        drop_row,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_mm,
        stride_mn,
        m_rows,
        Lk,
        lk_b,
        D,
        Dv,
        qk_scale,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        drop_scale,
        diag,
        slope,
        softcap,
        BLOCK_N,
        EVEN_D,
        EVEN_DV,
        False,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        SOFTCAP,
        ALIBI,
        LOG2,
    )
    dq = _bwd_dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        K_bh,
        V_bh,
        Mask_bm,
        full_hi,
        hi,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        win_lo,
        win_hi,
        drop_row,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_mm,
        stride_mn,
        m_rows,
        Lk,
        lk_b,
        D,
        Dv,
        qk_scale,
        seed_lo,
        seed_hi,
        offset_lo,
        offset_hi,
        drop_threshold,
        drop_scale,
        diag,
        slope,
        softcap,
        BLOCK_N,
        EVEN_D,
        EVEN_DV,
        True,
        HAS_MASK,
        MASK_BOOL,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        DROPOUT,
        UPCAST,
        DOT_PRECISION,
        SOFTCAP,
        ALIBI,
        LOG2,
    )

    dq = dq * scale
    if VARLEN:
        dq_ptrs = DQ + h64 * stride_dqh + g0.to(tl.int64) * stride_dqm + offs_m[:, None] * stride_dqm + offs_d[None, :]
    else:
        dq_ptrs = (
            DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dqm + offs_m[:, None] * stride_dqm + offs_d[None, :]
        )
    if EVEN_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# --------------------------------------------------------------------------------------------
# Tuning tables
# --------------------------------------------------------------------------------------------
#
# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel, architecture class, element
# size (2: float16/bfloat16, 4: float32) and head-dim bucket (max of the padded D and Dv: 64 for
# anything up to 64, 128, 256), in two lists: "light" for calls without attn_mask and dropout, and
# "heavy" for calls with either (the mask tile and the Philox state need registers that the
# largest tiles do not have). BLOCK_M is the query tile and BLOCK_N the key tile in every kernel.
# Every entry compiles for its architecture without spilling, fits shared memory and (sm_90) uses
# wgmma, in the feature variant of its list: see STATIC_CONFIGS and tests/test_attention_triton.py.
# float32 runs exact IEEE products on the FMA units (tl.dot input_precision="ieee"), whose operand
# fragments grow with the head dimension, hence its small tiles.

_ARCH_CLASSES = (80, 90)
_DIM_BUCKETS = (64, 128, 256)

_Cell = tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]

_TABLES: dict[str, dict[tuple[int, int, int], _Cell]] = {
    "fwd": {
        (90, 2, 64): ([(128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3)], [(128, 64, 8, 4)]),
        (90, 2, 128): ([(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)], [(128, 32, 8, 3)]),
        (90, 2, 256): ([(128, 32, 8, 2), (64, 64, 8, 2)], [(128, 16, 8, 2)]),
        (80, 2, 64): ([(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)], [(128, 64, 8, 3), (64, 64, 8, 3)]),
        (80, 2, 128): ([(128, 64, 8, 3), (64, 64, 4, 3)], [(128, 32, 8, 3)]),
        (80, 2, 256): ([(64, 64, 8, 2), (64, 32, 8, 2)], [(64, 32, 8, 2)]),
    },
    "dq": {
        (90, 2, 64): ([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)], [(128, 64, 8, 3)]),
        (90, 2, 128): ([(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)], [(128, 32, 8, 3)]),
        (90, 2, 256): ([(128, 32, 8, 2)], [(128, 16, 8, 2)]),
        (80, 2, 64): ([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)], [(64, 32, 4, 3)]),
        (80, 2, 128): ([(128, 32, 8, 3), (64, 64, 4, 3)], [(128, 32, 8, 3)]),
        (80, 2, 256): ([(64, 64, 8, 2)], [(64, 16, 8, 2)]),
    },
    # Head dims of 256 run dK and dV as two launches (KV_PART), each with these configs.
    "dkdv": {
        (90, 2, 64): ([(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)], [(32, 128, 8, 3), (32, 64, 8, 2)]),
        (90, 2, 128): ([(32, 128, 8, 3), (32, 128, 8, 2), (16, 64, 4, 3)], [(16, 128, 8, 2)]),
        # 64 keys per block with masks or dropout spill at this width; 32 keys fall back to mma.sync.
        (90, 2, 256): ([(32, 64, 8, 2)], [(16, 32, 8, 2)]),
        (80, 2, 64): ([(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)], [(16, 128, 8, 2), (16, 64, 4, 2)]),
        (80, 2, 128): ([(16, 64, 4, 3), (16, 64, 8, 2)], [(32, 64, 8, 2), (16, 128, 8, 2)]),
        (80, 2, 256): ([(32, 64, 8, 2), (16, 64, 8, 2)], [(16, 64, 8, 2)]),
    },
}
# float32, the same on both arch classes: (light, heavy) per head-dim bucket. The heavy dQ and
# 256-wide dK/dV entries differ from the light ones: with mask, kv_lengths and the Philox state
# live, the light tiles leave a stack frame of 8-128 B (ptxas), so they use more warps or fewer
# pipeline stages.
for _kernel, _fp32 in {
    "fwd": {64: ([(32, 32, 4, 2)],) * 2, 128: ([(16, 16, 4, 2)],) * 2, 256: ([(16, 16, 4, 2)],) * 2},
    "dq": {
        64: ([(32, 32, 4, 2)], [(32, 16, 4, 2)]),
        128: ([(16, 16, 4, 2)], [(16, 16, 8, 2)]),
        256: ([(16, 16, 4, 2)], [(16, 16, 8, 1)]),
    },
    "dkdv": {64: ([(16, 32, 4, 2)],) * 2, 128: ([(16, 16, 4, 2)],) * 2, 256: ([(16, 16, 4, 2)], [(16, 16, 8, 2)])},
}.items():
    for _arch in _ARCH_CLASSES:
        for _bucket, _cell in _fp32.items():
            _TABLES[_kernel][(_arch, 4, _bucket)] = _cell
# Heavy float32 cells of one arch class that leave a stack frame with the dropout grid's index
# (_dropout_grid) live: more warps.
_TABLES["fwd"][(90, 4, 64)] = ([(32, 32, 4, 2)], [(32, 32, 8, 2)])
_TABLES["dkdv"][(80, 4, 128)] = ([(16, 16, 4, 2)], [(16, 16, 8, 2)])

# One config under the interpreter (multi-config autotuning needs a GPU): tiles large enough to
# keep the interpreter's per-operation cost down, with query and key tiles of different sizes so a
# swapped block size shows. The tests switch to the small set to walk many full and boundary tiles
# on short sequences.
_INTERPRET_CONFIGS = {"fwd": (64, 32, 4, 1), "dq": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1)}
_INTERPRET_SMALL_CONFIGS = {"fwd": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 16, 4, 1)}


# Softcap or ALiBi (with every other feature possibly on): the heavy entries that spill with the
# modifiers' extra registers (ptxas, stack frames of 8-32 B) are replaced per cell; cells not listed
# keep their heavy list.
_MODS_TABLES: dict[str, dict[tuple[int, int, int], list[tuple[int, int, int, int]]]] = {
    "fwd": {(90, 2, 64): [(128, 32, 8, 4)], (80, 2, 64): [(64, 64, 8, 3)]},
    "dq": {
        (90, 2, 64): [(128, 32, 8, 3)],
        (90, 2, 256): [(32, 16, 8, 2)],
        (80, 2, 64): [(32, 32, 4, 3)],
        (80, 2, 128): [(64, 32, 8, 2), (128, 16, 8, 2)],
        (80, 2, 256): [(64, 16, 8, 2)],
        (90, 4, 64): [(16, 16, 4, 2)],
        (80, 4, 256): [(16, 16, 4, 1)],
    },
    "dkdv": {
        (90, 2, 64): [(16, 128, 8, 2), (16, 64, 4, 2)],
        (90, 2, 128): [(16, 64, 8, 2)],
        (80, 2, 128): [(16, 64, 8, 2)],
        (80, 2, 256): [(16, 64, 8, 2)],
        (90, 4, 64): [(16, 32, 8, 2)],
        (80, 4, 256): [(16, 16, 8, 1)],
    },
}


# Packed sequences (VARLEN: the sequence's lengths and first rows live beside the tile math): per
# cell, (light, mods) lists replacing the entries that spill with them (ptxas, stack frames of 8-40
# B); None keeps the cell's list (_TABLES light, _MODS_TABLES or heavy). Calls with dropout alone
# keep the heavy list.
_VARLEN_TABLES: dict[str, dict[tuple[int, int, int], tuple[list | None, list | None]]] = {
    "fwd": {(80, 4, 64): (None, [(32, 32, 8, 2)]), (80, 4, 256): (None, [(16, 16, 8, 2)])},
    # float32 D64 on sm_80: (32, 16, 4, 2) leaves a stack frame of 24 B with the natural-domain dQ
    # (8 B with 8 warps).
    "dq": {
        (90, 2, 256): ([(128, 16, 8, 2)], None),
        (80, 4, 64): (None, [(16, 16, 4, 2)]),
        (80, 4, 256): (None, [(16, 16, 8, 1)]),
    },
    # The dK launch of (32, 64, 8, 2) and the dV launch of (16, 32, 8, 2) spill.
    "dkdv": {
        (90, 2, 256): ([(16, 64, 8, 2)], [(16, 32, 8, 1)]),
        (80, 2, 64): ([(32, 128, 8, 3), (32, 64, 4, 3)], None),
    },
}


def _arch_class(arch: int) -> int:
    # sm_90 and sm_100 have 227 KiB of shared memory per block and wgmma/tcgen05; sm_8x and the
    # consumer sm_120 parts get the Ampere tables (the autotuner skips configs that do not fit).
    return 90 if 90 <= arch < 120 else 80


def _dim_bucket(block_d: int) -> int:
    return max(64, block_d)


def _candidates(
    kernel: str, arch: int, elt_size: int, block_d: int, heavy: bool, mods: bool = False, varlen: bool = False
) -> list[tuple[int, int, int, int]]:
    """The table's candidates; `mods` (softcap or ALiBi on: heavy implied) replaces the heavy list by
    its _MODS_TABLES entry where there is one; `varlen` (packed sequences) replaces the light or mods
    list by its _VARLEN_TABLES entry where there is one."""
    if INTERPRET:
        return [_INTERPRET_CONFIGS[kernel]]
    key = (_arch_class(arch), 4 if elt_size >= 4 else 2, _dim_bucket(block_d))
    light, heavy_list = _TABLES[kernel][key]
    vl_light, vl_mods = _VARLEN_TABLES[kernel].get(key, (None, None)) if varlen else (None, None)
    if mods:
        return vl_mods or _MODS_TABLES[kernel].get(key, heavy_list)
    if heavy:
        return heavy_list
    return vl_light or light


def _all_configs(kernel: str) -> list[triton.Config]:
    seen: list[tuple[int, int, int, int]] = [_INTERPRET_CONFIGS[kernel], _INTERPRET_SMALL_CONFIGS[kernel]]
    for light, heavy in _TABLES[kernel].values():
        for t in light + heavy:
            if t not in seen:
                seen.append(t)
    for mods in _MODS_TABLES[kernel].values():
        for t in mods:
            if t not in seen:
                seen.append(t)
    for cell in _VARLEN_TABLES[kernel].values():
        for t in (cell[0] or []) + (cell[1] or []):
            if t not in seen:
                seen.append(t)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in seen]


def _config_tuple(c: triton.Config) -> tuple[int, int, int, int]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        wanted = _candidates(
            kernel,
            device_arch(q.device),
            q.element_size(),
            max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"]),
            kwargs["HAS_MASK"] or kwargs["DROPOUT"],
            # The cap's tanh (kept for the backward's factor) and the ALiBi distances take registers
            # on top of a mask tile; sinks only touch the forward's epilogue.
            kwargs["SOFTCAP"] or kwargs["ALIBI"],
            kwargs["VARLEN"],
        )
        return [c for c in configs if _config_tuple(c) in wanted]

    return prune


_TUNE_KEY = [
    "BLOCK_D",
    "BLOCK_DV",
    "HAS_MASK",
    "HAS_KVLENS",
    "WINDOW_LEFT",
    "WINDOW_RIGHT",
    "DROPOUT",
    "SOFTCAP",
    "ALIBI",
    "SINKS",
    "KV_PART",
    "VARLEN",
    "tune_lq",
    "tune_lk",
]


def _autotuned(kernel_fn, kernel: str):
    return triton.autotune(
        configs=_all_configs(kernel), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner(kernel)}
    )(kernel_fn)


_attention_fwd_tuned = _autotuned(_attention_fwd_kernel, "fwd")
_attention_bwd_dq_tuned = _autotuned(_attention_bwd_dq_kernel, "dq")
_attention_bwd_dkdv_tuned = _autotuned(_attention_bwd_dkdv_kernel, "dkdv")


def _preprocess_block_m(block_dv: int) -> int:
    return 64 if INTERPRET else max(16, min(128, 8192 // block_dv))


_FIXUP_CONSTEXPRS = (
    "BLOCK_D",
    "BLOCK_DV",
    "EVEN_D",
    "EVEN_DV",
    "HAS_MASK",
    "MASK_BOOL",
    "HAS_KVLENS",
    "WINDOW_LEFT",
    "WINDOW_RIGHT",
    "BOTTOM_RIGHT",
    "UPCAST",
    "DOT_PRECISION",
    "SOFTCAP",
    "ALIBI",
    "VARLEN",
)


def _fixup_config(block_d: int, elt_size: int, dq: bool, mods: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of _attention_bwd_fixup_kernel (dq=False: one pass over the keys,
    no accumulator) and _attention_bwd_fixup_dq_kernel (a dQ accumulator; float32 runs IEEE products
    on the FMA units, whose operands take more registers): small tiles, since both only work on the
    rare query blocks with |lse| > 128."""
    if dq and elt_size >= 4:
        # With the modifiers, ptxas leaves a stack frame at 128-wide heads with 8 warps (sm_90) and at
        # 64/256-wide ones with 4 (sm_90, sm_80).
        return (16, 16, 4) if mods and block_d == 128 else (16, 16, 8)
    return (32, 32, 4) if block_d <= 128 else (16, 32, 4)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def unsupported_reason(q, k, v, attn_mask, kv_lengths, dropout_p) -> str | None:
    """None when these (normalized) inputs run on the Triton kernels, else a short reason: first the
    launcher's preconditions (the shapes `prepare_attention` produces; cheap, so a direct call of
    the custom op cannot launch on inconsistent tensors), then the capability table's refusal."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, H, L, D)"
    dev = q.device
    if k.device != dev or v.device != dev:
        return "q, k, v must be on one device"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one dtype (got {q.dtype}, {k.dtype}, {v.dtype})"
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[-1] != D:
        return f"k's head dim {k.shape[-1]} differs from q's {D}"
    if Hkv == 0 or Hq % Hkv != 0 or v.shape[:3] != k.shape[:3] or k.shape[0] != B or min(D, v.shape[-1]) < 1:
        return f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if attn_mask is not None:
        if attn_mask.device != dev:
            return "attn_mask must be on q's device"
        if tuple(attn_mask.shape) != (B, Hq, Lq, Lk):
            return f"attn_mask must be expanded to (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}, got {tuple(attn_mask.shape)}"
    if kv_lengths is not None:
        if kv_lengths.device != dev or kv_lengths.dtype != torch.int32 or tuple(kv_lengths.shape) != (B,):
            return "kv_lengths must be an int32 (B,) tensor on q's device"
    if not (0.0 <= dropout_p <= 1.0):
        return f"dropout_p={dropout_p} outside [0, 1]"
    return refusal(
        "attention",
        capabilities.Features(
            dtype=q.dtype,
            device=dev,
            head_dims=(D, v.shape[-1]),
            mask_dtype=None if attn_mask is None else attn_mask.dtype,
            grid=(B, Hq),
        ),
    )


def _check(q, k, v, attn_mask, kv_lengths, dropout_p):
    reason = unsupported_reason(q, k, v, attn_mask, kv_lengths, dropout_p)
    if reason is not None:
        raise ValueError(f"seqkernels Triton attention: {reason}")


def _mask_args(attn_mask, q):
    """(tensor, 4 strides, HAS_MASK, MASK_BOOL); a bool mask is read as bytes (same strides)."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), False, False
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8), tuple(attn_mask.stride()), True, True
    return attn_mask, tuple(attn_mask.stride()), True, False


def _common_args(
    q,
    k,
    v,
    attn_mask,
    kv_lengths,
    window_left,
    window_right,
    bottom_right,
    dropout_p,
    seed,
    offset,
    alibi_slopes,
    sinks,
    softcap,
    vl,
):
    """`vl`: the _Varlen of the call (its dims are the kernels' Lq, Lk, bucketed for tuning)."""
    D, Dv = q.shape[-1], v.shape[-1]
    block_d, block_dv = block_dim(D), block_dim(Dv)
    mask_t, mask_strides, has_mask, mask_bool = _mask_args(attn_mask, q)
    dropout = dropout_p > 0.0
    seed_lo, seed_hi = split_u64(int(seed))
    offset_lo, offset_hi = split_u64(int(offset))
    threshold, drop_scale = dropout_threshold(float(dropout_p)) if dropout else (0, 1.0)
    constexprs = dict(
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        EVEN_D=D == block_d,
        EVEN_DV=Dv == block_dv,
        HAS_MASK=has_mask,
        MASK_BOOL=mask_bool,
        HAS_KVLENS=kv_lengths is not None,
        WINDOW_LEFT=window_left >= 0,
        WINDOW_RIGHT=window_right >= 0,
        BOTTOM_RIGHT=bool(bottom_right),
        DROPOUT=dropout,
        UPCAST=INTERPRET,
        DOT_PRECISION=dot_precision(q.dtype),
        SOFTCAP=bool(softcap and softcap > 0.0),
        ALIBI=alibi_slopes is not None,
        VARLEN=vl.on,
    )
    return dict(
        # Unused pointer arguments get q (never read: their constexpr switch is off).
        alibi=q if alibi_slopes is None else alibi_slopes,
        sinks=q if sinks is None else sinks,
        softcap=float(softcap) if constexprs["SOFTCAP"] else 0.0,
        mask=mask_t,
        mask_strides=mask_strides,
        # Packed calls take no kv_lengths: with dropout the pointer carries the grid offset.
        kvlens=kv_lengths if kv_lengths is not None else vl.drop_at,
        window=(max(window_left, 0), max(window_right, 0)),
        drop=(seed_lo, seed_hi, offset_lo, offset_hi, threshold, drop_scale),
        tune=(length_bucket(vl.dims[0]), length_bucket(vl.dims[1])),
        constexprs=constexprs,
    )


def _modifier_args(q, alibi_slopes, sinks, n_seqs=None):
    """alibi_slopes as float32 (B, Hq) (packed sequences: (N, Hq)) and sinks as float32 (Hq,),
    contiguous on q's device (the op layer already passes them so; a direct call gets the same
    layout)."""
    B, Hq = q.shape[0] if n_seqs is None else n_seqs, q.shape[1]
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.detach().to(device=q.device, dtype=torch.float32).expand(B, Hq).contiguous()
    if sinks is not None:
        sinks = sinks.detach().to(device=q.device, dtype=torch.float32).reshape(Hq).contiguous()
    return alibi_slopes, sinks


_ZERO_OFFSETS: dict = {}


def _offset_words(at: int, device) -> torch.Tensor:
    """`at` as the two int32 words (low, high) _dropout_grid reads, on `device`. The offset of a
    call on its own grid is 0: one cached tensor per device, so ordinary packed calls with dropout
    copy nothing to the device."""
    if at == 0:
        z = _ZERO_OFFSETS.get(device)
        if z is None:
            z = _ZERO_OFFSETS[device] = torch.zeros(2, dtype=torch.int32, device=device)
        return z
    words = [(at & 0xFFFFFFFF) - ((at & 0x80000000) << 1), at >> 32]  # int32 bit patterns
    return torch.tensor(words, dtype=torch.int32).to(device, non_blocking=True)


class _Varlen:
    """Packed sequences (docs/INTERNALS.md "Packed sequences"): the launchers' view of cu_seqlens.

    q, k, v are (1, H, total, D); ``args`` are the kernels' (CuSeqQ, CuSeqK, n_seqs, total_q,
    total_k), ``dims`` (max_seqlen_q/k) the tuning buckets, ``kdims`` the kernels' (Lq, Lk): the
    dropout index's dims (set_dropout_grid). The values of cu_seqlens are not read here (no host
    sync): the kernels clamp every span into [0, total]. Padded calls get ``args`` with unused
    pointers, and the dropout grid in the scalars."""

    def __init__(self, q, k, cu_q, cu_k, max_q, max_k, attn_mask, kv_lengths):
        self.on = cu_q is not None or cu_k is not None
        Lq, Lk = q.shape[2], k.shape[2]
        self.kdims = self.dims = (Lq, Lk)  # kdims: the kernels' Lq, Lk (set_dropout_grid)
        self.drop_at = q  # the kv_lengths pointer's argument when the call has none (set_dropout_grid)
        if not self.on:
            self.n = 0
            self.args = (q, q, 0, 0, 0)
            return
        bad = None
        if cu_q is None or cu_k is None:
            bad = "cu_seqlens_q and cu_seqlens_k go together"
        elif any(c.dtype != torch.int32 or c.dim() != 1 or c.numel() < 1 or c.device != q.device for c in (cu_q, cu_k)):
            bad = "cu_seqlens_q/k must be int32 (N + 1,) tensors on q's device"
        elif cu_q.numel() != cu_k.numel():
            bad = f"cu_seqlens_q has {cu_q.numel()} entries, cu_seqlens_k {cu_k.numel()}"
        elif q.shape[0] != 1:
            bad = f"packed q, k, v must be (1, H, total, D) views, got q {tuple(q.shape)}"
        elif attn_mask is not None or kv_lengths is not None:
            bad = "packed sequences take no attn_mask or kv_lengths"
        if bad is not None:
            raise ValueError(f"seqkernels Triton attention: {bad}")
        self.n = cu_q.numel() - 1
        self.args = (cu_q.contiguous(), cu_k.contiguous(), self.n, Lq, Lk)
        self.kdims = self.dims = (max(int(max_q), 0), max(int(max_k), 0))

    def set_dropout_grid(self, dropout_grid, q, k, dropout: bool) -> None:
        """The kernels' dropout grid (_dropout_grid) for `dropout_grid` (None or []: the call's own;
        [row0, col0, len_q, len_k]: the call is the block at (row0, col0) of a (.., len_q, len_k)
        attention), checked as the C++ kernels check it (host::check_dropout_grid). Padded calls
        carry (len_q, len_k, row0 * len_k + col0) in the packed-sequence scalars of `args` (an offset
        past 2**31 makes the last one an int64 argument: a variant of its own, which the ahead-of-
        time list does not compile); packed ones take len_q, len_k as their kernel dims `kdims` and
        the offset through `drop_at`, two int32 words whatever its size."""
        rows, keys = self.dims if self.on else (q.shape[2], k.shape[2])
        row0, col0, len_q, len_k = 0, 0, rows, keys
        if dropout_grid is not None and len(dropout_grid):
            if len(dropout_grid) != 4:
                raise ValueError(f"dropout_grid: must be empty or [row0, col0, len_q, len_k], got {list(dropout_grid)}")
            row0, col0, len_q, len_k = (int(x) for x in dropout_grid)
            if not (row0 >= 0 and col0 >= 0 and row0 + rows <= len_q and col0 + keys <= len_k):
                raise ValueError(
                    f"dropout_grid: [row0, col0, len_q, len_k] = {list(dropout_grid)} must hold the call's {rows} x "
                    f"{keys} (rows x keys) block: row0, col0 >= 0, row0 + {rows} <= len_q, col0 + {keys} <= len_k"
                )
        at = row0 * len_k + col0
        if self.on:
            self.kdims = (len_q, len_k)
            if dropout:  # (read only by the kernels' dropout variants)
                self.drop_at = _offset_words(at, q.device)
        else:
            self.args = (q, q, len_q, len_k, at)

    def grid0(self, length: int, block: int) -> int:
        """Programs along the tiles of `length` rows: per batch row (padded), or over the packed
        tensor with one spare per sequence (_varlen_tile)."""
        return triton.cdiv(length, block) + self.n

    def rows_like(self, t, width: int, dtype):
        """A zeroed (1, H, total, width) output stored token-major, as packed q, k, v are."""
        return torch.zeros((t.shape[2], t.shape[1], width), dtype=dtype, device=t.device).permute(1, 0, 2).unsqueeze(0)


def attention_fwd(
    q,
    k,
    v,
    attn_mask,
    kv_lengths,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    dropout_p: float,
    seed: int,
    offset: int,
    alibi_slopes=None,
    sinks=None,
    softcap: float = 0.0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    dropout_grid=None,
):
    """Fused attention forward on normalized arguments (docs/INTERNALS.md) -> (out, lse).

    out (B, Hq, Lq, Dv) in q's dtype, contiguous; lse (B, Hq, Lq) float32, natural log.
    Packed sequences (cu_seqlens): out (1, Hq, total_q, Dv) stored token-major, lse (1, Hq, total_q);
    rows in no sequence (unchecked cu_seqlens only) hold 0 / -inf."""
    _check(q, k, v, attn_mask, kv_lengths, dropout_p)
    vl = _Varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, kv_lengths)
    vl.set_dropout_grid(dropout_grid, q, k, dropout_p > 0.0)
    alibi_slopes, sinks = _modifier_args(q, alibi_slopes, sinks, vl.n if vl.on else None)
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    Dv = v.shape[-1]
    if vl.on:
        out = vl.rows_like(q, Dv, q.dtype)
        lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        out = _alloc((B, Hq, Lq, Dv), dtype=q.dtype, device=q.device)
        lse = _alloc((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if B == 0 or Hq == 0 or Lq == 0 or (vl.on and vl.n == 0):
        return out, lse
    a = _common_args(
        q,
        k,
        v,
        attn_mask,
        kv_lengths,
        window_left,
        window_right,
        bottom_right,
        dropout_p,
        seed,
        offset,
        alibi_slopes,
        sinks,
        softcap,
        vl,
    )

    def grid(meta):
        return (vl.grid0(Lq, meta["BLOCK_M"]), Hq, B)

    _attention_fwd_tuned[grid](
        q,
        k,
        v,
        a["mask"],
        a["kvlens"],
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *a["mask_strides"],
        out.stride(0),
        out.stride(1),
        out.stride(2),
        Hq,
        *vl.kdims,
        D,
        Dv,
        Hq // Hkv,
        float(scale),
        *a["window"],
        *a["drop"],
        *a["tune"],
        a["alibi"],
        a["sinks"],
        a["softcap"],
        *vl.args,
        SINKS=sinks is not None,
        **a["constexprs"],
    )
    return out, lse


def attention_bwd(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    attn_mask,
    kv_lengths,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    dropout_p: float,
    seed: int,
    offset: int,
    deterministic: bool,
    alibi_slopes=None,
    sinks=None,
    softcap: float = 0.0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    dropout_grid=None,
):
    """Fused attention backward -> (dq, dk, dv, dsinks), dq, dk, dv shaped like q, k, v (dk, dv
    summed over the query heads of each kv head), dsinks (Hq,) float32 with sinks, else (0,).
    Every kernel is deterministic, so ``deterministic`` needs no special path. Packed sequences:
    dq, dk, dv stored token-major like the packed q, k, v, zero on rows in no sequence."""
    del deterministic
    _check(q, k, v, attn_mask, kv_lengths, dropout_p)
    vl = _Varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, kv_lengths)
    vl.set_dropout_grid(dropout_grid, q, k, dropout_p > 0.0)
    alibi_slopes, sinks = _modifier_args(q, alibi_slopes, sinks, vl.n if vl.on else None)
    dsinks = torch.zeros((q.shape[1] if sinks is not None else 0,), dtype=torch.float32, device=q.device)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    if tuple(grad_out.shape) != (B, Hq, Lq, Dv) or tuple(out.shape) != (B, Hq, Lq, Dv):
        raise ValueError(
            f"seqkernels Triton attention: grad_out {tuple(grad_out.shape)} and out "
            f"{tuple(out.shape)} must be (B, Hq, Lq, Dv) = {(B, Hq, Lq, Dv)}"
        )
    if tuple(lse.shape) != (B, Hq, Lq):
        raise ValueError(f"seqkernels Triton attention: lse {tuple(lse.shape)} must be (B, Hq, Lq)")
    if vl.on:
        # Every element is written: rows in no sequence (unchecked cu_seqlens only) keep these zeros.
        dq, dk, dv = vl.rows_like(q, D, q.dtype), vl.rows_like(k, D, k.dtype), vl.rows_like(v, Dv, v.dtype)
    else:
        dq = _alloc((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
        dk = _alloc((B, Hkv, Lk, D), dtype=k.dtype, device=q.device)
        dv = _alloc((B, Hkv, Lk, Dv), dtype=v.dtype, device=q.device)
    if B == 0 or Hq == 0 or Lq == 0 or (vl.on and vl.n == 0):
        # No query row reads any key (Hq == 0 still has Hkv >= 1 kv heads): dK and dV are 0, and
        # dq has no element.
        return dq, dk.zero_(), dv.zero_(), dsinks
    grad_out = grad_out.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    a = _common_args(
        q,
        k,
        v,
        attn_mask,
        kv_lengths,
        window_left,
        window_right,
        bottom_right,
        dropout_p,
        seed,
        offset,
        alibi_slopes,
        sinks,
        softcap,
        vl,
    )
    c = a["constexprs"]
    has_sinks = sinks is not None

    delta = _alloc((B, Hq, Lq), dtype=torch.float32, device=q.device)
    dos = _alloc((B, Hq, Lq, Dv), dtype=q.dtype, device=q.device)
    # Per-row dsink terms, summed per head below (a fixed-order reduction: deterministic).
    dsink_rows = _alloc((B, Hq, Lq), dtype=torch.float32, device=q.device) if has_sinks else delta
    pre_bm = _preprocess_block_m(c["BLOCK_DV"])
    _attention_bwd_preprocess_kernel[(triton.cdiv(Lq, pre_bm), Hq, B)](
        out,
        grad_out,
        delta,
        dos,
        lse,
        a["sinks"],
        dsink_rows,
        *out.stride(),
        *grad_out.stride(),
        dos.stride(0),
        dos.stride(1),
        dos.stride(2),
        Hq,
        Lq,
        Dv,
        BLOCK_M=pre_bm,
        BLOCK_DV=c["BLOCK_DV"],
        EVEN_DV=c["EVEN_DV"],
        SINKS=has_sinks,
    )
    if Lk > 0:
        rbm, rbn, rwarps = _fixup_config(
            max(c["BLOCK_D"], c["BLOCK_DV"]), q.element_size(), False, c["SOFTCAP"] or c["ALIBI"]
        )
        fixup_c = {name: c[name] for name in _FIXUP_CONSTEXPRS}
        fixup_dq_c = dict(fixup_c, DROPOUT=c["DROPOUT"])
        _attention_bwd_fixup_kernel[(vl.grid0(Lq, rbm), Hq, B)](
            q,
            k,
            a["mask"],
            a["kvlens"],
            a["alibi"],
            a["sinks"],
            lse,
            delta,
            dos,
            dsink_rows,
            *q.stride(),
            *k.stride(),
            *a["mask_strides"],
            dos.stride(0),
            dos.stride(1),
            dos.stride(2),
            Hq,
            *vl.dims,
            D,
            Dv,
            Hq // Hkv,
            float(scale),
            a["softcap"],
            *a["window"],
            *vl.args,
            BLOCK_M=rbm,
            BLOCK_N=rbn,
            SINKS=has_sinks,
            **fixup_c,
            num_warps=rwarps,
        )
    if has_sinks:
        dsinks = dsink_rows.sum(dim=(0, 2))
    # From here on dO is read from dos (contiguous, rescaled on the rows the kernel above fixed).
    grad_out = dos

    if Lk > 0:

        def grid_kv(meta):
            return (vl.grid0(Lk, meta["BLOCK_N"]), Hkv, B)

        # Both float32 accumulators of a 256-wide head do not fit in registers next to the tile
        # math: dK and dV then run as two launches (the dV one skips dP and dS).
        parts = (1, 2) if _dim_bucket(max(c["BLOCK_D"], c["BLOCK_DV"])) >= 256 else (0,)
        for part in parts:
            _attention_bwd_dkdv_tuned[grid_kv](
                q,
                k,
                v,
                grad_out,
                lse,
                delta,
                a["mask"],
                a["kvlens"],
                dk,
                dv,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *grad_out.stride(),
                *a["mask_strides"],
                dk.stride(0),
                dk.stride(1),
                dk.stride(2),
                dv.stride(0),
                dv.stride(1),
                dv.stride(2),
                Hq,
                *vl.kdims,
                D,
                Dv,
                Hq // Hkv,
                float(scale),
                *a["window"],
                *a["drop"],
                *a["tune"],
                a["alibi"],
                a["softcap"],
                *vl.args,
                KV_PART=part,
                **c,
            )

    def grid_q(meta):
        return (vl.grid0(Lq, meta["BLOCK_M"]), Hq, B)

    _attention_bwd_dq_tuned[grid_q](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        a["mask"],
        a["kvlens"],
        dq,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *grad_out.stride(),
        *a["mask_strides"],
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        Hq,
        *vl.kdims,
        D,
        Dv,
        Hq // Hkv,
        float(scale) * _LOG2E,
        float(scale),
        *a["window"],
        *a["drop"],
        *a["tune"],
        a["alibi"],
        a["softcap"],
        *vl.args,
        **c,
    )
    if Lk > 0:
        # dQ of the rows with |lse| > 128, which the log2-domain dQ kernel above cannot resolve.
        rbm, rbn, rwarps = _fixup_config(
            max(c["BLOCK_D"], c["BLOCK_DV"]), q.element_size(), True, c["SOFTCAP"] or c["ALIBI"]
        )
        _attention_bwd_fixup_dq_kernel[(vl.grid0(Lq, rbm), Hq, B)](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            a["mask"],
            a["kvlens"],
            a["alibi"],
            dq,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *grad_out.stride(),
            *a["mask_strides"],
            dq.stride(0),
            dq.stride(1),
            dq.stride(2),
            Hq,
            *vl.kdims,
            D,
            Dv,
            Hq // Hkv,
            float(scale),
            a["softcap"],
            *a["window"],
            *a["drop"],
            *vl.args,
            BLOCK_M=rbm,
            BLOCK_N=rbn,
            **fixup_dq_c,
            num_warps=rwarps,
        )
    return dq, dk, dv, dsinks


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile list
# --------------------------------------------------------------------------------------------


# Arguments that are 1 for tensors with a contiguous last dimension: Triton specializes an
# integer argument equal to 1 into a constant, so the representative compile does the same.
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_dod", "stride_od", "stride_mn"}
_FLOAT_ARGS = {"qk_scale", "scale", "drop_scale", "softcap"}
_FP32_POINTERS = {"LSE", "Delta", "Alibi", "Sinks", "DSinkRows"}
_UNALIGNED_INTS = {
    "n_seqs",
    "total_q",
    "total_k",
    "Lq",
    "Lk",
    "window_left",
    "window_right",
    "seed_lo",
    "seed_hi",
    "offset_lo",
    "offset_hi",
    "drop_threshold",
    "tune_lq",
    "tune_lk",
    "GROUP",
    "Hq",
}


def _static_signature(kernel_fn, dtype: torch.dtype, constexprs: dict, mask_bool: bool):
    def pointer_type(name):
        if not name[0].isupper() or name in ("Hq", "Lq", "Lk", "D", "Dv", "GROUP"):
            return None
        if name == "Mask":
            return "*u8" if mask_bool else "*fp32"
        if name in ("KVLens", "CuSeqQ", "CuSeqK"):
            return "*i32"
        return "*fp32" if name in _FP32_POINTERS else f"*{TRITON_DTYPE[dtype]}"

    return static_signature(
        kernel_fn, constexprs, pointer_type, lambda name: name not in _UNALIGNED_INTS, _UNIT_STRIDES, _FLOAT_ARGS
    )


def _static_configs() -> list[StaticConfig]:
    """Every autotune config of every kernel, for the architecture whose table lists it: the light
    entries in the plain causal variant (the fast path), the heavy entries with every feature on
    (float mask, kv_lengths, two-sided window, dropout, head dims not a power of two) and again with
    every score modifier on top (softcap, ALiBi, sinks: "mods", which the launchers run on the heavy
    entries too); the forward's light entries also with sinks alone ("causal_sinks", the only
    modifier that keeps the light list); packed sequences (VARLEN) in the causal variant on the light
    entries ("varlen") and with every feature they take on the "mods" entries ("varlen_mods")."""
    kernels = {"fwd": _attention_fwd_kernel, "dq": _attention_bwd_dq_kernel, "dkdv": _attention_bwd_dkdv_kernel}
    variants = {
        "causal": dict(
            HAS_MASK=False,
            MASK_BOOL=False,
            HAS_KVLENS=False,
            WINDOW_LEFT=False,
            WINDOW_RIGHT=True,
            BOTTOM_RIGHT=True,
            DROPOUT=False,
            EVEN_D=True,
            EVEN_DV=True,
            SOFTCAP=False,
            ALIBI=False,
            SINKS=False,
            VARLEN=False,
        ),
        "full": dict(
            HAS_MASK=True,
            MASK_BOOL=False,
            HAS_KVLENS=True,
            WINDOW_LEFT=True,
            WINDOW_RIGHT=True,
            BOTTOM_RIGHT=True,
            DROPOUT=True,
            EVEN_D=False,
            EVEN_DV=False,
            SOFTCAP=False,
            ALIBI=False,
            SINKS=False,
            VARLEN=False,
        ),
    }
    variants["mods"] = dict(variants["full"], SOFTCAP=True, ALIBI=True, SINKS=True)
    variants["causal_sinks"] = dict(variants["causal"], SINKS=True)
    # Packed sequences: the fast path, and every feature they take (no mask, no kv_lengths) with the
    # modifiers on the lists those calls tune over.
    variants["varlen"] = dict(variants["causal"], VARLEN=True)
    variants["varlen_mods"] = dict(variants["mods"], HAS_MASK=False, HAS_KVLENS=False, VARLEN=True)
    out = []
    for kname, fn in kernels.items():
        for (arch, elt, bucket), (light, heavy) in _TABLES[kname].items():
            dtype = torch.bfloat16 if elt == 2 else torch.float32
            parts = ((1, 2) if bucket >= 256 else (0,)) if kname == "dkdv" else (None,)
            mods = _MODS_TABLES[kname].get((arch, elt, bucket), heavy)
            vl_light, vl_mods = _VARLEN_TABLES[kname].get((arch, elt, bucket), (None, None))
            listed = [
                ("causal", light),
                ("full", heavy),
                ("mods", mods),
                ("varlen", vl_light or light),
                ("varlen_mods", vl_mods or mods),
            ]
            if kname == "fwd":
                listed.append(("causal_sinks", light))
            for vname, cfgs in listed:
                for bm, bn, w, s in cfgs:
                    for part in parts:
                        constexprs = dict(
                            BLOCK_M=bm,
                            BLOCK_N=bn,
                            BLOCK_D=bucket,
                            BLOCK_DV=bucket,
                            UPCAST=False,
                            DOT_PRECISION=dot_precision(dtype),
                            **variants[vname],
                        )
                        if kname != "fwd":
                            del constexprs["SINKS"]  # the sink is in the lse the backward reads
                        label = ""
                        if part is not None:
                            constexprs["KV_PART"] = part
                            label = {0: "", 1: " dk", 2: " dv"}[part]
                        sig, consts, attrs = _static_signature(fn, dtype, constexprs, False)
                        name = (
                            f"{fn.__name__}{label} sm_{arch} {TRITON_DTYPE[dtype]} D{bucket} {vname} "
                            f"BLOCK_M={bm} BLOCK_N={bn} warps={w} stages={s}"
                        )
                        # float32 uses IEEE products on the FMA units: no tensor-core MMA to expect.
                        # wgmma needs 64 rows (queries, or keys in the dK/dV kernel) per warpgroup.
                        rows = bn if kname == "dkdv" else bm
                        expects = False if elt == 4 else (True if arch < 90 or rows >= 64 else "mma")
                        out.append(StaticConfig(fn, sig, consts, w, s, expects, arch=arch, attrs=attrs, name=name))
    for arch in _ARCH_CLASSES:
        for bucket in _DIM_BUCKETS:
            for sinks in (False, True):
                constexprs = dict(BLOCK_M=max(16, min(128, 8192 // bucket)), BLOCK_DV=bucket, EVEN_DV=True, SINKS=sinks)
                fn = _attention_bwd_preprocess_kernel
                sig, consts, attrs = _static_signature(fn, torch.bfloat16, constexprs, False)
                out.append(
                    StaticConfig(
                        fn,
                        sig,
                        consts,
                        4,
                        1,
                        False,
                        arch=arch,
                        attrs=attrs,
                        name=f"{fn.__name__} sm_{arch} bf16 D{bucket}{' sinks' if sinks else ''} "
                        f"BLOCK_M={constexprs['BLOCK_M']}",
                    )
                )
            # The lse fix-up passes, with every feature on (the score code of the "full" variant), and
            # with the modifiers on top ("mods").
            for fn, dtype, vname in (
                (f, d, vn)
                for f in (_attention_bwd_fixup_kernel, _attention_bwd_fixup_dq_kernel)
                for d in (torch.bfloat16, torch.float32)
                for vn in ("full", "mods")
            ):
                bm, bn, w = _fixup_config(
                    bucket, 4 if dtype == torch.float32 else 2, fn is _attention_bwd_fixup_dq_kernel, vname == "mods"
                )
                constexprs = dict(
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                    BLOCK_D=bucket,
                    BLOCK_DV=bucket,
                    UPCAST=False,
                    DOT_PRECISION=dot_precision(dtype),
                    **{name: variants[vname][name] for name in _FIXUP_CONSTEXPRS if name in variants[vname]},
                )
                if fn is _attention_bwd_fixup_dq_kernel:
                    constexprs["DROPOUT"] = True
                else:
                    constexprs["SINKS"] = variants[vname]["SINKS"]
                sig, consts, attrs = _static_signature(fn, dtype, constexprs, False)
                expects = False if dtype == torch.float32 else "mma"
                out.append(
                    StaticConfig(
                        fn,
                        sig,
                        consts,
                        w,
                        1,
                        expects,
                        arch=arch,
                        attrs=attrs,
                        name=f"{fn.__name__} sm_{arch} {TRITON_DTYPE[dtype]} D{bucket} {vname} "
                        f"BLOCK_M={bm} BLOCK_N={bn} warps={w}",
                    )
                )
    return out


STATIC_CONFIGS: list  # the ahead-of-time compile list, built on first access
__getattr__ = lazy_static_configs(globals(), _static_configs)
