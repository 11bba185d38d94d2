// CPU fused attention: seqkernels::attention_fwd and seqkernels::attention_bwd.
//
// Arguments arrive normalized (docs/INTERNALS.md): scale resolved, causal folded into the
// window, the mask an expanded (B, Hq, Lq, Lk) view. The work is split so that it stays fast
// on a few cores and never copies K/V per query head:
//
//   pack      K and V of each (batch, kv head) are converted to the accumulation type once and
//             laid out for the register tiles: K^T in panels of NR keys ([panel][d][NR], the
//             B operand of S = Q K^T), V as rows padded to the vector width (the B operand of
//             O += P V). Keys at or past kv_lengths[b] are packed as zeros, so padding that
//             holds NaN cannot leak through 0 * NaN.
//   forward   one task per (batch, query head, block of query rows): online softmax over key
//             blocks (exp2 of (score - row max) * log2(e) evaluated in registers, the max kept
//             as the exact largest score), with S and P V computed by 6 x 2-vector register
//             tiles. Keys that the window / causal / length rule hides are skipped at the
//             granularity of 6 rows x NR keys, so a causal forward does half the work; the mask
//             is applied only on the boundary of that region (and everywhere when attn_mask is
//             given).
//   backward  FlashAttention-2 recomputation from lse. One task per (batch, kv head, range of
//             key blocks): for each key block it loops over the query heads of the group and
//             the query blocks that see it, so dK and dV are summed over the group in
//             registers and written once; dQ goes to a partial buffer owned by the task and
//             the partials are summed in a fixed order at the end. Nothing is atomic, so the
//             result does not depend on thread timing (`deterministic` needs no special path).
//
// Tasks are taken largest first from a shared counter, so both cores stay busy when B * H is
// small or the causal work per block is uneven; outputs do not depend on which thread ran a
// task. The inner loops exist twice: AVX2+FMA intrinsics (the policies of cpu/simd.h), selected
// per call on x86-64 (simd::selected_isa), and at::vec::Vectorized (NEON on ARM, plain C++
// elsewhere) as the portable fallback. bfloat16 inputs on AVX512_BF16 keep K, V, Q and dO as bf16
// and run the products by vdpbf16ps (float32 accumulation), forward (fwd_rows_avx512bf16) and
// backward (bwd_block_avx512bf16); the softmax and everything elementwise stays float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/attention_math.h"
#include "common/host_checks.h"
#include "common/philox.h"
#include "cpu/paths.h"
#include "cpu/simd.h"

#if defined(__GNUC__)
#define SK_FLATTEN __attribute__((flatten, noinline))
#define SK_UNROLL _Pragma("GCC unroll 16")
#else
#define SK_FLATTEN
#define SK_UNROLL
#endif

