"""Hugging Face transformers backend: `attn_implementation="seqkernels"` and a KV cache for `generate`.

    import seqkernels.integrations.transformers as skt
    skt.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="seqkernels")
    # or, on a loaded model: model.set_attn_implementation("seqkernels")
    out = model.generate(ids, attention_mask=mask, cache=skt.SeqkernelsCache(model.config))  # `past_key_values=` before transformers 5.2x

`register()` adds "seqkernels" to `AttentionInterface` (the attention function) and to
`AttentionMaskInterface` (the mask builder: without an entry there transformers builds no mask at all
for a custom backend, so padding would be ignored). Every model whose attention goes through
`AttentionInterface` can then use it:

- grouped-query / multi-query attention without `repeat_kv` (the kernels read kv head h // group);
- causal and bidirectional models (`module.is_causal`, or the `is_causal` argument), padding masks,
  the `sliding_window` a layer asks for, `scaling`, `dropout` (training), T5-style `position_bias`;
- the mask: transformers' boolean (B, 1, Lq, Lk) mask is passed to the kernel as is (SDPA polarity,
  True takes part), so any pattern a model builds (sliding, chunked, packed sequences, image blocks)
  is honoured. When the mask builder can prove the mask is exactly "causal (+ sliding window)" or
  "right padding" it also records that compact form on the mask, and the attention runs the kernel's
  causal/window or `kv_lengths` path instead of reading a mask. The proof costs one small reduction
  and one device-to-host sync per mask built (once per forward, not per layer), the same order as
  transformers' own SDPA mask skipping; it is skipped while compiling.
- packed sequences (padding-free training: several sequences concatenated into one row,
  `DataCollatorWithFlattening`) run `seqkernels.attention_varlen` on the packed tokens, never a padded
  batch or a block-diagonal mask. The boundaries come from, in this order: FlashAttention's varlen kwargs
  `cu_seq_lens_q/k`, `max_length_q/k` (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`;
  transformers forwards them to every attention function); the mask transformers builds from
  restarting `position_ids` when it builds one (no cache, `use_cache=False`), recognized as packed
  causal blocks by the mask builder; or, when there is no mask or only the plain causal (sliding
  window) mask over the whole row that a model with a cache gets, the restarting `position_ids`
  themselves (transformers' flash-attention rule; one host sync per forward).
- Gemma 2's logit soft-capping (`softcap`) and gpt-oss's learned attention sinks (`s_aux`), forward
  and backward (the sinks get their gradient), in prefill and in cached decoding.
- Not supported (a clear error): paged continuous-batching caches. `output_attentions` returns no
  weights, as with "sdpa".

`SeqkernelsCache` stores keys and values in preallocated per-layer buffers with
`seqkernels.kv_cache_append` and, while decoding, attends with `seqkernels.decode_attention` directly
on the buffers (split-K over the cache, GQA, sliding window). Padding is dropped from the cache: each
sequence stores only its real tokens (per-sequence `cache_seqlens`), which is what lets padded batches
decode with the cache kernel. A step whose sequences add different numbers of real tokens (padding
anywhere in a continuation chunk: chunked prefill, speculative verification) runs one packed
`kv_cache_append` and one packed `decode_attention` per layer (cu_seqlens from the mask, read once per
forward), scattered back to the padded layout (padding rows 0); a sliding window then counts real
tokens, as on the unpadded sequence. That layout is not the one other attention backends expect, so
the cache works only with `attn_implementation="seqkernels"` (it checks). Masks it cannot prove to be
causal over each sequence's real tokens (+ window) at prefill switch that layer to the padded layout,
where decode steps run `seqkernels.attention` with transformers' mask over the stored prefix instead;
after the prefill, such a mask is a clear error.

The attention backend needs transformers >= 4.56 (`AttentionMaskInterface`, `CacheLayerMixin`);
`SeqkernelsCache` needs the cache-layer API of transformers >= 5 (it says so when created on an older one).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import backends

try:
    from transformers import AttentionInterface
    from transformers import __version__ as transformers_version
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "seqkernels.integrations.transformers needs Hugging Face transformers >= 4.56 (AttentionInterface, "
        "AttentionMaskInterface and the layered Cache API): pip install 'seqkernels[transformers]' or "
        f"pip install -U transformers ({e})"
    ) from e

__all__ = [
    "register",
    "unregister",
    "NAME",
    "seqkernels_attention_forward",
    "seqkernels_mask",
    "SeqkernelsCache",
    "SeqkernelsCacheLayer",
]

NAME = "seqkernels"


# ---------------------------------------------------------------------------------------------
# Mask builder: transformers' SDPA mask, plus a verified compact description of it.


@dataclasses.dataclass(frozen=True)
class _CausalSpec:
    """The mask is exactly: key j visible from query i iff first[b] <= j <= i + Lk - Lq and, when
    left >= 0, j >= i + Lk - Lq - left (bottom-right causal, sliding window, left padding)."""

    left: int
    first: Tensor  # (B,) int64: keys before it are hidden from every query (left padding), 0 if none
    max_first: int  # host copy of first.max(): 0 means no padding


@dataclasses.dataclass(frozen=True)
class _LengthsSpec:
    """The mask is exactly: key j visible iff j < lengths[b] (bidirectional, right padding)."""

    lengths: Tensor  # (B,) int32


@dataclasses.dataclass(frozen=True)
class _PackedSpec:
    """The mask is exactly: several sequences packed along each row (transformers' mask for position_ids
    that restart, e.g. DataCollatorWithFlattening), each causal (+ sliding window when left >= 0) within
    itself and blind to the others. `cu_seqlens` are the sequences' starts in the B * L tokens of the
    batch read row by row (attention_varlen's form)."""

    left: int
    cu_seqlens: Tensor  # int32 (N+1,)
    max_seqlen: int


_SPEC_ATTR = "_seqkernels_mask_spec"


def _describe(mask: Tensor, local_size: Optional[int]):
    """A _CausalSpec, _LengthsSpec or _PackedSpec equal to `mask` (B, 1, Lq, Lk) bool, or None."""
    B, _, Lq, Lk = mask.shape
    dev = mask.device
    i = torch.arange(Lq, device=dev).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=dev).view(1, 1, 1, Lk)
    seen = mask.any(dim=2).view(B, Lk)  # key columns some query sees
    any_seen = seen.any(dim=-1)
    first = torch.where(any_seen, seen.to(torch.int8).argmax(dim=-1), torch.full_like(any_seen, Lk, dtype=torch.long))
    diag = i + (Lk - Lq)
    left = local_size - 1 if local_size else -1
    if left >= 0:
        # Keys before the first row's window are hidden by the window alone; padding there changes nothing.
        first = torch.where(first > max(Lk - Lq - left, 0), first, torch.zeros_like(first))
    causal = (j <= diag) & (j >= first.view(B, 1, 1, 1))
    if left >= 0:
        causal = causal & (j >= diag - left)
    lengths = seen.sum(dim=-1)
    right_padded = j < lengths.view(B, 1, 1, 1)
    flags = torch.stack(
        [
            (causal == mask).all(),
            (right_padded == mask).all(),
            first.max() if B else torch.zeros((), dtype=torch.long, device=dev),
        ]
    ).tolist()
    if flags[0]:
        return _CausalSpec(left, first, int(flags[2]))
    if flags[1]:
        return _LengthsSpec(lengths.to(torch.int32))
    if Lq == Lk and Lq > 1 and B and left != 0:
        return _describe_packed(mask, left)
    return None


