"""KV cache: the append kernel (contiguous and paged caches) and decode attention against the cache
(DESIGN §2): public functions, validation, backend dispatch and the op registrations (Triton family,
fake kernels) of DESIGN §3.

Where token t of sequence b goes (`p = cache_seqlens[b] + t`):

    contiguous  k_cache (B, Hkv, S_max, D):               k_cache[b, :, p]
    paged       k_cache (num_blocks, Hkv, block_size, D): k_cache[block_table[b, p // block_size], :, p % block_size]

Decode attention, query t of Tq at position `pos = cache_seqlens[b] - Tq + t` (bottom-right causal),
cache_seqlens[b] = 6, Tq = 2, window=None and window=(2, 0):

        key j: 0 1 2 3 4 5 | 6 7 (unused slots: never read)       0 1 2 3 4 5
    t=0 (pos 4)  x x x x x . | . .                                 . . x x x .
    t=1 (pos 5)  x x x x x x | . .                                 . . . x x x

Split-K: the visible keys of a row tile are cut into `num_splits` chunks; each chunk gives a partial
output and its log-sum-exp, merged exactly by `out = sum_s exp(lse_s - lse) out_s` with
`lse = log sum_s exp(lse_s)`. Decode attention is forward-only on the kernel backends (inference); with
inputs that require grad the automatic choice falls back to the differentiable reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends, capabilities
from ._common import (
    FLOAT_DTYPES,
    INT32_MIN,
    MAX_HEAD_DIM,
    check_cu_seqlens,
    check_index_tensor,
    check_modifiers,
    check_same,
    check_scale,
    check_tensor,
    kernel_families,
    packed_tile_offsets,
    to_int32_saturated,
)


def _check_cache_pair(k_cache, v_cache, *, dtypes=FLOAT_DTYPES):
    check_tensor("k_cache", k_cache, ndim=4, dtypes=dtypes)
    check_tensor("v_cache", v_cache, ndim=4)
    check_same(("k_cache", "v_cache"), (k_cache, v_cache))
    # Dims 0-2 one by one: this runs on every decode step, where a torch.Size slice costs a microsecond.
    ks, vs = k_cache.shape, v_cache.shape
    if ks[0] != vs[0] or ks[1] != vs[1] or ks[2] != vs[2]:
        raise ValueError(
            f"v_cache: shape {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)} in all but "
            "the last (head) dim"
        )
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.shape[-1] > 1 and c.stride(-1) != 1:
            raise ValueError(
                f"{name}: the head dim must be contiguous (stride 1), got strides {tuple(c.stride())}; "
                "the cache is written in place, so it cannot be copied to fix this"
            )
    if not (1 <= k_cache.shape[-1] <= MAX_HEAD_DIM and 1 <= v_cache.shape[-1] <= MAX_HEAD_DIM):
        raise ValueError(
            f"k_cache, v_cache: head dims must be in [1, {MAX_HEAD_DIM}], got D={k_cache.shape[-1]}, "
            f"Dv={v_cache.shape[-1]}"
        )


def _layout(k_cache: Tensor, block_table: Optional[Tensor], batch: int):
    """(capacity per sequence, block_size or 0) of a contiguous or paged cache; checks the batch dims."""
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"k_cache: a contiguous cache is (B, Hkv, S_max, D) with B={batch}, got "
                f"{tuple(k_cache.shape)} (pass block_table for a paged cache)"
            )
        return k_cache.shape[2], 0
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape ({batch}, max_blocks), got {tuple(block_table.shape)}")
    block_size = k_cache.shape[2]
    if block_size < 1:
        raise ValueError(
            f"k_cache: a paged cache is (num_blocks, Hkv, block_size, D) with block_size >= 1, got "
            f"{tuple(k_cache.shape)}"
        )
    return block_table.shape[1] * block_size, block_size


def _check_indices(k_cache, cache_seqlens, block_table, batch: int, device, what: str):
    """dtype/shape/device of `cache_seqlens` and `block_table` (values are judged by the caller, as
    given); returns the cache's (capacity per sequence, block_size or 0)."""
    if block_table is not None:
        check_index_tensor("block_table", block_table, 2, device, what)
    capacity, block_size = _layout(k_cache, block_table, batch)
    check_index_tensor("cache_seqlens", cache_seqlens, 1, device, what)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(
            f"cache_seqlens: expected shape ({batch},) (one entry per sequence), got {tuple(cache_seqlens.shape)}"
        )
    return capacity, block_size


