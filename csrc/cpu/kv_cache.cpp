// KV cache on the CPU: seqkernels::kv_cache_append and seqkernels::decode_attention
// (semantics in docs/INTERNALS.md, DESIGN §2).
//
// Append: one task per (b, h, t) row, a memcpy of the K row and of the V row to the slot the
// position maps to (contiguous or through the block table), offsets in int64. A token whose
// position or block id is out of range is skipped: host validation is the public layer's job.
//
// Packed form (cu_seqlens): the same, with sequence b's rows cu_seqlens[b]..cu_seqlens[b+1] of the
// token-major k_new (one task per (token, head) row; its sequence from a host map of the spans).
//
// Decode attention: one work unit per (b, kv head, row tile, split). The rows of a unit are the
// (query token t, query head g) pairs of one KV head's group, r = t * G + g, so every K/V tile is
// read once for all query heads that share it, and a tile of consecutive rows covers a
// contiguous range of query positions (a prefill chunk skips the keys past its last row).
// Sequence b has its own Tq_b (all Tq in the padded form; its span of cu_seqlens_q in the packed
// one, chunked prefill) and so its own ceil(G * Tq_b / kRowTile) row tiles, none when empty: no
// padded work. The units are taken from a shared counter, sequences most work first, the units
// of one (sequence, kv head) back to back (they share its K/V). Each
// unit walks its share of the visible keys in tiles of kKeyTile: scores, mask, online softmax,
// P @ V. The scores, the running max m and lse stay in the natural-log domain (q is pre-scaled by
// scale only) and each term is exp2((s - m) * log2(e)), subtraction first: the argument is <= 0,
// exactly 0 for the max element, for any finite scores. Pre-scaling q by scale * log2(e) instead
// overflows for scores beyond FLT_MAX / log2(e) (docs/DESIGN.md §9).
// With several splits the units write a float partial output and the partial (max, sum) pair,
// merged exactly by a second pass.
//
// Tiles of many rows (chunked prefill) take the AVX-512 scores from the key tile transposed in
// registers (K^T rows times broadcast q elements, no horizontal sums); few rows (decode steps)
// take dot products of q and K rows.
// The tile primitives have three implementations: AVX-512 (F/BW/VL/DQ) and AVX2+FMA+F16C
// intrinsics in functions with a target attribute (for float32 accumulation, and for float64 on
// the attention kernels' float64 policies), the highest one the call may use chosen per call by
// cpu/simd.h's has() (the extension is compiled for the baseline ISA, where at::vec is plain
// scalar code), and a portable one on at::vec.
// SEQKERNELS_CPU_ISA=portable|avx2|avx512|native lowers the choice ("default" is the older
// spelling of portable), as for attention and the LSTM cell (tests/test_cpu_isa.py covers each
// level this CPU has).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/attention_math.h"
#include "common/host_checks.h"
#include "cpu/paths.h"
#include "cpu/simd.h"

namespace seqkernels {
namespace cpu {
namespace {

constexpr int kKeyTile = 64;
constexpr int kRowTile = 64;

// ---------------------------------------------------------------------------------------------
// Argument checks: common/host_checks.h, shared with the CUDA launchers (the public layer has
// already normalized; these guard direct calls of torch.ops.seqkernels.*).

// Positions per sequence, block size (0 for a contiguous cache), max_blocks, num_blocks.
using Layout = host::CacheGeometry;

// Where position p of sequence b lives, as (index into dim 0, slot in dim 2); false when the
// position or its block id is out of range (the token is skipped / the key is masked).
struct Slot {
  int64_t outer;
  int64_t slot;
};

inline bool locate(const Layout& L, const int32_t* table, int64_t b, int64_t p, Slot* out) {
  if (p < 0 || p >= L.capacity) return false;
  if (L.block_size == 0) {
    *out = {b, p};
    return true;
  }
  const int64_t col = p / L.block_size;
  const int64_t blk = table[b * L.max_blocks + col];
  if (blk < 0 || blk >= L.num_blocks) return false;
  *out = {blk, p % L.block_size};
  return true;
}

// ---------------------------------------------------------------------------------------------
// Append

template <typename T>
inline void copy_row(T* dst, const T* src, int64_t n, int64_t src_stride) {
  if (src_stride == 1 || n == 1) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * src_stride];
  }
}

void kv_cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                         const at::Tensor& v_new, const at::Tensor& cache_seqlens,
                         const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cu_seqlens) {
  constexpr const char* op = "seqkernels::kv_cache_append (cpu)";
  host::check_cache(k_cache, v_cache, host::kCpu);
  host::check_new_rows(k_new, v_new, k_cache, v_cache, host::kCpu);
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  // Packed: k_new, v_new are (1, Hkv, total, D) views and B is the number of sequences.
  const int64_t B = packed ? cache_seqlens.numel() : k_new.size(0);
  const int64_t H = k_new.size(1), T = k_new.size(2), D = k_new.size(3);
  const int64_t Dv = v_cache.size(3);
  const Layout L = host::check_layout(k_cache, block_table, B, host::kCpu);
  host::check_seqlens(cache_seqlens, B, host::kCpu);
  const int32_t* cu = host::check_kv_packed(cu_seqlens, k_new, B, T, host::kCpu, "cu_seqlens", op);
  if (B == 0 || H == 0 || T == 0) return;

  // Per token row of the packed form: its sequence (-1: none) and index in it, from the clamped spans.
  std::vector<int32_t> tok_seq, tok_t;
  if (packed) {
    tok_seq.assign(T, -1);
    tok_t.assign(T, 0);
    for (int64_t b = 0; b < B; ++b) {
      const SeqSpan sp = seq_span(cu, cu, b, T, T);
      for (int64_t i = sp.q0; i < sp.q0 + sp.lq; ++i) {
        tok_seq[i] = static_cast<int32_t>(b);
        tok_t[i] = static_cast<int32_t>(i - sp.q0);
      }
    }
  }

  const int32_t* lens = cache_seqlens.data_ptr<int32_t>();
  const int32_t* table = block_table.has_value() ? block_table->data_ptr<int32_t>() : nullptr;
  const int64_t rows = (packed ? 1 : B) * H * T;
  const int64_t row_bytes = (D + Dv) * k_cache.element_size();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "kv_cache_append_cpu", [&] {
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    const scalar_t* kn = k_new.const_data_ptr<scalar_t>();
    const scalar_t* vn = v_new.const_data_ptr<scalar_t>();
    const int64_t kc0 = k_cache.stride(0), kc1 = k_cache.stride(1), kc2 = k_cache.stride(2);
    const int64_t vc0 = v_cache.stride(0), vc1 = v_cache.stride(1), vc2 = v_cache.stride(2);
    const int64_t kn0 = k_new.stride(0), kn1 = k_new.stride(1), kn2 = k_new.stride(2), kn3 = k_new.stride(3);
    const int64_t vn0 = v_new.stride(0), vn1 = v_new.stride(1), vn2 = v_new.stride(2), vn3 = v_new.stride(3);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        // Packed rows go token-major (the storage order of the token-major k_new); padded (b, h, t).
        int64_t b, h, t, i;
        if (packed) {
          i = r / H;
          h = r % H;
          b = tok_seq[i];
          if (b < 0) continue;
          t = tok_t[i];
        } else {
          t = r % T;
          h = (r / T) % H;
          b = r / (T * H);
          i = t;
        }
        Slot s;
        if (!locate(L, table, b, static_cast<int64_t>(lens[b]) + t, &s)) continue;
        const int64_t src_b = packed ? 0 : b;
        copy_row(kc + s.outer * kc0 + h * kc1 + s.slot * kc2, kn + src_b * kn0 + h * kn1 + i * kn2, D, kn3);
        copy_row(vc + s.outer * vc0 + h * vc1 + s.slot * vc2, vn + src_b * vn0 + h * vn1 + i * vn2, Dv, vn3);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Decode attention: tile primitives.
//
// scores(q, M, D, krows, n, S):    S[m][i] = dot(q[m], krows[i]) for m < M, i < n
// softmax_pv(S, M, n, vrows, ...): online softmax update of (mrow, lrow, acc) with the masked
//                                  scores S (-inf = not visible), then acc += P @ V: mrow is the
//                                  largest score, lrow the sum of exp2((s - mrow) * log2(e)).

template <typename acc_t>
inline acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// A NaN score makes the row NaN (out and lse), as the reference's softmax does; the row is then
// skipped by later tiles.
template <typename acc_t>
inline void poison_row(acc_t* mrow, acc_t* lrow, acc_t* acc, int64_t Dv) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  *mrow = nan;
  *lrow = nan;
  std::fill(acc, acc + Dv, nan);
}

// Portable path on at::vec (float accumulators for 16/32-bit inputs, double for float64).
template <typename T, typename acc_t>
struct GenericOps {
  using Vec = at::vec::Vectorized<acc_t>;

  static void load_row(const T* src, acc_t* dst, int64_t n) {
    if constexpr (std::is_same_v<T, acc_t>) {
      std::memcpy(dst, src, sizeof(acc_t) * n);
    } else {
      at::vec::convert(src, dst, n);
    }
  }

  static acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
    Vec s(acc_t(0));
    int64_t d = 0;
    for (; d + Vec::size() <= n; d += Vec::size()) s = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), s);
    acc_t r = at::vec::vec_reduce_all<acc_t>([](Vec x, Vec y) { return x + y; }, s);
    for (; d < n; ++d) r += a[d] * b[d];
    return r;
  }

  static void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
    const Vec va(alpha);
    int64_t d = 0;
    for (; d + Vec::size() <= n; d += Vec::size())
      at::vec::fmadd(va, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
    for (; d < n; ++d) y[d] += alpha * x[d];
  }

  static void scale(acc_t alpha, acc_t* y, int64_t n) {
    const Vec va(alpha);
    int64_t d = 0;
    for (; d + Vec::size() <= n; d += Vec::size()) (va * Vec::loadu(y + d)).store(y + d);
    for (; d < n; ++d) y[d] *= alpha;
  }

  // rowbuf: scratch of n * max(D, Dv) acc_t
  static void scores(const acc_t* q, int64_t ldq, int M, int64_t D, const T* const* krows, int n, acc_t* S, int64_t lds,
                     acc_t* rowbuf) {
    for (int i = 0; i < n; ++i) load_row(krows[i], rowbuf + i * D, D);
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < n; ++i) S[m * lds + i] = dot(q + m * ldq, rowbuf + i * D, D);
  }

  // The score modifiers on one row's scores s[0:n) of keys j0, j0 + 1, ...: softcap (cap > 0),
  // then ALiBi (slope, distance |diag - j|). Whole vectors up to round_up(n, W) (the row has
  // kKeyTile entries): the lanes past n are scratch that nothing reads.
  static void modify(acc_t* s, int n, acc_t cap, acc_t inv_cap, bool alibi, acc_t slope, int64_t diag, int64_t j0) {
    constexpr int W = Vec::size();
    if (cap > acc_t(0)) {
      const Vec c(cap), ic(inv_cap);
      for (int i = 0; i < n; i += W) (c * (Vec::loadu(s + i) * ic).tanh()).store(s + i);
    }
    if (alibi) {
      for (int i = 0; i < n; ++i) s[i] += alibi_bias(slope, diag, j0 + i);
    }
  }

  static void softmax_pv(acc_t* S, int64_t lds, int M, int n, const T* const* vrows, int64_t Dv, acc_t* mrow,
                         acc_t* lrow, acc_t* acc, int64_t ldacc, acc_t* rowbuf) {
    for (int i = 0; i < n; ++i) load_row(vrows[i], rowbuf + i * Dv, Dv);
    for (int m = 0; m < M; ++m) {
      acc_t* s = S + m * lds;
      if (std::isnan(mrow[m])) continue;
      acc_t mx = neg_inf<acc_t>();
      bool nan = false;
      for (int i = 0; i < n; ++i) {
        mx = std::max(mx, s[i]);
        nan |= std::isnan(s[i]);
      }
      if (nan) {
        poison_row(mrow + m, lrow + m, acc + m * ldacc, Dv);
        continue;
      }
      const acc_t m_new = std::max(mrow[m], mx);
      if (m_new == neg_inf<acc_t>()) continue;  // nothing visible to this row yet
      // mrow - m_new is -inf on the first visible tile (mrow = -inf) or when it overflows: alpha = 0.
      const acc_t l2e = static_cast<acc_t>(kLog2e);
      const acc_t alpha = std::exp2((mrow[m] - m_new) * l2e);
      acc_t sum = 0;
      for (int i = 0; i < n; ++i) {
        s[i] = std::exp2((s[i] - m_new) * l2e);
        sum += s[i];
      }
      lrow[m] = lrow[m] * alpha + sum;
      mrow[m] = m_new;
      if (alpha != acc_t(1)) scale(alpha, acc + m * ldacc, Dv);
      for (int i = 0; i < n; ++i) axpy(s[i], rowbuf + i * Dv, acc + m * ldacc, Dv);
    }
  }
};

