// Shared-memory tiles and mma fragments of the tensor-core kernels (torch-free).
//
// Layering: elem.cuh (element conversions) and mma.cuh (one PTX instruction each: mma.sync,
// ldmatrix, cp.async) -> this header (tiles: swizzle, async loads, coalesced stores; fragments:
// accumulator -> A operand, quad reductions; the warp-level products built from them) ->
// the kernels (attention_fwd.cuh, attention_bwd.cuh), which own their loop structure and math.
// Fragment layouts: mma.cuh.
#pragma once

#include <stdint.h>

#include "../common/macros.h"
#include "elem.cuh"
#include "mma.cuh"

namespace seqkernels {
namespace tile {

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
  static SK_DEVICE SK_INLINE int step(int lane_base, int s) { return (lane_base ^ ((s & 3) << 5)) + ((s >> 2) << 7); }
  // Lane patterns of the ldmatrix.x4 operands (see the operand table below).
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
  return reinterpret_cast<const char*>(tile) + row0 * Swz<kCols>::kRowBytes + Swz<kCols>::step(lane_base, step);
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

// How kThreads threads walk a kRows x kCols tile in 16-byte chunks: thread t takes chunk
// t % kChunks of rows t / kChunks + kRowStep * it, it < kIters.
template <int kRows, int kCols, int kThreads>
struct TileWalk {
  static constexpr int kChunks = kCols / 8;
  static_assert(kThreads % kChunks == 0, "threads cover whole rows");
  static constexpr int kRowStep = kThreads / kChunks;
  static constexpr int kIters = (kRows + kRowStep - 1) / kRowStep;
  // Whether a walked row r is inside the tile (only the last iteration can overhang).
  static SK_DEVICE SK_INLINE bool in_tile(int r) { return kRows % kRowStep == 0 || r < kRows; }
};

// Copies rows [0, rows_valid) x columns [0, cols_valid) of a kRows x kCols tile whose first row
// is `src` (row stride in elements) into shared memory; everything else is zero-filled, so
// padded head dims and rows past the end contribute nothing to the products.
template <int kRows, int kCols, int kThreads>
SK_DEVICE SK_INLINE void load_tile_async(uint16_t* smem, const uint16_t* src, int64_t row_stride, int rows_valid,
                                         int cols_valid, int tid) {
  using W = TileWalk<kRows, kCols, kThreads>;
  constexpr int kRowStep = W::kRowStep;
  const int c = tid % W::kChunks, r0 = tid / W::kChunks;
  const bool col_ok = c * 8 < cols_valid;
  const uint16_t* g = src + r0 * row_stride + c * 8;
  const int64_t g_step = kRowStep * row_stride;
  char* s = reinterpret_cast<char*>(smem);
  const int s0 = Swz<kCols>::offset(r0, c);
#pragma unroll
  for (int it = 0; it < W::kIters; ++it) {
    const int r = r0 + it * kRowStep;
    if (W::in_tile(r)) {
      const bool pred = col_ok && r < rows_valid;
      const int so = kRowStep % 8 == 0 ? s0 + it * kRowStep * Swz<kCols>::kRowBytes : Swz<kCols>::offset(r, c);
      mma::cp_async_16(s + so, pred ? g : src, pred);
    }
    g += g_step;
  }
}

// Writes rows [0, rows_valid) x columns [0, cols_valid) of a shared tile to global memory in
// 16-byte chunks (coalesced; the fragments were staged in shared memory for this).
template <int kRows, int kCols, int kThreads>
SK_DEVICE SK_INLINE void store_tile(uint16_t* dst, int64_t row_stride, const uint16_t* smem, int rows_valid,
                                    int cols_valid, int tid) {
  using W = TileWalk<kRows, kCols, kThreads>;
  const int c = tid % W::kChunks, r0 = tid / W::kChunks;
  if (c * 8 >= cols_valid) return;
  const char* s = reinterpret_cast<const char*>(smem);
#pragma unroll
  for (int it = 0; it < W::kIters; ++it) {
    const int r = r0 + it * W::kRowStep;
    if (W::in_tile(r) && r < rows_valid) {
      *reinterpret_cast<uint4*>(dst + r * row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(s + Swz<kCols>::offset(r, c));
    }
  }
}

// Stages one packed pair of a fragment (columns 8 * chunk + quad_col + {0, 1} of `row`) in a
// swizzled tile, on its way to store_tile.
template <int kCols>
SK_DEVICE SK_INLINE void stage_pair(uint16_t* tile, int row, int chunk, int quad_col, uint32_t packed) {
  *reinterpret_cast<uint32_t*>(reinterpret_cast<char*>(tile) + Swz<kCols>::offset(row, chunk) + quad_col * 2) = packed;
}

// ---------------------------------------------------------------------------------------------
// Fragments. An accumulator array acc[kM][kN][4] holds kM x kN tiles of 16 x 8 (C layout).

template <int kM, int kN>
SK_DEVICE SK_INLINE void zero_frags(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    }
  }
}

// Two accumulator n-tiles (16 x 8 each, adjacent in k) become one A fragment of the next
// product: the C layout of columns 0-7 / 8-15 is exactly the A layout of k 0-7 / 8-15.
template <typename Tag>
SK_DEVICE SK_INLINE void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  using E = elem::Elem<typename Tag::elem>;
  a[0] = E::pack2(c0[0], c0[1]);
  a[1] = E::pack2(c0[2], c0[3]);
  a[2] = E::pack2(c1[0], c1[1]);
  a[3] = E::pack2(c1[2], c1[3]);
}

