// FlashAttention-2-style forward kernel for float16 / bfloat16 on sm_80+ (torch-free).
//
// One CTA owns kBlockM query rows of one (batch, query head) and streams the visible key
// blocks of its kv head through shared memory, two stages deep (cp.async prefetch of block
// n+1 while block n is computed). Each warp owns 16 * kMTiles whole query rows, so the
// softmax statistics of a row live in the 4 lanes of one quad and never cross warps:
//
//        keys ->  n0          n0+kBlockN
//   rows   warp 0 [ S = Q K^T | mask | online softmax | O += P V ]
//    |     warp 1 [           ...                               ]
//    v     ...
//
// The visible set of row i (docs/INTERNALS.md), with off = Lk_b - Lq (bottom_right) or 0:
//
//   j visible  <=>  i + off - window_left <= j <= i + off + window_right,  j < Lk_b,  mask(i, j)
//
//   causal, bottom_right, Lq=3, Lk=5:    j: 0 1 2 3 4
//                                     i=0   x x x . .
//                                     i=1   x x x x .
//                                     i=2   x x x x x
//
// Key blocks entirely outside the band of the CTA's rows are never loaded; blocks cut by the
// band, by Lk_b, or any block when attn_mask is given, go through the element-wise mask;
// the others skip it. Scores and the running max stay in the natural-log domain; exp2 takes (s - max) * log2 e.
// A row that sees no key ends with sum 0: its output is 0 and its lse -inf.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../common/macros.h"
#include "../common/philox.h"
#include "attention_params.h"
#include "mma.cuh"

namespace seqkernels {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Element conversions. Tiles are moved as raw 16-bit words; only these helpers know the format.

template <typename Tag>
struct Elem;

template <>
struct Elem<mma::f16> {
  static SK_DEVICE SK_INLINE uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
  }
  static SK_DEVICE SK_INLINE float to_float(uint16_t u) { return __half2float(__ushort_as_half(u)); }
};

template <>
struct Elem<mma::bf16> {
  static SK_DEVICE SK_INLINE uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
  }
  static SK_DEVICE SK_INLINE float to_float(uint16_t u) {
    return __bfloat162float(__ushort_as_bfloat16(u));
  }
};

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles: row-major kCols-wide rows of 16-bit elements (kCols a multiple of 64),
// moved in 16-byte chunks. Within each 128-byte segment the chunk index is XOR-swizzled with
// row & 7, so the 8 row addresses of one ldmatrix 8x8 matrix (same logical chunk, 8 consecutive
// rows) hit 8 distinct 16-byte bank groups, and so do the cp.async writes of 8 threads.
//
// Every ldmatrix below reads rows row0 + (lane & 7) (+8) with row0 a multiple of 8 and logical
// chunk 2 * step + x(lane), so a lane's byte offset for 16-column step `step` is its offset for
// step 0 XOR (step & 3) << 5, plus (step >> 2) << 7: one per-lane base register per operand and
// immediates for the rest (instead of a hoisted address register per step).

template <int kCols>
struct Swz {
  static_assert(kCols % 64 == 0, "tiles are multiples of 64 columns");
  static constexpr int kRowBytes = kCols * 2;
  static SK_DEVICE SK_INLINE int offset(int row, int chunk) {  // bytes
    return row * kRowBytes + (((chunk & 7) ^ (row & 7)) | (chunk & ~7)) * 16;
  }
  static SK_DEVICE SK_INLINE int step(int lane_base, int s) {
    return (lane_base ^ ((s & 3) << 5)) + ((s >> 2) << 7);
  }
  // Lane patterns of the ldmatrix.x4 operands (see the *_addr comments below).
  //   rows_then_cols: matrix m = rows (m & 1) * 8, chunk (m >> 1)  -- A, and B with .trans
  //   cols_then_rows: matrix m = rows (m >> 1) * 8, chunk (m & 1)  -- B of A * T^T, A with .trans
  static SK_DEVICE SK_INLINE int lane_base_rc(int lane) {
    return ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (((lane >> 4) ^ (lane & 7)) << 4);
  }
  static SK_DEVICE SK_INLINE int lane_base_cr(int lane) {
    return ((lane & 7) + ((lane >> 4) & 1) * 8) * kRowBytes + ((((lane >> 3) & 1) ^ (lane & 7)) << 4);
  }
};