#if SK_SIMD_X86
// The lone reductions and the softmax's exp2 are the attention kernels' (cpu/simd.h).
using simd::Avx2Float;

// The parts of the AVX2 and AVX-512 ops that differ only in the vector width, written once on the
// vector policy P (simd::Avx2Float, simd::Avx512Float). Templates without a target: each Ops class
// calls them from a method with its target, into which they are always inlined (SK_POLICY_INLINE,
// cpu/simd.h: `flatten` alone does not at -O0), so they compile for it.

// GenericOps::modify in vectors of P::W: whole vectors up to round_up(n, W) (the row has kKeyTile
// entries, a multiple of every W; the lanes past n are scratch that nothing reads).
static_assert(kKeyTile % 16 == 0, "a score row holds whole vectors of every width");
template <class P>
SK_POLICY_INLINE void modify_scores(typename P::T* s, int n, typename P::T cap, typename P::T inv_cap, bool alibi,
                                    typename P::T slope, int64_t diag, int64_t j0) {
  using T = typename P::T;
  using V = typename P::V;
  constexpr int W = P::W;
  if (cap > T(0)) {
    const V c = P::set1(cap), ic = P::set1(inv_cap);
    for (int i = 0; i < n; i += W) P::store(s + i, P::mul(c, P::tanh(P::mul(P::load(s + i), ic))));
  }
  if (alibi) {
    // Distances diag - j exact in float (< 2^24), |x| as max(x, -x).
    static constexpr T kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const V ns = P::set1(-slope), step = P::set1(static_cast<T>(W));
    V d = P::sub(P::set1(static_cast<T>(diag - j0)), P::load(kIota));
    for (int i = 0; i < n; i += W) {
      const V ad = P::max(d, P::sub(P::zero(), d));
      P::store(s + i, P::fmadd(ns, ad, P::load(s + i)));
      d = P::sub(d, step);
    }
  }
}

// The softmax half of softmax_pv for rows [0, M) of S (n scores each): per row the max and the NaN
// test, the scores replaced by their exp2((s - m_new) log2 e), l and m updated and the row's acc
// rescaled; a NaN row is poisoned, a row with nothing visible yet gets zeros. The lanes past n, up
// to whole vectors, are set to -inf first: no effect on the max or the NaN test, exactly 0 after
// the exp2 (so nothing in the sum), and never read by P V.
template <class P>
SK_POLICY_INLINE void softmax_rows(typename P::T* S, int64_t lds, int M, int n, int64_t Dv, typename P::T* mrow,
                                   typename P::T* lrow, typename P::T* acc, int64_t ldacc) {
  using T = typename P::T;
  using V = typename P::V;
  constexpr int W = P::W;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int nv = (n + W - 1) / W * W;
  for (int m = 0; m < M; ++m) {
    T* s = S + m * lds;
    if (std::isnan(mrow[m])) {
      std::fill(s, s + n, T(0));
      continue;
    }
    std::fill(s + n, s + nv, ninf);
    V mx = P::set1(ninf);
    int nan = 0;
    for (int i = 0; i < nv; i += W) {
      const V x = P::load(s + i);
      mx = P::max(mx, x);
      nan |= P::nan_bits(x);
    }
    if (nan != 0) {
      poison_row(mrow + m, lrow + m, acc + m * ldacc, Dv);
      std::fill(s, s + n, T(0));
      continue;
    }
    const T m_new = std::max(mrow[m], P::hmax(mx));
    if (m_new == ninf) {
      // Nothing visible to this row yet: its probabilities are all 0.
      std::fill(s, s + n, T(0));
      continue;
    }
    // mrow - m_new is -inf on the first visible tile (mrow = -inf) or when it overflows: alpha = 0.
    const T l2e = static_cast<T>(kLog2e);
    const T alpha = std::exp2((mrow[m] - m_new) * l2e);
    const V mn = P::set1(m_new), vl2e = P::set1(l2e);
    V sum = P::zero();
    for (int i = 0; i < nv; i += W) {
      const V p = P::exp2_nonpos(P::mul(P::sub(P::load(s + i), mn), vl2e));
      P::store(s + i, p);
      sum = P::add(sum, p);
    }
    lrow[m] = lrow[m] * alpha + P::hsum(sum);
    mrow[m] = m_new;
    if (alpha != T(1)) {
      T* a = acc + m * ldacc;
      const V va = P::set1(alpha);
      int64_t d = 0;
      for (; d + W <= Dv; d += W) P::store(a + d, P::mul(va, P::load(a + d)));
      for (; d < Dv; ++d) a[d] *= alpha;
    }
  }
}

