// KV cache kernels (torch-free): the append copy and split-K decode attention.
// Semantics: docs/INTERNALS.md ("KV cache"); launchers and validation: kv_cache.cu.
//
// Append. The copy is dtype-agnostic: each thread moves VEC_BYTES (16 when the head dims,
// strides and base pointers allow, else 8/4/2) of one K or V row to the slot its position maps
// to. A warp owns a row (its lanes walk the row's chunks, so it writes consecutive bytes) and a
// block eight rows; one launch covers the whole batch and both caches. A token whose position or
// block id is out of range is skipped. Index arithmetic is 32-bit with precomputed divisors: a
// 64-bit division per chunk would cost more than the copy.
//
// Decode attention. A CTA owns (sequence b, kv head, ROWS query rows, split). Rows are
// r = t * G + g (query token t, query head g of the group), so the K/V of the kv head are read
// once for all the query heads that share them. The CTA's 128 threads form groups of GS lanes;
// a group holds one key at a time, each lane a slice of EPT = HEAD / GS elements of the head
// dim (16-byte loads), so a dot product is EPT FMAs per lane plus a butterfly over the group.
// Each group keeps its own online softmax (q pre-scaled by scale; the running max is the largest
// score itself and every exponent (s - max) * log2 e is <= 0, so huge finite scores cannot
// overflow exp2 the way a max folded into log2 units does) over the
// keys grp, grp + NG, grp + 2 NG, ... of the CTA's range; at the end the NG group states are
// merged through shared memory. One split: the CTA writes out and lse; several: a float32
// partial output and lse per split, merged by _decode_merge_kernel.
//
//   key range of a CTA: rows' positions pos = len - Tq + t, visible keys
//   [max(0, pos_first - wl), min(len, pos_last + wr + 1)), cut into num_splits chunks.
//
// Score modifiers (kMods, a compile-time variant so the plain kernel keeps its registers):
// softcap and ALiBi rewrite each visible score (the diagonal of row t is its position); the sink
// joins a row's max and sum once, where the row's statistics are final: the CTA's epilogue for one
// split, _decode_merge_kernel after combining several (a sink merged per split would count
// num_splits times).
//
// Packed batches (cu_seqlens, docs/INTERNALS.md "Packed sequences"): the new rows and q are
// (1, H, total, D) views of token-major tensors and the spans are clamped into [0, total] as in
// seq_span. Append: each row finds its sequence by binary search over cu (packed_sequence).
// Decode: no padded B x max_Tq grid and no host sync; the grid covers ceil(G * total_q / ROWS) + B
// row tiles per kv head, each CTA finds its (sequence, tile) by binary search over tile_cu (the
// cumulative row tiles per sequence, built by the launcher with tensor ops on the device), and
// tiles past the last one return. out is (total_q, Hq, Dv) storage and rows in no sequence keep
// the launcher's 0 / -inf; the merge pass maps its rows back the same way.
//
// Shuffles are executed by every lane of every group on every iteration (a key that is out of
// range or has a bad block id loads nothing and is masked with -inf afterwards), so warp
// collectives never diverge. Masked values are selected away, never multiplied by 0.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../common/attention_math.h"
#include "../common/macros.h"
#include "elem.cuh"

#if !defined(SEQKERNELS_CUDA_EMULATION)
#include <math_constants.h>
#endif

namespace seqkernels {
namespace kv {

constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x * log2 e)

// ---------------------------------------------------------------------------------------------
// Shared helpers

// n / d and n % d for a divisor fixed at launch, without the ~40-instruction division routine
// (64-bit division is a longer subroutine still): q = (mulhi(n, m) + n) >> s with
// s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1 (Granlund and Montgomery), exact for all
// n < 2^32 and 1 <= d < 2^31.
struct FastDiv {
  uint32_t d, m, s;