template <int kCols>
SK_DEVICE SK_INLINE const void* smem_at(const uint16_t* tile, int row0, int lane_base, int step) {
  return reinterpret_cast<const char*>(tile) + row0 * Swz<kCols>::kRowBytes +
         Swz<kCols>::step(lane_base, step);
}

// ldmatrix.x4 operands (a 16x16 block = 4 8x8 matrices; lanes 8m..8m+7 address matrix m):
//   A (rows x k) row-major, no .trans, lane_base_rc: m0 rows 0-7/k 0-7, m1 rows 8-15/k 0-7,
//       m2 rows 0-7/k 8-15, m3 rows 8-15/k 8-15 -> a[0..3].
//   B of C = A T^T with T (n x k) row-major (K in Q K^T), no .trans, lane_base_cr:
//       m0 n 0-7/k 0-7, m1 n 0-7/k 8-15, m2 n 8-15/k 0-7, m3 n 8-15/k 8-15
//       -> r[0..1] = b of n-tile n0, r[2..3] = b of n-tile n0 + 8.
//   B of C = A T with T (k x n) row-major (V in P V), .trans, lane_base_rc:
//       m0 k 0-7/n 0-7, m1 k 8-15/n 0-7, m2 k 0-7/n 8-15, m3 k 8-15/n 8-15
//       -> r[0..1] = b of n-tile n0, r[2..3] = b of n-tile n0 + 8.
//   A (m x k) from T (k x m) row-major, .trans, lane_base_cr:
//       m0 k 0-7/m 0-7 -> a[0], m1 k 0-7/m 8-15 -> a[1], m2 k 8-15/m 0-7 -> a[2], m3 -> a[3].

// Copies rows [0, rows_valid) x columns [0, cols_valid) of a kRows x kCols tile whose first row
// is `src` (row stride in elements) into shared memory; everything else is zero-filled, so
// padded head dims and rows past the end contribute nothing to the products. Thread t copies
// chunk t % kChunks of rows t / kChunks + kRowStep * it.
template <int kRows, int kCols, int kThreads>
SK_DEVICE SK_INLINE void load_tile_async(uint16_t* smem, const uint16_t* src, int64_t row_stride,
                                         int rows_valid, int cols_valid, int tid) {
  constexpr int kChunks = kCols / 8;
  static_assert(kThreads % kChunks == 0, "threads cover whole rows");
  constexpr int kRowStep = kThreads / kChunks;
  constexpr int kIters = (kRows + kRowStep - 1) / kRowStep;
  const int c = tid % kChunks, r0 = tid / kChunks;
  const bool col_ok = c * 8 < cols_valid;
  const uint16_t* g = src + r0 * row_stride + c * 8;
  const int64_t g_step = kRowStep * row_stride;
  char* s = reinterpret_cast<char*>(smem);
  const int s0 = Swz<kCols>::offset(r0, c);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = r0 + it * kRowStep;
    if (kRows % kRowStep == 0 || r < kRows) {
      const bool pred = col_ok && r < rows_valid;
      const int so = kRowStep % 8 == 0 ? s0 + it * kRowStep * Swz<kCols>::kRowBytes
                                       : Swz<kCols>::offset(r, c);
      mma::cp_async_16(s + so, pred ? g : src, pred);
    }
    g += g_step;
  }
}

