"""Fused attention: the public functions, validation, backend dispatch, and the op registrations
(Triton family, fake kernels, autograd) of DESIGN §2-§3.

Visibility of key j from query i of batch b (docs/INTERNALS.md), with Lk_b = kv_lengths[b] and
off_b = Lk_b - Lq (bottom-right, `attention`) or 0 (top-left, torch SDPA's `is_causal`):

    causal, Lq=3, Lk=5 (bottom-right)        causal, Lq=3, Lk=5 (top-left, SDPA)
        j: 0 1 2 3 4                             j: 0 1 2 3 4
    i=0    x x x . .                         i=0    x . . . .
    i=1    x x x x .                         i=1    x x . . .
    i=2    x x x x x                         i=2    x x x . .

    window=(1, 0), bottom-right: i=0 sees j in {1, 2}, i=1 sees {2, 3}, i=2 sees {3, 4}.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends, capabilities
from .. import reference as ref
from ._common import (
    FLOAT_DTYPES,
    MAX_HEAD_DIM,
    acc_dtype,
    check_cu_seqlens,
    check_lengths,
    check_modifiers,
    check_same,
    check_scale,
    check_tensor,
    draw_seed,
    expand_mask,
    kernel_families,
)


@dataclasses.dataclass
class AttentionCall:
    """Normalized arguments, the form every backend receives (docs/INTERNALS.md)."""

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Optional[Tensor]  # expanded to (B, Hq, Lq, Lk)
    kv_lengths: Optional[Tensor]  # int32 (B,)
    scale: float
    window_left: int
    window_right: int
    bottom_right: bool
    dropout_p: float
    seed: int
    offset: int
    # Score modifiers (docs/DESIGN.md §2), in the accumulation type; None / 0.0 = off.
    alibi_slopes: Optional[Tensor] = None  # (B, Hq)
    sinks: Optional[Tensor] = None  # (Hq,), may require grad
    softcap: float = 0.0
    # Packed sequences (attention_varlen; docs/INTERNALS.md): q, k, v are (1, H, total, D) views,
    # cu_seqlens int32 (N+1,); None = the padded form. max_seqlen_* are the dropout index's dims.
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # Recorded for the backward (attention_fwd does not read it); with torch's deterministic flag.
    deterministic: bool = False
    # () or (row0, col0, len_q, len_k): the call is the block at (row0, col0) of a larger attention
    # whose dropout keep mask it draws (csrc/registration.cpp's dropout_grid; context parallelism).
    dropout_grid: Tuple[int, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.q.device

    def args(self):
        return (
            self.q,
            self.k,
            self.v,
            self.attn_mask,
            self.kv_lengths,
            self.scale,
            self.window_left,
            self.window_right,
            self.bottom_right,
            self.dropout_p,
            self.seed,
            self.offset,
            self.alibi_slopes,
            self.sinks,
            self.softcap,
            *self.varlen(),
            self.deterministic,
            list(self.dropout_grid),
        )

    def bwd_args(self, grad_out: Tensor, out: Tensor, lse: Tensor, deterministic: bool = False) -> tuple:
        """The arguments of attention_bwd for this call's forward outputs."""
        a = self.args()
        return (grad_out, *a[:3], out, lse, *a[3:_MODS_AT], deterministic, *a[_MODS_AT:-2], a[-1])

    def varlen(self) -> tuple:
        return (self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k)

    def modifiers(self) -> tuple:
        return capabilities.modifiers_in(self.softcap, self.alibi_slopes, self.sinks)

    def reference_kwargs(self) -> dict:
        """The keyword arguments of reference.attention_ref for this call."""
        return dict(
            attn_mask=self.attn_mask,
            kv_lengths=self.kv_lengths,
            scale=self.scale,
            window_left=self.window_left,
            window_right=self.window_right,
            bottom_right=self.bottom_right,
            dropout_p=self.dropout_p,
            seed=self.seed,
            offset=self.offset,
            softcap=self.softcap or None,
            alibi_slopes=self.alibi_slopes,
            sinks=self.sinks,
            cu_seqlens_q=self.cu_seqlens_q,
            cu_seqlens_k=self.cu_seqlens_k,
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=self.max_seqlen_k,
            dropout_grid=self.dropout_grid,
        )