// Reductions over the 4 lanes (one quad) that hold one row of a C fragment.
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
// Warp products: A in registers (kM 16-row fragments), B in a swizzled shared tile, each warp
// accumulating its own kM x kN fragment tiles. B is read one 16 x 16 block (an ldmatrix.x4,
// two n-tiles) at a time and used for every m-tile before the next is loaded.
//
// Register pressure decided two signatures (ptxas, every instantiation, sm_80 and sm_90): the
// n_valid bound is taken by reference, so that a param-struct field passed there is compared
// straight from the constant bank as in hand-written loops (by value it stayed in a register
// across the key loop: 5 more in the general forward kernel on sm_90); mma_sA_sBt's k_valid is
// taken by value (by reference cost 2 registers on sm_80).

// acc[mt][2 * np + {0, 1}] += a[mt] B: one 16 x 16 block of B (two n-tiles), the 16 rows from
// `row` and the 16 columns of step `step` of a swizzled tile:
//   kTransB == false: B = T^T, T (n x k) row-major (K in Q K^T): rows n, columns k
//                     (lane_base: lane_base_cr).
//   kTransB == true:  B = T, T (k x n) row-major (V in P V): rows k, columns n
//                     (lane_base: lane_base_rc).
// A caller that has the step at hand passes it whole: rebuilt as base / 16 + np instead, it cost
// the dK/dV kernel (head dim 256, sm_80) 6 more registers.
template <typename Tag, int kCols, bool kTransB, int kM, int kN>
SK_DEVICE SK_INLINE void mma_rA_sB_block(float (&acc)[kM][kN][4], const uint32_t (&a)[kM][4], const uint16_t* tile,
                                         int lane_base, int row, int step, int np) {
  uint32_t b[4];
  mma::ldmatrix<4, kTransB>(b, smem_at<kCols>(tile, row, lane_base, step));
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
    mma::mma_m16n8k16<Tag>(acc[mt][2 * np], a[mt], b, acc[mt][2 * np]);
    mma::mma_m16n8k16<Tag>(acc[mt][2 * np + 1], a[mt], b + 2, acc[mt][2 * np + 1]);
  }
}

// All of acc, block np being n-tiles 2 np, 2 np + 1: B rows row0 + 16 np at step step0 (not
// transposed), or rows row0 at step step0 + np (transposed). Blocks with np * 16 >= n_valid are
// skipped (a constant n_valid >= 8 kN compiles the bound away).
template <typename Tag, int kCols, bool kTransB, int kM, int kN>
SK_DEVICE SK_INLINE void mma_rA_sB(float (&acc)[kM][kN][4], const uint32_t (&a)[kM][4], const uint16_t* tile,
                                   int lane_base, int row0, int step0, const int& n_valid) {
  static_assert(kN % 2 == 0, "B is loaded as pairs of n-tiles");
#pragma unroll
  for (int np = 0; np < kN / 2; ++np) {
    if (np * 16 < n_valid) {
      mma_rA_sB_block<Tag, kCols, kTransB>(acc, a, tile, lane_base, kTransB ? row0 : row0 + np * 16,
                                           kTransB ? step0 + np : step0, np);
    }
  }
}

// acc += A T^T (S = Q K^T and its kin): A rows a_row0 + 16 mt of `sa`, T rows b_row0 + 8 nt of
// `sb`, both kCols wide with k along the columns; 16-column steps at or past k_valid (zero
// padding of the head dim) are skipped.
template <typename Tag, int kCols, int kM, int kN>
SK_DEVICE SK_INLINE void mma_sA_sBt(float (&acc)[kM][kN][4], const uint16_t* sa, int a_row0, const uint16_t* sb,
                                    int b_row0, int lb_rc, int lb_cr, int k_valid) {
#pragma unroll
  for (int ks = 0; ks < kCols / 16; ++ks) {
    if (ks * 16 < k_valid) {
      uint32_t a[kM][4];
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        mma::ldmatrix<4>(a[mt], smem_at<kCols>(sa, a_row0 + mt * 16, lb_rc, ks));
      }
      mma_rA_sB<Tag, kCols, false>(acc, a, sb, lb_cr, b_row0, ks, kN * 8);
    }
  }
}

// acc += P T (O += P V, dQ += dS K): P is the previous product's accumulators p[mt][kt] (its
// 8 kK columns are k), T (k x n) the first 8 kK rows of `sb`, kCols wide; n-tile pairs at or
// past n_valid are skipped.
template <typename Tag, int kCols, int kM, int kK, int kN>
SK_DEVICE SK_INLINE void mma_pA_sB(float (&acc)[kM][kN][4], const float (&p)[kM][kK][4], const uint16_t* sb, int lb_rc,
                                   const int& n_valid) {
  static_assert(kK % 2 == 0, "A fragments are pairs of accumulator n-tiles");
#pragma unroll
  for (int ks = 0; ks < kK / 2; ++ks) {
    uint32_t a[kM][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) acc_to_a<Tag>(a[mt], p[mt][2 * ks], p[mt][2 * ks + 1]);
    mma_rA_sB<Tag, kCols, true>(acc, a, sb, lb_rc, ks * 16, 0, n_valid);
  }
}

}  // namespace tile
}  // namespace seqkernels
