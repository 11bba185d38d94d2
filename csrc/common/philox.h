// Philox4x32-10 and the dropout keep rule, shared by the CPU and CUDA kernels (torch-free).
// The keep mask must be a pure function of (seed, offset, b, h, i, j) so the backward can
// regenerate it instead of storing it; docs/INTERNALS.md gives the exact definition that the
// Triton kernels and the reference implement too.
#pragma once

#include <stdint.h>

#include "macros.h"

namespace seqkernels {

SK_HOST_DEVICE SK_INLINE uint32_t philox_keep_word(uint64_t seed, uint64_t offset, uint64_t n) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(n), c1 = static_cast<uint32_t>(n >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// floor(p * 2^32) as the comparison threshold; p >= 1 drops everything (threshold > any word).
SK_HOST_DEVICE SK_INLINE uint64_t dropout_threshold(double p) {
  if (p <= 0.0) return 0;
  if (p >= 1.0) return uint64_t(1) << 32;
  return static_cast<uint64_t>(p * 4294967296.0);
}

// Linear element index n = ((b * H + h) * Lq + i) * Lk + j, in 64 bits.
SK_HOST_DEVICE SK_INLINE bool dropout_keep(uint64_t seed, uint64_t offset, uint64_t threshold, int64_t b, int64_t h,
                                           int64_t i, int64_t j, int64_t H, int64_t Lq, int64_t Lk) {
  const uint64_t n = static_cast<uint64_t>(((b * H + h) * Lq + i) * Lk + j);
  return static_cast<uint64_t>(philox_keep_word(seed, offset, n)) >= threshold;
}

}  // namespace seqkernels
