// FlashAttention-2-style backward kernels for float16 / bfloat16 on sm_80+ (torch-free).
//
// Recomputing backward: P is rebuilt from q, k and the forward's lse instead of being stored.
//   1. _attention_bwd_preprocess_kernel: delta_i = sum_d dO_id * O_id (= sum_j P_ij dP_ij).
//   2. _attention_bwd_dkdv_kernel: one CTA per (key block, kv head, batch); it keeps K, V of
//      its kBlockN keys in shared memory and dK, dV in registers while it walks the query
//      blocks of every query head of its GQA group (so dK / dV are summed over the group
//      without copies or atomics, and written once):
//        S^T = K Q^T, P^T = exp2((S^T * scale - lse) * log2 e)          (phase A, keys x queries)
//        dP^T = V dO^T, dS^T = P^T o (dP^T - delta)
//        dV += P^T dO, dK += dS^T Q                                     (phase B, keys x dims)
//        dQ += dS K  with float32 atomics into dq_accum                 (phase C, queries x dims,
//                                                                        only when not deterministic)
//      P^T and dS^T pass through shared memory between the phases, whose warp layouts differ.
//   3. _attention_bwd_dq_kernel (deterministic): one CTA per query block, the forward's loop
//      structure, dQ = sum over key blocks of dS K in registers; no atomics.
//   4. _attention_bwd_dq_convert_kernel: dq_accum (float32) -> dq in the input dtype.
// With dropout, dV uses the dropped, rescaled P and dP is masked and rescaled the same way;
// delta = rowsum(dO o O) already is the dropped product. Rows that see no key have lse = -inf;
// they are given +inf here so that every P of theirs is exp2(-inf) = 0 and all gradients 0.
//
// Score modifiers (kMods variants of the dK/dV and dQ kernels): P is rebuilt from the same
// modified scores, and the lse already holds the sink, so P needs nothing else. Softcap scales dS
// by softcap_grad of the capped score before dS meets q or k; ALiBi has no gradient. The sink's
// gradient is -sum over rows of p_sink * delta: the preprocess kernel writes each row's term and
// the launcher sums them (dsink_rows).
#pragma once

#include "../common/attention_math.h"
#include "attention_fwd.cuh"

