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
//
// Score modifiers (softcap, ALiBi, sinks; common/attention_math.h) are a compile-time variant
// (kMods) of the general kernel: the plain and general kernels keep their registers and speed.
// Softcap and ALiBi rewrite each scaled score before the mask; the sink joins the row's max and
// sum once, after the key loop (merge_sink), which is also what gives a keyless row lse = sink.
#pragma once

#include <math.h>
#include <stdint.h>

#include "../common/attention_math.h"
#include "../common/macros.h"
#include "../common/philox.h"
#include "attention_params.h"
#include "mma.cuh"
#include "tile.cuh"

namespace seqkernels {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;

// Tiles, fragments and the warp products: tile.cuh. Elem<Tag>: the conversions (elem.cuh) of
// the element type of a tag's format.
using tile::acc_to_a;
using tile::load_tile_async;
using tile::mma_pA_sB;
using tile::mma_rA_sB;
using tile::mma_rA_sB_block;
using tile::mma_sA_sBt;
using tile::quad_max;
using tile::quad_sum;
using tile::smem_at;
using tile::stage_pair;
using tile::store_tile;
using tile::Swz;
using tile::zero_frags;

template <typename Tag>
using Elem = elem::Elem<typename Tag::elem>;

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
  return p.mask.ptr[mask_row_offset + j * p.mask.col_stride];
}

// Softcap, then ALiBi, on one scaled score s of (row with diagonal `diag`, key j); `capped` gets
// the score after the cap (softcap_grad's argument in the backward). Only the kMods variants call
// this; the branches are uniform over the CTA.
SK_DEVICE SK_INLINE float modified_score(const AttentionParams& p, float s, float slope, int diag, int j,
                                         float& capped) {
  if (p.softcap > 0.f) s = softcap_score(s, p.softcap);
  capped = s;
  if (p.alibi != nullptr) s += alibi_bias(slope, diag, j);
  return s;
}

// The ALiBi slope of (b, h), 0 without ALiBi.
SK_DEVICE SK_INLINE float alibi_slope(const AttentionParams& p, int b, int h) {
  return p.alibi != nullptr ? p.alibi[static_cast<int64_t>(b) * p.heads_q + h] : 0.f;
}

// Keep bit of (sequence b, head h, row i, key j), local indices; i < lq and j < lk are the
// sequence's rows and keys (padded: Lq and Lk), others are dropped (their P is 0 anyway).
SK_DEVICE SK_INLINE bool dropout_keep_elem(const AttentionParams& p, int b, int h, int i, int j, int lq, int lk) {
  return i < lq && j < lk &&
         dropout_keep(p.seed, p.offset, p.dropout_threshold, b, h, p.drop_row0 + i, p.drop_col0 + j, p.heads_q,
                      p.drop_len_q, p.drop_len_k);
}