namespace seqkernels {
namespace {

using at::Tensor;

// Register tile: MR rows x 2 vectors. With AVX2 that is 12 accumulators + 2 B vectors + 1
// broadcast of the 16 ymm registers.
constexpr int kMR = 6;
// AVX-512 has 32 registers: 12 rows (24 accumulators + 2 + 1) read each B vector for twice the
// rows, half the loads of the K and V blocks (64 KiB each at D = 64, more than L1) per product.
// Measured a few percent on the float32 forward once the rows stopped reloading their addresses
// (micro_tile's row triples).
template <class P>
constexpr int kMRof = P::W * sizeof(typename P::T) == 64 ? 2 * kMR : kMR;

// ---------------------------------------------------------------------------------------------
// SIMD policies: the vector type and the few operations the kernels use. The AVX2 ones
// (simd::Avx2Float, simd::Avx2Double) live in cpu/simd.h with the rest of the AVX2 layer.
// ---------------------------------------------------------------------------------------------

template <typename Scalar>
struct VecPortable {
  using T = Scalar;
  using V = at::vec::Vectorized<T>;
  static constexpr int W = V::size();
  static V zero() { return V(T(0)); }
  static V set1(T x) { return V(x); }
  static V load(const T* p) { return V::loadu(p); }
  static void store(T* p, const V& x) { x.store(p); }
  static V bcast(const T* p) { return V(*p); }
  static V fmadd(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static V mul(const V& a, const V& b) { return a * b; }
  static V add(const V& a, const V& b) { return a + b; }
  static V sub(const V& a, const V& b) { return a - b; }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V exp2(const V& x) { return x.exp2(); }
  static V exp2_nonpos(const V& x) { return x.exp2(); }
  static V tanh(const V& x) { return x.tanh(); }
  static T hmax(const V& x) {
    T buf[W];
    x.store(buf);
    T r = buf[0];
    for (int i = 1; i < W; ++i) r = buf[i] > r ? buf[i] : r;
    return r;
  }
  static T hsum(const V& x) {
    T buf[W];
    x.store(buf);
    T r = buf[0];
    for (int i = 1; i < W; ++i) r += buf[i];
    return r;
  }
};

// ---------------------------------------------------------------------------------------------
// Register-tiled products.
//
// C[r][0:NV*W] (op)= sum_k A[r*a_rs + k*a_ks] * B[k*ldb + 0:NV*W] for r < MR. A element
// strides are free, so one kernel serves S = Q K^T (A = Q rows), O += P V (A = P rows) and the
// transposed products of the backward (A = P^T read column-wise).
// ---------------------------------------------------------------------------------------------

enum class Mode { Store, Add, ScaleAdd };  // C = AB, C += AB, C = C * alpha[r] + AB

template <class P, int MR, int NV, Mode M>
SK_POLICY_INLINE void micro_tile(const typename P::T* A, int64_t a_rs, int64_t a_ks, const typename P::T* B,
                                 int64_t ldb, int64_t K, typename P::T* C, int64_t ldc, const typename P::T* alpha) {
  using T = typename P::T;
  using V = typename P::V;
  constexpr int W = P::W;
  // The K products are summed from zero and added to C once at the end: C is a running sum
  // over many blocks (dK/dV over every query block that sees a key), and folding each product
  // into it directly costs a rounding at C's magnitude per term (for the first keys of a causal
  // L=2048 backward, 3x torch's error in dV, outside the §5 bound).
  V acc[MR][NV];
  SK_UNROLL for (int r = 0; r < MR; ++r) { SK_UNROLL for (int c = 0; c < NV; ++c) acc[r][c] = P::zero(); }
  // Rows in triples, one pointer each: row 3g + i is At[g] + i * a_rs, an x86 address of one
  // base and the stride register scaled by 1 or 2 elements. One pointer per row (12 of them at
  // MR = 12) outgrows the general registers and reloads addresses from the stack every step.
  constexpr int G = (MR + 2) / 3;
  const T* At[G];
  SK_UNROLL for (int g = 0; g < G; ++g) At[g] = A + 3 * g * a_rs;
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    SK_UNROLL for (int c = 0; c < NV; ++c) b[c] = P::load(B + c * W);
    B += ldb;
    SK_UNROLL for (int r = 0; r < MR; ++r) {
      const V a = P::bcast(At[r / 3] + (r % 3) * a_rs);
      SK_UNROLL for (int c = 0; c < NV; ++c) acc[r][c] = P::fmadd(a, b[c], acc[r][c]);
    }
    SK_UNROLL for (int g = 0; g < G; ++g) At[g] += a_ks;
  }
  SK_UNROLL for (int r = 0; r < MR; ++r) {
    SK_UNROLL for (int c = 0; c < NV; ++c) {
      T* cp = C + r * ldc + c * W;
      if constexpr (M == Mode::Store) {
        P::store(cp, acc[r][c]);
      } else if constexpr (M == Mode::Add) {
        P::store(cp, P::add(P::load(cp), acc[r][c]));
      } else {
        P::store(cp, P::fmadd(P::load(cp), P::set1(alpha[r]), acc[r][c]));
      }
    }
  }
}

// MR rows, ncols (a multiple of W) columns.
template <class P, int MR, Mode M>
SK_POLICY_INLINE void gemm_rows_fixed(const typename P::T* A, int64_t a_rs, int64_t a_ks, const typename P::T* B,
                                      int64_t ldb, int64_t K, typename P::T* C, int64_t ldc, int64_t ncols,
                                      const typename P::T* alpha) {
  constexpr int W = P::W;
  int64_t c = 0;
  for (; c + 2 * W <= ncols; c += 2 * W) {
    micro_tile<P, MR, 2, M>(A, a_rs, a_ks, B + c, ldb, K, C + c, ldc, alpha);
  }
  if (c < ncols) micro_tile<P, MR, 1, M>(A, a_rs, a_ks, B + c, ldb, K, C + c, ldc, alpha);
}

// Any number of rows: groups of kMRof<P>, then of kMR, then one narrower group.
template <class P, Mode M>
SK_POLICY_INLINE void gemm(int64_t rows, const typename P::T* A, int64_t a_rs, int64_t a_ks, const typename P::T* B,
                           int64_t ldb, int64_t K, typename P::T* C, int64_t ldc, int64_t ncols,
                           const typename P::T* alpha = nullptr) {
  int64_t r = 0;
  auto al = [&](int64_t r0) { return M == Mode::ScaleAdd ? alpha + r0 : nullptr; };
  if constexpr (kMRof<P> != kMR) {
    for (; r + kMRof<P> <= rows; r += kMRof<P>) {
      gemm_rows_fixed<P, kMRof<P>, M>(A + r * a_rs, a_rs, a_ks, B, ldb, K, C + r * ldc, ldc, ncols, al(r));
    }
  }
  for (; r + kMR <= rows; r += kMR) {
    gemm_rows_fixed<P, kMR, M>(A + r * a_rs, a_rs, a_ks, B, ldb, K, C + r * ldc, ldc, ncols, al(r));
  }
  const auto* Ar = A + r * a_rs;
  auto* Cr = C + r * ldc;
  switch (rows - r) {
    case 5:
      gemm_rows_fixed<P, 5, M>(Ar, a_rs, a_ks, B, ldb, K, Cr, ldc, ncols, al(r));
      break;
    case 4:
      gemm_rows_fixed<P, 4, M>(Ar, a_rs, a_ks, B, ldb, K, Cr, ldc, ncols, al(r));
      break;
    case 3:
      gemm_rows_fixed<P, 3, M>(Ar, a_rs, a_ks, B, ldb, K, Cr, ldc, ncols, al(r));
      break;
    case 2:
      gemm_rows_fixed<P, 2, M>(Ar, a_rs, a_ks, B, ldb, K, Cr, ldc, ncols, al(r));
      break;
    case 1:
      gemm_rows_fixed<P, 1, M>(Ar, a_rs, a_ks, B, ldb, K, Cr, ldc, ncols, al(r));
      break;
    default:
      break;
  }
}

// C[r][p * NR + c] = sum_k A[r * a_rs + k] * B[p * K * NR + k * NR + c] for np consecutive
// panels of NR = 2W columns (S = Q K^T of one row group against packed K^T panels), with the
// row addressing set up once for all panels.
template <class P, int MR>
SK_POLICY_INLINE void panels_fixed(const typename P::T* A, int64_t a_rs, const typename P::T* B, int64_t K, int64_t np,
                                   typename P::T* C, int64_t ldc) {
  constexpr int NR = 2 * P::W;
  for (int64_t p = 0; p < np; ++p) {
    micro_tile<P, MR, 2, Mode::Store>(A, a_rs, 1, B + p * K * NR, NR, K, C + p * NR, ldc, nullptr);
  }
}

// rows <= kMRof<P>: a whole wide tile, or kMR rows and then the rest.
template <class P>
SK_POLICY_INLINE void gemm_panels(int64_t rows, const typename P::T* A, int64_t a_rs, const typename P::T* B, int64_t K,
                                  int64_t np, typename P::T* C, int64_t ldc) {
  if constexpr (kMRof<P> != kMR) {
    static_assert(kMRof<P> == 2 * kMR, "one group of kMR rows and a narrower one cover the rest");
    if (rows == kMRof<P>) return panels_fixed<P, kMRof<P>>(A, a_rs, B, K, np, C, ldc);
    if (rows > kMR) {
      panels_fixed<P, kMR>(A, a_rs, B, K, np, C, ldc);
      A += kMR * a_rs;
      C += kMR * ldc;
      rows -= kMR;
    }
  }
  switch (rows) {
    case 6:
      panels_fixed<P, 6>(A, a_rs, B, K, np, C, ldc);
      break;
    case 5:
      panels_fixed<P, 5>(A, a_rs, B, K, np, C, ldc);
      break;
    case 4:
      panels_fixed<P, 4>(A, a_rs, B, K, np, C, ldc);
      break;
    case 3:
      panels_fixed<P, 3>(A, a_rs, B, K, np, C, ldc);
      break;
    case 2:
      panels_fixed<P, 2>(A, a_rs, B, K, np, C, ldc);
      break;
    case 1:
      panels_fixed<P, 1>(A, a_rs, B, K, np, C, ldc);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Mask and dropout, as seen by one row.
// ---------------------------------------------------------------------------------------------

enum class MaskKind : int { None, Bool, Half, BFloat16, Float, Double };

struct MaskDesc {
  MaskKind kind = MaskKind::None;
  const void* ptr = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;  // element strides of the expanded (B, Hq, Lq, Lk) view
};

// Applies attn_mask(b, h, i, j0 + t) to the scaled scores s[t], t < n: bool False -> -inf,
// float -> + value. When `dp` is given (the backward), masked-out entries of dP are cleared too
// so that 0 * inf cannot appear in dS.
// A bool mask is applied as bit masks (keep = all ones where the mask is True): g++ does not
// vectorize `s = m ? s : -inf` (it keeps the conditional store, a branch per key that mispredicts
// on every random entry: a (1,1,1024,1024) mask with 30% False made the float32 forward at
// (1,8,1024,64) 2.6x slower than the same mask as -inf / 0 floats), while the and/or form
// vectorizes for the entry point's ISA. Contiguous rows get their own instantiation for that.
template <bool kContiguous, typename T, typename M>
inline void mask_row_loops(const M* m, int64_t sj, T* s, T* dp, int64_t n) {
  const int64_t st = kContiguous ? 1 : sj;
  if constexpr (std::is_same_v<M, bool>) {
    using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    static_assert(sizeof(U) == sizeof(T), "float or double scores");
    const T ninf = -std::numeric_limits<T>::infinity();
    U ninf_bits;
    std::memcpy(&ninf_bits, &ninf, sizeof(T));
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(m);
    for (int64_t t = 0; t < n; ++t) {
      const U keep = U(0) - U(mb[t * st] != 0);
      U x;
      std::memcpy(&x, s + t, sizeof(T));
      x = (x & keep) | (ninf_bits & ~keep);
      std::memcpy(s + t, &x, sizeof(T));
    }
    if (dp) {
      for (int64_t t = 0; t < n; ++t) {
        const U keep = U(0) - U(mb[t * st] != 0);
        U x;
        std::memcpy(&x, dp + t, sizeof(T));
        x &= keep;  // +0.0 where masked out
        std::memcpy(dp + t, &x, sizeof(T));
      }
    }
  } else {
    for (int64_t t = 0; t < n; ++t) s[t] += static_cast<T>(m[t * st]);
  }
}

template <typename T, typename M>
inline void mask_row_typed(const M* m, int64_t sj, T* s, T* dp, int64_t n) {
  if (sj == 1) {
    mask_row_loops<true>(m, sj, s, dp, n);
  } else {
    mask_row_loops<false>(m, sj, s, dp, n);
  }
}

template <typename T>
inline void apply_mask_row(const MaskDesc& mk, int64_t b, int64_t h, int64_t i, int64_t j0, T* s, T* dp, int64_t n) {
  const int64_t off = b * mk.sb + h * mk.sh + i * mk.si + j0 * mk.sj;
  switch (mk.kind) {
    case MaskKind::Bool:
      mask_row_typed(static_cast<const bool*>(mk.ptr) + off, mk.sj, s, dp, n);
      break;
    case MaskKind::Half:
      mask_row_typed(static_cast<const c10::Half*>(mk.ptr) + off, mk.sj, s, dp, n);
      break;
    case MaskKind::BFloat16:
      mask_row_typed(static_cast<const c10::BFloat16*>(mk.ptr) + off, mk.sj, s, dp, n);
      break;
    case MaskKind::Float:
      mask_row_typed(static_cast<const float*>(mk.ptr) + off, mk.sj, s, dp, n);
      break;
    case MaskKind::Double:
      mask_row_typed(static_cast<const double*>(mk.ptr) + off, mk.sj, s, dp, n);
      break;
    case MaskKind::None:
      break;
  }
}

struct DropoutDesc {
  bool on = false;
  uint64_t seed = 0, offset = 0, threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p), 0 when p >= 1
};

inline bool keep_element(const DropoutDesc& d, uint64_t n) {
  return static_cast<uint64_t>(philox_keep_word(d.seed, d.offset, n)) >= d.threshold;
}

template <typename T>
inline void fill(T* p, int64_t n, T v) {
  for (int64_t t = 0; t < n; ++t) p[t] = v;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The key columns that rows [i0, i0 + n) see within [j0, j1) (lo[i], hi[i]: row i's visible
// keys), widened to whole panels of NR: [pl, pl + w); w = 0 when none of the rows sees any.
struct KeySpan {
  int64_t pl = 0, w = 0;
};
inline KeySpan visible_span(const int64_t* lo, const int64_t* hi, int64_t i0, int64_t n, int64_t j0, int64_t j1,
                            int64_t NR) {
  int64_t glo = std::numeric_limits<int64_t>::max(), ghi = std::numeric_limits<int64_t>::min();
  for (int64_t i = i0; i < i0 + n; ++i) {
    if (lo[i] < hi[i]) {
      glo = std::min(glo, lo[i]);
      ghi = std::max(ghi, hi[i]);
    }
  }
  const int64_t cl = std::max(glo, j0), ch = std::min(ghi, j1);
  if (cl >= ch) return {};
  const int64_t pl = cl / NR * NR;
  return {pl, round_up(ch, NR) - pl};
}

// ---------------------------------------------------------------------------------------------
// Score modifiers (common/attention_math.h: ScoreMods), as one (batch, query head) sees them.
// They are applied to a row's scores in the tile, right after S = Q K^T and before the mask, so
// no (B, H, Lq, Lk) bias is ever materialized; with none on, the kernels test one flag per row
// and block and run the plain code.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct RowMods {
  T cap = T(0);      // softcap c (0: off)
  T inv_cap = T(0);  // 1 / c: a product per score instead of a division
  T slope = T(0);    // ALiBi slope of (b, h)
  bool alibi = false;
  int64_t off = 0;  // diagonal offset: query row i sits at diag = i + off (visible_keys' rule)
  bool on() const { return cap > T(0) || alibi; }
};

template <typename T>
RowMods<T> row_mods(const ScoreMods<T>& mods, int64_t b, int64_t h, int64_t Hq, int64_t off) {
  RowMods<T> r;
  if (mods.softcap > T(0)) {
    r.cap = mods.softcap;
    r.inv_cap = T(1) / mods.softcap;
  }
  r.alibi = mods.alibi != nullptr;
  r.slope = mods.slope(b, h, Hq);
  r.off = off;
  return r;
}

// 0, 1, ..., 15: the lane offsets of a vector of key indices.
template <typename T>
struct Lanes {
  alignas(64) static constexpr T v[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
};

// The scores s[0:w) (w a multiple of W) of one query row with diagonal `diag` against keys
// pl, pl + 1, ...: softcap, then ALiBi. When `g` is given (the backward) it receives the softcap
// derivative 1 - tanh^2(s / c) = softcap_grad(capped, c), for dS. Hidden and padded keys are
// modified too (a few wasted lanes, no branch); the caller overwrites them with -inf after.
template <class P>
SK_POLICY_INLINE void apply_mods_row(typename P::T* s, int64_t w, int64_t pl, int64_t diag,
                                     const RowMods<typename P::T>& md, typename P::T* g) {
  using T = typename P::T;
  using V = typename P::V;
  constexpr int W = P::W;
  static_assert(W <= 16, "Lanes holds 16 offsets");
  if (md.cap > T(0)) {
    const V c = P::set1(md.cap), ic = P::set1(md.inv_cap), one = P::set1(T(1));
    for (int64_t j = 0; j < w; j += W) {
      const V t = P::tanh(P::mul(P::load(s + j), ic));
      P::store(s + j, P::mul(c, t));
      if (g != nullptr) P::store(g + j, P::sub(one, P::mul(t, t)));
    }
  }
  if (md.alibi) {
    // Distances diag - j as exact integers in T (|diag - j| < 2^24 for any realistic length),
    // |x| as max(x, -x).
    const V ns = P::set1(-md.slope), step = P::set1(T(W)), zero = P::zero();
    V d = P::sub(P::set1(static_cast<T>(diag - pl)), P::load(Lanes<T>::v));
    for (int64_t j = 0; j < w; j += W) {
      const V ad = P::max(d, P::sub(zero, d));
      P::store(s + j, P::fmadd(ns, ad, P::load(s + j)));
      d = P::sub(d, step);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: a block of query rows of one (b, h) against the packed K/V of its kv head.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct FwdRows {
  int64_t D, Dvp, BN;  // head dims (Dvp: Dv padded to W), key block
  const T* Qs;         // nrows x D, pre-multiplied by scale (by 1 where post_scale carries it)
  const T* Kp;         // K^T panels of the kv head: panel p at Kp + p * D * NR
  const T* Vp;         // V rows of the kv head, Lk_pad x Dvp
  int64_t nrows;
  const int64_t* lo;  // per row: visible keys [lo, hi) (window / causal / length)
  const int64_t* hi;
  MaskDesc mask;
  int64_t b, h, i0;  // for the mask and the dropout index
  DropoutDesc drop;
  uint64_t n_row0;  // dropout index of (row 0, key 0); rows are Lk apart
  int64_t Lk;
  RowMods<T> mods;  // of (b, h); row r's diagonal is i0 + r + mods.off
  T* O;             // nrows x Dvp accumulators (unnormalized)
  T* m;             // running max of the scores (natural log domain), -inf initially
  T* l;             // running sum, 0 initially
  T* P;             // kRows x BN scratch (kRows: Kernels::mr, the products' row group)
  T* alpha;         // kRows scratch
  // The bfloat16 dot path only (Kernels::bf16, float32 accumulation): the operands as the input's
  // raw bf16 bits, laid out in pairs for vdpbf16ps (pack_*_bf16); Qs, Kp and Vp are unused then.
  int64_t D2 = 0;                // D rounded up to Kernels::d_align (zeros pad the head dim)
  const uint16_t* Qh = nullptr;  // nrows x D2, not scaled: the scores are scaled in float32;
                                 // the AMX path reads rows up to nrows rounded up to 32 (zeros)
  const uint16_t* Kh = nullptr;  // K^T panels of key pairs: panel p at Kh + p * D2 * NR
  const uint16_t* Vh = nullptr;  // V as key pairs: pair j/2 at Vh + (j/2) * 2 * Dvp
  uint16_t* Ph = nullptr;        // kRows x BN scratch: P rounded to bf16 for the P V product
  T qk_scale = T(1);             // the softmax scale, applied to Q K^T
  // The float paths: the scale, where Q was packed without it (cpu_paths::scale_after_products);
  // the softmax then scales the scores as it reads them.
  T post_scale = T(1);
};

// A row of fwd_softmax_row whose running max is still -inf after this block: nothing but -inf
// so far (scores of finfo.min are finite and do not come here: such a row averages the keys it
// sees, as torch does). All-NaN scores (a NaN query row) must still give NaN, as plain softmax
// does; everything else here is masked and contributes nothing.
template <typename T>
inline void no_finite_scores(T* s, int64_t w, int64_t c0, int64_t c1, T& m, T& l, T& alpha) {
  bool nan = false;
  for (int64_t j = c0; j < c1; ++j) nan |= std::isnan(s[j]);
  if (nan) {
    m = l = alpha = std::numeric_limits<T>::quiet_NaN();
  }
  fill(s, w, T(0));
}

// Dropout of row r's P in a key block (after its sum: l is the undropped normalizer).
template <typename T>
inline void drop_row(T* s, int64_t c0, int64_t c1, int64_t pl, const FwdRows<T>& a, int64_t r) {
  const uint64_t n0 = a.n_row0 + static_cast<uint64_t>(r) * a.Lk + pl;
  for (int64_t j = c0; j < c1; ++j) {
    if (!keep_element(a.drop, n0 + j)) s[j] = T(0);
  }
}

// One row of one key block: mask, running max, exp2, running sum; leaves P (dropped entries
// zeroed) in s and the factor that rescales the row's accumulators in alpha.
//
// Scores, the running max m and lse stay in the natural-log domain (the mask adds to them as is):
// m is the exact largest score and P = exp2((s - m) * log2(e)), a subtraction then a product
// (softmax_lse_ln in common/attention_math.h). s - m <= 0 for every finite score and the max
// element gets exactly 1, so any finite scores work, up to the type's limits. The former
// exp2(fma(s, log2(e), -m * log2(e))) broke there: m * log2(e) rounds by up to ulp(m), which is
// itself an exp2 argument (NaN from inf / inf once |s| > ~1.5e9), and overflows to -inf for
// scores near the lowest finite value (a finfo.min mask), which made a row that sees keys look
// like one that sees none (0, lse -inf).
//
// sc != 1: s holds the scores before the softmax scale (the AMX products), scaled here first:
// modifiers and masks see scaled scores. (Rows without either take fwd_softmax_rows16, whose max
// pass scales as it reads.) Stored scaled, not fused into the exp2 pass, so that no compiler
// contracts s * sc - m into one FMA (an unrounded product minus the rounded max: the failure
// above).
template <class P>
SK_POLICY_INLINE void fwd_softmax_row(typename P::T* s, int64_t w, int64_t pl, int64_t lo, int64_t hi, typename P::T& m,
                                      typename P::T& l, typename P::T& alpha, const FwdRows<typename P::T>& a,
                                      int64_t r, typename P::T sc = typename P::T(1)) {
  using T = typename P::T;
  using V = typename P::V;
  constexpr int W = P::W;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const int64_t c0 = std::max(lo, pl) - pl, c1 = std::min(hi, pl + w) - pl;
  alpha = T(1);
  if (c0 >= c1) {
    fill(s, w, T(0));
    return;
  }
  if (sc != T(1)) {
    const V scv = P::set1(sc);
    for (int64_t j = 0; j < w; j += W) P::store(s + j, P::mul(P::load(s + j), scv));
  }
  if (a.mods.on()) apply_mods_row<P>(s, w, pl, a.i0 + r + a.mods.off, a.mods, nullptr);
  fill(s, c0, -kInf);
  fill(s + c1, w - c1, -kInf);
  if (a.mask.kind != MaskKind::None) {
    apply_mask_row<T>(a.mask, a.b, a.h, a.i0 + r, pl + c0, s + c0, nullptr, c1 - c0);
  }
  V mv = P::set1(-kInf);
  for (int64_t j = 0; j < w; j += W) mv = P::max(P::load(s + j), mv);
  const T mx = P::hmax(mv);
  const T m_new = mx > m ? mx : m;
  if (m_new == -kInf) {
    no_finite_scores(s, w, c0, c1, m, l, alpha);
    return;
  }
  // The running max rarely moves after the first blocks; rescaling is skipped then. m - m_new
  // is -inf for the first finite block (m = -inf) and may overflow to -inf: alpha = 0 either way.
  alpha = m_new == m ? T(1) : std::exp2((m - m_new) * T(kLog2e));
  const V mn = P::set1(m_new), l2e = P::set1(T(kLog2e));
  V sum = P::zero();
  for (int64_t j = 0; j < w; j += W) {
    const V p = P::exp2_nonpos(P::mul(P::sub(P::load(s + j), mn), l2e));
    P::store(s + j, p);
    sum = P::add(sum, p);
  }
  l = l * alpha + P::hsum(sum);
  m = m_new;
  if (a.drop.on) drop_row(s, c0, c1, pl, a, r);
}

#if SK_SIMD_X86
// fwd_softmax_row for n <= 16 rows r0 .. r0 + n - 1 at once (the 16-lane float32 policies, rows
// without modifiers or mask): the same numbers, with the per-row scalar work in vectors, lane r
// for row r0 + r. Per row and 256-key block the row's max and sum reductions, the compare with
// the running max and the running sum's update were about a fifth of the softmax (perf of the
// AMX forward at (4,8,512,64)); reduce16_rows does sixteen rows' reductions in the shuffles of
// one, in hsum's tree (bitwise the row version's l). Rows that see no key here, or whose running
// max is still -inf, take the row version's steps. alpha points at row r0's. The alpha and exp2
// passes repeat the row version's instead of sharing a helper with it: tried, the helper changed
// which products g++ contracts into FMAs in the row version on the AVX2 level (other bits).
template <class P>
SK_AVX512_FN void fwd_softmax_rows16(float* S, int64_t BN, int64_t n, int64_t w, int64_t pl, int64_t r0,
                                     const FwdRows<float>& a, float* alpha, float sc) {
  using V = __m512;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  V part[16];
  int64_t c0s[16], c1s[16];
  __mmask16 live = 0;
  for (int64_t r = 0; r < 16; ++r) {
    part[r] = P::set1(-kInf);
    if (r >= n) continue;
    float* s = S + r * BN;
    const int64_t c0 = std::max(a.lo[r0 + r], pl) - pl, c1 = std::min(a.hi[r0 + r], pl + w) - pl;
    c0s[r] = c0;
    c1s[r] = c1;
    if (c0 >= c1) {
      alpha[r] = 1.f;
      fill(s, w, 0.f);
      continue;
    }
    live |= static_cast<__mmask16>(1u << r);
    // The max never takes a NaN score (vmaxps returns its second operand, mv): no NaN lanes.
    // sc != 1 (AMX): the scores are scaled as the max pass reads them, and stored, in place of a
    // pass of their own right after the tile stores (which waited on them). The columns outside
    // [c0, c1) become -inf after the scale, not before: -inf times a scale <= 0 (any finite scale
    // is valid) is +inf or NaN.
    V mv = P::set1(-kInf);
    if (sc == 1.f) {
      fill(s, c0, -kInf);
      fill(s + c1, w - c1, -kInf);
      for (int64_t j = 0; j < w; j += 16) mv = P::max(P::load(s + j), mv);
    } else if (c0 == 0 && c1 == w) {  // the whole block visible: no padding column to set
      const V scv = P::set1(sc);
      for (int64_t j = 0; j < w; j += 16) {
        const V x = P::mul(P::load(s + j), scv);
        P::store(s + j, x);
        mv = P::max(x, mv);
      }
    } else {
      const V scv = P::set1(sc), ninf = P::set1(-kInf);
      for (int64_t j = 0; j < w; j += 16) {
        V x = P::mul(P::load(s + j), scv);
        if (j < c0 || j + 16 > c1) {
          // Lanes j + l with c0 <= j + l < c1 keep their score.
          const int64_t lo = std::clamp<int64_t>(c0 - j, 0, 16), hi = std::clamp<int64_t>(c1 - j, 0, 16);
          const auto in = static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
          x = _mm512_mask_blend_ps(in, ninf, x);
        }
        P::store(s + j, x);
        mv = P::max(x, mv);
      }
    }
    part[r] = mv;
  }
  if (live == 0) return;
  const V mx = simd::hmax16_rows(part);
  const V m_old = _mm512_maskz_loadu_ps(live, a.m + r0);
  // m_new = mx > m ? mx : m (a NaN m stays NaN, as in the row version).
  const V m_new = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx, m_old, _CMP_GT_OQ), m_old, mx);
  alignas(64) float mo[16], mn[16], al[16];
  _mm512_store_ps(mo, m_old);
  _mm512_store_ps(mn, m_new);
  const __mmask16 none = _mm512_mask_cmp_ps_mask(live, m_new, P::set1(-kInf), _CMP_EQ_OQ);
  const __mmask16 ok = live & ~none;
  for (int64_t r = 0; r < n; ++r) {
    if ((none >> r) & 1) {
      alpha[r] = 1.f;  // the slot may hold another row's factor (a NaN row's NaN)
      no_finite_scores(S + r * BN, w, c0s[r], c1s[r], a.m[r0 + r], a.l[r0 + r], alpha[r]);
    }
  }
  if (ok == 0) return;
  // alpha as the row version computes it: 1 where the max stayed, exp2((m - m_new) log2(e)) where
  // it moved (0 from m = -inf, the first block that sees a finite score).
  for (int64_t r = 0; r < n; ++r) {
    if ((ok >> r) & 1) al[r] = mn[r] == mo[r] ? 1.f : std::exp2((mo[r] - mn[r]) * static_cast<float>(kLog2e));
  }
  const V l2e = P::set1(static_cast<float>(kLog2e));
  for (int64_t r = 0; r < 16; ++r) {
    if (!((ok >> r) & 1)) {
      part[r] = P::zero();
      continue;
    }
    float* s = S + r * BN;
    const V m1 = P::set1(mn[r]);
    V sum = P::zero();
    for (int64_t j = 0; j < w; j += 16) {
      const V p = P::exp2_nonpos(P::mul(P::sub(P::load(s + j), m1), l2e));
      P::store(s + j, p);
      sum = P::add(sum, p);
    }
    part[r] = sum;
  }
  const V sums = simd::hsum16_rows(part);
  const V alv = _mm512_maskz_loadu_ps(ok, al);
  // l = l * alpha + sum in one rounding, as the row version's l * alpha + hsum, which the compiler
  // contracts to an FMA on these levels (checked: both forms give the same bits).
  _mm512_mask_storeu_ps(a.l + r0, ok, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(ok, a.l + r0), alv, sums));
  _mm512_mask_storeu_ps(a.m + r0, ok, m_new);
  _mm512_mask_storeu_ps(alpha, ok, alv);
  if (a.drop.on) {
    for (int64_t r = 0; r < n; ++r) {
      if ((ok >> r) & 1) drop_row(S + r * BN, c0s[r], c1s[r], pl, a, r0 + r);
    }
  }
}
#endif

// The softmax of rows r0 .. r0 + mr - 1 in one key block (S: row r at S + r * BN; alpha: row r0's).
template <class P>
SK_POLICY_INLINE void fwd_softmax_group(typename P::T* S, int64_t mr, int64_t w, int64_t pl, int64_t r0,
                                        const FwdRows<typename P::T>& a, typename P::T* alpha, typename P::T sc) {
#if SK_SIMD_X86
  if constexpr (P::W == 16 && std::is_same_v<typename P::T, float>) {
    if (!a.mods.on() && a.mask.kind == MaskKind::None) {
      for (int64_t rb = 0; rb < mr; rb += 16)
        fwd_softmax_rows16<P>(S + rb * a.BN, a.BN, std::min<int64_t>(16, mr - rb), w, pl, r0 + rb, a, alpha + rb, sc);
      return;
    }
  }
#endif
  for (int64_t r = 0; r < mr; ++r) {
    fwd_softmax_row<P>(S + r * a.BN, w, pl, a.lo[r0 + r], a.hi[r0 + r], a.m[r0 + r], a.l[r0 + r], alpha[r], a, r0 + r,
                       sc);
  }
}

// The two products of the forward in the accumulation type, on the packed T operands: S = Q K^T
// for `mr` rows from r0 against keys [pl, pl + w), and O = O * alpha + P V.
template <class P>
struct FwdProducts {
  using T = typename P::T;
  static constexpr int NR = 2 * P::W;
  static constexpr int64_t kRows = kMRof<P>;  // rows per group: the register tile's
  static constexpr bool kUnscaled = false;    // scores() leaves S scaled (Q was)
  SK_POLICY_INLINE static void scores(const FwdRows<T>& a, int64_t mr, int64_t r0, int64_t pl, int64_t w, T* S) {
    gemm_panels<P>(mr, a.Qs + r0 * a.D, a.D, a.Kp + (pl / NR) * a.D * NR, a.D, w / NR, S, a.BN);
  }
  SK_POLICY_INLINE static void pv(const FwdRows<T>& a, int64_t mr, int64_t r0, const T* S, int64_t pl, int64_t w) {
    gemm<P, Mode::ScaleAdd>(mr, S, a.BN, 1, a.Vp + pl * a.Dvp, a.Dvp, w, a.O + r0 * a.Dvp, a.Dvp, a.Dvp, a.alpha);
  }
};

// Rows go in groups of Products::kRows (the products' row tile): the scratch P and alpha hold one
// group.
template <class P, class Products = FwdProducts<P>>
SK_POLICY_INLINE void fwd_rows(const FwdRows<typename P::T>& a) {
  using T = typename P::T;
  constexpr int NR = 2 * P::W;
  constexpr int64_t MR = Products::kRows;
  int64_t klo = std::numeric_limits<int64_t>::max(), khi = std::numeric_limits<int64_t>::min();
  for (int64_t r = 0; r < a.nrows; ++r) {
    if (a.lo[r] < a.hi[r]) {
      klo = std::min(klo, a.lo[r]);
      khi = std::max(khi, a.hi[r]);
    }
  }
  if (klo >= khi) return;
  const int64_t kend = round_up(khi, NR), BN = a.BN;
  for (int64_t j0 = klo / NR * NR; j0 < khi; j0 += BN) {
    const int64_t j1 = std::min(j0 + BN, kend);
    for (int64_t r0 = 0; r0 < a.nrows; r0 += MR) {
      const int64_t mr = std::min<int64_t>(MR, a.nrows - r0);
      const auto [pl, w] = visible_span(a.lo, a.hi, r0, mr, j0, j1, NR);
      if (w == 0) continue;  // these rows see nothing here: their state is unchanged
      T* S = a.P;
      Products::scores(a, mr, r0, pl, w, S);
      fwd_softmax_group<P>(S, mr, w, pl, r0, a, a.alpha, Products::kUnscaled ? a.qk_scale : a.post_scale);
      Products::pv(a, mr, r0, S, pl, w);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: one key block of one (b, kv head) against every query head of its group.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct BwdBlock {
  int64_t D, Dp, Dv, Dvp;  // head dims and their W-padded row lengths
  int64_t BM, BN;          // query rows per step; ld of the S / dP scratch
  int64_t j0, j1;          // the key block [j0, j1), NR-aligned
  const T* Kt;             // K^T panels of the kv head ([panel][D][NR])
  const T* Kr;             // K rows, Lk_pad x Dp
  const T* Vt;             // V^T panels ([panel][Dv][NR])
  int64_t Hg, Lq;          // query heads in the group, query rows of the unit
  int64_t Lr;              // rows per head of dQ (and of Qh, dOh): Lq, or Lq padded for the tiles
  const T* Qp;             // per head Lq x Dp, pre-multiplied by scale (by 1 where post_scale carries it)
  const T* dOp;            // per head Lq x Dvp
  const T* Delta;          // per head Lq: rowsum(dO * O)
  const T* lse;            // per head Lq
  const T* corr;           // per head Lq: lse correction, log2 domain (lse_corrections)
  T* dQ;                   // per head Lq x Dp partial sums of dS K (this task's own)
  const int64_t* lo;       // per query row of the batch: visible keys [lo, hi)
  const int64_t* hi;
  int64_t ilo, ihi;  // query rows that may see this block
  MaskDesc mask;
  int64_t b, h0, Hq;  // h0: first query head of the group
  int64_t dLq, Lk;    // dims of the dropout index (Units::drop_Lq, drop_Lk)
  int64_t dr0, dc0;   // where the call's rows and keys start in it (Units::drop_r0, drop_c0)
  DropoutDesc drop;
  const ScoreMods<T>* mods;  // nullptr: none on
  int64_t off;               // diagonal offset of the batch (query row i sits at i + off)
  T* G;                      // BN scratch: one row's softcap derivative
  T* S;                      // BM x BN scratch: scores, then dropped P
  T* dP;                     // BM x BN scratch: dP, then dS
  T* dK;                     // (j1 - j0) x Dp accumulators
  T* dV;                     // (j1 - j0) x Dvp accumulators
  // The bfloat16 dot path only (Kernels::bf16, bwd_block_avx512bf16): the operands as raw bf16
  // bits in pairs along each product's sum index (BwdPack::Kh ..), Kt, Kr, Vt, Qp and dOp unused.
  // dK and dV then hold the transposed accumulators dK^T (D x BN) and dV^T (Dv x BN), ld BN.
  int64_t D2 = 0, Dv2 = 0, Lq2 = 0;  // D, Dv and Lq rounded up to even (to 32 for the AMX tiles)
  const uint16_t* Kh = nullptr;      // K^T panels of d-pairs, [panel][D2 / 2][NR][2]
  const uint16_t* Krh = nullptr;     // K rows as key pairs, [j / 2][Dp][2]
  const uint16_t* Vh = nullptr;      // V^T panels of dv-pairs, [panel][Dv2 / 2][NR][2]
  const uint16_t* Qh = nullptr;      // per head Lq x D2 rows, not scaled
  const uint16_t* dOh = nullptr;     // per head Lq x Dv2 rows
  const uint16_t* QTh = nullptr;     // per head Q^T as row pairs: (Q[i][d], Q[i + 1][d]) at d * Lq2 + i
  const uint16_t* dOTh = nullptr;    // per head dO^T as row pairs, Dv x Lq2
  uint16_t* Pi = nullptr;            // BM / 2 x BN x 2 scratch: dropped P as row pairs
  uint16_t* dSi = nullptr;           // BM / 2 x BN x 2 scratch: dS as row pairs
  uint16_t* dSh = nullptr;           // BM x BN scratch: dS rows
  T qk_scale = T(1);                 // the softmax scale: applied to Q K^T and to dK in float32
  T post_scale = T(1);               // the float paths, Qp packed without the scale: S and dK get it
};

// One query row against the key columns [pl, pl + w): P = exp(s - lse), dS = P * (dP - Delta),
// both with dropout applied; s <- dropped P (for dV), dp <- dS (for dK and dQ). The scores stay
// in the natural-log domain here: s - lse cancels almost exactly near the row max, and scaling
// only that small difference by log2(e) keeps P as accurate as plain softmax, which a log2-domain
// lse (one more rounding at |lse| ~ 10) would not. `corr` (0 but for rows of huge |lse|, see
// lse_corrections) is subtracted by the FMA that applies log2(e): P = exp2((s - lse) log2(e) - corr).
template <class P>
SK_POLICY_INLINE void bwd_row(typename P::T* s, typename P::T* dp, int64_t w, int64_t pl, int64_t lo, int64_t hi,
                              typename P::T lse, typename P::T corr, typename P::T delta,
                              const BwdBlock<typename P::T>& a, int64_t h, int64_t i,
                              const RowMods<typename P::T>* md) {
  using T = typename P::T;
  using V = typename P::V;
  constexpr int W = P::W;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const int64_t c0 = std::max(lo, pl) - pl, c1 = std::min(hi, pl + w) - pl;
  if (c0 >= c1 || lse == -kInf) {
    fill(s, w, T(0));
    fill(dp, w, T(0));
    return;
  }
  // With softcap, dS is multiplied by d capped / d s (in g) before it meets Q or K.
  T* g = nullptr;
  if (md != nullptr) {
    if (md->cap > T(0)) g = a.G;
    apply_mods_row<P>(s, w, pl, i + md->off, *md, g);
  }
  fill(s, c0, -kInf);
  fill(s + c1, w - c1, -kInf);
  fill(dp, c0, T(0));
  fill(dp + c1, w - c1, T(0));
  if (a.mask.kind != MaskKind::None) {
    apply_mask_row<T>(a.mask, a.b, h, i, pl + c0, s + c0, dp + c0, c1 - c0);
  }
  if (std::isnan(lse)) {
    // A NaN row (NaN in its query or in a key it sees): NaN wherever it sees a key, exactly 0
    // for keys it does not see, as the reference's selection gives; exp2(-inf - NaN) would
    // otherwise spread NaN into dK/dV of hidden and padded keys.
    const T nan = std::numeric_limits<T>::quiet_NaN();
    const uint64_t n0 = ((static_cast<uint64_t>(a.b) * a.Hq + h) * a.dLq + a.dr0 + i) * a.Lk + a.dc0 + pl;
    for (int64_t j = 0; j < w; ++j) {
      const bool seen = s[j] != -kInf;
      dp[j] = seen ? nan : T(0);
      s[j] = seen && (!a.drop.on || keep_element(a.drop, n0 + j)) ? nan : T(0);
    }
    return;
  }
  const V lv = P::set1(lse), nc = P::set1(-corr), dl = P::set1(delta), l2e = P::set1(T(kLog2e));
  if (!a.drop.on) {
    if (g == nullptr) {
      for (int64_t j = 0; j < w; j += W) {
        const V p = P::exp2(P::fmadd(P::sub(P::load(s + j), lv), l2e, nc));
        P::store(dp + j, P::mul(p, P::sub(P::load(dp + j), dl)));
        P::store(s + j, p);
      }
    } else {
      for (int64_t j = 0; j < w; j += W) {
        const V p = P::exp2(P::fmadd(P::sub(P::load(s + j), lv), l2e, nc));
        P::store(dp + j, P::mul(P::mul(p, P::sub(P::load(dp + j), dl)), P::load(g + j)));
        P::store(s + j, p);
      }
    }
    return;
  }
  for (int64_t j = 0; j < w; j += W) {
    P::store(s + j, P::exp2(P::fmadd(P::sub(P::load(s + j), lv), l2e, nc)));
  }
  const T ks = static_cast<T>(a.drop.keep_scale);
  const uint64_t n0 = ((static_cast<uint64_t>(a.b) * a.Hq + h) * a.dLq + a.dr0 + i) * a.Lk + a.dc0 + pl;
  for (int64_t j = 0; j < w; ++j) {
    const T p = s[j];
    const bool keep = j >= c0 && j < c1 && keep_element(a.drop, n0 + j);
    const T dpk = keep ? dp[j] * ks : T(0);
    dp[j] = p * (dpk - delta);
    s[j] = keep ? p * ks : T(0);
  }
  if (g != nullptr) {
    for (int64_t j = 0; j < w; j += W) P::store(dp + j, P::mul(P::load(dp + j), P::load(g + j)));
  }
}

// Query head hh of a backward block's group: its rows of Delta, lse and corr, its head index and
// its score modifiers (mods: nullptr when none is on). Not copyable: mods points into it.
template <typename T>
struct BwdHead {
  const T *Delta, *lse, *corr;
  int64_t h;
  RowMods<T> md;
  const RowMods<T>* mods = nullptr;
  BwdHead(const BwdBlock<T>& a, int64_t hh)
      : Delta(a.Delta + hh * a.Lq), lse(a.lse + hh * a.Lq), corr(a.corr + hh * a.Lq), h(a.h0 + hh) {
    if (a.mods != nullptr) md = row_mods(*a.mods, a.b, h, a.Hq, a.off);
    if (md.on()) mods = &md;
  }
  BwdHead(const BwdHead&) = delete;
  BwdHead& operator=(const BwdHead&) = delete;
};

// x[r ld + j] *= s for r < rows, j < cols (cols a multiple of P::W).
template <class P>
SK_POLICY_INLINE void scale_block(typename P::T* x, int64_t rows, int64_t cols, int64_t ld, typename P::T s) {
  const auto sv = P::set1(s);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; j += P::W) P::store(x + r * ld + j, P::mul(P::load(x + r * ld + j), sv));
}

template <class P>
SK_POLICY_INLINE void bwd_block(const BwdBlock<typename P::T>& a) {
  using T = typename P::T;
  constexpr int NR = 2 * P::W;
  const int64_t D = a.D, Dp = a.Dp, Dv = a.Dv, Dvp = a.Dvp, BN = a.BN, Lq = a.Lq;
  for (int64_t hh = 0; hh < a.Hg; ++hh) {
    const T* Qp = a.Qp + hh * Lq * Dp;
    const T* dOp = a.dOp + hh * Lq * Dvp;
    T* dQ = a.dQ + hh * a.Lr * Dp;
    const BwdHead<T> hd(a, hh);
    for (int64_t i0 = a.ilo; i0 < a.ihi; i0 += a.BM) {
      const int64_t nr = std::min(a.BM, a.ihi - i0);
      const auto [pl, w] = visible_span(a.lo, a.hi, i0, nr, a.j0, a.j1, NR);
      if (w == 0) continue;
      const int64_t ph = pl + w;
      for (int64_t p = pl; p < ph; p += NR) {
        gemm<P, Mode::Store>(nr, Qp + i0 * Dp, Dp, 1, a.Kt + (p / NR) * D * NR, NR, D, a.S + (p - pl), BN, NR);
        gemm<P, Mode::Store>(nr, dOp + i0 * Dvp, Dvp, 1, a.Vt + (p / NR) * Dv * NR, NR, Dv, a.dP + (p - pl), BN, NR);
      }
      if (a.post_scale != T(1)) scale_block<P>(a.S, nr, w, BN, a.post_scale);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        bwd_row<P>(a.S + r * BN, a.dP + r * BN, w, pl, a.lo[i], a.hi[i], hd.lse[i], hd.corr[i], hd.Delta[i], a, hd.h, i,
                   hd.mods);
      }
      // dV[j] += sum_i P[i][j] dO[i];  dK[j] += sum_i dS[i][j] Q[i];  dQ[i] += sum_j dS[i][j] K[j]
      gemm<P, Mode::Add>(w, a.S, 1, BN, dOp + i0 * Dvp, Dvp, nr, a.dV + (pl - a.j0) * Dvp, Dvp, Dvp);
      gemm<P, Mode::Add>(w, a.dP, 1, BN, Qp + i0 * Dp, Dp, nr, a.dK + (pl - a.j0) * Dp, Dp, Dp);
      gemm<P, Mode::Add>(nr, a.dP, BN, 1, a.Kr + pl * Dp, Dp, w, dQ + i0 * Dp, Dp, Dp);
    }
  }
  // dK = scale * sum dS Q: the scale Qp did not carry (dQ's is applied by dq_reduce either way).
  if (a.post_scale != T(1)) scale_block<P>(a.dK, a.j1 - a.j0, Dp, Dp, a.post_scale);
}

// ---------------------------------------------------------------------------------------------
// Entry points per instruction set. The policy fixes the vector width W, and with it the panel
// width NR = 2W of the packed K/V, so the drivers pack for the kernels they picked. Each entry
// carries its level's target; the policy templates above are inlined into it (SK_POLICY_INLINE,
// cpu/simd.h), so they compile for that target whatever the optimization level.
// ---------------------------------------------------------------------------------------------

// Tile sizes: query rows per forward task (a multiple of every row group: 6 rows on AVX2, 12 on
// AVX-512, 32 on AMX) and keys per forward block; query rows and keys per backward step
// (Kernels::bwd_bm, bwd_bn). The forward block is large because its per-row cost (max, rescale) is
// paid once per block; the backward's S and dP tiles (rows x keys) stay in L2 next to the dK/dV
// accumulators. Measured on Zen 3 (AVX2): the rate is flat within a few percent around these
// values, and so it is for the float32 AVX-512 backward on an AMX Xeon.
//
// The AMX backward takes 128 x 128 (kBwdBMTiles, kBwdBNTiles). Its dK^T / dV^T products sum over
// the step's query rows, 32 per tile pass, and every 32 x 32 block of them loads and stores its
// accumulator tiles once per step: with 64 rows that is one load and store per two passes. 128
// rows halve that traffic, and 128 keys halve the passes over Q, dO, Q^T, dO^T and the dQ partials
// (a stream of 3 MB per key block per head at Lq 2048, D 128, larger than L2). Bitwise the same
// gradients (every sum still runs 32 terms at a time in the same order). Measured on a 2-core AMX
// Xeon (interleaved runs, 21 rounds): bf16 backward at (1,8,2048,128) 1.21x faster than 64 x 64,
// (1,8,1024,64) 1.07x, causal (1,8,2048,128) 1.06x, (4,8,512,64) 1.00-1.04x; 128 x 64 or 256 x 128
// gave less, and 128 x 128 left the float32 and AVX512_BF16 backwards within 0-3%.
constexpr int64_t kFwdBM = 96, kFwdBN = 256, kBwdBM = 64, kBwdBN = 64, kBwdBMTiles = 128, kBwdBNTiles = 128;
static_assert(kBwdBMTiles % 32 == 0, "kBwdBMTiles: query blocks of whole 32-row tile groups (bwd_block_amx)");

template <typename T>
struct Kernels {
  int64_t W;
  void (*fwd)(const FwdRows<T>&);
  void (*bwd)(const BwdBlock<T>&);
  bool bf16 = false;    // fwd and bwd take bf16 operands as they are (FwdRows::Qh.., BwdBlock::Kh.., pack_*_bf16)
  int64_t mr = kMR;     // fwd: query rows per group (Products::kRows): the rows of the P and alpha scratch
  int64_t d_align = 2;  // bf16 only: the packed head dims D2, Dv2 are D, Dv rounded up to this
  bool tiles = false;   // AMX: the backward pads rows and query-row pairs for 16 x 32 tiles (BwdPack)
  bool avx512 = false;  // the kernels run AVX-512F, so the packers may (pack_panels)
  int64_t bwd_bm = kBwdBM, bwd_bn = kBwdBN;  // query rows and keys per backward step (BwdPack::BM, BN)
};

template <typename T>
SK_FLATTEN void fwd_rows_portable(const FwdRows<T>& a) {
  fwd_rows<VecPortable<T>>(a);
}
template <typename T>
SK_FLATTEN void bwd_block_portable(const BwdBlock<T>& a) {
  bwd_block<VecPortable<T>>(a);
}

#if SK_SIMD_X86
SK_AVX2_ENTRY void fwd_rows_avx2_f32(const FwdRows<float>& a) { fwd_rows<simd::Avx2Float>(a); }
SK_AVX2_ENTRY void bwd_block_avx2_f32(const BwdBlock<float>& a) { bwd_block<simd::Avx2Float>(a); }
SK_AVX2_ENTRY void fwd_rows_avx2_f64(const FwdRows<double>& a) { fwd_rows<simd::Avx2Double>(a); }
SK_AVX2_ENTRY void bwd_block_avx2_f64(const BwdBlock<double>& a) { bwd_block<simd::Avx2Double>(a); }
SK_AVX512_ENTRY void fwd_rows_avx512_f64(const FwdRows<double>& a) { fwd_rows<simd::Avx512Double>(a); }
SK_AVX512_ENTRY void bwd_block_avx512_f64(const BwdBlock<double>& a) { bwd_block<simd::Avx512Double>(a); }
SK_AVX512_ENTRY void fwd_rows_avx512_f32(const FwdRows<float>& a) { fwd_rows<simd::Avx512Float>(a); }
SK_AVX512_ENTRY void bwd_block_avx512_f32(const BwdBlock<float>& a) { bwd_block<simd::Avx512Float>(a); }

// ---------------------------------------------------------------------------------------------
// The bfloat16 forward on AVX512_BF16: vdpbf16ps multiplies pairs of bf16 and adds both products
// to a float32 lane, twice the multiply-adds of a float32 FMA per instruction, on operands that
// stay bf16 in memory (half the bytes packed and streamed). Both products pair along their sum
// index: Q K^T along d (a broadcast (q[d], q[d+1]) against 16 keys' (k[d], k[d+1])), P V along
// the keys (a broadcast (p[j], p[j+1]) against 16 columns' (v[j], v[j+1])). Everything between
// them (scale, modifiers, mask, online softmax, dropout) is the float32 AVX-512 code as is; P is
// rounded to bf16 for the P V product, as torch's CPU flash attention and FlashAttention do for
// bf16 inputs. vdpbf16ps treats bf16 subnormals as zero and flushes products below FLT_MIN: below
// what the softmax resolves unless the scale, applied after the sum, is huge; such scales take the
// widened float32 lanes (bf16_products_suffice).

// C[r][c * 16 + 0:16] (op)= mul * sum_k dot(A[r * a_rs + 2k], B[k * ldb + c * 32]) for r < MR,
// c < NV, every pair of bf16 a product of two adjacent elements. Summed from zero and added to C
// once (micro_tile's reason).
template <int MR, int NV, Mode M>
SK_AVX512BF16_FN void bf16_tile(const uint16_t* A, int64_t a_rs, const uint16_t* B, int64_t ldb, int64_t K2, float* C,
                                int64_t ldc, const float* alpha, float mul) {
  __m512 acc[MR][NV];
  SK_UNROLL for (int r = 0; r < MR; ++r) { SK_UNROLL for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps(); }
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh b[NV];
    SK_UNROLL for (int c = 0; c < NV; ++c) b[c] = (__m512bh)_mm512_loadu_si512(B + c * 32);
    B += ldb;
    SK_UNROLL for (int r = 0; r < MR; ++r) {
      const __m512bh a = simd::bf16_pair_bcast(A + r * a_rs + 2 * k);
      SK_UNROLL for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  SK_UNROLL for (int r = 0; r < MR; ++r) {
    SK_UNROLL for (int c = 0; c < NV; ++c) {
      float* cp = C + r * ldc + c * 16;
      if constexpr (M == Mode::Store) {
        _mm512_storeu_ps(cp, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(mul)));
      } else if constexpr (M == Mode::Add) {
        _mm512_storeu_ps(cp, _mm512_fmadd_ps(acc[r][c], _mm512_set1_ps(mul), _mm512_loadu_ps(cp)));
      } else {
        static_assert(M == Mode::ScaleAdd, "bf16_tile stores, adds or rescales");
        _mm512_storeu_ps(cp, _mm512_fmadd_ps(_mm512_loadu_ps(cp), _mm512_set1_ps(alpha[r]), acc[r][c]));
      }
    }
  }
}

// C[r][0:ncols) (op)= mul * A B for `rows` rows (register tiles of kMR rows and 64 / 32 / 16
// columns), ncols a multiple of 16, B pairs along the sum index (bf16_tile); alpha: ScaleAdd's
// per-row factors.
template <int MR, Mode M>
SK_AVX512BF16_FN void bf16_rows_fixed(const uint16_t* A, int64_t a_rs, const uint16_t* B, int64_t ldb, int64_t K2,
                                      float* C, int64_t ldc, int64_t ncols, float mul, const float* alpha) {
  int64_t c = 0;
  for (; c + 64 <= ncols; c += 64) bf16_tile<MR, 4, M>(A, a_rs, B + 2 * c, ldb, K2, C + c, ldc, alpha, mul);
  for (; c + 32 <= ncols; c += 32) bf16_tile<MR, 2, M>(A, a_rs, B + 2 * c, ldb, K2, C + c, ldc, alpha, mul);
  if (c < ncols) bf16_tile<MR, 1, M>(A, a_rs, B + 2 * c, ldb, K2, C + c, ldc, alpha, mul);
}

template <Mode M>
SK_AVX512BF16_FN void bf16_gemm(int64_t rows, const uint16_t* A, int64_t a_rs, const uint16_t* B, int64_t ldb,
                                int64_t K2, float* C, int64_t ldc, int64_t ncols, float mul,
                                const float* alpha = nullptr) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR)
    bf16_rows_fixed<kMR, M>(A + r * a_rs, a_rs, B, ldb, K2, C + r * ldc, ldc, ncols, mul,
                            M == Mode::ScaleAdd ? alpha + r : nullptr);
  const uint16_t* Ar = A + r * a_rs;
  float* Cr = C + r * ldc;
  switch (rows - r) {
    case 5:
      bf16_rows_fixed<5, M>(Ar, a_rs, B, ldb, K2, Cr, ldc, ncols, mul, M == Mode::ScaleAdd ? alpha + r : nullptr);
      break;
    case 4:
      bf16_rows_fixed<4, M>(Ar, a_rs, B, ldb, K2, Cr, ldc, ncols, mul, M == Mode::ScaleAdd ? alpha + r : nullptr);
      break;
    case 3:
      bf16_rows_fixed<3, M>(Ar, a_rs, B, ldb, K2, Cr, ldc, ncols, mul, M == Mode::ScaleAdd ? alpha + r : nullptr);
      break;
    case 2:
      bf16_rows_fixed<2, M>(Ar, a_rs, B, ldb, K2, Cr, ldc, ncols, mul, M == Mode::ScaleAdd ? alpha + r : nullptr);
      break;
    case 1:
      bf16_rows_fixed<1, M>(Ar, a_rs, B, ldb, K2, Cr, ldc, ncols, mul, M == Mode::ScaleAdd ? alpha + r : nullptr);
      break;
    default:
      break;
  }
}

// P (or dS): nr rows of w float32 values (ld BN, w a multiple of 32) rounded to bf16, same layout.
SK_AVX512BF16_FN void bf16_rows(const float* X, int64_t nr, int64_t w, int64_t BN, uint16_t* out) {
  for (int64_t r = 0; r < nr; ++r) {
    const float* src = X + r * BN;
    uint16_t* dst = out + r * BN;
    for (int64_t j = 0; j < w; j += 32) {
      const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + 16), _mm512_loadu_ps(src + j));
      _mm512_storeu_si512(dst + j, (__m512i)h);
    }
  }
}

struct Bf16Products {
  static constexpr int64_t NR = 32;
  static constexpr int64_t kRows = kMR;
  static constexpr bool kUnscaled = false;  // the products' epilogue scales S
  // S = scale * Q K^T, one panel of NR keys at a time.
  SK_AVX512BF16_FN static void scores(const FwdRows<float>& a, int64_t mr, int64_t r0, int64_t pl, int64_t w,
                                      float* S) {
    for (int64_t p = 0; p < w / NR; ++p) {
      bf16_gemm<Mode::Store>(mr, a.Qh + r0 * a.D2, a.D2, a.Kh + (pl / NR + p) * a.D2 * NR, 2 * NR, a.D2 / 2, S + p * NR,
                             a.BN, NR, a.qk_scale);
    }
  }
  // P rounded to bf16, then O = O * alpha + P V over the key pairs [pl, pl + w).
  SK_AVX512BF16_FN static void pv(const FwdRows<float>& a, int64_t mr, int64_t r0, const float* S, int64_t pl,
                                  int64_t w) {
    if (a.Dvp == 0) return;
    bf16_rows(S, mr, w, a.BN, a.Ph);
    bf16_gemm<Mode::ScaleAdd>(mr, a.Ph, a.BN, a.Vh + pl * a.Dvp, 2 * a.Dvp, w / 2, a.O + r0 * a.Dvp, a.Dvp, a.Dvp, 1.f,
                              a.alpha);
  }
};

SK_AVX512BF16_ENTRY void fwd_rows_avx512bf16(const FwdRows<float>& a) {
  fwd_rows<simd::Avx512FloatBf16P, Bf16Products>(a);
}

// ---------------------------------------------------------------------------------------------
// The bfloat16 forward on AMX: the same two products on tiles. A tile product takes a 16 x 32
// bf16 A tile (16 rows, 32 values of the sum index), a B tile of 16 pairs of that index for 16
// columns ([k / 2][n][2], the layout pack_panels_bf16 and pack_vpairs_bf16 already write for
// vdpbf16ps) and adds 16 x 16 float32 dot products to a C tile, 16 times the work of one
// vdpbf16ps. Rows go in groups of 32 (two row tiles), keys and head-dim columns 32 at a time
// (two column tiles): four C tiles, two A and two B, the eight tiles there are. The sum index
// is consumed 32 at a time, so the head dim is padded to a multiple of 32 with zeros
// (Kernels::d_align) and the key blocks are multiples of NR = 32 already. The softmax between
// the products, the modifiers, mask and dropout are the AVX-512 code of the other paths.
//
// S goes from the C tiles to the float32 scratch (the softmax needs it there); P V accumulates
// straight into the output rows: the rows whose running max moved are rescaled first (rarely
// after the first blocks), then the O tiles are loaded, added to and stored back. Rows past the
// group's last (a tail of fewer than 32) compute on zero Q rows and zeroed P rows, into O rows
// past nrows that nobody reads; fwd_compute_task pads Q and O to a multiple of 32 rows.

// S[r][p * 32 + c] = sum_d Q[r][d] K[p * 32 + c][d] for 16 NT rows and npanel panels of 32 keys:
// Q rows ldq apart, K^T panels of d-pairs (pack_panels_bf16, NR = 32), S rows ldS apart.
template <int NT>
SK_AMX_FN void amx_scores(const uint16_t* Q, int64_t ldq, const uint16_t* Kh, int64_t D2, int64_t npanel, float* S,
                          int64_t ldS) {
  const int64_t qs = 2 * ldq, ks = 2 * 64, ss = 4 * ldS;  // strides in bytes; a K^T row: 32 keys x 2
  simd::amx_operands_ready();
  for (int64_t p = 0; p < npanel; ++p) {
    const uint16_t* K = Kh + p * D2 * 32;
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (NT == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t d = 0; d < D2; d += 32) {
      // Pairs d / 2 .. d / 2 + 15 of keys 0-15 and 16-31.
      _tile_loadd(6, K + d * 32, ks);
      _tile_loadd(7, K + d * 32 + 32, ks);
      _tile_loadd(4, Q + d, qs);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (NT == 2) {
        _tile_loadd(5, Q + 16 * ldq + d, qs);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    float* s = S + p * 32;
    _tile_stored(0, s, ss);
    _tile_stored(1, s + 16, ss);
    if constexpr (NT == 2) {
      _tile_stored(2, s + 16 * ldS, ss);
      _tile_stored(3, s + 16 * ldS + 16, ss);
    }
  }
}

// C (+)= A B on tiles: C float32 (ldc), A bf16 rows with the sum index along the row (lda), B
// pairs of that index ([k / 2][n][2], ldb per pair row). One block of 16 MT rows x 16 NT columns,
// C loaded first (accumulate) and stored at the end.
template <int MT, int NT>
SK_AMX_FN void amx_block(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t K, float* C,
                         int64_t ldc) {
  const int64_t as = 2 * lda, bs = 2 * ldb, cs = 4 * ldc;  // strides in bytes
  simd::amx_operands_ready();
  _tile_loadd(0, C, cs);
  if constexpr (NT == 2) _tile_loadd(1, C + 16, cs);
  if constexpr (MT == 2) {
    _tile_loadd(2, C + 16 * ldc, cs);
    if constexpr (NT == 2) _tile_loadd(3, C + 16 * ldc + 16, cs);
  }
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* b = B + (k / 2) * ldb;
    _tile_loadd(6, b, bs);
    if constexpr (NT == 2) _tile_loadd(7, b + 32, bs);
    _tile_loadd(4, A + k, as);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) {
      _tile_loadd(5, A + 16 * lda + k, as);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, C, cs);
  if constexpr (NT == 2) _tile_stored(1, C + 16, cs);
  if constexpr (MT == 2) {
    _tile_stored(2, C + 16 * ldc, cs);
    if constexpr (NT == 2) _tile_stored(3, C + 16 * ldc + 16, cs);
  }
}

// C[M][N] += A B for M and N multiples of 16 and K a multiple of 32: blocks of 32 x 32, the
// 16-wide remainders with one row or column tile.
SK_AMX_FN void amx_gemm_acc(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                            int64_t ldb, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; m += 32) {
    const bool m2 = M - m > 16;
    for (int64_t n = 0; n < N; n += 32) {
      const bool n2 = N - n > 16;
      const uint16_t* a = A + m * lda;
      const uint16_t* b = B + 2 * n;
      float* c = C + m * ldc + n;
      if (m2 && n2) {
        amx_block<2, 2>(a, lda, b, ldb, K, c, ldc);
      } else if (m2) {
        amx_block<2, 1>(a, lda, b, ldb, K, c, ldc);
      } else if (n2) {
        amx_block<1, 2>(a, lda, b, ldb, K, c, ldc);
      } else {
        amx_block<1, 1>(a, lda, b, ldb, K, c, ldc);
      }
    }
  }
}

// S rows (ld BN) times the softmax scale, in place: the AMX products sum unscaled and the scale
// is one float32 multiply of the sum, as on the vdpbf16ps path (whose sums may round differently:
// the tiles add their pairs in their own order).
SK_AMX_FN void scale_rows(float* S, int64_t nr, int64_t w, int64_t BN, float scale) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < nr; ++r) {
    float* s = S + r * BN;
    for (int64_t j = 0; j < w; j += 16) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), sc));
  }
}