namespace seqkernels {
namespace attn {

// The saved (natural-log) lse as the shift of P = exp2((s - lse) * log2 e). Rows that saw no key
// (lse -inf) get +inf so all their P are 0. Kept in the natural domain for the reason the forward
// keeps its max there: lse * log2(e) overflows for rows whose scores sit near finfo.min.
SK_DEVICE SK_INLINE float lse_shift(float lse) { return lse == -INFINITY ? INFINITY : lse; }

// Whether key j is visible from query i by band and length (attn_mask aside).
SK_DEVICE SK_INLINE bool band_visible(const AttentionParams& p, int i, int j, int off, int len_k) {
  return j < len_k && (p.window_left < 0 || j >= i + off - p.window_left) &&
         (p.window_right < 0 || j <= i + off + p.window_right);
}

// Whether a kBlockM x kBlockN tile (queries from m0, keys from n0) needs element-wise masking.
SK_DEVICE SK_INLINE bool tile_needs_mask(const AttentionParams& p, bool has_mask, int m0, int m_rows, int n0,
                                         int n_cols, int off, int len_k) {
  return has_mask || n0 + n_cols > len_k || (p.window_left >= 0 && n0 - (m0 + m_rows - 1) < off - p.window_left) ||
         (p.window_right >= 0 && n0 + n_cols - 1 - m0 > off + p.window_right);
}

// ---------------------------------------------------------------------------------------------
// 1. delta = rowsum(dO * O), float32 (B, Hq, Lq). One warp per row, 8 elements per lane.
//    Also the per-row shift of P (row_shift, row_log2l; see AttentionBwdParams): a float32 lse
//    past lse_needs_recompute (common/attention_math.h) may have lost log(l) to rounding (all of
//    it for rows that only see keys masked with a constant like finfo.min, l being the count of
//    tied scores), and P = exp(s - lse) would be wrong by up to a factor l. Such rows (none in
//    ordinary use) get their max and log2(l) recomputed here from the scores, one warp per row.

// Packed: the sequence holding row i of the (1, H, total, D) views, by binary search of
// cu_seqlens_q (the last sequence starting at or before i; clamped like seq_span). With unchecked
// values that need not hold i: the caller tests i against the span it returns.
SK_DEVICE SK_INLINE SeqGeom row_sequence(const AttentionParams& p, int i) {
  int lo = 0, hi = p.num_seqs;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (clamp_index(p.cu_q[mid], 0, p.len_q) <= i) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  if (p.num_seqs == 0) {
    SeqGeom g;
    g.b = g.bm = g.q0 = g.lq = g.k0 = g.lk = 0;
    return g;
  }
  return seq_geom(p, lo);
}

template <typename Tag>
SK_DEVICE SK_INLINE void exact_row_stats(const AttentionBwdParams& p, const SeqGeom& g, int h, int i, int lane,
                                         float& shift, float& log2l) {
  const int b = g.b;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int len_k = g.lk;
  const int off = p.bottom_right ? len_k - g.lq : 0;
  const uint16_t* q = p.q.at(g.bm, h, g.q0 + i);
  const uint16_t* k = p.k.at(g.bm, hk, g.k0);
  const int64_t mask_row = p.mask.row(b, h, i);
  const bool mods = p.mods_any();
  const float slope = alibi_slope(p, b, h);
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j < len_k; ++j) {
    if (!band_visible(p, i, j, off, len_k)) continue;
    const uint16_t* kr = k + static_cast<int64_t>(j) * p.k.row_stride;
    float d = 0.f;
    for (int c = lane; c < p.head_dim; c += 32) d += Elem<Tag>::from_bits(q[c]) * Elem<Tag>::from_bits(kr[c]);
#pragma unroll
    for (int s = 16; s >= 1; s /= 2) d += __shfl_xor_sync(0xffffffffu, d, s);
    float sv = d * p.scale;
    if (mods) {
      float capped;
      sv = modified_score(p, sv, slope, i + off, j, capped);
    }
    if (p.mask.ptr) sv += mask_value(p, mask_row, j);
    if (sv == -INFINITY) continue;
    const float m_new = fmaxf(m, sv);
    l = l * exp2f((m - m_new) * kLog2e) + exp2f((sv - m_new) * kLog2e);
    m = m_new;
  }
  // The saved lse includes the sink, so the recomputed statistics must too.
  if (p.sinks != nullptr) merge_sink(p.sinks[h], m, l);
  shift = m == -INFINITY ? INFINITY : m;
  log2l = m == -INFINITY ? 0.f : log2f(l);
}

template <typename Tag>
__global__ void __launch_bounds__(128) _attention_bwd_preprocess_kernel(const AttentionBwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q;
  if (row >= rows) return;  // whole warps: no barrier follows
  const int i = static_cast<int>(row % p.len_q);
  const int64_t bh = row / p.len_q;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  // The row's sequence and its index there (padded: batch b, row i).
  SeqGeom g;
  int li = i;
  if (p.packed()) {
    g = row_sequence(p, i);
    li = i - g.q0;
    if (li < 0 || li >= g.lq) {  // a row in no sequence (unchecked cu_seqlens): no gradient
      if (lane == 0) {
        p.delta[row] = 0.f;
        p.row_shift[row] = INFINITY;
        p.row_log2l[row] = 0.f;
        if (p.dsink_rows != nullptr) p.dsink_rows[row] = 0.f;
      }
      return;  // whole warps: no barrier follows
    }
  } else {
    g = seq_geom(p, b);
  }
  const uint16_t* o = p.out.at(b, h, i);
  const uint16_t* d = p.dout.at(b, h, i);
  float acc = 0.f;
  for (int c = lane; c * 8 < p.head_dim_v; c += 32) {
    const uint4 ov = *reinterpret_cast<const uint4*>(o + c * 8);
    const uint4 dv = *reinterpret_cast<const uint4*>(d + c * 8);
    const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w};
    const uint32_t dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      acc += Elem<Tag>::from_bits(static_cast<uint16_t>(ow[w])) * Elem<Tag>::from_bits(static_cast<uint16_t>(dw[w]));
      acc += Elem<Tag>::from_bits(static_cast<uint16_t>(ow[w] >> 16)) *
             Elem<Tag>::from_bits(static_cast<uint16_t>(dw[w] >> 16));
    }
  }
