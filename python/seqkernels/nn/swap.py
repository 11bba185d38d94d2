"""Swap the attention modules of an existing model for seqkernels' (DESIGN §2).

    n = seqkernels.swap_attention(model)      # every torch.nn.MultiheadAttention -> seqkernels'
    ...
    seqkernels.restore_attention(model)       # and back

The replacement is a `seqkernels.nn.MultiheadAttention`, a subclass of torch.nn.MultiheadAttention
that shares the original's Parameter objects (an optimizer built before the swap keeps working),
buffers, hooks, device, dtype and training mode. Because it is still a torch.nn.MultiheadAttention
with the same attributes, nn.TransformerEncoder / TransformerDecoder / Transformer keep working
unchanged: their checks read `self_attn.batch_first`, `_qkv_same_embed_dim`, `in_proj_weight`, ...;
their inference fast path (torch._transformer_encoder_layer_fwd), which would bypass `self_attn`, is
declined because the swapped module carries a no-op forward pre-hook, so attention runs on
seqkernels; and the nested-tensor path of nn.TransformerEncoder (a left-aligned
`src_key_padding_mask` in inference) reaches the module, which runs it with per-sequence key lengths.

torch.compile: swap first, then compile (`torch.compile(model)` after `swap_attention(model)`).
Swapping inside an already compiled model also works (the compiled wrapper's submodules are the
model's), but the next call recompiles.
"""

from __future__ import annotations

from typing import Optional

import torch

from .multihead_attention import MultiheadAttention, _check_backend

__all__ = ["swap_attention", "restore_attention"]


def _replace(model: torch.nn.Module, convert, what: str) -> int:
    """Replace, in place, every submodule m of `model` for which convert(m) returns a module.
    A module reachable under several names (shared) is converted once and stays shared."""
    if convert(model) is not None:
        raise TypeError(
            f"model: is itself the {what} module to replace, which cannot be done in place; convert it "
            "directly (seqkernels.nn.MultiheadAttention.from_torch(m) / m.to_torch())"
        )
    done: dict[int, torch.nn.Module] = {}
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in done:
                new = done[id(child)]
            else:
                new = convert(child)
                if new is None:
                    continue
                done[id(child)] = new
                count += 1
            setattr(parent, name, new)
    return count


def swap_attention(model: torch.nn.Module, *, backend: Optional[str] = None) -> int:
    """Replace every torch.nn.MultiheadAttention in `model` (exactly that class; subclasses, which may
    change its forward, are left alone) with seqkernels.nn.MultiheadAttention, in place, and return how
    many were replaced. Weights are shared, not copied. `backend` is passed to every new module
    (None: automatic choice per call)."""
    _check_backend(backend)

    def convert(m):
        if type(m) is torch.nn.MultiheadAttention:
            return MultiheadAttention.from_torch(m, backend=backend)
        return None

    return _replace(model, convert, "torch.nn.MultiheadAttention")


def restore_attention(model: torch.nn.Module) -> int:
    """Replace every seqkernels.nn.MultiheadAttention in `model` with a torch.nn.MultiheadAttention
    sharing its weights, in place, and return how many were replaced (undoes `swap_attention`)."""

    def convert(m):
        if isinstance(m, MultiheadAttention):
            return m.to_torch()
        return None

    return _replace(model, convert, "seqkernels.nn.MultiheadAttention")