// 8 consecutive elements as floats; `n < 8` loads only n (the rest 0).
template <typename T>
SK_AVX2_FN __m256 load8(const T* p);
template <>
SK_AVX2_FN __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
SK_AVX2_FN __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
SK_AVX2_FN __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
template <typename T>
SK_AVX2_FN __m256 load8_partial(const T* p, int n) {
  alignas(32) T tmp[8] = {};
  std::memcpy(tmp, p, sizeof(T) * n);
  return load8<T>(tmp);
}

// The 4 (8) horizontal sums of 4 (8) vectors at once: a transposing add tree costs about as much as
// one lone horizontal sum, which matters when a query row meets each key once (decode, MHA).
SK_AVX2_FN __m128 hsum4(const __m256* a) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

SK_AVX2_FN __m256 hsum8(const __m256* a) {
  const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

template <typename T>
struct Avx2Ops {
  // MB query rows x NB keys of dot products, accumulators in registers; q is float, rows of K in T.
  template <int MB, int NB>
  SK_AVX2_FN static void dot_block(const float* q, int64_t ldq, int64_t D, const T* const* k, float* S, int64_t lds) {
    __m256 acc[MB][NB];
#pragma GCC unroll 16
    for (int a = 0; a < MB; ++a)
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) acc[a][c] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 qv[MB];
#pragma GCC unroll 16
      for (int a = 0; a < MB; ++a) qv[a] = _mm256_loadu_ps(q + a * ldq + d);
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) {
        const __m256 kv = load8<T>(k[c] + d);
#pragma GCC unroll 16
        for (int a = 0; a < MB; ++a) acc[a][c] = _mm256_fmadd_ps(qv[a], kv, acc[a][c]);
      }
    }
    if (d < D) {
      const int rem = static_cast<int>(D - d);
      __m256 kv[NB];
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) kv[c] = load8_partial<T>(k[c] + d, rem);
#pragma GCC unroll 16
      for (int a = 0; a < MB; ++a) {
        const __m256 qv = load8_partial<float>(q + a * ldq + d, rem);
#pragma GCC unroll 16
        for (int c = 0; c < NB; ++c) acc[a][c] = _mm256_fmadd_ps(qv, kv[c], acc[a][c]);
      }
    }
#pragma GCC unroll 16
    for (int a = 0; a < MB; ++a) {
      if constexpr (NB == 8) {
        _mm256_storeu_ps(S + a * lds, hsum8(acc[a]));
      } else if constexpr (NB == 4) {
        _mm_storeu_ps(S + a * lds, hsum4(acc[a]));
      } else {
#pragma GCC unroll 16
        for (int c = 0; c < NB; ++c) S[a * lds + c] = Avx2Float::hsum(acc[a][c]);
      }
    }
  }

  template <int MB>
  SK_AVX2_FN static void dot_rows(const float* q, int64_t ldq, int64_t D, const T* const* krows, int n, float* S,
                                  int64_t lds) {
    int i = 0;
    if constexpr (MB == 1) {
      for (; i + 8 <= n; i += 8) dot_block<1, 8>(q, ldq, D, krows + i, S + i, lds);
    }
    for (; i + 4 <= n; i += 4) dot_block<MB, 4>(q, ldq, D, krows + i, S + i, lds);
    for (; i < n; ++i) dot_block<MB, 1>(q, ldq, D, krows + i, S + i, lds);
  }

  SK_AVX2_FN static void scores(const float* q, int64_t ldq, int M, int64_t D, const T* const* krows, int n, float* S,
                                int64_t lds, float*) {
    int m = 0;
    for (; m + 2 <= M; m += 2) dot_rows<2>(q + m * ldq, ldq, D, krows, n, S + m * lds, lds);
    if (m < M) dot_rows<1>(q + m * ldq, ldq, D, krows, n, S + m * lds, lds);
  }

  // acc[m][c0 .. c0 + 8*CB) += sum_i P[m][i] * V[i][c0 ..] for MB rows, accumulators in registers.
  template <int MB, int CB>
  SK_AVX2_FN static void pv_block(const float* P, int64_t ldp, int n, const T* const* vrows, int64_t c0, float* acc,
                                  int64_t ldacc) {
    __m256 a[MB][CB];
#pragma GCC unroll 16
    for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) a[r][c] = _mm256_loadu_ps(acc + r * ldacc + c0 + 8 * c);
    for (int i = 0; i < n; ++i) {
      if constexpr (MB == 1) {
        // One row: the broadcast, then each V vector consumed as loaded (CB + 2 registers).
        const __m256 p = _mm256_broadcast_ss(P + i);
#pragma GCC unroll 16
        for (int c = 0; c < CB; ++c) a[0][c] = _mm256_fmadd_ps(p, load8<T>(vrows[i] + c0 + 8 * c), a[0][c]);
        continue;
      }
      // V first, then one broadcast at a time: MB * CB accumulators + CB + 1 registers.
      __m256 v[CB];
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) v[c] = load8<T>(vrows[i] + c0 + 8 * c);
#pragma GCC unroll 16
      for (int r = 0; r < MB; ++r) {
        const __m256 p = _mm256_broadcast_ss(P + r * ldp + i);
#pragma GCC unroll 16
        for (int c = 0; c < CB; ++c) a[r][c] = _mm256_fmadd_ps(p, v[c], a[r][c]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) _mm256_storeu_ps(acc + r * ldacc + c0 + 8 * c, a[r][c]);
  }

  template <int MB>
  SK_AVX2_FN static void pv_rows(const float* P, int64_t ldp, int n, const T* const* vrows, int64_t Dv, float* acc,
                                 int64_t ldacc) {
    // MB x CB accumulators plus the V vectors and a broadcast must fit the 16 ymm registers.
    constexpr int CB = MB == 1 ? 8 : (MB == 2 ? 4 : 2);
    static_assert(MB == 1 || MB * CB + CB + 1 <= 16, "pv_block would spill");
    int64_t c0 = 0;
    for (; c0 + 8 * CB <= Dv; c0 += 8 * CB) pv_block<MB, CB>(P, ldp, n, vrows, c0, acc, ldacc);
    for (; c0 + 8 <= Dv; c0 += 8) pv_block<MB, 1>(P, ldp, n, vrows, c0, acc, ldacc);
    for (; c0 < Dv; ++c0)
#pragma GCC unroll 16
      for (int r = 0; r < MB; ++r) {
        float s = acc[r * ldacc + c0];
        for (int i = 0; i < n; ++i) s += P[r * ldp + i] * static_cast<float>(vrows[i][c0]);
        acc[r * ldacc + c0] = s;
      }
  }

  SK_AVX2_FN __attribute__((flatten)) static void modify(float* s, int n, float cap, float inv_cap, bool alibi,
                                                         float slope, int64_t diag, int64_t j0) {
    modify_scores<Avx2Float>(s, n, cap, inv_cap, alibi, slope, diag, j0);
  }

  SK_AVX2_FN __attribute__((flatten)) static void softmax(float* S, int64_t lds, int M, int n, int64_t Dv, float* mrow,
                                                          float* lrow, float* acc, int64_t ldacc) {
    softmax_rows<Avx2Float>(S, lds, M, n, Dv, mrow, lrow, acc, ldacc);
  }

  SK_AVX2_FN static void softmax_pv(float* S, int64_t lds, int M, int n, const T* const* vrows, int64_t Dv, float* mrow,
                                    float* lrow, float* acc, int64_t ldacc, float*) {
    softmax(S, lds, M, n, Dv, mrow, lrow, acc, ldacc);
    int m = 0;
    for (; m + 6 <= M; m += 6) pv_rows<6>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
    for (; m + 4 <= M; m += 4) pv_rows<4>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
    for (; m + 2 <= M; m += 2) pv_rows<2>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
    if (m < M) pv_rows<1>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
  }
};

// ---------------------------------------------------------------------------------------------
// AVX-512 twin of Avx2Ops' products: 16 float lanes, 32 zmm registers (so wider register blocks),
// masked loads and stores for the tails of K, V and Q rows (no scalar remainder loops, no reads past
// a row's end). The score modifiers and the softmax are the shared modify_scores / softmax_rows.
// Same algorithms: only the order of the reductions differs from the AVX2 path.
using simd::Avx512Float;