def _combine_window(causal: bool, window) -> tuple[int, int]:
    left, right = -1, -1
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
            raise ValueError(f"window: expected a pair of ints (left, right) with -1 for unbounded, got {window!r}")
        left, right = int(window[0]), int(window[1])
        if left < -1 or right < -1:
            raise ValueError(f"window: sides must be >= 0 or -1 (unbounded), got {window!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def prepare_attention(
    q,
    k,
    v,
    *,
    causal=False,
    window=None,
    attn_mask=None,
    kv_lengths=None,
    scale=None,
    dropout_p=0.0,
    bottom_right=True,
    seed=None,
    offset=0,
    softcap=None,
    alibi_slopes=None,
    sinks=None,
) -> AttentionCall:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same(("q", "k", "v"), (q, k, v))
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k, v: batch size must match q's {B}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[3] != D:
        raise ValueError(f"k: head dim {k.shape[3]} must equal q's head dim {D}")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(f"v: expected shape ({B}, {Hkv}, {Lk}, Dv) to match k {tuple(k.shape)}, got {tuple(v.shape)}")
    Dv = v.shape[3]
    if Hkv == 0:
        # torch's SDPA returns an empty result for zero heads; here that is refused by name.
        raise ValueError(f"k: expected at least one key/value head, got shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(
            f"q, k: the number of query heads ({Hq}) must be a multiple of the number of key/value heads ({Hkv})"
        )
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        raise ValueError(f"q, v: head dims must be in [1, {MAX_HEAD_DIM}], got D={D}, Dv={Dv}")
    left, right = _combine_window(causal, window)
    mask = None
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dtypes=(torch.bool,) + FLOAT_DTYPES)
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: on device {attn_mask.device}, expected {q.device}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
            attn_mask = attn_mask.to(q.dtype)
        mask = expand_mask(attn_mask, (B, Hq, Lq, Lk))
    lengths = None
    if kv_lengths is not None:
        lengths = check_lengths("kv_lengths", kv_lengths, B, q.device, upper=Lk, upper_name=f"Lk={Lk}")
    scale = check_scale(scale, D)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1], got {dropout_p!r}")
    if dropout_p > 0 and seed is None:
        seed = draw_seed()
    cap, slopes, sink_logits = check_modifiers(q, softcap, alibi_slopes, sinks)
    return AttentionCall(
        q,
        k,
        v,
        mask,
        lengths,
        float(scale),
        left,
        right,
        bool(bottom_right),
        float(dropout_p),
        int(seed or 0),
        int(offset),
        slopes,
        sink_logits,
        cap,
    )


# ---------------------------------------------------------------------------------------------
# What a call asks of a backend; each backend's limits are its row of capabilities.TABLE.


def features(c: AttentionCall) -> capabilities.Features:
    q, m = c.q, c.attn_mask
    B, Hq, _, D = q.shape
    has_mask = m is not None
    return capabilities.Features(
        q.dtype,
        q.device,
        (D, c.v.shape[-1]),
        m.dtype if has_mask else None,
        has_mask and m.requires_grad,
        False,
        (B, Hq),
        c.modifiers(),
        c.cu_seqlens_q is not None,
    )


OP = backends.OpBackends(name="attention", cpp_ops=("attention_fwd", "attention_bwd"), features=features)


# ---------------------------------------------------------------------------------------------
# Triton family: opaque custom ops (torch.compile treats them as one node, also under the interpreter).


@torch.library.custom_op("seqkernels::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    kv_lengths: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    dropout_p: float,
    seed: int,
    offset: int,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    deterministic: bool = False,
    dropout_grid: Optional[Sequence[int]] = None,
) -> tuple[Tensor, Tensor]:
    from ..triton_kernels import attention as tk

    return tk.attention_fwd(
        q,
        k,
        v,
        attn_mask,
        kv_lengths,
        scale,
        window_left,
        window_right,
        bottom_right,
        dropout_p,
        seed,
        offset,
        alibi_slopes,
        sinks,
        softcap,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_grid,
    )


