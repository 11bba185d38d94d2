"""Fused LSTM cell in Triton: the pointwise part of torch.nn.LSTMCell, forward and backward.

The GEMMs stay in cuBLAS (the public layer computes input_gates = input @ W_ih^T and
hidden_gates = hx @ W_hh^T); these kernels read the two (B, 4H) gate blocks once and do the rest.
Gate order i, f, g, o as in torch; docs/INTERNALS.md has the contract:

    lstm_cell_fwd(input_gates, hidden_gates, cx, bias_ih?, bias_hh?) -> (hy, cy, workspace)
    lstm_cell_bwd(grad_hy?, grad_cy?, cx, cy, workspace)            -> (grad_gates, grad_cx)

workspace (B, 4H) holds the activated gates (sigmoid i, sigmoid f, tanh g, sigmoid o) in the input
dtype. Math runs in float32 (float64 for float64 inputs); loads are cast up front, which also keeps
bf16 arithmetic out of the interpreter, where it is wrong (as is its float32 -> bfloat16 cast, which
truncates: `_to_out` rounds to nearest even by hand there, as the GPU does).

Each program owns a BLOCK_B x BLOCK_H tile of (row, hidden unit) pairs and touches the four gate
columns j, H + j, 2H + j, 3H + j of its rows: memory-bound, one read of every input and one write of
every output.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import capabilities
from ._common import TRITON_DTYPE, StaticConfig, interpreting, lazy_static_configs, refusal, static_signature

# Largest tile, in (row, hidden unit) elements: each element keeps about a dozen values live
# (4 gates, their activations, c), so float64 gets a quarter of the tile to stay within registers.
# The interpreter runs a program as one numpy step: bigger tiles are simply faster there.
_TILE = {2: 2048, 4: 2048, 8: 512}
_INTERPRET_TILE = 8192


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of a non-positive argument never overflows; libdevice.tanh is not available to the interpreter.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _to_out(x, DT: tl.constexpr, BF16_RNE: tl.constexpr):
    if BF16_RNE:
        # The interpreter casts float32 -> bfloat16 by truncation (biased, twice the error of the
        # GPU's round-to-nearest-even, and it compounds over a recurrence); round by hand there.
        b = x.to(tl.uint32, bitcast=True)
        b = b + (((b >> 16) & 1) + 0x7FFF)
        r = ((b >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r).to(DT)
    else:
        return x.to(DT)


@triton.jit
def _lstm_cell_fwd_kernel(
    IG,
    HG,
    CX,
    BIH,
    BHH,
    HY,
    CY,
    WS,
    B,
    H,
    stride_ig,
    stride_hg,
    stride_cx,
    HAS_BIAS_IH: tl.constexpr,
    HAS_BIAS_HH: tl.constexpr,
    F64: tl.constexpr,
    BF16_RNE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    mask = (rows[:, None] < B) & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    ig = IG + r64 * stride_ig + cols[None, :]
    hg = HG + r64 * stride_hg + cols[None, :]

    pre_i = tl.load(ig, mask=mask, other=0.0).to(ACC) + tl.load(hg, mask=mask, other=0.0).to(ACC)
    pre_f = tl.load(ig + H, mask=mask, other=0.0).to(ACC) + tl.load(hg + H, mask=mask, other=0.0).to(ACC)
    pre_g = tl.load(ig + 2 * H, mask=mask, other=0.0).to(ACC) + tl.load(hg + 2 * H, mask=mask, other=0.0).to(ACC)
    pre_o = tl.load(ig + 3 * H, mask=mask, other=0.0).to(ACC) + tl.load(hg + 3 * H, mask=mask, other=0.0).to(ACC)
    # Biases are read as full tiles (every row the same address, served by L1): a 1-D load
    # broadcast over rows would need a layout conversion through shared memory.
    bcol = (rows * 0)[:, None] + cols[None, :]
    if HAS_BIAS_IH:
        pre_i += tl.load(BIH + bcol, mask=mask, other=0.0).to(ACC)
        pre_f += tl.load(BIH + H + bcol, mask=mask, other=0.0).to(ACC)
        pre_g += tl.load(BIH + 2 * H + bcol, mask=mask, other=0.0).to(ACC)
        pre_o += tl.load(BIH + 3 * H + bcol, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS_HH:
        pre_i += tl.load(BHH + bcol, mask=mask, other=0.0).to(ACC)
        pre_f += tl.load(BHH + H + bcol, mask=mask, other=0.0).to(ACC)
        pre_g += tl.load(BHH + 2 * H + bcol, mask=mask, other=0.0).to(ACC)
        pre_o += tl.load(BHH + 3 * H + bcol, mask=mask, other=0.0).to(ACC)
    cx = tl.load(CX + r64 * stride_cx + cols[None, :], mask=mask, other=0.0).to(ACC)

    i = _sigmoid(pre_i)
    f = _sigmoid(pre_f)
    g = _tanh(pre_g)
    o = _sigmoid(pre_o)
    cy = f * cx + i * g
    hy = o * _tanh(cy)

    out = r64 * H + cols[None, :]
    ws = WS + r64 * (4 * H) + cols[None, :]
    dt: tl.constexpr = HY.dtype.element_ty
    tl.store(HY + out, _to_out(hy, dt, BF16_RNE), mask=mask)
    tl.store(CY + out, _to_out(cy, dt, BF16_RNE), mask=mask)
    tl.store(ws, _to_out(i, dt, BF16_RNE), mask=mask)
    tl.store(ws + H, _to_out(f, dt, BF16_RNE), mask=mask)
    tl.store(ws + 2 * H, _to_out(g, dt, BF16_RNE), mask=mask)
    tl.store(ws + 3 * H, _to_out(o, dt, BF16_RNE), mask=mask)


@triton.jit
def _lstm_cell_bwd_kernel(
    GH,
    GC,
    CX,
    CY,
    WS,
    GG,
    GCX,
    B,
    H,
    stride_gh,
    stride_gc,
    stride_cx,
    stride_cy,
    stride_ws,
    HAS_GRAD_HY: tl.constexpr,
    HAS_GRAD_CY: tl.constexpr,
    F64: tl.constexpr,
    BF16_RNE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < B) & (cols[None, :] < H)
    r64 = rows.to(tl.int64)[:, None]
    c = cols[None, :]

    cx = tl.load(CX + r64 * stride_cx + c, mask=mask, other=0.0).to(ACC)
    cy = tl.load(CY + r64 * stride_cy + c, mask=mask, other=0.0).to(ACC)
    ws = WS + r64 * stride_ws + c
    i = tl.load(ws, mask=mask, other=0.0).to(ACC)
    f = tl.load(ws + H, mask=mask, other=0.0).to(ACC)
    g = tl.load(ws + 2 * H, mask=mask, other=0.0).to(ACC)
    o = tl.load(ws + 3 * H, mask=mask, other=0.0).to(ACC)
    tc = _tanh(cy)
    dc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    d_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    if HAS_GRAD_HY:
        gh = tl.load(GH + r64 * stride_gh + c, mask=mask, other=0.0).to(ACC)
        dc += gh * o * (1.0 - tc * tc)
        d_o = gh * tc
    if HAS_GRAD_CY:
        dc += tl.load(GC + r64 * stride_gc + c, mask=mask, other=0.0).to(ACC)

    gg = GG + r64 * (4 * H) + c
    dt: tl.constexpr = GG.dtype.element_ty
    tl.store(gg, _to_out(dc * g * i * (1.0 - i), dt, BF16_RNE), mask=mask)
    tl.store(gg + H, _to_out(dc * cx * f * (1.0 - f), dt, BF16_RNE), mask=mask)
    tl.store(gg + 2 * H, _to_out(dc * i * (1.0 - g * g), dt, BF16_RNE), mask=mask)
    tl.store(gg + 3 * H, _to_out(d_o * o * (1.0 - o), dt, BF16_RNE), mask=mask)
    tl.store(GCX + r64 * H + c, _to_out(dc * f, dt, BF16_RNE), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (signatures of the seqkernels::lstm_cell_fwd / lstm_cell_bwd schemas).


def _blocks(B: int, H: int, elem_size: int) -> tuple[int, int]:
    tile = _INTERPRET_TILE if interpreting() else _TILE[elem_size]
    block_h = min(triton.next_power_of_2(max(H, 1)), tile if interpreting() else 256)
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), tile // block_h))
    return block_b, block_h


def _num_warps(block_b: int, block_h: int, elem_size: int) -> int:
    """Enough warps that each thread moves 16 bytes per access (one vector), at most 4."""
    vec = 16 // elem_size
    return max(1, min(4, block_b * block_h // (32 * vec)))


def _rows(name: str, t: torch.Tensor, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """`t` validated against `shape`, dtype and device of `like`, with a unit stride on its last dim."""
    if tuple(t.shape) != shape:
        raise ValueError(f"lstm_cell: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"lstm_cell: {name} must have dtype {like.dtype} on {like.device} like the other inputs, "
            f"got {t.dtype} on {t.device}"
        )
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def unsupported_reason(t: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels refuse inputs like `t`, or None (the capability table's answer)."""
    return refusal("lstm_cell", capabilities.Features(dtype=t.dtype, device=t.device))