struct AmxProducts {
  static constexpr int64_t NR = 32;
  static constexpr int64_t kRows = 32;
  static constexpr bool kUnscaled = true;  // fwd_softmax_row scales S as it reads it
  // S = Q K^T over the panels [pl, pl + w), before the softmax scale.
  SK_AMX_FN static void scores(const FwdRows<float>& a, int64_t mr, int64_t r0, int64_t pl, int64_t w, float* S) {
    const uint16_t* Q = a.Qh + r0 * a.D2;
    const uint16_t* K = a.Kh + (pl / NR) * a.D2 * NR;
    if (mr > 16) {
      amx_scores<2>(Q, a.D2, K, a.D2, w / NR, S, a.BN);
    } else {
      amx_scores<1>(Q, a.D2, K, a.D2, w / NR, S, a.BN);
    }
  }
  // O = O * alpha + P V: P rounded to bf16 (rows past mr zeroed, up to the row tile), the rows
  // whose alpha is not 1 rescaled, then the tiles add P V.
  SK_AMX_FN static void pv(const FwdRows<float>& a, int64_t mr, int64_t r0, const float* S, int64_t pl, int64_t w) {
    if (a.Dvp == 0) return;
    const int64_t nt = mr > 16 ? 2 : 1;
    bf16_rows(S, mr, w, a.BN, a.Ph);
    for (int64_t r = mr; r < 16 * nt; ++r) std::memset(a.Ph + r * a.BN, 0, sizeof(uint16_t) * w);
    float* O = a.O + r0 * a.Dvp;
    for (int64_t r = 0; r < mr; ++r) {
      if (a.alpha[r] == 1.f) continue;
      const __m512 al = _mm512_set1_ps(a.alpha[r]);
      float* o = O + r * a.Dvp;
      for (int64_t c = 0; c < a.Dvp; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), al));
    }
    // V as key pairs from key pl: pair pl / 2 at Vh + pl * Dvp.
    amx_gemm_acc(16 * nt, a.Dvp, w, a.Ph, a.BN, a.Vh + pl * a.Dvp, 2 * a.Dvp, O, a.Dvp);
  }
};