// 16 consecutive elements as floats.
template <typename T>
SK_AVX512_FN __m512 load16(const T* p);
template <>
SK_AVX512_FN __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
SK_AVX512_FN __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
SK_AVX512_FN __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
// The lanes of mask k only (the others 0); the masked-off elements are not read.
template <typename T>
SK_AVX512_FN __m512 load16_mask(const T* p, __mmask16 k);
template <>
SK_AVX512_FN __m512 load16_mask<float>(const float* p, __mmask16 k) {
  return _mm512_maskz_loadu_ps(k, p);
}
template <>
SK_AVX512_FN __m512 load16_mask<at::Half>(const at::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
template <>
SK_AVX512_FN __m512 load16_mask<at::BFloat16>(const at::BFloat16* p, __mmask16 k) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

using simd::mask16;  // the first n lanes

template <typename T>
struct Avx512Ops {
  // MB query rows x NB keys of dot products, accumulators in registers; the 16-lane sums are
  // folded to 8 lanes and reduced by the AVX2 transposing trees.
  template <int MB, int NB>
  SK_AVX512_FN static void dot_block(const float* q, int64_t ldq, int64_t D, const T* const* k, float* S, int64_t lds) {
    __m512 acc[MB][NB];
#pragma GCC unroll 16
    for (int a = 0; a < MB; ++a)
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) acc[a][c] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      __m512 qv[MB];
#pragma GCC unroll 16
      for (int a = 0; a < MB; ++a) qv[a] = _mm512_loadu_ps(q + a * ldq + d);
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) {
        const __m512 kv = load16<T>(k[c] + d);
#pragma GCC unroll 16
        for (int a = 0; a < MB; ++a) acc[a][c] = _mm512_fmadd_ps(qv[a], kv, acc[a][c]);
      }
    }
    if (d < D) {
      const __mmask16 km = mask16(D - d);
      __m512 qv[MB];
#pragma GCC unroll 16
      for (int a = 0; a < MB; ++a) qv[a] = _mm512_maskz_loadu_ps(km, q + a * ldq + d);
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) {
        const __m512 kv = load16_mask<T>(k[c] + d, km);
#pragma GCC unroll 16
        for (int a = 0; a < MB; ++a) acc[a][c] = _mm512_fmadd_ps(qv[a], kv, acc[a][c]);
      }
    }
#pragma GCC unroll 16
    for (int a = 0; a < MB; ++a) {
      __m256 h[NB];
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) h[c] = Avx512Float::fold(acc[a][c]);
      if constexpr (NB == 8) {
        _mm256_storeu_ps(S + a * lds, hsum8(h));
      } else if constexpr (NB == 4) {
        _mm_storeu_ps(S + a * lds, hsum4(h));
      } else {
#pragma GCC unroll 16
        for (int c = 0; c < NB; ++c) S[a * lds + c] = Avx2Float::hsum(h[c]);
      }
    }
  }

  template <int MB>
  SK_AVX512_FN static void dot_rows(const float* q, int64_t ldq, int64_t D, const T* const* krows, int n, float* S,
                                    int64_t lds) {
    int i = 0;
    // MB * NB accumulators + MB query vectors + one key vector within the 32 zmm registers.
    if constexpr (MB <= 2) {
      for (; i + 8 <= n; i += 8) dot_block<MB, 8>(q, ldq, D, krows + i, S + i, lds);
    }
    for (; i + 4 <= n; i += 4) dot_block<MB, 4>(q, ldq, D, krows + i, S + i, lds);
    for (; i < n; ++i) dot_block<MB, 1>(q, ldq, D, krows + i, S + i, lds);
  }

  // Kt[d * kKeyTile + i] = K[i][d] as floats for i < round_up(n, 16) (keys past n are zeros).
  SK_AVX512_FN static void transpose_keys(const T* const* krows, int n, int64_t D, float* Kt) {
    for (int i0 = 0; i0 < n; i0 += 16) {
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        const int64_t nd = std::min<int64_t>(16, D - d0);
        const __mmask16 dm = mask16(nd);
        __m512 r[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) r[j] = i0 + j < n ? load16_mask<T>(krows[i0 + j] + d0, dm) : _mm512_setzero_ps();
        simd::transpose16_ps(r);
        for (int64_t j = 0; j < nd; ++j) _mm512_storeu_ps(Kt + (d0 + j) * kKeyTile + i0, r[j]);
      }
    }
  }

  // S[a][i0 + 16c + l] for MB rows and NV vectors of 16 keys: outer products of broadcast q elements
  // with rows of K^T, no horizontal sums.
  template <int MB, int NV>
  SK_AVX512_FN static void outer_block(const float* q, int64_t ldq, int64_t D, const float* Kt, float* S, int64_t lds) {
    __m512 acc[MB][NV];
#pragma GCC unroll 16
    for (int a = 0; a < MB; ++a)
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) acc[a][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      __m512 kv[NV];
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) kv[c] = _mm512_loadu_ps(Kt + d * kKeyTile + 16 * c);
#pragma GCC unroll 16
      for (int a = 0; a < MB; ++a) {
        const __m512 qa = _mm512_set1_ps(q[a * ldq + d]);
#pragma GCC unroll 16
        for (int c = 0; c < NV; ++c) acc[a][c] = _mm512_fmadd_ps(qa, kv[c], acc[a][c]);
      }
    }
#pragma GCC unroll 16
    for (int a = 0; a < MB; ++a)
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(S + a * lds + 16 * c, acc[a][c]);
  }

  template <int NV>
  SK_AVX512_FN static void outer_rows(const float* q, int64_t ldq, int M, int64_t D, const float* Kt, float* S,
                                      int64_t lds) {
    int m = 0;
    for (; m + 6 <= M; m += 6) outer_block<6, NV>(q + m * ldq, ldq, D, Kt, S + m * lds, lds);
    for (; m + 2 <= M; m += 2) outer_block<2, NV>(q + m * ldq, ldq, D, Kt, S + m * lds, lds);
    if (m < M) outer_block<1, NV>(q + m * ldq, ldq, D, Kt, S + m * lds, lds);
  }

  // Rows of a tile at or above this use the transposed key tile (chunked prefill, long
  // speculative chunks): its transposition costs about as much as 6 rows' horizontal sums.
  static constexpr int kOuterMinRows = 12;

  SK_AVX512_FN static void scores(const float* q, int64_t ldq, int M, int64_t D, const T* const* krows, int n, float* S,
                                  int64_t lds, float* rowbuf) {
    if (M >= kOuterMinRows) {
      // rowbuf holds kKeyTile * max(D, Dv) floats: the tile's K^T.
      transpose_keys(krows, n, D, rowbuf);
      switch ((n + 15) / 16) {
        case 1:
          outer_rows<1>(q, ldq, M, D, rowbuf, S, lds);
          break;
        case 2:
          outer_rows<2>(q, ldq, M, D, rowbuf, S, lds);
          break;
        case 3:
          outer_rows<3>(q, ldq, M, D, rowbuf, S, lds);
          break;
        default:
          outer_rows<4>(q, ldq, M, D, rowbuf, S, lds);
          break;
      }
      return;
    }
    int m = 0;
    for (; m + 4 <= M; m += 4) dot_rows<4>(q + m * ldq, ldq, D, krows, n, S + m * lds, lds);
    for (; m + 2 <= M; m += 2) dot_rows<2>(q + m * ldq, ldq, D, krows, n, S + m * lds, lds);
    if (m < M) dot_rows<1>(q + m * ldq, ldq, D, krows, n, S + m * lds, lds);
  }

  // acc[m][c0 .. c0 + 16*CB) += sum_i P[m][i] * V[i][c0 ..] for MB rows; with a mask (CB = 1),
  // only the columns of km are read and written.
  template <int MB, int CB, bool Masked = false>
  SK_AVX512_FN static void pv_block(const float* P, int64_t ldp, int n, const T* const* vrows, int64_t c0, float* acc,
                                    int64_t ldacc, __mmask16 km = 0xffff) {
    static_assert(!Masked || CB == 1, "a masked block is one vector wide");
    __m512 a[MB][CB];
#pragma GCC unroll 16
    for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c)
        a[r][c] =
            Masked ? _mm512_maskz_loadu_ps(km, acc + r * ldacc + c0) : _mm512_loadu_ps(acc + r * ldacc + c0 + 16 * c);
    for (int i = 0; i < n; ++i) {
      __m512 v[CB];
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c)
        v[c] = Masked ? load16_mask<T>(vrows[i] + c0, km) : load16<T>(vrows[i] + c0 + 16 * c);