def _describe_packed(mask: Tensor, left: int) -> Optional[_PackedSpec]:
    """A _PackedSpec equal to `mask` (B, 1, L, L) bool, or None. Tried only for masks that are neither
    causal nor right padding (a second sync, on a path that would otherwise read the whole mask)."""
    B, _, L, _ = mask.shape
    dev = mask.device
    i = torch.arange(L, device=dev).view(1, 1, L, 1)
    j = torch.arange(L, device=dev).view(1, 1, 1, L)
    # Row i starts a sequence iff it cannot see key i - 1 (within a sequence it can: causal, or a window
    # with left >= 1); the comparison below then checks every query sees itself and its sequence only.
    rows = mask.view(B, L, L)
    starts = torch.ones(B, L, dtype=torch.bool, device=dev)
    starts[:, 1:] = ~rows[:, 1:, :-1].diagonal(dim1=1, dim2=2)
    seq = starts.cumsum(dim=-1)
    packed = (j <= i) & (seq.view(B, 1, L, 1) == seq.view(B, 1, 1, L))
    if left >= 0:
        packed = packed & (j >= i - left)
    if not bool((packed == mask).all()):
        return None
    begin = starts.view(-1).nonzero().view(-1)
    cu = torch.cat([begin, begin.new_full((1,), B * L)]).to(torch.int32)
    return _PackedSpec(left, cu, int((cu[1:] - cu[:-1]).max()))


def _mask_spec(mask):
    return getattr(mask, _SPEC_ATTR, None) if isinstance(mask, Tensor) else None


def _unpadded(mask) -> bool:
    """No mask, or seqkernels_mask's proven causal (+ window) mask without padding."""
    if mask is None:
        return True
    spec = _mask_spec(mask)
    return isinstance(spec, _CausalSpec) and spec.max_first == 0