SK_AMX_ENTRY void fwd_rows_amx(const FwdRows<float>& a) {
  simd::amx_tiles_on();
  fwd_rows<simd::Avx512FloatBf16P, AmxProducts>(a);
  simd::amx_tiles_off();
}

// The bfloat16 backward on AVX512_BF16: the five products of bwd_block by vdpbf16ps on bf16
// operands with float32 accumulation, everything between them (bwd_row) the float32 AVX-512 code
// as is. P and dS are rounded to bf16 before they meet dO, Q and K, as FlashAttention does. Each
// product pairs along its sum index:
//   S  = scale * Q K^T   A: Q rows (d-pairs, unscaled), B: K^T panels of d-pairs; the scale is
//                        applied to the float32 sum, so the scores are bitwise the forward's
//   dP = dO V^T          A: dO rows (dv-pairs), B: V^T panels of dv-pairs
//   dV^T += dO^T P       A: dO^T rows (query-row pairs), B: P as query-row pairs of 16 keys
//   dK^T += scale Q^T dS A: Q^T rows (query-row pairs), B: dS as query-row pairs; scale on the sum
//   dQ += dS K           A: dS rows (key pairs), B: K rows as key pairs
// dK and dV are accumulated transposed (one row per head dim, the keys of the block along the
// vector), so P and dS need no transposition: two rows of 16 values interleave into one vector.
// A block of query rows starts at an even row, so that its row pairs of Q^T and dO^T end at the
// latest on their zero pad row (Lq of an odd Lq); an odd last row is paired with a zero row of P
// and dS. A row next to the block that sees none of its keys (the row before an odd first row,
// the row after an odd last one) thus meets zeros in P and dS: it adds nothing, or NaN where its
// own Q or dO is not finite, as in the reference's plain products.

// The lanes of x selected by m, rounded to bf16 by vcvtneps2bf16, at out: round to nearest even
// as c10::BFloat16, but a float32 subnormal becomes 0 where c10 would keep a bf16 subnormal. Every
// bf16 gradient and output row the bf16 paths write goes through here.
SK_AVX512BF16_FN void store16_bf16(uint16_t* out, __mmask16 m, __m512 x) {
  _mm256_mask_storeu_epi16(out, m, (__m256i)_mm512_cvtneps_pbh(x));
}

// Rows [0, nkeys) of a bf16 output (ld_out apart, contiguous along the head dim) from float32
// accumulators held transposed, X^T (D rows of keys, ldx apart: the bf16 backward's dK^T and dV^T),
// rounded to bf16. 16 x 16 blocks go through simd::transpose_rows16_ps; the strided scalar loop of
// store_dkdv_rows took 4% of the bf16 backward at (1,8,2048,128) (perf).
SK_AVX512BF16_FN void store_transposed_bf16(const float* XT, int64_t ldx, int64_t nkeys, int64_t D, uint16_t* out,
                                            int64_t ld_out) {
  alignas(64) float tile[16 * 16];
  for (int64_t j0 = 0; j0 < nkeys; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, nkeys - j0);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t nd = std::min<int64_t>(16, D - d0);
      simd::transpose_rows16_ps(XT + d0 * ldx + j0, ldx, nd, nj, tile, 16);  // tile row e: key j0 + e
      const __mmask16 cols = simd::mask16(nd);
      for (int64_t e = 0; e < nj; ++e) store16_bf16(out + (j0 + e) * ld_out + d0, cols, _mm512_load_ps(tile + 16 * e));
    }
  }
}

// One output row of the bf16 forward, acc * inv, through store16_bf16. store_fwd_rows' scalar
// conversion, vectorized at the baseline ISA only (SSE2), took about 2.5% of the AMX forward at
// (4,8,512,64) (perf).
SK_AVX512BF16_FN void store_row_bf16(const float* acc, float inv, int64_t n, uint16_t* out) {
  const __m512 s = _mm512_set1_ps(inv);
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = simd::mask16(n - d);
    store16_bf16(out + d, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc + d), s));
  }
}

// Rows 2t and 2t + 1 of X (nr x w float32, ld BN; a row >= nr reads as zeros) as pairs of bf16:
// (X[2t][j], X[2t + 1][j]) at out + t * 2 * BN + 2 * j, for j < w (a multiple of 16).
SK_AVX512BF16_FN void bf16_row_pairs(const float* X, int64_t nr, int64_t w, int64_t BN, uint16_t* out) {
  for (int64_t i = 0; i < nr; i += 2) {
    const float* x0 = X + i * BN;
    const float* x1 = x0 + BN;
    uint16_t* dst = out + i * BN;  // pair i / 2
    for (int64_t j = 0; j < w; j += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x0 + j)));
      const __m512i hi = i + 1 < nr ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x1 + j)))
                                    : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 2 * j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// Both bf16 backwards, between their products: bwd_row for the nr rows from i0, then P and dS as
// bf16 row pairs (for dV and dK) and dS as bf16 rows (for dQ).
SK_AVX512BF16_FN void bf16_bwd_rows(const BwdBlock<float>& a, const BwdHead<float>& hd, int64_t i0, int64_t nr,
                                    int64_t pl, int64_t w) {
  const int64_t BN = a.BN;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = i0 + r;
    bwd_row<simd::Avx512FloatBf16P>(a.S + r * BN, a.dP + r * BN, w, pl, a.lo[i], a.hi[i], hd.lse[i], hd.corr[i],
                                    hd.Delta[i], a, hd.h, i, hd.mods);
  }
  bf16_row_pairs(a.S, nr, w, BN, a.Pi);
  bf16_row_pairs(a.dP, nr, w, BN, a.dSi);
  bf16_rows(a.dP, nr, w, BN, a.dSh);
}

SK_AVX512BF16_ENTRY void bwd_block_avx512bf16(const BwdBlock<float>& a) {
  constexpr int64_t NR = 32;
  const int64_t D = a.D, Dp = a.Dp, Dv = a.Dv, D2 = a.D2, Dv2 = a.Dv2, BN = a.BN, Lq2 = a.Lq2;
  for (int64_t hh = 0; hh < a.Hg; ++hh) {
    const uint16_t* Qh = a.Qh + hh * a.Lr * D2;
    const uint16_t* dOh = a.dOh + hh * a.Lr * Dv2;
    const uint16_t* QTh = a.QTh + hh * D * Lq2;
    const uint16_t* dOTh = a.dOTh + hh * Dv * Lq2;
    float* dQ = a.dQ + hh * a.Lr * Dp;
    const BwdHead<float> hd(a, hh);
    for (int64_t i0 = a.ilo / 2 * 2; i0 < a.ihi; i0 += a.BM) {
      const int64_t nr = std::min(a.BM, a.ihi - i0);
      const auto [pl, w] = visible_span(a.lo, a.hi, i0, nr, a.j0, a.j1, NR);
      if (w == 0) continue;
      const int64_t ph = pl + w;
      for (int64_t p = pl; p < ph; p += NR) {
        bf16_gemm<Mode::Store>(nr, Qh + i0 * D2, D2, a.Kh + (p / NR) * D2 * NR, 2 * NR, D2 / 2, a.S + (p - pl), BN, NR,
                               a.qk_scale);
        bf16_gemm<Mode::Store>(nr, dOh + i0 * Dv2, Dv2, a.Vh + (p / NR) * Dv2 * NR, 2 * NR, Dv2 / 2, a.dP + (p - pl),
                               BN, NR, 1.f);
      }
      bf16_bwd_rows(a, hd, i0, nr, pl, w);
      const int64_t K2 = (nr + 1) / 2;
      // dV^T[c][j] += sum_i dO[i][c] P[i][j];  dK^T[d][j] += scale sum_i Q[i][d] dS[i][j];
      // dQ[i] += sum_j dS[i][j] K[j] (scale applied by dq_reduce)
      bf16_gemm<Mode::Add>(Dv, dOTh + i0, Lq2, a.Pi, 2 * BN, K2, a.dV + (pl - a.j0), BN, w, 1.f);
      bf16_gemm<Mode::Add>(D, QTh + i0, Lq2, a.dSi, 2 * BN, K2, a.dK + (pl - a.j0), BN, w, a.qk_scale);
      bf16_gemm<Mode::Add>(nr, a.dSh, BN, a.Krh + pl * Dp, 2 * Dp, w / 2, dQ + i0 * Dp, Dp, Dp, 1.f);
    }
  }
}

// The bfloat16 backward on AMX tiles: bwd_block_avx512bf16's five products on the same pair
// layouts, everything between them (bwd_row) the same AVX-512 code. The tiles consume a sum
// index 32 at a time and write whole 16-row tiles, so the backward's packing pads for them
// (Kernels::d_align, row_align): D2 and Dv2 to multiples of 32, each head's Q, dO and dQ rows and
// the query-row pairs of Q^T and dO^T to a multiple of 32 (zeros), the rows of Q^T and dO^T to a
// multiple of 16. Query blocks start at a multiple of 32; the rows of a block before its first
// visible row and after its last get zero P and dS (bwd_row; the pair rows past the block are
// zeroed here), so they add nothing to dK and dV, and their dQ rows get dS K = 0. dK^T is summed
// unscaled and scaled once when the key block is done.
SK_AMX_ENTRY void bwd_block_amx(const BwdBlock<float>& a) {
  constexpr int64_t NR = 32;
  simd::amx_tiles_on();
  const int64_t D2 = a.D2, Dv2 = a.Dv2, Dp = a.Dp, BN = a.BN, Lr = a.Lr, Lq2 = a.Lq2;
  const int64_t DT = round_up(a.D, 16), DvT = round_up(a.Dv, 16);
  for (int64_t hh = 0; hh < a.Hg; ++hh) {
    const uint16_t* Qh = a.Qh + hh * Lr * D2;
    const uint16_t* dOh = a.dOh + hh * Lr * Dv2;
    const uint16_t* QTh = a.QTh + hh * DT * Lq2;
    const uint16_t* dOTh = a.dOTh + hh * DvT * Lq2;
    float* dQ = a.dQ + hh * Lr * Dp;
    const BwdHead<float> hd(a, hh);
    for (int64_t i0 = a.ilo / 32 * 32; i0 < a.ihi; i0 += a.BM) {
      const int64_t nr = std::min(a.BM, a.ihi - i0);
      const auto [pl, w] = visible_span(a.lo, a.hi, i0, nr, a.j0, a.j1, NR);
      if (w == 0) continue;
      const int64_t nr16 = round_up(nr, 16), nr32 = round_up(nr, 32);
      for (int64_t g = 0; g < nr; g += 32) {
        const uint16_t *q = Qh + (i0 + g) * D2, *k = a.Kh + (pl / NR) * D2 * NR;
        const uint16_t *o = dOh + (i0 + g) * Dv2, *v = a.Vh + (pl / NR) * Dv2 * NR;
        if (nr - g > 16) {
          amx_scores<2>(q, D2, k, D2, w / NR, a.S + g * BN, BN);
          amx_scores<2>(o, Dv2, v, Dv2, w / NR, a.dP + g * BN, BN);
        } else {
          amx_scores<1>(q, D2, k, D2, w / NR, a.S + g * BN, BN);
          amx_scores<1>(o, Dv2, v, Dv2, w / NR, a.dP + g * BN, BN);
        }
      }
      scale_rows(a.S, nr, w, BN, a.qk_scale);
      bf16_bwd_rows(a, hd, i0, nr, pl, w);
      for (int64_t t = (nr + 1) / 2; t < nr32 / 2; ++t) {
        std::memset(a.Pi + t * 2 * BN, 0, sizeof(uint16_t) * 2 * w);
        std::memset(a.dSi + t * 2 * BN, 0, sizeof(uint16_t) * 2 * w);
      }
      for (int64_t r = nr; r < nr16; ++r) std::memset(a.dSh + r * BN, 0, sizeof(uint16_t) * w);
      // dV^T[c][j] += sum_i dO[i][c] P[i][j];  dK^T[d][j] += sum_i Q[i][d] dS[i][j];
      // dQ[i] += sum_j dS[i][j] K[j] (scale applied by dq_reduce)
      amx_gemm_acc(DvT, w, nr32, dOTh + i0, Lq2, a.Pi, 2 * BN, a.dV + (pl - a.j0), BN);
      amx_gemm_acc(DT, w, nr32, QTh + i0, Lq2, a.dSi, 2 * BN, a.dK + (pl - a.j0), BN);
      amx_gemm_acc(nr16, Dp, w, a.dSh, BN, a.Krh + pl * Dp, 2 * Dp, dQ + i0 * Dp, Dp);
    }
  }
  scale_rows(a.dK, a.D, a.j1 - a.j0, BN, a.qk_scale);
  simd::amx_tiles_off();
}
#endif

// Per call (simd::selected_isa), so SEQKERNELS_CPU_ISA=portable lets the tests cover the
// portable kernels, the path non-x86 machines take, on an AVX2 machine. bf16_operands: the
// caller's inputs are bfloat16 and it packs them with pack_*_bf16 when the answer says bf16.
// The highest path the kernels have: AVX-512 for float64 (simd::Avx512Double) and for float32
// accumulation, and where the caller packs bf16 operands as they are, AMX tiles (or AVX512_BF16
// pairs below them). The backward's lse corrections run the forward kernel of the same choice, so
// its scores stay bitwise the backward's. cpu_paths::attention_fwd/bwd report the same rule.
inline simd::Isa attention_top_isa(bool float64, bool bf16_operands) {
  if (!SK_SIMD_X86) return simd::Isa::Portable;
  return bf16_operands && !float64 ? simd::Isa::AmxBf16 : simd::Isa::Avx512;
}

// Whether bf16 inputs may take the bf16 products (AVX512_BF16 pairs, AMX tiles) at this scale.
// vdpbf16ps and tdpbf16ps flush every product below FLT_MIN (and bf16 inputs below it) to zero
// before the sum that the scale multiplies afterwards: a score loses up to D * FLT_MIN * |scale|.
// Up to 2^-24 (a float32 score's own rounding at magnitude 1) that is invisible; past it (|scale|
// beyond about 2^102 / D, a finite scale the API accepts) the scores of small inputs vanish: q ~
// 1e-20, k ~ 1e-20, scale 3e38 put the output 0.15 off (torch 0.0016). Those calls widen to float32
// (the AVX-512 lanes, which keep subnormal products), forward and backward alike: the backward's lse
// corrections rerun the forward kernel of the same choice.
inline bool bf16_products_suffice(double scale, int64_t D) {
  return std::abs(scale) * static_cast<double>(D) * static_cast<double>(std::numeric_limits<float>::min()) <= 0x1p-24;
}

template <typename T>
Kernels<T> select_kernels(bool bf16_operands) {
  const simd::Isa isa = simd::path_isa(attention_top_isa(std::is_same_v<T, double>, bf16_operands));
#if SK_SIMD_X86
  if constexpr (std::is_same_v<T, float>) {
    constexpr int W = simd::Avx512Float::W;
    // mr: the row group of the kernel's products (its P and alpha scratch), taken from them.
    if (isa == simd::Isa::AmxBf16)
      return {W, &fwd_rows_amx, &bwd_block_amx, true, AmxProducts::kRows, 32, true, true, kBwdBMTiles, kBwdBNTiles};
    if (isa == simd::Isa::Avx512Bf16)
      return {W, &fwd_rows_avx512bf16, &bwd_block_avx512bf16, true, Bf16Products::kRows, 2, false, true};
    if (isa == simd::Isa::Avx512) {
      constexpr int64_t mr = FwdProducts<simd::Avx512Float>::kRows;
      return {W, &fwd_rows_avx512_f32, &bwd_block_avx512_f32, false, mr, 2, false, true};
    }
  }
  if constexpr (std::is_same_v<T, double>) {
    if (isa == simd::Isa::Avx512)
      return {simd::Avx512Double::W, &fwd_rows_avx512_f64, &bwd_block_avx512_f64, false,
              FwdProducts<simd::Avx512Double>::kRows};
  }
  if (isa == simd::Isa::Avx2) {
    if constexpr (std::is_same_v<T, float>) {
      return {simd::Avx2Float::W, &fwd_rows_avx2_f32, &bwd_block_avx2_f32};
    } else {
      return {simd::Avx2Double::W, &fwd_rows_avx2_f64, &bwd_block_avx2_f64};
    }
  }
#endif
  (void)isa;
  return {VecPortable<T>::W, &fwd_rows_portable<T>, &bwd_block_portable<T>};
}

// ---------------------------------------------------------------------------------------------
// Packing (dtype conversion + layout), memory-bound and done once per (b, head).
// ---------------------------------------------------------------------------------------------

#if SK_SIMD_X86
// pack_panels of float32 rows (sD == 1) into panels of 32 keys by 16 x 16 register transposes:
// the scalar loop's stores, NR floats apart, were 4% of a float32 forward at L = 512.
SK_AVX512_FN void pack_panels_f32_avx512(const float* x, int64_t sL, int64_t nvalid, int64_t D, int64_t p0, int64_t p1,
                                         float* out) {
  constexpr int64_t NR = 32;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t j0 = p * NR; j0 < (p + 1) * NR; j0 += 16) {
      simd::transpose_rows16_ps(x + j0 * sL, sL, nvalid - j0, D, out + p * D * NR + (j0 - p * NR), NR);
    }
  }
}
#endif

// K^T panels [p][d][NR] for panels [p0, p1) of one head; keys >= nvalid are zeros. avx512: the
// kernels run AVX-512F (Kernels::avx512), so a float32 copy may transpose in registers.
template <typename scalar_t, typename T>
void pack_panels(const scalar_t* x, int64_t sL, int64_t sD, int64_t nvalid, int64_t D, int64_t NR, int64_t p0,
                 int64_t p1, T* out, bool avx512) {
#if SK_SIMD_X86
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
    if (avx512 && sD == 1 && NR == 32) return pack_panels_f32_avx512(x, sL, nvalid, D, p0, p1, out);
  }
#endif
  (void)avx512;
  for (int64_t p = p0; p < p1; ++p) {
    T* dst = out + p * D * NR;
    for (int64_t t = 0; t < NR; ++t) {
      const int64_t j = p * NR + t;
      if (j < nvalid) {
        const scalar_t* src = x + j * sL;
        for (int64_t d = 0; d < D; ++d) dst[d * NR + t] = static_cast<T>(src[d * sD]);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d * NR + t] = T(0);
      }
    }
  }
}

// Rows [r0, r1) of one head as rows of Dp values (multiplied by mul, zero padded); rows >=
// nvalid are zeros.
template <typename scalar_t, typename T>
void pack_rows(const scalar_t* x, int64_t sL, int64_t sD, int64_t nvalid, int64_t D, int64_t Dp, int64_t r0, int64_t r1,
               T mul, T* out) {
  for (int64_t j = r0; j < r1; ++j) {
    T* dst = out + j * Dp;
    int64_t d = 0;
    if (j < nvalid) {
      const scalar_t* src = x + j * sL;
      if constexpr (std::is_same_v<scalar_t, T>) {
        if (sD == 1 && mul == T(1)) {
          // A plain copy (V, K rows of a float32 call): libc's, at the machine's widest vectors.
          std::memcpy(dst, src, sizeof(T) * D);
          d = D;
        }
      }
      if (sD == 1) {  // (nothing left after the copy)
        for (; d < D; ++d) dst[d] = static_cast<T>(src[d]) * mul;
      } else {
        for (; d < D; ++d) dst[d] = static_cast<T>(src[d * sD]) * mul;
      }
    }
    for (; d < Dp; ++d) dst[d] = T(0);
  }
}

// The bf16 dot path's layouts (FwdRows::Qh/Kh/Vh), copies of the raw bf16 bits: no conversion.
// x(j, d) of the caller's head, j < nvalid; everything else (padding keys, the odd head dim's
// pair) is +0, which vdpbf16ps adds as nothing, and no NaN in padding can reach a product.
inline uint16_t bf16_bits(const c10::BFloat16* x, int64_t j, int64_t d, int64_t sL, int64_t sD) {
  return x[j * sL + d * sD].x;
}

// The packers move whole pairs as 32-bit words where a row is contiguous (sD == 1, the common
// case): half the moves of one bf16 at a time and no per-element bounds test. Packing is
// memory-bound and once per (b, head), but with the AMX products it was a visible part of a
// forward with short sequences.
inline uint32_t bf16_pair_word(const c10::BFloat16* x, int64_t j, int64_t d, int64_t D, int64_t sL, int64_t sD) {
  const uint32_t lo = d < D ? bf16_bits(x, j, d, sL, sD) : 0u;
  const uint32_t hi = d + 1 < D ? bf16_bits(x, j, d + 1, sL, sD) : 0u;
  return lo | (hi << 16);
}

#if SK_SIMD_X86
// The whole pairs of K^T panels (pack_panels_bf16, sD == 1, sL even) by 16 x 16 transposes of
// 32-bit words: a pair is one word, so the float transpose moves it unchanged (bit moves only).
// Keys >= nvalid get zero words.
SK_AVX512_FN void pack_panels_bf16_avx512(const c10::BFloat16* x, int64_t sL, int64_t nvalid, int64_t npair_full,
                                          int64_t D2, int64_t NR, int64_t p0, int64_t p1, uint16_t* out) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t t0 = 0; t0 < NR; t0 += 16) {
      const int64_t j0 = p * NR + t0;
      simd::transpose_rows16_ps(reinterpret_cast<const float*>(x + j0 * sL), sL / 2, nvalid - j0, npair_full,
                                reinterpret_cast<float*>(out + p * D2 * NR + 2 * t0), NR);
    }
  }
}

// Rows a and b (b null: zeros) of Dv bf16 interleaved into Dv pairs (a[c], b[c]) at dst, 32
// columns per step by one two-source word permute for each half of the output.
SK_AVX512_FN void interleave_rows_bf16_avx512(const uint16_t* a, const uint16_t* b, int64_t Dv, uint16_t* dst) {
  alignas(64) uint16_t i0[32], i1[32];
  for (int k = 0; k < 32; ++k) {
    i0[k] = static_cast<uint16_t>((k & 1 ? 32 : 0) + k / 2);
    i1[k] = static_cast<uint16_t>(i0[k] + 16);
  }
  const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
  for (int64_t c0 = 0; c0 < Dv; c0 += 32) {
    const int64_t nc = std::min<int64_t>(32, Dv - c0);
    const __mmask32 m = nc == 32 ? ~__mmask32(0) : (__mmask32(1) << nc) - 1;
    const __m512i va = _mm512_maskz_loadu_epi16(m, a + c0);
    const __m512i vb = b != nullptr ? _mm512_maskz_loadu_epi16(m, b + c0) : _mm512_setzero_si512();
    const int64_t n2 = 2 * nc;  // output elements of this step
    const __mmask32 mlo = n2 >= 32 ? ~__mmask32(0) : (__mmask32(1) << n2) - 1;
    const __mmask32 mhi = n2 >= 64 ? ~__mmask32(0) : n2 <= 32 ? __mmask32(0) : (__mmask32(1) << (n2 - 32)) - 1;
    _mm512_mask_storeu_epi16(dst + 2 * c0, mlo, _mm512_permutex2var_epi16(va, idx0, vb));
    _mm512_mask_storeu_epi16(dst + 2 * c0 + 32, mhi, _mm512_permutex2var_epi16(va, idx1, vb));
  }
}
#endif