#pragma GCC unroll 16
      for (int r = 0; r < MB; ++r) {
        const __m512 p = _mm512_set1_ps(P[r * ldp + i]);
#pragma GCC unroll 16
        for (int c = 0; c < CB; ++c) a[r][c] = _mm512_fmadd_ps(p, v[c], a[r][c]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) {
        if constexpr (Masked) {
          _mm512_mask_storeu_ps(acc + r * ldacc + c0, km, a[r][c]);
        } else {
          _mm512_storeu_ps(acc + r * ldacc + c0 + 16 * c, a[r][c]);
        }
      }
  }

  template <int MB>
  SK_AVX512_FN static void pv_rows(const float* P, int64_t ldp, int n, const T* const* vrows, int64_t Dv, float* acc,
                                   int64_t ldacc) {
    // MB x CB accumulators plus the CB V vectors and a broadcast within the 32 zmm registers.
    constexpr int CB = MB <= 2 ? 8 : 4;
    static_assert(MB * CB + CB + 1 <= 32, "pv_block would spill");
    int64_t c0 = 0;
    for (; c0 + 16 * CB <= Dv; c0 += 16 * CB) pv_block<MB, CB>(P, ldp, n, vrows, c0, acc, ldacc);
    for (; c0 + 16 <= Dv; c0 += 16) pv_block<MB, 1>(P, ldp, n, vrows, c0, acc, ldacc);
    if (c0 < Dv) pv_block<MB, 1, true>(P, ldp, n, vrows, c0, acc, ldacc, mask16(Dv - c0));
  }

  SK_AVX512_FN __attribute__((flatten)) static void modify(float* s, int n, float cap, float inv_cap, bool alibi,
                                                           float slope, int64_t diag, int64_t j0) {
    modify_scores<Avx512Float>(s, n, cap, inv_cap, alibi, slope, diag, j0);
  }

  SK_AVX512_FN __attribute__((flatten)) static void softmax(float* S, int64_t lds, int M, int n, int64_t Dv,
                                                            float* mrow, float* lrow, float* acc, int64_t ldacc) {
    softmax_rows<Avx512Float>(S, lds, M, n, Dv, mrow, lrow, acc, ldacc);
  }

  SK_AVX512_FN static void softmax_pv(float* S, int64_t lds, int M, int n, const T* const* vrows, int64_t Dv,
                                      float* mrow, float* lrow, float* acc, int64_t ldacc, float*) {
    softmax(S, lds, M, n, Dv, mrow, lrow, acc, ldacc);
    int m = 0;
    for (; m + 6 <= M; m += 6) pv_rows<6>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
    for (; m + 4 <= M; m += 4) pv_rows<4>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
    for (; m + 2 <= M; m += 2) pv_rows<2>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
    if (m < M) pv_rows<1>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
  }
};

// ---------------------------------------------------------------------------------------------
// float64 decode on the attention kernels' float64 policies (simd::Avx2Double, simd::Avx512Double):
// the cache rows read in place (no conversion), the score modifiers and the softmax the shared
// modify_scores / softmax_rows, the two products in vectors of P::W with scalar tails (head dims
// that are not multiples of W). Templates without a target, compiled for each level by being
// inlined (SK_POLICY_INLINE) into the methods of F64Ops below. Register blocks: MB query rows x NB
// keys (scores) and MB rows x CB vectors of columns (P V) plus the operands within 16 ymm (AVX2:
// 2 x 4) or 32 zmm (AVX-512: 4 x 4).
template <class P>
struct F64Products {
  using V = typename P::V;
  static constexpr int W = P::W;
  static constexpr int MB = W == 8 ? 4 : 2, NB = 4, CB = 4;
  static_assert(MB * NB + MB + 1 <= (W == 8 ? 32 : 16) && MB * CB + CB + 1 <= (W == 8 ? 32 : 16), "blocks spill");

  template <int R, int C>
  SK_POLICY_INLINE static void dot_block(const double* q, int64_t ldq, int64_t D, const double* const* k, double* S,
                                         int64_t lds) {
    V acc[R][C];
#pragma GCC unroll 16
    for (int a = 0; a < R; ++a)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[a][c] = P::zero();
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      V qv[R];
#pragma GCC unroll 16
      for (int a = 0; a < R; ++a) qv[a] = P::load(q + a * ldq + d);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        const V kv = P::load(k[c] + d);
#pragma GCC unroll 16
        for (int a = 0; a < R; ++a) acc[a][c] = P::fmadd(qv[a], kv, acc[a][c]);
      }
    }
#pragma GCC unroll 16
    for (int a = 0; a < R; ++a)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        double t = P::hsum(acc[a][c]);
        for (int64_t e = d; e < D; ++e) t += q[a * ldq + e] * k[c][e];
        S[a * lds + c] = t;
      }
  }

  template <int R>
  SK_POLICY_INLINE static void dot_rows(const double* q, int64_t ldq, int64_t D, const double* const* krows, int n,
                                        double* S, int64_t lds) {
    int i = 0;
    for (; i + NB <= n; i += NB) dot_block<R, NB>(q, ldq, D, krows + i, S + i, lds);
    for (; i < n; ++i) dot_block<R, 1>(q, ldq, D, krows + i, S + i, lds);
  }

  SK_POLICY_INLINE static void scores(const double* q, int64_t ldq, int M, int64_t D, const double* const* krows, int n,
                                      double* S, int64_t lds) {
    int m = 0;
    for (; m + MB <= M; m += MB) dot_rows<MB>(q + m * ldq, ldq, D, krows, n, S + m * lds, lds);
    for (; m < M; ++m) dot_rows<1>(q + m * ldq, ldq, D, krows, n, S + m * lds, lds);
  }

  // acc[r][c0 .. c0 + W*C) += sum_i P[r][i] V[i][c0 ..] for R rows, accumulators in registers.
  template <int R, int C>
  SK_POLICY_INLINE static void pv_block(const double* Pm, int64_t ldp, int n, const double* const* vrows, int64_t c0,
                                        double* acc, int64_t ldacc) {
    V a[R][C];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) a[r][c] = P::load(acc + r * ldacc + c0 + W * c);
    for (int i = 0; i < n; ++i) {
      V v[C];
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) v[c] = P::load(vrows[i] + c0 + W * c);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const V p = P::bcast(Pm + r * ldp + i);
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) a[r][c] = P::fmadd(p, v[c], a[r][c]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) P::store(acc + r * ldacc + c0 + W * c, a[r][c]);
  }

  template <int R>
  SK_POLICY_INLINE static void pv_rows(const double* Pm, int64_t ldp, int n, const double* const* vrows, int64_t Dv,
                                       double* acc, int64_t ldacc) {
    int64_t c0 = 0;
    for (; c0 + W * CB <= Dv; c0 += W * CB) pv_block<R, CB>(Pm, ldp, n, vrows, c0, acc, ldacc);
    for (; c0 + W <= Dv; c0 += W) pv_block<R, 1>(Pm, ldp, n, vrows, c0, acc, ldacc);
    for (; c0 < Dv; ++c0)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        double t = acc[r * ldacc + c0];
        for (int i = 0; i < n; ++i) t += Pm[r * ldp + i] * vrows[i][c0];
        acc[r * ldacc + c0] = t;
      }
  }

  SK_POLICY_INLINE static void softmax_pv(double* S, int64_t lds, int M, int n, const double* const* vrows, int64_t Dv,
                                          double* mrow, double* lrow, double* acc, int64_t ldacc) {
    softmax_rows<P>(S, lds, M, n, Dv, mrow, lrow, acc, ldacc);
    int m = 0;
    for (; m + MB <= M; m += MB) pv_rows<MB>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
    for (; m < M; ++m) pv_rows<1>(S + m * lds, lds, n, vrows, Dv, acc + m * ldacc, ldacc);
  }
};

// The Ops interface of decode_units for float64, one specialization per level, each method
// compiled for that level's target (FN) with F64Products<P> inlined into it (SK_POLICY_INLINE).
template <class P>
struct F64Ops;
#define SK_F64_OPS(P, FN)                                                                                     \
  template <>                                                                                                 \
  struct F64Ops<P> {                                                                                          \
    FN __attribute__((flatten)) static void scores(const double* q, int64_t ldq, int M, int64_t D,            \
                                                   const double* const* krows, int n, double* S, int64_t lds, \
                                                   double*) {                                                 \
      F64Products<P>::scores(q, ldq, M, D, krows, n, S, lds);                                                 \
    }                                                                                                         \
    FN __attribute__((flatten)) static void modify(double* s, int n, double cap, double inv_cap, bool alibi,  \
                                                   double slope, int64_t diag, int64_t j0) {                  \
      modify_scores<P>(s, n, cap, inv_cap, alibi, slope, diag, j0);                                           \
    }                                                                                                         \
    FN __attribute__((flatten)) static void softmax_pv(double* S, int64_t lds, int M, int n,                  \
                                                       const double* const* vrows, int64_t Dv, double* mrow,  \
                                                       double* lrow, double* acc, int64_t ldacc, double*) {   \
      F64Products<P>::softmax_pv(S, lds, M, n, vrows, Dv, mrow, lrow, acc, ldacc);                            \
    }                                                                                                         \
  };
SK_F64_OPS(simd::Avx2Double, SK_AVX2_FN)
SK_F64_OPS(simd::Avx512Double, SK_AVX512_FN)
#undef SK_F64_OPS

#endif

// ---------------------------------------------------------------------------------------------
// Decode attention: the work units and the merge.