// Writes rows [0, rows_valid) x columns [0, cols_valid) of a shared tile to global memory in
// 16-byte chunks (coalesced; the fragments were staged in shared memory for this).
template <int kRows, int kCols, int kThreads>
SK_DEVICE SK_INLINE void store_tile(uint16_t* dst, int64_t row_stride, const uint16_t* smem,
                                    int rows_valid, int cols_valid, int tid) {
  constexpr int kChunks = kCols / 8;
  static_assert(kThreads % kChunks == 0, "threads cover whole rows");
  constexpr int kRowStep = kThreads / kChunks;
  constexpr int kIters = (kRows + kRowStep - 1) / kRowStep;
  const int c = tid % kChunks, r0 = tid / kChunks;
  if (c * 8 >= cols_valid) return;
  const char* s = reinterpret_cast<const char*>(smem);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = r0 + it * kRowStep;
    if ((kRows % kRowStep == 0 || r < kRows) && r < rows_valid) {
      *reinterpret_cast<uint4*>(dst + r * row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(s + Swz<kCols>::offset(r, c));
    }
  }
}

// Two accumulator n-tiles (16 x 8 each, adjacent in k) become one A fragment of the next
// product: the C layout of columns 0-7 / 8-15 is exactly the A layout of k 0-7 / 8-15.
template <typename Tag>
SK_DEVICE SK_INLINE void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = Elem<Tag>::pack(c0[0], c0[1]);
  a[1] = Elem<Tag>::pack(c0[2], c0[3]);
  a[2] = Elem<Tag>::pack(c1[0], c1[1]);
  a[3] = Elem<Tag>::pack(c1[2], c1[3]);
}

SK_DEVICE SK_INLINE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
SK_DEVICE SK_INLINE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Visibility of a (row, key) pair: the band and Lk_b are computed per row once, the mask and
// dropout per element.

struct RowBand {
  int lo, hi;  // visible keys are lo <= j <= hi (before attn_mask)
};

SK_DEVICE SK_INLINE RowBand row_band(const AttentionParams& p, int i, int off, int len_k) {
  RowBand band;
  band.lo = p.window_left >= 0 ? i + off - p.window_left : 0;
  band.hi = len_k - 1;
  if (p.window_right >= 0) band.hi = min(band.hi, i + off + p.window_right);
  return band;
}

// attn_mask(b, h, i, j), added to the scaled scores as it is: scores and row statistics stay in
// the natural-log domain (see the online softmax below), so a mask of finfo.min stays finite.
SK_DEVICE SK_INLINE float mask_value(const AttentionParams& p, int64_t mask_row_offset, int j) {
  return p.mask[mask_row_offset + j * p.mask_col_stride];
}

SK_DEVICE SK_INLINE bool dropout_keep_elem(const AttentionParams& p, int b, int h, int i, int j) {
  return i < p.len_q && j < p.len_k &&
         dropout_keep(p.seed, p.offset, p.dropout_threshold, b, h, i, j, p.heads_q, p.len_q,
                      p.len_k);
}

// Keep bits of the kMTiles x 2 x kNTiles x 2 accumulator elements a thread holds in an
// (m-tile, n-tile) fragment array, bit ((mt * 2 + hf) * kNTiles + nt) * 2 + e for row
// row0 + mt * 16 + 8 * hf, column col0 + nt * 8 + e. The loop is deliberately not unrolled:
// one inlined Philox instead of one per element keeps the kernels small (compile time) and
// the bits are applied by the unrolled code with constant shifts.
template <int kMTiles, int kNTiles>
SK_DEVICE SK_INLINE uint64_t dropout_keep_bits(const AttentionParams& p, int b, int h, int row0,
                                               int col0) {
  static_assert(kMTiles * kNTiles * 4 <= 64, "keep bits fit in 64");
  uint64_t bits = 0;
#pragma unroll 1
  for (int x = 0; x < kMTiles * kNTiles * 4; ++x) {
    const int e = x & 1, nt = (x >> 1) % kNTiles, r = (x >> 1) / kNTiles;  // r = mt * 2 + hf
    const int i = row0 + (r >> 1) * 16 + (r & 1) * 8;
    const int j = col0 + nt * 8 + e;
    bits |= static_cast<uint64_t>(dropout_keep_elem(p, b, h, i, j)) << x;
  }
  return bits;
}