#pragma unroll
  for (int s = 16; s >= 1; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  const float lse = p.lse[row];
  float shift = lse_shift(lse), log2l = 0.f;
  if (lse_needs_recompute(lse)) {
    exact_row_stats<Tag>(p, g, h, li, lane, shift, log2l);
  }
  if (lane == 0) {
    p.delta[row] = acc;
    p.row_shift[row] = shift;
    p.row_log2l[row] = log2l;
    if (p.dsink_rows != nullptr) {
      // p_sink = exp(sink - lse) from the exact row statistics; 0 for a -inf sink and for rows
      // whose shift is +inf (lse -inf: nothing, not even a sink, in the softmax).
      const float sink = p.sinks[h];
      const float p_sink = sink == -INFINITY ? 0.f : exp2f(fmaf(sink - shift, kLog2e, -log2l));
      p.dsink_rows[row] = -p_sink * acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2. dK, dV (and atomic dQ).

template <int kHeadDim_, int kBlockN_, int kBlockM_, int kNWarps_, int kStages_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kBlockM = kBlockM_;  // queries per step
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kStages = kStages_;  // Q / dO buffers (2: prefetch the next step)
  static constexpr int kThreads = 32 * kNWarps;
  // Phase A (S^T, dP^T: keys x queries): warps kAWarpsN x kAWarpsM.
  static constexpr int kAWarpsN = kBlockN / 16 < kNWarps ? kBlockN / 16 : kNWarps;
  static constexpr int kAWarpsM = kNWarps / kAWarpsN;
  static constexpr int kAMTiles = kBlockN / (16 * kAWarpsN);
  static constexpr int kAQueries = kBlockM / kAWarpsM;
  static constexpr int kANTiles = kAQueries / 8;
  // Phase B (dK, dV: keys x dims): warps kBWarpsN x kBWarpsD.
  static constexpr int kBWarpsN = kAWarpsN;
  static constexpr int kBWarpsD = kNWarps / kBWarpsN;
  static constexpr int kBMTiles = kAMTiles;
  static constexpr int kBDims = kHeadDim / kBWarpsD;
  static constexpr int kBDTiles = kBDims / 8;
  // Phase C (dQ: queries x dims): warps kCWarpsM x kCWarpsD, kCChunk dims at a time (its
  // accumulators are live beside dK / dV, hence the smaller chunk for the widest tile).
  static constexpr int kCWarpsM = kBlockM / 16 < kNWarps ? kBlockM / 16 : kNWarps;
  static constexpr int kCWarpsD = kNWarps / kCWarpsM;
  static constexpr int kCMTiles = kBlockM / (16 * kCWarpsM);
  static constexpr int kCDims = kHeadDim / kCWarpsD;
  static constexpr int kCChunk = kCDims < 64 ? kCDims : (kHeadDim >= 256 ? 32 : 64);
  // Shared memory (16-bit elements, then floats).
  static constexpr int kSmemKV = kBlockN * kHeadDim;
  static constexpr int kSmemQ = kBlockM * kHeadDim;
  static constexpr int kSmemP = kBlockN * kBlockM;
  static constexpr int kSmemElems = 2 * kSmemKV + 2 * kStages * kSmemQ + 2 * kSmemP;
  static constexpr int kSmemBytes = 2 * kSmemElems + 4 * 3 * kStages * kBlockM;  // + lse, delta, log2 l

  static_assert(kAWarpsN * kAWarpsM == kNWarps && kANTiles % 2 == 0, "phase A layout");
  static_assert(kBDims % 16 == 0 && kCDims % kCChunk == 0 && kCChunk % 16 == 0, "phase B/C layout");
  static_assert(kCWarpsM * kCWarpsD == kNWarps && kCMTiles >= 1, "phase C layout");
  static_assert(kBlockM % 64 == 0, "P^T / dS^T tiles are at least 64 queries wide");
};

template <int kHeadDim>
struct BwdConfig;
template <>
struct BwdConfig<64> {
  using type = BwdTraits<64, 128, 64, 8, 2>;
};
template <>
struct BwdConfig<128> {
  using type = BwdTraits<128, 64, 64, 8, 2>;
};
template <>
struct BwdConfig<256> {
  using type = BwdTraits<256, 64, 64, 8, 1>;
};

// attn_mask and dropout are runtime switches here (one variant per dtype and tile); the score
// modifiers are the compile-time kMods.
template <typename Tag, typename Bt, bool kMods = false>
__global__ void __launch_bounds__(Bt::kThreads, 1) _attention_bwd_dkdv_kernel(const AttentionBwdParams p) {
  constexpr int kHeadDim = Bt::kHeadDim, kBlockN = Bt::kBlockN, kBlockM = Bt::kBlockM;
  constexpr int kThreads = Bt::kThreads, kStages = Bt::kStages;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + Bt::kSmemKV;
  uint16_t* sQ = sV + Bt::kSmemKV;                           // [kStages][kBlockM][kHeadDim]
  uint16_t* sdO = sQ + kStages * Bt::kSmemQ;                 // [kStages][kBlockM][kHeadDim]
  uint16_t* sP = sdO + kStages * Bt::kSmemQ;                 // P^T (dropped), [kBlockN][kBlockM]
  uint16_t* sdS = sP + Bt::kSmemP;                           // dS^T, [kBlockN][kBlockM]
  float* sLse = reinterpret_cast<float*>(sdS + Bt::kSmemP);  // [kStages][kBlockM], row shift
  float* sDelta = sLse + kStages * kBlockM;                  // [kStages][kBlockM]
  float* sLog2l = sDelta + kStages * kBlockM;                // [kStages][kBlockM]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int quad_row = lane >> 2, quad_col = 2 * (lane & 3);
  const int lb_rc_d = Swz<kHeadDim>::lane_base_rc(lane), lb_cr_d = Swz<kHeadDim>::lane_base_cr(lane);
  const int lb_rc_m = Swz<kBlockM>::lane_base_rc(lane), lb_cr_m = Swz<kBlockM>::lane_base_cr(lane);

  const SeqTile st = locate_tile<kBlockN, false>(p, p.heads_kv);
  if (!st.valid) return;  // uniform over the CTA, before any barrier
  const int b = st.s.b, bm = st.s.bm, hk = st.h, n_block = st.tile;
  const int q0 = st.s.q0, lq = st.s.lq;
  const int group = p.heads_q / p.heads_kv;

  const int len_k = st.s.lk;
  const int off = p.bottom_right ? len_k - lq : 0;
  const int n0 = n_block * kBlockN;
  const int keys_valid = min(kBlockN, len_k - n0);  // may be <= 0: all keys padding

  // Queries that see at least one key of this block.
  int i_begin = 0, i_end = lq;
  if (keys_valid <= 0) {
    i_end = 0;
  } else {
    const int n_last = n0 + keys_valid - 1;
    if (p.window_right >= 0) i_begin = max(0, n0 - off - p.window_right);
    if (p.window_left >= 0) i_end = min(i_end, n_last - off + p.window_left + 1);
  }
  const int mb_begin = i_begin / kBlockM;
  const int num_mb = i_end > i_begin ? (i_end + kBlockM - 1) / kBlockM - mb_begin : 0;
  const int total = num_mb * group;

  const uint16_t* k_ptr = p.k.at(bm, hk, st.s.k0 + n0);
  const uint16_t* v_ptr = p.v.at(bm, hk, st.s.k0 + n0);

  // Phase layouts.
  const int a_key0 = (warp % Bt::kAWarpsN) * 16 * Bt::kAMTiles;
  const int a_q0 = (warp / Bt::kAWarpsN) * Bt::kAQueries;
  const int b_key0 = (warp % Bt::kBWarpsN) * 16 * Bt::kBMTiles;
  const int b_d0 = (warp / Bt::kBWarpsN) * Bt::kBDims;
  const int c_q0 = (warp % Bt::kCWarpsM) * 16 * Bt::kCMTiles;
  const int c_d0 = (warp / Bt::kCWarpsM) * Bt::kCDims;

  float acc_dk[Bt::kBMTiles][Bt::kBDTiles][4], acc_dv[Bt::kBMTiles][Bt::kBDTiles][4];
  zero_frags(acc_dk);
  zero_frags(acc_dv);

  // Issues the loads of step t (query head h = hk * group + t / num_mb, block mb) into `stage`.
  auto issue_step = [&](int t, int stage) {
    const int h = hk * group + t / num_mb;
    const int m0 = (mb_begin + t % num_mb) * kBlockM;
    const int rows = min(kBlockM, lq - m0);
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ + stage * Bt::kSmemQ, p.q.at(bm, h, q0 + m0), p.q.row_stride, rows,
                                                 p.head_dim, tid);
    load_tile_async<kBlockM, kHeadDim, kThreads>(sdO + stage * Bt::kSmemQ, p.dout.at(bm, h, q0 + m0), p.dout.row_stride,
                                                 rows, p.head_dim_v, tid);
    for (int r = tid; r < kBlockM; r += kThreads) {
      const int64_t row = (static_cast<int64_t>(bm) * p.heads_q + h) * p.len_q + q0 + m0 + r;
      // Rows past Lq get lse +inf (P = 0), like rows that see nothing.
      sLse[stage * kBlockM + r] = r < rows ? p.row_shift[row] : INFINITY;
      sDelta[stage * kBlockM + r] = r < rows ? p.delta[row] : 0.f;
      sLog2l[stage * kBlockM + r] = r < rows ? p.row_log2l[row] : 0.f;
    }
  };

  if (total > 0) {
    load_tile_async<kBlockN, kHeadDim, kThreads>(sK, k_ptr, p.k.row_stride, keys_valid, p.head_dim, tid);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sV, v_ptr, p.v.row_stride, keys_valid, p.head_dim_v, tid);
    if (kStages == 2) {
      issue_step(0, 0);
    }
    mma::cp_async_commit();

    const bool has_mask = p.mask.ptr != nullptr;
    for (int t = 0; t < total; ++t) {
      const int stage = kStages == 2 ? (t & 1) : 0;
      if (kStages == 2) {
        // The other stage was last read in step t-1, which ended with a barrier.
        if (t + 1 < total) {
          issue_step(t + 1, stage ^ 1);
          mma::cp_async_commit();
          mma::cp_async_wait<1>();
        } else {
          mma::cp_async_wait<0>();
        }
      } else {
        issue_step(t, 0);
        mma::cp_async_commit();
        mma::cp_async_wait<0>();
      }
      __syncthreads();

      const int h = hk * group + t / num_mb;
      const int m0 = (mb_begin + t % num_mb) * kBlockM;
      const uint16_t* sQs = sQ + stage * Bt::kSmemQ;
      const uint16_t* sdOs = sdO + stage * Bt::kSmemQ;
      const float* sLs = sLse + stage * kBlockM;
      const float* sDs = sDelta + stage * kBlockM;
      const float* sL2 = sLog2l + stage * kBlockM;

      // ---- Phase A: S^T = K Q^T and dP^T = V dO^T for this warp's keys x queries.
      {
        float s[Bt::kAMTiles][Bt::kANTiles][4], dp[Bt::kAMTiles][Bt::kANTiles][4];
        zero_frags(s);
        zero_frags(dp);
        mma_sA_sBt<Tag, kHeadDim>(s, sK, a_key0, sQs, a_q0, lb_rc_d, lb_cr_d, p.head_dim);
        mma_sA_sBt<Tag, kHeadDim>(dp, sV, a_key0, sdOs, a_q0, lb_rc_d, lb_cr_d, p.head_dim_v);

        // P^T, dS^T element-wise; both go to shared memory for phases B and C. The fragment
        // rows are keys and the columns queries, so the keep bits are generated transposed.
        const bool need_mask = tile_needs_mask(p, has_mask, m0, kBlockM, n0, kBlockN, off, len_k);
        const float slope = kMods ? alibi_slope(p, b, h) : 0.f;
        uint64_t keep = ~uint64_t(0);
        if (p.dropout) {
          keep = 0;
#pragma unroll 1
          for (int x = 0; x < Bt::kAMTiles * Bt::kANTiles * 4; ++x) {
            const int e = x & 1, nt = (x >> 1) % Bt::kANTiles, r = (x >> 1) / Bt::kANTiles;
            const int j = n0 + a_key0 + (r >> 1) * 16 + (r & 1) * 8 + quad_row;
            const int i = m0 + a_q0 + nt * 8 + quad_col + e;
            keep |= static_cast<uint64_t>(dropout_keep_elem(p, b, h, i, j, lq, len_k)) << x;
          }
        }
#pragma unroll
        for (int mt = 0; mt < Bt::kAMTiles; ++mt) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int r = a_key0 + mt * 16 + quad_row + 8 * hf;  // key within the block
            const int j = n0 + r;
#pragma unroll
            for (int nt = 0; nt < Bt::kANTiles; ++nt) {
              float pv[2], dsv[2];
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int c = a_q0 + nt * 8 + quad_col + e;  // query within the block
                const int i = m0 + c;
                float sv = s[mt][nt][2 * hf + e] * p.scale;
                float dcap = 1.f;  // d capped / d s
                if (kMods) {
                  float capped;
                  sv = modified_score(p, sv, slope, i + off, j, capped);
                  if (p.softcap > 0.f) dcap = softcap_grad(capped, p.softcap);
                }
                if (need_mask) {
                  if (!band_visible(p, i, j, off, len_k)) {
                    sv = -INFINITY;
                  } else if (has_mask && i < lq) {
                    sv += mask_value(p, p.mask.row(b, h, i), j);
                  }
                }
                const float prob = exp2f(fmaf(sv - sLs[c], kLog2e, -sL2[c]));
                const bool kept = (keep >> ((((mt * 2 + hf) * Bt::kANTiles + nt) * 2) + e)) & 1;
                const float rescale = p.dropout ? p.dropout_rescale : 1.f;
                pv[e] = kept ? prob * rescale : 0.f;
                dsv[e] = prob * ((kept ? dp[mt][nt][2 * hf + e] * rescale : 0.f) - sDs[c]);
                if (kMods) dsv[e] *= dcap;
              }
              const int chunk = (a_q0 + nt * 8) >> 3;
              stage_pair<kBlockM>(sP, r, chunk, quad_col, Elem<Tag>::pack2(pv[0], pv[1]));
              stage_pair<kBlockM>(sdS, r, chunk, quad_col, Elem<Tag>::pack2(dsv[0], dsv[1]));
            }
          }
        }
      }
      __syncthreads();

      // ---- Phase B: dV += P^T dO, dK += dS^T Q for this warp's keys x dims.