// K^T panels p0..p1 of NR keys as d-pairs: [p][d / 2][NR][2], D2 = D rounded up to even (or to a
// kernel's d_align). avx512: the caller runs AVX-512 (every bf16 path does), so the whole pairs of
// contiguous rows go through pack_panels_bf16_avx512.
inline void pack_panels_bf16(const c10::BFloat16* x, int64_t sL, int64_t sD, int64_t nvalid, int64_t D, int64_t D2,
                             int64_t NR, int64_t p0, int64_t p1, uint16_t* out, bool avx512) {
  const int64_t npair = D2 / 2, full = sD == 1 ? D / 2 : 0;  // pairs read as one word
  int64_t done = 0;                                          // pairs already written for every key
#if SK_SIMD_X86
  if (avx512 && full > 0 && sL % 2 == 0 && NR % 16 == 0) {
    pack_panels_bf16_avx512(x, sL, nvalid, full, D2, NR, p0, p1, out);
    done = full;
  }
#endif
  (void)avx512;
  for (int64_t p = p0; p < p1; ++p) {
    uint16_t* dst = out + p * D2 * NR;
    for (int64_t t = 0; t < NR; ++t) {
      const int64_t j = p * NR + t;
      uint16_t* col = dst + 2 * t;  // pair dp of key t at col + dp * 2 * NR
      int64_t dp = done;
      if (j < nvalid) {
        const c10::BFloat16* row = x + j * sL;
        for (; dp < full; ++dp) std::memcpy(col + dp * 2 * NR, row + 2 * dp, sizeof(uint32_t));
        for (; 2 * dp < D; ++dp) {
          const uint32_t w = bf16_pair_word(x, j, 2 * dp, D, sL, sD);
          std::memcpy(col + dp * 2 * NR, &w, sizeof(w));
        }
      }
      for (; dp < npair; ++dp) std::memset(col + dp * 2 * NR, 0, sizeof(uint32_t));
    }
  }
}

// V rows r0..r1 (r0 even) as key pairs: [j / 2][Dvp][2]. avx512 as for pack_panels_bf16.
inline void pack_vpairs_bf16(const c10::BFloat16* x, int64_t sL, int64_t sD, int64_t nvalid, int64_t Dv, int64_t Dvp,
                             int64_t r0, int64_t r1, uint16_t* out, bool avx512) {
  (void)avx512;
  for (int64_t j = r0; j < r1; j += 2) {
    uint16_t* dst = out + (j / 2) * 2 * Dvp;
    const int64_t nr = std::max<int64_t>(0, std::min<int64_t>({2, r1 - j, nvalid - j}));  // rows present
    int64_t c = 0;
#if SK_SIMD_X86
    if (nr > 0 && sD == 1 && avx512) {
      const uint16_t* a = reinterpret_cast<const uint16_t*>(x + j * sL);
      interleave_rows_bf16_avx512(a, nr == 2 ? a + sL : nullptr, Dv, dst);
      c = Dv;
    }
#endif
    // Element by element otherwise: a strided head dim (every bf16 kernel runs AVX-512, so a
    // contiguous one took the permutes above).
    if (c < Dv && nr > 0) {
      for (; c < Dv; ++c) {
        dst[2 * c] = bf16_bits(x, j, c, sL, sD);
        dst[2 * c + 1] = nr == 2 ? bf16_bits(x, j + 1, c, sL, sD) : uint16_t(0);
      }
    }
    std::memset(dst + 2 * c, 0, sizeof(uint16_t) * 2 * (Dvp - c));
  }
}

// Q rows 0..n as rows of D2, unscaled.
inline void pack_qrows_bf16(const c10::BFloat16* x, int64_t sL, int64_t sD, int64_t n, int64_t D, int64_t D2,
                            uint16_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    uint16_t* dst = out + j * D2;
    if (sD == 1) {
      std::memcpy(dst, x + j * sL, sizeof(uint16_t) * D);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = bf16_bits(x, j, d, sL, sD);
    }
    std::memset(dst + D, 0, sizeof(uint16_t) * (D2 - D));
  }
}

#if SK_SIMD_X86
// pack_tpairs_bf16 for a contiguous head dim: 16 row pairs x 16 head dims at a time, each pair's
// two rows widened into one vector of 16 words (lo | hi << 16), then a 16 x 16 word transpose
// gives one head dim's 16 words per vector, stored as one 64-byte run (masked to the pairs of
// [r0, r1): the next slice belongs to another job).
SK_AVX512_FN void pack_tpairs_bf16_avx512(const c10::BFloat16* x, int64_t sL, int64_t n, int64_t D, int64_t n2,
                                          int64_t r0, int64_t r1, uint16_t* out) {
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  for (int64_t i0 = r0; i0 < r1; i0 += 32) {
    const int64_t npairs = std::min<int64_t>(16, (r1 - i0 + 1) / 2);
    const __mmask16 pm = simd::mask16(npairs);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t nd = std::min<int64_t>(16, D - d0);
      const __mmask16 dm = simd::mask16(nd);
      __m512 r[16];
      for (int64_t t = 0; t < 16; ++t) {
        const int64_t i = i0 + 2 * t;
        if (t >= npairs) {
          r[t] = _mm512_setzero_ps();
          continue;
        }
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(dm, xb + i * sL + d0));
        const __m512i hi = i + 1 < n ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(dm, xb + (i + 1) * sL + d0))
                                     : _mm512_setzero_si512();
        r[t] = _mm512_castsi512_ps(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
      simd::transpose16_ps(r);
      for (int64_t e = 0; e < nd; ++e) _mm512_mask_storeu_ps(out + (d0 + e) * n2 + i0, pm, r[e]);
    }
  }
}
#endif

// Rows r0..r1 (r0 even, r1 even or n) of an n-row head transposed into row pairs:
// (x(i, d), x(i + 1, d)) at out + d * n2 + i, n2 = n rounded up to even; the odd n's pad row
// (i = n) is zeros. One head dim at a time, so that the output is written in whole lines (the
// rows of a slice stay in L1 for the reads). avx512: the caller runs AVX-512 (every bf16 path does),
// so a contiguous head dim goes through pack_tpairs_bf16_avx512.
inline void pack_tpairs_bf16(const c10::BFloat16* x, int64_t sL, int64_t sD, int64_t n, int64_t D, int64_t n2,
                             int64_t r0, int64_t r1, uint16_t* out, bool avx512) {
#if SK_SIMD_X86
  if (avx512 && sD == 1) return pack_tpairs_bf16_avx512(x, sL, n, D, n2, r0, r1, out);
#endif
  (void)avx512;
  for (int64_t d = 0; d < D; ++d) {
    uint16_t* dst = out + d * n2;
    for (int64_t i = r0; i < r1; i += 2) {
      const uint32_t lo = bf16_bits(x, i, d, sL, sD);
      const uint32_t hi = i + 1 < n ? bf16_bits(x, i + 1, d, sL, sD) : 0u;
      const uint32_t word = lo | (hi << 16);
      std::memcpy(dst + i, &word, sizeof(word));
    }
  }
}

// Runs `npre` preparation jobs and then tasks [0, n) on all threads, in one parallel region so
// that a thread that is descheduled (a loaded machine) holds the others up at one join only.
// Preparation jobs (packing) are taken from a shared counter by every thread before it starts on
// tasks; a task whose inputs another thread is still preparing waits for them (the caller's
// task does that with its own ready counters). Tasks are given in an order where neighbours
// share data (e.g. the query blocks of one head). Each thread owns a contiguous range of about
// equal total cost, so it keeps its heads' K/V in its own caches as a static split would, and
// works through it largest task first; a thread that runs out takes the remaining tasks of the
// others from their small end, so a slow thread delays the call by at most one small task.
// `make_worker()` builds per-thread state (scratch) and returns a callable `void(int64_t task)`.
// Which thread runs which task varies; the results must not depend on it.
template <typename Pre, typename MakeWorker>
void run_tasks(int64_t npre, Pre&& pre, const std::vector<int64_t>& cost, MakeWorker&& make_worker) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0 && npre == 0) return;
  const int64_t nw = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), std::max(n, npre)));
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  std::vector<int64_t> bnd(nw + 1, n);
  bnd[0] = 0;
  for (int64_t t = 0, acc = 0, w = 1; t < n && w < nw; ++t) {
    acc += cost[t];
    while (w < nw && acc * nw >= total * w) bnd[w++] = t + 1;
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t(0));
  for (int64_t w = 0; w < nw; ++w) {
    std::stable_sort(order.begin() + bnd[w], order.begin() + bnd[w + 1],
                     [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  }
  std::vector<std::atomic<bool>> claimed(n);
  std::atomic<int64_t> next_pre{0};
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t t = next_pre.fetch_add(1); t < npre; t = next_pre.fetch_add(1)) pre(t);
      auto work = make_worker();
      for (int64_t t = bnd[w]; t < bnd[w + 1]; ++t) {
        if (!claimed[t].exchange(true, std::memory_order_acq_rel)) work(order[t]);
      }
      for (int64_t o = 1; o < nw; ++o) {
        const int64_t v = (w + o) % nw;
        for (int64_t t = bnd[v + 1] - 1; t >= bnd[v]; --t) {
          if (!claimed[t].exchange(true, std::memory_order_acq_rel)) work(order[t]);
        }
      }
    }
  });
}

// Waits until `count` reaches `target` (another thread finishing the preparation of a group).
inline void wait_ready(const std::atomic<int64_t>& count, int64_t target) {
  while (count.load(std::memory_order_acquire) < target) std::this_thread::yield();
}

// Bytes of packed data per chunk of (b, kv head) groups: bounds the extra memory on long
// sequences. Below glibc's largest mmap threshold (32 MiB) the buffer comes from the heap and is
// reused call after call, instead of fresh pages that fault and get zeroed on every call.
constexpr int64_t kPackBudgetBytes = int64_t(24) << 20;

// Panels of K/V per packing job and query rows per backward Q job: slices, not whole groups, so
// that the threads share the packing of a chunk with few groups.
constexpr int64_t kSlice = 8, kRowSlice = 64;

// The bf16 backward on AVX512_BF16 (bwd_block_avx512bf16); false: bf16 inputs take the float32
// backward on every machine.
constexpr bool kBf16Backward = true;

// ---------------------------------------------------------------------------------------------
// Validation shared by forward and backward.
// ---------------------------------------------------------------------------------------------

// q, k, v: common/host_checks.h, shared with the CUDA launcher.
using Geometry = host::AttentionGeometry;

// The shared checks (common/host_checks.h), then the kernels' view of the mask.
MaskDesc check_mask(const std::optional<Tensor>& attn_mask, const Geometry& g, at::ScalarType qt, const char* op) {
  MaskDesc m;
  if (!attn_mask.has_value() || !attn_mask->defined()) return m;
  const Tensor& t = *attn_mask;
  host::check_attn_mask(t, g, qt, host::kCpu, op);
  switch (t.scalar_type()) {
    case at::kBool:
      m.kind = MaskKind::Bool;
      break;
    case at::kHalf:
      m.kind = MaskKind::Half;
      break;
    case at::kBFloat16:
      m.kind = MaskKind::BFloat16;
      break;
    case at::kFloat:
      m.kind = MaskKind::Float;
      break;
    default:  // float64 (q's dtype): check_attn_mask allowed nothing else
      m.kind = MaskKind::Double;
      break;
  }
  m.ptr = t.data_ptr();
  m.sb = t.stride(0);
  m.sh = t.stride(1);
  m.si = t.stride(2);
  m.sj = t.stride(3);
  return m;
}

DropoutDesc check_dropout(double p, int64_t seed, int64_t offset, const char* op) {
  host::check_dropout_p(p, op);
  DropoutDesc d;
  d.on = p > 0.0;
  d.seed = static_cast<uint64_t>(seed);
  d.offset = static_cast<uint64_t>(offset);
  d.threshold = dropout_threshold(p);
  d.keep_scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
  return d;
}

// cu_seqlens (common/host_checks.h: check_varlen, values included on CPU tensors); not packed
// (n = -1) without them.
host::Varlen check_varlen_cpu(const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
                              int64_t max_seqlen_q, int64_t max_seqlen_k, const Geometry& g,
                              const std::optional<Tensor>& attn_mask, const std::optional<Tensor>& kv_lengths,
                              const char* op) {
  return host::check_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, g,
                            attn_mask.has_value() && attn_mask->defined(),
                            kv_lengths.has_value() && kv_lengths->defined(), host::kCpu, op);
}

// ---------------------------------------------------------------------------------------------
// The batch as the plans see it: `n` units, each with its own query rows and keys. Padded form:
// unit b is batch entry b (Lq rows; keys up to kv_lengths[b], Lk of them stored). Packed form
// (cu_seqlens, docs/INTERNALS.md "Packed sequences"): unit b is sequence b, rows [q0, q0 + lq)
// and keys [k0, k0 + lk) of storage batch 0 (seq_span). Every stage after the plan works on a
// unit with local indices i < lq, j < lk; the forms differ only in the storage offsets and the
// dims of the dropout index.
// ---------------------------------------------------------------------------------------------

struct Units {
  int64_t n = 0;  // B, or the N sequences
  bool packed = false;
  // The dropout index's grid (host::check_dropout_grid): dims (Lq, Lk), or (max_seqlen_q,
  // max_seqlen_k), or the caller's; the call's rows and keys start at (drop_r0, drop_c0) in it.
  int64_t drop_Lq = 0, drop_Lk = 0, drop_r0 = 0, drop_c0 = 0;
  // Per unit: storage batch, first row, rows, first key, visible keys (kv_lengths[b] or lk), and
  // stored keys (Lk or lk: what is packed).
  std::vector<int64_t> sb, q0, lq, k0, lk, kcap;
  std::vector<int64_t> row0;  // (n + 1): prefix of lq, where a unit's rows start in the plans' row arrays

  // Diagonal offset of unit b: query row i sits at i + off (visible_keys' rule).
  int64_t key_offset(int64_t b, bool bottom_right) const { return bottom_right ? lk[b] - lq[b] : 0; }
  // Keys packed for unit b, a multiple of the panel width NR: at least one panel in the padded
  // form (as always), none for a packed sequence without keys.
  int64_t kpad(int64_t b, int64_t NR) const { return round_up(packed ? kcap[b] : std::max<int64_t>(kcap[b], 1), NR); }
};

Units make_units(const Geometry& g, const int32_t* kv_len, const host::Varlen& vl, const host::DropoutGrid& grid) {
  Units u;
  u.packed = vl.packed();
  u.n = u.packed ? vl.n : g.B;
  u.drop_Lq = grid.len_q;
  u.drop_Lk = grid.len_k;
  u.drop_r0 = grid.row0;
  u.drop_c0 = grid.col0;
  for (auto* v : {&u.sb, &u.q0, &u.lq, &u.k0, &u.lk, &u.kcap}) v->resize(u.n);
  u.row0.assign(u.n + 1, 0);
  for (int64_t b = 0; b < u.n; ++b) {
    if (u.packed) {
      const SeqSpan s = seq_span(vl.cu_q, vl.cu_k, b, g.Lq, g.Lk);
      u.sb[b] = 0;
      u.q0[b] = s.q0;
      u.lq[b] = s.lq;
      u.k0[b] = s.k0;
      u.lk[b] = s.lk;
      u.kcap[b] = s.lk;
    } else {
      u.sb[b] = b;
      u.q0[b] = 0;
      u.lq[b] = g.Lq;
      u.k0[b] = 0;
      u.lk[b] = batch_key_length(kv_len, b, g.Lk);
      u.kcap[b] = g.Lk;
    }
    u.row0[b + 1] = u.row0[b] + u.lq[b];
  }
  return u;
}

// Item t of the chunk of groups that starts at g0, given the groups' item counts as a prefix
// `off` (ngroups + 1): its group and its index in the group. Groups without items never match.
inline std::pair<int64_t, int64_t> find_item(const std::vector<int64_t>& off, int64_t g0, int64_t t) {
  const int64_t x = off[g0] + t;
  const int64_t gi = std::upper_bound(off.begin(), off.end(), x) - off.begin() - 1;
  return {gi, x - off[gi]};
}

// Chunks of consecutive (unit, kv head) groups packed and processed together, given the groups'
// sizes as a prefix `off` (ngroups + 1, in elements of elem_bytes): at most what kPackBudgetBytes
// holds, but at least one group per thread so that every thread has work even when a group is
// large. As many chunks as filling each to the budget would need, of about equal size: filled
// greedily, the float32 backward at (4,8,512,64) had chunks of 31 groups and 1, and during the
// last one every thread but one waited (3% of its time). Returns the bounds (0, the first group
// of every further chunk, ngroups) and sets max_elems to the largest chunk's elements.
inline std::vector<int64_t> chunk_bounds(const std::vector<int64_t>& off, int64_t elem_bytes, int64_t& max_elems) {
  const int64_t ng = static_cast<int64_t>(off.size()) - 1, nthreads = at::get_num_threads();
  // The end of the chunk from g0: groups while they fit the budget and the chunk ends before
  // `target` (an element offset), and at least nthreads of them.
  const auto chunk_end = [&](int64_t g0, int64_t target) {
    int64_t g1 = g0 + 1;
    while (g1 < ng &&
           (g1 - g0 < nthreads || ((off[g1 + 1] - off[g0]) * elem_bytes <= kPackBudgetBytes && off[g1] < target))) {
      ++g1;
    }
    return g1;
  };
  int64_t nchunks = 0;
  for (int64_t g0 = 0; g0 < ng; ++nchunks) g0 = chunk_end(g0, off[ng]);
  std::vector<int64_t> bnd{0};
  max_elems = 0;
  for (int64_t g0 = 0, c = 1; g0 < ng; ++c) {
    const int64_t target = c >= nchunks ? off[ng] : off[0] + (off[ng] - off[0]) * c / nchunks;
    const int64_t g1 = chunk_end(g0, target);
    max_elems = std::max(max_elems, off[g1] - off[g0]);
    bnd.push_back(g1);
    g0 = g1;
  }
  return bnd;
}

// ---------------------------------------------------------------------------------------------
// Forward driver.
// ---------------------------------------------------------------------------------------------

// Every row's visible keys [lo, hi), unit after unit (Units::row0): the plan both passes start from.
struct RowRanges {
  std::vector<int64_t> lo, hi;
};

RowRanges visible_rows(const Units& u, int64_t wl, int64_t wr, bool bottom_right) {
  RowRanges r;
  r.lo.resize(u.row0[u.n]);
  r.hi.resize(u.row0[u.n]);
  for (int64_t b = 0; b < u.n; ++b) {
    for (int64_t i = 0; i < u.lq[b]; ++i) {
      const KeyRange kr = visible_keys(i, u.lq[b], u.lk[b], wl, wr, bottom_right);
      r.lo[u.row0[b] + i] = kr.lo;
      r.hi[u.row0[b] + i] = kr.hi;
    }
  }
  return r;
}

// Write back the forward's rows: merge the head's sink logit into (m, l) (-inf: none), normalize
// the accumulators (the dropout keep scale and the sink's rescale folded into 1 / l) and store the
// natural-log lse; a row that saw no key is 0 with lse -inf, or lse = sink with a finite sink.
// Output rows are out_stride apart (Dv in the padded form, Hq * Dv in the packed one).
// bf16_store: the kernels are a bf16-product path (Kernels::bf16), so the CPU has AVX512_BF16 and
// bf16 rows go through store_row_bf16.
template <typename scalar_t, typename T>
void store_fwd_rows(const T* O, const T* m, const T* l, int64_t nrows, int64_t Dv, int64_t Dvp, const DropoutDesc& drop,
                    T sink, scalar_t* out_rows, int64_t out_stride, T* lse_rows, bool bf16_store) {
  const T ks = static_cast<T>(drop.keep_scale);
  for (int64_t r = 0; r < nrows; ++r) {
    scalar_t* orow = out_rows + r * out_stride;
    const T* acc = O + r * Dvp;
    T mr = m[r], lr = l[r];
    const T f = merge_sink(sink, mr, lr);
    const bool dead = mr == -std::numeric_limits<T>::infinity();
    T inv = dead ? T(0) : (drop.on ? ks : T(1)) / lr;
    if (f != T(1)) inv *= f;  // exactly the plain path without a sink
    lse_rows[r] = static_cast<T>(softmax_lse_ln<double>(mr, static_cast<double>(lr)));
#if SK_SIMD_X86
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>) {
      if (bf16_store && !dead) {
        store_row_bf16(acc, inv, Dv, reinterpret_cast<uint16_t*>(orow));
        continue;
      }
    }
#endif
    for (int64_t d = 0; d < Dv; ++d) orow[d] = static_cast<scalar_t>(dead ? T(0) : acc[d] * inv);
  }
}

// The forward's plan: the selected kernels with the sizes they need (padded value length, tiles),
// every row's visible keys, and per (unit, kv head) group its packed K/V size, packing slices and
// tasks (query heads x query blocks), as prefixes over the groups, and the chunks of groups
// packed at once.
template <typename T>
struct FwdPlan {
  Kernels<T> kern;
  int64_t NR, Hg, Hkv, D, Dvp, BM, BN, ngroups;
  RowRanges rows;
  std::vector<int64_t> kpad, nqb;                      // per unit: packed keys, query blocks
  std::vector<int64_t> elem_off, slice_off, task_off;  // (ngroups + 1) prefixes
  std::vector<int64_t> chunks;                         // chunk_bounds
  int64_t chunk_elems = 0;                             // the largest chunk's packed elements

  int64_t npanel(int64_t gi) const { return kpad[gi / Hkv] / NR; }
  int64_t D2() const { return round_up(D, kern.d_align); }
  // Per key, the T elements of a group's packed K and V: D + Dvp, or room for the bf16 layouts
  // (D2 + Dvp halves) where D2 is padded past 2 D.
  int64_t kv_elems() const { return std::max(D, D2()) + Dvp; }
};

template <typename T>
FwdPlan<T> make_fwd_plan(const Geometry& g, const Units& u, int64_t wl, int64_t wr, bool bottom_right,
                         bool bf16_operands) {
  FwdPlan<T> p;
  p.kern = select_kernels<T>(bf16_operands);
  const int64_t W = p.kern.W;
  p.NR = 2 * W;
  p.Hg = g.Hq / g.Hkv;
  p.Hkv = g.Hkv;
  p.D = g.D;
  p.Dvp = round_up(std::max<int64_t>(g.Dv, 1), W);
  p.BM = kFwdBM;
  p.BN = round_up(kFwdBN, p.NR);
  p.rows = visible_rows(u, wl, wr, bottom_right);
  p.ngroups = u.n * g.Hkv;
  p.kpad.resize(u.n);
  p.nqb.resize(u.n);
  for (int64_t b = 0; b < u.n; ++b) {
    // A packed sequence without query rows has no task and packs nothing.
    p.kpad[b] = u.packed && u.lq[b] == 0 ? 0 : u.kpad(b, p.NR);
    p.nqb[b] = (u.lq[b] + p.BM - 1) / p.BM;
  }
  p.elem_off.assign(p.ngroups + 1, 0);
  p.slice_off.assign(p.ngroups + 1, 0);
  p.task_off.assign(p.ngroups + 1, 0);
  for (int64_t gi = 0; gi < p.ngroups; ++gi) {
    const int64_t b = gi / g.Hkv, np = p.kpad[b] / p.NR;
    p.elem_off[gi + 1] = p.elem_off[gi] + p.kpad[b] * p.kv_elems();
    p.slice_off[gi + 1] = p.slice_off[gi] + (np + kSlice - 1) / kSlice;
    p.task_off[gi + 1] = p.task_off[gi] + p.Hg * p.nqb[b];
  }
  p.chunks = chunk_bounds(p.elem_off, int64_t(sizeof(T)), p.chunk_elems);
  return p;
}