@torch.library.custom_op("seqkernels::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Optional[Tensor],
    kv_lengths: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    dropout_p: float,
    seed: int,
    offset: int,
    deterministic: bool,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    dropout_grid: Optional[Sequence[int]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..triton_kernels import attention as tk

    return tk.attention_bwd(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        attn_mask,
        kv_lengths,
        scale,
        window_left,
        window_right,
        bottom_right,
        dropout_p,
        seed,
        offset,
        deterministic,
        alibi_slopes,
        sinks,
        softcap,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_grid,
    )


# The op's inputs: q, k, v, attn_mask, kv_lengths, then these scalars, then the modifiers
# (alibi_slopes, sinks, softcap), then the packed-sequence arguments (cu_seqlens_q, cu_seqlens_k,
# max_seqlen_q, max_seqlen_k), for the forward `deterministic`, and `dropout_grid` (both; [] = the
# call's own grid).
_N_PARAMS = 7  # scale, window_left, window_right, bottom_right, dropout_p, seed, offset
_MODS_AT = 5 + _N_PARAMS
_VARLEN_AT = _MODS_AT + 3
_MODS_DEFAULT = (None, None, 0.0)
_VARLEN_DEFAULT = (None, None, 0, 0)


def _tail(inputs, at: int, defaults: tuple) -> tuple:
    """inputs[at : at + len(defaults)], the trailing defaults filled in (callers may stop early)."""
    got = tuple(inputs[at : at + len(defaults)])
    return got + defaults[len(got) :]


def _fwd_fake(q, k, v, *rest):
    B, Hq, Lq, _ = q.shape
    lse = q.new_empty((B, Hq, Lq), dtype=acc_dtype(q.dtype))
    if _tail(rest, _VARLEN_AT - 3, _VARLEN_DEFAULT)[0] is not None:
        # Packed: the kernels write out token-major, (total_q, Hq, Dv) storage seen as (1, Hq, total_q, Dv).
        return q.new_empty((Lq, Hq, v.shape[-1])).permute(1, 0, 2).unsqueeze(0), lse
    return q.new_empty((B, Hq, Lq, v.shape[-1])), lse


def _bwd_fake(grad_out, q, k, v, out, lse, *rest):
    # rest: attn_mask, kv_lengths, the scalars, deterministic, then the modifiers.
    sinks = _tail(rest, 3 + _N_PARAMS, _MODS_DEFAULT)[1]
    dsinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=acc_dtype(q.dtype))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, kv_lengths = inputs[:5]
    ctx.params = inputs[5:_MODS_AT]
    alibi, sinks, ctx.softcap = _tail(inputs, _MODS_AT, _MODS_DEFAULT)
    cu_q, cu_k, ctx.max_seqlen = *_tail(inputs, _VARLEN_AT, _VARLEN_DEFAULT)[:2], _tail(inputs, _VARLEN_AT + 2, (0, 0))
    ctx.deterministic, ctx.dropout_grid = _tail(inputs, _VARLEN_AT + 4, (False, ()))
    ctx.save_for_backward(q, k, v, output[0], output[1], attn_mask, kv_lengths, alibi, sinks, cu_q, cu_k)


def _reference_vjp(
    q, k, v, attn_mask, kv_lengths, params, mods, grad_out=None, grad_lse=None, varlen=_VARLEN_DEFAULT, dropout_grid=()
):
    """(dq, dk, dv, dsinks) of the attention (and/or its lse) by autograd through the reference math,
    kept in the graph. This is the backward used when the caller builds a graph of the backward
    itself (`create_graph=True`: double backward, gradient penalties, gradgradcheck): the kernels
    compute first-order gradients only, so their backward would be a constant to autograd and the
    second derivative silently zero. The reference computes the same function (the same Philox keep
    mask for the same seed and offset), so first-order values agree with the kernels' by the parity
    rule. `mods` = (alibi_slopes, sinks, softcap), `varlen` = (cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k); dsinks is None without sinks."""
    scale, window_left, window_right, bottom_right, dropout_p, seed, offset = params
    alibi, sinks, softcap = mods
    cu_q, cu_k, max_q, max_k = varlen
    with torch.enable_grad():
        out, lse = ref.attention_ref(
            q,
            k,
            v,
            attn_mask=attn_mask,
            kv_lengths=kv_lengths,
            scale=scale,
            window_left=window_left,
            window_right=window_right,
            bottom_right=bottom_right,
            dropout_p=dropout_p,
            seed=seed,
            offset=offset,
            softcap=softcap or None,
            alibi_slopes=alibi,
            sinks=sinks,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            dropout_grid=dropout_grid,
        )
        outs, grads = [], []
        if grad_out is not None:
            outs.append(out)
            grads.append(grad_out.to(out.dtype))
        if grad_lse is not None:
            # d lse / d s is the undropped softmax, whatever dropout_p is (as _LseGrad).
            outs.append(lse)
            grads.append(torch.where(torch.isfinite(grad_lse), grad_lse, torch.zeros_like(grad_lse)).to(lse.dtype))
        wrt = (q, k, v, sinks)
        inputs = [t for t in wrt if t is not None and t.requires_grad]
        got = (
            iter(torch.autograd.grad(outs, inputs, grads, create_graph=True, allow_unused=True)) if inputs else iter(())
        )
        res = [next(got) if t is not None and t.requires_grad else None for t in wrt]
    dq, dk, dv = (torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(res[:3], (q, k, v)))
    dsinks = None
    if sinks is not None:
        dsinks = torch.zeros_like(sinks) if res[3] is None else res[3].to(sinks.dtype)
    return dq, dk, dv, dsinks


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        # The lse output is differentiated by _LseGrad in the public layer, so grad_lse is ignored here.
        q, k, v, out, lse, attn_mask, kv_lengths, alibi, sinks, cu_q, cu_k = ctx.saved_tensors
        mods = (alibi, sinks, ctx.softcap)
        varlen = (cu_q, cu_k, *ctx.max_seqlen)
        if torch.is_grad_enabled():
            dq, dk, dv, dsinks = _reference_vjp(
                q, k, v, attn_mask, kv_lengths, ctx.params, mods, grad_out=grad_out, varlen=varlen,
                dropout_grid=ctx.dropout_grid,
            )  # fmt: skip
        else:
            deterministic = ctx.deterministic or torch.are_deterministic_algorithms_enabled()
            # Dense in memory, or in out's own layout (token-major for packed sequences): no copy.
            g = grad_out if grad_out.is_contiguous() or grad_out.stride() == out.stride() else grad_out.contiguous()
            dq, dk, dv, dsinks = bwd_op(
                g, q, k, v, out, lse, attn_mask, kv_lengths, *ctx.params, deterministic, *mods, *varlen,
                ctx.dropout_grid,
            )  # fmt: skip
            if sinks is None:
                dsinks = None
        return (dq, dk, dv, None, None) + (None,) * _N_PARAMS + (None, dsinks, None) + (None,) * 6

    return backward


FAMILIES = kernel_families(
    ("triton_attention_fwd", "triton_attention_bwd"),
    ("attention_fwd", "attention_bwd"),
    (_fwd_fake, _bwd_fake),
    backward=lambda ops: _make_backward(ops[1]),
    setup_context=_setup_context,
)


def _sink_probability(sinks: Tensor, lse: Tensor) -> Tensor:
    """exp(sink_h - lse) per (b, h, i): the softmax weight of the sink (0 where either is -inf)."""
    sk = sinks.view(1, -1, 1).to(lse.dtype)
    ok = torch.isfinite(sk) & torch.isfinite(lse)
    return torch.where(ok, torch.exp(torch.where(ok, sk - lse, torch.zeros_like(lse))), torch.zeros_like(lse))


class _LseGrad(torch.autograd.Function):
    """Gradient of the returned lse for the kernel backends.

    d lse_i / d s_ij = p_ij (undropped) and d lse_i / d sink_h = p_sink. The backend's own backward
    kernel computes dS_ij = P_ij (dO_i . v_j - D_i) and from it dq and dk, with the softcap factor
    where there is one; run with V := ones (Dv = 1), dO_i := g_i and out := 0 (so D_i = 0) it gives
    dS_ij = g_i P_ij, exactly the lse's gradient on the scores. The sinks' share is
    sum over (b, i) of g * p_sink, from the lse itself. Dropout off: lse is defined on the undropped
    scores."""

    @staticmethod
    def forward(ctx, lse, q, k, sinks, call, bwd):
        ctx.call, ctx.bwd = call, bwd
        ctx.save_for_backward(lse, q, k, sinks)
        return lse.view_as(lse)

    @staticmethod
    def backward(ctx, g):
        lse, q, k, sinks = ctx.saved_tensors
        c = ctx.call
        mods = (c.alibi_slopes, sinks, c.softcap)
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            params = (c.scale, c.window_left, c.window_right, c.bottom_right, 0.0, 0, 0)
            dq, dk, _, dsinks = _reference_vjp(
                q, k, c.v, c.attn_mask, c.kv_lengths, params, mods, grad_lse=g, varlen=c.varlen()
            )
            return None, dq, dk, dsinks, None, None
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        B, Hkv, Lk = k.shape[:3]
        params = (c.attn_mask, c.kv_lengths, c.scale, c.window_left, c.window_right, c.bottom_right, 0.0, 0, 0)
        with torch.no_grad():
            ones = q.new_ones((B, Hkv, Lk, 1))
            g_rows = g.unsqueeze(-1).to(q.dtype).contiguous()
            dq, dk, _, _ = ctx.bwd(
                g_rows, q, k, ones, torch.zeros_like(g_rows), lse, *params,
                c.deterministic or torch.are_deterministic_algorithms_enabled(), *mods, *c.varlen(),
            )  # fmt: skip
            dsinks = None
            if sinks is not None:
                dsinks = (g.to(lse.dtype) * _sink_probability(sinks, lse)).sum(dim=(0, 2)).to(sinks.dtype)
        return None, dq, dk, dsinks, None, None


def run(call: AttentionCall, backend: str, return_lse: bool):
    if backend == "reference":
        return ref.attention_ref(call.q, call.k, call.v, **call.reference_kwargs())
    family = FAMILIES[backend]
    out, lse = family[0](*call.args())
    sinks = call.sinks
    wants = call.q.requires_grad or call.k.requires_grad or (sinks is not None and sinks.requires_grad)
    if return_lse and torch.is_grad_enabled() and wants:
        # lse is that of the undropped scores, so its gradient (the undropped softmax) needs no
        # dropout mask: _LseGrad runs the backward kernel with dropout off, whatever dropout_p is.
        lse = _LseGrad.apply(lse.detach(), call.q, call.k, sinks, call, family[1])
    return out, lse


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window=None,
    attn_mask: Optional[Tensor] = None,
    kv_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: Optional[str] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
):
    """Fused scaled-dot-product attention.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) with Hq % Hkv == 0 (GQA/MQA).
    `causal` aligns bottom-right (query i sees key j iff j <= i + Lk_b - Lq), `window=(left, right)`
    bounds the visible keys around that diagonal (-1 = unbounded), `attn_mask` (bool: True takes part;
    float: added to the scaled scores) broadcasts to (B, Hq, Lq, Lk), `kv_lengths` (B,) drops keys
    j >= kv_lengths[b]. A query row that sees no key returns 0 (lse -inf, zero gradients).
    With `return_lse` also returns the float32 (B, Hq, Lq) log-sum-exp of the scaled scores.
    Score modifiers, applied in this order before the mask: `softcap=c` (s <- c * tanh(s / c), as
    Gemma 2), `alibi_slopes` (float32 (Hq,) or (B, Hq): s <- s - slope * |i + off_b - j|, no
    gradient to the slopes); `sinks` ((Hq,), differentiable) adds one logit per query head to the
    softmax denominator that contributes no value (gpt-oss); lse includes it, and a row that sees
    no key still returns 0 (lse = the sink).
    `backend`: "cuda", "cpu", "triton", "reference" or None (automatic; see seqkernels.explain).
    Gradients run on the backend's kernels; a backward that is itself differentiated
    (`create_graph=True`, e.g. a gradient penalty) is recomputed through the reference math.
    """
    call = prepare_attention(
        q,
        k,
        v,
        causal=causal,
        window=window,
        attn_mask=attn_mask,
        kv_lengths=kv_lengths,
        scale=scale,
        dropout_p=dropout_p,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
    )
    b = backends.resolve(OP, q.device, call, backend)
    out, lse = run(call, b, return_lse)
    return (out, lse) if return_lse else out