// Sequence b has Tq_b query tokens (Tq for every b in the padded form; its span of cu_seqlens_q in
// the packed form): its query row t of head hq is q[q_off[b] + hq * qs[1] + t * qs[2]], its output
// row out[o_off[b] + hq * os[1] + t * os[2]], its lse (and split partial) row
// lse_base[b] + hq * lse_hstride + t of nrows. The merge walks the rows as (mB, Hq, mTq): (B, Hq, Tq)
// padded, (1, Hq, total_q) packed.
struct DecodeShape {
  int64_t B, Hq, Hkv, G, Tq, D, Dv, splits;
  int64_t window_left, window_right;
  Layout L;
  bool prefetch;
  std::vector<int64_t> seq_tq, q_off, o_off, lse_base;
  int64_t lse_hstride, nrows, mB, mTq;
};

// One row tile of one sequence (rows r = t * G + g of [tile * kRowTile, +kRowTile)); a work unit is a
// (tile, kv head, split).
struct RowTile {
  int64_t b, tile;
};

// Bytes of K/V the call reads above which software prefetching pays off (larger than the L3 share
// of a core on common server parts).
constexpr int64_t kPrefetchBytes = int64_t{16} << 20;

// Range of key positions [lo, hi) visible to any row of rows [r0, r1) of sequence length len.
inline void tile_key_range(const DecodeShape& s, int64_t len, int64_t Tq, int64_t r0, int64_t r1, int64_t* lo,
                           int64_t* hi) {
  const int64_t pos_first = len - Tq + r0 / s.G;
  const int64_t pos_last = len - Tq + (r1 - 1) / s.G;
  int64_t h = len;
  if (s.window_right >= 0) h = std::min(h, pos_last + s.window_right + 1);
  int64_t l = 0;
  if (s.window_left >= 0) l = std::max<int64_t>(0, pos_first - s.window_left);
  *lo = l;
  *hi = std::max(l, h);
}

template <typename T, typename acc_t, class Ops>
void decode_units(const DecodeShape& s, const T* q, const int64_t* qs, const T* kc, const int64_t* ks, const T* vc,
                  const int64_t* vs, const int32_t* lens, const int32_t* table, acc_t scale, acc_t post, T* out,
                  const int64_t* os, acc_t* lse, acc_t* opart, acc_t* mpart, const ScoreMods<acc_t>& mods) {
  const bool modify = mods.softcap > acc_t(0) || mods.alibi != nullptr;
  const acc_t inv_cap = mods.softcap > acc_t(0) ? acc_t(1) / mods.softcap : acc_t(0);
  const int64_t maxd = std::max(s.D, s.Dv);
  // The row tiles of every sequence (no padded work: a sequence of Tq_b tokens has
  // ceil(G * Tq_b / kRowTile) tiles, an empty one none), most work first, pulled one unit at a time
  // by the threads: a chunked-prefill batch mixes 1-token and 256-token chunks over caches of
  // different lengths, and a static split of the units would leave threads idle.
  std::vector<int64_t> seq_cost(s.B, 0);
  int64_t total_work = 0, ntiles = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t len = std::clamp<int64_t>(lens[b], 0, s.L.capacity), rows = s.G * s.seq_tq[b];
    for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
      const int64_t r1 = std::min(rows, r0 + kRowTile);
      int64_t lo, hi;
      tile_key_range(s, len, s.seq_tq[b], r0, r1, &lo, &hi);
      seq_cost[b] += (r1 - r0) * (hi - lo + 1);
      ++ntiles;
    }
    total_work += seq_cost[b];
  }
  // Sequences most work first; within one, the units of a kv head back to back, so consecutive
  // units (one thread's, or both threads' at once) read the same K/V while it is in cache.
  std::vector<int64_t> order(s.B);
  for (int64_t b = 0; b < s.B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return seq_cost[x] > seq_cost[y]; });
  std::vector<RowTile> tiles;  // (b, tile) per unit, with its kv head and split below
  std::vector<int32_t> unit_h, unit_split;
  tiles.reserve(ntiles * s.Hkv * s.splits);
  unit_h.reserve(ntiles * s.Hkv * s.splits);
  unit_split.reserve(ntiles * s.Hkv * s.splits);
  for (int64_t b : order) {
    const int64_t nt = (s.G * s.seq_tq[b] + kRowTile - 1) / kRowTile;
    for (int64_t h = 0; h < s.Hkv; ++h)
      for (int64_t tile = 0; tile < nt; ++tile)
        for (int64_t sp = 0; sp < s.splits; ++sp) {
          tiles.push_back({b, tile});
          unit_h.push_back(static_cast<int32_t>(h));
          unit_split.push_back(static_cast<int32_t>(sp));
        }
  }
  const int64_t units = static_cast<int64_t>(tiles.size());
  total_work *= s.Hkv * (s.D + s.Dv);
  std::atomic<int64_t> next_unit{0};
  auto worker = [&]() {
    std::vector<acc_t> qf(kRowTile * s.D), S(kRowTile * kKeyTile), acc(kRowTile * s.Dv), mrow(kRowTile), lrow(kRowTile),
        rowbuf(kKeyTile * maxd);
    std::vector<const T*> krows(kKeyTile), vrows(kKeyTile);
    std::vector<T> zero_row(maxd, T(0));
    std::vector<char> key_ok(kKeyTile);
    for (;;) {
      const int64_t u = next_unit.fetch_add(1, std::memory_order_relaxed);
      if (u >= units) break;
      const int64_t split = unit_split[u];
      const int64_t h = unit_h[u];
      const RowTile& rt = tiles[u];
      const int64_t b = rt.b, Tq = s.seq_tq[b], rows = s.G * Tq;
      const int64_t r0 = rt.tile * kRowTile, r1 = std::min(rows, r0 + kRowTile);
      const int M = static_cast<int>(r1 - r0);
      const int64_t len = std::clamp<int64_t>(lens[b], 0, s.L.capacity);

      for (int m = 0; m < M; ++m) {
        const int64_t r = r0 + m, t = r / s.G, hq = h * s.G + r % s.G;
        const T* src = q + s.q_off[b] + hq * qs[1] + t * qs[2];
        for (int64_t d = 0; d < s.D; ++d) qf[m * s.D + d] = static_cast<acc_t>(src[d * qs[3]]) * scale;
      }
      std::fill(acc.begin(), acc.begin() + M * s.Dv, acc_t(0));
      std::fill(mrow.begin(), mrow.begin() + M, neg_inf<acc_t>());
      std::fill(lrow.begin(), lrow.begin() + M, acc_t(0));

      int64_t lo, hi;
      tile_key_range(s, len, Tq, r0, r1, &lo, &hi);
      const int64_t chunk = (hi - lo + s.splits - 1) / s.splits;
      const int64_t k_lo = std::min(hi, lo + split * chunk), k_hi = std::min(hi, k_lo + chunk);

      for (int64_t j0 = k_lo; j0 < k_hi; j0 += kKeyTile) {
        const int n = static_cast<int>(std::min<int64_t>(kKeyTile, k_hi - j0));
        bool all_ok = true;
        for (int i = 0; i < n; ++i) {
          Slot sl;
          const bool ok = locate(s.L, table, b, j0 + i, &sl);
          key_ok[i] = ok;
          all_ok &= ok;
          krows[i] = ok ? kc + sl.outer * ks[0] + h * ks[1] + sl.slot * ks[2] : zero_row.data();
          vrows[i] = ok ? vc + sl.outer * vs[0] + h * vs[1] + sl.slot * vs[2] : zero_row.data();
        }
        // Prefetch the next tile's rows into L2 while this one computes, when the cache is read from
        // DRAM (measured: +20% at 64 MB single-threaded). From L3 the extra instructions cost more
        // than they hide, so small working sets skip it.
        const int64_t next_end = s.prefetch ? std::min<int64_t>(k_hi, j0 + n + kKeyTile) : j0 + n;
        for (int64_t j = j0 + n; j < next_end; ++j) {
          Slot sl;
          if (!locate(s.L, table, b, j, &sl)) continue;
          const char* kp = reinterpret_cast<const char*>(kc + sl.outer * ks[0] + h * ks[1] + sl.slot * ks[2]);
          const char* vp = reinterpret_cast<const char*>(vc + sl.outer * vs[0] + h * vs[1] + sl.slot * vs[2]);
          for (int64_t off = 0; off < s.D * static_cast<int64_t>(sizeof(T)); off += 64)
            __builtin_prefetch(kp + off, 0, 2);
          for (int64_t off = 0; off < s.Dv * static_cast<int64_t>(sizeof(T)); off += 64)
            __builtin_prefetch(vp + off, 0, 2);
        }
        Ops::scores(qf.data(), s.D, M, s.D, krows.data(), n, S.data(), kKeyTile, rowbuf.data());
        if (post != acc_t(1)) {  // q was not scaled (cpu_paths::scale_after_products)
          for (int m = 0; m < M; ++m)
            for (int i = 0; i < n; ++i) S[m * kKeyTile + i] *= post;
        }
        if (modify) {
          // Before the mask, as in attention: query t sits at position len - Tq + t (ALiBi's diag).
          for (int m = 0; m < M; ++m) {
            const int64_t r = r0 + m, hq = h * s.G + r % s.G;
            Ops::modify(S.data() + m * kKeyTile, n, mods.softcap, inv_cap, mods.alibi != nullptr,
                        mods.slope(b, hq, s.Hq), len - Tq + r / s.G, j0);
          }
        }
        // Masking by selection (never by multiplying), so a non-finite score cannot leak.
        const int64_t j_last = j0 + n - 1;
        for (int m = 0; m < M; ++m) {
          const int64_t pos = len - Tq + (r0 + m) / s.G;
          const int64_t vis_lo = s.window_left >= 0 ? pos - s.window_left : std::numeric_limits<int64_t>::min();
          const int64_t vis_hi = s.window_right >= 0 ? pos + s.window_right : std::numeric_limits<int64_t>::max();
          if (all_ok && vis_lo <= j0 && j_last <= vis_hi) continue;
          acc_t* row = S.data() + m * kKeyTile;
          for (int i = 0; i < n; ++i) {
            const int64_t j = j0 + i;
            if (!key_ok[i] || j < vis_lo || j > vis_hi) row[i] = neg_inf<acc_t>();
          }
        }
        Ops::softmax_pv(S.data(), kKeyTile, M, n, vrows.data(), s.Dv, mrow.data(), lrow.data(), acc.data(), s.Dv,
                        rowbuf.data());
      }

      for (int m = 0; m < M; ++m) {
        const int64_t r = r0 + m, t = r / s.G, hq = h * s.G + r % s.G;
        const int64_t row_index = s.lse_base[b] + hq * s.lse_hstride + t;
        const acc_t* a = acc.data() + m * s.Dv;
        if (s.splits == 1) {
          // The sink joins the denominator here; with splits, once in merge_splits, never per split.
          acc_t mm = mrow[m], ll = lrow[m];
          const acc_t f = merge_sink(mods.sink(hq), mm, ll);
          // A row that saw no key (and no finite sink) has mrow = -inf and lrow = 0; one that saw a
          // NaN score has NaN in both; otherwise lrow >= 1 (its max term is exactly 1).
          const bool empty = ll == acc_t(0);
          acc_t inv = empty ? acc_t(0) : acc_t(1) / ll;
          if (f != acc_t(1)) inv *= f;
          T* dst = out + s.o_off[b] + hq * os[1] + t * os[2];
          for (int64_t d = 0; d < s.Dv; ++d) dst[d] = static_cast<T>(a[d] * inv);
          lse[row_index] = empty ? neg_inf<acc_t>() : mm + std::log(ll);
        } else {
          const bool empty = lrow[m] == acc_t(0);
          const acc_t inv = empty ? acc_t(0) : acc_t(1) / lrow[m];
          // The split's max and sum, not its lse: rounded to float, lse = m + ln l loses ln l
          // entirely once |m| >> 1 (ulp(1e10) = 1024), and the merge would then weight splits of
          // different key counts equally.
          const int64_t nrows = s.nrows, prow = split * nrows + row_index;
          acc_t* dst = opart + prow * s.Dv;
          for (int64_t d = 0; d < s.Dv; ++d) dst[d] = a[d] * inv;
          mpart[prow] = mrow[m];
          mpart[s.splits * nrows + prow] = lrow[m];
        }
      }
    }
  };
  // Waking the thread pool costs tens to hundreds of microseconds, more than a small decode step
  // takes on one core: below ~1M multiply-adds the call stays on the calling thread.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), units);
  if (threads <= 1 || total_work < (int64_t{1} << 20) || at::in_parallel_region()) {
    worker();
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(); });
  }
}