// The forward's inputs, options and outputs, as its packing jobs and tasks read them.
template <typename scalar_t, typename T>
struct FwdIo {
  const Tensor &q, &k, &v;
  Tensor &out, &lse;
  const Geometry& g;
  const Units& u;
  const MaskDesc& mask;
  T qmul;  // what Q is packed with, or the bf16 products' scale: the scale, or 1 where post
  T post;  // 1, or the scale the softmax applies instead (float paths, scale_after_products)
  bool bottom_right;
  const DropoutDesc& drop;
  const ScoreMods<T>& mods;
  const scalar_t* qd = q.template const_data_ptr<scalar_t>();
  const scalar_t* kd = k.template const_data_ptr<scalar_t>();
  const scalar_t* vd = v.template const_data_ptr<scalar_t>();
  scalar_t* od = out.template data_ptr<scalar_t>();
  T* lsed = lse.template data_ptr<T>();
};

// The packed K^T panels and V rows of the groups [g0, g1) of the current chunk, one group after
// the other; ready[gi - g0] counts group gi's packed slices, which its tasks wait for.
template <typename T>
struct FwdPack {
  const FwdPlan<T>* plan = nullptr;
  Tensor buf;
  T* base = nullptr;
  int64_t g0 = 0, g1 = 0;
  std::vector<std::atomic<int64_t>> ready;  // per group of the chunk: its slices packed
  std::vector<std::atomic<bool>> claimed;   // per slice of the chunk: a task has taken its packing

  void start_chunk(int64_t first, int64_t last) {
    g0 = first;
    g1 = last;
    ready = std::vector<std::atomic<int64_t>>(last - first);
    claimed = std::vector<std::atomic<bool>>(nslices());
  }
  int64_t nslices() const { return plan->slice_off[g1] - plan->slice_off[g0]; }
  int64_t ntasks() const { return plan->task_off[g1] - plan->task_off[g0]; }
  T* Kp(int64_t gi) const { return base + (plan->elem_off[gi] - plan->elem_off[g0]); }
  T* Vp(int64_t gi) const { return Kp(gi) + plan->kpad[gi / plan->Hkv] * plan->D; }
  // The bf16 path's layouts in the same space (kpad * (D2 + Dvp) bf16 fit in kpad * kv_elems() T).
  uint16_t* Kh(int64_t gi) const { return reinterpret_cast<uint16_t*>(Kp(gi)); }
  uint16_t* Vh(int64_t gi) const { return Kh(gi) + plan->kpad[gi / plan->Hkv] * plan->D2(); }
};

template <typename T>
FwdPack<T> make_fwd_pack(const FwdPlan<T>& p, const at::TensorOptions& opts) {
  FwdPack<T> pk;
  pk.plan = &p;
  pk.buf = at::empty({p.chunk_elems}, opts.dtype(c10::CppTypeToScalarType<T>::value));
  pk.base = pk.buf.template data_ptr<T>();
  return pk;
}

// Packing job t of the chunk: a slice of kSlice panels of K^T and the matching V rows of one group.
template <typename scalar_t, typename T>
void pack_fwd_slice(const FwdPlan<T>& p, const FwdIo<scalar_t, T>& io, FwdPack<T>& pk, int64_t t) {
  const Tensor &k = io.k, &v = io.v;
  const scalar_t *kd = io.kd, *vd = io.vd;
  const int64_t Hkv = io.g.Hkv, D = io.g.D, Dv = io.g.Dv, NR = p.NR;
  const auto [gi, sl] = find_item(p.slice_off, pk.g0, t);
  const int64_t b = gi / Hkv, hk = gi % Hkv;
  const int64_t p0 = sl * kSlice, p1 = std::min(p.npanel(gi), p0 + kSlice);
  const int64_t ks = io.u.sb[b] * k.stride(0) + io.u.k0[b] * k.stride(2);
  const int64_t vs = io.u.sb[b] * v.stride(0) + io.u.k0[b] * v.stride(2);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (p.kern.bf16) {
      pack_panels_bf16(kd + ks + hk * k.stride(1), k.stride(2), k.stride(3), io.u.lk[b], D, p.D2(), NR, p0, p1,
                       pk.Kh(gi), p.kern.avx512);
      pack_vpairs_bf16(vd + vs + hk * v.stride(1), v.stride(2), v.stride(3), io.u.lk[b], Dv, p.Dvp, p0 * NR, p1 * NR,
                       pk.Vh(gi), p.kern.avx512);
      pk.ready[gi - pk.g0].fetch_add(1, std::memory_order_release);
      return;
    }
  }
  pack_panels<scalar_t, T>(kd + ks + hk * k.stride(1), k.stride(2), k.stride(3), io.u.lk[b], D, NR, p0, p1, pk.Kp(gi),
                           p.kern.avx512);
  pack_rows<scalar_t, T>(vd + vs + hk * v.stride(1), v.stride(2), v.stride(3), io.u.lk[b], Dv, p.Dvp, p0 * NR, p1 * NR,
                         T(1), pk.Vp(gi));
  pk.ready[gi - pk.g0].fetch_add(1, std::memory_order_release);
}

// Tasks of the groups [g0, g1): (group, query head in group, block of query rows), cost = visible
// (row, key) pairs.
template <typename T>
std::vector<int64_t> fwd_task_costs(const FwdPlan<T>& p, const Units& u, int64_t g0, int64_t g1) {
  const int64_t BM = p.BM;
  const std::vector<int64_t>&lo_all = p.rows.lo, &hi_all = p.rows.hi;
  std::vector<int64_t> cost;
  cost.reserve(p.task_off[g1] - p.task_off[g0]);
  for (int64_t gi = g0; gi < g1; ++gi) {
    const int64_t b = gi / p.Hkv, Lq = u.lq[b], nqb = p.nqb[b], r0 = u.row0[b];
    for (int64_t hh = 0; hh < p.Hg; ++hh) {
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * BM, i1 = std::min(Lq, i0 + BM);
        int64_t c = i1 - i0;
        for (int64_t i = i0; i < i1; ++i) c += hi_all[r0 + i] - lo_all[r0 + i];
        cost.push_back(c);
      }
    }
  }
  return cost;
}

// Per-thread scratch of fwd_compute_task: Q rows, the O accumulators, m, l, the P tile, alpha.
// BM is a multiple of every kernel's row group, so the AMX path's padded rows are in the buffer.
static_assert(kFwdBM % 32 == 0 && kFwdBM % (2 * kMR) == 0, "kFwdBM: whole row groups of every forward kernel");
template <typename T>
int64_t fwd_scratch_elems(const FwdPlan<T>& p) {
  // The last mr * BN: the bf16 path's P (uint16), which also finds room for its Q rows in the
  // first BM * max(D, D2) (BM * D2 bf16).
  const int64_t mr = p.kern.mr;
  return p.BM * std::max(p.D, p.D2()) + p.BM * p.Dvp + 2 * p.BM + mr * p.BN + mr + (p.kern.bf16 ? mr * p.BN : 0);
}

// Task t of the chunk: one block of query rows of one query head, from packing its Q rows to
// writing back its output rows and lse.
template <typename scalar_t, typename T>
void fwd_compute_task(const FwdPlan<T>& p, const FwdIo<scalar_t, T>& io, FwdPack<T>& pk, T* scratch, int64_t t) {
  const Tensor &q = io.q, &out = io.out;
  const Units& u = io.u;
  const int64_t Hq = io.g.Hq, Hkv = io.g.Hkv, D = io.g.D, Dv = io.g.Dv;
  const int64_t BM = p.BM, Dvp = p.Dvp;
  T* Qs = scratch;
  T* O = Qs + BM * std::max(D, p.D2());
  T* m = O + BM * Dvp;
  T* l = m + BM;
  T* Pb = l + BM;
  T* alpha = Pb + p.kern.mr * p.BN;
  uint16_t* Ph = reinterpret_cast<uint16_t*>(alpha + p.kern.mr);
  const auto [gi, local] = find_item(p.task_off, pk.g0, t);
  const int64_t b = gi / Hkv, hk = gi % Hkv, nqb = p.nqb[b];
  const int64_t hh = local / nqb, qb = local % nqb, h = hk * p.Hg + hh;
  const int64_t Lq = u.lq[b], sb = u.sb[b], row = u.q0[b];  // row: the unit's first row in storage
  const int64_t i0 = qb * BM, nrows = std::min(BM, Lq - i0);
  const scalar_t* qrows = io.qd + sb * q.stride(0) + h * q.stride(1) + (row + i0) * q.stride(2);
  FwdRows<T> a;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (p.kern.bf16) {
      uint16_t* Qh = reinterpret_cast<uint16_t*>(Qs);
      pack_qrows_bf16(qrows, q.stride(2), q.stride(3), nrows, D, p.D2(), Qh);
      // Zero rows up to the row group (the AMX tiles read whole groups; see AmxProducts).
      std::fill(Qh + nrows * p.D2(), Qh + round_up(nrows, p.kern.mr) * p.D2(), uint16_t(0));
      a.D2 = p.D2();
      a.Qh = Qh;
      a.Kh = pk.Kh(gi);
      a.Vh = pk.Vh(gi);
      a.Ph = Ph;
      a.qk_scale = io.qmul;
    }
  }
  if (!p.kern.bf16) {
    pack_rows<scalar_t, T>(qrows, q.stride(2), q.stride(3), nrows, D, D, 0, nrows, io.qmul, Qs);
    a.post_scale = io.post;
  }
  // Whole row groups: the AMX tiles add into the O rows past nrows of a tail group too.
  fill(O, round_up(nrows, p.kern.mr) * Dvp, T(0));
  fill(m, nrows, -std::numeric_limits<T>::infinity());
  fill(l, nrows, T(0));
  // The group's K/V are packed by the first tasks that need them, each slice by whichever task
  // claims it (a thread that meets a slice being packed waits for it below). Packing the whole
  // chunk before any product, as the backward does, ran every thread memory-bound at once and left
  // the packed data to be read back from L3. With cold inputs (8 rotated sets), bf16 (4,8,512,64)
  // went from 0.83-0.89x torch (median of five pairs 0.85x) to 0.85-0.90x (0.89x) in interleaved
  // A/B runs, float32 from 0.94x to 1.00x (one pair); the bench cannot resolve it (+-15% between
  // runs on this shared machine).
  const int64_t s0 = p.slice_off[pk.g0];
  for (int64_t sl = p.slice_off[gi] - s0; sl < p.slice_off[gi + 1] - s0; ++sl) {
    if (!pk.claimed[sl].exchange(true, std::memory_order_acq_rel)) pack_fwd_slice(p, io, pk, sl);
  }
  wait_ready(pk.ready[gi - pk.g0], p.slice_off[gi + 1] - p.slice_off[gi]);
  a.D = D;
  a.Dvp = Dvp;
  a.BN = p.BN;
  a.Qs = Qs;
  a.Kp = pk.Kp(gi);
  a.Vp = pk.Vp(gi);
  a.nrows = nrows;
  a.lo = p.rows.lo.data() + u.row0[b] + i0;
  a.hi = p.rows.hi.data() + u.row0[b] + i0;
  a.mask = io.mask;
  a.b = b;
  a.h = h;
  a.i0 = i0;
  a.drop = io.drop;
  a.n_row0 = ((static_cast<uint64_t>(b) * Hq + h) * u.drop_Lq + u.drop_r0 + i0) * u.drop_Lk + u.drop_c0;
  a.Lk = u.drop_Lk;
  a.mods = row_mods(io.mods, b, h, Hq, u.key_offset(b, io.bottom_right));
  a.O = O;
  a.m = m;
  a.l = l;
  a.P = Pb;
  a.alpha = alpha;
  p.kern.fwd(a);
  store_fwd_rows<scalar_t, T>(O, m, l, nrows, Dv, Dvp, io.drop, io.mods.sink(h),
                              io.od + sb * out.stride(0) + h * out.stride(1) + (row + i0) * out.stride(2),
                              out.stride(2), io.lsed + (sb * Hq + h) * io.g.Lq + row + i0, p.kern.bf16);
}

template <typename scalar_t, typename T>
void attention_fwd_run(const Tensor& q, const Tensor& k, const Tensor& v, const Geometry& g, const Units& u,
                       const MaskDesc& mask, double scale, int64_t wl, int64_t wr, bool bottom_right,
                       const DropoutDesc& drop, const ScoreMods<T>& mods, Tensor& out, Tensor& lse) {
  const FwdPlan<T> plan = make_fwd_plan<T>(
      g, u, wl, wr, bottom_right, std::is_same_v<scalar_t, c10::BFloat16> && bf16_products_suffice(scale, g.D));
  // The bf16 products apply the scale after their sums already: no pass over q for them.
  const bool after = !plan.kern.bf16 && cpu_paths::scale_after_products(q, scale);
  const T qmul = after ? T(1) : static_cast<T>(scale), post = after ? static_cast<T>(scale) : T(1);
  const FwdIo<scalar_t, T> io{q, k, v, out, lse, g, u, mask, qmul, post, bottom_right, drop, mods};
  FwdPack<T> pack = make_fwd_pack(plan, q.options());
  // Chunks one after the other; within one, packing (by the tasks) and compute share a parallel region.
  for (size_t c = 0; c + 1 < plan.chunks.size(); ++c) {
    pack.start_chunk(plan.chunks[c], plan.chunks[c + 1]);
    const std::vector<int64_t> cost = fwd_task_costs(plan, u, pack.g0, pack.g1);
    // No packing up front: each task packs its group's unclaimed slices (fwd_compute_task).
    run_tasks(
        0, [](int64_t) {}, cost,
        [&]() {
          // Per-thread scratch, allocated once per call.
          auto scratch = std::make_shared<std::vector<T>>(fwd_scratch_elems(plan));
          return [&, scratch](int64_t t) { fwd_compute_task(plan, io, pack, scratch->data(), t); };
        });
  }
}

// The score modifiers (softcap, ALiBi, sinks), validated in the accumulation type T.
template <typename T>
ScoreMods<T> modifiers_cpu(const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks,
                           double softcap, int64_t nunits, const Geometry& g, const char* op) {
  // alibi_slopes is (B, Hq), or (N, Hq) with packed sequences: one row per unit.
  const host::ModifierArgs<T> m = host::check_modifiers<T>(alibi_slopes, sinks, softcap, nunits, g.Hq, host::kCpu, op);
  return ScoreMods<T>{m.softcap, m.alibi, m.sinks};
}

// Validation before anything else runs, in the accumulation type of q's dtype.
void check_modifiers_cpu(const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks, double softcap,
                         int64_t nunits, const Geometry& g, at::ScalarType qt, const char* op) {
  if (qt == at::kDouble) {
    modifiers_cpu<double>(alibi_slopes, sinks, softcap, nunits, g, op);
  } else {
    modifiers_cpu<float>(alibi_slopes, sinks, softcap, nunits, g, op);
  }
}

