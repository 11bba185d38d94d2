"""Philox4x32-10 and the dropout keep rule of docs/INTERNALS.md, in Triton.

The keep decision for element ``(b, h, i, j)`` is a pure function of ``(seed, offset, n)`` with
``n = ((b * Hq + h) * Lq + i) * Lk + j``, so the backward regenerates exactly the mask the
forward used instead of storing it. It must match ``csrc/common/philox.h`` and the reference
bit for bit, so everything here is explicit uint32 arithmetic (wrap-around multiply, ``umulhi``
for the high word) rather than ``tl.randint``, whose counter layout is Triton's own.

Host-side helpers (``split_u64``, ``dropout_threshold``) turn the Python integers into kernel
arguments that always have the same Triton type, so a seed above 2**31 does not compile a second
variant of the kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["philox_keep_word", "dropout_keep", "split_u64", "dropout_threshold", "philox_keep_word_host"]

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85


@triton.jit
def philox_keep_word(n, k0, k1, c2, c3):
    """First output word of Philox4x32-10 for counter ``(n_lo, n_hi, c2, c3)`` and key ``(k0, k1)``.

    ``n`` is an int64 tensor of element indices; ``k0, k1, c2, c3`` are uint32 scalars.
    """
    c0 = n.to(tl.uint32)  # truncation keeps the low word
    c1 = (n >> 32).to(tl.uint32)
    # Broadcast the scalar words to the tile so every round works on same-shaped uint32 tensors.
    zero = c0 * 0
    c2 = zero + c2
    c3 = zero + c3
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, tl.full(c0.shape, _M0, tl.uint32))
        lo0 = c0 * tl.full(c0.shape, _M0, tl.uint32)
        hi1 = tl.umulhi(c2, tl.full(c2.shape, _M1, tl.uint32))
        lo1 = c2 * tl.full(c2.shape, _M1, tl.uint32)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0


@triton.jit
def dropout_keep(n, seed_lo, seed_hi, offset_lo, offset_hi, threshold):
    """True where element ``n`` is kept. All scalar arguments are int32 bit patterns of uint32 words
    (see ``split_u64``); ``threshold`` is ``dropout_threshold(p)`` in the same form."""
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    c2 = offset_lo.to(tl.uint32, bitcast=True)
    c3 = offset_hi.to(tl.uint32, bitcast=True)
    r = philox_keep_word(n, k0, k1, c2, c3)
    return r >= threshold.to(tl.uint32, bitcast=True)


def _as_i32(word: int) -> int:
    return word - (1 << 32) if word >= (1 << 31) else word


def split_u64(value: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a 64-bit integer, each as a signed int32 bit pattern.

    Negative values are taken modulo 2**64, as a C ``uint64_t`` cast would."""
    value &= (1 << 64) - 1
    return _as_i32(value & 0xFFFFFFFF), _as_i32(value >> 32)


def dropout_threshold(p: float) -> tuple[int, float]:
    """(threshold as an int32 bit pattern, scale of kept probabilities) for dropout probability p.

    ``floor(p * 2**32)`` does not fit 32 bits when ``p >= 1``: then every element must be dropped,
    which the kernel gets from a zero scale (the threshold value no longer matters)."""
    if p <= 0.0:
        return 0, 1.0
    if p >= 1.0:
        return _as_i32(0xFFFFFFFF), 0.0
    return _as_i32(int(p * 4294967296.0)), 1.0 / (1.0 - p)


def philox_keep_word_host(seed: int, offset: int, n: int) -> int:
    """Plain-Python Philox4x32-10 word, for tests of the Triton version."""
    mask = 0xFFFFFFFF
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    k0, k1 = seed & mask, seed >> 32
    c0, c1, c2, c3 = n & mask, (n >> 32) & mask, offset & mask, offset >> 32
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        k0 = (k0 + _W0) & mask
        k1 = (k1 + _W1) & mask
    return c0
