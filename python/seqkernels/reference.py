"""Reference implementations: plain differentiable torch, float64-capable.

This is the oracle every kernel is judged against (DESIGN §5) and also the ``reference``
backend, the one that runs any input the other backends refuse. Every function here computes
in its inputs' dtype (float64 in float64; attention upcasts float16/bfloat16 to float32, as
torch's math SDPA does), runs on any device, is differentiable by autograd, and implements
*exactly* the contract of docs/INTERNALS.md:

* visibility (attention, decode): key ``j`` is visible from query row ``i`` of batch ``b`` iff::

      (window_left  < 0 or j >= i + off_b - window_left)  and
      (window_right < 0 or j <= i + off_b + window_right) and
      j < Lk_b and mask(b, h, i, j)

  with ``Lk_b = kv_lengths[b]`` (or ``Lk``) and ``off_b = Lk_b - Lq`` when ``bottom_right``
  (seqkernels.attention) or ``0`` (torch SDPA's top-left ``is_causal``).  For example
  ``Lq = 3, Lk = 5``, causal (``window = (-1, 0)``), bottom-right::

      j:  0 1 2 3 4            top-left (bottom_right=False):  0 1 2 3 4
      i=0 x x x . .                                            x . . . .
      i=1 x x x x .                                            x x . . .
      i=2 x x x x x                                            x x x . .

* a query row that sees no key gives output 0, lse ``-inf`` and zero gradients (never NaN);
* the dropout keep mask is Philox4x32-10 of ``(seed, offset, b, h, i, j)``.

Masking is done by *selection* (``torch.where``), never by multiplying with 0. Keys and values
past ``kv_lengths[b]`` (padding) and cache slots at or past ``cache_seqlens[b]`` are selected
away before any arithmetic, so NaN or garbage there reaches neither the result nor the
gradients. Scores of keys hidden by the mask or the window are selected away too (a NaN key
there does not reach the output), but such keys and values still enter the two matmuls, so a
NaN *value* there, or a NaN key in the backward, propagates as 0 * NaN exactly as in plain
torch. A NaN in a visible input propagates as plain torch would.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "attention_bwd_ref",
    "attention_ref",
    "decode_attention_ref",
    "dropout_keep_mask_ref",
    "dropout_threshold_ref",
    "kv_cache_append_ref",
    "lstm_cell_bwd_ref",
    "lstm_cell_fwd_ref",
    "lstm_cell_ref",
    "lstm_layer_fwd_ref",
    "philox_keep_word_ref",
    "sdpa_ref",
]

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85


# ----------------------------------------------------------------------------------------------
# Philox4x32-10 and the dropout keep mask
# ----------------------------------------------------------------------------------------------


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of the constant ``a`` and ``b`` (int64
    tensor holding values in [0, 2^32)).

    The full product needs 64 unsigned bits, which a signed int64 cannot hold, so ``b`` is split
    into 16-bit halves: ``a * b = a*b_hi * 2^16 + a*b_lo`` with both partial products < 2^48.
    """
    b_lo = b & _M16
    b_hi = b >> 16
    p_lo = b_lo * a
    p_hi = b_hi * a
    # a*b = (p_hi >> 16) * 2^32 + (p_hi & 0xffff) * 2^16 + p_lo; the last two terms sum to < 2^49.
    t = ((p_hi & _M16) << 16) + p_lo
    lo = t & _M32
    hi = (p_hi >> 16) + (t >> 32)
    return hi, lo