# ---------------------------------------------------------------------------------------------
# Append


@dataclasses.dataclass
class AppendCall:
    """Normalized arguments of kv_cache_append (docs/INTERNALS.md)."""

    k_cache: Tensor
    v_cache: Tensor
    k_new: Tensor
    v_new: Tensor
    cache_seqlens: Tensor  # int32 (B,)
    block_table: Optional[Tensor]  # int32 (B, max_blocks)
    # Packed form: int32 (B+1,); k_new, v_new are then the (1, Hkv, total, D) views of the token-major rows.
    cu_seqlens: Optional[Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    def args(self):
        return (
            self.k_cache,
            self.v_cache,
            self.k_new,
            self.v_new,
            self.cache_seqlens,
            self.block_table,
            self.cu_seqlens,
        )


def _validate_positions(
    cache_seqlens: Tensor,
    T,
    capacity: int,
    block_size: int,
    block_table: Optional[Tensor],
    num_blocks: int,
):
    """Host check of every position the append will write (one device->host copy of the small index
    tensors). Takes the caller's tensors, before any int32 conversion, so int64 values are judged as
    given (2**32 + 2 is out of range, not position 2). `T`: the tokens every sequence appends (an
    int), or a (B,) tensor of per-sequence counts (the packed form; a sequence with 0 writes nothing)."""
    if block_table is None and not isinstance(T, Tensor) and cache_seqlens.device.type == "cpu":
        # One reduction settles the common call (a contiguous cache, every sequence appending T);
        # the elementwise passes below name the offending sequence.
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        if lo >= 0 and hi + T - 1 < capacity:
            return
    lens = cache_seqlens.cpu().to(torch.int64)
    bad = (lens < 0).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(f"cache_seqlens: sequence {b} has a negative length {int(lens[b])}")
    counts = (
        T.cpu().to(torch.int64) if isinstance(T, Tensor) else torch.full_like(lens, T)
    )  # tokens written per sequence
    writes = counts > 0
    last = lens + (counts - 1)
    if block_table is None:
        over = (writes & (last >= capacity)).nonzero()
        if over.numel():
            b = int(over[0, 0])
            raise ValueError(
                f"kv_cache_append: sequence {b} would write positions {int(lens[b])}..{int(last[b])} but "
                f"the cache holds S_max={capacity} positions (cache_seqlens[{b}]={int(lens[b])}, "
                f"T={int(counts[b])}); nothing was written"
            )
        return
    max_blocks = block_table.shape[1]
    over = (writes & (last // block_size >= max_blocks)).nonzero()
    if over.numel():
        b = int(over[0, 0])
        raise ValueError(
            f"kv_cache_append: sequence {b} would write positions {int(lens[b])}..{int(last[b])}, "
            f"i.e. block-table column {int(last[b]) // block_size}, but block_table has "
            f"max_blocks={max_blocks} columns of block_size={block_size}; nothing was written"
        )
    table = block_table.cpu().to(torch.int64)
    first_col, last_col = lens // block_size, last // block_size
    cols = torch.arange(max_blocks).unsqueeze(0)
    used = (cols >= first_col.unsqueeze(1)) & (cols <= last_col.unsqueeze(1)) & writes.unsqueeze(1)
    invalid = used & ((table < 0) | (table >= num_blocks))
    hit = invalid.nonzero()
    if hit.numel():
        b, c = int(hit[0, 0]), int(hit[0, 1])
        raise ValueError(
            f"block_table: sequence {b} writes into block-table column {c}, whose block id "
            f"{int(table[b, c])} is outside [0, num_blocks={num_blocks}); nothing was written"
        )
    # A block written here must belong to one (sequence, column) only: if another entry of the columns in
    # use (its readers, or a second writer) names the same block, the append would overwrite keys that
    # entry reads, or two sequences would race for the same slots (last writer wins). Blocks shared
    # read-only (a common prompt prefix below every sharer's append position) are fine.
    readable = cols <= last_col.unsqueeze(1)
    ids = table[readable]
    uniq, counts = torch.unique(ids, return_counts=True)
    shared = uniq[counts > 1]
    if shared.numel():
        written_shared = used & torch.isin(table, shared)
        hit = written_shared.nonzero()
        if hit.numel():
            b, c = int(hit[0, 0]), int(hit[0, 1])
            block = int(table[b, c])
            others = [(int(x), int(y)) for x, y in ((table == block) & readable).nonzero().tolist() if (x, y) != (b, c)]
            raise ValueError(
                f"block_table: sequence {b} writes into block {block} (block-table column {c}), which is "
                f"also used by (sequence, column) {others[0]}; a block that is written must not be shared "
                "(with check=True aliasing is refused; nothing was written)"
            )


def _prepare_append_packed(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens, block_table, check):
    """The packed form: k_new (total, Hkv, D), v_new (total, Hkv, Dv), cu_seqlens int32 (B+1,)."""
    check_tensor("k_new", k_new, ndim=3)
    check_tensor("v_new", v_new, ndim=3)
    check_same(("k_cache", "k_new", "v_new"), (k_cache, k_new, v_new))
    total, Hkv, D = k_new.shape
    Dv = v_cache.shape[-1]
    if tuple(v_new.shape) != (total, Hkv, Dv):
        raise ValueError(
            f"v_new: expected shape ({total}, {Hkv}, {Dv}) (k_new's total and Hkv and v_cache's head dim), "
            f"got {tuple(v_new.shape)}"
        )
    if k_cache.shape[1] != Hkv or k_cache.shape[3] != D:
        raise ValueError(
            f"k_new: shape {tuple(k_new.shape)} does not fit k_cache {tuple(k_cache.shape)} "
            "(the number of heads and the head dim must match)"
        )
    check_index_tensor("cache_seqlens", cache_seqlens, 1, k_cache.device, "the caches")
    B = cache_seqlens.shape[0]
    cu, _ = check_cu_seqlens("cu_seqlens", cu_seqlens, total, k_cache.device)
    if cu.shape[0] != B + 1:
        raise ValueError(
            f"cu_seqlens: {cu.shape[0]} entries, expected B+1 = {B + 1} (B = {B} sequences in cache_seqlens)"
        )
    capacity, block_size = _check_indices(k_cache, cache_seqlens, block_table, B, k_cache.device, "the caches")
    if check and total > 0 and B > 0:
        counts = cu[1:].cpu().to(torch.int64) - cu[:-1].cpu().to(torch.int64)
        _validate_positions(cache_seqlens, counts, capacity, block_size, block_table, k_cache.shape[0])
    table = None if block_table is None else to_int32_saturated(block_table)
    # The kernels take (1, Hkv, total, D) views of the token-major rows (as attention_varlen).
    return AppendCall(
        k_cache,
        v_cache,
        k_new.transpose(0, 1).unsqueeze(0),
        v_new.transpose(0, 1).unsqueeze(0),
        to_int32_saturated(cache_seqlens, INT32_MIN),
        table,
        cu,
    )


def prepare_append(
    k_cache, v_cache, k_new, v_new, cache_seqlens, *, block_table=None, cu_seqlens=None, check=True
) -> AppendCall:
    _check_cache_pair(k_cache, v_cache)
    if cu_seqlens is not None:
        return _prepare_append_packed(k_cache, v_cache, k_new, v_new, cache_seqlens, cu_seqlens, block_table, check)
    check_tensor("k_new", k_new, ndim=4)
    check_tensor("v_new", v_new, ndim=4)
    check_same(("k_cache", "k_new", "v_new"), (k_cache, k_new, v_new))
    B, Hkv, T, D = k_new.shape
    Dv = v_cache.shape[-1]
    if tuple(v_new.shape) != (B, Hkv, T, Dv):
        raise ValueError(
            f"v_new: expected shape ({B}, {Hkv}, {T}, {Dv}) (k_new's B, Hkv, T and v_cache's head dim), "
            f"got {tuple(v_new.shape)}"
        )
    if k_cache.shape[1] != Hkv or k_cache.shape[3] != D:
        raise ValueError(
            f"k_new: shape {tuple(k_new.shape)} does not fit k_cache {tuple(k_cache.shape)} "
            "(the number of heads and the head dim must match)"
        )
    capacity, block_size = _check_indices(k_cache, cache_seqlens, block_table, B, k_cache.device, "the caches")
    if check and T > 0 and B > 0:
        _validate_positions(cache_seqlens, T, capacity, block_size, block_table, k_cache.shape[0])
    table = None if block_table is None else to_int32_saturated(block_table)
    return AppendCall(k_cache, v_cache, k_new, v_new, to_int32_saturated(cache_seqlens, INT32_MIN), table)


# What a call asks of a backend; each backend's limits are its row of capabilities.TABLE.
def _append_features(c: AppendCall) -> capabilities.Features:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (c.k_cache, c.v_cache, c.k_new, c.v_new))
    return capabilities.Features(
        dtype=c.k_cache.dtype, device=c.k_cache.device, needs_grad=needs_grad, varlen=c.cu_seqlens is not None
    )


APPEND_OP = backends.OpBackends(name="kv_cache_append", cpp_ops=("kv_cache_append",), features=_append_features)


@torch.library.custom_op("seqkernels::triton_kv_cache_append", mutates_args=("k_cache", "v_cache"))
def triton_kv_cache_append(
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor],
    cu_seqlens: Optional[Tensor] = None,
) -> None:
    from ..triton_kernels import kv_cache as tk

    tk.kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cu_seqlens)


