"""torch nested jagged tensors (`layout=torch.jagged`) in seqkernels.scaled_dot_product_attention,
run through the packed-sequence kernels (attention_varlen) without padding.

torch's convention (torch.nested tutorial, `torch.nested._internal.sdpa`): a batch of sequences of
(L_b, H, E) is the nested tensor (B, j, H, E) and SDPA takes its transpose (B, H, j, E). Its packed
storage `values()` is then the token-major (total, H, E) buffer that attention_varlen reads, and
`offsets()` its cumulative starts: the kernels run on it as is, with no padding and no copy (the
int64 offsets become int32 cu_seqlens, N+1 integers). The output is a nested view of the kernel's
token-major (total_q, H, Ev) output sharing the query's offsets, transposed to (B, H, j, Ev) as torch
returns it; gradients flow back to the nested inputs through `values()`.

`is_causal` aligns top-left per sequence, as torch's SDPA does for (each) query of Lq rows against Lk
keys: query i sees keys j <= i (for Lq == Lk this is the usual causal mask, the same as bottom-right).
torch itself runs nested `is_causal` only on its GPU kernels; on CPU it refuses, here it works.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _jagged(name: str, t) -> Tensor:
    if not getattr(t, "is_nested", False) or t.layout != torch.jagged:
        got = "a strided nested tensor" if getattr(t, "is_nested", False) else "a dense tensor"
        raise ValueError(
            f"{name}: expected a nested tensor with layout=torch.jagged like query (as torch's "
            f"scaled_dot_product_attention takes them), got {got}"
        )
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D nested tensor (B, H, j, E), got {t.dim()}-D of shape {t.shape}")
    if t._lengths is not None:
        raise ValueError(
            f"{name}: nested tensors with holes (offsets plus lengths, e.g. from narrow()) are not supported; "
            "call .contiguous() on it first"
        )
    return t


def _packed(name: str, t: Tensor) -> Tensor:
    """The token-major (total, H, E) view of a (B, H, j, E) nested tensor ragged on dim 2."""
    values = t.values()  # (H, total, E): the ragged dim of `t` minus the batch dim
    return values.transpose(0, 1)


def _cu_seqlens(t: Tensor) -> Tensor:
    offsets = t.offsets()
    return offsets if offsets.dtype == torch.int32 else offsets.to(torch.int32)


def _same_offsets(a: Tensor, b: Tensor) -> bool:
    oa, ob = a.offsets(), b.offsets()
    return oa is ob or (oa.shape == ob.shape and oa.device == ob.device and bool(torch.equal(oa, ob)))


def _max_seqlen(t: Tensor) -> Optional[int]:
    m = getattr(t, "_maybe_max_seqlen", None)
    return int(m) if isinstance(m, int) else None


def _dense_sequence_dim(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, mods):
    """Nested tensors ragged on dim 1 of 4-D (B, j, L, E): the ragged dim is a batch dim and the
    sequence dim is dense, so the packed values are an ordinary (total, L, E) batch (torch's own
    special case, e.g. SAM)."""
    from torch.nested._internal.nested_tensor import nested_view_from_values_offsets_lengths

    from .attention import scaled_dot_product_attention

    if not (query._ragged_idx == key._ragged_idx == value._ragged_idx == 1):
        raise ValueError(
            "query, key, value: expected all ragged on the same dim, got ragged dims "
            f"{query._ragged_idx}, {key._ragged_idx}, {value._ragged_idx}"
        )
    out = scaled_dot_product_attention(
        query.values(), key.values(), value.values(), attn_mask, dropout_p, is_causal, scale, enable_gqa,
        backend=backend, **mods,
    )  # fmt: skip
    return nested_view_from_values_offsets_lengths(
        out,
        query.offsets(),
        query.lengths(),
        min_seqlen=query._maybe_min_seqlen,
        max_seqlen=query._maybe_max_seqlen,
    )


def nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *, backend=None, **mods):
    """scaled_dot_product_attention on nested jagged query (B, Hq, j1, E), key (B, Hkv, j2, E) and
    value (B, Hkv, j2, Ev) (the transposes of (B, j, H, E) nested tensors); returns (B, Hq, j1, Ev)
    nested with the query's offsets. `mods`: softcap, alibi_slopes ((Hq,) or (B, Hq)), sinks."""
    from .attention import prepare_attention_varlen, run_varlen

    mods = {k: v for k, v in mods.items() if v is not None}
    for name, t in (("query", query), ("key", key), ("value", value)):
        _jagged(name, t)
    if attn_mask is not None:
        raise ValueError(
            "attn_mask: not supported with nested (jagged) query/key/value (torch's scaled_dot_product_attention "
            "refuses it too); the sequences' own lengths already bound the keys, pass is_causal for causality"
        )
    if query._ragged_idx == 1:
        return _dense_sequence_dim(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, mods
        )  # fmt: skip
    if not (query._ragged_idx == key._ragged_idx == value._ragged_idx == 2):
        raise ValueError(
            "query, key, value: expected nested (B, H, j, E) tensors ragged on dim 2 (torch.nested.nested_tensor"
            "([...(L, H, E)], layout=torch.jagged).transpose(1, 2)), got ragged dims "
            f"{query._ragged_idx}, {key._ragged_idx}, {value._ragged_idx}"
        )
    B = query.shape[0]
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"key, value: expected {B} sequences like query, got {key.shape[0]} and {value.shape[0]} "
            "(nested batches do not broadcast)"
        )
    if not _same_offsets(key, value):
        raise ValueError("key, value: expected the same sequence lengths (offsets) for key and value")
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"key: {Hkv} heads differ from query's {Hq}; pass enable_gqa=True for GQA/MQA")
    q, k, v = _packed("query", query), _packed("key", key), _packed("value", value)
    call = prepare_attention_varlen(
        q, k, v, _cu_seqlens(query), _cu_seqlens(key), _max_seqlen(query), _max_seqlen(key),
        causal=is_causal, scale=scale, dropout_p=dropout_p, bottom_right=False, **mods,
    )  # fmt: skip
    out, _ = run_varlen(call, backend, False)  # (total_q, Hq, Ev)
    nt = torch.nested.nested_tensor_from_jagged(
        out,
        query.offsets(),
        min_seqlen=getattr(query, "_maybe_min_seqlen", None),
        max_seqlen=getattr(query, "_maybe_max_seqlen", None),
    )
    return nt.transpose(1, 2)