def philox_keep_word_ref(seed: int, offset: int, n: Tensor) -> Tensor:
    """The Philox4x32-10 word ``r = c0`` of docs/INTERNALS.md for each linear index in ``n``.

    ``seed`` and ``offset`` are Python ints (taken mod 2^64), ``n`` an integer tensor of
    non-negative element indices. Returns an int64 tensor shaped like ``n`` with values in
    ``[0, 2^32)``.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    offset = int(offset) & 0xFFFFFFFFFFFFFFFF
    n = n.to(torch.int64)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = n & _M32
    c1 = (n >> 32) & _M32
    c2 = torch.full_like(n, offset & _M32)
    c3 = torch.full_like(n, (offset >> 32) & _M32)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    return c0


def dropout_threshold_ref(p: float) -> int:
    """``floor(p * 2^32)``, the keep threshold; ``p >= 1`` gives ``2^32`` (drops everything).

    Computed like csrc/common/philox.h (a double product truncated), so the rounding agrees.
    """
    p = float(p)
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return 1 << 32
    return int(p * 4294967296.0)


def dropout_keep_mask_ref(
    seed: int, offset: int, B: int, H: int, Lq: int, Lk: int, p: float, device=None, *, index=None
) -> Tensor:
    """Bool keep mask ``(B, H, Lq, Lk)``: element ``(b, h, i, j)`` is kept iff the Philox word of
    ``n = ((b * H + h) * Lq + i) * Lk + j`` is ``>= floor(p * 2^32)``. ``H`` is the number of
    *query* heads. ``index=(b0, Lq_pad, Lk_pad[, row0, col0])`` numbers the elements as batch
    ``b0 + b``, row ``row0 + i``, key ``col0 + j`` of a ``(.., H, Lq_pad, Lk_pad)`` grid instead:
    one sequence of a packed batch (attention_varlen) draws the keep mask of its padded form, a
    block of a larger attention (dropout_grid) that of its place in it."""
    threshold = dropout_threshold_ref(p)
    if index is None:
        n = torch.arange(B * H * Lq * Lk, dtype=torch.int64, device=device).view(B, H, Lq, Lk)
    else:
        b0, lq_pad, lk_pad, row0, col0 = (tuple(int(x) for x in index) + (0, 0))[:5]
        ar = functools.partial(torch.arange, dtype=torch.int64, device=device)
        bh = (ar(B).view(B, 1) + b0) * H + ar(H).view(1, H)
        rows, cols = ar(Lq).view(1, 1, Lq, 1) + row0, ar(Lk).view(1, 1, 1, Lk) + col0
        n = (bh.view(B, H, 1, 1) * lq_pad + rows) * lk_pad + cols
    if threshold == 0:
        return torch.ones_like(n, dtype=torch.bool)
    if threshold >= 1 << 32:
        return torch.zeros_like(n, dtype=torch.bool)
    return philox_keep_word_ref(seed, offset, n) >= threshold


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped_matmul(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """``a (B, Hq, M, K) @ b (B, Hkv, K, N)`` where query head ``h`` uses ``b``'s head
    ``h // groups``; the kv tensor is broadcast, not copied, and autograd sums its gradient over
    each group."""
    if groups == 1:
        return a @ b
    B, Hq, M, K = a.shape
    Hkv = b.shape[1]
    out = a.reshape(B, Hkv, groups, M, K) @ b.unsqueeze(2)
    return out.reshape(B, Hq, M, b.shape[-1])


def _check_attention_args(q, k, v, attn_mask, kv_lengths):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(
                f"attention_ref: {name} must be a 4-D tensor (B, H, L, D), got "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
            )
        if not t.is_floating_point():
            raise ValueError(f"attention_ref: {name} must be floating point, got {t.dtype}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"attention_ref: batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if Dk != D:
        raise ValueError(f"attention_ref: q and k head dims differ ({D} vs {Dk})")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(f"attention_ref: v {tuple(v.shape)} must be (B, Hkv, Lk, Dv) with k's Hkv={Hkv}, Lk={Lk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"attention_ref: the number of query heads ({Hq}) must be a multiple of the number of kv heads ({Hkv})"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise ValueError("attention_ref: attn_mask must be a tensor or None")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"attention_ref: attn_mask must be bool or floating point, got {attn_mask.dtype}")
        try:
            shape = torch.broadcast_shapes(attn_mask.shape, (B, Hq, Lq, Lk))
        except RuntimeError:
            shape = None
        if shape != (B, Hq, Lq, Lk):
            raise ValueError(
                f"attention_ref: attn_mask of shape {tuple(attn_mask.shape)} does not "
                f"broadcast to (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}"
            )
    if kv_lengths is not None and (
        not isinstance(kv_lengths, Tensor) or kv_lengths.shape != (B,) or kv_lengths.is_floating_point()
    ):
        raise ValueError(f"attention_ref: kv_lengths must be an integer tensor of shape ({B},)")


def _visibility(B, Lq, Lk, kv_lengths, window_left, window_right, bottom_right, device):
    """Bool ``(B or 1, 1, Lq, Lk)`` of the window / causal / length rule, or None if every key
    is visible."""
    if window_left < 0 and window_right < 0 and kv_lengths is None:
        return None
    i = torch.arange(Lq, device=device).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=device).view(1, 1, 1, Lk)
    if kv_lengths is not None:
        lk_b = kv_lengths.to(device=device, dtype=torch.int64).view(B, 1, 1, 1)
    else:
        lk_b = torch.full((1, 1, 1, 1), Lk, dtype=torch.int64, device=device)
    diag = i + (lk_b - Lq) if bottom_right else i
    vis = torch.ones(diag.shape[0], 1, Lq, Lk, dtype=torch.bool, device=device)
    if window_left >= 0:
        vis = vis & (j >= diag - window_left)
    if window_right >= 0:
        vis = vis & (j <= diag + window_right)
    if kv_lengths is not None:
        vis = vis & (j < lk_b)
    return vis


def _key_distance(B, Lq, Lk, kv_lengths, bottom_right, device) -> Tensor:
    """|i + off_b - j| as a (B, 1, Lq, Lk) tensor: the ALiBi distance of query i to key j."""
    i = torch.arange(Lq, device=device).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=device).view(1, 1, 1, Lk)
    off = torch.zeros(B, dtype=torch.int64, device=device)
    if bottom_right:
        lk = torch.full((B,), Lk, dtype=torch.int64, device=device) if kv_lengths is None else kv_lengths
        off = lk.to(device=device, dtype=torch.int64) - Lq
    return (i + off.view(B, 1, 1, 1) - j).abs()


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    kv_lengths: Tensor | None = None,
    scale: float | None = None,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = True,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    dropout_grid=None,
    _dropout_index=None,
) -> tuple[Tensor, Tensor]:
    """Masked scaled-dot-product attention with the normalized arguments of docs/INTERNALS.md.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``, ``Hq % Hkv == 0``
            (query head ``h`` uses kv head ``h // (Hq // Hkv)``).
        attn_mask: bool (True = takes part) or float (added to the scaled scores), broadcastable
            to ``(B, Hq, Lq, Lk)``.
        kv_lengths: integer ``(B,)``: keys ``j >= kv_lengths[b]`` do not take part.
        scale: default ``1 / sqrt(D)``.
        window_left, window_right: ``-1`` = unbounded; causal is ``(-1, 0)``.
        bottom_right: diagonal offset ``Lk_b - Lq`` (True) or ``0`` (False, torch's is_causal).
        dropout_p, seed, offset: dropout of the normalized probabilities with the Philox keep
            mask, kept values scaled by ``1 / (1 - dropout_p)``.
        softcap: ``> 0`` caps the scaled scores, ``s <- softcap * tanh(s / softcap)``; None or 0 = off.
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)``: ``s <- s - slope * |i + off_b - j|`` after the cap,
            with the diagonal offset ``off_b`` of ``bottom_right``; no gradient to the slopes.
        sinks: ``(Hq,)`` one logit per query head that joins the softmax denominator and carries
            no value (differentiable); ``-inf`` is no sink. lse includes it; a row that sees no
            key has output 0 and lse = its sink.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: packed sequences (the kernels'
            form of attention_varlen, docs/INTERNALS.md): q, k, v are ``(1, H, total, D)``,
            sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` against keys
            ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``, computed one sequence at a time;
            ``alibi_slopes`` is then ``(N, Hq)`` and dropout draws each sequence's keep mask of
            the padded ``(N, Hq, max_seqlen_q, max_seqlen_k)`` form.
        dropout_grid: None (or empty) or ``[row0, col0, len_q, len_k]``: the keep mask of element
            ``(b, h, i, j)`` (``i, j`` local to the sequence) is that of ``(b, h, row0 + i, col0 + j)``
            of a ``(.., len_q, len_k)`` grid (the kernels' argument of the same name).

    Returns:
        ``(out, lse)``: ``out (B, Hq, Lq, Dv)`` in q's dtype; ``lse (B, Hq, Lq)`` the natural
        log of the softmax denominator of the masked scaled scores (undropped), float32
        (float64 for float64 inputs), ``-inf`` on rows that see no key (whose output is 0).
    """
    if cu_seqlens_q is not None:
        return _attention_varlen_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask=attn_mask,
            kv_lengths=kv_lengths, scale=scale, window_left=window_left, window_right=window_right,
            bottom_right=bottom_right, dropout_p=dropout_p, seed=seed, offset=offset, softcap=softcap,
            alibi_slopes=alibi_slopes, sinks=sinks, dropout_grid=dropout_grid,
        )  # fmt: skip
    _check_attention_args(q, k, v, attn_mask, kv_lengths)
    if dropout_grid is not None and len(dropout_grid) and _dropout_index is None:
        row0, col0, len_q, len_k = (int(x) for x in dropout_grid)
        _dropout_index = (0, len_q, len_k, row0, col0)
    out_dtype = q.dtype
    # Half types compute in float32, as torch's math SDPA does (and as every kernel accumulates),
    # so the low-precision reference is the plain-torch baseline of the parity rule.
    if q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    device = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    lse_dtype = _lse_dtype(out_dtype)

    if Lk == 0:
        # No key anywhere: every row is fully masked. The empty products keep out connected to
        # q, k and v, so autograd returns (zero) gradients instead of None.
        s = _grouped_matmul(q, k.transpose(-1, -2), groups)
        out = _grouped_matmul(s.to(v.dtype), v, groups)
        lse = torch.full((B, Hq, Lq), -math.inf, dtype=lse_dtype, device=device)
        if sinks is not None:  # a softmax over the sink alone: lse = sink
            lse = sinks.to(device=device, dtype=lse_dtype).view(1, Hq, 1).expand(B, Hq, Lq)
        return out.to(out_dtype), lse

    if kv_lengths is not None:
        # Padded keys and values must not reach the output or the gradients, not even as 0 * NaN
        # in a matmul or its backward: select them away before any arithmetic.
        valid = torch.arange(Lk, device=device).view(1, 1, Lk, 1) < kv_lengths.to(
            device=device, dtype=torch.int64
        ).view(B, 1, 1, 1)
        k = torch.where(valid, k, torch.zeros((), dtype=k.dtype, device=device))
        v = torch.where(valid, v, torch.zeros((), dtype=v.dtype, device=device))

    vis = _visibility(B, Lq, Lk, kv_lengths, int(window_left), int(window_right), bool(bottom_right), device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        m = attn_mask.to(device)
        vis = m if vis is None else vis & m

    s = _grouped_matmul(q, k.transpose(-1, -2), groups) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.detach().to(device=device, dtype=s.dtype).expand(B, Hq).reshape(B, Hq, 1, 1)
        s = s - slopes * _key_distance(B, Lq, Lk, kv_lengths, bool(bottom_right), device).to(s.dtype)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.to(device)
    if vis is not None:
        s = torch.where(vis, s, torch.full((), -math.inf, dtype=s.dtype, device=device))

    # Softmax is shift invariant, so the row max is a constant for autograd; detaching it keeps
    # amax's tie-breaking gradient out of the graph. Rows whose max is -inf see no key (and no
    # finite sink): shift by 0 and divide by 1 so exp gives exact zeros and no 0/0 or inf-inf
    # reaches forward or backward.
    row_max = s.amax(dim=-1, keepdim=True).detach()
    sink = None
    if sinks is not None:
        sink = sinks.to(device=device, dtype=s.dtype).view(1, Hq, 1, 1)
        row_max = torch.maximum(row_max, sink.detach())
    dead = row_max == -math.inf
    row_max = torch.where(dead, torch.zeros_like(row_max), row_max)
    p_un = torch.exp(s - row_max)
    denom = p_un.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max)
    denom = torch.where(dead, torch.ones_like(denom), denom)
    probs = p_un / denom
    lse = torch.where(
        dead.squeeze(-1),
        torch.full((), -math.inf, dtype=lse_dtype, device=device),
        row_max.squeeze(-1).to(lse_dtype) + torch.log(denom.squeeze(-1).to(lse_dtype)),
    )

    if dropout_p > 0.0:
        keep = dropout_keep_mask_ref(seed, offset, B, Hq, Lq, Lk, dropout_p, device, index=_dropout_index)
        # p >= 1 keeps nothing; a 0 factor (not inf) keeps inf * 0 out of the backward.
        factor = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
        probs = torch.where(keep, probs * factor, torch.zeros((), dtype=probs.dtype, device=device))

    out = _grouped_matmul(probs.to(v.dtype), v, groups)
    return out.to(out_dtype), lse


def _attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
    """attention_ref over packed sequences, one sequence at a time (see attention_ref's
    cu_seqlens arguments). Returns out ``(1, Hq, total_q, Dv)`` and lse ``(1, Hq, total_q)``."""
    if cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k: required with cu_seqlens_q")
    if kw.get("attn_mask") is not None or kw.get("kv_lengths") is not None:
        raise ValueError("attn_mask, kv_lengths: not taken with cu_seqlens (a sequence sees its own keys)")
    if q.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
        raise ValueError(f"q, k, v: packed sequences are (1, H, total, D) views, got q {tuple(q.shape)}")
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck) or not cq:
        raise ValueError(f"cu_seqlens_q, cu_seqlens_k: expected (N+1,) each, got {len(cq)} and {len(ck)} entries")
    slopes = kw.pop("alibi_slopes", None)
    grid = kw.pop("dropout_grid", None)
    row0, col0, len_q, len_k = (
        (int(x) for x in grid) if grid is not None and len(grid) else (0, 0, max_seqlen_q, max_seqlen_k)
    )
    outs, lses = [], []
    for b in range(len(cq) - 1):
        sl = slopes if slopes is None or slopes.dim() == 1 else slopes[b : b + 1]
        o, lse = attention_ref(
            q[:, :, cq[b] : cq[b + 1]], k[:, :, ck[b] : ck[b + 1]], v[:, :, ck[b] : ck[b + 1]],
            alibi_slopes=sl, _dropout_index=(b, len_q, len_k, row0, col0), **kw,
        )  # fmt: skip
        outs.append(o)
        lses.append(lse)
    if not outs:  # no sequence: empty outputs still connected to q (and to k, v through 0 * sum)
        lse = torch.empty((1, q.shape[1], 0), dtype=_lse_dtype(q.dtype), device=q.device)
        zero = (k.sum() + v.sum()) * 0
        return q.new_zeros((1, q.shape[1], 0, v.shape[-1])) + zero.to(q.dtype), lse
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention_bwd_ref(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_ref` for the cotangent ``grad_out`` (autograd),
    shaped like ``q, k, v``; ``dk``/``dv`` are summed over the query heads of each group.
    Accepts the keyword arguments of :func:`attention_ref`; the mask gets no gradient."""
    with torch.enable_grad():
        qg = q.detach().requires_grad_(True)
        kg = k.detach().requires_grad_(True)
        vg = v.detach().requires_grad_(True)
        mask = kwargs.get("attn_mask")
        if mask is not None:
            kwargs = dict(kwargs, attn_mask=mask.detach())
        out, _ = attention_ref(qg, kg, vg, **kwargs)
        grads = torch.autograd.grad(out, (qg, kg, vg), grad_out.to(out.dtype), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v)))


def sdpa_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    seed: int = 0,
    offset: int = 0,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` semantics on top of
    :func:`attention_ref`: inputs ``(..., L, E)`` / ``(..., S, E)`` / ``(..., S, Ev)`` with
    broadcasting leading dims, top-left ``is_causal``, ``enable_gqa``. Dropout uses the Philox
    keep mask of ``(seed, offset)`` instead of torch's generator."""
    if is_causal and attn_mask is not None:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            "Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead."
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise RuntimeError(f"sdpa_ref: {name} must have at least 2 dims (..., L, E), got {t.dim()}")
    L, E = query.shape[-2:]
    S = key.shape[-2]
    Ev = value.shape[-1]
    if key.shape[-1] != E:
        raise RuntimeError(f"sdpa_ref: key's last dim ({key.shape[-1]}) must equal query's ({E})")
    if value.shape[-2] != S:
        raise RuntimeError(f"sdpa_ref: value's length ({value.shape[-2]}) must equal key's ({S})")

    out_ndim = max(query.dim(), key.dim(), value.dim())
    nd = max(out_ndim, 3)
    q, k, v = (t.reshape((1,) * (nd - t.dim()) + tuple(t.shape)) for t in (query, key, value))

    Hq = q.shape[-3]
    if enable_gqa:
        for name, t in (("key", k), ("value", v)):
            if t.shape[-3] == 0 or Hq % t.shape[-3] != 0:
                raise RuntimeError("Number of heads in key and value must divide the number of heads in query")
        if k.shape[-3] != v.shape[-3]:
            # torch repeats key and value separately; attention_ref wants one kv head count.
            k = k.repeat_interleave(Hq // k.shape[-3], dim=-3)
            v = v.repeat_interleave(Hq // v.shape[-3], dim=-3)
        H, Hkv = Hq, k.shape[-3]
    else:
        H = torch.broadcast_shapes((q.shape[-3],), (k.shape[-3],), (v.shape[-3],))[0]
        Hkv = H
    lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    Bf = math.prod(lead)
    q = q.expand(*lead, H, L, E).reshape(Bf, H, L, E)
    k = k.expand(*lead, Hkv, S, E).reshape(Bf, Hkv, S, E)
    v = v.expand(*lead, Hkv, S, Ev).reshape(Bf, Hkv, S, Ev)

    mask = None
    if attn_mask is not None:
        try:
            mask = attn_mask.broadcast_to(*lead, H, L, S).reshape(Bf, H, L, S)
        except RuntimeError as e:
            raise RuntimeError(
                f"sdpa_ref: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {(*lead, H, L, S)}"
            ) from e

    out, _ = attention_ref(
        q,
        k,
        v,
        attn_mask=mask,
        scale=scale,
        window_left=-1,
        window_right=0 if is_causal else -1,
        bottom_right=False,
        dropout_p=dropout_p,
        seed=seed,
        offset=offset,
    )
    out = out.reshape(*lead, H, L, Ev)
    if out_ndim < 3:
        out = out.reshape(L, Ev)
    return out


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


def _cache_slots(
    cache_seqlens: Tensor, T: int, block_table: Tensor | None, num_slots: int, block_size: int, num_blocks: int
):
    """For each (b, t) the flat destination ``(slot_tensor_index, position_in_slot)`` and whether
    it is in range. Contiguous: slot = b, position = p. Paged: slot = block id, position =
    p % block_size. All in int64."""
    device = cache_seqlens.device
    B = cache_seqlens.shape[0]
    p = cache_seqlens.to(torch.int64).view(B, 1) + torch.arange(T, device=device, dtype=torch.int64)
    if block_table is None:
        valid = (p >= 0) & (p < num_slots)
        slot = torch.arange(B, device=device, dtype=torch.int64).view(B, 1).expand(B, T)
        return slot, p, valid
    table = block_table.to(device=device, dtype=torch.int64)
    max_blocks = table.shape[1]
    blk = torch.div(p, block_size, rounding_mode="floor")
    within = p - blk * block_size
    valid = (p >= 0) & (blk < max_blocks)
    bid = torch.gather(table, 1, blk.clamp(0, max(max_blocks - 1, 0))) if max_blocks > 0 else blk
    valid = valid & (bid >= 0) & (bid < num_blocks)
    return bid, within, valid


def kv_cache_append_ref(
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> None:
    """Write token ``t`` of ``k_new/v_new (B, Hkv, T, D)`` at logical position
    ``cache_seqlens[b] + t``, in place.

    Contiguous caches are ``(B, Hkv, S_max, D)``; paged caches ``(num_blocks, Hkv, block_size,
    D)`` with ``block_table (B, max_blocks)`` mapping logical block ``p // block_size`` to a
    physical block. A token whose position, logical block or block id is out of range is
    skipped, never written (host validation is the public layer's job).

    Packed form: with ``cu_seqlens`` (B+1,), ``k_new/v_new`` are the ``(1, Hkv, total, D)`` views
    of the token-major rows and row ``cu_seqlens[b] + t`` goes to ``cache_seqlens[b] + t``: the
    padded form one sequence at a time (spans clamped into ``[0, total]``).
    """
    if cu_seqlens is not None:
        _kv_cache_append_packed_ref(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cu_seqlens)
        return
    if k_new.dim() != 4 or v_new.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("kv_cache_append_ref: caches and new tokens must be 4-D")
    B, Hkv, T, _ = k_new.shape
    if cache_seqlens.shape != (B,):
        raise ValueError(f"kv_cache_append_ref: cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    if v_new.shape[:3] != (B, Hkv, T):
        raise ValueError("kv_cache_append_ref: k_new and v_new must agree on (B, Hkv, T)")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"kv_cache_append_ref: contiguous k_cache batch {k_cache.shape[0]} != {B}")
        num_slots, block_size, num_blocks = k_cache.shape[2], 0, 0
    else:
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"kv_cache_append_ref: block_table must be (B={B}, max_blocks)")
        num_slots, block_size, num_blocks = 0, k_cache.shape[2], k_cache.shape[0]
    device = k_cache.device
    slot, pos, valid = _cache_slots(
        cache_seqlens.to(device),
        T,
        None if block_table is None else block_table.to(device),
        num_slots,
        block_size,
        num_blocks,
    )
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    dst_slot, dst_pos = slot[b_idx, t_idx], pos[b_idx, t_idx]
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        # (slot, pos) indexing of the (slot, Hkv, pos, D) cache through a transposed view, so
        # index_put_ writes straight into the caller's tensor.
        src = new.to(device=device, dtype=cache.dtype).transpose(1, 2)[b_idx, t_idx]
        cache.transpose(1, 2).index_put_((dst_slot, dst_pos), src)


def _packed_spans(cu_seqlens: Tensor, total: int) -> list[tuple[int, int]]:
    """(start, length) of each sequence of a packed batch, clamped into [0, total] as the kernels'
    seq_span does (a decreasing pair is an empty sequence)."""
    c = [int(x) for x in cu_seqlens.tolist()]
    spans = []
    for b in range(len(c) - 1):
        q0 = min(max(c[b], 0), total)
        q1 = min(max(c[b + 1], q0), total)
        spans.append((q0, q1 - q0))
    return spans


def _kv_cache_append_packed_ref(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cu_seqlens) -> None:
    if k_new.dim() != 4 or k_new.shape[0] != 1 or v_new.dim() != 4 or v_new.shape[0] != 1:
        raise ValueError(
            f"kv_cache_append_ref: packed k_new, v_new are (1, Hkv, total, D) views, got {tuple(k_new.shape)}"
        )
    B = cache_seqlens.shape[0]
    if cu_seqlens.shape != (B + 1,):
        raise ValueError(f"kv_cache_append_ref: cu_seqlens must have shape ({B + 1},), got {tuple(cu_seqlens.shape)}")
    for b, (t0, n) in enumerate(_packed_spans(cu_seqlens, k_new.shape[2])):
        if n == 0:
            continue
        if block_table is None:
            kc, vc, table = k_cache[b : b + 1], v_cache[b : b + 1], None  # views: written in place
        else:
            kc, vc, table = k_cache, v_cache, block_table[b : b + 1]
        kv_cache_append_ref(kc, vc, k_new[:, :, t0 : t0 + n], v_new[:, :, t0 : t0 + n], cache_seqlens[b : b + 1], table)


def _gather_cache(cache: Tensor, block_table: Tensor | None) -> Tensor:
    """Logical view ``(B, Hkv, S, D)`` of a contiguous or paged cache."""
    if block_table is None:
        return cache
    num_blocks, Hkv, bs, D = cache.shape
    table = block_table.to(device=cache.device, dtype=torch.int64)
    B, max_blocks = table.shape
    # Unused table entries may hold anything; clamp to gather, the caller masks those slots.
    g = cache[table.clamp(0, max(num_blocks - 1, 0))]  # (B, max_blocks, Hkv, bs, D)
    return g.permute(0, 2, 1, 3, 4).reshape(B, Hkv, max_blocks * bs, D)


def decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    block_table: Tensor | None = None,
    scale: float | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    max_seqlen_q: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of ``q (B, Hq, Tq, D)`` against the first ``cache_seqlens[b]`` positions of the
    (contiguous or paged) cache. Query ``t`` sits at position ``cache_seqlens[b] - Tq + t`` and
    sees positions up to its own, within the window measured from it. Slots at or past
    ``cache_seqlens[b]`` are selected away before any arithmetic, so garbage or NaN there cannot
    change the result. Returns ``(out (B, Hq, Tq, Dv), lse (B, Hq, Tq))`` like
    :func:`attention_ref`.

    Packed form: with ``cu_seqlens_q`` (B+1,), ``q`` is the ``(1, Hq, total_q, D)`` view of the
    token-major queries and sequence b's ``Tq_b`` queries are rows ``cu_seqlens_q[b]..[b+1]``: the
    padded form one sequence at a time (``max_seqlen_q`` is not needed). Returns out
    ``(1, Hq, total_q, Dv)`` and lse ``(1, Hq, total_q)``; rows in no sequence are 0 / -inf.
    """
    if cu_seqlens_q is not None:
        return _decode_attention_packed_ref(
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            cu_seqlens_q,
            block_table=block_table,
            scale=scale,
            window_left=window_left,
            window_right=window_right,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            sinks=sinks,
        )
    if q.dim() != 4:
        raise ValueError(f"decode_attention_ref: q must be (B, Hq, Tq, D), got {tuple(q.shape)}")
    B = q.shape[0]
    if cache_seqlens.shape != (B,):
        raise ValueError(f"decode_attention_ref: cache_seqlens must have shape ({B},)")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != B):
        raise ValueError(f"decode_attention_ref: block_table must be (B={B}, max_blocks)")
    k = _gather_cache(k_cache, block_table)
    v = _gather_cache(v_cache, block_table)
    S = k.shape[2]
    device = q.device
    lens = cache_seqlens.to(device=device, dtype=torch.int64)
    if bool(((lens < 0) | (lens > S)).any()):
        raise ValueError(
            f"decode_attention_ref: cache_seqlens must lie in [0, {S}] (the cache capacity), got {lens.tolist()}"
        )
    valid = torch.arange(S, device=device).view(1, S) < lens.view(B, 1)
    if block_table is not None:
        bs, num_blocks = k_cache.shape[2], k_cache.shape[0]
        bid = block_table.to(device=device, dtype=torch.int64).repeat_interleave(bs, dim=1)
        bad = valid & ((bid < 0) | (bid >= num_blocks))
        if bool(bad.any()):
            b = int(bad.any(dim=1).nonzero()[0])
            raise ValueError(f"decode_attention_ref: sequence {b} reads a block id outside [0, {num_blocks})")
    valid = valid.view(B, 1, S, 1)
    k = torch.where(valid, k, torch.zeros((), dtype=k.dtype, device=device))
    v = torch.where(valid, v, torch.zeros((), dtype=v.dtype, device=device))
    return attention_ref(
        q,
        k,
        v,
        kv_lengths=lens,
        scale=scale,
        window_left=window_left,
        window_right=0 if window_right < 0 else min(window_right, 0),
        bottom_right=True,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
    )


def _decode_attention_packed_ref(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, *, block_table, alibi_slopes, **kw):
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"decode_attention_ref: packed q is the (1, Hq, total_q, D) view, got {tuple(q.shape)}")
    B = cache_seqlens.shape[0]
    if cu_seqlens_q.shape != (B + 1,):
        raise ValueError(
            f"decode_attention_ref: cu_seqlens_q must have shape ({B + 1},), got {tuple(cu_seqlens_q.shape)}"
        )
    _, Hq, total, _ = q.shape
    Dv = v_cache.shape[-1]
    out = q.new_zeros((1, Hq, total, Dv))
    lse = torch.full((1, Hq, total), -math.inf, dtype=_lse_dtype(q.dtype), device=q.device)
    for b, (t0, n) in enumerate(_packed_spans(cu_seqlens_q, total)):
        if n == 0:
            continue
        if block_table is None:
            kc, vc, table = k_cache[b : b + 1], v_cache[b : b + 1], None
        else:
            kc, vc, table = k_cache, v_cache, block_table[b : b + 1]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b : b + 1]
        o, l_ = decode_attention_ref(
            q[:, :, t0 : t0 + n], kc, vc, cache_seqlens[b : b + 1], block_table=table, alibi_slopes=slopes, **kw
        )
        idx = torch.arange(t0, t0 + n, device=q.device)
        # Out of place, so the pieces keep their gradients (as the padded reference).
        out = out.index_copy(2, idx, o.to(out.dtype))
        lse = lse.index_copy(2, idx, l_.to(lse.dtype))
    return out, lse


# ----------------------------------------------------------------------------------------------
# LSTM cell
# ----------------------------------------------------------------------------------------------


def lstm_cell_ref(
    input: Tensor,
    hx: Tensor | None,
    cx: Tensor | None,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``torch.nn.LSTMCell`` math: gates ``input @ W_ih^T + b_ih + hx @ W_hh^T + b_hh`` split
    as i, f, g, o; ``cy = sigmoid(f) * cx + sigmoid(i) * tanh(g)``, ``hy = sigmoid(o) *
    tanh(cy)``. ``input (B, I)`` or unbatched ``(I,)``; ``hx``/``cx`` default to zeros."""
    unbatched = input.dim() == 1
    if unbatched:
        input = input.unsqueeze(0)
        hx = None if hx is None else hx.unsqueeze(0)
        cx = None if cx is None else cx.unsqueeze(0)
    H = weight_hh.shape[1]
    if hx is None:
        hx = input.new_zeros(input.shape[0], H)
    if cx is None:
        cx = input.new_zeros(input.shape[0], H)
    hy, cy, _ = lstm_cell_fwd_ref(input @ weight_ih.t(), hx @ weight_hh.t(), cx, bias_ih, bias_hh)
    if unbatched:
        return hy.squeeze(0), cy.squeeze(0)
    return hy, cy


def lstm_cell_fwd_ref(
    input_gates: Tensor,
    hidden_gates: Tensor,
    cx: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused part of the LSTM cell (op ``lstm_cell_fwd``): from the two gate GEMM results
    ``(B, 4H)`` and ``cx (B, H)`` return ``(hy, cy, workspace)``, ``workspace (B, 4H)`` holding
    the activated gates ``(sigmoid i, sigmoid f, tanh g, sigmoid o)`` in the input dtype."""
    gates = input_gates + hidden_gates
    if bias_ih is not None:
        gates = gates + bias_ih
    if bias_hh is not None:
        gates = gates + bias_hh
    gi, gf, gg, go = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(gi), torch.sigmoid(gf), torch.tanh(gg), torch.sigmoid(go)
    cy = f * cx + i * g
    hy = o * torch.tanh(cy)
    return hy, cy, torch.cat([i, f, g, o], dim=-1)


def lstm_layer_fwd_ref(
    input_gates: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    bias: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """A whole LSTM layer-direction from its input projections (op ``lstm_layer_fwd``):
    ``input_gates (T, B, 4H)`` = x_t @ W_ih^T of every step, ``h0, c0 (B, H)``,
    ``weight_hh (4H, H)``, ``bias (4H)`` (b_ih + b_hh) or None; steps run last to first when
    ``reverse``. Returns ``(out (T, B, H), h_n, c_n)``, out[t] the h of step t."""
    T = input_gates.shape[0]
    h, c = h0, c0
    outs: list[Tensor | None] = [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h, c, _ = lstm_cell_fwd_ref(input_gates[t], h @ weight_hh.t(), c, bias, None)
        outs[t] = h
    out = torch.stack(outs) if T else input_gates.new_empty((0,) + tuple(h0.shape))
    return out, h, c


def lstm_cell_bwd_ref(
    grad_hy: Tensor | None,
    grad_cy: Tensor | None,
    cx: Tensor,
    cy: Tensor,
    workspace: Tensor,
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`lstm_cell_fwd_ref` (op ``lstm_cell_bwd``): the gradient with respect to
    the pre-activation gates ``(B, 4H)`` (i, f, g, o) and ``grad_cx (B, H)``. A missing
    ``grad_hy`` or ``grad_cy`` counts as zero."""
    i, f, g, o = workspace.chunk(4, dim=-1)
    tanh_cy = torch.tanh(cy)
    if grad_hy is None:
        d_o = torch.zeros_like(o)
        d_c = torch.zeros_like(cy) if grad_cy is None else grad_cy.to(cy.dtype)
    else:
        d_o = grad_hy * tanh_cy
        d_c = grad_hy * o * (1 - tanh_cy * tanh_cy)
        if grad_cy is not None:
            d_c = d_c + grad_cy
    grad_gates = torch.cat(
        [
            d_c * g * i * (1 - i),
            d_c * cx * f * (1 - f),
            d_c * i * (1 - g * g),
            d_o * o * (1 - o),
        ],
        dim=-1,
    )
    return grad_gates.to(workspace.dtype), (d_c * f).to(workspace.dtype)