def _append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cu_seqlens=None):
    return None


def _run_append(call: AppendCall, backend: str):
    if backend == "reference":
        from .. import reference as ref

        ref.kv_cache_append_ref(*call.args())
    else:
        APPEND_FAMILIES[backend][0](*call.args())


def kv_cache_append(
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cache_seqlens: Tensor,
    *,
    block_table: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    check: bool = True,
    backend: Optional[str] = None,
) -> None:
    """Write `k_new`, `v_new` (B, Hkv, T, D) into the caches in place: token t of sequence b goes to
    position `cache_seqlens[b] + t` (see the module docstring for the contiguous and paged layouts).
    `cache_seqlens` is not modified (the caller advances it, e.g. `seqkernels.nn.KVCache`).

    Packed form (sequences appending different numbers of tokens, e.g. chunked prefill next to
    decode steps): with `cu_seqlens` (int32 (B+1,), B = cache_seqlens.numel(), starting at 0,
    non-decreasing, ending at total), `k_new` is (total, Hkv, D) and `v_new` (total, Hkv, Dv), token-major,
    and row `cu_seqlens[b] + t` goes to position `cache_seqlens[b] + t`. A sequence may append 0 tokens.

    `check=True` validates every written position on the host and raises, naming the sequence, before
    anything is written; it also refuses a written block that another (sequence, column) of the table
    uses. `check=False` skips that (no host sync: CUDA graphs); the kernels then skip, never write, a
    token whose position or block id is out of range (int64 indices are clamped, never wrapped, into
    int32). Offsets are int64. Gradients through the append are tracked by the reference backend only:
    the kernel backends refuse inputs that require grad, and the automatic choice takes the reference.
    """
    call = prepare_append(
        k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=block_table, cu_seqlens=cu_seqlens, check=check
    )
    b = backends.resolve(APPEND_OP, call.device, call, backend)
    if call.k_new.shape[2] == 0 or call.k_new.shape[0] == 0 or call.cache_seqlens.shape[0] == 0:
        return None
    _run_append(call, b)
    return None