// Merges the splits' normalized partial outputs o_k with their (max m_k, sum l_k): weights
// l_k exp(m_k - max m) (0 for a split that saw no key, m_k = -inf, so -inf - -inf never occurs),
// lse = max m + ln(sum of weights). Any NaN partial (a split that saw a NaN score) makes the row
// NaN, as the reference's softmax does, even when the other splits saw no key.
// The head's sink logit (sinks, nullptr: none) is merged once, into the combined (max, sum).
template <typename T, typename acc_t>
void merge_splits(const DecodeShape& s, const acc_t* opart, const acc_t* mpart, T* out, const int64_t* os, acc_t* lse,
                  const acc_t* sinks) {
  const int64_t rows = s.nrows, stride = rows;
  const acc_t* lpart = mpart + s.splits * rows;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, s.splits * s.Dv));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(s.Dv), w(s.splits);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % s.mTq, hq = (r / s.mTq) % s.Hq, b = r / (s.mTq * s.Hq);
      acc_t mx = neg_inf<acc_t>();
      bool has_nan = false;
      for (int64_t k = 0; k < s.splits; ++k) {
        const acc_t mk = mpart[k * stride + r], lk = lpart[k * stride + r];
        has_nan |= std::isnan(mk) || std::isnan(lk);
        if (mk > mx) mx = mk;
      }
      T* dst = out + b * os[0] + hq * os[1] + t * os[2];
      const acc_t sink = sinks != nullptr ? sinks[hq] : neg_inf<acc_t>();
      if (has_nan || mx == neg_inf<acc_t>()) {
        for (int64_t d = 0; d < s.Dv; ++d) dst[d] = has_nan ? static_cast<T>(nan) : T(0);
        // No key in any split: lse is the sink's alone (-inf without one).
        lse[r] = has_nan ? nan : sink;
        continue;
      }
      acc_t total = 0;
      for (int64_t k = 0; k < s.splits; ++k) {
        const acc_t mk = mpart[k * stride + r];
        w[k] = mk == neg_inf<acc_t>() ? acc_t(0) : lpart[k * stride + r] * std::exp(mk - mx);
        total += w[k];
      }
      std::fill(o.begin(), o.end(), acc_t(0));
      for (int64_t k = 0; k < s.splits; ++k) {
        if (w[k] == acc_t(0)) continue;
        const acc_t* src = opart + (k * stride + r) * s.Dv;
        const acc_t wk = w[k] / total;
        for (int64_t d = 0; d < s.Dv; ++d) o[d] += wk * src[d];
      }
      acc_t m_all = mx, l_all = total;
      const acc_t f = merge_sink(sink, m_all, l_all);
      if (f != acc_t(1) || l_all != total) {
        // o is normalized by total; with the sink the denominator is l_all at max m_all.
        const acc_t rescale = total * f / l_all;
        for (int64_t d = 0; d < s.Dv; ++d) o[d] *= rescale;
      }
      for (int64_t d = 0; d < s.Dv; ++d) dst[d] = static_cast<T>(o[d]);
      lse[r] = m_all + std::log(l_all);
    }
  });
}

template <typename scalar_t>
void run_decode(const DecodeShape& s, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const int32_t* lens, const int32_t* table, double scale, at::Tensor& out, at::Tensor& lse,
                at::Tensor& opart, at::Tensor& lpart, simd::Isa isa, const std::optional<at::Tensor>& alibi_slopes,
                const std::optional<at::Tensor>& sinks, double softcap) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t qs[4] = {q.stride(0), q.stride(1), q.stride(2), q.stride(3)};
  const int64_t ks[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const int64_t vs[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  // q carries the scale, or the scores get it after the products where q * scale would overflow.
  const bool after = cpu_paths::scale_after_products(q, scale);
  const acc_t qscale = after ? acc_t(1) : static_cast<acc_t>(scale),
              post = after ? static_cast<acc_t>(scale) : acc_t(1);
  acc_t* op = s.splits > 1 ? opart.data_ptr<acc_t>() : nullptr;
  acc_t* lp = s.splits > 1 ? lpart.data_ptr<acc_t>() : nullptr;
  const host::ModifierArgs<acc_t> ma =
      host::check_modifiers<acc_t>(alibi_slopes, sinks, softcap, s.B, s.Hq, host::kCpu, "decode_attention");
  // With splits the units see no sink; merge_splits adds it once.
  const ScoreMods<acc_t> mods{ma.softcap, ma.alibi, s.splits > 1 ? nullptr : ma.sinks};
  auto run = [&](auto ops_tag) {
    using Ops = decltype(ops_tag);
    decode_units<scalar_t, acc_t, Ops>(s, q.const_data_ptr<scalar_t>(), qs, k_cache.const_data_ptr<scalar_t>(), ks,
                                       v_cache.const_data_ptr<scalar_t>(), vs, lens, table, qscale, post,
                                       out.data_ptr<scalar_t>(), os, lse.data_ptr<acc_t>(), op, lp, mods);
  };
  bool done = false;
#if SK_SIMD_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa == simd::Isa::Avx512) {
      run(Avx512Ops<scalar_t>{});
      done = true;
    } else if (isa == simd::Isa::Avx2) {
      run(Avx2Ops<scalar_t>{});
      done = true;
    }
  } else {
    if (isa == simd::Isa::Avx512) {
      run(F64Ops<simd::Avx512Double>{});
      done = true;
    } else if (isa == simd::Isa::Avx2) {
      run(F64Ops<simd::Avx2Double>{});
      done = true;
    }
  }