def lstm_cell_fwd(
    input_gates: torch.Tensor,
    hidden_gates: torch.Tensor,
    cx: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
):
    if input_gates.dim() != 2 or input_gates.shape[1] % 4 != 0:
        raise ValueError(f"lstm_cell: input_gates must have shape (B, 4*H), got {tuple(input_gates.shape)}")
    reason = unsupported_reason(input_gates)
    if reason:
        raise ValueError(reason)
    B, G = input_gates.shape
    H = G // 4
    ig = _rows("input_gates", input_gates, (B, G), input_gates)
    hg = _rows("hidden_gates", hidden_gates, (B, G), input_gates)
    c = _rows("cx", cx, (B, H), input_gates)
    bih = None if bias_ih is None else _rows("bias_ih", bias_ih, (G,), input_gates)
    bhh = None if bias_hh is None else _rows("bias_hh", bias_hh, (G,), input_gates)
    hy = torch.empty((B, H), dtype=ig.dtype, device=ig.device)
    cy = torch.empty_like(hy)
    ws = torch.empty((B, G), dtype=ig.dtype, device=ig.device)
    if B == 0 or H == 0:
        return hy, cy, ws
    block_b, block_h = _blocks(B, H, ig.element_size())
    grid = (triton.cdiv(H, block_h), triton.cdiv(B, block_b))
    _lstm_cell_fwd_kernel[grid](
        ig,
        hg,
        c,
        bih if bih is not None else ig,
        bhh if bhh is not None else ig,
        hy,
        cy,
        ws,
        B,
        H,
        ig.stride(0),
        hg.stride(0),
        c.stride(0),
        HAS_BIAS_IH=bih is not None,
        HAS_BIAS_HH=bhh is not None,
        F64=ig.dtype == torch.float64,
        BF16_RNE=interpreting() and ig.dtype == torch.bfloat16,
        BLOCK_B=block_b,
        BLOCK_H=block_h,
        num_warps=_num_warps(block_b, block_h, ig.element_size()),
    )
    return hy, cy, ws