// ---------------------------------------------------------------------------------------------
// Tile configurations. kBlockM = 16 * kMTiles * kNWarps; K and V are double buffered.

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kMTiles = kBlockM / (16 * kNWarps);
  static constexpr int kNTiles = kBlockN / 8;
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kSmemQ = kBlockM * kHeadDim;   // elements; reused to stage O
  static constexpr int kSmemKV = kBlockN * kHeadDim;  // one stage of K or of V
  static constexpr int kSmemBytes = 2 * (kSmemQ + 4 * kSmemKV);
  static_assert(kMTiles >= 1 && kBlockM == 16 * kMTiles * kNWarps, "rows per warp");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tile shape");
};

// The instantiated head dims; a smaller one runs in the next larger tile (zero padded).
template <int kHeadDim, bool kGeneral>
struct FwdConfig;
template <>
struct FwdConfig<64, false> {
  using type = FwdTraits<64, 128, 64, 4>;
};
template <>
struct FwdConfig<64, true> {
  using type = FwdTraits<64, 64, 64, 4>;
};
template <>
struct FwdConfig<128, false> {
  using type = FwdTraits<128, 128, 32, 4>;
};
template <>
struct FwdConfig<128, true> {
  using type = FwdTraits<128, 64, 64, 4>;
};
template <>
struct FwdConfig<256, false> {
  using type = FwdTraits<256, 64, 32, 4>;
};
template <>
struct FwdConfig<256, true> {
  using type = FwdTraits<256, 64, 32, 4>;
};

// ---------------------------------------------------------------------------------------------

