"""`KVCache`: the key/value storage of every layer of a decoder, its lengths and, in paged mode, a
block allocator, driving `seqkernels.kv_cache_append` and `seqkernels.decode_attention`.

Step protocol (one step = the same T new tokens for every sequence, through every layer)::

    cache = KVCache(num_layers, B, Hkv, D, max_seqlen, dtype=torch.bfloat16, device="cuda")
    for layer in range(num_layers):            # prefill (T = prompt length) or decode (T = 1)
        ...
        cache.append(layer, k, v)              # k, v: (B, Hkv, T, D), written at cache.lengths + t
        out = cache.attend(layer, q)           # q: (B, Hq, T, D) -> decode_attention
        ...
    # after the last layer's append, cache.lengths has advanced by T

Packed step (sequences adding different numbers of tokens: chunked prefill next to decode steps,
speculative verification, continuous batching)::

    cu = torch.tensor([0, 256, 257, 257, 261], dtype=torch.int32)   # B + 1 entries; 256, 1, 0, 4 tokens
    for layer in range(num_layers):
        cache.append(layer, k, v, cu_seqlens=cu)      # k, v: (total, Hkv, D), token-major
        out = cache.attend(layer, q, cu_seqlens_q=cu)  # q: (total, Hq, D) -> out (total, Hq, Dv)
    # sequence b's length has advanced by its own count cu[b+1] - cu[b]

Layers append in order 0 .. num_layers-1 within a step. `attend(layer)` (and `views(layer)`) already
include the tokens that `layer` appended in the current step, while `lengths` is the committed length
that only advances when the last layer appends, so positions for the next step read from `lengths`
(or `host_lengths`, a Python list that needs no device sync).

Paged mode: the storage of each layer is `num_blocks` blocks of `block_size` positions; a sequence
receives blocks as it grows (one block table shared by all layers) and gives them back on `reset`.
`num_blocks` defaults to enough for every sequence at `max_seqlen`; a smaller pool serves more
sequences than would fit contiguously, and running out raises before anything is written.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ..ops.kv_cache import decode_attention, kv_cache_append


class CacheView(NamedTuple):
    """The arguments `seqkernels.decode_attention` takes for one layer."""

    k_cache: Tensor
    v_cache: Tensor
    cache_seqlens: Tensor
    block_table: Optional[Tensor]

    def as_kwargs(self) -> dict:
        """`decode_attention(q, **view.as_kwargs(), window=...)`."""
        return self._asdict()


class KVCache:
    """Key/value cache of a `num_layers`-layer decoder for `batch_size` sequences of at most
    `max_seqlen` tokens, `num_kv_heads` heads of dim `head_dim` (`v_head_dim` for values,
    default `head_dim`). `paged=True` stores `num_blocks` blocks of `block_size` positions per layer
    and allocates them as sequences grow. `backend` is passed to the ops (None: automatic)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_seqlen: int,
        *,
        dtype: Optional[torch.dtype] = None,
        device=None,
        paged: bool = False,
        block_size: int = 16,
        num_blocks: Optional[int] = None,
        v_head_dim: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("max_seqlen", max_seqlen),
            ("block_size", block_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        if isinstance(v_head_dim, bool) or not isinstance(v_head_dim, int) or v_head_dim < 1:
            raise ValueError(f"v_head_dim: expected a positive int, got {v_head_dim!r}")
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_kv_heads, self.head_dim, self.v_head_dim = num_kv_heads, head_dim, v_head_dim
        self.max_seqlen, self.paged, self.backend = max_seqlen, bool(paged), backend
        self.dtype = torch.get_default_dtype() if dtype is None else dtype
        self.device = torch.device("cpu" if device is None else device)
        if self.paged:
            self.block_size = block_size
            self.max_blocks = -(-max_seqlen // block_size)
            if num_blocks is None:
                num_blocks = batch_size * self.max_blocks
            if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
                raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
            self.num_blocks = num_blocks
            shape_k = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
            shape_v = (num_layers, num_blocks, num_kv_heads, block_size, v_head_dim)
            # -1 marks an unallocated entry; the ops never read past a sequence's length.
            self._host_table = torch.full((batch_size, self.max_blocks), -1, dtype=torch.int32)
            self.block_table: Optional[Tensor] = self._host_table.to(self.device)
            self._free: List[int] = list(range(num_blocks - 1, -1, -1))
            self._owned: List[List[int]] = [[] for _ in range(batch_size)]
        else:
            if num_blocks is not None:
                raise ValueError("num_blocks: only meaningful with paged=True")
            self.block_size, self.max_blocks, self.num_blocks = 0, 0, 0
            shape_k = (num_layers, batch_size, num_kv_heads, max_seqlen, head_dim)
            shape_v = (num_layers, batch_size, num_kv_heads, max_seqlen, v_head_dim)
            self.block_table = None
        self.k = torch.empty(shape_k, dtype=self.dtype, device=self.device)
        self.v = torch.empty(shape_v, dtype=self.dtype, device=self.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self._host_lengths: List[int] = [0] * batch_size
        self._step_lengths: Optional[Tensor] = None  # lengths + T during a step
        self._step_tokens = 0
        self._next_layer = 0

    # -----------------------------------------------------------------------------------------

    @property
    def host_lengths(self) -> List[int]:
        """The committed lengths as Python ints (no device sync)."""
        return list(self._host_lengths)

    @property
    def free_blocks(self) -> int:
        """Blocks not owned by any sequence (paged mode; 0 for a contiguous cache)."""
        return len(self._free) if self.paged else 0

    @property
    def in_step(self) -> bool:
        """True between the first and the last layer's `append` of a step."""
        return self._next_layer != 0

    def _check_layer(self, layer: int):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")

    def seqlens(self, layer: int) -> Tensor:
        """The cache_seqlens `attend(layer)` uses: `lengths`, plus this step's tokens once `layer`
        has appended them."""
        self._check_layer(layer)
        if self._step_lengths is not None and layer < self._next_layer:
            return self._step_lengths
        return self.lengths

    def views(self, layer: int) -> CacheView:
        """(k_cache, v_cache, cache_seqlens, block_table) of `layer`, for direct calls:
        `seqkernels.decode_attention(q, **cache.views(layer).as_kwargs(), ...)`."""
        seqlens = self.seqlens(layer)  # validates `layer` first
        return CacheView(self.k[layer], self.v[layer], seqlens, self.block_table)

    # -----------------------------------------------------------------------------------------

    def _begin_step(self, T, counts: Optional[List[int]] = None):
        """Allocates for a step of T tokens per sequence, or of `counts[b]` tokens for sequence b (a
        packed step, T is then the cu_seqlens tensor)."""
        step = [T] * self.batch_size if counts is None else counts
        over = [b for b, n in enumerate(self._host_lengths) if n + step[b] > self.max_seqlen]
        if over:
            b = over[0]
            raise RuntimeError(
                f"KVCache.append: sequence {b} holds {self._host_lengths[b]} tokens and cannot take "
                f"{step[b]} more (max_seqlen={self.max_seqlen}); reset it with reset({b}) or build a "
                "larger cache"
            )
        if self.paged:
            need = [
                -(-(n + step[b]) // self.block_size) - len(self._owned[b]) for b, n in enumerate(self._host_lengths)
            ]
            total = sum(max(0, x) for x in need)
            if total > len(self._free):
                b = next(i for i, x in enumerate(need) if x > 0)
                raise RuntimeError(
                    f"KVCache.append: out of blocks: this step needs {total} more blocks of "
                    f"{self.block_size} positions (sequence {b} needs {need[b]}) but only "
                    f"{len(self._free)} of {self.num_blocks} are free; free some with "
                    "reset(batch_index) or build the cache with a larger num_blocks"
                )
            if total:
                for b, x in enumerate(need):
                    for _ in range(max(0, x)):
                        blk = self._free.pop()
                        self._host_table[b, len(self._owned[b])] = blk
                        self._owned[b].append(blk)
                self.block_table.copy_(self._host_table)
        if counts is None:
            self._step_tokens = T
            self._step_lengths = self.lengths + T
        else:
            self._step_tokens = tuple(counts)
            cu = T
            self._step_lengths = self.lengths + (cu[1:] - cu[:-1]).to(self.lengths.dtype)

    def _packed_counts(self, k: Tensor, v: Tensor, cu_seqlens) -> tuple:
        """Checks a packed step's k, v (total, Hkv, D|Dv) and cu_seqlens; returns (cu int32 tensor on
        the cache's device, per-sequence counts as ints)."""
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            got = (
                f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
                if isinstance(cu_seqlens, Tensor)
                else type(cu_seqlens).__name__
            )
            raise ValueError(f"cu_seqlens: expected an int32 tensor ({self.batch_size + 1},), got {got}")
        if cu_seqlens.shape[0] != self.batch_size + 1:
            raise ValueError(
                f"cu_seqlens: expected {self.batch_size + 1} entries (batch_size + 1), got {cu_seqlens.shape[0]}"
            )
        for name, t, d in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[1] != self.num_kv_heads or t.shape[2] != d:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape (total, {self.num_kv_heads}, {d}) with cu_seqlens, got {got}")
        if v.shape[0] != k.shape[0]:
            raise ValueError(f"v: {v.shape[0]} tokens, but k has {k.shape[0]}")
        c = [int(x) for x in cu_seqlens.tolist()]  # a host copy (the block allocation needs the counts)
        counts = [c[b + 1] - c[b] for b in range(self.batch_size)]
        if c[0] != 0 or min(counts, default=0) < 0 or c[-1] != k.shape[0]:
            raise ValueError(
                f"cu_seqlens: expected cumulative starts from 0, non-decreasing, ending at k's {k.shape[0]} tokens, "
                f"got {c}"
            )
        return cu_seqlens.to(self.device), counts

    def append(self, layer: int, k: Tensor, v: Tensor, *, cu_seqlens: Optional[Tensor] = None) -> None:
        """Write `k`, `v` (B, Hkv, T, D) of `layer` at positions `lengths[b] + t`. Layers append in
        order within a step, all with the same T; the last layer's append advances `lengths`.

        Packed step: with `cu_seqlens` (int32 (B+1,)), `k`, `v` are (total, Hkv, D|Dv) token-major and
        sequence b appends rows `cu_seqlens[b]..cu_seqlens[b+1]` (any count, 0 included); every layer
        of the step appends the same counts, and the step advances each sequence by its own count."""
        self._check_layer(layer)
        if layer != self._next_layer:
            raise RuntimeError(
                f"KVCache.append: expected layer {self._next_layer} next (each step appends layers "
                f"0..{self.num_layers - 1} in order), got layer {layer}; reset() abandons a "
                "partial step"
            )
        if cu_seqlens is not None:
            cu, counts = self._packed_counts(k, v, cu_seqlens)
            if layer == 0:
                self._begin_step(cu, counts)
            elif self._step_tokens != tuple(counts):
                raise ValueError(
                    f"cu_seqlens: layer {layer} appends {counts} tokens per sequence but this step started with "
                    f"{self._step_tokens}"
                )
            kv_cache_append(
                self.k[layer],
                self.v[layer],
                k.to(self.dtype),
                v.to(self.dtype),
                self.lengths,
                block_table=self.block_table,
                cu_seqlens=cu,
                check=False,
                backend=self.backend,
            )
            self._end_append(counts)
            return
        for name, t, d in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            if (
                not isinstance(t, Tensor)
                or t.dim() != 4
                or t.shape[0] != self.batch_size
                or t.shape[1] != self.num_kv_heads
                or t.shape[3] != d
            ):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape ({self.batch_size}, {self.num_kv_heads}, T, {d}), got {got}")
        T = k.shape[2]
        if v.shape[2] != T:
            raise ValueError(f"v: {v.shape[2]} tokens, but k has {T}")
        if layer == 0:
            self._begin_step(T)
        elif T != self._step_tokens:
            raise ValueError(f"k: layer {layer} appends {T} tokens but this step started with {self._step_tokens}")
        self._append_padded(layer, k, v)
        self._end_append([T] * self.batch_size)

    def _append_padded(self, layer: int, k: Tensor, v: Tensor) -> None:
        # The positions and blocks were validated on the host above, so skip the op's host check
        # (a device sync per call on GPUs).
        kv_cache_append(
            self.k[layer],
            self.v[layer],
            k.to(self.dtype),
            v.to(self.dtype),
            self.lengths,
            block_table=self.block_table,
            check=False,
            backend=self.backend,
        )

    def _end_append(self, counts: List[int]) -> None:
        self._next_layer += 1
        if self._next_layer == self.num_layers:
            self.lengths.copy_(self._step_lengths)
            self._host_lengths = [n + c for n, c in zip(self._host_lengths, counts)]
            self._step_lengths = None
            self._next_layer = 0

    def attend(
        self,
        layer: int,
        q: Tensor,
        *,
        window=None,
        scale: Optional[float] = None,
        num_splits: Optional[int] = None,
        return_lse: bool = False,
        backend: Optional[str] = None,
        softcap: Optional[float] = None,
        alibi_slopes: Optional[Tensor] = None,
        sinks: Optional[Tensor] = None,
        cu_seqlens_q: Optional[Tensor] = None,
        max_seqlen_q: Optional[int] = None,
    ):
        """`seqkernels.decode_attention(q, *self.views(layer), ...)`: q (B, Hq, Tq, D) are the newest
        Tq tokens, whose keys and values `layer` has already appended. `softcap`, `alibi_slopes` and
        `sinks` are the score modifiers of `seqkernels.attention`. Packed step: with `cu_seqlens_q`
        (int32 (B+1,), usually the step's `cu_seqlens`), q is (total, Hq, D) and the result
        (total, Hq, Dv)."""
        view = self.views(layer)
        return decode_attention(
            q,
            view.k_cache,
            view.v_cache,
            view.cache_seqlens,
            block_table=view.block_table,
            scale=scale,
            window=window,
            num_splits=num_splits,
            return_lse=return_lse,
            backend=self.backend if backend is None else backend,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            sinks=sinks,
            cu_seqlens_q=None if cu_seqlens_q is None else cu_seqlens_q.to(self.device),
            max_seqlen_q=max_seqlen_q,
        )

    def reset(self, batch_index: Union[None, int, Sequence[int], Tensor] = None) -> None:
        """Empty every sequence (None) or the given ones (an index, a sequence of indices, or a bool
        mask / index tensor), returning their blocks in paged mode. Stored values are not cleared:
        the ops never read positions at or past a sequence's length."""
        if batch_index is None:
            rows = list(range(self.batch_size))
            self._step_lengths, self._step_tokens, self._next_layer = None, 0, 0
        else:
            if self.in_step:
                raise RuntimeError(
                    "KVCache.reset: a step is in progress (not every layer has appended); call "
                    "reset() to abandon it for all sequences"
                )
            rows = self._rows(batch_index)
        for b in rows:
            self._host_lengths[b] = 0
            if self.paged:
                self._free.extend(reversed(self._owned[b]))
                self._owned[b] = []
                self._host_table[b].fill_(-1)
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.lengths.index_fill_(0, idx, 0)
            if self.paged:
                self.block_table.copy_(self._host_table)

    def _rows(self, batch_index) -> List[int]:
        if isinstance(batch_index, Tensor):
            if batch_index.dtype == torch.bool:
                if batch_index.shape != (self.batch_size,):
                    raise ValueError(
                        f"batch_index: a bool mask must have shape ({self.batch_size},), got {tuple(batch_index.shape)}"
                    )
                batch_index = batch_index.nonzero().flatten()
            batch_index = [int(i) for i in batch_index.flatten().tolist()]
        elif isinstance(batch_index, int) and not isinstance(batch_index, bool):
            batch_index = [batch_index]
        rows = []
        for i in batch_index:
            if isinstance(i, bool) or not isinstance(i, int) or not -self.batch_size <= i < self.batch_size:
                raise ValueError(f"batch_index: {i!r} is not a sequence index in [0, {self.batch_size})")
            rows.append(i % self.batch_size)
        return sorted(set(rows))

    def __repr__(self) -> str:
        layout = (
            f"paged, {self.num_blocks} blocks of {self.block_size} ({self.free_blocks} free)"
            if self.paged
            else "contiguous"
        )
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch_size}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, max_seqlen={self.max_seqlen}, {layout}, dtype={self.dtype}, "
            f"device={self.device}, lengths={self._host_lengths})"
        )