# ---------------------------------------------------------------------------------------------
# Decode attention


@dataclasses.dataclass
class DecodeCall:
    """Normalized arguments of decode_attention (docs/INTERNALS.md)."""

    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    cache_seqlens: Tensor  # int32 (B,)
    block_table: Optional[Tensor]  # int32 (B, max_blocks)
    scale: float
    window_left: int
    window_right: int
    num_splits: int
    # Score modifiers as in AttentionCall (accumulation type; None / 0.0 = off).
    alibi_slopes: Optional[Tensor] = None
    sinks: Optional[Tensor] = None
    softcap: float = 0.0
    # Packed form: int32 (B+1,) and the longest Tq_b; q is then the (1, Hq, total_q, D) view.
    cu_seqlens_q: Optional[Tensor] = None
    max_seqlen_q: int = 0

    @property
    def device(self) -> torch.device:
        return self.q.device

    def args(self):
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.cache_seqlens,
            self.block_table,
            self.scale,
            self.window_left,
            self.window_right,
            self.num_splits,
            self.alibi_slopes,
            self.sinks,
            self.softcap,
            self.cu_seqlens_q,
            self.max_seqlen_q,
        )

    def modifiers(self) -> tuple:
        return capabilities.modifiers_in(self.softcap, self.alibi_slopes, self.sinks)


