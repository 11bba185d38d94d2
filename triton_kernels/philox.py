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

# tl.constexpr so the jitted code may read them as globals; int() gives the plain value on the host.
_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox_keep_word(n, k0, k1, c2, c3):
    """First output word of Philox4x32-10 for counter ``(n_lo, n_hi, c2, c3)`` and key ``(k0, k1)``.

    ``n`` is an int64 tensor of element indices; ``k0, k1, c2, c3`` are uint32 scalars.
    """
    c0 = n.to(tl.uint32)  # truncation keeps the low word
    c1 = (n >> 32).to(tl.uint32)
    m0 = tl.full(c0.shape, _M0, tl.uint32)
    # Round 1: c2 and c3 are the same for every element (the offset), so their product stays a
    # scalar; from round 2 on every word is per element.
    hi0 = tl.umulhi(c0, m0)
    lo0 = c0 * m0
    c0 = c1 ^ (tl.umulhi(c2, _M1) ^ k0)
    c1 = c2 * _M1
    c2 = hi0 ^ (c3 ^ k1)
    c3 = lo0
    k0 = k0 + _W0
    k1 = k1 + _W1
    m1 = tl.full(c0.shape, _M1, tl.uint32)
    c1 = tl.full(c0.shape, 0, tl.uint32) + c1
    for _ in tl.static_range(9):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
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
    m0, m1, w0, w1 = int(_M0), int(_M1), int(_W0), int(_W1)
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    k0, k1 = seed & mask, seed >> 32
    c0, c1, c2, c3 = n & mask, (n >> 32) & mask, offset & mask, offset >> 32
    for _ in range(10):
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        k0 = (k0 + w0) & mask
        k1 = (k1 + w1) & mask
    return c0