def lstm_cell_bwd(
    grad_hy: Optional[torch.Tensor],
    grad_cy: Optional[torch.Tensor],
    cx: torch.Tensor,
    cy: torch.Tensor,
    workspace: torch.Tensor,
):
    if workspace.dim() != 2 or workspace.shape[1] % 4 != 0:
        raise ValueError(f"lstm_cell: workspace must have shape (B, 4*H), got {tuple(workspace.shape)}")
    reason = unsupported_reason(workspace)
    if reason:
        raise ValueError(reason)
    B, G = workspace.shape
    H = G // 4
    ws = _rows("workspace", workspace, (B, G), workspace)
    c = _rows("cx", cx, (B, H), workspace)
    cyr = _rows("cy", cy, (B, H), workspace)
    gh = None if grad_hy is None else _rows("grad_hy", grad_hy, (B, H), workspace)
    gc = None if grad_cy is None else _rows("grad_cy", grad_cy, (B, H), workspace)
    grad_gates = torch.empty((B, G), dtype=ws.dtype, device=ws.device)
    grad_cx = torch.empty((B, H), dtype=ws.dtype, device=ws.device)
    if B == 0 or H == 0:
        return grad_gates, grad_cx
    block_b, block_h = _blocks(B, H, ws.element_size())
    grid = (triton.cdiv(H, block_h), triton.cdiv(B, block_b))
    _lstm_cell_bwd_kernel[grid](
        gh if gh is not None else c,
        gc if gc is not None else c,
        c,
        cyr,
        ws,
        grad_gates,
        grad_cx,
        B,
        H,
        gh.stride(0) if gh is not None else 0,
        gc.stride(0) if gc is not None else 0,
        c.stride(0),
        cyr.stride(0),
        ws.stride(0),
        HAS_GRAD_HY=gh is not None,
        HAS_GRAD_CY=gc is not None,
        F64=ws.dtype == torch.float64,
        BF16_RNE=interpreting() and ws.dtype == torch.bfloat16,
        BLOCK_B=block_b,
        BLOCK_H=block_h,
        num_warps=_num_warps(block_b, block_h, ws.element_size()),
    )
    return grad_gates, grad_cx


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile list (the static no-GPU report compiles each for its arch: no spills, no
# local memory). Same protocol as the other kernel files.


def _static_signature(fn, dtype: torch.dtype, constexprs: dict):
    """Pointers of `dtype` (16-byte aligned, as torch allocates), int32 sizes. H and the row strides
    are taken as multiples of 16, as Triton specializes them at run time for the usual widths
    (H = 256, 512, ...): that is what lets every gate block load with 16-byte vectors. B is not."""
    return static_signature(
        fn,
        constexprs,
        lambda name: f"*{TRITON_DTYPE[dtype]}" if name[0].isupper() and name not in ("B", "H") else None,
        lambda name: name.startswith("stride_") or name == "H",
    )


def _static_configs() -> list:
    """What the launchers pick on a GPU: the large tile (B >= 8, H >= 256) for every dtype with and
    without biases (seqkernels.nn.LSTM folds them into its input GEMM) / both gradients; for bf16
    also the one-row tile (batch 1 decoding) and the backward with grad_cy only."""
    out = []
    for arch in (80, 90):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            size = torch.empty((), dtype=dtype).element_size()
            tiles = [(_TILE[size] // 256, 256)]
            if dtype == torch.bfloat16:
                tiles.append((1, 256))
            for block_b, block_h in tiles:
                warps = _num_warps(block_b, block_h, size)
                common = dict(F64=dtype == torch.float64, BF16_RNE=False, BLOCK_B=block_b, BLOCK_H=block_h)
                elt = TRITON_DTYPE[dtype]
                for bias in (True, False):
                    c = dict(common, HAS_BIAS_IH=bias, HAS_BIAS_HH=bias)
                    sig, consts, attrs = _static_signature(_lstm_cell_fwd_kernel, dtype, c)
                    out.append(
                        StaticConfig(
                            _lstm_cell_fwd_kernel,
                            sig,
                            consts,
                            warps,
                            1,
                            False,
                            arch=arch,
                            attrs=attrs,
                            name=f"_lstm_cell_fwd_kernel sm_{arch} {elt} BLOCK_B={block_b} "
                            f"BLOCK_H={block_h} bias={bias} warps={warps}",
                        )
                    )
                for has_hy in (True, False) if dtype == torch.bfloat16 else (True,):
                    c = dict(common, HAS_GRAD_HY=has_hy, HAS_GRAD_CY=True)
                    sig, consts, attrs = _static_signature(_lstm_cell_bwd_kernel, dtype, c)
                    out.append(
                        StaticConfig(
                            _lstm_cell_bwd_kernel,
                            sig,
                            consts,
                            warps,
                            1,
                            False,
                            arch=arch,
                            attrs=attrs,
                            name=f"_lstm_cell_bwd_kernel sm_{arch} {elt} BLOCK_B={block_b} "
                            f"BLOCK_H={block_h} grad_hy={has_hy} warps={warps}",
                        )
                    )
    return out


STATIC_CONFIGS: list  # the ahead-of-time compile list, built on first access
__getattr__ = lazy_static_configs(globals(), _static_configs)