  static FastDiv make(uint32_t divisor) {
    uint32_t sh = 0;
    while ((uint64_t{1} << sh) < divisor) ++sh;
    const uint64_t mul = ((uint64_t{1} << 32) * ((uint64_t{1} << sh) - divisor)) / divisor + 1;
    return {divisor, static_cast<uint32_t>(mul), sh};
  }
  SK_HOST_DEVICE SK_INLINE uint32_t div(uint32_t n) const {
    const uint64_t hi = (static_cast<uint64_t>(n) * m) >> 32;
    return static_cast<uint32_t>((hi + n) >> s);
  }
  SK_HOST_DEVICE SK_INLINE void divmod(uint32_t n, uint32_t* q, uint32_t* r) const {
    *q = div(n);
    *r = n - *q * d;
  }
};

// Where position p of sequence b lives: (index into dim 0, slot in dim 2); false when the
// position or its block id is out of range. The launcher guarantees capacity < 2^31.
struct CacheLayout {
  const int32_t* block_table;  // nullptr: contiguous cache
  int64_t capacity;            // S_max, or max_blocks * block_size
  FastDiv block_size;
  int64_t max_blocks;
  int64_t num_blocks;
};

SK_DEVICE SK_INLINE bool locate(const CacheLayout& L, int64_t b, int64_t p, int64_t* outer, int64_t* slot) {
  if (p < 0 || p >= L.capacity) return false;
  if (L.block_table == nullptr) {
    *outer = b;
    *slot = p;
    return true;
  }
  uint32_t col, within;
  L.block_size.divmod(static_cast<uint32_t>(p), &col, &within);
  const int64_t blk = L.block_table[b * L.max_blocks + col];
  if (blk < 0 || blk >= L.num_blocks) return false;
  *outer = blk;
  *slot = within;
  return true;
}

// Packed batches (cu_seqlens): the sequence b in [0, n) holding packed row `row`, with *start its
// first row; -1 when the row is in no sequence. Spans are clamped into [0, total] as seq_span does
// (common/attention_math.h), and b is the largest index whose clamped start is <= row (found by
// binary search; an empty sequence defers to the next one with the same start). Offsets the host
// did not check (decreasing, past total) give some b in [0, n) or -1, never an index outside.
SK_DEVICE SK_INLINE int64_t packed_sequence(const int32_t* cu, int64_t n, int64_t total, int64_t row, int64_t* start) {
  if (n <= 0) return -1;
  int64_t lo = 0, hi = n;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (clamp_index(cu[mid], 0, total) <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t q0 = clamp_index(cu[lo], 0, total), q1 = clamp_index(cu[lo + 1], q0, total);
  *start = q0;
  return row >= q0 && row < q1 ? lo : -1;
}

template <int BYTES>
struct Bytes;
template <>
struct Bytes<16> {
  using type = uint4;
};
template <>
struct Bytes<8> {
  using type = uint2;
};
template <>
struct Bytes<4> {
  using type = uint32_t;
};
template <>
struct Bytes<2> {
  using type = uint16_t;
};

// ---------------------------------------------------------------------------------------------
// Append

struct AppendParams {
  const char* k_new;
  const char* v_new;
  char* k_cache;
  char* v_cache;
  const int32_t* seqlens;
  CacheLayout layout;
  FastDiv T, H;   // to split a row index into (b, h, t)
  uint32_t rows;  // B * H * T (< 2^32, checked by the launcher)
  // Packed k_new/v_new ((1, H, total, D) views): cu (nseq + 1,) row offsets, T = total; nullptr:
  // padded (B, H, T, D).
  const int32_t* cu;
  int64_t nseq;
  uint32_t k_chunks;  // K row bytes / VEC_BYTES
  uint32_t chunks;    // (K + V row bytes) / VEC_BYTES
  // Strides in bytes over (b, h, t) for the new rows and (outer, h, slot) for the caches; the
  // last dim is contiguous.
  int64_t kn[3], vn[3], kc[3], vc[3];
};

// Block (32, kAppendRowsPerBlock): threadIdx.y picks the row, the x lanes walk its chunks, K first.
constexpr int kAppendRowsPerBlock = 8;

template <int VEC_BYTES>
__global__ void __launch_bounds__(256) _kv_cache_append_kernel(AppendParams p) {
  using V = typename Bytes<VEC_BYTES>::type;
  const uint32_t step = gridDim.x * kAppendRowsPerBlock;
  for (uint32_t row = blockIdx.x * kAppendRowsPerBlock + threadIdx.y; row < p.rows; row += step) {
    uint32_t bh, t, b, h;
    p.T.divmod(row, &bh, &t);
    p.H.divmod(bh, &b, &h);
    // The sequence and its token index: (b, t) padded; packed, row t of the one batch entry.
    int64_t seq = b, tok = t;
    if (p.cu != nullptr) {
      int64_t start = 0;
      seq = packed_sequence(p.cu, p.nseq, p.T.d, t, &start);
      if (seq < 0) continue;
      tok = t - start;
    }
    int64_t outer, slot;
    if (!locate(p.layout, seq, static_cast<int64_t>(p.seqlens[seq]) + tok, &outer, &slot)) continue;
    const V* ksrc = reinterpret_cast<const V*>(p.k_new + b * p.kn[0] + h * p.kn[1] + t * p.kn[2]);
    const V* vsrc = reinterpret_cast<const V*>(p.v_new + b * p.vn[0] + h * p.vn[1] + t * p.vn[2]);
    V* kdst = reinterpret_cast<V*>(p.k_cache + outer * p.kc[0] + h * p.kc[1] + slot * p.kc[2]);
    V* vdst = reinterpret_cast<V*>(p.v_cache + outer * p.vc[0] + h * p.vc[1] + slot * p.vc[2]);
    for (uint32_t c = threadIdx.x; c < p.chunks; c += blockDim.x) {
      if (c < p.k_chunks) {
        kdst[c] = ksrc[c];
      } else {
        vdst[c - p.k_chunks] = vsrc[c - p.k_chunks];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decode attention

// T is float, __half or __nv_bfloat16; every one computes in float (elem.cuh).
using elem::from_acc;
using elem::to_acc;

// Compile-time geometry of the decode kernel for element type T and head-dim bucket HEAD.
template <typename T, int HEAD>
struct DecodeGeometry {
  static constexpr int kThreads = 128;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));           // elements per 16-byte load
  static constexpr int kGroup = (HEAD / kVec) < 32 ? (HEAD / kVec) : 32;  // lanes per key
  static constexpr int kChunks = HEAD / (kGroup * kVec);                  // 16-byte loads per lane
  static constexpr int kEpt = kChunks * kVec;                             // elements per lane
  static constexpr int kGroups = kThreads / kGroup;                       // keys in flight per CTA
  static_assert(kGroup >= 1 && (kGroup & (kGroup - 1)) == 0, "group size must be a power of two");
  static_assert(kChunks * kGroup * kVec == HEAD, "HEAD must be a multiple of the group's span");
};

struct DecodeParams {
  const void* q;  // (B, Hq, Tq, D), head dim contiguous, read through q_stride
  const void* k_cache;
  const void* v_cache;
  const int32_t* seqlens;
  CacheLayout layout;
  void* out;           // (B, Hq, Tq, Dv), T, through o_stride      (num_splits == 1)
  float* lse;          // (B, Hq, Tq) float32, through l_stride      (num_splits == 1)
  float* out_partial;  // (num_splits, lse_rows, Dv) float32        (num_splits > 1)
  float* lse_partial;  // (num_splits, lse_rows) float32            (num_splits > 1)
  int64_t B, Hq, Hkv, G, Tq, D, Dv, n_rows;
  int64_t k_stride[3], v_stride[3];  // elements over (outer, kv head, slot)
  int64_t q_stride[3];               // elements over (b, hq, t); the head dim is contiguous
  int64_t o_stride[3];               // elements over (b, hq, t) of out; Dv contiguous
  int64_t l_stride[3];               // over (b, hq, t) of lse: a row's index among the lse_rows
  int64_t lse_rows;                  // lse.numel(): the partials' rows per split
  // Packed q ((1, Hq, total_q, D) view, B sequences): cu_q (B + 1,) row offsets, tile_cu (B + 1,)
  // cumulative row tiles per sequence (ceil(G * Tq_b / ROWS)); the grid is (Hkv * tiles, 1,
  // splits) and Tq, n_rows are per sequence. nullptr: padded, grid (B * Hkv, row tiles, splits).
  const int32_t* cu_q;
  const int64_t* tile_cu;
  int64_t total_q;
  float qk_scale;  // scale (q is pre-scaled by it)
  int64_t window_left, window_right;
  int64_t num_splits;
  bool vec_ok;  // 16-byte loads of K/V rows are aligned (D, Dv, strides, base pointers)
  // Score modifiers (common/attention_math.h ScoreMods), read by the kMods variant only.
  float softcap;       // > 0: s <- softcap * tanh(s / softcap); 0: off
  const float* alibi;  // (B, Hq) slopes, or nullptr
  const float* sinks;  // (Hq,) sink logits, or nullptr
};

// Elements [d0, d0 + VEC) of a row (0 past n): one 16-byte load when aligned and in range.
template <typename T, int VEC>
SK_DEVICE SK_INLINE void load_chunk(const T* row, int64_t d0, int64_t n, bool vec_ok, T out[VEC]) {
  if (vec_ok && d0 + VEC <= n) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + d0);
    memcpy(out, &raw, sizeof(raw));
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = (d0 + e < n) ? row[d0 + e] : from_acc<T>(0.0f);
  }
}

// The CTA's work: sequence b, its row tile, query count Tq and first packed row q0 (0 padded).
// Packed: the largest b with tile_cu[b] <= the CTA's tile (binary search); ok is false past the
// last tile. Called again for the epilogue, after the barrier, so that these values need no
// registers across the key loop (the wide float32 variants have none to spare).
struct DecodeTile {
  int64_t b, tile, Tq, q0;
  bool ok;
};

SK_DEVICE SK_INLINE DecodeTile decode_tile(const DecodeParams& p) {
  if (p.cu_q == nullptr) return {static_cast<int64_t>(blockIdx.x / p.Hkv), blockIdx.y, p.Tq, 0, true};
  int64_t tile = blockIdx.x / p.Hkv;
  if (tile >= p.tile_cu[p.B]) return {0, 0, 0, 0, false};
  int64_t lo = 0, hi = p.B;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (p.tile_cu[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  tile -= p.tile_cu[lo];
  const int64_t q0 = clamp_index(p.cu_q[lo], 0, p.total_q);
  return {lo, tile, clamp_index(p.cu_q[lo + 1], q0, p.total_q) - q0, q0, true};
}

// Keys each group holds per iteration: their K and V loads are all issued before the first use.
constexpr int kKeysPerGroup = 2;

template <typename T, int HEAD, int ROWS, bool kMods = false>
__global__ void __launch_bounds__(128) _decode_attention_kernel(DecodeParams p) {
  using Geo = DecodeGeometry<T, HEAD>;
  constexpr int VEC = Geo::kVec, GS = Geo::kGroup, NCH = Geo::kChunks, EPT = Geo::kEpt, NG = Geo::kGroups;
  const float kNegInf = -INFINITY;

  __shared__ float s_m[NG][ROWS];
  __shared__ float s_l[NG][ROWS];
  __shared__ float s_acc[NG][ROWS][HEAD];

  const int lane = threadIdx.x % GS;
  const int grp = threadIdx.x / GS;
  const int64_t hkv = blockIdx.x % p.Hkv;
  const int64_t split = blockIdx.z;
  const DecodeTile cta = decode_tile(p);
  if (!cta.ok) return;  // past the last tile of a packed batch: the whole CTA leaves
  const int64_t b = cta.b, Tq = cta.Tq, q0 = cta.q0;
  const int64_t n_rows = p.G * Tq;
  const int64_t r0 = cta.tile * ROWS;
  const int64_t r_last = (r0 + ROWS < n_rows ? r0 + ROWS : n_rows) - 1;

  int64_t len = p.seqlens[b];
  len = len < 0 ? 0 : (len > p.layout.capacity ? p.layout.capacity : len);

  // Keys visible to any row of the tile, then this split's chunk of them.
  int64_t hi = len;
  if (p.window_right >= 0) {
    const int64_t h2 = len - Tq + r_last / p.G + p.window_right + 1;
    hi = h2 < hi ? h2 : hi;
  }
  int64_t lo = 0;
  if (p.window_left >= 0) {
    const int64_t l2 = len - Tq + r0 / p.G - p.window_left;
    lo = l2 > 0 ? l2 : 0;
  }
  if (hi < lo) hi = lo;
  const int64_t chunk = (hi - lo + p.num_splits - 1) / p.num_splits;
  const int64_t k_lo = lo + split * chunk < hi ? lo + split * chunk : hi;
  const int64_t k_hi = k_lo + chunk < hi ? k_lo + chunk : hi;

  // This lane's slice of the query rows, pre-scaled; rows past n_rows are 0 and never stored.
  float q[ROWS][EPT];
  int64_t pos[ROWS];
  float slope[ROWS];  // ALiBi slopes of the rows (kMods only; dead code otherwise)
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t r = r0 + i;
    const bool ok = r < n_rows;
    const int64_t t = ok ? r / p.G : 0;
    const int64_t hq = hkv * p.G + (ok ? r % p.G : 0);
    pos[i] = len - Tq + t;
    slope[i] = kMods && p.alibi != nullptr ? p.alibi[b * p.Hq + hq] : 0.0f;
    const int64_t qb = p.cu_q != nullptr ? 0 : b;  // packed: the one batch entry of the view
    const T* qrow = static_cast<const T*>(p.q) + qb * p.q_stride[0] + hq * p.q_stride[1] + (q0 + t) * p.q_stride[2];
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int64_t d0 = static_cast<int64_t>(c) * GS * VEC + lane * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        q[i][c * VEC + e] = (ok && d0 + e < p.D) ? to_acc<T>(qrow[d0 + e]) * p.qk_scale : 0.0f;
    }
  }

  float m[ROWS], l[ROWS], acc[ROWS][EPT];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    m[i] = kNegInf;
    l[i] = 0.0f;
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[i][e] = 0.0f;
  }

  const T* kbase = static_cast<const T*>(p.k_cache) + hkv * p.k_stride[1];
  const T* vbase = static_cast<const T*>(p.v_cache) + hkv * p.v_stride[1];
  constexpr int U = kKeysPerGroup;
  for (int64_t base = k_lo; base < k_hi; base += NG * U) {
    int64_t j[U];
    bool key_ok[U];
    T kr[U][EPT], vr[U][EPT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      j[u] = base + u * NG + grp;
      int64_t outer = 0, slot = 0;
      key_ok[u] = j[u] < k_hi && locate(p.layout, b, j[u], &outer, &slot);
      if (key_ok[u]) {
        const T* krow = kbase + outer * p.k_stride[0] + slot * p.k_stride[2];
        const T* vrow = vbase + outer * p.v_stride[0] + slot * p.v_stride[2];
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
          const int64_t d0 = static_cast<int64_t>(c) * GS * VEC + lane * VEC;
          load_chunk<T, VEC>(krow, d0, p.D, p.vec_ok, kr[u] + c * VEC);
          load_chunk<T, VEC>(vrow, d0, p.Dv, p.vec_ok, vr[u] + c * VEC);
        }
      } else {
#pragma unroll
        for (int e = 0; e < EPT; ++e) {
          kr[u][e] = from_acc<T>(0.0f);
          vr[u][e] = from_acc<T>(0.0f);
        }
      }
    }
    float s[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[EPT];
#pragma unroll
      for (int e = 0; e < EPT; ++e) kf[e] = to_acc<T>(kr[u][e]);
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        float d = 0.0f;
#pragma unroll
        for (int e = 0; e < EPT; ++e) d = fmaf(q[i][e], kf[e], d);
#pragma unroll
        for (int off = GS / 2; off > 0; off /= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
        const bool visible = key_ok[u] && (p.window_left < 0 || j[u] >= pos[i] - p.window_left) &&
                             (p.window_right < 0 || j[u] <= pos[i] + p.window_right);
        if (kMods) {
          if (p.softcap > 0.0f) d = softcap_score(d, p.softcap);
          if (p.alibi != nullptr) d += alibi_bias(slope[i], pos[i], j[u]);
        }
        s[u][i] = visible ? d : kNegInf;
      }
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      float m_new = m[i];
      bool nan = false;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        m_new = fmaxf(m_new, s[u][i]);
        nan |= s[u][i] != s[u][i];
      }
      // Nothing visible to row i yet (uniform within the group). A NaN score goes on to make the
      // row NaN, as in the reference (fmaxf alone would drop it).
      if (m_new == kNegInf && !nan) continue;
      const float alpha = exp2f((m[i] - m_new) * kLog2e);
      float pr[U];
      l[i] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pr[u] = exp2f((s[u][i] - m_new) * kLog2e);
        l[i] += pr[u];
      }
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        float a = acc[i][e] * alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) a = fmaf(pr[u], to_acc<T>(vr[u][e]), a);
        acc[i][e] = a;
      }
      // A NaN row keeps a NaN max so that the merge below does not mistake it for an empty one.
      m[i] = nan ? __int_as_float(0x7fc00000) : m_new;
    }
  }

  // Merge the NG group states of the CTA.
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    if (lane == 0) {
      s_m[grp][i] = m[i];
      s_l[grp][i] = l[i];
    }