#pragma unroll
      for (int ks = 0; ks < kBlockM / 16; ++ks) {
        uint32_t pa[Bt::kBMTiles][4], dsa[Bt::kBMTiles][4];
#pragma unroll
        for (int mt = 0; mt < Bt::kBMTiles; ++mt) {
          mma::ldmatrix<4>(pa[mt], smem_at<kBlockM>(sP, b_key0 + mt * 16, lb_rc_m, ks));
          mma::ldmatrix<4>(dsa[mt], smem_at<kBlockM>(sdS, b_key0 + mt * 16, lb_rc_m, ks));
        }
        // dV and dK block by block (rather than all of dV first), which keeps the widest tile's
        // registers below the limit.
#pragma unroll
        for (int dp = 0; dp < Bt::kBDims / 16; ++dp) {
          const int d = b_d0 + dp * 16;
          if (d < p.head_dim_v) {
            mma_rA_sB_block<Tag, kHeadDim, true>(acc_dv, pa, sdOs, lb_rc_d, ks * 16, d / 16, dp);
          }
          if (d < p.head_dim) {
            mma_rA_sB_block<Tag, kHeadDim, true>(acc_dk, dsa, sQs, lb_rc_d, ks * 16, d / 16, dp);
          }
        }
      }

      // ---- Phase C: dQ += scale * dS K, accumulated across key blocks with float atomics.
      if (p.dq_accum != nullptr) {
        float* dq_rows =
            p.dq_accum + ((static_cast<int64_t>(bm) * p.heads_q + h) * p.len_q + q0 + m0) * p.dq_accum_row_stride;
#pragma unroll
        for (int chunk = 0; chunk < Bt::kCDims / Bt::kCChunk; ++chunk) {
          const int d_base = c_d0 + chunk * Bt::kCChunk;
          if (d_base < p.head_dim) {
            float acc[Bt::kCMTiles][Bt::kCChunk / 8][4];
            zero_frags(acc);
#pragma unroll
            for (int ks = 0; ks < kBlockN / 16; ++ks) {
              uint32_t dsa[Bt::kCMTiles][4];
#pragma unroll
              for (int mt = 0; mt < Bt::kCMTiles; ++mt) {
                mma::ldmatrix<4, true>(dsa[mt], smem_at<kBlockM>(sdS, ks * 16, lb_cr_m, (c_q0 + mt * 16) / 16));
              }
              mma_rA_sB<Tag, kHeadDim, true>(acc, dsa, sK, lb_rc_d, ks * 16, d_base / 16,
                                             static_cast<int>(Bt::kCChunk));  // a value, not a reference to the member
            }
#pragma unroll
            for (int mt = 0; mt < Bt::kCMTiles; ++mt) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int r = c_q0 + mt * 16 + quad_row + 8 * (e >> 1);
                if (m0 + r < lq) {
#pragma unroll
                  for (int nt = 0; nt < Bt::kCChunk / 8; ++nt) {
                    const int d = d_base + nt * 8 + quad_col + (e & 1);
                    if (d < p.head_dim) {
                      atomicAdd(dq_rows + static_cast<int64_t>(r) * p.dq_accum_row_stride + d,
                                acc[mt][nt][e] * p.scale);
                    }
                  }
                }
              }
            }
          }
        }
      }
      __syncthreads();
    }
  }

  // Epilogue: dK (times scale) and dV staged in the K / V tiles, then stored.