def seqkernels_mask(*args, **kwargs):
    """The "seqkernels" entry of AttentionMaskInterface: transformers' SDPA boolean mask (True takes part,
    the polarity of seqkernels.attention), None where SDPA would rely on `is_causal`, and, when provably
    equal, a compact form of it recorded on the mask for the attention function. Arguments are
    transformers' mask-interface arguments, passed through (they differ between versions)."""
    mask = sdpa_mask(*args, **kwargs)
    if (
        mask is None
        or not isinstance(mask, Tensor)
        or mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.shape[1] != 1
        or mask.device.type == "meta"
        or torch.compiler.is_compiling()
    ):
        return mask
    spec = _describe(mask, kwargs.get("local_size"))
    if spec is not None:
        setattr(mask, _SPEC_ATTR, spec)
    return mask


# ---------------------------------------------------------------------------------------------
# Attention function.


def _modifiers(kwargs, softcap) -> dict:
    """The score modifiers a layer asks for: Gemma 2's `softcap` (attn_logit_softcapping) and
    gpt-oss's learned attention sinks (`s_aux`, one logit per query head; `sinks` in some ports)."""
    mods = {}
    if softcap:
        mods["softcap"] = float(softcap)
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if sinks is not None:
        mods["sinks"] = sinks
    return mods


def _reject_unsupported(kwargs):
    if kwargs.get("cache") is not None:
        raise ValueError(
            "cache: paged continuous-batching caches are not supported by the seqkernels backend; use "
            "generate() with SeqkernelsCache instead"
        )
    if kwargs.get("output_attentions"):
        _warn_once(
            "output_attentions: the seqkernels attention backend does not return attention weights (None is "
            "returned, as with 'sdpa'); use attn_implementation='eager' to get them"
        )


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str):
    warnings.warn(msg, stacklevel=3)


def _position_bias_mask(position_bias: Tensor, mask: Optional[Tensor], dtype) -> Tensor:
    """An additive float mask carrying `position_bias`, blocked positions at the dtype's minimum (as
    transformers' SDPA integration builds it)."""
    bias = position_bias.to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.finfo(dtype).min)
    return bias + mask.to(dtype)


def _window(left: int):
    return (left, 0) if left >= 0 else None


def _as_int(x) -> Optional[int]:
    return None if x is None else int(x)  # a tensor (transformers' position_ids path) costs one sync


def _attend_varlen(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q,
    max_seqlen_k,
    *,
    causal: bool,
    left: int,
    scale: Optional[float],
    dropout: float,
    backend: Optional[str],
    mods: dict,
) -> Tensor:
    """Packed sequences on seqkernels.attention_varlen: the B * L tokens of query (B, Hq, Lq, D) and
    key/value (B, Hkv, Lk, D), read row by row, are sequences cu_seqlens_q/k (int32 (N+1,), as
    FlashAttention's varlen kwargs). transformers' q/k/v are (B, L, H, D) storage seen as (B, H, L, D),
    so the token-major (B * L, H, D) form is a view (no copy). Returns (B, Hq, Lq, Dv)."""
    from ..ops.attention import attention_varlen

    B, Hq, Lq, _ = query.shape
    dev = query.device

    def tokens(t):
        return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])

    def cu(c):
        c = c.to(device=dev) if c.device != dev else c
        return c if c.dtype == torch.int32 else c.to(torch.int32)

    out = attention_varlen(
        tokens(query), tokens(key), tokens(value), cu(cu_seqlens_q), cu(cu_seqlens_k),
        _as_int(max_seqlen_q), _as_int(max_seqlen_k), causal=causal, window=_window(left) if causal else None,
        scale=scale, dropout_p=dropout, backend=backend, **mods,
    )  # fmt: skip
    return out.view(B, Lq, Hq, out.shape[-1]).transpose(1, 2)


