"""Fused LSTM cell: the public `lstm_cell`, validation, backend dispatch, the op registrations
(Triton family, fake kernels, autograd) and the sequence driver used by `seqkernels.nn.LSTM`.

The math is torch.nn.LSTMCell's, gates in torch's order (i, f, g, o):

    gates = input @ W_ih^T + b_ih + hx @ W_hh^T + b_hh          (B, 4H)   two GEMMs (cuBLAS / MKL)
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of the 4 chunks           \\
    cy = f * cx + i * g                                                     } one fused kernel
    hy = o * tanh(cy)                                                      /

The fused kernel (`lstm_cell_fwd`) also saves the activated gates as a workspace; its backward
(`lstm_cell_bwd`) is one pointwise pass giving the gate gradients, which the GEMMs' own backward turns
into the input, hidden and weight gradients (bias gradients are column sums).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, capabilities
from .. import reference as ref
from ._common import FLOAT_DTYPES, check_same, check_tensor, kernel_families, register_family


@dataclasses.dataclass
class LSTMCellCall:
    """Normalized arguments: batched 2-D `input (B, I)`, `hx, cx (B, H)`, `weight_ih (4H, I)`,
    `weight_hh (4H, H)`, optional biases `(4H,)`; `batched` is False when the caller passed 1-D
    (unbatched) input, whose outputs are squeezed back."""

    input: Tensor
    hx: Tensor
    cx: Tensor
    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Optional[Tensor]
    bias_hh: Optional[Tensor]
    batched: bool = True

    @property
    def device(self) -> torch.device:
        return self.input.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input.dtype


def prepare_lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None) -> LSTMCellCall:
    check_tensor("weight_ih", weight_ih, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight_hh", weight_hh, ndim=2)
    G, n_in = weight_ih.shape
    if G % 4 != 0 or G == 0:
        raise ValueError(f"weight_ih: expected shape (4*hidden_size, input_size), got {tuple(weight_ih.shape)}")
    H = G // 4
    if tuple(weight_hh.shape) != (G, H):
        raise ValueError(
            f"weight_hh: expected shape (4*hidden_size, hidden_size) = ({G}, {H}) to match weight_ih "
            f"{tuple(weight_ih.shape)}, got {tuple(weight_hh.shape)}"
        )
    check_tensor("input", input)
    if input.dim() not in (1, 2):
        raise ValueError(
            f"input: expected a 2-D (batch, input_size) or 1-D (input_size,) tensor, got shape {tuple(input.shape)}"
        )
    if input.shape[-1] != n_in:
        raise ValueError(f"input: has {input.shape[-1]} features but weight_ih expects input_size={n_in}")
    batched = input.dim() == 2
    B = input.shape[0] if batched else 1
    want = (B, H) if batched else (H,)
    if hx is None:
        hx = torch.zeros(want, dtype=input.dtype, device=input.device)
    if cx is None:
        cx = torch.zeros(want, dtype=input.dtype, device=input.device)
    for name, t in (("hx", hx), ("cx", cx)):
        check_tensor(name, t)
        if tuple(t.shape) != want:
            kind = f"(batch, hidden_size) = {want}" if batched else f"(hidden_size,) = {want} for unbatched 1-D input"
            raise ValueError(f"{name}: expected shape {kind}, got {tuple(t.shape)}")
    names, tensors = ["input", "hx", "cx", "weight_ih", "weight_hh"], [input, hx, cx, weight_ih, weight_hh]
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            check_tensor(name, b)
            if tuple(b.shape) != (G,):
                raise ValueError(f"{name}: expected shape (4*hidden_size,) = ({G},), got {tuple(b.shape)}")
            names.append(name)
            tensors.append(b)
    check_same(names, tensors)
    if not batched:
        input, hx, cx = input.unsqueeze(0), hx.unsqueeze(0), cx.unsqueeze(0)
    return LSTMCellCall(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, batched)


# ---------------------------------------------------------------------------------------------
# What a call asks of a backend; each backend's limits are its row of capabilities.TABLE.
def features(c: LSTMCellCall) -> capabilities.Features:
    return capabilities.Features(dtype=c.dtype, device=c.device)


OP = backends.OpBackends(name="lstm_cell", cpp_ops=("lstm_cell_fwd", "lstm_cell_bwd"), features=features)


# ---------------------------------------------------------------------------------------------
# Triton family: opaque custom ops (torch.compile treats each as one node, also under the interpreter).


@torch.library.custom_op("seqkernels::triton_lstm_cell_fwd", mutates_args=())
def triton_lstm_cell_fwd(
    input_gates: Tensor, hidden_gates: Tensor, cx: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels import lstm_cell as tk

    return tk.lstm_cell_fwd(input_gates, hidden_gates, cx, bias_ih, bias_hh)


@torch.library.custom_op("seqkernels::triton_lstm_cell_bwd", mutates_args=())
def triton_lstm_cell_bwd(
    grad_hy: Optional[Tensor], grad_cy: Optional[Tensor], cx: Tensor, cy: Tensor, workspace: Tensor
) -> tuple[Tensor, Tensor]:
    from ..triton_kernels import lstm_cell as tk

    return tk.lstm_cell_bwd(grad_hy, grad_cy, cx, cy, workspace)


def _fwd_fake(input_gates, hidden_gates, cx, bias_ih, bias_hh):
    B, G = input_gates.shape
    return (input_gates.new_empty((B, G // 4)), input_gates.new_empty((B, G // 4)), input_gates.new_empty((B, G)))


def _bwd_fake(grad_hy, grad_cy, cx, cy, workspace):
    return torch.empty_like(workspace, memory_format=torch.contiguous_format), torch.empty_like(
        cx, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    _, _, cx, bias_ih, bias_hh = inputs
    _, cy, workspace = output
    ctx.has_bias = (bias_ih is not None, bias_hh is not None)
    ctx.save_for_backward(cx, cy, workspace)


def _double_backward_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"{op}: double backward (a backward with create_graph=True, e.g. gradgradcheck or a "
        "gradient penalty) is not implemented by the fused cpu/cuda/triton kernels; use "
        "backend='reference' (or seqkernels.use_backend('reference')) for higher-order gradients"
    )


class _SecondDerivativeRefused(torch.autograd.Function):
    """Identity on a kernel backward's results whose own backward raises _double_backward_error:
    what torch's once_differentiable does, with a message that names the op and the way out."""

    @staticmethod
    def forward(ctx, op, *grads):
        ctx.op = op
        return tuple(None if g is None else g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise _double_backward_error(ctx.op)


def _once_differentiable(op: str):
    """torch.autograd.function.once_differentiable for the LSTM layers' backward: the backward runs
    without recording; when a graph is being built (create_graph=True) its results carry a node
    that raises, by name, if they are differentiated again (never a silent zero)."""

    def wrap(fn):
        @functools.wraps(fn)
        def backward(ctx, *args):
            with torch.no_grad():
                out = fn(ctx, *args)
            if not torch.is_grad_enabled() or not any(isinstance(a, Tensor) and a.requires_grad for a in args):
                return out
            # Detached leaves that require grad, as once_differentiable makes them: the refusing
            # node is then on every path into them.
            leaves = [None if g is None else g.detach().requires_grad_() for g in out]
            return _SecondDerivativeRefused.apply(op, *leaves)

        return backward

    return wrap


def _make_backward(bwd_op):
    def backward(ctx, grad_hy, grad_cy, grad_workspace):
        # The workspace is an implementation detail of the backward, not a differentiable output.
        cx, cy, workspace = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the fused backward is one opaque kernel, so autograd would treat its
            # result as a constant and every second derivative would silently be zero. Refuse instead.
            raise _double_backward_error("lstm_cell")
        grad_gates, grad_cx = bwd_op(grad_hy, grad_cy, cx, cy, workspace)
        need = ctx.needs_input_grad
        grad_bias = grad_gates.sum(0) if (need[3] or need[4]) else None
        return (
            grad_gates if need[0] else None,
            grad_gates if need[1] else None,
            grad_cx if need[2] else None,
            grad_bias if ctx.has_bias[0] and need[3] else None,
            grad_bias if ctx.has_bias[1] and need[4] else None,
        )

    return backward


FAMILIES = kernel_families(
    ("triton_lstm_cell_fwd", "triton_lstm_cell_bwd"),
    ("lstm_cell_fwd", "lstm_cell_bwd"),
    (_fwd_fake, _bwd_fake),
    backward=lambda ops: _make_backward(ops[1]),
    setup_context=_setup_context,
)


def _layer_fake(input_gates, h0, c0, weight_hh, bias, reverse):
    T, B, G = input_gates.shape
    return (
        input_gates.new_empty((T, B, G // 4)),
        input_gates.new_empty((B, G // 4)),
        input_gates.new_empty((B, G // 4)),
    )


def _layer_fused_fake(input, h0, c0, weight_ih, weight_hh, bias, reverse, train):
    T, B, n_in = input.shape
    G = weight_ih.shape[0] if weight_ih is not None else n_in  # without weight_ih: input gates
    H, Ts = G // 4, T if train else 0
    e = input.new_empty
    return e((T, B, H)), e((B, H)), e((B, H)), e((Ts, B, G)), e((Ts, B, H))


def _layer_bwd_fake(grad_out, grad_hn, grad_cn, workspace, cs, c0, weight_hh, reverse):
    T, B, G = workspace.shape
    e = workspace.new_empty
    return e((T, B, G)), e((B, G // 4)), e((B, G // 4))


# The CPU sequence kernel (see _cpu_layer_forward) and its float32 overloads lstm_layer_fwd.fused
# (the input projection inside the kernel; inference and training) and lstm_layer_fwd.backward
# (see _CpuLayer).
_HAS_LAYER_OP = register_family(("lstm_layer_fwd",), (_layer_fake,), cpp=True) is not None
_HAS_LAYER_FUSED = _HAS_LAYER_OP and {"fused", "backward"} <= set(torch.ops.seqkernels.lstm_layer_fwd.overloads())
if _HAS_LAYER_FUSED:
    torch.library.register_fake("seqkernels::lstm_layer_fwd.fused")(_layer_fused_fake)
    torch.library.register_fake("seqkernels::lstm_layer_fwd.backward")(_layer_bwd_fake)

# The reference backend's pair, for the sequence driver below (plain torch, differentiable).
FAMILIES["reference"] = (ref.lstm_cell_fwd_ref, ref.lstm_cell_bwd_ref)


def run(call: LSTMCellCall, backend: str) -> Tuple[Tensor, Tensor]:
    c = call
    if backend == "reference":
        return ref.lstm_cell_ref(c.input, c.hx, c.cx, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)
    fwd = FAMILIES[backend][0]
    tensors = (c.input, c.hx, c.cx, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        hy, cy, _ = fwd(F.linear(c.input, c.weight_ih), F.linear(c.hx, c.weight_hh), c.cx, c.bias_ih, c.bias_hh)
        return hy, cy
    # Nothing to differentiate: below the autograd keys the calls skip autograd's dispatch, a good
    # part of a small cell's host time.
    with torch._C._AutoDispatchBelowAutograd():
        hy, cy, _ = fwd.default(F.linear(c.input, c.weight_ih), F.linear(c.hx, c.weight_hh), c.cx, c.bias_ih, c.bias_hh)
    return hy, cy


def lstm_cell(
    input: Tensor,
    hx: Optional[Tensor],
    cx: Optional[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """One step of torch.nn.LSTMCell: returns `(hy, cy)`.

    input `(B, input_size)`, hx and cx `(B, hidden_size)` (or all 1-D for one unbatched sample),
    weight_ih `(4*hidden_size, input_size)`, weight_hh `(4*hidden_size, hidden_size)`, optional biases
    `(4*hidden_size,)`; gate order i, f, g, o as in torch; `hx` / `cx` None mean zeros. The GEMMs run
    in torch (cuBLAS / MKL), the rest in one fused kernel, forward and backward. `backend`: "cuda",
    "cpu", "triton", "reference" or None (automatic; see seqkernels.explain("lstm_cell", ...)).
    """
    call = prepare_lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    b = backends.resolve(OP, call.device, call, backend)
    hy, cy = run(call, b)
    if not call.batched:
        hy, cy = hy.squeeze(0), cy.squeeze(0)
    return hy, cy


# ---------------------------------------------------------------------------------------------
# Sequence driver for seqkernels.nn.LSTM: one layer, one direction.
#
# Rows are time-major and packed like a PackedSequence: step t owns rows [off_t, off_t + bs_t) of
# `x (N, I)`, with non-increasing batch sizes bs_t (a padded batch is the special case bs_t = B). The
# input projection of many steps is one GEMM; each step then runs one recurrent GEMM and one fused
# cell. A forward pass over shrinking batches leaves a sequence's final state in the rows it drops;
# the reverse direction starts late sequences from their initial state as the batch grows.


def _offsets(batch_sizes: Sequence[int]):
    offs, o = [], 0
    for bs in batch_sizes:
        offs.append(o)
        o += bs
    return offs


# Input projections are computed a chunk of whole time steps at a time into one reused buffer of
# about this size: it stays in cache for the per-step kernels that read it, and a fresh multi-MB
# result per layer (page faults on every call) is avoided. Kernel backends only; the reference
# backend keeps one differentiable GEMM.
_PROJ_CHUNK_BYTES = 4 << 20


def _chunks(batch_sizes: Sequence[int], max_rows: int):
    """Consecutive step ranges [t0, t1) holding at most `max_rows` rows (at least one step)."""
    out, t0, rows = [], 0, 0
    for t, bs in enumerate(batch_sizes):
        if rows and rows + bs > max_rows:
            out.append((t0, t))
            t0, rows = t, 0
        rows += bs
    out.append((t0, len(batch_sizes)))
    return out


def _summed_bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    """b_ih + b_hh, or whichever is present: the sequence paths add both biases once per step."""
    if b_ih is not None and b_hh is not None:
        return b_ih + b_hh
    return b_ih if b_ih is not None else b_hh


def _layer_forward(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, fwd, saved: Optional[dict], reuse_buffers: bool
):
    T = len(batch_sizes)
    offs = _offsets(batch_sizes)
    G = w_ih.shape[0]
    # Both biases fold into the projection GEMM, so the per-step kernel adds none. The transposed
    # weights are made contiguous once per call: the BLAS then reads rows, which is measurably
    # faster for the many small recurrent GEMMs.
    w_ih_t = w_ih.t().contiguous()
    w_hh_t = w_hh.t().contiguous()
    bias = _summed_bias(b_ih, b_hh)

    def project(rows: Tensor, out: Optional[Tensor] = None) -> Tensor:
        kw = {} if out is None else {"out": out}
        return torch.addmm(bias, rows, w_ih_t, **kw) if bias is not None else torch.mm(rows, w_ih_t, **kw)

    if reuse_buffers:
        chunks = _chunks(batch_sizes, max(batch_sizes[0], _PROJ_CHUNK_BYTES // (G * x.element_size())))
        proj_buf = x.new_empty((max(sum(batch_sizes[t0:t1]) for t0, t1 in chunks), G))
        hg_buf = x.new_empty((batch_sizes[0], G))
        hg_views = {}
        # Kernel backends run this loop without autograd (their backward is _LSTMLayer's): below the
        # autograd keys every op call skips autograd's bookkeeping, which is most of a small step's
        # host time on a GPU.
        guard = torch._C._AutoDispatchBelowAutograd()
        fwd = getattr(fwd, "default", fwd)
    else:
        chunks = [(0, T)]
        guard = contextlib.nullcontext()
    outs = [None] * T
    h_fin, c_fin = [], []  # final states of rows dropped by a shrinking batch, highest rows first
    if reverse:
        h, c = h0[: batch_sizes[-1]], c0[: batch_sizes[-1]]
    else:
        h, c = h0, c0
    rows = h.shape[0]
    with guard:
        for t0, t1 in chunks[::-1] if reverse else chunks:
            r0, r1 = offs[t0], offs[t1 - 1] + batch_sizes[t1 - 1]
            proj = project(x[r0:r1], proj_buf[: r1 - r0] if reuse_buffers else None)
            steps_x = torch.split(proj, batch_sizes[t0:t1])
            for t in range(t1 - 1, t0 - 1, -1) if reverse else range(t0, t1):
                bs = batch_sizes[t]
                if bs < rows:
                    h_fin.append(h[bs:])
                    c_fin.append(c[bs:])
                    h, c = h[:bs], c[:bs]
                elif bs > rows:
                    h, c = torch.cat([h, h0[rows:bs]]), torch.cat([c, c0[rows:bs]])
                rows = bs
                if reuse_buffers:
                    hg = hg_views.get(bs)
                    if hg is None:
                        hg = hg_views[bs] = hg_buf[:bs]
                    gates_h = torch.mm(h, w_hh_t, out=hg)
                else:
                    gates_h = torch.mm(h, w_hh_t)
                hy, cy, ws = fwd(steps_x[t - t0], gates_h, c, None, None)
                if saved is not None:
                    saved["h_prev"][t], saved["c_prev"][t], saved["cy"][t], saved["ws"][t] = h, c, cy, ws
                outs[t] = hy
                h, c = hy, cy
        out = torch.cat(outs) if T > 1 else outs[0]
        if h_fin:
            h = torch.cat([h] + h_fin[::-1])
            c = torch.cat([c] + c_fin[::-1])
    return out, h, c


class _LSTMLayer(torch.autograd.Function):
    """One layer-direction over a packed sequence on a kernel backend. The backward runs the fused
    backward per step plus one recurrent GEMM per step; the weight, input and bias gradients of all
    steps are each one GEMM (or sum) at the end, as cuDNN does, instead of one per step."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, family):
        T = len(batch_sizes)
        saved = {k: [None] * T for k in ("h_prev", "c_prev", "cy", "ws")}
        out, h_n, c_n = _layer_forward(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, family[0], saved, reuse_buffers=True
        )
        ctx.batch_sizes, ctx.reverse, ctx.bwd = batch_sizes, reverse, family[1]
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.saved = saved
        # h0 / c0 go through save_for_backward too: the per-step lists hold views of them, and this
        # way an in-place change before backward raises as it does for torch's own ops. c_n is the
        # last step's saved cy: the caller gets a copy for the same reason.
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0)
        ctx.set_materialize_grads(False)
        return out, h_n, c_n.clone()

    @staticmethod
    @_once_differentiable("seqkernels.nn.LSTM")
    def backward(ctx, grad_out, grad_hn, grad_cn):
        x, w_ih, w_hh, _, _ = ctx.saved_tensors
        saved, batch_sizes, reverse, bwd = ctx.saved, ctx.batch_sizes, ctx.reverse, ctx.bwd
        T = len(batch_sizes)
        B0 = batch_sizes[0]
        H = w_hh.shape[1]
        zeros = x.new_zeros((B0, H))
        gh_init = grad_hn if grad_hn is not None else zeros
        gc_init = grad_cn if grad_cn is not None else zeros
        grads = [None] * T
        # Walk the steps in the opposite order of the forward: rows dropped by the forward's
        # shrinking batch (or added by the reverse direction's growing one) enter or leave here.
        steps = range(T) if reverse else range(T - 1, -1, -1)
        h0_parts_h, h0_parts_c = [], []
        if reverse:
            gh, gc = gh_init, gc_init
        else:
            gh, gc = gh_init[: batch_sizes[-1]], gc_init[: batch_sizes[-1]]
        rows = gh.shape[0]
        bwd = getattr(bwd, "default", bwd)
        with torch._C._AutoDispatchBelowAutograd():  # plain tensor math: skip autograd's dispatch
            go = torch.split(grad_out, batch_sizes) if grad_out is not None else None
            for t in steps:
                bs = batch_sizes[t]
                if bs < rows:  # reverse direction: rows [bs, rows) began here from h0 / c0
                    h0_parts_h.append(gh[bs:])
                    h0_parts_c.append(gc[bs:])
                    gh, gc = gh[:bs], gc[:bs]
                elif bs > rows:  # forward direction: rows [rows, bs) ended here
                    gh = torch.cat([gh, gh_init[rows:bs]])
                    gc = torch.cat([gc, gc_init[rows:bs]])
                rows = bs
                if go is not None:
                    gh = gh + go[t]
                gg, gc = bwd(gh, gc, saved["c_prev"][t], saved["cy"][t], saved["ws"][t])
                grads[t] = gg
                gh = torch.mm(gg, w_hh)
            grad_h0 = torch.cat([gh] + h0_parts_h[::-1]) if h0_parts_h else gh
            grad_c0 = torch.cat([gc] + h0_parts_c[::-1]) if h0_parts_c else gc
            G = torch.cat(grads) if T > 1 else grads[0]
            h_prev = lambda: torch.cat(saved["h_prev"]) if T > 1 else saved["h_prev"][0]  # noqa: E731
            res = _layer_input_grads(ctx, G, x, w_ih, h_prev, grad_h0, grad_c0)
        ctx.saved = None
        return res


def _onednn_linear():
    """oneDNN's inner product (torch's own mkldnn op, as torch.compile's CPU fusions call it), or None
    where this torch has no oneDNN."""
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        pass
    return None


_ONEDNN_LINEAR = _onednn_linear()


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for the sequence driver's large CPU GEMMs (the projection of every step's input, the
    input and weight gradients). float32 goes to oneDNN, which torch.nn.LSTM, the peer, runs all of
    its GEMMs on, rather than torch.mm's BLAS: MKL takes a generic path on non-Intel CPUs (on a
    2-core AMD EPYC with AVX-512, 2026-12-07: 205-215 GFLOP/s against oneDNN's 440-480 at the LSTM's
    (3200, 512) x (512, 2048) shapes, strided operands included). bfloat16 torch.mm is oneDNN's
    already; empty inner dimensions (which oneDNN refuses) stay with torch.mm."""
    if _ONEDNN_LINEAR is not None and a.dtype == torch.float32 and a.device.type == "cpu" and a.shape[1] > 0:
        return _ONEDNN_LINEAR(a, b.t(), None, "none", [], "")
    return torch.mm(a, b)


# The weight gradients G^T y contract over the T B rows. oneDNN runs them as (y^T G)^T: y^T (H or I
# columns wide: a cheap copy) is the input and G the weight operand, whose transposed view
# oneDNN's weight reorder reads in stride. As G^T @ y, G^T went through torch's transposing copy
# first (1.8 GB/s here: 18 ms of the 33 MB G at T128 B64 H256), and the BLAS reads it in place at
# half oneDNN's rate (MKL's generic path on this AMD CPU). Measured on a 2-core Zen 5 EPYC
# (2026-12-07), G (T B, 4H) and y (T B, H), against torch.mm(G.t(), y): 1.08x at 10 M
# multiply-adds (TB640 H64), 1.33-1.80x from 33 M to 2 G (TB8192 H512), 0.35x at TB35 H33 (the
# call's overhead): below this many multiply-adds torch.mm keeps them.
_TN_ONEDNN_MIN_MACS = 1 << 22


def _mm_tn(G: Tensor, y: Tensor) -> Tensor:
    """G^T @ y (a weight gradient), see _TN_ONEDNN_MIN_MACS (float32 CPU tensors: bfloat16 torch.mm
    is oneDNN's already, and GPUs keep their BLAS)."""
    onednn = _ONEDNN_LINEAR is not None and G.dtype == torch.float32 and G.device.type == "cpu"
    if onednn and G.shape[0] * G.shape[1] * y.shape[1] >= _TN_ONEDNN_MIN_MACS:
        return _mm(y.t().contiguous(), G).t().contiguous()
    return torch.mm(G.t(), y)


def _layer_input_grads(ctx, G, x, w_ih, h_prev, grad_h0, grad_c0) -> tuple:
    """The backward's return of a layer function (x, h0, c0, w_ih, w_hh, b_ih, b_hh, T, B, reverse)
    from the gates' gradients G (T * B, 4H) of every step: one GEMM or sum per input that needs a
    gradient; `h_prev()` gives the (T * B, H) hidden state each step read (built only when needed)."""
    need = ctx.needs_input_grad
    grad_b = G.sum(0) if (need[5] or need[6]) else None
    return (
        _mm(G, w_ih) if need[0] else None,
        grad_h0 if need[1] else None,
        grad_c0 if need[2] else None,
        _mm_tn(G, x) if need[3] else None,
        _mm_tn(G, h_prev()) if need[4] else None,
        grad_b if ctx.has_bias[0] and need[5] else None,
        grad_b if ctx.has_bias[1] and need[6] else None,
        None,
        None,
        None,
    )


class _CpuLayer(torch.autograd.Function):
    """Training on the CPU backend, float32 (or bfloat16 on the bf16 kernel), a constant batch: the
    input projection and the recurrence in the C++ sequence kernel (lstm_layer_fwd.fused with
    train=True, saving the activated gates and the cell states; for float32 the projection as one
    GEMM first where W_ih is large, see _project_first), and its whole backward in one C++ call
    (lstm_layer_fwd.backward, giving the gates' gradients of every step; for bf16 on the bf16
    kernel's engines, dh and dc carried in float32); the input, weight and bias gradients are then
    one GEMM or sum each."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, T, B, reverse):
        bias = _summed_bias(b_ih, b_hh)
        # One GEMM for every step's input gates first, then W_hh only per step, where W_ih is large
        # (float32; the bf16 kernel projects Tc steps at a time itself).
        if x.dtype != torch.bfloat16 and _project_first(w_ih, w_hh, T, B):
            inp, w_in = _mm(x, w_ih.t()).view(T, B, w_ih.shape[0]), None
        else:
            inp, w_in = x.view(T, B, x.shape[1]), w_ih
        out, h_n, c_n, ws, cs = torch.ops.seqkernels.lstm_layer_fwd.fused(inp, h0, c0, w_in, w_hh, bias, reverse, True)
        out = out.view(T * B, out.shape[2])
        ctx.T, ctx.B, ctx.reverse = T, B, reverse
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0, out, ws, cs)
        ctx.set_materialize_grads(False)
        return out, h_n, c_n

    @staticmethod
    @_once_differentiable("seqkernels.nn.LSTM")
    def backward(ctx, grad_out, grad_hn, grad_cn):
        x, w_ih, w_hh, h0, c0, out, ws, cs = ctx.saved_tensors
        T, B, reverse = ctx.T, ctx.B, ctx.reverse
        H = w_hh.shape[1]
        go = grad_out.reshape(T, B, H) if grad_out is not None else None
        with torch._C._AutoDispatchBelowAutograd():
            gg, grad_h0, grad_c0 = torch.ops.seqkernels.lstm_layer_fwd.backward(
                go, grad_hn, grad_cn, ws, cs, c0, w_hh, reverse
            )
            G = gg.view(T * B, 4 * H)
            return _layer_input_grads(ctx, G, x, w_ih, _h_prev_of(out, h0, T, B, reverse), grad_h0, grad_c0)


def _h_prev_of(out: Tensor, h0: Tensor, T: int, B: int, reverse: bool):
    """For _layer_input_grads: a function giving the (T * B, H) h_prev of every step of a constant
    batch, h0 then the outputs (T * B, H) shifted by one step in the run's direction."""

    def h_prev():
        H = out.shape[-1]
        o = out.view(T, B, H)
        # (T * B, H) by name: -1 cannot be inferred from an empty batch.
        return (torch.cat([o[1:], h0[None]]) if reverse else torch.cat([h0[None], o[:-1]])).view(T * B, H)

    return h_prev


def lstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    batch_sizes: Sequence[int],
    reverse: bool,
    backend: str,
):
    """Runs one LSTM layer in one direction over packed rows `x (N, I)` (see above); returns
    `(out (N, H), h_n (B, H), c_n (B, H))` with B = batch_sizes[0]. `backend` is already resolved."""
    batch_sizes = tuple(int(b) for b in batch_sizes)
    family = FAMILIES[backend]
    if backend == "reference":
        return _layer_forward(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, family[0], None, reuse_buffers=False
        )
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    cpu_seq = (
        backend == "cpu"
        and x.device.type == "cpu"
        and (_HAS_LAYER_FUSED or _HAS_LAYER_OP)
        and min(batch_sizes) == batch_sizes[0]
    )
    native = cpu_seq and x.dtype == torch.bfloat16 and _HAS_LAYER_FUSED and _bf16_native()
    if native and grad:  # the bf16 kernel's forward, then a per-step backward (_CpuLayer)
        return _CpuLayer.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, len(batch_sizes), batch_sizes[0], reverse)
    if native:
        # bfloat16 inference where AMX tiles or AVX512_BF16 are usable: the bf16 sequence kernel
        # (bf16 pair products, the cell and its state in float32, h rounded to bf16 per step).
        with torch.no_grad():
            return _cpu_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, len(batch_sizes), batch_sizes[0], reverse)
    if cpu_seq and x.dtype in (torch.float16, torch.bfloat16):
        # float16, and bfloat16 where the bf16 kernel is not available, on the float32 sequence
        # kernels: the operands widened once per call (exact), the recurrence and its state in
        # float32, the outputs rounded to the input dtype (the casts carry the gradients). torch's
        # CPU float16 LSTM has no native float16 products to lose against (the per-step cell ops
        # this replaces ran at 0.84x it, T64 B16 H256, 2 layers). bfloat16 comes here below
        # AVX512_BF16 only: with oneDNN held to AVX2 on an AMX Xeon, widening took inference from
        # 0.05-0.11x to 5-8x torch's bf16 LSTM (no native bf16 products there); with AMX or
        # AVX512_BF16 the bf16 kernel is faster (widened: 0.42-0.75x training with AMX, 0.47-0.72x
        # on a Zen 5 EPYC's AVX512_BF16; bench/NOTES.md entries 20 and 24).
        wide = [None if t is None else t.float() for t in tensors]
        out = lstm_layer(*wide, batch_sizes, reverse, backend)
        return tuple(t.to(x.dtype) for t in out)
    if grad:
        if (
            backend == "cpu"
            and _HAS_LAYER_FUSED
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and min(batch_sizes) == batch_sizes[0]
        ):
            return _CpuLayer.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, len(batch_sizes), batch_sizes[0], reverse)
        return _LSTMLayer.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, family)
    with torch.no_grad():
        if (
            backend == "cpu"
            and _HAS_LAYER_OP
            and x.dtype in (torch.float32, torch.float64)
            and min(batch_sizes) == batch_sizes[0]
        ):
            return _cpu_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, len(batch_sizes), batch_sizes[0], reverse)
        return _layer_forward(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, family[0], None, reuse_buffers=True
        )


# The fused sequence kernel multiplies x_t by each thread's packed slice of W_ih at every step:
# cheap while the slice stays in the core's cache, a stream from L3 once it does not. Where the
# caches are unknown: past this many bytes of W_ih per thread, one GEMM over all steps first (then
# only W_hh per step), measured on a 2-core Xeon with AMX (2 MB L2 per core): inference at T64 B8
# H512 went from 0.72x to 1.1-1.2x torch.nn.LSTM, while H256 (512 KB per thread) stays faster fused
# (B64: 1.02x fused, 0.76x not). See _project_first for the rule by cache size.
_FUSED_INPUT_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)
def _cache_bytes() -> Tuple[int, int]:
    """(the L2 of one core, the L3) in bytes, as Linux's sysfs describes cpu0; 0 where unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes = {}
    try:
        for d in os.listdir(base):
            if not d.startswith("index"):
                continue
            with open(f"{base}/{d}/level") as f:
                level = int(f.read())
            with open(f"{base}/{d}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{d}/size") as f:
                size = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            if kind in ("Unified", "Data"):
                sizes[level] = int(size.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 0, 0
    return sizes.get(2, 0), sizes.get(3, 0)


def _bf16_native() -> bool:
    """Whether the C++ sequence kernel takes bfloat16 as it is (AMX-BF16 tiles or AVX512_BF16
    usable here and not lowered by SEQKERNELS_CPU_ISA): the kernels' own rule, cpu_paths::lstm."""
    from ..cli import cpu_path

    return cpu_path("lstm", "bfloat16") in ("amx_bf16", "avx512_bf16")


def _project_first(w_ih: Tensor, w_hh: Tensor, T: int, B: int) -> bool:
    """Whether the float32 sequence kernel should get the input gates from one GEMM over all T steps
    rather than project x_t itself at every step, by what each thread's slices of the weights (it
    reads both once a step) do in the caches:
    - both fit its core's L2: fused (no (T, B, 4H) gates array written and read back);
    - W_hh's fits, not both: project first, so W_hh's stays in L2 step after step;
    - W_hh's alone does not fit: it streams from L3 every step either way, and fused saves the
      projection's pass, as long as the weights fit well inside L3 (half) and a step has rows
      enough (8) for each weight streamed. Measured on a 2-core Zen 5 EPYC (1 MB L2, 32 MB L3),
      inference against torch.nn.LSTM, fused / projected: T64 B8 H512 1.12x / 1.09x, T100 B32 H512
      1.00x / 0.93x, T50 B4 H512 1.25x / 1.41x, H1024 (32 MB of weights) 0.63-0.75x / 1.01-1.71x.
    Unknown caches: the fixed rule of _FUSED_INPUT_BYTES."""
    if T <= 1:
        return False
    threads = max(1, torch.get_num_threads())
    w_in = w_ih.numel() * w_ih.element_size()
    w_rec = w_hh.numel() * w_hh.element_size()
    l2, l3 = _cache_bytes()
    if l2 == 0:
        return w_in > _FUSED_INPUT_BYTES * threads
    if (w_in + w_rec) / threads <= l2:
        return False
    if w_rec / threads <= l2:
        return True
    return not (B >= 8 and w_in + w_rec <= l3 // 2)


def _cpu_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, T: int, B: int, reverse: bool):
    """Inference on the CPU backend with a constant batch (no PackedSequence whose batch shrinks):
    one projection GEMM for all steps, then the whole recurrence in the C++ sequence kernel
    (seqkernels::lstm_layer_fwd: one OpenMP team for the sequence, each thread on its own slice of
    W_hh first, then on any unit blocks the others have not started)."""
    bias = _summed_bias(b_ih, b_hh)
    if x.dtype == torch.bfloat16 or (
        x.dtype == torch.float32 and _HAS_LAYER_FUSED and not _project_first(w_ih, w_hh, T, B)
    ):
        # The input projection inside the kernel too (its own GEMM: faster than the BLAS here; the
        # bf16 kernel projects Tc steps at a time).
        out, h_n, c_n, _, _ = torch.ops.seqkernels.lstm_layer_fwd.fused(
            x.view(T, B, x.shape[1]), h0, c0, w_ih, w_hh, bias, reverse, False
        )
    else:
        proj = _mm(x, w_ih.t())
        out, h_n, c_n = torch.ops.seqkernels.lstm_layer_fwd(proj.view(T, B, proj.shape[1]), h0, c0, w_hh, bias, reverse)
    return out.view(T * B, out.shape[2]), h_n, c_n