#pragma unroll
  for (int mt = 0; mt < Bt::kBMTiles; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = b_key0 + mt * 16 + quad_row + 8 * hf;
#pragma unroll
      for (int dt = 0; dt < Bt::kBDTiles; ++dt) {
        const int chunk = (b_d0 >> 3) + dt;
        stage_pair<kHeadDim>(sK, r, chunk, quad_col,
                             Elem<Tag>::pack2(acc_dk[mt][dt][2 * hf] * p.scale, acc_dk[mt][dt][2 * hf + 1] * p.scale));
        stage_pair<kHeadDim>(sV, r, chunk, quad_col,
                             Elem<Tag>::pack2(acc_dv[mt][dt][2 * hf], acc_dv[mt][dt][2 * hf + 1]));
      }
    }
  }
  __syncthreads();
  // Padded: every key row up to Lk (zeros past Lk_b); packed: the sequence's keys.
  const int rows_out = min(kBlockN, (p.packed() ? len_k : p.len_k) - n0);
  const int k_row = st.s.k0 + n0;
  store_tile<kBlockN, kHeadDim, kThreads>(p.dk.at(bm, hk, k_row), p.dk.row_stride, sK, rows_out, p.head_dim, tid);
  store_tile<kBlockN, kHeadDim, kThreads>(p.dv.at(bm, hk, k_row), p.dv.row_stride, sV, rows_out, p.head_dim_v, tid);
}