def _attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Optional[Tensor],
    *,
    causal: bool,
    left: int,
    scale: Optional[float],
    dropout: float,
    position_bias: Optional[Tensor],
    backend: Optional[str],
    mods: dict,
) -> Tensor:
    """transformers' SDPA semantics on seqkernels.attention; q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D);
    `mods` the score modifiers (softcap, sinks)."""
    from ..ops.attention import attention

    Lq, Lk = query.shape[2], key.shape[2]
    spec = _mask_spec(mask)
    if mask is not None and mask.shape[-1] != Lk:
        if mask.shape[-1] < Lk:
            raise ValueError(f"attention_mask: covers {mask.shape[-1]} keys but there are {Lk}")
        mask, spec = mask[..., :Lk], None
    if position_bias is not None and position_bias.shape[-1] > Lk:
        position_bias = position_bias[..., :Lk]
    kw = dict(scale=scale, dropout_p=dropout, backend=backend, **mods)
    if mask is None:
        # transformers dropped the mask because SDPA's is_causal (top-left) covers it: single-token decode
        # sees every key; a longer query with more keys than queries only happens for the prefill of an
        # empty static cache, whose trailing slots are empty (SDPA crops them too).
        causal = causal and Lq > 1
        if causal and Lk > Lq:
            key, value = key[:, :, :Lq], value[:, :, :Lq]
            if position_bias is not None:
                position_bias = position_bias[..., :Lq]
        if position_bias is not None:
            return attention(query, key, value, causal=causal, attn_mask=position_bias.to(query.dtype), **kw)
        return attention(query, key, value, causal=causal, window=_window(left) if causal else None, **kw)
    if position_bias is not None:
        return attention(query, key, value, attn_mask=_position_bias_mask(position_bias, mask, query.dtype), **kw)
    if isinstance(spec, _CausalSpec) and spec.max_first == 0:
        return attention(query, key, value, causal=True, window=_window(spec.left), **kw)
    if isinstance(spec, _LengthsSpec):
        return attention(query, key, value, kv_lengths=spec.lengths, **kw)
    if isinstance(spec, _PackedSpec):
        cu, n = spec.cu_seqlens, spec.max_seqlen
        return _attend_varlen(
            query, key, value, cu, cu, n, n, causal=True, left=spec.left, scale=scale, dropout=dropout,
            backend=backend, mods=mods,
        )  # fmt: skip
    return attention(query, key, value, attn_mask=mask, **kw)


def _packed_kwargs(kwargs) -> Optional[tuple]:
    """FlashAttention's varlen kwargs (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k) as
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) emits them and transformers forwards
    them to the attention function, or None. The max lengths may be missing (read from cu_seq_lens)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        raise ValueError("cu_seq_lens_q, cu_seq_lens_k: packed sequences need both (or neither)")
    return cu_q, cu_k, kwargs.get("max_length_q"), kwargs.get("max_length_k")


_POSITIONS_ATTR = "_seqkernels_packed_positions"


def _packed_positions(position_ids, B: int, L: int) -> Optional[tuple]:
    """Packed sequences read from `position_ids` (B, L) that restart (DataCollatorWithFlattening's
    default output), as transformers' flash-attention path does when it gets no varlen kwargs and no
    mask: a new sequence starts wherever a position is not its predecessor + 1 (transformers'
    `find_packed_sequence_indices` rule). Returns attention_varlen's (cu, cu, max, max) over the B * L
    tokens, or None for ordinary positions. One host sync per position_ids tensor: the result is
    recorded on it (with its version counter), so every layer of a forward reuses it."""
    if not isinstance(position_ids, Tensor) or position_ids.is_floating_point():
        return None
    given = position_ids
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[-1] != L or position_ids.shape[0] not in (1, B):
        return None  # e.g. multimodal rope's (3, B, L) positions: not a packing signal
    memo = getattr(given, _POSITIONS_ATTR, None)
    key = (B, given._version)  # a buffer refilled in place is read again
    if memo is not None and memo[0] == key:
        return memo[1]
    pos = position_ids.expand(B, L)
    starts = torch.ones(B, L, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    begin = starts.view(-1).nonzero().view(-1)
    packed = None
    if begin.numel() > B:  # some row holds more than one sequence
        cu = torch.cat([begin, begin.new_full((1,), B * L)]).to(torch.int32)
        n = int((cu[1:] - cu[:-1]).max())
        packed = (cu, cu, n, n)
    if not torch.compiler.is_compiling():
        setattr(given, _POSITIONS_ATTR, (key, packed))
    return packed


def seqkernels_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    position_bias: Optional[Tensor] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The "seqkernels" entry of AttentionInterface. query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D)
    (Hkv may divide Hq), attention_mask from `seqkernels_mask` (or a user's 4-D bool/float mask).
    Returns (B, Lq, Hq, Dv) and None (no weights)."""
    _reject_unsupported(kwargs)
    mods = _modifiers(kwargs, softcap)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    left = sliding_window - 1 if sliding_window else -1
    backend = _DEFAULT_BACKEND[0]
    layer = getattr(key, _CACHE_ATTR, None)
    packed = _packed_kwargs(kwargs)
    if packed is None and position_bias is None and query.shape[2] == key.shape[2] > 1 and _unpadded(attention_mask):
        # No mask, or one that is plain causal (+ window) over the whole row: transformers did not look
        # for packing (a cache exists) and skipped the mask (no padding), or built the causal/window
        # mask a sliding-window model always gets. Restarting position_ids then mark packed
        # sequences, as in transformers' flash-attention path (which never gets that mask).
        packed = _packed_positions(kwargs.get("position_ids"), query.shape[0], query.shape[2])
    if packed is not None:
        if isinstance(layer, SeqkernelsCacheLayer) and layer.pending_key is key:
            raise ValueError(
                "cu_seq_lens_q, cu_seq_lens_k: packed sequences are not supported with SeqkernelsCache; "
                "generate with a padded batch (attention_mask) instead"
            )
        if position_bias is not None:
            raise ValueError(
                "cu_seq_lens_q, cu_seq_lens_k: packed sequences with a position_bias (T5-style models) are not "
                "supported by the seqkernels backend; pass a padded batch with an attention_mask"
            )
        # The sequence boundaries are authoritative, as in transformers' flash-attention path: a mask
        # built from the same restarting position_ids says the same thing, so it is not read.
        out = _attend_varlen(
            query, key, value, *packed, causal=causal, left=left, scale=scaling, dropout=dropout,
            backend=backend, mods=mods,
        )  # fmt: skip
    elif isinstance(layer, SeqkernelsCacheLayer) and layer.pending_key is key:
        out = layer.attend(
            query,
            value,
            attention_mask,
            causal=causal,
            left=left,
            scale=scaling,
            dropout=dropout,
            position_bias=position_bias,
            backend=backend,
            mods=mods,
        )
    else:
        out = _attend(
            query,
            key,
            value,
            attention_mask,
            causal=causal,
            left=left,
            scale=scaling,
            dropout=dropout,
            position_bias=position_bias,
            backend=backend,
            mods=mods,
        )
    return out.transpose(1, 2).contiguous(), None


