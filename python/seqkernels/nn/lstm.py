"""Drop-in `LSTMCell` and `LSTM` on the fused LSTM cell, and `swap_lstm` / `restore_lstm`.

Both modules subclass torch's, so constructor arguments, parameter names, initialization,
`state_dict`, `repr` and `isinstance(m, torch.nn.LSTM)` are torch's own; only `forward` differs:

- `LSTMCell.forward` is `seqkernels.lstm_cell` (two GEMMs in torch, the rest one fused kernel).
- `LSTM.forward` projects the inputs of all time steps of a layer and direction with one GEMM, then
  per step runs the recurrent GEMM and the fused cell; in training its backward is one fused pass
  per step plus the recurrent GEMM, and the weight gradients of all steps are one GEMM each. On CPU
  tensors with a constant batch the whole recurrence of a layer runs in one C++ kernel instead
  (`seqkernels::lstm_layer_fwd` and its `.fused` / `.backward` overloads): each thread keeps its
  slice of the weights packed and computes the gates of its hidden units with the cell fused into
  the GEMM, one barrier per step; float32 also projects the input inside that kernel (or, where W_ih
  is too large to stay in cache, in one GEMM first, on oneDNN as torch.nn.LSTM's own) and trains
  through it (the backward is one C++ call per layer-direction), float64 runs inference only there.

Supported like torch: `num_layers`, `bias`, `batch_first`, `dropout` (between layers, training
only, drawn from torch's generator), `bidirectional`, unbatched input, a given or zero initial
state, and `PackedSequence` input. `proj_size > 0` is not supported (raises).
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from ..ops import lstm as lstm_ops

__all__ = ["LSTMCell", "LSTM", "swap_lstm", "restore_lstm"]


def _check_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(
            f"backend: unknown backend {backend!r}; expected one of {', '.join(backends.BACKENDS)} or None"
        )
    return backend


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell on the fused LSTM cell kernel.

    Same constructor (`input_size, hidden_size, bias=True, device=None, dtype=None`), parameters and
    state_dict as torch's, plus `backend=` ("cuda", "cpu", "triton", "reference", or None for the
    automatic choice). `forward(input, hx=None) -> (h_1, c_1)`, input `(B, input_size)` or unbatched
    `(input_size,)`; a missing `hx` is zeros.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self.backend = _check_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            raise ValueError(
                f"LSTMCell: expected input to be 1-D or 2-D, got "
                f"{input.dim() if isinstance(input, Tensor) else type(input).__name__}"
                f"{'-D' if isinstance(input, Tensor) else ''}"
            )
        if hx is None:
            shape = (input.shape[0], self.hidden_size) if input.dim() == 2 else (self.hidden_size,)
            zeros = torch.zeros(shape, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError("LSTMCell: hx must be a pair (h_0, c_0) of tensors or None")
        return lstm_ops.lstm_cell(
            input, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, backend=self.backend
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if self.backend else "")


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM on the fused LSTM cell kernel.

    Same constructor (`input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None`), parameters and state_dict
    as torch's, so `load_state_dict(torch_lstm.state_dict())` works both ways; plus `backend=`.
    `forward(input, hx=None) -> (output, (h_n, c_n))` as torch's: input `(L, N, H_in)` (`(N, L, H_in)`
    with batch_first), unbatched `(L, H_in)`, or a PackedSequence. `proj_size` must be 0.
    """

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.proj_size != 0:
            raise ValueError(
                f"proj_size: seqkernels.nn.LSTM does not support LSTMs with projections "
                f"(proj_size={self.proj_size}); use torch.nn.LSTM for those"
            )
        self.backend = _check_backend(backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if getattr(self, "backend", None) else "")

    def _layer_params(self, layer: int, direction: int):
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih, w_hh = getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx)
        if self.bias:
            return w_ih, w_hh, getattr(self, "bias_ih" + sfx), getattr(self, "bias_hh" + sfx)
        return w_ih, w_hh, None, None

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            batch_sizes = [int(b) for b in batch_sizes_t]
            x = data
            B = batch_sizes[0]
            batched = True
        else:
            if not isinstance(input, Tensor) or input.dim() not in (2, 3):
                got = f"{input.dim()}-D" if isinstance(input, Tensor) else type(input).__name__
                raise ValueError(f"LSTM: expected input to be 2-D (unbatched) or 3-D, got {got}")
            batched = input.dim() == 3
            seq = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
            if self.batch_first:
                seq = seq.transpose(0, 1)
            T, B = seq.shape[0], seq.shape[1]
            if seq.shape[2] != self.input_size:
                raise ValueError(f"input: has {seq.shape[2]} features but this LSTM has input_size={self.input_size}")
            if T == 0:  # as torch.nn.LSTM; an empty batch (B == 0) is fine and gives empty outputs
                raise ValueError(f"input: needs at least one time step, got shape {tuple(input.shape)}")
            x = seq.reshape(T * B, self.input_size)
            batch_sizes = [B] * T
            sorted_indices = unsorted_indices = None
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input: has {x.shape[-1]} features but this LSTM has input_size={self.input_size}")

        h0, c0 = self._initial_state(hx, x, B, batched, sorted_indices)
        w_ih, w_hh, b_ih, b_hh = self._layer_params(0, 0)
        call = lstm_ops.prepare_lstm_cell(x[:B], h0[0], c0[0], w_ih, w_hh, b_ih, b_hh)
        backend = backends.resolve(lstm_ops.OP, call.device, call, self.backend)

        h_n, c_n = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                idx = layer * D + d
                out, h, c = lstm_ops.lstm_layer(
                    layer_in,
                    h0[idx],
                    c0[idx],
                    *self._layer_params(layer, d),
                    batch_sizes,
                    reverse=d == 1,
                    backend=backend,
                )
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_in = outs[0] if D == 1 else torch.cat(outs, dim=1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, p=self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)

        if packed:
            if unsorted_indices is not None:
                h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
            return PackedSequence(layer_in, batch_sizes_t, sorted_indices, unsorted_indices), (h_n, c_n)
        out = layer_in.view(len(batch_sizes), B, D * H)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def _initial_state(self, hx, x: Tensor, B: int, batched: bool, sorted_indices):
        D = 2 if self.bidirectional else 1
        want = (self.num_layers * D, B, self.hidden_size)
        if hx is None:
            z = torch.zeros(want, dtype=x.dtype, device=x.device)
            return z, z
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(t, Tensor) for t in hx)):
            raise ValueError("LSTM: hx must be a pair (h_0, c_0) of tensors or None")
        h0, c0 = hx
        if batched:
            if h0.dim() != 3 or c0.dim() != 3:
                raise ValueError(
                    f"hx: for batched 3-D input, h_0 and c_0 must be 3-D (num_layers * num_directions, "
                    f"batch, hidden_size), got {h0.dim()}-D and {c0.dim()}-D"
                )
        else:
            if h0.dim() != 2 or c0.dim() != 2:
                raise ValueError(
                    f"hx: for unbatched 2-D input, h_0 and c_0 must be 2-D (num_layers * num_directions, "
                    f"hidden_size), got {h0.dim()}-D and {c0.dim()}-D"
                )
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for name, t in (("h_0", h0), ("c_0", c0)):
            if tuple(t.shape) != want:
                raise ValueError(
                    f"hx: expected {name} of shape {want} (num_layers * num_directions, batch, "
                    f"hidden_size), got {tuple(t.shape)}"
                )
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(
                    f"hx: {name} has dtype {t.dtype} on {t.device}, expected the input's {x.dtype} on {x.device}"
                )
        if sorted_indices is not None:
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        return h0, c0