// ---------------------------------------------------------------------------------------------
// 3. Deterministic dQ: the forward's structure (each warp owns 16 * kMTiles query rows, K and V
// blocks double buffered), dQ accumulated in registers.

// The forward's tiles, with a dO tile beside Q (Q is reused to stage dQ).
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct DqTraits : FwdTraits<kHeadDim_, kBlockM_, kBlockN_, kNWarps_> {
  using Base = FwdTraits<kHeadDim_, kBlockM_, kBlockN_, kNWarps_>;
  static constexpr int kSmemBytes = 2 * (2 * Base::kSmemQ + 4 * Base::kSmemKV);
};

template <int kHeadDim>
struct DqConfig;
template <>
struct DqConfig<64> {
  using type = DqTraits<64, 64, 64, 4>;
};
template <>
struct DqConfig<128> {
  using type = DqTraits<128, 64, 64, 4>;
};
template <>
struct DqConfig<256> {
  using type = DqTraits<256, 64, 32, 4>;
};

template <typename Tag, typename Kt, bool kMods = false>
__global__ void __launch_bounds__(Kt::kThreads, 1) _attention_bwd_dq_kernel(const AttentionBwdParams p) {
  constexpr int kHeadDim = Kt::kHeadDim, kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN;
  constexpr int kMTiles = Kt::kMTiles, kNTiles = Kt::kNTiles, kDTiles = Kt::kDTiles;
  constexpr int kThreads = Kt::kThreads;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sdO = sQ + Kt::kSmemQ;
  uint16_t* sK = sdO + Kt::kSmemQ;      // [2][kBlockN][kHeadDim]
  uint16_t* sV = sK + 2 * Kt::kSmemKV;  // [2][kBlockN][kHeadDim]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int quad_row = lane >> 2, quad_col = 2 * (lane & 3);
  const int lb_rc = Swz<kHeadDim>::lane_base_rc(lane), lb_cr = Swz<kHeadDim>::lane_base_cr(lane);

  const QueryBlock qb = query_block<kBlockM, kBlockN>(p);
  if (!qb.valid) return;  // uniform over the CTA, before any barrier
  const int b = qb.b, bm = qb.bm, h = qb.h, len_k = qb.len_k, off = qb.off, lq = qb.lq, q0 = qb.q0;
  const int m0 = qb.m0, rows_valid = qb.rows_valid;
  const int nb_begin = qb.nb_begin, nb_end = qb.nb_end;
  const KvStages<Kt> kv{sK, sV, p.k.at(bm, qb.hk, qb.k0), p.v.at(bm, qb.hk, qb.k0), len_k};
  const int warp_row0 = warp * 16 * kMTiles;

  // Per-row shift of P (+inf for rows that see nothing or do not exist), its log2(l) and delta.
  float row_lse[kMTiles][2], row_log2l[kMTiles][2], row_delta[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = m0 + warp_row0 + mt * 16 + quad_row + 8 * hf;
      const int64_t row = (static_cast<int64_t>(bm) * p.heads_q + h) * p.len_q + q0 + i;
      row_lse[mt][hf] = i < lq ? p.row_shift[row] : INFINITY;
      row_log2l[mt][hf] = i < lq ? p.row_log2l[row] : 0.f;
      row_delta[mt][hf] = i < lq ? p.delta[row] : 0.f;
    }
  }

  float acc_dq[kMTiles][kDTiles][4];
  zero_frags(acc_dq);

  if (nb_begin < nb_end) {
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, p.q.at(bm, h, q0 + m0), p.q.row_stride, rows_valid, p.head_dim,
                                                 tid);
    load_tile_async<kBlockM, kHeadDim, kThreads>(sdO, p.dout.at(bm, h, q0 + m0), p.dout.row_stride, rows_valid,
                                                 p.head_dim_v, tid);
    kv.load(p, 0, nb_begin, tid);
    mma::cp_async_commit();

    const bool has_mask = p.mask.ptr != nullptr;
    const float slope = kMods ? alibi_slope(p, b, h) : 0.f;
    for (int nb = nb_begin; nb < nb_end; ++nb) {
      const int stage = (nb - nb_begin) & 1;
      const uint16_t* sKs = kv.k_stage(stage);
      const uint16_t* sVs = kv.v_stage(stage);
      const int n0 = nb * kBlockN;
      kv.next(p, nb, nb_end, stage, tid);

      float s[kMTiles][kNTiles][4], dp[kMTiles][kNTiles][4];
      zero_frags(s);
      zero_frags(dp);
      // S = Q K^T, dP = dO V^T.
      mma_sA_sBt<Tag, kHeadDim>(s, sQ, warp_row0, sKs, 0, lb_rc, lb_cr, p.head_dim);
      mma_sA_sBt<Tag, kHeadDim>(dp, sdO, warp_row0, sVs, 0, lb_rc, lb_cr, p.head_dim_v);

      // dS = P o (dP - delta), in place of s.
      const bool need_mask = tile_needs_mask(p, has_mask, m0, rows_valid, n0, kBlockN, off, len_k);
      const uint64_t keep =
          p.dropout ? dropout_keep_bits<kMTiles, kNTiles>(p, b, h, m0 + warp_row0 + quad_row, n0 + quad_col, lq, len_k)
                    : ~uint64_t(0);
      const float rescale = p.dropout ? p.dropout_rescale : 1.f;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = m0 + warp_row0 + mt * 16 + quad_row + 8 * hf;
          const int64_t mask_row = p.mask.row(b, h, i);
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = n0 + nt * 8 + quad_col + e;
              float sv = s[mt][nt][2 * hf + e] * p.scale;
              float dcap = 1.f;  // d capped / d s
              if (kMods) {
                float capped;
                sv = modified_score(p, sv, slope, i + off, j, capped);
                if (p.softcap > 0.f) dcap = softcap_grad(capped, p.softcap);
              }
              if (need_mask) {
                if (!band_visible(p, i, j, off, len_k)) {
                  sv = -INFINITY;
                } else if (has_mask && i < lq) {
                  sv += mask_value(p, mask_row, j);
                }
              }
              const float prob = exp2f(fmaf(sv - row_lse[mt][hf], kLog2e, -row_log2l[mt][hf]));
              const bool kept = (keep >> (((mt * 2 + hf) * kNTiles + nt) * 2 + e)) & 1;
              const float dpv = kept ? dp[mt][nt][2 * hf + e] * rescale : 0.f;
              s[mt][nt][2 * hf + e] = prob * (dpv - row_delta[mt][hf]);
              if (kMods) s[mt][nt][2 * hf + e] *= dcap;
            }
          }
        }
      }

      // dQ += dS K.
      mma_pA_sB<Tag, kHeadDim>(acc_dq, s, sKs, lb_rc, p.head_dim);
      __syncthreads();
    }
  }

  // Epilogue: dQ * scale staged in the Q tile, then stored.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = warp_row0 + mt * 16 + quad_row + 8 * hf;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        stage_pair<kHeadDim>(sQ, r, dt, quad_col,
                             Elem<Tag>::pack2(acc_dq[mt][dt][2 * hf] * p.scale, acc_dq[mt][dt][2 * hf + 1] * p.scale));
      }
    }
  }
  __syncthreads();
  store_tile<kBlockM, kHeadDim, kThreads>(p.dq.at(bm, h, q0 + m0), p.dq.row_stride, sQ, rows_valid, p.head_dim, tid);
}

// ---------------------------------------------------------------------------------------------
// 4. dq_accum (float32, already scaled) -> dq. 8 elements per thread.

template <typename Tag>
__global__ void __launch_bounds__(256) _attention_bwd_dq_convert_kernel(const AttentionBwdParams p) {
  const int chunks = p.head_dim / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q * chunks;
  if (idx >= total) return;
  const int c = static_cast<int>(idx % chunks);
  const int64_t row = idx / chunks;
  const int i = static_cast<int>(row % p.len_q);
  const int64_t bh = row / p.len_q;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  const float* src = p.dq_accum + row * p.dq_accum_row_stride + c * 8;
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) w[k] = Elem<Tag>::pack2(src[2 * k], src[2 * k + 1]);
  *reinterpret_cast<uint4*>(p.dq.at(b, h, i) + c * 8) = make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace attn
}  // namespace seqkernels