// kGeneral adds attn_mask and dropout; the plain variant handles everything else (band,
// kv_lengths, GQA) with fewer live registers, so it can afford the larger tiles.
template <typename Tag, typename Kt, bool kGeneral>
__global__ void __launch_bounds__(Kt::kThreads, 1) _attention_fwd_kernel(const AttentionParams p) {
  constexpr int kHeadDim = Kt::kHeadDim, kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN;
  constexpr int kMTiles = Kt::kMTiles, kNTiles = Kt::kNTiles, kDTiles = Kt::kDTiles;
  constexpr int kThreads = Kt::kThreads;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + Kt::kSmemQ;      // [2][kBlockN][kHeadDim]
  uint16_t* sV = sK + 2 * Kt::kSmemKV;  // [2][kBlockN][kHeadDim]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int quad_row = lane >> 2, quad_col = 2 * (lane & 3);

  // Heavier (later) query blocks first: with a causal band they see the most keys.
  const int num_m_blocks = (p.len_q + kBlockM - 1) / kBlockM;
  const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  const int bh = static_cast<int>(blockIdx.x / num_m_blocks);
  const int b = bh / p.heads_q, h = bh % p.heads_q;
  const int hk = h / (p.heads_q / p.heads_kv);

  const int len_k = p.kv_lengths ? min(max(p.kv_lengths[b], 0), p.len_k) : p.len_k;
  const int off = p.bottom_right ? len_k - p.len_q : 0;
  const int m0 = m_block * kBlockM;
  const int rows_valid = min(kBlockM, p.len_q - m0);
  const int m_last = m0 + rows_valid - 1;

  // Keys any row of this block can see.
  int n_begin = 0, n_end = len_k;
  if (p.window_left >= 0) n_begin = max(0, m0 + off - p.window_left);
  if (p.window_right >= 0) n_end = min(n_end, m_last + off + p.window_right + 1);
  const int nb_begin = n_begin / kBlockN;
  const int nb_end = n_end > n_begin ? (n_end + kBlockN - 1) / kBlockN : nb_begin;

  const uint16_t* q_ptr = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride +
                          h * p.q_head_stride + static_cast<int64_t>(m0) * p.q_row_stride;
  const uint16_t* k_ptr =
      static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const uint16_t* v_ptr =
      static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  uint16_t* o_ptr = static_cast<uint16_t*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride +
                    static_cast<int64_t>(m0) * p.o_row_stride;
  float* lse_ptr = p.lse + (static_cast<int64_t>(b) * p.heads_q + h) * p.len_q + m0;

  // Row indices (within the block) owned by this thread: [mt][half].
  const int warp_row0 = warp * 16 * kMTiles;
  const int lb_rc = Swz<kHeadDim>::lane_base_rc(lane), lb_cr = Swz<kHeadDim>::lane_base_cr(lane);

  float acc_o[kMTiles][kDTiles][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_max[mt][hf] = -INFINITY;
      row_sum[mt][hf] = 0.f;
    }
  }

  if (nb_begin < nb_end) {
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, q_ptr, p.q_row_stride, rows_valid,
                                                 p.head_dim, tid);
    {
      const int n0 = nb_begin * kBlockN;
      load_tile_async<kBlockN, kHeadDim, kThreads>(sK, k_ptr + n0 * p.k_row_stride,
                                                   p.k_row_stride, len_k - n0, p.head_dim, tid);
      load_tile_async<kBlockN, kHeadDim, kThreads>(sV, v_ptr + n0 * p.v_row_stride,
                                                   p.v_row_stride, len_k - n0, p.head_dim_v, tid);
      mma::cp_async_commit();
    }

    const bool has_mask = kGeneral && p.mask != nullptr;
    for (int nb = nb_begin; nb < nb_end; ++nb) {
      const int stage = (nb - nb_begin) & 1;
      const uint16_t* sKs = sK + stage * Kt::kSmemKV;
      const uint16_t* sVs = sV + stage * Kt::kSmemKV;
      const int n0 = nb * kBlockN;
      if (nb + 1 < nb_end) {
        // The other stage was last read in iteration nb-1, which ended with a barrier.
        const int n1 = n0 + kBlockN;
        load_tile_async<kBlockN, kHeadDim, kThreads>(sK + (stage ^ 1) * Kt::kSmemKV,
                                                     k_ptr + n1 * p.k_row_stride, p.k_row_stride,
                                                     len_k - n1, p.head_dim, tid);
        load_tile_async<kBlockN, kHeadDim, kThreads>(sV + (stage ^ 1) * Kt::kSmemKV,
                                                     v_ptr + n1 * p.v_row_stride, p.v_row_stride,
                                                     len_k - n1, p.head_dim_v, tid);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait<0>();
      }
      __syncthreads();

      // S = Q K^T for this warp's rows.
      float acc_s[kMTiles][kNTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks) {
        if (ks * 16 < p.head_dim) {
          uint32_t qa[kMTiles][4];
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma::ldmatrix<4>(qa[mt], smem_at<kHeadDim>(sQ, warp_row0 + mt * 16, lb_rc, ks));
          }
#pragma unroll
          for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t kb[4];
            mma::ldmatrix<4>(kb, smem_at<kHeadDim>(sKs, np * 16, lb_cr, ks));
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              mma::mma_m16n8k16<Tag>(acc_s[mt][2 * np], qa[mt], kb, acc_s[mt][2 * np]);
              mma::mma_m16n8k16<Tag>(acc_s[mt][2 * np + 1], qa[mt], kb + 2, acc_s[mt][2 * np + 1]);
            }
          }
        }
      }

      // Scaled scores, then the element-wise band / length / mask where this block needs it.
      const bool need_mask = has_mask || n0 + kBlockN > len_k ||
                             (p.window_right >= 0 && n0 + kBlockN - 1 > m0 + off + p.window_right) ||
                             (p.window_left >= 0 && n0 < m_last + off - p.window_left);
      if (!need_mask) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] *= p.scale;
          }
        }
      } else {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = m0 + warp_row0 + mt * 16 + quad_row + 8 * hf;
            const RowBand band = row_band(p, i, off, len_k);
            const bool row_in = i < p.len_q;
            const int64_t mask_row = static_cast<int64_t>(b) * p.mask_batch_stride +
                                     static_cast<int64_t>(h) * p.mask_head_stride +
                                     static_cast<int64_t>(i) * p.mask_row_stride;
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int j = n0 + nt * 8 + quad_col + e;
                float& s = acc_s[mt][nt][2 * hf + e];
                if (j >= band.lo && j <= band.hi) {
                  s *= p.scale;
                  if (has_mask && row_in) s += mask_value(p, mask_row, j);
                } else {
                  s = -INFINITY;
                }
              }
            }
          }
        }
      }

      // Online softmax: new running max, rescale the output rows, probabilities in place.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float mx = row_max[mt][hf];
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
            mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * hf], acc_s[mt][nt][2 * hf + 1]));
          }
          mx = quad_max(mx);
          // A row with nothing visible yet keeps max -inf; exp2(-inf - 0) = 0 keeps it empty.
          // The max is the largest score itself and every exponent is (s - max) * log2(e) <= 0,
          // exactly 0 for the max: folding log2(e) into the scale instead would overflow to
          // -inf for a finfo.min mask and to +inf for scores beyond FLT_MAX / log2(e).
          const float m_use = mx == -INFINITY ? 0.f : mx;
          const float alpha = exp2f((row_max[mt][hf] - m_use) * kLog2e);
          row_max[mt][hf] = mx;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& s = acc_s[mt][nt][2 * hf + e];
              s = exp2f((s - m_use) * kLog2e);
              sum += s;
            }
          }
          row_sum[mt][hf] = row_sum[mt][hf] * alpha + sum;