# transformers' call passes no per-model options to the attention function, so the backend is one
# process-wide choice made by register(backend=...) (seqkernels.use_backend still applies per call).
_DEFAULT_BACKEND: list = [None]


def register(name: str = NAME, *, backend: Optional[str] = None) -> None:
    """Register the seqkernels attention (and its mask builder) with transformers under `name`, so
    `attn_implementation=name` / `model.set_attn_implementation(name)` use it. `backend` fixes the
    seqkernels backend for these calls (None: automatic per call, see seqkernels.explain)."""
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(
            f"backend: unknown backend {backend!r}; expected None or one of {', '.join(backends.BACKENDS)}"
        )
    _DEFAULT_BACKEND[0] = backend
    AttentionInterface.register(name, seqkernels_attention_forward)
    AttentionMaskInterface.register(name, seqkernels_mask)


def unregister(name: str = NAME) -> None:
    """Remove `name` from transformers' attention and mask registries (models set to it stop working)."""
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


# ---------------------------------------------------------------------------------------------
# KV cache.

_CACHE_ATTR = "_seqkernels_cache_layer"
_NOT_CONSUMED = (
    "SeqkernelsCache: the keys stored by the previous update() never reached the seqkernels attention "
    "function. SeqkernelsCache only works with attn_implementation='seqkernels' (call "
    "seqkernels.integrations.transformers.register() first) and with models that pass the cache's "
    "keys to the attention function unchanged"
)
_GRANULE = 256  # buffer capacity grows in multiples of this many positions (amortized reallocations)
_CHUNK_ATTR = "_seqkernels_chunk_spec"


@dataclasses.dataclass(frozen=True)
class _ChunkSpec:
    """The real (non-padding) tokens of one step of a compact SeqkernelsCache layer, read from the step's
    mask (B, 1, T, past + T) bool: token t of sequence b is real iff its query sees its own key.
    Sequence b adds counts[b] = cu[b+1] - cu[b] tokens; `rows` are their rows, in order, in the B * T
    tokens of the step read row by row (the packed form of kv_cache_append / decode_attention)."""

    real: Tensor  # (B, T) bool
    counts: Tensor  # (B,) int32
    cu: Tensor  # int32 (B+1,)
    rows: Tensor  # (total,) int64
    max_count: int
    uniform: bool  # every sequence adds all T tokens (the padded form applies)


def _chunk_spec(mask: Tensor, past: int, left: int, stored: Tensor) -> Optional[_ChunkSpec]:
    """A _ChunkSpec for `mask` (B, 1, T, past + T) bool, or None when, for some real query, the mask is
    not "causal over the sequence's real keys (+ the sliding window)" or (no window) its real past keys
    are not the `stored` (B,) tokens of the cache. Padding queries are not checked (their output is 0).
    One host sync per mask: the result is recorded on it (every layer of a forward reuses it)."""
    key = (past, left, mask._version)
    memo = getattr(mask, _CHUNK_ATTR, None)
    if memo is not None and memo[0] == key:
        return memo[1]
    B, _, T, Lk = mask.shape
    dev = mask.device
    m = mask[:, 0]
    t = torch.arange(T, device=dev)
    real = m[:, t, t + past]
    cols = m.any(dim=1)  # key columns some query sees: the real keys (in the window of some query)
    pos = (t + past).view(1, T, 1)
    j = torch.arange(Lk, device=dev).view(1, 1, Lk)
    want = (j <= pos) & cols.view(B, 1, Lk)
    if left >= 0:
        want = want & (j >= pos - left)
    ok = ((want == m) | ~real.view(B, T, 1)).all()
    counts = real.sum(dim=1, dtype=torch.int32)
    if left < 0:  # every real past key is seen by a real query: it must be what the cache holds
        same = (cols[:, :past].sum(dim=1, dtype=torch.int32) == stored.to(torch.int32)) | (counts == 0)
        ok = ok & same.all()
    none = counts.new_zeros(())
    flags = torch.stack([ok.to(torch.int32), counts.max() if B else none, counts.min() if B else none]).tolist()
    spec = None
    if flags[0]:
        cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
        cu[1:] = counts.cumsum(0)
        rows = real.reshape(-1).nonzero().view(-1)
        spec = _ChunkSpec(real, counts, cu, rows, int(flags[1]), int(flags[2]) == T)
    if not torch.compiler.is_compiling():
        setattr(mask, _CHUNK_ATTR, (key, spec))
    return spec