std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const std::optional<Tensor>& attn_mask,
                                             const std::optional<Tensor>& kv_lengths, double scale, int64_t window_left,
                                             int64_t window_right, bool bottom_right, double dropout_p, int64_t seed,
                                             int64_t offset, const std::optional<Tensor>& alibi_slopes,
                                             const std::optional<Tensor>& sinks, double softcap,
                                             const std::optional<Tensor>& cu_seqlens_q,
                                             const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                             int64_t max_seqlen_k, bool deterministic, at::IntArrayRef dropout_grid) {
  (void)deterministic;  // recorded by the autograd layer for the backward
  constexpr const char* op = "seqkernels::attention_fwd (cpu)";
  const Geometry g = host::check_qkv(q, k, v, host::kCpu, op);
  const host::Varlen vl =
      check_varlen_cpu(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, g, attn_mask, kv_lengths, op);
  const int64_t nunits = vl.packed() ? vl.n : g.B;
  check_modifiers_cpu(alibi_slopes, sinks, softcap, nunits, g, q.scalar_type(), op);
  const MaskDesc mask = check_mask(attn_mask, g, q.scalar_type(), op);
  const int32_t* kv_len = host::check_kv_lengths(kv_lengths, g, host::kCpu, op);
  const DropoutDesc drop = check_dropout(dropout_p, seed, offset, op);
  host::check_window(window_left, window_right, op);
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Packed: out is (1, Hq, total_q, Dv) over token-major (total_q, Hq, Dv) storage, as the fake
  // kernel promises (the public layer returns out[0].transpose(0, 1) without a copy).
  Tensor out = vl.packed() ? at::empty({g.Lq, g.Hq, g.Dv}, q.options()).permute({1, 0, 2}).unsqueeze(0)
                           : at::empty({g.B, g.Hq, g.Lq, g.Dv}, q.options());
  Tensor lse = at::empty({g.B, g.Hq, g.Lq}, q.options().dtype(lse_type));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const Units u = make_units(g, kv_len, vl, host::check_dropout_grid(dropout_grid, g, vl, op));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const ScoreMods<T> mods = modifiers_cpu<T>(alibi_slopes, sinks, softcap, nunits, g, op);
    attention_fwd_run<scalar_t, T>(q, k, v, g, u, mask, scale, window_left, window_right, bottom_right, drop, mods, out,
                                   lse);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward driver.
// ---------------------------------------------------------------------------------------------

// lse arrives rounded to T (float32 for every input dtype but float64); rows where that rounding
// may have swallowed ln(l) (common/attention_math.h: lse_needs_recompute) get their normalizer
// recomputed (lse_corrections); rows of ordinary attention stay far below it and cost nothing.
template <typename T>
inline bool lse_needs_correction(T lse, int64_t lo, int64_t hi) {
  return lo < hi && lse_needs_recompute(lse);
}

// For the n query rows i0.. of head h of batch b (each with lse_needs_correction): recomputes
// every row's max m and sum l with the forward's kernel, run with Dvp = 0 (no P V), on the
// backward's own packed Q (scale applied, rows Dp apart) and K^T panels, so the scores and their
// mask are bitwise the ones bwd_row sees, and writes corr = (m + ln l - lse) * log2(e), so that
// bwd_row's exp2((s - lse) log2(e) - corr) is exp(s - m) / l. lo, hi, lse and corr point at row
// i0. A row whose recomputation finds nothing finite (an lse that is not this forward's) keeps 0.
template <typename T>
void lse_corrections(const Kernels<T>& kern, const T* Qp, int64_t Dp, int64_t D, const T* Kt, int64_t BN,
                     const int64_t* lo, const int64_t* hi, const MaskDesc& mask, int64_t b, int64_t h, int64_t i0,
                     int64_t n, int64_t Lk, const RowMods<T>& mods, T sink, const T* lse, T* corr,
                     std::vector<T>& scratch, T post_scale) {
  scratch.resize(n * D + 2 * n + kern.mr * BN + kern.mr);
  T* Qs = scratch.data();
  T* m = Qs + n * D;
  T* l = m + n;
  T* Pb = l + n;
  T* alpha = Pb + kern.mr * BN;
  for (int64_t r = 0; r < n; ++r) std::copy(Qp + r * Dp, Qp + r * Dp + D, Qs + r * D);
  fill(m, n, -std::numeric_limits<T>::infinity());
  fill(l, n, T(0));
  FwdRows<T> a;
  a.post_scale = post_scale;  // Qp's rows, scaled or not as the forward's were
  a.D = D;
  a.Dvp = 0;  // the P V product has no columns: fwd_rows only updates m and l
  a.BN = BN;
  a.Qs = Qs;
  a.Kp = Kt;
  a.Vp = Kt;  // not read with Dvp = 0
  a.nrows = n;
  a.lo = lo;
  a.hi = hi;
  a.mask = mask;
  a.b = b;
  a.h = h;
  a.i0 = i0;
  a.drop = DropoutDesc{};  // lse is the undropped normalizer
  a.n_row0 = 0;
  a.Lk = Lk;
  a.mods = mods;
  a.O = m;  // not written with Dvp = 0
  a.m = m;
  a.l = l;
  a.P = Pb;
  a.alpha = alpha;
  kern.fwd(a);
  for (int64_t r = 0; r < n; ++r) {
    merge_sink(sink, m[r], l[r]);  // lse includes the sink, as the forward's
    const double mm = m[r], ll = l[r];
    const bool ok = std::isfinite(mm) && std::isfinite(ll) && ll > 0;
    corr[r] = ok ? static_cast<T>((mm - static_cast<double>(lse[r]) + std::log(ll)) * kLog2e) : T(0);
  }
}

// lse_corrections for the bf16 dot path: the bf16 forward kernel on the backward's bf16 Q rows
// (D2 apart, unscaled) and K^T panels of d-pairs, so the scores are bitwise the ones
// bwd_block_avx512bf16 sees.
inline void lse_corrections_bf16(const Kernels<float>& kern, const uint16_t* Qh, int64_t D, int64_t D2,
                                 const uint16_t* Kh, float scale, int64_t BN, const int64_t* lo, const int64_t* hi,
                                 const MaskDesc& mask, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t Lk,
                                 const RowMods<float>& mods, float sink, const float* lse, float* corr,
                                 std::vector<float>& scratch) {
  scratch.resize(2 * n + kern.mr * BN + kern.mr);
  float* m = scratch.data();
  float* l = m + n;
  float* Pb = l + n;
  float* alpha = Pb + kern.mr * BN;
  fill(m, n, -std::numeric_limits<float>::infinity());
  fill(l, n, 0.f);
  FwdRows<float> a;
  a.D = D;
  a.Dvp = 0;  // no P V: fwd_rows only updates m and l
  a.BN = BN;
  a.Qs = nullptr;
  a.Kp = nullptr;
  a.Vp = nullptr;
  a.nrows = n;
  a.lo = lo;
  a.hi = hi;
  a.mask = mask;
  a.b = b;
  a.h = h;
  a.i0 = i0;
  a.drop = DropoutDesc{};
  a.n_row0 = 0;
  a.Lk = Lk;
  a.mods = mods;
  a.O = m;
  a.m = m;
  a.l = l;
  a.P = Pb;
  a.alpha = alpha;
  a.D2 = D2;
  a.Qh = Qh;
  a.Kh = Kh;
  a.Vh = Kh;  // not read with Dvp = 0
  a.Ph = nullptr;
  a.qk_scale = scale;
  kern.fwd(a);
  for (int64_t r = 0; r < n; ++r) {
    merge_sink(sink, m[r], l[r]);
    const double mm = m[r], ll = l[r];
    const bool ok = std::isfinite(mm) && std::isfinite(ll) && ll > 0;
    corr[r] = ok ? static_cast<float>((mm - static_cast<double>(lse[r]) + std::log(ll)) * kLog2e) : 0.f;
  }
}

// The backward's plan, before anything is packed: each row's visible key range, the work in each
// key block of each unit (visible (row, key) pairs), and the split of every unit's key blocks
// into `splits` contiguous ranges of about equal work, each with its own dQ partial.
struct BwdPlan {
  const Units* u = nullptr;
  int64_t splits = 1, max_nkb = 0;
  std::vector<int64_t> lo, hi;       // visible keys [lo, hi) of each row (Units::row0)
  std::vector<int64_t> kb_off;       // (n + 1): prefix of the units' key-block counts
  std::vector<int64_t> kb_cost;      // per key block, unit after unit (kb_off)
  std::vector<int64_t> split_begin;  // (n, splits + 1): first key block of each split, unit-local

  int64_t nkb(int64_t b) const { return kb_off[b + 1] - kb_off[b]; }

  void split(int64_t n) {
    splits = n;
    split_begin.assign(u->n * (splits + 1), 0);
    for (int64_t b = 0; b < u->n; ++b) {
      const int64_t nk = nkb(b);
      const int64_t* kc = kb_cost.data() + kb_off[b];
      int64_t total = 0;
      for (int64_t kb = 0; kb < nk; ++kb) total += kc[kb];
      int64_t* sb = split_begin.data() + b * (splits + 1);
      sb[0] = 0;
      int64_t acc = 0, s = 1;
      for (int64_t kb = 0; kb < nk && s < splits; ++kb) {
        acc += kc[kb];
        while (s < splits && acc * splits >= total * s) sb[s++] = kb + 1;
      }
      while (s <= splits) sb[s++] = nk;
    }
  }

  // Work of split s of group gi (a kv head of a unit), for the task scheduler.
  int64_t split_cost(int64_t gi, int64_t Hkv, int64_t s) const {
    const int64_t b = gi / Hkv;
    const int64_t* sb = split_begin.data() + b * (splits + 1);
    int64_t c = 0;
    for (int64_t kb = sb[s]; kb < sb[s + 1]; ++kb) c += kb_cost[kb_off[b] + kb];
    return c;
  }
};

BwdPlan make_bwd_plan(const Units& u, int64_t wl, int64_t wr, bool bottom_right, int64_t NR, int64_t BN) {
  BwdPlan p;
  p.u = &u;
  RowRanges rows = visible_rows(u, wl, wr, bottom_right);
  p.lo = std::move(rows.lo);
  p.hi = std::move(rows.hi);
  p.kb_off.assign(u.n + 1, 0);
  for (int64_t b = 0; b < u.n; ++b) {
    const int64_t nk = (u.kpad(b, NR) + BN - 1) / BN;
    p.kb_off[b + 1] = p.kb_off[b] + nk;
    p.max_nkb = std::max(p.max_nkb, nk);
  }
  p.kb_cost.assign(p.kb_off[u.n], 0);
  for (int64_t b = 0; b < u.n; ++b) {
    const int64_t Lk_pad = u.kpad(b, NR), Lq = u.lq[b], r0 = u.row0[b];
    for (int64_t kb = 0; kb < p.nkb(b); ++kb) {
      const int64_t j0 = kb * BN, j1 = std::min(Lk_pad, j0 + BN);
      int64_t c = 1;
      for (int64_t i = 0; i < Lq; ++i) {
        c += std::max<int64_t>(0, std::min(p.hi[r0 + i], j1) - std::max(p.lo[r0 + i], j0));
      }
      p.kb_cost[p.kb_off[b] + kb] = c;
    }
  }
  return p;
}

// Write back one key block's dK / dV rows [j0, jend) from the packed accumulators, key j's value
// d at dK[(j - j0) * sj + d * sd] (rows: sj = Dp, sd = 1; the bf16 path's transposed dK^T: sj = 1,
// sd = BN; likewise dV). Keys past kv_lengths[b] (>= jvalid) take no part: exactly 0, even where
// 0 * NaN (a NaN query row times a hidden key's zero dS) reached their accumulators.
template <typename scalar_t, typename T>
void store_dkdv_rows(const T* dK, int64_t k_sj, int64_t k_sd, const T* dV, int64_t v_sj, int64_t v_sd, int64_t j0,
                     int64_t jend, int64_t jvalid, int64_t D, int64_t Dv, scalar_t* dk_head, int64_t dk_s2,
                     int64_t dk_s3, scalar_t* dv_head, int64_t dv_s2, int64_t dv_s3) {
  int64_t jfirst = j0;  // the first key the loop below writes
#if SK_SIMD_X86
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>) {
    if (k_sj == 1 && v_sj == 1 && dk_s3 == 1 && dv_s3 == 1) {
      // The transposed accumulators (held only by the bf16 backward, which runs on AVX512_BF16)
      // into contiguous gradients: the keys below jvalid by register transposes, the rest (zeros)
      // below.
      jfirst = std::max(j0, std::min(jvalid, jend));
      store_transposed_bf16(dK, k_sd, jfirst - j0, D, reinterpret_cast<uint16_t*>(dk_head + j0 * dk_s2), dk_s2);
      store_transposed_bf16(dV, v_sd, jfirst - j0, Dv, reinterpret_cast<uint16_t*>(dv_head + j0 * dv_s2), dv_s2);
    }
  }
#endif
  // Both sides contiguous along the head dim (the float paths' rows into contiguous gradients): loops
  // the compiler vectorizes; the strided form below ran scalar, 2-3% of a float32 backward at
  // (4,8,512,64) (perf).
  const bool rows = k_sd == 1 && v_sd == 1 && dk_s3 == 1 && dv_s3 == 1;
  for (int64_t j = jfirst; j < jend; ++j) {
    scalar_t* dkrow = dk_head + j * dk_s2;
    scalar_t* dvrow = dv_head + j * dv_s2;
    const T* ak = dK + (j - j0) * k_sj;
    const T* av = dV + (j - j0) * v_sj;
    if (j >= jvalid) {
      for (int64_t d = 0; d < D; ++d) dkrow[d * dk_s3] = scalar_t(0);
      for (int64_t d = 0; d < Dv; ++d) dvrow[d * dv_s3] = scalar_t(0);
    } else if (rows) {
      for (int64_t d = 0; d < D; ++d) dkrow[d] = static_cast<scalar_t>(ak[d]);
      for (int64_t d = 0; d < Dv; ++d) dvrow[d] = static_cast<scalar_t>(av[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) dkrow[d * dk_s3] = static_cast<scalar_t>(ak[d * k_sd]);
      for (int64_t d = 0; d < Dv; ++d) dvrow[d * dv_s3] = static_cast<scalar_t>(av[d * v_sd]);
    }
  }
}

// Write back one head's dQ: scale * the sum of the `splits` partials (part_stride apart), in
// split order, so the result does not depend on which thread finished which split.
template <typename scalar_t, typename T>
void store_dq_rows(const T* part0, int64_t part_stride, int64_t splits, int64_t Lq, int64_t D, int64_t Dp, T scale,
                   scalar_t* dq_head, int64_t dq_s2, int64_t dq_s3) {
  for (int64_t i = 0; i < Lq; ++i) {
    scalar_t* dqrow = dq_head + i * dq_s2;
    const T* src = part0 + i * Dp;
    if (splits == 1 && dq_s3 == 1) {  // one partial into a contiguous row: a loop that vectorizes
      for (int64_t d = 0; d < D; ++d) dqrow[d] = static_cast<scalar_t>(src[d] * scale);
      continue;
    }
    for (int64_t d = 0; d < D; ++d) {
      T acc = src[d];
      for (int64_t s = 1; s < splits; ++s) acc += src[s * part_stride + d];
      dqrow[d * dq_s3] = static_cast<scalar_t>(acc * scale);
    }
  }
}

// The backward's packed data, per (unit, kv head) group of the current chunk [g0, g1), one group
// after the other: K^T panels, K rows and V^T panels, then for each query head of the group its Q
// rows (scale applied), dO rows, Delta, lse, lse corrections and one dQ partial per key-block
// split. It also holds the selected kernels' tile sizes, which that layout depends on, and per
// unit its sizes (rows, packed keys, packing jobs), with prefixes over the groups.
template <typename T>
struct BwdPack {
  int64_t NR, Hg, Hkv, D, Dp, Dv, Dvp, BM, BN, fwd_BN;
  int64_t splits = 1;
  // The bf16 dot path (Kernels::bf16): K, V, Q and dO are packed as bf16 pairs (Kh .. dOTh below)
  // in place of the T layouts Kt .. dOp; the rest of the group's part is laid out as before.
  bool bf16 = false;
  bool tiles = false;                                  // and padded for the AMX tiles (bwd_block_amx)
  bool avx512 = false;                                 // Kernels::avx512 (pack_panels)
  int64_t D2 = 0, Dv2 = 0;                             // D and Dv rounded up to even (to 32: tiles)
  std::vector<int64_t> lq, kpad, nslice, nrslice;      // per unit
  std::vector<int64_t> elem_off, kvjob_off, qjob_off;  // (ngroups + 1) prefixes
  std::vector<int64_t> chunks;                         // chunk_bounds
  Tensor buf;
  T* base = nullptr;
  int64_t g0 = 0, g1 = 0;
  // ready: a group's finished packing jobs, which its tasks wait for. kv_ready: its finished K/V
  // slices, which lse_corrections (in a Q job) reads. done: its finished splits; the last one
  // reduces dQ.
  std::vector<std::atomic<int64_t>> ready, done, kv_ready;

  void start_chunk(int64_t first, int64_t last) {
    g0 = first;
    g1 = last;
    ready = std::vector<std::atomic<int64_t>>(last - first);
    done = std::vector<std::atomic<int64_t>>(last - first);
    kv_ready = std::vector<std::atomic<int64_t>>(last - first);
  }
  // K/V jobs come first: every one is taken before any Q job, by a thread that runs it without
  // waiting, so a Q job waiting for them cannot deadlock.
  int64_t nkv_jobs() const { return kvjob_off[g1] - kvjob_off[g0]; }
  int64_t nq_jobs() const { return qjob_off[g1] - qjob_off[g0]; }
  int64_t jobs_per_group(int64_t gi) const { return nslice[gi / Hkv] + Hg * nrslice[gi / Hkv]; }
  int64_t Lq(int64_t gi) const { return lq[gi / Hkv]; }
  int64_t Lk_pad(int64_t gi) const { return kpad[gi / Hkv]; }
  int64_t npanel(int64_t gi) const { return kpad[gi / Hkv] / NR; }

  T* Kt(int64_t gi) const { return base + (elem_off[gi] - elem_off[g0]); }
  T* Kr(int64_t gi) const { return Kt(gi) + Lk_pad(gi) * D; }
  T* Vt(int64_t gi) const { return Kr(gi) + Lk_pad(gi) * Dp; }
  T* Qp(int64_t gi) const { return Vt(gi) + Lk_pad(gi) * Dv; }
  T* dOp(int64_t gi) const { return Qp(gi) + Hg * Lq(gi) * Dp; }
  T* Delta(int64_t gi) const { return Kt(gi) + operand_elems(gi); }
  T* lse(int64_t gi) const { return Delta(gi) + Hg * Lq(gi); }
  T* corr(int64_t gi) const { return lse(gi) + Hg * Lq(gi); }
  T* dQ(int64_t gi, int64_t s) const { return corr(gi) + Hg * Lq(gi) + s * Hg * Lr(gi) * Dp; }

  // The bf16 layouts (BwdBlock::Kh ..), one after the other from Kt(gi): K^T panels of d-pairs,
  // K rows as key pairs, V^T panels of dv-pairs, then per query head Q rows, dO rows, Q^T and dO^T
  // as row pairs.
  // With tiles: Lq2 (the query-row pairs of Q^T, dO^T) and Lr (the rows per head of Q, dO and the
  // dQ partials) are Lq rounded up to 32, DT and DvT (the rows of Q^T, dO^T) D and Dv to 16.
  int64_t Lq2(int64_t gi) const { return round_up(Lq(gi), tiles ? 32 : 2); }
  int64_t Lr(int64_t gi) const { return tiles ? Lq2(gi) : Lq(gi); }
  int64_t DT() const { return tiles ? round_up(D, 16) : D; }
  int64_t DvT() const { return tiles ? round_up(Dv, 16) : Dv; }
  uint16_t* Kh(int64_t gi) const { return reinterpret_cast<uint16_t*>(Kt(gi)); }
  uint16_t* Krh(int64_t gi) const { return Kh(gi) + Lk_pad(gi) * D2; }
  uint16_t* Vh(int64_t gi) const { return Krh(gi) + Lk_pad(gi) * Dp; }
  uint16_t* Qh(int64_t gi) const { return Vh(gi) + Lk_pad(gi) * Dv2; }
  uint16_t* dOh(int64_t gi) const { return Qh(gi) + Hg * Lr(gi) * D2; }
  uint16_t* QTh(int64_t gi) const { return dOh(gi) + Hg * Lr(gi) * Dv2; }
  uint16_t* dOTh(int64_t gi) const { return QTh(gi) + Hg * DT() * Lq2(gi); }

  // Elements (of T) of the packed K, V, Q and dO of group gi, in either layout.
  int64_t operand_elems(int64_t gi) const {
    const int64_t L = Lq(gi), K = Lk_pad(gi);
    if (bf16) {
      const int64_t halves = K * (D2 + Dp + Dv2) + Hg * (Lr(gi) * (D2 + Dv2) + Lq2(gi) * (DT() + DvT()));
      return round_up((halves + 1) / 2, 16);
    }
    return K * (D + Dp + Dv) + Hg * L * (Dp + Dvp);
  }

  // Elements of group gi's part of the buffer with `ns` dQ partials.
  int64_t group_elems(int64_t gi, int64_t ns) const {
    const int64_t L = Lq(gi);
    return operand_elems(gi) + Hg * L * 3 + ns * Hg * Lr(gi) * Dp;
  }
};

template <typename T>
BwdPack<T> bwd_pack_sizes(const Geometry& g, const Units& u, const Kernels<T>& kern) {
  const int64_t W = kern.W;
  BwdPack<T> pk;
  pk.NR = 2 * W;
  pk.Hg = g.Hq / g.Hkv;
  pk.Hkv = g.Hkv;
  pk.D = g.D;
  pk.Dp = round_up(std::max<int64_t>(g.D, 1), W);
  pk.Dv = g.Dv;
  pk.Dvp = round_up(std::max<int64_t>(g.Dv, 1), W);
  pk.BM = kern.bwd_bm;
  pk.BN = round_up(kern.bwd_bn, pk.NR);
  pk.fwd_BN = round_up(kFwdBN, pk.NR);  // key block of lse_corrections (the forward's)
  pk.lq = u.lq;
  pk.kpad.resize(u.n);
  pk.nslice.resize(u.n);
  pk.nrslice.resize(u.n);
  for (int64_t b = 0; b < u.n; ++b) {
    pk.kpad[b] = u.kpad(b, pk.NR);
    pk.nslice[b] = (pk.kpad[b] / pk.NR + kSlice - 1) / kSlice;
    pk.nrslice[b] = (u.lq[b] + kRowSlice - 1) / kRowSlice;
  }
  const int64_t ng = u.n * g.Hkv;
  pk.kvjob_off.assign(ng + 1, 0);
  pk.qjob_off.assign(ng + 1, 0);
  for (int64_t gi = 0; gi < ng; ++gi) {
    pk.kvjob_off[gi + 1] = pk.kvjob_off[gi] + pk.nslice[gi / g.Hkv];
    pk.qjob_off[gi + 1] = pk.qjob_off[gi] + pk.Hg * pk.nrslice[gi / g.Hkv];
  }
  return pk;
}

// Key-block splits per group and the chunks of groups, then the buffer. Splits give enough tasks
// per chunk to keep every thread busy when there are few groups. Each split owns a dQ partial,
// summed in split order afterwards. Groups of a chunk cost the same unless kv_lengths differ or
// the sequences are packed, so a multiple of the thread count needs none.
template <typename T>
void size_bwd_chunks(BwdPack<T>& pk, BwdPlan& plan, const Units& u, bool has_kv_len, const at::TensorOptions& opts) {
  const int64_t ng = u.n * pk.Hkv;
  const int64_t nthreads = at::get_num_threads();
  pk.elem_off.assign(ng + 1, 0);
  for (int64_t gi = 0; gi < ng; ++gi) pk.elem_off[gi + 1] = pk.elem_off[gi] + pk.group_elems(gi, 1);
  int64_t max_elems = 0;
  const std::vector<int64_t> chunks0 = chunk_bounds(pk.elem_off, int64_t(sizeof(T)), max_elems);
  const int64_t chunk0 = chunks0.size() > 1 ? chunks0[1] : 1;  // groups in the first chunk
  int64_t splits = 1;
  const bool even = chunk0 % nthreads == 0 && !has_kv_len && !u.packed;
  if (chunk0 < 4 * nthreads && !even) {
    splits = std::max<int64_t>(1, std::min<int64_t>(plan.max_nkb, (4 * nthreads + chunk0 - 1) / chunk0));
  }
  plan.split(splits);
  pk.splits = splits;
  for (int64_t gi = 0; gi < ng; ++gi) pk.elem_off[gi + 1] = pk.elem_off[gi] + pk.group_elems(gi, splits);
  pk.chunks = chunk_bounds(pk.elem_off, int64_t(sizeof(T)), max_elems);
  pk.buf = at::empty({max_elems}, opts.dtype(c10::CppTypeToScalarType<T>::value));
  pk.base = pk.buf.template data_ptr<T>();
}

// The backward's inputs, options and outputs, as its packing jobs and tasks read them.
template <typename scalar_t, typename T>
struct BwdIo {
  const Tensor &dout, &q, &k, &v, &out, &lse;
  Tensor &dq, &dk, &dv;
  double* dsink_rows;
  const Geometry& g;
  const Units& u;
  const MaskDesc& mask;
  T scale;
  T qmul;  // what Q is packed with (Qp): the scale, or 1 where post (cpu_paths::scale_after_products)
  T post;  // 1, or the scale S and dK get after the products instead
  bool bottom_right;
  const DropoutDesc& drop;
  const ScoreMods<T>& mods;
  const scalar_t* qd = q.template const_data_ptr<scalar_t>();
  const scalar_t* kd = k.template const_data_ptr<scalar_t>();
  const scalar_t* vd = v.template const_data_ptr<scalar_t>();
  const scalar_t* od = out.template const_data_ptr<scalar_t>();
  const scalar_t* dod = dout.template const_data_ptr<scalar_t>();
  const T* lsed = lse.template const_data_ptr<T>();
  scalar_t* dqd = dq.template data_ptr<scalar_t>();
  scalar_t* dkd = dk.template data_ptr<scalar_t>();
  scalar_t* dvd = dv.template data_ptr<scalar_t>();

  int64_t key_offset(int64_t b) const { return u.key_offset(b, bottom_right); }
  // Offsets of unit b's first query row / key in the storage of a (B, H, L, D) tensor.
  int64_t row_base(const Tensor& t, int64_t b) const { return u.sb[b] * t.stride(0) + u.q0[b] * t.stride(2); }
  int64_t key_base(const Tensor& t, int64_t b) const { return u.sb[b] * t.stride(0) + u.k0[b] * t.stride(2); }
  // Index of unit b's row 0 of head h in lse (and the dsink rows): (B, Hq, Lq) contiguous.
  int64_t lse_base(int64_t b, int64_t h) const { return (u.sb[b] * g.Hq + h) * g.Lq + u.q0[b]; }
};

// K/V job t: a slice of kSlice panels of one group in the three layouts the kernels read.
template <typename scalar_t, typename T>
int64_t pack_bwd_kv(const BwdIo<scalar_t, T>& io, BwdPack<T>& pk, int64_t t) {
  const Tensor &k = io.k, &v = io.v;
  const int64_t Hkv = io.g.Hkv, D = pk.D, Dv = pk.Dv, NR = pk.NR;
  const auto [gi, sl] = find_item(pk.kvjob_off, pk.g0, t);
  const int64_t b = gi / Hkv, hk = gi % Hkv;
  const int64_t Lk_b = io.u.lk[b];
  const int64_t p0 = sl * kSlice, p1 = std::min(pk.npanel(gi), p0 + kSlice);
  const scalar_t* kh = io.kd + io.key_base(k, b) + hk * k.stride(1);
  const scalar_t* vh = io.vd + io.key_base(v, b) + hk * v.stride(1);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (pk.bf16) {
      pack_panels_bf16(kh, k.stride(2), k.stride(3), Lk_b, D, pk.D2, NR, p0, p1, pk.Kh(gi), pk.avx512);
      pack_vpairs_bf16(kh, k.stride(2), k.stride(3), Lk_b, D, pk.Dp, p0 * NR, p1 * NR, pk.Krh(gi), pk.avx512);
      pack_panels_bf16(vh, v.stride(2), v.stride(3), Lk_b, Dv, pk.Dv2, NR, p0, p1, pk.Vh(gi), pk.avx512);
      pk.kv_ready[gi - pk.g0].fetch_add(1, std::memory_order_release);
      return gi;
    }
  }
  pack_panels<scalar_t, T>(kh, k.stride(2), k.stride(3), Lk_b, D, NR, p0, p1, pk.Kt(gi), pk.avx512);
  pack_rows<scalar_t, T>(kh, k.stride(2), k.stride(3), Lk_b, D, pk.Dp, p0 * NR, p1 * NR, T(1), pk.Kr(gi));
  pack_panels<scalar_t, T>(vh, v.stride(2), v.stride(3), Lk_b, Dv, NR, p0, p1, pk.Vt(gi), pk.avx512);
  pk.kv_ready[gi - pk.g0].fetch_add(1, std::memory_order_release);
  return gi;
}

// For rows [r0, r1) of query head hh of group gi: the lse corrections of the rows that need them
// (lse_needs_correction), each run of consecutive such rows recomputed as one block.
template <typename scalar_t, typename T>
void correct_lse_rows(const Kernels<T>& kern, const BwdPlan& plan, const BwdIo<scalar_t, T>& io, const BwdPack<T>& pk,
                      int64_t gi, int64_t hh, int64_t r0, int64_t r1) {
  const int64_t Lq = pk.Lq(gi), Dp = pk.Dp, Hq = io.g.Hq, Hkv = io.g.Hkv;
  const int64_t b = gi / Hkv, h = (gi % Hkv) * pk.Hg + hh;
  const T* lr = pk.lse(gi) + hh * Lq;
  T* cr = pk.corr(gi) + hh * Lq;
  const int64_t* lo = plan.lo.data() + io.u.row0[b];
  const int64_t* hi = plan.hi.data() + io.u.row0[b];
  const RowMods<T> md = row_mods(io.mods, b, h, Hq, io.key_offset(b));
  const T sink = io.mods.sink(h);
  std::vector<T> corr_scratch;
  for (int64_t i = r0; i < r1;) {
    if (!lse_needs_correction(lr[i], lo[i], hi[i])) {
      ++i;
      continue;
    }
    int64_t e = i + 1;
    while (e < r1 && lse_needs_correction(lr[e], lo[e], hi[e])) ++e;
    wait_ready(pk.kv_ready[gi - pk.g0], pk.nslice[b]);
    if constexpr (std::is_same_v<T, float>) {
      if (pk.bf16) {
        lse_corrections_bf16(kern, pk.Qh(gi) + (hh * pk.Lr(gi) + i) * pk.D2, pk.D, pk.D2, pk.Kh(gi), io.scale,
                             pk.fwd_BN, lo + i, hi + i, io.mask, b, h, i, e - i, io.u.drop_Lk, md, sink, lr + i, cr + i,
                             corr_scratch);
        i = e;
        continue;
      }
    }
    lse_corrections<T>(kern, pk.Qp(gi) + hh * Lq * Dp + i * Dp, Dp, pk.D, pk.Kt(gi), pk.fwd_BN, lo + i, hi + i, io.mask,
                       b, h, i, e - i, io.u.drop_Lk, md, sink, lr + i, cr + i, corr_scratch, io.post);
    i = e;
  }
}