def prepare_attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    *,
    causal=False,
    window=None,
    scale=None,
    dropout_p=0.0,
    softcap=None,
    alibi_slopes=None,
    sinks=None,
    deterministic=False,
    bottom_right=True,
    seed=None,
    offset=0,
) -> AttentionCall:
    """The packed form's arguments, normalized to the kernels' (1, H, total, D) views
    (docs/INTERNALS.md, "Packed sequences")."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3)
    check_tensor("v", v, ndim=3)
    check_same(("q", "k", "v"), (q, k, v))
    if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1]:
        raise ValueError(
            f"v: expected shape ({k.shape[0]}, {k.shape[1]}, Dv) to match k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    cu_q, max_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, max_seqlen_q, "max_seqlen_q")
    cu_k, max_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, max_seqlen_k, "max_seqlen_k")
    if cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_k: {cu_k.shape[0] - 1} sequences, but cu_seqlens_q has {cu_q.shape[0] - 1}; "
            "each query sequence needs its key sequence"
        )
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__}")
    # The kernels' form: (1, H, total, D) views of the token-major tensors (no copy).
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    call = prepare_attention(q4, k4, v4, causal=causal, window=window, scale=scale, dropout_p=dropout_p,
                             bottom_right=bottom_right, seed=seed, offset=offset)  # fmt: skip
    cap, slopes, sink_logits = check_modifiers(q4, softcap, alibi_slopes, sinks, batch=cu_q.shape[0] - 1)
    return dataclasses.replace(
        call, alibi_slopes=slopes, sinks=sink_logits, softcap=cap, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max_q, max_seqlen_k=max_k, deterministic=deterministic,
    )  # fmt: skip


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    causal: bool = False,
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
    """Attention over packed variable-length sequences (FlashAttention's `flash_attn_varlen_func`).

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), token-major as packed batches
    arrive; cu_seqlens_q / cu_seqlens_k int32 (N+1,), starting at 0, non-decreasing, ending at
    total_q / total_k. Sequence b is query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] against keys
    cu_seqlens_k[b]:cu_seqlens_k[b+1], exactly as `attention` on that one sequence: `causal` and
    `window` align bottom-right per sequence, empty sequences are allowed (no work, no output).
    `max_seqlen_q/k` bound the lengths (None: read from cu_seqlens, a host sync on a GPU); they
    are also the dims of the dropout keep mask, which is the padded form's: element (b, h, i, j)
    of a (N, Hq, max_seqlen_q, max_seqlen_k) batch. `alibi_slopes` is (Hq,) or (N, Hq); the other
    modifiers as in `attention`. Returns out (total_q, Hq, Dv), and with `return_lse` the float32
    lse (Hq, total_q) (FlashAttention's layout). `deterministic=True` asks the backward for
    bitwise repeatable gradients (as torch.use_deterministic_algorithms does for every call).
    """
    call = prepare_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, window=window,
        scale=scale, dropout_p=dropout_p, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        deterministic=deterministic,
    )  # fmt: skip
    out, lse = run_varlen(call, backend, return_lse)
    return (out, lse) if return_lse else out


def run_varlen(call: AttentionCall, backend: Optional[str], return_lse: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """A packed call (prepare_attention_varlen) on its backend: out token-major (total_q, Hq, Dv), lse
    (Hq, total_q) with `return_lse` (else None)."""
    b = backends.resolve(VARLEN_OP, call.q.device, call, backend)
    out, lse = run(call, b, return_lse)
    out = out[0].transpose(0, 1)  # token-major storage from the kernels
    out = out if out.is_contiguous() else out.contiguous()  # (the reference backend's is head-major)
    return out, (lse[0] if return_lse else None)


def _sdpa_to_4d(query, key, value, attn_mask, enable_gqa):
    """torch's SDPA takes (..., H, L, E) and broadcasts the leading dims of query, key and value
    against each other (key/value of batch 1 serve every query batch); the kernels take (B, H, L, E).
    The leading dims (all but the last three; with GQA the head dims may differ, otherwise they
    broadcast too) are expanded as stride-0 views, never copied, then fewer dims get leading 1s and
    more fold into B. Returns the 4-D tensors, the mask, and the output's leading shape."""
    check_tensor("query", query, dtypes=FLOAT_DTYPES)
    check_tensor("key", key)
    check_tensor("value", value)
    r = query.dim()
    if r < 2 or key.dim() != r or value.dim() != r:
        raise ValueError(
            f"query, key, value: expected tensors of equal rank >= 2 (..., L, E), got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    n_lead = r - 2 if (r < 3 or not enable_gqa) else r - 3
    # Leading dims that already agree (the common call) need neither torch.broadcast_shapes nor
    # expands, and 4-D tensors no reshape: together about 30 us a call, more than torch's whole SDPA
    # on a small input (a decode step).
    lq, lk, lv = query.shape[:n_lead], key.shape[:n_lead], value.shape[:n_lead]
    if lq == lk == lv:
        lead = lq
    else:
        try:
            lead = torch.broadcast_shapes(lq, lk, lv)
        except RuntimeError:
            if r >= 3 and not enable_gqa and key.shape[-3] != query.shape[-3]:
                raise ValueError(
                    f"key: {key.shape[-3]} heads differ from query's {query.shape[-3]}; pass enable_gqa=True for GQA/MQA"
                ) from None
            raise ValueError(
                f"query, key, value: leading dims {tuple(lq)}, {tuple(lk)}, {tuple(lv)} do not broadcast "
                "(as in torch's scaled_dot_product_attention)"
            ) from None

    def bcast(t):
        return t if t.shape[:n_lead] == lead else t.expand(*lead, *t.shape[n_lead:])

    query, key, value = bcast(query), bcast(key), bcast(value)
    out_lead = tuple(query.shape[:-1])
    if r == 4:
        return query, key, value, attn_mask, out_lead
    if r < 4:

        def lift(t):
            return t.reshape((1,) * (4 - r) + tuple(t.shape))

        return lift(query), lift(key), lift(value), attn_mask, out_lead
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2]).reshape(-1, *query.shape[-3:-1], key.shape[-2])

    def fold(t):
        return t.reshape(-1, *t.shape[-3:])

    return fold(query), fold(key), fold(value), attn_mask, out_lead


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: Optional[str] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention: same arguments, broadcasting and
    mask polarity (bool True takes part; float is added), `is_causal` aligned top-left as torch does,
    GQA through `enable_gqa`. Leading (batch) dims of query, key and value broadcast against each
    other (key/value of batch 1 serve every query batch) as stride-0 views, without copies. Dropout draws its keep mask from seqkernels' own Philox stream, so it
    matches torch's in distribution, not bit for bit. Keyword-only extras torch has no equivalent
    for: `softcap`, `alibi_slopes` and `sinks`, as in `seqkernels.attention` (4-D inputs; ALiBi
    distances top-left aligned like `is_causal`). torch nested jagged tensors
    (`layout=torch.jagged`, (B, H, j, E) as torch's SDPA takes them; no attn_mask) run through the
    packed-sequence kernels of `attention_varlen` without padding, `is_causal` top-left per
    sequence, and return a nested tensor."""
    nested = [getattr(t, "is_nested", False) for t in (query, key, value)]
    if any(nested) and not nested[0]:
        # The nested path names a dense key/value given with a nested query; the other way round
        # would otherwise fall into the dense checks with a message about the wrong argument.
        raise ValueError(
            "query: expected a nested tensor with layout=torch.jagged like "
            f"{' and '.join(n for n, x in zip(('key', 'value'), nested[1:]) if x)} (as torch's "
            "scaled_dot_product_attention takes them), got a dense tensor"
        )
    if nested[0]:
        from .nested import nested_sdpa

        return nested_sdpa(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            backend=backend, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        )  # fmt: skip
    call, out_lead = _prepare_sdpa(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap, alibi_slopes, sinks
    )
    b = backends.resolve(SDPA_OP, call.device, call, backend)
    out, _ = run(call, b, False)
    return out.reshape(*out_lead, value.shape[-1])


def _prepare_sdpa(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap=None, alibi_slopes=None, sinks=None
):
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask: must be None when is_causal=True (as in torch's scaled_dot_product_attention)")
    q, k, v, mask, out_lead = _sdpa_to_4d(query, key, value, attn_mask, enable_gqa)
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(f"key: {k.shape[1]} heads differ from query's {q.shape[1]}; pass enable_gqa=True for GQA/MQA")
    if (alibi_slopes is not None or sinks is not None) and query.dim() != 4:
        raise ValueError(
            f"alibi_slopes, sinks: supported with 4-D (B, H, L, E) inputs, got query of shape {tuple(query.shape)}"
        )
    call = prepare_attention(
        q,
        k,
        v,
        causal=is_causal,
        attn_mask=mask,
        scale=scale,
        dropout_p=dropout_p,
        bottom_right=False,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
    )
    return call, out_lead


def prepare_sdpa(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    softcap=None,
    alibi_slopes=None,
    sinks=None,
) -> AttentionCall:
    return _prepare_sdpa(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap, alibi_slopes, sinks
    )[0]


SDPA_OP = dataclasses.replace(OP, name="scaled_dot_product_attention", kernels="attention")
VARLEN_OP = dataclasses.replace(OP, name="attention_varlen", kernels="attention")