#pragma unroll
          for (int dt = 0; dt < kDTiles; ++dt) {
            acc_o[mt][dt][2 * hf] *= alpha;
            acc_o[mt][dt][2 * hf + 1] *= alpha;
          }
        }
      }

      // Dropout acts on the probabilities entering O only; row_sum (and lse) stay undropped.
      if (kGeneral && p.dropout) {
        const uint64_t keep = dropout_keep_bits<kMTiles, kNTiles>(
            p, b, h, m0 + warp_row0 + quad_row, n0 + quad_col);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                float& s = acc_s[mt][nt][2 * hf + e];
                const int bit = (((mt * 2 + hf) * kNTiles + nt) * 2 + e);
                s = (keep >> bit) & 1 ? s * p.dropout_rescale : 0.f;
              }
            }
          }
        }
      }

      // O += P V.
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks) {
        uint32_t pa[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          acc_to_a<Tag>(pa[mt], acc_s[mt][2 * ks], acc_s[mt][2 * ks + 1]);
        }
#pragma unroll
        for (int dp = 0; dp < kHeadDim / 16; ++dp) {
          if (dp * 16 < p.head_dim_v) {
            uint32_t vb[4];
            mma::ldmatrix<4, true>(vb, smem_at<kHeadDim>(sVs, ks * 16, lb_rc, dp));
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              mma::mma_m16n8k16<Tag>(acc_o[mt][2 * dp], pa[mt], vb, acc_o[mt][2 * dp]);
              mma::mma_m16n8k16<Tag>(acc_o[mt][2 * dp + 1], pa[mt], vb + 2, acc_o[mt][2 * dp + 1]);
            }
          }
        }
      }
      __syncthreads();
    }
  }

  // Epilogue: normalize, stage O in shared memory (the Q tile is no longer read), store.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float sum = quad_sum(row_sum[mt][hf]);
      const bool empty = sum == 0.f;
      const float inv = empty ? 0.f : 1.f / sum;
      const int r = warp_row0 + mt * 16 + quad_row + 8 * hf;
      if ((lane & 3) == 0 && r < rows_valid) {
        lse_ptr[r] = empty ? -INFINITY : row_max[mt][hf] + logf(sum);
      }
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const uint32_t packed =
            Elem<Tag>::pack(acc_o[mt][dt][2 * hf] * inv, acc_o[mt][dt][2 * hf + 1] * inv);
        *reinterpret_cast<uint32_t*>(reinterpret_cast<char*>(sQ) + Swz<kHeadDim>::offset(r, dt) +
                                    quad_col * 2) = packed;
      }
    }
  }
  __syncthreads();
  store_tile<kBlockM, kHeadDim, kThreads>(o_ptr, p.o_row_stride, sQ, rows_valid, p.head_dim_v,
                                          tid);
}

}  // namespace attn
}  // namespace seqkernels