// d lse / d sink = p_sink = exp(sink - lse), the sink's probability, corrected like bwd_row's P;
// its share of the row's gradient is -p_sink * Delta. One value per row of [r0, r1), summed in a
// fixed order by the caller. lse, corr, delta and ds point at row 0 of the head.
template <typename T>
void store_dsink_rows(T sink, const T* lse, const T* corr, const T* delta, int64_t r0, int64_t r1, double* ds) {
  const double sk = static_cast<double>(sink), ninf = -std::numeric_limits<double>::infinity();
  for (int64_t i = r0; i < r1; ++i) {
    const double L = static_cast<double>(lse[i]);
    const double p = sk == ninf || L == ninf ? 0.0 : std::exp2((sk - L) * kLog2e - static_cast<double>(corr[i]));
    ds[i] = -p * static_cast<double>(delta[i]);
  }
}

// sum_d x[d sx] y[d sy] in double (Delta = rowsum(dO O)). Eight partial sums (d mod 8, added
// pairwise at the end) rather than one chain of dependent additions, which made this loop 1.6% of
// a float32 backward at (4,8,512,64) (perf); contiguous rows vectorize.
template <typename X, typename Y>
double dot_double(const X* x, int64_t sx, const Y* y, int64_t sy, int64_t n) {
  double acc[8] = {};
  int64_t d = 0;
  if (sx == 1 && sy == 1) {
    for (; d + 8 <= n; d += 8) {
      for (int u = 0; u < 8; ++u) acc[u] += static_cast<double>(x[d + u]) * static_cast<double>(y[d + u]);
    }
  }
  for (; d < n; ++d) acc[d % 8] += static_cast<double>(x[d * sx]) * static_cast<double>(y[d * sy]);
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Q job u: a slice of kRowSlice rows of one query head: Q, dO, Delta, lse, the lse corrections,
// the dsink contributions, and the rows of its dQ partials set to zero.
template <typename scalar_t, typename T>
int64_t pack_bwd_rows(const Kernels<T>& kern, const BwdPlan& plan, const BwdIo<scalar_t, T>& io, BwdPack<T>& pk,
                      int64_t u) {
  const Tensor &q = io.q, &dout = io.dout, &out = io.out;
  const int64_t Hkv = io.g.Hkv, Hg = pk.Hg, D = pk.D, Dp = pk.Dp, Dv = pk.Dv;
  const int64_t Dvp = pk.Dvp;
  const auto [gi, local] = find_item(pk.qjob_off, pk.g0, u);
  const int64_t b = gi / Hkv, nrs = pk.nrslice[b], Lq = pk.Lq(gi);
  const int64_t hh = local / nrs, rs = local % nrs;
  const int64_t h = (gi % Hkv) * Hg + hh;
  const int64_t r0 = rs * kRowSlice, r1 = std::min(Lq, r0 + kRowSlice);
  const scalar_t* qh = io.qd + io.row_base(q, b) + h * q.stride(1);
  const scalar_t* doh = io.dod + io.row_base(dout, b) + h * dout.stride(1);
  const scalar_t* oh = io.od + io.row_base(out, b) + h * out.stride(1);
  const int64_t o_s2 = out.stride(2), o_s3 = out.stride(3);
  T* delta = pk.Delta(gi) + hh * Lq;
  T* lr = pk.lse(gi) + hh * Lq;
  bool packed_bf16 = false;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (pk.bf16) {
      const int64_t D2 = pk.D2, Dv2 = pk.Dv2, L2 = pk.Lq2(gi);
      const int64_t q_s2 = q.stride(2), q_s3 = q.stride(3), d_s2 = dout.stride(2), d_s3 = dout.stride(3);
      const int64_t Lr = pk.Lr(gi), DT = pk.DT(), DvT = pk.DvT();
      uint16_t *Qh = pk.Qh(gi) + hh * Lr * D2, *dOh = pk.dOh(gi) + hh * Lr * Dv2;
      uint16_t *QTh = pk.QTh(gi) + hh * DT * L2, *dOTh = pk.dOTh(gi) + hh * DvT * L2;
      pack_qrows_bf16(qh + r0 * q_s2, q_s2, q_s3, r1 - r0, D, D2, Qh + r0 * D2);
      pack_qrows_bf16(doh + r0 * d_s2, d_s2, d_s3, r1 - r0, Dv, Dv2, dOh + r0 * Dv2);
      pack_tpairs_bf16(qh, q_s2, q_s3, Lq, D, L2, r0, r1, QTh, pk.avx512);
      pack_tpairs_bf16(doh, d_s2, d_s3, Lq, Dv, L2, r0, r1, dOTh, pk.avx512);
      if (pk.tiles) {
        // The tiles' padding (bwd_block_amx): this slice's columns of the pad rows of Q^T and dO^T;
        // the last slice also the pad columns of every row and the pad rows of Q and dO.
        const int64_t c0 = r0, c1 = r1 == Lq ? L2 : round_up(r1, 2);
        for (int64_t d = D; d < DT; ++d) std::fill(QTh + d * L2 + c0, QTh + d * L2 + c1, uint16_t(0));
        for (int64_t d = Dv; d < DvT; ++d) std::fill(dOTh + d * L2 + c0, dOTh + d * L2 + c1, uint16_t(0));
        if (r1 == Lq) {
          const int64_t e = round_up(Lq, 2);
          for (int64_t d = 0; d < D; ++d) std::fill(QTh + d * L2 + e, QTh + d * L2 + L2, uint16_t(0));
          for (int64_t d = 0; d < Dv; ++d) std::fill(dOTh + d * L2 + e, dOTh + d * L2 + L2, uint16_t(0));
          std::fill(Qh + Lq * D2, Qh + Lr * D2, uint16_t(0));
          std::fill(dOh + Lq * Dv2, dOh + Lr * Dv2, uint16_t(0));
        }
      }
      for (int64_t i = r0; i < r1; ++i) {
        // As below, from dO as given (bf16 -> double is exact, so Delta is the float32 path's).
        delta[i] = static_cast<T>(dot_double(doh + i * d_s2, d_s3, oh + i * o_s2, o_s3, Dv));
        lr[i] = io.lsed[io.lse_base(b, h) + i];
      }
      packed_bf16 = true;
    }
  }
  T* dO = pk.dOp(gi) + hh * Lq * Dvp;
  if (!packed_bf16) {
    pack_rows<scalar_t, T>(qh, q.stride(2), q.stride(3), Lq, D, Dp, r0, r1, io.qmul, pk.Qp(gi) + hh * Lq * Dp);
    pack_rows<scalar_t, T>(doh, dout.stride(2), dout.stride(3), Lq, Dv, Dvp, r0, r1, T(1), dO);
  }
  for (int64_t i = r0; i < r1 && !packed_bf16; ++i) {
    // In double: Delta is a long dot product whose error would go straight into dS.
    delta[i] = static_cast<T>(dot_double(dO + i * Dvp, 1, oh + i * o_s2, o_s3, Dv));
    lr[i] = io.lsed[io.lse_base(b, h) + i];
  }
  T* cr = pk.corr(gi) + hh * Lq;
  fill(cr + r0, r1 - r0, T(0));
  correct_lse_rows(kern, plan, io, pk, gi, hh, r0, r1);
  if (io.dsink_rows != nullptr) {
    store_dsink_rows(io.mods.sink(h), lr, cr, delta, r0, r1, io.dsink_rows + io.lse_base(b, h));
  }
  // Rows [r0, r1) of every partial; the last slice also the tiles' pad rows (Lq to Lr).
  const int64_t rend = r1 == Lq ? pk.Lr(gi) : r1;
  for (int64_t s = 0; s < pk.splits; ++s) fill(pk.dQ(gi, s) + hh * pk.Lr(gi) * Dp + r0 * Dp, (rend - r0) * Dp, T(0));
  return gi;
}

// Preparation job t of the chunk (K/V jobs, then Q jobs); a group's tasks start when all of its
// jobs are done.
template <typename scalar_t, typename T>
void pack_bwd_job(const Kernels<T>& kern, const BwdPlan& plan, const BwdIo<scalar_t, T>& io, BwdPack<T>& pk,
                  int64_t t) {
  const int64_t gi = t < pk.nkv_jobs() ? pack_bwd_kv(io, pk, t) : pack_bwd_rows(kern, plan, io, pk, t - pk.nkv_jobs());
  pk.ready[gi - pk.g0].fetch_add(1, std::memory_order_release);
}

// Tasks of the chunk: (group, split of its key blocks), cost = the split's visible (row, key) pairs.
template <typename T>
std::vector<int64_t> bwd_task_costs(const BwdPlan& plan, const BwdPack<T>& pk, int64_t Hkv) {
  const int64_t ntask = (pk.g1 - pk.g0) * pk.splits;
  std::vector<int64_t> cost(ntask);
  for (int64_t t = 0; t < ntask; ++t) cost[t] = plan.split_cost(pk.g0 + t / pk.splits, Hkv, t % pk.splits);
  return cost;
}

// dQ = scale * sum over splits (in split order) of the partials, for every query head of group
// gi; run by whichever thread finishes the group's last split.
template <typename scalar_t, typename T>
void dq_reduce(const BwdIo<scalar_t, T>& io, const BwdPack<T>& pk, int64_t gi) {
  const int64_t Hkv = io.g.Hkv, Hg = pk.Hg, Lq = pk.Lq(gi), Dp = pk.Dp;
  const int64_t b = gi / Hkv;
  for (int64_t hh = 0; hh < Hg; ++hh) {
    const int64_t h = (gi % Hkv) * Hg + hh;
    store_dq_rows<scalar_t, T>(pk.dQ(gi, 0) + hh * pk.Lr(gi) * Dp, Hg * pk.Lr(gi) * Dp, pk.splits, Lq, pk.D, Dp,
                               io.scale, io.dqd + io.row_base(io.dq, b) + h * io.dq.stride(1), io.dq.stride(2),
                               io.dq.stride(3));
  }
}

// Per-thread scratch of bwd_dkdv_task: the S and dP tiles, the dK and dV accumulators of one key
// block, and the kernel's G row.
template <typename T>
int64_t bwd_scratch_elems(const BwdPack<T>& pk) {
  // The bf16 path adds its P and dS row pairs and dS rows (3 BM x BN uint16).
  return 2 * pk.BM * pk.BN + pk.BN * (pk.Dp + pk.Dvp) + pk.BN + (pk.bf16 ? 2 * pk.BM * pk.BN : 0);
}

// Task t of the chunk: dK and dV of the key blocks of one split of one group, summed over the
// group's query heads and written back block by block, with that split's dQ partial.
template <typename scalar_t, typename T>
void bwd_dkdv_task(const Kernels<T>& kern, const BwdPlan& plan, const BwdIo<scalar_t, T>& io, BwdPack<T>& pk,
                   T* scratch, int64_t t) {
  const int64_t Hkv = io.g.Hkv, Hg = pk.Hg;
  const int64_t D = pk.D, Dp = pk.Dp, Dv = pk.Dv, Dvp = pk.Dvp, BM = pk.BM, BN = pk.BN, splits = pk.splits;
  T* S = scratch;
  T* dPb = S + BM * BN;
  T* dK = dPb + BM * BN;
  T* dV = dK + BN * Dp;
  T* Gb = dV + BN * Dvp;
  uint16_t* Pi = reinterpret_cast<uint16_t*>(Gb + BN);  // bf16 path: 3 BM x BN uint16
  const int64_t gi = pk.g0 + t / splits, s = t % splits;
  const int64_t b = gi / Hkv, hk = gi % Hkv;
  const int64_t Lq = pk.Lq(gi), Lk_pad = pk.Lk_pad(gi), Lk = io.u.kcap[b];
  const int64_t* sb = plan.split_begin.data() + b * (splits + 1);
  const int64_t* lo = plan.lo.data() + io.u.row0[b];
  const int64_t* hi = plan.hi.data() + io.u.row0[b];
  wait_ready(pk.ready[gi - pk.g0], pk.jobs_per_group(gi));
  BwdBlock<T> a;
  a.post_scale = io.post;
  a.D = D;
  a.Dp = Dp;
  a.Dv = Dv;
  a.Dvp = Dvp;
  a.BM = BM;
  a.BN = BN;
  a.Kt = pk.Kt(gi);
  a.Kr = pk.Kr(gi);
  a.Vt = pk.Vt(gi);
  a.Hg = Hg;
  a.Lq = Lq;
  a.Lr = pk.Lr(gi);
  a.Qp = pk.Qp(gi);
  a.dOp = pk.dOp(gi);
  a.Delta = pk.Delta(gi);
  a.lse = pk.lse(gi);
  a.corr = pk.corr(gi);
  a.dQ = pk.dQ(gi, s);
  a.lo = lo;
  a.hi = hi;
  a.mask = io.mask;
  a.b = b;
  a.h0 = hk * Hg;
  a.Hq = io.g.Hq;
  a.Lk = io.u.drop_Lk;
  a.dLq = io.u.drop_Lq;
  a.dr0 = io.u.drop_r0;
  a.dc0 = io.u.drop_c0;
  a.drop = io.drop;
  a.mods = &io.mods;
  a.off = io.key_offset(b);
  a.G = Gb;
  a.S = S;
  a.dP = dPb;
  a.dK = dK;
  a.dV = dV;
  if (pk.bf16) {
    a.D2 = pk.D2;
    a.Dv2 = pk.Dv2;
    a.Lq2 = pk.Lq2(gi);
    a.Kh = pk.Kh(gi);
    a.Krh = pk.Krh(gi);
    a.Vh = pk.Vh(gi);
    a.Qh = pk.Qh(gi);
    a.dOh = pk.dOh(gi);
    a.QTh = pk.QTh(gi);
    a.dOTh = pk.dOTh(gi);
    a.Pi = Pi;
    a.dSi = Pi + BM * BN;
    a.dSh = Pi + 2 * BM * BN;
    a.qk_scale = io.scale;
  }
  const Tensor &dk = io.dk, &dv = io.dv;
  for (int64_t kb = sb[s]; kb < sb[s + 1]; ++kb) {
    const int64_t j0 = kb * BN, j1 = std::min(Lk_pad, j0 + BN);
    int64_t ilo = Lq, ihi = 0;
    for (int64_t i = 0; i < Lq; ++i) {
      if (lo[i] < hi[i] && lo[i] < j1 && hi[i] > j0) {
        ilo = std::min(ilo, i);
        ihi = i + 1;
      }
    }
    if (pk.bf16) {
      fill(dK, Dp * BN, T(0));  // the tiles' pad rows too (up to D, Dv rounded to 16)
      fill(dV, Dvp * BN, T(0));
    } else {
      fill(dK, (j1 - j0) * Dp, T(0));
      fill(dV, (j1 - j0) * Dvp, T(0));
    }
    if (ilo < ihi) {
      a.j0 = j0;
      a.j1 = j1;
      a.ilo = ilo;
      a.ihi = ihi;
      kern.bwd(a);
    }
    // dK = scale * sum dS Q: Qp carries the scale on the float paths, the bf16 product applies it.
    const bool tr = pk.bf16;  // the bf16 path accumulates dK^T and dV^T (D x BN, Dv x BN)
    store_dkdv_rows<scalar_t, T>(dK, tr ? 1 : Dp, tr ? BN : 1, dV, tr ? 1 : Dvp, tr ? BN : 1, j0, std::min(j1, Lk),
                                 io.u.lk[b], D, Dv, io.dkd + io.key_base(dk, b) + hk * dk.stride(1), dk.stride(2),
                                 dk.stride(3), io.dvd + io.key_base(dv, b) + hk * dv.stride(1), dv.stride(2),
                                 dv.stride(3));
  }
  if (pk.done[gi - pk.g0].fetch_add(1, std::memory_order_acq_rel) + 1 == splits) dq_reduce(io, pk, gi);
}

template <typename scalar_t, typename T>
void attention_bwd_run(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                       const Tensor& lse, const Geometry& g, const Units& u, const MaskDesc& mask, bool has_kv_len,
                       double scale, int64_t wl, int64_t wr, bool bottom_right, const DropoutDesc& drop,
                       const ScoreMods<T>& mods, double* dsink_rows, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Kernels<T> kern =
      select_kernels<T>(kBf16Backward && std::is_same_v<scalar_t, c10::BFloat16> && bf16_products_suffice(scale, g.D));
  BwdPack<T> pack = bwd_pack_sizes<T>(g, u, kern);
  pack.bf16 = kern.bf16;
  pack.avx512 = kern.avx512;
  pack.tiles = kern.bf16 && kern.tiles;
  pack.D2 = round_up(g.D, kern.d_align);
  pack.Dv2 = round_up(g.Dv, kern.d_align);
  BwdPlan plan = make_bwd_plan(u, wl, wr, bottom_right, pack.NR, pack.BN);
  size_bwd_chunks(pack, plan, u, has_kv_len, q.options());
  const bool after = !kern.bf16 && cpu_paths::scale_after_products(q, scale);  // as the forward's
  const T qmul = after ? T(1) : static_cast<T>(scale), post = after ? static_cast<T>(scale) : T(1);
  const BwdIo<scalar_t, T> io{
      dout,         q,    k,   v, out, lse, dq, dk, dv, dsink_rows, g, u, mask, static_cast<T>(scale), qmul, post,
      bottom_right, drop, mods};
  for (size_t c = 0; c + 1 < pack.chunks.size(); ++c) {
    pack.start_chunk(pack.chunks[c], pack.chunks[c + 1]);
    const std::vector<int64_t> cost = bwd_task_costs(plan, pack, g.Hkv);
    auto pack_job = [&](int64_t t) { pack_bwd_job(kern, plan, io, pack, t); };
    run_tasks(pack.nkv_jobs() + pack.nq_jobs(), pack_job, cost, [&]() {
      auto scratch = std::make_shared<std::vector<T>>(bwd_scratch_elems(pack));
      return [&, scratch](int64_t t) { bwd_dkdv_task(kern, plan, io, pack, scratch->data(), t); };
    });
  }
}

// `deterministic` is accepted for the schema and ignored: this backward has no atomics and
// sums every gradient in a fixed order (dQ partials per key-block split, reduced in split
// order), so its result never depends on thread timing.
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const std::optional<Tensor>& attn_mask, const std::optional<Tensor>& kv_lengths, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double dropout_p, int64_t seed, int64_t offset, bool deterministic,
    const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks, double softcap,
    const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, at::IntArrayRef dropout_grid) {
  (void)deterministic;
  constexpr const char* op = "seqkernels::attention_bwd (cpu)";
  const Geometry g = host::check_qkv(q, k, v, host::kCpu, op);
  const host::Varlen vl =
      check_varlen_cpu(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, g, attn_mask, kv_lengths, op);
  const int64_t nunits = vl.packed() ? vl.n : g.B;
  check_modifiers_cpu(alibi_slopes, sinks, softcap, nunits, g, q.scalar_type(), op);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor dsinks = at::zeros({sinks.has_value() ? g.Hq : 0}, q.options().dtype(acc_type));
  TORCH_CHECK(grad_out.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(), op,
              ": grad_out, out and lse must be CPU tensors");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.B, g.Hq, g.Lq, g.Dv}), op,
              ": grad_out must be (B, Hq, Lq, Dv) = (", g.B, ", ", g.Hq, ", ", g.Lq, ", ", g.Dv, "), got ",
              grad_out.sizes());
  TORCH_CHECK(out.sizes() == grad_out.sizes(), op, ": out must be (B, Hq, Lq, Dv), got ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype ", q.scalar_type());
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({g.B, g.Hq, g.Lq}) && lse.scalar_type() == lse_type, op,
              ": lse must be a ", lse_type, " tensor of shape (B, Hq, Lq), got ", lse.scalar_type(), " ", lse.sizes());
  const MaskDesc mask = check_mask(attn_mask, g, q.scalar_type(), op);
  const int32_t* kv_len = host::check_kv_lengths(kv_lengths, g, host::kCpu, op);
  const DropoutDesc drop = check_dropout(dropout_p, seed, offset, op);
  host::check_window(window_left, window_right, op);
  // Laid out like q, k, v (as the registered fake kernel promises: token-major when packed);
  // written through strides. Packed on CPU, check_varlen has made the sequences cover every row
  // and key, so every element is written (keys of a sequence without query rows get zeros).
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty_like(k);
  Tensor dv = at::empty_like(v);
  if (g.B == 0 || g.Hq == 0 || g.Lq == 0 || g.Lk == 0) {
    // Nothing attends (no query row, or no key): every gradient is 0. With Hq == 0 (or Lq == 0)
    // dK and dV still have elements, which must not be left as uninitialized memory.
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dsinks};
  }
  const Tensor lse_c = lse.contiguous();
  // dsinks: one contribution per (b, h, i) row of lse's (B, Hq, Lq) storage (a packed batch's
  // sequences one after the other in its rows), written by whichever thread packs the row, then
  // summed per head in (b, i) order so that the result does not depend on the thread timing.
  std::vector<double> dsink_rows(sinks.has_value() ? g.B * g.Hq * g.Lq : 0);
  const Units u = make_units(g, kv_len, vl, host::check_dropout_grid(dropout_grid, g, vl, op));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const ScoreMods<T> mods = modifiers_cpu<T>(alibi_slopes, sinks, softcap, nunits, g, op);
    attention_bwd_run<scalar_t, T>(grad_out, q, k, v, out, lse_c, g, u, mask, kv_len != nullptr, scale, window_left,
                                   window_right, bottom_right, drop, mods,
                                   sinks.has_value() ? dsink_rows.data() : nullptr, dq, dk, dv);
    if (sinks.has_value()) {
      T* ds = dsinks.data_ptr<T>();
      for (int64_t h = 0; h < g.Hq; ++h) {
        double acc = 0;
        for (int64_t b = 0; b < g.B; ++b) {
          const double* row = dsink_rows.data() + (b * g.Hq + h) * g.Lq;
          for (int64_t i = 0; i < g.Lq; ++i) acc += row[i];
        }
        ds[h] = static_cast<T>(acc);
      }
    }
  });
  return {dq, dk, dv, dsinks};
}

}  // namespace

// The float kernels multiply Q by the scale as they pack it (one multiply per element of Q instead
// of one per score), which overflows for a finite q once |q| |scale| passes the accumulation type's
// largest value: |scale| > 1 only, so the usual 1 / sqrt(D) never asks. There the scores get the
// scale after the products instead (FwdRows/BwdBlock::post_scale, decode's likewise), as torch,
// which scales q and k by sqrt(scale) each, stays finite: q = 1e38, k ~ 1e-37, scale 4 gave NaN in
// every output and gradient. One pass over q (aminmax) decides, the same for forward and backward.
bool cpu_paths::scale_after_products(const at::Tensor& q, double scale) {
  if (!(std::abs(scale) > 1.0) || q.numel() == 0) return false;
  const double limit = q.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                      : static_cast<double>(std::numeric_limits<float>::max());
  const auto [lo, hi] = at::aminmax(q);
  const double amax = std::max(std::abs(lo.item<double>()), std::abs(hi.item<double>()));
  return amax * std::abs(scale) > limit;
}

// The paths select_kernels takes: the forward packs bf16 inputs as they are, the backward too
// while kBf16Backward; float16 is always widened.
simd::Isa cpu_paths::attention_fwd(Dt dt) {
  return simd::path_isa(attention_top_isa(dt == Dt::Float64, dt == Dt::BFloat16));
}
simd::Isa cpu_paths::attention_bwd(Dt dt) {
  return simd::path_isa(attention_top_isa(dt == Dt::Float64, kBf16Backward && dt == Dt::BFloat16));
}

}  // namespace seqkernels

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("attention_fwd", &seqkernels::attention_fwd_cpu);
  m.impl("attention_bwd", &seqkernels::attention_bwd_cpu);
}