class SeqkernelsCacheLayer(CacheLayerMixin):
    """One layer of SeqkernelsCache: keys/values (B, Hkv, capacity, D) written by kv_cache_append,
    `cache_seqlens` (B,) int32 the number of tokens stored per sequence, `length` the number of
    positions transformers has seen (padding included)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, max_cache_len: Optional[int] = None, backend: Optional[str] = None, **kwargs):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.backend = backend
        self.length = 0
        self.cache_seqlens: Optional[Tensor] = None
        self.pending_key: Optional[Tensor] = None
        self.pending_value: Optional[Tensor] = None
        # None until the first attention call; then True (real tokens only, per-sequence lengths) or
        # False (padded layout, HF positions, used when the prefill mask has an unrecognized pattern).
        self.compact: Optional[bool] = None
        # (start, real (B, T) bool) of every step whose sequences added different numbers of tokens (the
        # positions transformers counts that hold no token in some sequences), for crop().
        self._uneven: list = []
        self._max_first = 0  # the prompt's longest left padding: crop() keeps it

    # -- storage --------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, T, D = key_states.shape
        cap = self.max_cache_len or _round_up(max(T, 1), _GRANULE)
        self.keys = key_states.new_empty((B, H, cap, D))
        self.values = value_states.new_empty((B, H, cap, value_states.shape[-1]))
        self.cache_seqlens = torch.zeros(B, dtype=torch.int32, device=self.device)
        self.batch_size = B
        self.is_initialized = True

    def _reserve(self, needed: int):
        cap = self.keys.shape[2]
        if needed <= cap:
            return
        if self.max_cache_len is not None:
            raise ValueError(
                f"SeqkernelsCache: {needed} positions do not fit max_cache_len={self.max_cache_len}; "
                "create the cache with a larger max_cache_len (or None to grow as needed)"
            )
        new_cap = _round_up(max(needed, 2 * cap), _GRANULE)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], new_cap, old.shape[3]))
            new[:, :, :cap].copy_(old)
            setattr(self, name, new)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Records the new keys and values; the seqkernels attention function, called next with these
        same tensors, appends them (it knows the padding from the mask) and attends."""
        if self.pending_key is not None:
            raise RuntimeError(_NOT_CONSUMED)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[-2]
        self._reserve(self.length + T)
        self.length += T
        self.pending_key, self.pending_value = key_states, value_states
        setattr(key_states, _CACHE_ATTR, self)
        return key_states, value_states

    def attend(
        self,
        query: Tensor,
        value: Tensor,
        mask: Optional[Tensor],
        *,
        causal: bool,
        left: int,
        scale: Optional[float],
        dropout: float,
        position_bias: Optional[Tensor],
        backend: Optional[str],
        mods: dict,
    ) -> Tensor:
        from ..ops.attention import attention  # noqa: F401  (imported for its op registrations)
        from ..ops.kv_cache import decode_attention, kv_cache_append

        k_new, v_new = self.pending_key, self.pending_value
        self.pending_key = self.pending_value = None
        if value is not v_new:
            raise RuntimeError(_NOT_CONSUMED)
        B, H, T, D = k_new.shape
        past = self.length - T
        backend = self.backend if self.backend is not None else backend
        spec = _mask_spec(mask) if mask is None or mask.shape[-1] == self.length else None
        if self.compact is None:
            self.compact = (
                causal
                and position_bias is None
                and (mask is None or isinstance(spec, _CausalSpec) or self._chunk_or_none(mask, past, left))
            )
        common = dict(
            causal=causal,
            left=left,
            scale=scale,
            dropout=dropout,
            position_bias=position_bias,
            backend=backend,
            mods=mods,
        )
        if not self.compact:
            kv_cache_append(self.keys, self.values, k_new, v_new, self.cache_seqlens, check=False, backend=backend)
            self.cache_seqlens += T
            return _attend(query, self.keys[:, :, : self.length], self.values[:, :, : self.length], mask, **common)

        if past == 0 and isinstance(spec, _CausalSpec):
            self._max_first = spec.max_first
        if past > 0 and dropout > 0:
            raise ValueError(
                "dropout: decoding from SeqkernelsCache has no attention dropout; put the model in eval mode"
            )
        if mask is None or (isinstance(spec, _CausalSpec) and spec.max_first <= past):
            chunk = None  # no padding in this step: every sequence adds its T tokens
        else:
            chunk = self._chunk(mask, past, left)
        if chunk is None or chunk.uniform:
            kv_cache_append(self.keys, self.values, k_new, v_new, self.cache_seqlens, check=False, backend=backend)
            self.cache_seqlens += T
            if past == 0:
                # Prefill: the new tokens are the whole sequence, attend in their own layout.
                return _attend(query, k_new, v_new, mask, **common)
            return decode_attention(
                query,
                self.keys,
                self.values,
                self.cache_seqlens,
                scale=scale,
                window=_window(spec.left if spec is not None else left),
                backend=backend,
                **mods,
            )
        # Sequences add different numbers of tokens (padding in the step: a padded prompt or continuation
        # chunk, speculative verification): one packed append of the real tokens, one packed attention.
        self._uneven.append((past, chunk.real))

        def packed(t):
            return t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3]).index_select(0, chunk.rows)

        kv_cache_append(
            self.keys,
            self.values,
            packed(k_new),
            packed(v_new),
            self.cache_seqlens,
            cu_seqlens=chunk.cu,
            check=False,
            backend=backend,
        )
        self.cache_seqlens += chunk.counts
        if past == 0:
            # A padded prompt: the attention kernel with transformers' mask over the prompt's own layout.
            return _attend(query, k_new, v_new, mask, **common)
        out = decode_attention(
            packed(query),
            self.keys,
            self.values,
            self.cache_seqlens,
            cu_seqlens_q=chunk.cu,
            max_seqlen_q=chunk.max_count,
            scale=scale,
            window=_window(left),
            backend=backend,
            **mods,
        )
        # Back to transformers' padded layout; padding tokens' rows are 0.
        full = out.new_zeros((B * T, *out.shape[1:])).index_copy(0, chunk.rows, out)
        return full.view(B, T, *out.shape[1:]).transpose(1, 2)

    def _chunk_or_none(self, mask: Tensor, past: int, left: int) -> bool:
        try:
            return self._chunk(mask, past, left) is not None
        except RuntimeError:
            return False

    def _chunk(self, mask: Tensor, past: int, left: int) -> _ChunkSpec:
        chunk = None
        if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-1] == self.length:
            chunk = _chunk_spec(mask, past, left, self.cache_seqlens)
        if chunk is None:
            raise RuntimeError(
                "SeqkernelsCache: this step's attention mask is not causal over each sequence's real tokens "
                "(padding, given by the attention_mask, may be anywhere; + sliding window), which the compact "
                "cache layout chosen at prefill cannot represent"
            )
        return chunk

    # -- transformers' cache protocol ------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len if self.max_cache_len is not None else -1

    def reset(self) -> None:
        self.length = 0
        self.compact = None
        self._uneven = []
        self._max_first = 0
        self.pending_key = self.pending_value = None
        if self.is_initialized:
            self.cache_seqlens.zero_()

    def _select(self, f):
        if self.is_initialized:
            self.keys, self.values, self.cache_seqlens = f(self.keys), f(self.values), f(self.cache_seqlens)
            self.batch_size = self.cache_seqlens.shape[0]
            self._uneven = [(start, f(real)) for start, real in self._uneven]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` positions (a negative int, transformers' convention)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"tokens_to_remove: expected a negative number of positions to drop, got {tokens_to_remove}"
            )
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.length - self._max_first:
            raise ValueError(f"tokens_to_remove: cannot drop {n} positions, only {self.length} are cached")
        self.length -= n
        # Each sequence loses the tokens it stored in the dropped positions: all of them, except where a
        # step added fewer tokens to it (padding).
        removed = torch.full_like(self.cache_seqlens, n)
        kept = []
        for start, real in self._uneven:
            cut = max(self.length - start, 0)
            if cut < real.shape[1]:
                removed -= (~real[:, cut:]).sum(dim=1, dtype=removed.dtype)
            if cut > 0:
                kept.append((start, real[:, :cut]))
        self._uneven = kept
        self.cache_seqlens -= removed

    def offload(self):
        super().offload()
        if self.is_initialized:
            self.cache_seqlens = self.cache_seqlens.to("cpu", non_blocking=True)

    def prefetch(self):
        super().prefetch()
        if self.is_initialized and self.cache_seqlens.device != self.device:
            self.cache_seqlens = self.cache_seqlens.to(self.device, non_blocking=True)


@functools.lru_cache(maxsize=None)
def _query_length_cache_api() -> bool:
    """Cache layers are sized by query length (transformers 5) rather than by cache_position (4.x)."""
    params = list(inspect.signature(CacheLayerMixin.get_mask_sizes).parameters)
    return len(params) > 1 and params[1] == "query_length"


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class SeqkernelsCache(Cache):
    """KV cache for `model.generate(..., past_key_values=SeqkernelsCache(model.config))` with
    attn_implementation="seqkernels". `max_cache_len` preallocates that many positions per layer and
    never grows (None: start small, grow geometrically). `backend` fixes the seqkernels backend of the
    append and decode kernels (None: automatic)."""

    def __init__(self, config=None, *, max_cache_len: Optional[int] = None, backend: Optional[str] = None):
        if not _query_length_cache_api():
            raise RuntimeError(
                f"SeqkernelsCache needs the cache-layer API of transformers >= 5 (get_mask_sizes(query_length)); "
                f"transformers {transformers_version} is installed. The 'seqkernels' attention backend "
                "itself works with it; only this cache does not"
            )
        if backend is not None and backend not in backends.BACKENDS:
            raise ValueError(
                f"backend: unknown backend {backend!r}; expected None or one of {', '.join(backends.BACKENDS)}"
            )
        if max_cache_len is not None and max_cache_len < 1:
            raise ValueError(f"max_cache_len: expected a positive int or None, got {max_cache_len!r}")
        make = functools.partial(SeqkernelsCacheLayer, max_cache_len=max_cache_len, backend=backend)
        self.config = config
        if config is not None:
            n = config.get_text_config(decoder=True).num_hidden_layers
            super().__init__(layers=[make() for _ in range(n)])
        else:
            super().__init__(layer_class_to_replicate=make)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        impl = getattr(self.config, "_attn_implementation", NAME) if self.config is not None else NAME
        if impl is not None and AttentionInterface._global_mapping.get(impl) is not seqkernels_attention_forward:
            raise RuntimeError(
                f"SeqkernelsCache: the model's attn_implementation is {impl!r}; this cache needs the "
                "seqkernels attention (seqkernels.integrations.transformers.register(), then "
                "model.set_attn_implementation('seqkernels'))"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Context parallelism: the sequence sharded over a process group (seqkernels.distributed).

RING_NAME = "seqkernels_ring"
_RING: dict = {}


def _ring_mask(*args, **kwargs):
    """The mask builder of the ring backend: no mask (the ring applies causality over the global
    sequence itself); padding cannot be expressed per shard yet, so a padded batch is refused."""
    pad = kwargs.get("attention_mask")
    if isinstance(pad, Tensor) and pad.dim() == 2 and not bool(pad.all()):
        raise ValueError(
            "attention_mask: the seqkernels_ring backend takes unpadded sequences (every rank holds a shard of "
            "one full-length sequence per batch row); pack or trim the batch instead of padding it"
        )
    return None


def seqkernels_ring_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The "seqkernels_ring" entry of AttentionInterface: query/key/value are this rank's shards of the
    sequence (in the layout of `use_context_parallel`); attention runs over the whole sequence with
    seqkernels.distributed.ring_attention."""
    from ..distributed import ring_attention

    if not _RING:
        raise RuntimeError("seqkernels_ring: call seqkernels.integrations.transformers.use_context_parallel first")
    _reject_unsupported(kwargs)
    if attention_mask is not None:
        raise ValueError("attention_mask: the seqkernels_ring backend applies causality itself and takes no mask")
    mods = _modifiers(kwargs, softcap)
    out = ring_attention(
        query,
        key,
        value,
        _RING["group"],
        causal=bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)),
        layout=_RING["layout"],
        window=(sliding_window - 1, 0) if sliding_window else None,
        scale=scaling,
        dropout_p=dropout,
        backend=_RING["backend"],
        **mods,
    )
    return out.transpose(1, 2).contiguous(), None


def use_context_parallel(model, group=None, *, layout: str = "zigzag", backend: Optional[str] = None):
    """Make `model` (a transformers model) run its attention as ring attention over `group`: every rank
    then feeds the model its shard of each sequence (`seqkernels.distributed.shard_sequence(ids,
    layout=layout, seq_dim=1)`) with the matching `position_ids` (`shard_positions`), and gets its shard
    of the hidden states / logits. Losses over shards need the labels shifted globally before sharding;
    parameter gradients are per-rank shares to be summed over the group (as DDP does)."""
    _RING.update(group=group, layout=layout, backend=backend)
    AttentionInterface.register(RING_NAME, seqkernels_ring_attention_forward)
    AttentionMaskInterface.register(RING_NAME, _ring_mask)
    model.set_attn_implementation(RING_NAME)
    return model