def _decode_window(window) -> tuple[int, int]:
    """`window` is the left extent (int) or a pair (left, right) as in `attention`; decode is causal,
    so the right side is always folded to 0 (a query never sees positions after its own)."""
    if window is None:
        return -1, 0
    if isinstance(window, int) and not isinstance(window, bool):
        left = window
    elif (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        left, right = window
        if right < -1:
            raise ValueError(f"window: sides must be >= 0 or -1 (unbounded), got {window!r}")
    else:
        raise ValueError(
            f"window: expected an int (left extent) or a pair (left, right) of ints, -1 for unbounded, got {window!r}"
        )
    if left < -1:
        raise ValueError(f"window: sides must be >= 0 or -1 (unbounded), got {window!r}")
    return int(left), 0


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _parallelism(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # Several resident CTAs per SM hide the latency of the K/V loads.
        return 2 * _cuda_sm_count(index)
    return max(1, torch.get_num_threads())


# Fewer keys per split than this and the merge costs more than the parallelism gains.
_MIN_KEYS_PER_SPLIT = {"cuda": 256, "cpu": 512}
_MAX_SPLITS = 64


def choose_num_splits(units: int, length: int, parallelism: int, min_keys: int) -> int:
    """Splits of the key range per (batch, kv head, row tile) unit so that `units * splits` work items fill
    `parallelism` workers, each split keeping at least `min_keys` keys; among the candidates, the fewest
    splits within 5% of the best wave efficiency (the merge pass grows with the split count)."""
    if units <= 0 or length <= min_keys or units >= parallelism:
        return 1
    max_splits = max(1, min(_MAX_SPLITS, length // min_keys))
    best_eff, effs = 0.0, []
    for s in range(1, max_splits + 1):
        items = units * s
        eff = items / (math.ceil(items / parallelism) * parallelism)
        effs.append(eff)
        best_eff = max(best_eff, eff)
    for s, eff in enumerate(effs, start=1):
        if eff >= 0.95 * best_eff:
            return s
    return 1


def prepare_decode(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    block_table=None,
    scale=None,
    window=None,
    num_splits=None,
    softcap=None,
    alibi_slopes=None,
    sinks=None,
    cu_seqlens_q=None,
    max_seqlen_q=None,
) -> DecodeCall:
    packed = cu_seqlens_q is not None
    if not packed and max_seqlen_q is not None:
        raise ValueError("max_seqlen_q: only taken with cu_seqlens_q (the packed form)")
    check_tensor("q", q, ndim=3 if packed else 4, dtypes=FLOAT_DTYPES)
    _check_cache_pair(k_cache, v_cache)
    check_same(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    if packed:
        # q (total_q, Hq, D); sequence b's queries are rows cu_seqlens_q[b]..cu_seqlens_q[b+1].
        total_q, Hq, D = q.shape
        check_index_tensor("cache_seqlens", cache_seqlens, 1, q.device, "q and the caches")
        B = cache_seqlens.shape[0]
        cu, max_seqlen_q = check_cu_seqlens(
            "cu_seqlens_q", cu_seqlens_q, total_q, q.device, max_seqlen_q, "max_seqlen_q"
        )
        if cu.shape[0] != B + 1:
            raise ValueError(
                f"cu_seqlens_q: {cu.shape[0]} entries, expected B+1 = {B + 1} (B = {B} sequences in cache_seqlens)"
            )
        Tq = max_seqlen_q  # the longest chunk (a bound on GPUs)
        tq = cu[1:].to(torch.int64) - cu[:-1].to(torch.int64) if q.device.type == "cpu" else None
    else:
        B, Hq, Tq, D = q.shape
        cu, tq = None, None
        if Tq < 1:
            raise ValueError(f"q: expected at least one query token (Tq >= 1), got shape {tuple(q.shape)}")
    Hkv = k_cache.shape[1]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache: head dim {k_cache.shape[3]} must equal q's head dim {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"q, k_cache: the number of query heads ({Hq}) must be a multiple of the number of key/value heads ({Hkv})"
        )
    capacity, block_size = _check_indices(k_cache, cache_seqlens, block_table, B, q.device, "q and the caches")
    # Values are checked as the caller gave them (int64 included), before the int32 conversion.
    lens, table = cache_seqlens, block_table
    longest = None  # the longest cache_seqlens entry, once read on the host
    if lens.device.type == "cpu" and B > 0:
        # One reduction settles the common (valid, one Tq) call; the elementwise pass below finds
        # the offending sequence (and runs for the packed form's per-sequence Tq).
        lo, hi = (int(x) for x in torch.aminmax(lens))
        longest = hi
        if packed or lo < Tq or hi > capacity:
            need = tq if packed else torch.full((B,), Tq, dtype=torch.int64)
            bad = ((lens < need) | (lens > capacity)).nonzero()
            if bad.numel():
                b = int(bad[0, 0])
                n = int(need[b])
                raise ValueError(
                    f"cache_seqlens: sequence {b} has length {int(lens[b])}, expected a value in "
                    f"[Tq={n}, {capacity}] (the {n} queries' keys and values must already be in the cache, "
                    "appended with kv_cache_append, and the cache holds "
                    f"{capacity} positions)"
                )
        if table is not None:
            cols = (lens.to(torch.int64) + block_size - 1) // block_size
            used = torch.arange(table.shape[1]).unsqueeze(0) < cols.unsqueeze(1)
            invalid = used & ((table < 0) | (table >= k_cache.shape[0]))
            hit = invalid.nonzero()
            if hit.numel():
                b, c = int(hit[0, 0]), int(hit[0, 1])
                raise ValueError(
                    f"block_table: sequence {b} reads block-table column {c}, whose block id "
                    f"{int(table[b, c])} is outside [0, num_blocks={k_cache.shape[0]})"
                )
    scale = check_scale(scale, D)
    lens = to_int32_saturated(lens)
    table = None if table is None else to_int32_saturated(table)
    left, right = _decode_window(window)
    if num_splits is None:
        if longest is not None:
            length = longest
        else:
            length = capacity  # the true lengths would cost a host sync
        if left >= 0:
            length = min(length, left + Tq)
        if tq is not None:
            units = Hkv * int(packed_tile_offsets(cu, Hq // Hkv, 64, total_q)[-1])
        else:
            units = B * Hkv * max(1, math.ceil(Tq * (Hq // Hkv) / 64))
        kind = "cuda" if q.device.type == "cuda" else "cpu"
        num_splits = choose_num_splits(units, length, _parallelism(q.device), _MIN_KEYS_PER_SPLIT[kind])
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits: expected None (heuristic) or an int in [1, 1024], got {num_splits!r}")
    if packed:
        cap, slopes, sink_logits = check_modifiers(q, softcap, alibi_slopes, sinks, batch=B)  # q (total_q, Hq, D)
        # The kernels take the (1, Hq, total_q, D) view of the token-major queries (as attention_varlen).
        qk = q.transpose(0, 1).unsqueeze(0)
        return DecodeCall(
            qk,
            k_cache,
            v_cache,
            lens,
            table,
            scale,
            left,
            right,
            int(num_splits),
            slopes,
            sink_logits,
            cap,
            cu,
            int(max_seqlen_q),
        )
    cap, slopes, sink_logits = check_modifiers(q, softcap, alibi_slopes, sinks)
    return DecodeCall(q, k_cache, v_cache, lens, table, scale, left, right, int(num_splits), slopes, sink_logits, cap)


# What a call asks of a backend; each backend's limits are its row of capabilities.TABLE.
def _decode_features(c: DecodeCall) -> capabilities.Features:
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (c.q, c.k_cache, c.v_cache, c.sinks)
    )
    return capabilities.Features(
        dtype=c.q.dtype,
        device=c.q.device,
        head_dims=(c.q.shape[-1], c.v_cache.shape[-1]),
        needs_grad=needs_grad,
        modifiers=c.modifiers(),
        varlen=c.cu_seqlens_q is not None,
    )


DECODE_OP = backends.OpBackends(name="decode_attention", cpp_ops=("decode_attention",), features=_decode_features)


@torch.library.custom_op("seqkernels::triton_decode_attention", mutates_args=())
def triton_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    num_splits: int,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
) -> tuple[Tensor, Tensor]:
    from ..triton_kernels import kv_cache as tk

    return tk.decode_attention(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        block_table,
        scale,
        window_left,
        window_right,
        num_splits,
        alibi_slopes,
        sinks,
        softcap,
        cu_seqlens_q,
        max_seqlen_q,
    )


def _decode_fake(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    block_table,
    scale,
    window_left,
    window_right,
    num_splits,
    alibi_slopes=None,
    sinks=None,
    softcap=0.0,
    cu_seqlens_q=None,
    max_seqlen_q=0,
):
    B, Hq, Tq, _ = q.shape
    Dv = v_cache.shape[-1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens_q is not None:
        # Packed: q is the (1, Hq, total_q, D) view of (total_q, Hq, D); out keeps that token-major storage.
        out = q.new_empty((Tq, Hq, Dv)).permute(1, 0, 2).unsqueeze(0)
        return out, q.new_empty((1, Hq, Tq), dtype=lse_dtype)
    return q.new_empty((B, Hq, Tq, Dv)), q.new_empty((B, Hq, Tq), dtype=lse_dtype)


# Forward-only (inference) ops: fakes, no autograd (a call that needs gradients runs the reference).
APPEND_FAMILIES = kernel_families(("triton_kv_cache_append",), ("kv_cache_append",), (_append_fake,))
DECODE_FAMILIES = kernel_families(("triton_decode_attention",), ("decode_attention",), (_decode_fake,))


def _run_decode(call: DecodeCall, backend: str):
    out, lse = _run_decode_kernel(call, backend)
    if call.cu_seqlens_q is not None:
        # (1, Hq, total_q, Dv) -> the token-major (total_q, Hq, Dv); lse (Hq, total_q).
        return out[0].transpose(0, 1), lse[0]
    return out, lse


def _run_decode_kernel(call: DecodeCall, backend: str):
    if backend == "reference":
        from .. import reference as ref

        return ref.decode_attention_ref(
            call.q,
            call.k_cache,
            call.v_cache,
            call.cache_seqlens,
            block_table=call.block_table,
            scale=call.scale,
            window_left=call.window_left,
            window_right=call.window_right,
            softcap=call.softcap or None,
            alibi_slopes=call.alibi_slopes,
            sinks=call.sinks,
            cu_seqlens_q=call.cu_seqlens_q,
            max_seqlen_q=call.max_seqlen_q,
        )
    return DECODE_FAMILIES[backend][0](*call.args())


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    block_table: Optional[Tensor] = None,
    scale: Optional[float] = None,
    window=None,
    num_splits: Optional[int] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
):
    """Attention of the `Tq` newest tokens against the cache.

    q (B, Hq, Tq, D); k_cache/v_cache contiguous (B, Hkv, S_max, D|Dv) or paged
    (num_blocks, Hkv, block_size, D|Dv) with `block_table` (B, max_blocks); Hq % Hkv == 0 (GQA/MQA).
    The queries' own keys and values must already be in the cache (`kv_cache_append` first): query t sits
    at position `cache_seqlens[b] - Tq + t` and sees cache positions up to its own (causal, bottom-right);
    `window` (an int `left`, or `(left, right)` as in `attention`, the right side folded to 0) keeps
    positions `>= pos - left`. Slots at or past `cache_seqlens[b]` are never read into the result.
    `num_splits` (split-K over the cache length) defaults to a heuristic on batch x heads x length vs the
    machine's parallelism. Returns `out` (B, Hq, Tq, Dv) in q's dtype, and with `return_lse` also the
    float32 (float64 for float64 inputs) log-sum-exp (B, Hq, Tq) of the scaled scores (-inf, with a
    zero output row, for a query that sees no key). `softcap`, `alibi_slopes` and `sinks` as in
    `seqkernels.attention` (ALiBi distances from each query's own position).

    Packed form (chunked prefill, speculative verification, continuous batching: sequences adding
    different numbers of tokens in one call): with `cu_seqlens_q` (int32 (B+1,), B =
    cache_seqlens.numel()), q is (total_q, Hq, D) token-major and sequence b's queries are rows
    `cu_seqlens_q[b]..cu_seqlens_q[b+1]` (Tq_b of them, possibly 0), its Tq_b newest tokens, at positions
    `cache_seqlens[b] - Tq_b + t`; alibi_slopes (Hq,) or (B, Hq). `max_seqlen_q` (the longest Tq_b) is
    read from cu_seqlens_q when None (a host sync on GPUs). Returns out (total_q, Hq, Dv) and with
    `return_lse` lse (Hq, total_q).
    """
    call = prepare_decode(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        block_table=block_table,
        scale=scale,
        window=window,
        num_splits=num_splits,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max_seqlen_q,
    )
    b = backends.resolve(DECODE_OP, call.device, call, backend)
    out, lse = _run_decode(call, b)
    return (out, lse) if return_lse else out