// Keep bits of the kMTiles x 2 x kNTiles x 2 accumulator elements a thread holds in an
// (m-tile, n-tile) fragment array, bit ((mt * 2 + hf) * kNTiles + nt) * 2 + e for row
// row0 + mt * 16 + 8 * hf, column col0 + nt * 8 + e. The loop is deliberately not unrolled:
// one inlined Philox instead of one per element keeps the kernels small (compile time) and
// the bits are applied by the unrolled code with constant shifts.
template <int kMTiles, int kNTiles>
SK_DEVICE SK_INLINE uint64_t dropout_keep_bits(const AttentionParams& p, int b, int h, int row0, int col0, int lq,
                                               int lk) {
  static_assert(kMTiles * kNTiles * 4 <= 64, "keep bits fit in 64");
  uint64_t bits = 0;
#pragma unroll 1
  for (int x = 0; x < kMTiles * kNTiles * 4; ++x) {
    const int e = x & 1, nt = (x >> 1) % kNTiles, r = (x >> 1) / kNTiles;  // r = mt * 2 + hf
    const int i = row0 + (r >> 1) * 16 + (r & 1) * 8;
    const int j = col0 + nt * 8 + e;
    bits |= static_cast<uint64_t>(dropout_keep_elem(p, b, h, i, j, lq, lk)) << x;
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
// The CTA layout shared by the forward and the deterministic dQ kernel (attention_bwd.cuh): one
// CTA per (query block, batch, query head), streaming the key blocks its rows can see through
// two shared-memory stages.

// Keys of sequence b: Lk, or kv_lengths[b] clamped to [0, Lk].
SK_DEVICE SK_INLINE int kv_len(const AttentionParams& p, int b) {
  return p.kv_lengths ? min(max(p.kv_lengths[b], 0), p.len_k) : p.len_k;
}

// ---------------------------------------------------------------------------------------------
// Sequences and the tile schedule, shared by every kernel. The padded form is the special case of
// sequence b = batch index b with q0 = k0 = 0; packed (attention_varlen), every sequence lives in
// batch 0 of the (1, H, total, D) views at its own rows, and all indices below are local to it.

struct SeqGeom {
  int b;       // the sequence: index of kv_lengths, ALiBi slopes and the dropout index
  int bm;      // its batch index in memory (0 when packed)
  int q0, lq;  // its query rows [q0, q0 + lq) of the tensors
  int k0, lk;  // its keys [k0, k0 + lk) (padded: Lk_b, kv_lengths applied)
};

SK_DEVICE SK_INLINE SeqGeom seq_geom(const AttentionParams& p, int b) {
  SeqGeom g;
  g.b = b;
  if (p.packed()) {
    const SeqSpan s = seq_span(p.cu_q, p.cu_k, b, p.len_q, p.len_k);
    g.bm = 0;
    g.q0 = static_cast<int>(s.q0);
    g.lq = static_cast<int>(s.lq);
    g.k0 = static_cast<int>(s.k0);
    g.lk = static_cast<int>(s.lk);
  } else {
    g.bm = b;
    g.q0 = 0;
    g.lq = p.len_q;
    g.k0 = 0;
    g.lk = kv_len(p, b);
  }
  return g;
}

struct SeqTile {
  SeqGeom s;
  int h;       // head (query or kv head: whichever the grid runs over)
  int tile;    // the tile within its sequence, in launch order
  bool valid;  // false: a spare block of a packed grid (past the last tile), which returns at once
};

// The (sequence, head, tile) of this CTA in a grid over `heads` heads and tiles of kTile rows
// along the queries (kAlongQ) or the keys. Padded: blockIdx.x = (b * heads + h) * tiles + tile,
// tiles covering the padded length. Packed: blockIdx.x = h * tile_bound + t, and t is found in the
// cumulative tile counts: sequence b with tile_offsets[b] <= t < tile_offsets[b + 1] (binary
// search; empty sequences own no tile). The grid is sized by an upper bound of the tile count
// (no host sync), so blocks with t >= tile_offsets[num_seqs] have nothing to do.
template <int kTile, bool kAlongQ>
SK_DEVICE SK_INLINE SeqTile locate_tile(const AttentionParams& p, int heads) {
  SeqTile st;
  if (!p.packed()) {
    const int len = kAlongQ ? p.len_q : p.len_k;
    const int tiles = (len + kTile - 1) / kTile;
    st.tile = static_cast<int>(blockIdx.x % tiles);
    const int bh = static_cast<int>(blockIdx.x / tiles);
    st.h = bh % heads;
    st.s = seq_geom(p, bh / heads);
    st.valid = true;
    return st;
  }
  const int t = static_cast<int>(blockIdx.x % p.tile_bound);
  st.h = static_cast<int>(blockIdx.x / p.tile_bound);
  int lo = 0, hi = p.num_seqs;  // tile_offsets[lo] <= t < tile_offsets[hi]
  st.tile = 0;
  st.valid = t < p.tile_offsets[hi];
  if (!st.valid) return st;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (p.tile_offsets[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  st.tile = t - p.tile_offsets[lo];
  st.s = seq_geom(p, lo);
  st.valid = st.tile * kTile < (kAlongQ ? st.s.lq : st.s.lk);
  return st;
}

struct QueryBlock {
  int b, bm, h, hk;            // sequence, its memory batch, query head, its kv head
  int q0, lq, k0;              // the sequence's first row and rows, its first key
  int len_k, off;              // Lk_b and the band offset (Lk_b - Lq_b when bottom_right)
  int m0, rows_valid, m_last;  // the block's first row, rows in range, last row in range (local)
  int nb_begin, nb_end;        // the key blocks any of its rows can see
  bool valid;                  // false: nothing to do (a spare block of a packed grid)
};

template <int kBlockM, int kBlockN>
SK_DEVICE SK_INLINE QueryBlock query_block(const AttentionParams& p) {
  QueryBlock qb;
  const SeqTile st = locate_tile<kBlockM, true>(p, p.heads_q);
  qb.valid = st.valid;
  if (!st.valid) return qb;
  const SeqGeom& g = st.s;
  // Heavier (later) query blocks first: with a causal band they see the most keys.
  const int num_m_blocks = (g.lq + kBlockM - 1) / kBlockM;
  const int m_block = num_m_blocks - 1 - st.tile;
  const int h = st.h;
  const int hk = h / (p.heads_q / p.heads_kv);
  qb.b = g.b;
  qb.bm = g.bm;
  qb.h = h;
  qb.hk = hk;
  qb.q0 = g.q0;
  qb.lq = g.lq;
  qb.k0 = g.k0;

  qb.len_k = g.lk;
  qb.off = p.bottom_right ? qb.len_k - g.lq : 0;
  qb.m0 = m_block * kBlockM;
  qb.rows_valid = min(kBlockM, g.lq - qb.m0);
  qb.m_last = qb.m0 + qb.rows_valid - 1;

  // Keys any row of this block can see.
  int n_begin = 0, n_end = qb.len_k;
  if (p.window_left >= 0) n_begin = max(0, qb.m0 + qb.off - p.window_left);
  if (p.window_right >= 0) n_end = min(n_end, qb.m_last + qb.off + p.window_right + 1);
  qb.nb_begin = n_begin / kBlockN;
  qb.nb_end = n_end > n_begin ? (n_end + kBlockN - 1) / kBlockN : qb.nb_begin;
  return qb;
}

// K and V of one kv head streamed through two shared-memory stages of kBlockN rows each.
template <typename Kt>
struct KvStages {
  uint16_t* sK;       // [2][kBlockN][kHeadDim]
  uint16_t* sV;       // [2][kBlockN][kHeadDim]
  const uint16_t* k;  // row 0 of the kv head
  const uint16_t* v;
  int len_k;

  SK_DEVICE SK_INLINE const uint16_t* k_stage(int stage) const { return sK + stage * Kt::kSmemKV; }
  SK_DEVICE SK_INLINE const uint16_t* v_stage(int stage) const { return sV + stage * Kt::kSmemKV; }

  // Starts the copy of key block nb into `stage`; rows at or past len_k become zeros.
  SK_DEVICE SK_INLINE void load(const AttentionParams& p, int stage, int nb, int tid) const {
    const int n0 = nb * Kt::kBlockN;
    load_tile_async<Kt::kBlockN, Kt::kHeadDim, Kt::kThreads>(sK + stage * Kt::kSmemKV, k + n0 * p.k.row_stride,
                                                             p.k.row_stride, len_k - n0, p.head_dim, tid);
    load_tile_async<Kt::kBlockN, Kt::kHeadDim, Kt::kThreads>(sV + stage * Kt::kSmemKV, v + n0 * p.v.row_stride,
                                                             p.v.row_stride, len_k - n0, p.head_dim_v, tid);
  }

  // Top of iteration nb (in stage `stage`) of the loop over [nb_begin, nb_end): prefetches block
  // nb + 1 into the other stage, which was last read in iteration nb - 1 (it ended with a
  // barrier), then waits until block nb has landed and is visible to the whole CTA.
  SK_DEVICE SK_INLINE void next(const AttentionParams& p, int nb, int nb_end, int stage, int tid) const {
    if (nb + 1 < nb_end) {
      load(p, stage ^ 1, nb + 1, tid);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
  }
};

// ---------------------------------------------------------------------------------------------

// kGeneral adds attn_mask and dropout; the plain variant handles everything else (band,
// kv_lengths, GQA) with fewer live registers, so it can afford the larger tiles. kMods (only with
// kGeneral, in its tiles) adds the score modifiers.
template <typename Tag, typename Kt, bool kGeneral, bool kMods = false>
__global__ void __launch_bounds__(Kt::kThreads, 1) _attention_fwd_kernel(const AttentionParams p) {
  constexpr int kHeadDim = Kt::kHeadDim, kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN;
  constexpr int kMTiles = Kt::kMTiles, kNTiles = Kt::kNTiles, kDTiles = Kt::kDTiles;
  constexpr int kThreads = Kt::kThreads;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + Kt::kSmemQ;       // [2][kBlockN][kHeadDim]
  uint16_t* sV = sK + 2 * Kt::kSmemKV;  // [2][kBlockN][kHeadDim]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int quad_row = lane >> 2, quad_col = 2 * (lane & 3);

  const QueryBlock qb = query_block<kBlockM, kBlockN>(p);
  if (!qb.valid) return;  // uniform over the CTA, before any barrier
  const int b = qb.b, h = qb.h, len_k = qb.len_k, off = qb.off, lq = qb.lq;
  const int m0 = qb.m0, rows_valid = qb.rows_valid, m_last = qb.m_last;
  const int nb_begin = qb.nb_begin, nb_end = qb.nb_end;
  const KvStages<Kt> kv{sK, sV, p.k.at(qb.bm, qb.hk, qb.k0), p.v.at(qb.bm, qb.hk, qb.k0), len_k};

  const uint16_t* q_ptr = p.q.at(qb.bm, h, qb.q0 + m0);
  uint16_t* o_ptr = p.out.at(qb.bm, h, qb.q0 + m0);
  float* lse_ptr = p.lse + (static_cast<int64_t>(qb.bm) * p.heads_q + h) * p.len_q + qb.q0 + m0;

  // Row indices (within the block) owned by this thread: [mt][half].
  const int warp_row0 = warp * 16 * kMTiles;
  const int lb_rc = Swz<kHeadDim>::lane_base_rc(lane), lb_cr = Swz<kHeadDim>::lane_base_cr(lane);

  float acc_o[kMTiles][kDTiles][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];
  zero_frags(acc_o);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_max[mt][hf] = -INFINITY;
      row_sum[mt][hf] = 0.f;
    }
  }

  if (nb_begin < nb_end) {
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, q_ptr, p.q.row_stride, rows_valid, p.head_dim, tid);
    kv.load(p, 0, nb_begin, tid);
    mma::cp_async_commit();

    const bool has_mask = kGeneral && p.mask.ptr != nullptr;
    const float slope = kMods ? alibi_slope(p, b, h) : 0.f;
    for (int nb = nb_begin; nb < nb_end; ++nb) {
      const int stage = (nb - nb_begin) & 1;
      const uint16_t* sKs = kv.k_stage(stage);
      const uint16_t* sVs = kv.v_stage(stage);
      const int n0 = nb * kBlockN;
      kv.next(p, nb, nb_end, stage, tid);

      // S = Q K^T for this warp's rows.
      float acc_s[kMTiles][kNTiles][4];
      zero_frags(acc_s);
      mma_sA_sBt<Tag, kHeadDim>(acc_s, sQ, warp_row0, sKs, 0, lb_rc, lb_cr, p.head_dim);

      // Scaled scores, then the element-wise band / length / mask where this block needs it.
      // Modified scores all go through the element-wise path (ALiBi depends on i and j).
      const bool need_mask = kMods || has_mask || n0 + kBlockN > len_k ||
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
            const bool row_in = i < lq;
            const int64_t mask_row = p.mask.row(b, h, i);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int j = n0 + nt * 8 + quad_col + e;
                float& s = acc_s[mt][nt][2 * hf + e];
                if (j >= band.lo && j <= band.hi) {
                  s *= p.scale;
                  if (kMods) {
                    float capped;
                    s = modified_score(p, s, slope, i + off, j, capped);
                  }
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
        const uint64_t keep =
            dropout_keep_bits<kMTiles, kNTiles>(p, b, h, m0 + warp_row0 + quad_row, n0 + quad_col, lq, len_k);
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
      mma_pA_sB<Tag, kHeadDim>(acc_o, acc_s, sVs, lb_rc, p.head_dim_v);
      __syncthreads();
    }
  }

  // Epilogue: normalize, stage O in shared memory (the Q tile is no longer read), store.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float m = row_max[mt][hf], sum = quad_sum(row_sum[mt][hf]);
      // The sink joins max and sum once; its factor rescales what the keys accumulated.
      const float sink_factor = kMods && p.sinks != nullptr ? merge_sink(p.sinks[h], m, sum) : 1.f;
      const bool empty = sum == 0.f;
      const float inv = empty ? 0.f : sink_factor / sum;
      const int r = warp_row0 + mt * 16 + quad_row + 8 * hf;
      if ((lane & 3) == 0 && r < rows_valid) {
        lse_ptr[r] = empty ? -INFINITY : m + logf(sum);
      }
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        stage_pair<kHeadDim>(sQ, r, dt, quad_col,
                             Elem<Tag>::pack2(acc_o[mt][dt][2 * hf] * inv, acc_o[mt][dt][2 * hf + 1] * inv));
      }
    }
  }
  __syncthreads();
  store_tile<kBlockM, kHeadDim, kThreads>(o_ptr, p.out.row_stride, sQ, rows_valid, p.head_dim_v, tid);
}

}  // namespace attn
}  // namespace seqkernels