# ---------------------------------------------------------------------------------------------
# Swapping torch's modules in place. The module object is kept (its class is switched), so the
# parameters, their device and dtype, the training mode, hooks and every outside reference to the
# module or its parameters (an optimizer) stay valid. Only exact torch.nn.LSTM / LSTMCell instances
# are swapped: a user subclass may have its own forward.

_SWAP = {torch.nn.LSTM: LSTM, torch.nn.LSTMCell: LSTMCell}
_RESTORE = {LSTM: torch.nn.LSTM, LSTMCell: torch.nn.LSTMCell}


def swap_lstm(model: torch.nn.Module, *, backend: Optional[str] = None) -> int:
    """Replace every torch.nn.LSTM and torch.nn.LSTMCell in `model` (the model itself included) by
    seqkernels.nn.LSTM / LSTMCell in place, keeping weights, device, dtype and training mode; returns
    how many were swapped. LSTMs with `proj_size > 0` are left alone (with a warning)."""
    _check_backend(backend)
    n = 0
    for name, m in model.named_modules():
        target = _SWAP.get(type(m))
        if target is None:
            continue
        if getattr(m, "proj_size", 0):
            warnings.warn(
                f"swap_lstm: {name or 'model'} has proj_size={m.proj_size}, which seqkernels.nn.LSTM does "
                "not support; left as torch.nn.LSTM",
                stacklevel=2,
            )
            continue
        m.__class__ = target
        m.backend = backend
        n += 1
    return n


def restore_lstm(model: torch.nn.Module) -> int:
    """Turn every seqkernels.nn.LSTM / LSTMCell in `model` back into torch.nn.LSTM / LSTMCell in place;
    returns how many were restored."""
    n = 0
    for m in model.modules():
        target = _RESTORE.get(type(m))
        if target is None:
            continue
        m.__class__ = target
        m.__dict__.pop("backend", None)
        n += 1
    return n
