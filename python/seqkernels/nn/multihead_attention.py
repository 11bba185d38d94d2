"""`seqkernels.nn.MultiheadAttention`: torch.nn.MultiheadAttention with the attention itself run by
seqkernels' fused kernels (DESIGN §2).

Same constructor, `forward` signature, parameter names and `state_dict` as torch's module; it *is* a
`torch.nn.MultiheadAttention` (subclass), so code that checks `isinstance`, reads `in_proj_weight`,
`batch_first`, `_qkv_same_embed_dim` or calls `merge_masks` (nn.TransformerEncoder/Decoder) keeps working.

Mask polarity is torch's MultiheadAttention one, the opposite of SDPA: a bool `attn_mask` or
`key_padding_mask` is True where attention is *blocked*; float masks are added to the scores.

    attn_mask (L, S), True = blocked          what the kernel receives (True = takes part)
        s: 0 1 2 3                                s: 0 1 2 3 | bias_k zero_attn
    l=0    . x x x                            l=0    1 0 0 0 |   1      1
    l=1    . . x x                            l=1    1 1 0 0 |   1      1
    l=2    . . . x                            l=2    1 1 1 0 |   1      1

Columns appended by `add_bias_kv` / `add_zero_attn` are never masked, as in torch.

Context parallelism: `seqkernels.distributed.use_context_parallel(model, group)` sets the
`context_parallel` attribute of every such module in `model` (None: local attention, the default).
The module then takes this rank's shard of the sequence and runs its attention as
`seqkernels.distributed.ring_attention` over the group; see `MultiheadAttention._forward_ring`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import BACKENDS

__all__ = ["MultiheadAttention"]


def _keep_seqkernels_path(module, args):
    """Forward pre-hook that does nothing.

    nn.TransformerEncoderLayer, in inference, runs torch's own fused layer kernel
    (torch._transformer_encoder_layer_fwd) with `self_attn`'s weights and never calls `self_attn`. It
    declines that path when any of its submodules has a forward hook, so carrying this hook keeps the
    attention of such layers on seqkernels (outputs are the same either way)."""


def _check_backend(backend):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"backend: unknown backend {backend!r}; expected None (automatic) or one of {', '.join(BACKENDS)}"
        )
    return backend


def _check_mask_dtype(name: str, mask: Optional[Tensor]):
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise TypeError(
            f"{name}: only bool and floating masks are supported, got {str(mask.dtype).replace('torch.', '')}"
        )


class MultiheadAttention(torch.nn.MultiheadAttention):
    r"""Drop-in replacement for :class:`torch.nn.MultiheadAttention` whose attention runs on seqkernels.

    Arguments, shapes, parameters and ``state_dict`` are torch's (``embed_dim, num_heads, dropout, bias,
    add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype``), plus ``backend`` ("cuda", "cpu",
    "triton", "reference" or None for automatic choice, see ``seqkernels.explain``). A checkpoint of one
    loads into the other.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` follows torch:

    - ``need_weights=False`` (what nn.Transformer* layers pass) runs the fused kernel through
      ``seqkernels.attention`` / ``seqkernels.scaled_dot_product_attention``; the (L, S) score matrix is
      never materialized. This is the fast path: ask for weights only when you use them.
    - ``need_weights=True`` (torch's default) must return the attention probabilities, so it computes
      them explicitly (scores, softmax, dropout, P @ V) like torch's own slow path: same results as
      torch, with torch's speed and O(L*S) memory, no seqkernels kernel involved.
    - ``is_causal`` is a hint, as in torch: it requires ``attn_mask``; with no ``key_padding_mask`` and
      ``need_weights=False`` the mask is not read and a causal (top-left) mask is applied instead,
      otherwise ``attn_mask`` is used and the hint is ignored.
    - Dropout on the attention probabilities (``dropout > 0`` in training mode) uses torch's RNG on the
      ``need_weights=True`` path and seqkernels' Philox stream on the fused path: the same distribution as
      torch, not the same draws.
    - A query row whose keys are all masked gives 0 on the fused path (as torch's SDPA does) and NaN on
      the ``need_weights=True`` path (as torch's softmax does).
    - NestedTensor inputs (what nn.TransformerEncoder passes in inference when given a left-aligned
      ``src_key_padding_mask``) are padded, run with per-sequence key lengths, and nested again; they
      take no masks and need ``need_weights=False``.
    """

    #: None (attend locally) or a `seqkernels.distributed.ContextParallelSpec` set by
    #: `seqkernels.distributed.use_context_parallel`: the input is then this rank's shard of the sequence.
    context_parallel = None

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ):
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self.backend = _check_backend(backend)
        self._install_fastpath_guard()

    def _install_fastpath_guard(self):
        self._seqkernels_hook_id = self.register_forward_pre_hook(_keep_seqkernels_path).id

    # -----------------------------------------------------------------------------------------------
    # Conversion to and from torch's module. Parameters are shared (the same Parameter objects), so an
    # optimizer built before the conversion keeps updating the converted module.

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention, *, backend: Optional[str] = None) -> "MultiheadAttention":
        """A seqkernels module sharing `module`'s parameters, buffers, hooks, device, dtype and training mode."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"module: expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(_copy_state(module))
        new.__dict__.pop("context_parallel", None)  # a new module attends locally until asked otherwise
        new.backend = _check_backend(backend)
        new._install_fastpath_guard()
        return new

    def to_torch(self) -> torch.nn.MultiheadAttention:
        """A plain torch.nn.MultiheadAttention sharing this module's parameters, buffers and user hooks."""
        if self.context_parallel is not None:
            raise RuntimeError(
                "context_parallel: this module runs ring attention over a process group, which torch's module "
                "cannot; undo seqkernels.distributed.use_context_parallel (handle.remove()) before converting it"
            )
        new = torch.nn.MultiheadAttention.__new__(torch.nn.MultiheadAttention)
        state = _copy_state(self)
        hook_id = state.pop("_seqkernels_hook_id", None)
        state.pop("backend", None)
        state["_forward_pre_hooks"].pop(hook_id, None)
        new.__dict__.update(state)
        return new

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        s += f", backend={self.backend!r}"
        if self.context_parallel is not None:
            s += f", context_parallel={self.context_parallel.layout!r}"
        return s

    # -----------------------------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if self.context_parallel is not None:
            return self._forward_ring(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        if not batched:
            # An unbatched input is a batch of one; batch_first does not apply to it (torch's rule).
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            batch_first = True
        else:
            batch_first = self.batch_first
        out, weights = self._attend(
            query,
            key,
            value,
            batch_first,
            key_padding_mask,
            attn_mask,
            need_weights,
            average_attn_weights,
            is_causal,
            kv_lengths=None,
        )
        if not batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query: expected a 2-D (unbatched) or 3-D (batched) tensor, got shape {tuple(query.shape)}"
            )
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"key, value: for {kind} query expected {query.dim()}-D key and value, got shapes "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise ValueError(
                f"key_padding_mask: for {kind} query expected a {query.dim() - 1}-D mask, got shape "
                f"{tuple(key_padding_mask.shape)}"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(
                f"attn_mask: expected a 2-D (L, S) or 3-D (N * num_heads, L, S) mask, got shape "
                f"{tuple(attn_mask.shape)}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query: expected embedding dim {self.embed_dim}, got {query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"key, value: expected feature dims kdim={self.kdim} and vdim={self.vdim}, got "
                f"{key.shape[-1]} and {value.shape[-1]}"
            )
        return batched

    # -----------------------------------------------------------------------------------------------

    def _project(self, query, key, value):
        """The in-projections, packed the way torch packs them (one GEMM for self-attention, two when
        key is value), so outputs round like torch's."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if query is key and key is value:
                return F.linear(query, w, b).chunk(3, dim=-1)
            wq, wkv = w.split([E, 2 * E])
            bq, bkv = (None, None) if b is None else b.split([E, 2 * E])
            if key is value:
                q = F.linear(query, wq, bq)
                k, v = F.linear(key, wkv, bkv).chunk(2, dim=-1)
                return q, k, v
            wk, wv = wkv.chunk(2)
            bk, bv = (None, None) if bkv is None else bkv.chunk(2)
            return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        return (
            F.linear(query, self.q_proj_weight, bq),
            F.linear(key, self.k_proj_weight, bk),
            F.linear(value, self.v_proj_weight, bv),
        )

    def _heads(self, x: Tensor, batch_first: bool) -> Tensor:
        """(N, L, E) or (L, N, E) -> (N, H, L, head_dim) as a view."""
        H, Dh = self.num_heads, self.head_dim
        if batch_first:
            N, L = x.shape[0], x.shape[1]
            return x.view(N, L, H, Dh).transpose(1, 2)
        L, N = x.shape[0], x.shape[1]
        return x.view(L, N, H, Dh).permute(1, 2, 0, 3)

    def _attend(
        self,
        query,
        key,
        value,
        batch_first,
        key_padding_mask,
        attn_mask,
        need_weights,
        average_attn_weights,
        is_causal,
        kv_lengths,
    ):
        N = query.shape[0] if batch_first else query.shape[1]
        L = query.shape[1] if batch_first else query.shape[0]
        S = key.shape[1] if batch_first else key.shape[0]
        Sv = value.shape[1] if batch_first else value.shape[0]
        Nk = key.shape[0] if batch_first else key.shape[1]
        Nv = value.shape[0] if batch_first else value.shape[1]
        H = self.num_heads
        if Nk != N or Nv != N or Sv != S:
            raise ValueError(
                f"key, value: expected batch {N} and equal lengths, got key {tuple(key.shape)}, "
                f"value {tuple(value.shape)} (batch_first={batch_first})"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(
                f"key_padding_mask: expected shape ({N}, {S}) (batch, source length), got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if attn_mask is not None:
            want = (L, S) if attn_mask.dim() == 2 else (N * H, L, S)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"attn_mask: expected shape {want}, got {tuple(attn_mask.shape)}")

        # torch's rule for the hint (F.multi_head_attention_forward): it needs attn_mask; with no padding
        # mask and no weights asked for, the mask is replaced by a causal one, otherwise the mask is used.
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "attn_mask: is_causal=True is a hint that attn_mask is the causal mask, so attn_mask "
                "is required (nn.Transformer.generate_square_subsequent_mask makes one)"
            )
        use_causal = bool(is_causal) and key_padding_mask is None and not need_weights

        q, k, v = self._project(query, key, value)
        q, k, v = self._heads(q, batch_first), self._heads(k, batch_first), self._heads(v, batch_first)
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            Dh = self.head_dim
            k = torch.cat([k, self.bias_k.view(1, H, 1, Dh).expand(N, H, 1, Dh)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, Dh).expand(N, H, 1, Dh)], dim=2)
            extra += 1
        elif (self.bias_k is None) != (self.bias_v is None):
            raise RuntimeError("bias_k, bias_v: both or neither must be set")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, self.head_dim)], dim=2)
            extra += 1

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = self._explicit(q, k, v, N, L, S + extra, key_padding_mask, attn_mask, extra, dropout_p)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            weights = None
            if use_causal:
                # Top-left alignment, as torch's SDPA: it differs from bottom-right when bias_k or
                # add_zero_attn lengthen the keys.
                from ..ops.attention import scaled_dot_product_attention

                out = scaled_dot_product_attention(q, k, v, None, dropout_p, True, backend=self.backend)
            else:
                from ..ops.attention import attention

                mask = _sdpa_mask(key_padding_mask, attn_mask, N, H, L, extra, q.dtype)
                out = attention(
                    q, k, v, attn_mask=mask, kv_lengths=kv_lengths, dropout_p=dropout_p, backend=self.backend
                )
        return self._out(out, batch_first), weights

    def _explicit(self, q, k, v, N, L, S_all, key_padding_mask, attn_mask, extra, dropout_p):
        """Scores, softmax, dropout and P @ V as torch's slow path computes them (need_weights=True)."""
        H, Dh = self.num_heads, self.head_dim
        add = _additive_mask(key_padding_mask, attn_mask, N, H, L, extra, q.dtype)
        qb = (q * math.sqrt(1.0 / float(Dh))).reshape(N * H, L, Dh)
        kb = k.reshape(N * H, S_all, Dh)
        vb = v.reshape(N * H, S_all, Dh)
        if add is not None:
            scores = torch.baddbmm(add.expand(N, H, L, S_all).reshape(N * H, L, S_all), qb, kb.transpose(-2, -1))
        else:
            scores = torch.bmm(qb, kb.transpose(-2, -1))
        p = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            p = F.dropout(p, p=dropout_p)
        out = torch.bmm(p, vb).view(N, H, L, Dh)
        return out, p.view(N, H, L, S_all)

    def _out(self, out: Tensor, batch_first: bool) -> Tensor:
        N, H, L, Dh = out.shape
        if batch_first:
            out = out.transpose(1, 2).reshape(N, L, H * Dh)
        else:
            out = out.permute(2, 0, 1, 3).reshape(L, N, H * Dh)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    # -----------------------------------------------------------------------------------------------
    # Context parallelism (seqkernels.distributed.use_context_parallel)

    def _forward_ring(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """Ring mode: query/key/value are this rank's shard of the sequence (in the spec's layout), the
        same length on every rank. The projections are per token and run locally; the attention runs
        over the whole sequence with seqkernels.distributed.ring_attention; the output is this rank's
        shard. What the ring cannot honour is refused by name, never run as local attention."""
        from ..distributed import ring_attention

        spec = self.context_parallel
        where = f"{type(self).__name__} in context-parallel (ring) mode"
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError(f"query: {where} takes dense shards of one sequence per batch row, not NestedTensors")
        if need_weights:
            raise ValueError(
                f"need_weights: {where} cannot return attention weights (each rank holds a slice of the "
                "probabilities, which are never materialized); pass need_weights=False"
            )
        if key_padding_mask is not None:
            raise ValueError(
                f"key_padding_mask: {where} takes unpadded sequences (padding cannot be expressed per shard "
                "yet); pack or trim the batch instead"
            )
        if not self._qkv_same_embed_dim:
            raise ValueError(
                f"kdim, vdim: {where} needs kdim == vdim == embed_dim (got kdim={self.kdim}, vdim={self.vdim}, "
                f"embed_dim={self.embed_dim}); cross-attention over another sequence is not sharded here"
            )
        if self.bias_k is not None or self.bias_v is not None:
            raise ValueError(f"add_bias_kv: {where} has no extra key/value column (it would be counted once per rank)")
        if self.add_zero_attn:
            raise ValueError(f"add_zero_attn: {where} has no extra zero key (it would be counted once per rank)")
        _check_mask_dtype("attn_mask", attn_mask)
        batched = self._check_shapes(query, key, value, None, attn_mask)
        if batched:
            batch_first = self.batch_first
        else:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            batch_first = True
        sd, bd = (1, 0) if batch_first else (0, 1)
        if key.shape[sd] != query.shape[sd] or value.shape[sd] != query.shape[sd]:
            raise ValueError(
                f"key, value: {where} needs key and value shards of the query's length {query.shape[sd]} (self-"
                f"attention, or cross-attention to a sequence sharded the same way), got {key.shape[sd]} and "
                f"{value.shape[sd]}"
            )
        if key.shape[bd] != query.shape[bd] or value.shape[bd] != query.shape[bd]:
            raise ValueError(
                f"key, value: expected batch {query.shape[bd]}, got key {tuple(key.shape)}, value {tuple(value.shape)} "
                f"(batch_first={batch_first})"
            )
        causal = _ring_causal(attn_mask, is_causal, where)
        q, k, v = self._project(query, key, value)
        q, k, v = (self._heads(t, batch_first).contiguous() for t in (q, k, v))
        backend = spec.backend if spec.backend is not None else self.backend
        # Dropout draws the single-process keep mask of the global positions (ring_attention's
        # dropout_grid), so a seeded run matches the unsharded module's.
        dropout_p = self.dropout if self.training else 0.0
        out = ring_attention(
            q, k, v, spec.group, causal=causal, layout=spec.layout, dropout_p=dropout_p, backend=backend
        )
        out = self._out(out, batch_first)
        return (out if batched else out.squeeze(0)), None

    # -----------------------------------------------------------------------------------------------

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        if not (query.is_nested and key.is_nested and value.is_nested):
            raise ValueError("query, key, value: either all or none must be NestedTensors")
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError(
                "key_padding_mask, attn_mask: not supported with NestedTensor inputs (the nesting already "
                "says which positions exist), as in torch"
            )
        if need_weights:
            raise ValueError("need_weights: NestedTensor inputs need need_weights=False")
        if is_causal:
            raise RuntimeError(
                "attn_mask: is_causal=True is a hint that attn_mask is the causal mask, so attn_mask "
                "is required; NestedTensor inputs take no attn_mask"
            )
        q_parts = query.unbind()
        q_lens = [t.shape[0] for t in q_parts]
        k_lens = [t.shape[0] for t in key.unbind()]
        if len(k_lens) != len(q_lens):
            raise ValueError(f"query, key: batch sizes differ ({len(q_lens)} and {len(k_lens)})")

        def padded(x):
            return torch.nested.to_padded_tensor(x, 0.0)

        qp = padded(query)
        kp = qp if key is query else padded(key)
        vp = kp if value is key else padded(value)
        lengths = torch.tensor(k_lens, dtype=torch.int32, device=qp.device)
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if extra:
            # bias_k / zero_attn columns sit after the padded keys; each sequence must still see them.
            pad = torch.arange(kp.shape[1], device=qp.device)[None, :] >= lengths[:, None]
            out, _ = self._attend(qp, kp, vp, True, pad, None, False, True, False, kv_lengths=None)
        else:
            out, _ = self._attend(qp, kp, vp, True, None, None, False, True, False, kv_lengths=lengths)
        return torch.nested.as_nested_tensor([out[b, :n] for b, n in enumerate(q_lens)], layout=query.layout), None


def _is_standard_causal(mask: Tensor) -> bool:
    """Whether a 2-D square mask (torch-MHA polarity) is the causal mask: bool True exactly above the
    diagonal, or float -inf exactly above it and 0 elsewhere (generate_square_subsequent_mask)."""
    n = mask.shape[-1]
    above = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu_(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, above))
    return bool(((mask == float("-inf")) == above).all() and (mask[~above] == 0).all())


def _ring_causal(attn_mask: Optional[Tensor], is_causal: bool, where: str) -> bool:
    """Causality of a ring-mode call: no mask (is_causal says), or the standard causal mask (of the shard's
    length or of the global length), which means causal over the global sequence. Anything else is
    refused: a mask over local positions cannot say which global keys a query sees."""
    if attn_mask is None:
        return bool(is_causal)
    if attn_mask.dim() == 2 and attn_mask.shape[0] == attn_mask.shape[1] and _is_standard_causal(attn_mask):
        return True
    raise ValueError(
        f"attn_mask: {where} takes no mask other than the causal one (None with is_causal=True, or "
        f"generate_square_subsequent_mask), got shape {tuple(attn_mask.shape)} that is not the causal mask; "
        "a mask over the local shard cannot say which keys of the other ranks a query sees"
    )


def _copy_state(module: torch.nn.Module) -> dict:
    """The instance dict with every dict (parameters, buffers, submodules, hooks) copied one level, so
    the new module shares tensors and submodules with `module` but not its registries."""
    return {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in vars(module).items()}


def _masks_4d(key_padding_mask, attn_mask, N, H, L):
    # The key dim by name: -1 cannot be inferred from an empty batch (N = 0).
    kpm = None if key_padding_mask is None else key_padding_mask.view(N, 1, 1, key_padding_mask.shape[-1])
    am = None
    if attn_mask is not None:
        S = attn_mask.shape[-1]
        am = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(N, H, L, S)
    return kpm, am


def _pad_columns(mask: Tensor, extra: int, value) -> Tensor:
    if not extra:
        return mask
    return F.pad(mask, (0, extra), value=value)


def _sdpa_mask(key_padding_mask, attn_mask, N, H, L, extra, dtype) -> Optional[Tensor]:
    """torch-MHA masks (bool True = blocked, float added) as one SDPA-polarity mask broadcastable to
    (N, H, L, S + extra): bool when both are bool (True = takes part), else float in q's dtype."""
    kpm, am = _masks_4d(key_padding_mask, attn_mask, N, H, L)
    masks = [m for m in (am, kpm) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        for m in masks[1:]:
            allowed = allowed & ~m
        return _pad_columns(allowed, extra, True)
    total = None
    for m in masks:
        f = _to_additive(m, dtype)
        total = f if total is None else total + f
    return _pad_columns(total, extra, 0.0)


def _to_additive(mask: Tensor, dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _additive_mask(key_padding_mask, attn_mask, N, H, L, extra, dtype) -> Optional[Tensor]:
    """torch's merged additive mask for the explicit path: bool True -> -inf, then attn_mask + kpm."""
    kpm, am = _masks_4d(key_padding_mask, attn_mask, N, H, L)
    total = None
    for m in (am, kpm):
        if m is not None:
            f = _to_additive(m, dtype)
            total = f if total is None else total + f
    return None if total is None else _pad_columns(total, extra, 0.0)