#pragma unroll
    for (int c = 0; c < NCH; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) s_acc[grp][i][c * GS * VEC + lane * VEC + e] = acc[i][c * VEC + e];
  }
  __syncthreads();
  const DecodeTile et = decode_tile(p);  // recomputed (see DecodeTile)
  const int64_t e_rows = p.G * et.Tq;

  // 32-bit index arithmetic: Dv <= 256, G and G * Tq < 2^31 (launcher checks).
  const int dv = static_cast<int>(p.Dv), G = static_cast<int>(p.G);
  for (int idx = threadIdx.x; idx < ROWS * dv; idx += blockDim.x) {
    const int i = idx / dv;
    const int d = idx - i * dv;
    const int64_t r = et.tile * ROWS + i;
    if (r >= e_rows) continue;
    float mx = kNegInf;
    bool nan = false;
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      mx = fmaxf(mx, s_m[g][i]);
      nan |= s_m[g][i] != s_m[g][i];
    }
    float total = 0.0f, o = 0.0f;
    if (nan) {
      total = o = __int_as_float(0x7fc00000);
    } else if (mx != kNegInf) {
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        if (s_m[g][i] == kNegInf) continue;
        const float w = exp2f((s_m[g][i] - mx) * kLog2e);
        total = fmaf(s_l[g][i], w, total);
        o = fmaf(s_acc[g][i][d], w, o);
      }
    }
    const int r32 = static_cast<int>(r), t = r32 / G;
    const int64_t hq = hkv * p.G + (r32 - t * G);
    const int64_t ob = p.cu_q != nullptr ? 0 : et.b, tg = et.q0 + t;
    const int64_t o_index = ob * p.o_stride[0] + hq * p.o_stride[1] + tg * p.o_stride[2];
    const int64_t l_index = ob * p.l_stride[0] + hq * p.l_stride[1] + tg * p.l_stride[2];
    // One split: the row is complete here, so the sink joins it now; with several, the merge does.
    if (kMods && p.sinks != nullptr && p.num_splits == 1) o *= merge_sink(p.sinks[hq], mx, total);
    const bool empty = !(total > 0.0f) && !(total != total);  // a NaN total stays NaN
    const float out = empty ? 0.0f : o / total;
    const float lse = empty ? kNegInf : mx + logf(total);
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[o_index + d] = from_acc<T>(out);
      if (d == 0) p.lse[l_index] = lse;
    } else {
      const int64_t prow = split * p.lse_rows + l_index;
      p.out_partial[prow * p.Dv + d] = out;
      if (d == 0) p.lse_partial[prow] = lse;
    }
  }
}