#endif
  (void)isa;
  if (!done) run(GenericOps<scalar_t, acc_t>{});
  if (s.splits > 1) {
    merge_splits<scalar_t, acc_t>(s, op, lp, out.data_ptr<scalar_t>(), os, lse.data_ptr<acc_t>(), ma.sinks);
  }
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& block_table, double scale, int64_t window_left, int64_t window_right,
    int64_t num_splits, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
    double softcap, const std::optional<at::Tensor>& cu_seqlens_q, int64_t max_seqlen_q) {
  host::check_cache(k_cache, v_cache, host::kCpu);
  constexpr const char* op = "seqkernels::decode_attention (cpu)";
  host::check_decode_args(q, k_cache, num_splits, window_left, window_right, std::numeric_limits<int64_t>::max(),
                          host::kCpu);
  // After check_decode_args: q is 4-D from here on. Packed (cu_seqlens_q): q is the (1, Hq, total_q, D)
  // view and the sequences are cache_seqlens' entries.
  const bool packed = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
  const int64_t B = packed ? cache_seqlens.numel() : q.size(0);
  const int32_t* cu = host::check_kv_packed(cu_seqlens_q, q, B, max_seqlen_q, host::kCpu, "cu_seqlens_q", op);
  if (q.scalar_type() == at::kDouble) {
    host::check_modifiers<double>(alibi_slopes, sinks, softcap, B, q.size(1), host::kCpu, op);
  } else {
    host::check_modifiers<float>(alibi_slopes, sinks, softcap, B, q.size(1), host::kCpu, op);
  }
  DecodeShape s{};
  s.B = B;
  s.Hq = q.size(1);
  s.Tq = q.size(2);  // total_q when packed
  s.D = q.size(3);
  s.Hkv = k_cache.size(1);
  s.Dv = v_cache.size(3);
  s.L = host::check_layout(k_cache, block_table, s.B, host::kCpu);
  host::check_seqlens(cache_seqlens, s.B, host::kCpu);
  s.G = s.Hq / s.Hkv;
  s.splits = num_splits;
  s.window_left = window_left;
  // Decode attention is causal: a query never sees the later queries of its own chunk, so the
  // right side of the window is clamped to 0 (-1 included), as in decode_attention_ref.
  s.window_right = 0;

  const bool is_double = q.scalar_type() == at::kDouble;
  const auto acc_type = is_double ? at::kDouble : at::kFloat;
  // Packed: token-major storage (total_q, Hq, Dv) seen as (1, Hq, total_q, Dv), as attention_varlen.
  at::Tensor out = packed ? at::empty({s.Tq, s.Hq, s.Dv}, q.options()).permute({1, 0, 2}).unsqueeze(0)
                          : at::empty({s.B, s.Hq, s.Tq, s.Dv}, q.options());
  at::Tensor lse = at::empty({packed ? 1 : s.B, s.Hq, s.Tq}, q.options().dtype(acc_type));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  s.seq_tq.resize(s.B);
  s.q_off.resize(s.B);
  s.o_off.resize(s.B);
  s.lse_base.resize(s.B);
  for (int64_t b = 0; b < s.B; ++b) {
    if (packed) {
      const SeqSpan sp = seq_span(cu, cu, b, s.Tq, s.Tq);
      s.seq_tq[b] = sp.lq;
      s.q_off[b] = sp.q0 * q.stride(2);
      s.o_off[b] = sp.q0 * out.stride(2);
      s.lse_base[b] = sp.q0;
    } else {
      s.seq_tq[b] = s.Tq;
      s.q_off[b] = b * q.stride(0);
      s.o_off[b] = b * out.stride(0);
      s.lse_base[b] = b * s.Hq * s.Tq;
    }
  }
  s.lse_hstride = s.Tq;
  s.mB = packed ? 1 : s.B;
  s.mTq = s.Tq;
  s.nrows = s.mB * s.Hq * s.Tq;
  at::Tensor opart, lpart;
  if (s.splits > 1) {
    opart = at::empty({s.splits, s.nrows, s.Dv}, q.options().dtype(acc_type));
    lpart = at::empty({2, s.splits, s.nrows}, q.options().dtype(acc_type));  // max, then sum
  }
  const int32_t* lens = cache_seqlens.data_ptr<int32_t>();
  const int32_t* table = block_table.has_value() ? block_table->data_ptr<int32_t>() : nullptr;
  const simd::Isa isa = cpu_paths::decode_attention(cpu_paths::dt_of(q.scalar_type()));
  {
    const int32_t* lp = cache_seqlens.data_ptr<int32_t>();
    int64_t keys = 0;
    for (int64_t b = 0; b < s.B; ++b) keys += std::clamp<int64_t>(lp[b], 0, s.L.capacity);
    s.prefetch = keys * s.Hkv * (s.D + s.Dv) * q.element_size() > kPrefetchBytes;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention_cpu", [&] {
    run_decode<scalar_t>(s, q, k_cache, v_cache, lens, table, scale, out, lse, opart, lpart, isa, alibi_slopes, sinks,
                         softcap);
  });
  return {out, lse};
}

}  // namespace
}  // namespace cpu

// AVX2 and AVX-512 paths for every dtype: float32 accumulation (float32, bf16, float16 inputs) on
// Avx2Ops / Avx512Ops, float64 on F64Ops.
simd::Isa cpu_paths::decode_attention(Dt) {
  if (!SK_SIMD_X86) return simd::Isa::Portable;
  return simd::path_isa(simd::Isa::Avx512);
}

}  // namespace seqkernels

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("kv_cache_append", TORCH_FN(seqkernels::cpu::kv_cache_append_cpu));
  m.impl("decode_attention", TORCH_FN(seqkernels::cpu::decode_attention_cpu));
}

// For `seqkernels info` (python/seqkernels/cli.py), read through ctypes from this library: the CPU
// paths the kernels have that this CPU and OS support, and the one a call takes now (the
// SEQKERNELS_CPU_ISA rules of cpu/simd.h), e.g. "active=avx512;supported=portable,avx2,avx512;
// avx512_bf16=1;amx_bf16=0". A plain C symbol rather than an op, so the schema does not grow for a report.
extern "C" __attribute__((visibility("default"))) const char* seqkernels_cpu_isa_report() {
  namespace simd = seqkernels::simd;
  static thread_local char buf[1024];
  const simd::Isa best = simd::supported_isa();
  std::string sup = "portable";
  if (static_cast<int>(best) >= static_cast<int>(simd::Isa::Avx2)) sup += ",avx2";
  if (static_cast<int>(best) >= static_cast<int>(simd::Isa::Avx512)) sup += ",avx512";
  if (static_cast<int>(best) >= static_cast<int>(simd::Isa::Avx512Bf16)) sup += ",avx512_bf16";
  if (best == simd::Isa::AmxBf16) sup += ",amx_bf16";
  // Per family and dtype, the path a call takes now: "attention_fwd=float32:avx512,..." lists
  // separated by "|".
  using seqkernels::cpu_paths::Dt;
  const std::pair<const char*, simd::Isa (*)(Dt)> families[] = {
      {"attention_fwd", &seqkernels::cpu_paths::attention_fwd},
      {"attention_bwd", &seqkernels::cpu_paths::attention_bwd},
      {"decode_attention", &seqkernels::cpu_paths::decode_attention},
      {"lstm", &seqkernels::cpu_paths::lstm},
  };
  const std::pair<const char*, Dt> dtypes[] = {
      {"float32", Dt::Float32}, {"bfloat16", Dt::BFloat16}, {"float16", Dt::Float16}, {"float64", Dt::Float64}};
  std::string ops;
  for (const auto& [name, fn] : families) {
    ops += ops.empty() ? "" : "|";
    ops += name;
    char sep = '=';
    for (const auto& [dname, dt] : dtypes) {
      ops += sep;
      ops += dname;
      ops += ':';
      ops += simd::isa_name(fn(dt));
      sep = ',';
    }
  }
  std::snprintf(buf, sizeof(buf), "active=%s;supported=%s;avx512_bf16=%d;amx_bf16=%d;ops=%s",
                simd::isa_name(simd::active_isa()), sup.c_str(), simd::cpu_features().avx512_bf16 ? 1 : 0,
                simd::cpu_features().amx_bf16 ? 1 : 0, ops.c_str());
  return buf;
}