struct MergeParams {
  const float* out_partial;  // (num_splits, rows, Dv)
  const float* lse_partial;  // (num_splits, rows)
  void* out;                 // (rows, Dv) T
  float* lse;                // (rows,)
  int64_t rows, Dv, num_splits;
  const float* sinks;  // (Hq,) or nullptr: merged once, after the splits
  int64_t Hq, Tq;      // row = (b * Hq + h) * Tq + t (packed: B = 1, Tq = total_q)
  // Packed: out is (total_q, Hq, Dv) storage, so row (h, t) writes out[(t * Hq + h) * Dv]; a row
  // in no sequence of cu_q (B + 1,) is left alone (0 / -inf). nullptr: padded, out[row * Dv].
  const int32_t* cu_q;
  int64_t B;
};

// One warp per output row: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.
template <typename T>
__global__ void __launch_bounds__(128) _decode_merge_kernel(MergeParams p) {
  const float kNegInf = -INFINITY;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  // No early return: every lane takes part in the shuffles (active is uniform over the warp).
  bool active = row < p.rows;
  int64_t out_row = row;
  if (active && p.cu_q != nullptr) {
    const int64_t h = row / p.Tq, t = row - h * p.Tq;
    int64_t start = 0;
    active = packed_sequence(p.cu_q, p.B, p.Tq, t, &start) >= 0;
    out_row = t * p.Hq + h;
  }
  float mx = kNegInf;
  for (int64_t s = lane; active && s < p.num_splits; s += 32) mx = fmaxf(mx, p.lse_partial[s * p.rows + row]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float total = 0.0f;
  for (int64_t s = lane; active && s < p.num_splits; s += 32) {
    const float ls = p.lse_partial[s * p.rows + row];
    if (ls != kNegInf) total += expf(ls - mx);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);
  if (!active) return;
  const bool empty = mx == kNegInf && !(total != total);
  // The splits' weights are exp(ls - mx) / total; the sink adds to total and may raise the max,
  // which rescales them by its factor. A keyless row with a finite sink: out 0, lse = sink.
  float m = mx, l = total, factor = 1.0f;
  if (p.sinks != nullptr) factor = merge_sink(p.sinks[(row / p.Tq) % p.Hq], m, l);
  for (int64_t d = lane; d < p.Dv; d += 32) {
    float o = 0.0f;
    if (!empty) {
      for (int64_t s = 0; s < p.num_splits; ++s) {
        const float ls = p.lse_partial[s * p.rows + row];
        if (ls == kNegInf) continue;
        o = fmaf(expf(ls - mx) * factor / l, p.out_partial[(s * p.rows + row) * p.Dv + d], o);
      }
    }
    static_cast<T*>(p.out)[out_row * p.Dv + d] = from_acc<T>(o);
  }
  if (lane == 0) p.lse[row] = m == kNegInf && !(l != l) ? kNegInf : m + logf(l);
}

}  // namespace kv
}  // namespace seqkernels
