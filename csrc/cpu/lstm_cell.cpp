// Fused LSTM cell on CPU tensors: seqkernels::lstm_cell_fwd / lstm_cell_bwd (schemas in
// csrc/registration.cpp, contract in docs/INTERNALS.md). The two GEMMs stay in the vendor BLAS
// (the Python layer calls torch.mm); this file is the pointwise rest, one pass over memory:
// bias add, the four gate nonlinearities, the cell update and the output, saving the activated
// gates as the backward's workspace; and the backward pointwise in one pass too.
//
// float16 / bfloat16 are loaded to float32, computed in float32 and rounded once on store;
// float64 is computed in float64.
//
// SIMD: on x86 with GCC the kernels are also compiled for AVX2+FMA with at::vec (float32 exp and
// tanh from cpu/simd.h, float64 Sleef from libtorch) and for AVX-512 with 16-lane zmm intrinsics
// (float32/float16/bfloat16; float64 stays on AVX2), each inside a `#pragma GCC target` region, the
// highest the call may use chosen per call by cpu/simd.h's has() (SEQKERNELS_CPU_ISA=avx2 caps it
// at AVX2; =portable forces the one-element baseline path, as it forces the portable path of
// attention and the KV cache). Elsewhere at::vec is used at the build's baseline ISA (NEON on
// aarch64).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Headers that ATen/cpu/vec/vec.h pulls in besides its own: included here, before any target
// pragma, so their inline functions are compiled for the baseline ISA only. (The vec headers
// proper live in the inline namespace at::vec::CPU_CAPABILITY, so their AVX2 copies below do
// not collide with baseline copies in other translation units.)
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/jiterator_macros.h>
#include <ATen/native/Math.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <cfloat>

#include "../common/macros.h"
#include "common/host_checks.h"
#include "cpu/paths.h"
#include "cpu/simd.h"

#if defined(__GNUC__) && !defined(__clang__) && SK_SIMD_X86
#define SK_LSTM_X86_DISPATCH 1
#else
#define SK_LSTM_X86_DISPATCH 0
#endif

namespace seqkernels {
namespace {

// Row strides in elements; the last dim of every tensor is contiguous (checked by the caller).
struct FwdArgs {
  const void* input_gates;
  int64_t input_gates_rs;
  const void* hidden_gates;
  int64_t hidden_gates_rs;
  const void* cx;
  int64_t cx_rs;
  const void* bias_ih;  // nullptr when absent
  const void* bias_hh;
  void* hy;  // (B, H) contiguous
  void* cy;
  void* workspace;  // (B, 4H) contiguous
  int64_t H;
};

struct BwdArgs {
  const void* grad_hy;  // nullptr when absent
  int64_t grad_hy_rs;
  const void* grad_cy;
  int64_t grad_cy_rs;
  const void* cx;
  int64_t cx_rs;
  const void* cy;
  int64_t cy_rs;
  const void* workspace;
  int64_t workspace_rs;
  void* grad_gates;  // (B, 4H) contiguous
  void* grad_cx;     // (B, H) contiguous
  int64_t H;
};

// One time step of lstm_layer_fwd: rows of B; every tensor contiguous (the wrapper makes them so).
struct SeqStepArgs {
  const void* input_gates;   // (B, 4H): this step's input projection
  const void* hidden_gates;  // (B, 4 nu): h_prev @ W_hh^T for units [u0, u0 + nu), gate-major
  const void* bias;          // (4H) or nullptr
  void* c;                   // (B, H) cell state, updated in place
  void* h_out;               // (B, H) this step's output
  int64_t H, nu, u0;
};

// The fused sequence kernel (float32): the whole layer-direction, see lstm_layer_fwd_cpu.
struct SeqFusedArgs {
  const float* input_gates;  // (T, B, 4H), or nullptr when x is given
  const float* x;            // (T, B, I): the layer's input, projected by the kernel; or nullptr
  const float* h0;           // (B, H)
  const float* weight_ih;    // (4H, I) with x
  const float* weight_hh;    // (4H, H)
  const float* bias;         // (4H) or nullptr
  float* packed;             // ceil(H / W) blocks of (H, 4, W): see seq_fused_pack
  float* c;                  // (B, H) cell state, updated in place
  float* out;                // (T, B, H)
  float* ws;                 // training: (T, B, 4H) activated gates, else nullptr
  float* cs;                 // training: (T, B, H) the cell state after each step, else nullptr
  int64_t T, B, H;
  int64_t I;  // input features with x, else 0
  bool reverse;
};

// The fused sequence backward (float32): see lstm_layer_bwd_cpu.
struct SeqBwdArgs {
  const float* grad_out;   // (T, B, H) or nullptr
  const float* ws;         // (T, B, 4H) the forward's activated gates
  const float* cs;         // (T, B, H) the forward's cell states
  const float* c0;         // (B, H)
  const float* weight_hh;  // (4H, H)
  float* packed;           // ceil(H / 4W) super-blocks of (4H, 4W): see seq_bwd_pack
  float* grad_gates;       // (T, B, 4H) out
  float* dh;               // (B, H) carried: grad_hn, then the recurrent GEMM's result; grad_h0 at the end
  float* dc;               // (B, H) carried: grad_cn, then each step's grad_cx; grad_c0 at the end
  int64_t T, B, H;
  bool reverse;
};

template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// How the sequence kernels' GEMMs (the float32 step's seq_chunk, the bf16 dot engine) tile n rows:
// `full` tiles of R rows, then `four` rows (0 or 4), then `last` (< R). With R = 6 a rest of 1 or 2
// rows after a full tile runs as 4 + 3 or 4 + 4: a tile of 1 or 2 rows has 4 or 8 independent
// sums, too few to cover the multiply-add's latency at two a cycle (measured on a Zen 5 EPYC,
// bench/NOTES.md 24).
struct RowTiles {
  int64_t full, four, last;
};
constexpr RowTiles row_tiles(int64_t n, int64_t R) {
  const int64_t full = n / R, rest = n % R;
  if (R == 6 && full > 0 && rest > 0 && rest < 3) return {full - 1, 4, rest + R - 4};
  return {full, 0, rest};
}

using FwdRangeFn = void (*)(const FwdArgs&, int64_t, int64_t, int64_t);
using BwdRangeFn = void (*)(const BwdArgs&, int64_t, int64_t, int64_t);
using SeqRangeFn = void (*)(const SeqStepArgs&, int64_t, int64_t, int64_t);
using SeqFusedFn = void (*)(const SeqFusedArgs&, int64_t, int64_t, int64_t);
using SeqPackFn = void (*)(const SeqFusedArgs&, int64_t, int64_t);
using SeqBwdFn = void (*)(const SeqBwdArgs&, int64_t, int64_t, int64_t);
using SeqBwdPackFn = void (*)(const SeqBwdArgs&, int64_t, int64_t);

// ---------------------------------------------------------------------------------------------
// Baseline ISA: one element at a time (the x86 fallback for CPUs without AVX2).
namespace scalar_isa {

template <typename Storage>
struct Lanes {
  using S = Storage;
  using V = compute_t<S>;
  static constexpr int64_t W = 1;
  static V load_n(const S* p, int64_t) { return static_cast<V>(*p); }
  static void store_n(S* p, V v, int64_t) { *p = static_cast<S>(v); }
  static V sigmoid(V x) { return V(1) / (V(1) + std::exp(-x)); }
  static V tanh(V x) { return std::tanh(x); }
  static constexpr int kSeqRows = 1;
  static V loadu(const V* p) { return *p; }
  static void storeu(V* p, V v) { *p = v; }
  static V bcast(V x) { return x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static constexpr bool kTransposeRows = false;  // pack_gate_rows' loops
};

#include "lstm_cell_rows.h"

}  // namespace scalar_isa
}  // namespace
}  // namespace seqkernels

// ---------------------------------------------------------------------------------------------
// at::vec lanes: AVX2+FMA on x86/GCC (runtime-selected), the baseline ISA elsewhere.
#if SK_LSTM_X86_DISPATCH
#pragma GCC push_options
SK_AVX2_TARGET_PRAGMA
// g++ does not update the ISA macros for a target pragma (C++ is tokenized up front); the vec
// and Sleef headers test them, so they are set by hand for this region only.
#if !defined(__AVX2__)
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define SK_LSTM_UNDEF_AVX_MACROS 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// The vec headers' lambdas get static invokers without the target attribute, which g++ flags as
// an ABI change; nothing here converts those lambdas to function pointers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace seqkernels {
namespace {
namespace vec_isa {

template <typename Storage>
struct Lanes {
  using S = Storage;
  using A = compute_t<S>;
  using V = at::vec::Vectorized<A>;
  static constexpr int64_t W = V::size();

  static V load_n(const S* p, int64_t n) {
    if (n == W) {
      if constexpr (std::is_same_v<S, A>) {
        return V::loadu(p);
      } else {
        V out;
        at::vec::load_to_float<S>(p, out);
        return out;
      }
    }
    // Tail of a row: never read past the row's end.
    alignas(64) A tmp[W] = {};
    for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<A>(p[k]);
    return V::loadu(tmp);
  }

  static void store_n(S* p, V v, int64_t n) {
    if constexpr (std::is_same_v<S, A>) {
      v.store(p, static_cast<int>(n));
    } else {
#if SK_LSTM_X86_DISPATCH
      // The raw converters rather than convert_from_float: Vectorized<Half/BFloat16>'s inherited
      // constructor is generated outside this target region and could not be inlined here.
      const __m128i r =
          std::is_same_v<S, c10::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v)) : at::vec::cvtfp32_fp16(__m256(v));
      if (n == W) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
      } else {
        alignas(16) S tmp[W];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp), r);
        std::memcpy(p, tmp, n * sizeof(S));
      }
#else
      at::vec::convert_from_float<S>(v, v).store(p, static_cast<int>(n));
#endif
    }
  }

#if SK_LSTM_X86_DISPATCH
  // float32 lanes use cpu/simd.h's inlined exp/tanh (about twice Sleef's throughput, same few-ulp
  // accuracy); float64 keeps Sleef.
  static V sigmoid(V x) {
    if constexpr (std::is_same_v<A, float>) {
      return V(simd::sigmoid_ps(__m256(x)));
    } else {
      return V(1) / (V(1) + x.neg().exp());
    }
  }
  static V tanh(V x) {
    if constexpr (std::is_same_v<A, float>) {
      return V(simd::tanh_ps(__m256(x)));
    } else {
      return x.tanh();
    }
  }
#else
  static V sigmoid(V x) { return V(1) / (V(1) + x.neg().exp()); }
  static V tanh(V x) { return x.tanh(); }
#endif
  // The fused sequence kernel's GEMM: rows per tile (4 gates x 2 rows = 8 of the 16 ymm registers
  // as accumulators, 4 for the weights).
  static constexpr int kSeqRows = 2;
  static V loadu(const A* p) { return V::loadu(p); }
  static void storeu(A* p, V v) { v.store(p); }
  static V bcast(A x) { return V(x); }
  static V fma(V a, V b, V c) { return at::vec::fmadd(a, b, c); }
  static constexpr bool kTransposeRows = false;  // pack_gate_rows' loops
};

#include "lstm_cell_rows.h"

}  // namespace vec_isa
}  // namespace
}  // namespace seqkernels

#if SK_LSTM_X86_DISPATCH
#pragma GCC diagnostic pop
#pragma GCC pop_options
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#if defined(SK_LSTM_UNDEF_AVX_MACROS)
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#endif
#endif

// ---------------------------------------------------------------------------------------------
// AVX-512 lanes (x86/GCC, runtime-selected): 16 float32 lanes on raw zmm intrinsics, for float32,
// float16 and bfloat16 storage (float64 keeps the AVX2 at::vec lanes: the precision path, Sleef).
// at::vec is not used here: its headers are already expanded for AVX2 above and cannot be
// included a second time for another ISA. The exp/tanh/sigmoid are cpu/simd.h's 16-lane twins of
// the AVX2 ones, the same algorithm lane for lane; tails use masked loads and stores.
#if SK_LSTM_X86_DISPATCH
#pragma GCC push_options
SK_AVX512_TARGET_PRAGMA

namespace seqkernels {
namespace {
namespace avx512_isa {

// The value type the gate math (common/lstm_gates.h) is written against: + - * and a broadcast
// constructor (`V one(1)`).
struct Z {
  __m512 v;
  Z() = default;
  Z(float x) : v(_mm512_set1_ps(x)) {}  // NOLINT: implicit, as Vectorized's scalar constructor
  Z(__m512 x) : v(x) {}                 // NOLINT
};
inline Z operator+(Z a, Z b) { return _mm512_add_ps(a.v, b.v); }
inline Z operator-(Z a, Z b) { return _mm512_sub_ps(a.v, b.v); }
inline Z operator*(Z a, Z b) { return _mm512_mul_ps(a.v, b.v); }

using simd::mask16;  // the first n lanes

template <typename Storage>
struct Lanes {
  static_assert(!std::is_same_v<Storage, double>, "float64 takes the AVX2 at::vec lanes");
  using S = Storage;
  using V = Z;
  static constexpr int64_t W = 16;

  // Elements [0, n) of p; the lanes past n are 0 and their memory is not read.
  static V load_n(const S* p, int64_t n) {
    const __mmask16 k = mask16(n);
    if constexpr (std::is_same_v<S, float>) {
      return _mm512_maskz_loadu_ps(k, p);
    } else if constexpr (std::is_same_v<S, c10::Half>) {
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
    } else {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
  }

  // Rounded to nearest even as at::vec's AVX2 converters do (bfloat16: NaN becomes 0xffff).
  static void store_n(S* p, V v, int64_t n) {
    const __mmask16 k = mask16(n);
    if constexpr (std::is_same_v<S, float>) {
      _mm512_mask_storeu_ps(p, k, v.v);
    } else if constexpr (std::is_same_v<S, c10::Half>) {
      _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      const __m512i x = _mm512_castps_si512(v.v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
      __m512i t = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
      t = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q), t, _mm512_set1_epi32(0xffff));
      _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(t));
    }
  }

  static V sigmoid(V x) { return simd::sigmoid_ps(x.v); }
  static V tanh(V x) { return simd::tanh_ps(x.v); }

  // The fused sequence kernel's GEMM: 4 gates x 6 rows = 24 of the 32 zmm registers for a K
  // chunk's partial sums (the rows' totals are in memory, seq_chunk_rows), 4 for the weights,
  // the broadcasts from memory. 6 rows were a few percent faster than 4 on the AMX Xeon.
  static constexpr int kSeqRows = 6;
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v.v); }
  static V bcast(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
  // pack_gate_rows by 16 x 16 register transposes (W = 16).
  static constexpr bool kTransposeRows = true;
  static void transpose_rows(const float* src, int64_t ld, int64_t nrows, int64_t K, float* dst, int64_t dst_ld) {
    simd::transpose_rows16_ps(src, ld, nrows, K, dst, dst_ld);
  }
};

#include "lstm_cell_rows.h"

}  // namespace avx512_isa
}  // namespace
}  // namespace seqkernels

// ---------------------------------------------------------------------------------------------
// The bfloat16 sequence kernel (lstm_layer_fwd.fused on bf16 operands; with train it also keeps the
// activated gates and cell states of every step, in bf16, for the per-step backward): the input
// projection of every step and the recurrent GEMM are bf16 pair products with float32 sums, the
// cell is the AVX-512 lanes' float32 math, the cell state stays float32 for the whole sequence, and
// h is rounded to bf16 once per step (the step's output and the next step's operand, as torch's bf16
// LSTM feeds it). Two product engines share the packed weights, the buffers and the step:
//   - AMX tiles (tdpbf16ps) where the CPU and OS allow them. What it replaced: the per-step cell
//     ops, 0.25-0.43x oneDNN's own AMX bf16 LSTM at 3 of the 4 shapes of DESIGN §8's bar.
//   - vdpbf16ps on zmm registers (AVX512_BF16 without AMX: Zen 4/5, Cooper Lake). What it
//     replaced: the float32 kernels on widened operands, 0.47-0.72x oneDNN's avx512_core_bf16 LSTM
//     on a Zen 5 EPYC, whose bf16 products run at twice the float32 FMA rate on half the bytes.
//
// Tiles (simd::amx_tiles_on's configuration): C = tmm0-3, the four gates of 16 units for 16 rows;
// A = tmm4, 16 rows x 32 bf16 of x or h; B = tmm5-7 in turn, one gate's 32 x 16 weights.
namespace seqkernels {
namespace {
namespace bf16seq {

using F = avx512_isa::Lanes<float>;
using avx512_isa::Z;

// The cell's nonlinearities here: F's sigmoid and tanh (simd::sigmoid_ps, tanh_ps, on the same
// skeleton) with e^x from the degree-4 2^f of the bf16 attention (simd::Avx512FloatBf16P: relative
// error 2.9e-6, against 1e-7) and each division a reciprocal estimate with one Newton step (about
// 2^-23): the cell's results then differ from F's by a few 1e-6 relative, three orders under the
// bf16 rounding of h, and its instructions (perf: most of a step beside the tiles) drop by a third.
struct FastMath {
  static __m512 exp(__m512 x) {
    return simd::Avx512FloatBf16P::exp2(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)));
  }
  static __m512 div(__m512 a, __m512 b) {
    const __m512 r = _mm512_rcp14_ps(b);
    return _mm512_mul_ps(a, _mm512_mul_ps(r, _mm512_fnmadd_ps(b, r, _mm512_set1_ps(2.f))));
  }
};
struct FastCell {
  static Z sigmoid(Z x) { return simd::sigmoid_ps_by<FastMath>(x.v); }
  static Z tanh(Z x) { return simd::tanh_ps_by<FastMath>(x.v); }
};

// bf16 elements of one packed weight tile: 16 rows of 16 pairs (the B operand of tdpbf16ps).
constexpr int64_t kTile = 512;

// The first n of 32 16-bit lanes (n >= 32: all).
inline __mmask32 mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : (__mmask32(1) << n) - 1; }

// Packs the unit blocks [blk0, blk1) of a bf16 weight of row length K into tiles: block j, K chunk c,
// "gate" g is one contiguous tile (at ((j nch + c) 4 + g) kTile), row kk holding the pairs
// W[row][32 c + 2 kk, 32 c + 2 kk + 1] of 16 output units, zeros past H and past K. The 4 x 16
// output columns of block j are units u = j jstride + g gunit + n (n < 16, valid while u < H), each
// from weight row g gstride + u: the forward's (4H, K) W_ih / W_hh as 4 gates of the same 16 units
// (jstride 16, gunit 0, gstride H), the backward's (H, 4H) W_hh^T as 64 consecutive units (jstride
// 64, gunit 16, gstride 0). Loaded as 16 rows of 16 32-bit words and transposed in registers: a
// word is one pair, so the transpose is the VNNI layout.
SK_AVX512_FN void pack_blocks(const uint16_t* w, int64_t H, int64_t K, int64_t blk0, int64_t blk1, uint16_t* dst,
                              int64_t jstride, int64_t gunit, int64_t gstride) {
  const int64_t nch = (K + 31) / 32;
  for (int64_t j = blk0; j < blk1; ++j) {
    for (int64_t c = 0; c < nch; ++c) {
      const __mmask32 km = mask32(K - 32 * c);
      for (int g = 0; g < 4; ++g) {
        const int64_t u0 = j * jstride + g * gunit, nrows = H - u0 < 16 ? H - u0 : 16;
        __m512 r[16];
        for (int64_t n = 0; n < 16; ++n)
          r[n] = n < nrows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(km, w + (g * gstride + u0 + n) * K + 32 * c))
                           : _mm512_setzero_ps();
        simd::transpose16_ps(r);
        uint16_t* d = dst + ((j * nch + c) * 4 + g) * kTile;
        for (int kk = 0; kk < 16; ++kk) _mm512_storeu_ps(reinterpret_cast<float*>(d + 32 * kk), r[kk]);
      }
    }
  }
}

// C (16 rows x 64 floats, row stride ldc) = A (16 rows of 32 nch bf16, row stride lda) times one
// packed block's 4 gates (nch chunks of 4 tiles).
SK_AMX_FN void rows16(const uint16_t* A, int64_t lda, const uint16_t* wp, int64_t nch, float* C, int64_t ldc) {
  simd::amx_operands_ready();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < nch; ++c) {
    const uint16_t* b = wp + c * 4 * kTile;
    _tile_loadd(4, A + 32 * c, lda * 2);
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + kTile, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, b + 2 * kTile, 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, b + 3 * kTile, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, C, ldc * 4);
  _tile_stored(1, C + 16, ldc * 4);
  _tile_stored(2, C + 32, ldc * 4);
  _tile_stored(3, C + 48, ldc * 4);
}

// The same for 32 rows (C rows 16 ldc on are A's rows 16 lda on): two row groups share each
// weight tile, in two passes of two gates each (C = tmm0-3: rows 0-15 and 16-31 of two gates; A =
// tmm4-5; B = tmm6-7). The weight tiles come from L2, and with one row group per load they were
// the kernel's stall (perf at T128 B64 H256: a third of the step on the load of each chunk's first
// weight tile); here each is loaded once per 32 rows.
SK_AMX_FN void rows32(const uint16_t* A, int64_t lda, const uint16_t* wp, int64_t nch, float* C, int64_t ldc) {
  simd::amx_operands_ready();
  for (int64_t half = 0; half < 2; ++half) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < nch; ++c) {
      const uint16_t* b = wp + (c * 4 + 2 * half) * kTile;
      _tile_loadd(4, A + 32 * c, lda * 2);
      _tile_loadd(6, b, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, b + kTile, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, A + 16 * lda + 32 * c, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* d = C + 32 * half;
    _tile_stored(0, d, ldc * 4);
    _tile_stored(1, d + 16, ldc * 4);
    _tile_stored(2, d + 16 * ldc, ldc * 4);
    _tile_stored(3, d + 16 * ldc + 16, ldc * 4);
  }
}

// The engines: P::rows(A, lda, wp, nch, C, ldc, nrows) sets C (nrows <= P::kMaxRows rows of 64
// floats, row stride ldc) to A (rows of 32 nch bf16, row stride lda) times one packed block's 4
// gates; P::kRowGroup: the rows A must hold past nrows (zero padding) are up to its next multiple.
//
// AMX: rows32 or rows16, whole 16-row groups.
struct Tiles {
  static constexpr int64_t kRowGroup = 16;
  static constexpr int64_t kMaxRows = 32;
  SK_AMX_FN static void rows(const uint16_t* A, int64_t lda, const uint16_t* wp, int64_t nch, float* C, int64_t ldc,
                             int64_t nrows) {
    if (nrows > 16) {
      rows32(A, lda, wp, nch, C, ldc);
    } else {
      rows16(A, lda, wp, nch, C, ldc);
    }
  }
};

// vdpbf16ps: the packed tiles read one row at a time, a row being one k pair of the 16 units of a
// gate, the B operand of a vdpbf16ps as it is (the AMX layout is the VNNI pairing); A's pair
// (A[r][2k], A[r][2k + 1]) broadcast against it. R rows x 4 gates of float32 accumulators (24 of
// the 32 zmm at R = 6, 4 for the gates' weights). The K loop runs in passes of kPass chunks (64
// pairs, the block's 16 KB of weights for them), each pass for every row tile before the next:
// the pass stays in L1 across the row tiles, where a block's whole K (64 KB at H = 512) would be
// streamed from L2 once per 6 rows; a pass's sums are added to C in memory (the float32 kernel's
// seq_chunk order). Passes of one chunk spent more on those adds than they saved; measured on a
// Zen 5 EPYC (bench/NOTES.md 24). No row padding is read, and float32 sums over K <= a few
// thousand terms stay three orders of magnitude under the bf16 rounding of h.
template <int R>
SK_AVX512BF16_FN void dp_chunk(const uint16_t* A, int64_t lda, const uint16_t* b, int64_t nc, float* C, int64_t ldc,
                               bool first) {
  __m512 acc[4][R];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[g][r] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < nc; ++c, b += 4 * kTile, A += 32) {
    for (int kk = 0; kk < 16; ++kk) {
      __m512bh w[4];
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) w[g] = (__m512bh)_mm512_loadu_si512(b + g * kTile + 32 * kk);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512bh x = simd::bf16_pair_bcast(A + r * lda + 2 * kk);
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) acc[g][r] = _mm512_dpbf16_ps(acc[g][r], x, w[g]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      float* cp = C + r * ldc + 16 * g;
      _mm512_storeu_ps(cp, first ? acc[g][r] : _mm512_add_ps(_mm512_loadu_ps(cp), acc[g][r]));
    }
  }
}

struct Dots {
  static constexpr int64_t kRowGroup = 1;
  static constexpr int64_t kMaxRows = 96;  // B = 64 in 6-row tiles ending in a 4, not 2 x (30 + 2)
  static constexpr int kRows = 6;
  static constexpr int64_t kPass = 4;  // chunks per pass
  // One pass over n rows, 0 <= n <= R, by the dp_chunk instance for n.
  template <int R = kRows>
  SK_AVX512BF16_FN static void tile(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t nc, float* C,
                                    int64_t ldc, bool first, int64_t n) {
    if constexpr (R > 0) {
      if (n == R) return dp_chunk<R>(a, lda, b, nc, C, ldc, first);
      tile<R - 1>(a, lda, b, nc, C, ldc, first, n);
    }
  }
  SK_AVX512BF16_FN static void rows(const uint16_t* A, int64_t lda, const uint16_t* wp, int64_t nch, float* C,
                                    int64_t ldc, int64_t nrows) {
    const RowTiles rt = row_tiles(nrows, kRows);
    for (int64_t c = 0; c < nch; c += kPass) {
      const uint16_t* a = A + 32 * c;
      const uint16_t* b = wp + c * 4 * kTile;
      const int64_t nc = nch - c < kPass ? nch - c : kPass;
      const bool first = c == 0;
      int64_t r = 0;
      for (int64_t f = 0; f < rt.full; ++f, r += kRows)
        dp_chunk<kRows>(a + r * lda, lda, b, nc, C + r * ldc, ldc, first);
      if (rt.four != 0) {
        dp_chunk<4>(a + r * lda, lda, b, nc, C + r * ldc, ldc, first);
        r += 4;
      }
      tile(a + r * lda, lda, b, nc, C + r * ldc, ldc, first, rt.last);
    }
  }
};

// The tile configuration of the calling thread, loaded and released (run_sequence's enter / leave,
// the AMX engine only).
SK_AMX_ENTRY void tiles_on() { simd::amx_tiles_on(); }
SK_AMX_ENTRY void tiles_off() { simd::amx_tiles_off(); }

struct SeqArgs {
  const uint16_t* x;    // (rows >= T B, Ip) bf16, zero past I: the input, the tiles' A operand
  uint16_t* packed_ih;  // W_ih, nblk blocks of Ip / 32 chunks (packed by the team)
  uint16_t* packed_hh;  // W_hh, nblk blocks of Hp / 32 chunks
  const float* bias;    // (4H) float32 (the bf16 bias widened once) or null
  float* ig;            // (Tc B rounded up to 16 rows, nblk 64): one chunk's projection
  float* c;             // (B, H): the running cell state
  uint16_t* hbuf;       // 2 x (Bp, Hp) bf16, zero past B and H: h_prev of even / odd steps
  uint16_t* out;        // (T, B, H) bf16
  uint16_t* ws;         // (T, B, 4H) bf16: the activated gates of every step (training), or null
  uint16_t* cs;         // (T, B, H) bf16: the cell state after every step (training), or null
  int64_t T, B, H, I, Ip, Hp, Bp, nblk, Tc;
  bool reverse;
};

// Packs W_ih (4H, I) and W_hh (4H, H) for the unit blocks [blk0, blk1) (either engine).
SK_AVX512_ENTRY void pack_entry(const SeqArgs& a, const uint16_t* wi, const uint16_t* wh, int64_t blk0, int64_t blk1) {
  pack_blocks(wi, a.H, a.I, blk0, blk1, a.packed_ih, 16, 0, a.H);
  pack_blocks(wh, a.H, a.H, blk0, blk1, a.packed_hh, 16, 0, a.H);
}

// The input projection x_t W_ih^T is computed Tc steps at a time (Tc B rows: the tiles' 16 rows
// full even at B = 1 or 8, where a step alone would leave them mostly empty; for vdpbf16ps, the
// weights reused over many more rows than a step's, from L1) into a buffer the
// steps reuse: one projection of all T steps wrote a fresh (T B, 4H) float32 array per call,
// and its page faults and stores were half of a T128 B64 H256 layer. Chunk k holds the times
// [k Tc, (k + 1) Tc); step s needs a new one when its time is the first of its chunk in the
// run's direction.
inline bool chunk_starts(const SeqArgs& a, int64_t s) {
  const int64_t t = a.reverse ? a.T - 1 - s : s;
  return a.reverse ? (t == a.T - 1 || (t + 1) % a.Tc == 0) : t % a.Tc == 0;
}

// The projection of the chunk step s starts, for the unit blocks [blk0, blk1) (each thread its
// own: another thread may step them, so the caller waits for every thread's before the steps).
template <class P>
SK_AVX512BF16_FN void project_chunk(const SeqArgs& a, int64_t s, int64_t blk0, int64_t blk1) {
  constexpr int64_t G = P::kRowGroup;
  const int64_t t = a.reverse ? a.T - 1 - s : s, t0 = t / a.Tc * a.Tc;
  const int64_t rows = ((t0 + a.Tc < a.T ? a.Tc : a.T - t0) * a.B + G - 1) / G * G;
  const int64_t nch = a.Ip / 32, ld = a.nblk * 64;
  for (int64_t j = blk0; j < blk1; ++j) {
    const uint16_t* wp = a.packed_ih + j * nch * 4 * kTile;
    for (int64_t r0 = 0; r0 < rows; r0 += P::kMaxRows)
      P::rows(a.x + (t0 * a.B + r0) * a.Ip, a.Ip, wp, nch, a.ig + r0 * ld + 64 * j, ld,
              rows - r0 < P::kMaxRows ? rows - r0 : P::kMaxRows);
  }
}

// Step s for the unit blocks [blk0, blk1): per block and group of P::kMaxRows batch rows (AMX: 32,
// rows32; 16 for a last group of at most 16), the recurrent product h_prev W_hh^T, then the epilogue
// per row: + the projection + bias, the cell, c
// updated, h stored to the output and (bf16, the tiles' next A operand) to the other hbuf half.
// The caller's barrier between steps orders one step's reads of a half before the next step's
// writes to it.
template <class P>
SK_AVX512BF16_FN void seq_step(const SeqArgs& a, int64_t s, int64_t blk0, int64_t blk1) {
  const int64_t T = a.T, B = a.B, H = a.H, Hp = a.Hp, nch = Hp / 32, ld = a.nblk * 64;
  const int64_t t = a.reverse ? T - 1 - s : s, tc = t % a.Tc;
  const uint16_t* hp = a.hbuf + (s & 1) * a.Bp * Hp;
  uint16_t* hn = a.hbuf + ((s + 1) & 1) * a.Bp * Hp;
  alignas(64) float acc[P::kMaxRows * 64];
  for (int64_t j = blk0; j < blk1; ++j) {
    const int64_t u0 = 16 * j, n = H - u0 < 16 ? H - u0 : 16;
    const uint16_t* wp = a.packed_hh + j * nch * 4 * kTile;
    for (int64_t b0 = 0; b0 < B; b0 += P::kMaxRows) {
      const int64_t nr = B - b0 < P::kMaxRows ? B - b0 : P::kMaxRows;
      P::rows(hp + b0 * Hp, Hp, wp, nch, acc, 64, nr);  // rows past B: hbuf's zero padding
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = b0 + r;
        const float* igr = a.ig + (tc * B + b) * ld + 64 * j;
        Z pre[4];
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          Z x = F::loadu(acc + 64 * r + 16 * g) + F::loadu(igr + 16 * g);
          if (a.bias != nullptr) x = x + F::load_n(a.bias + g * H + u0, n);
          pre[g] = x;
        }
        float* cr = a.c + b * H + u0;
        Z gi, gf, gg, go, cy, hy;
        avx512_isa::cell_forward<FastCell>(pre[0], pre[1], pre[2], pre[3], F::load_n(cr, n), gi, gf, gg, go, cy, hy);
        F::store_n(cr, cy, n);
        // Rounded to nearest even once (vcvtneps2bf16; a NaN stays NaN), stored twice.
        const __mmask16 m = simd::mask16(n);
        const __m256i h16 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(hy.v));
        _mm256_mask_storeu_epi16(a.out + (t * B + b) * H + u0, m, h16);
        _mm256_mask_storeu_epi16(hn + b * Hp + u0, m, h16);
        if (a.ws != nullptr) {  // training: what the per-step cell backward reads, in bf16 as it takes it
          const auto bf = [](Z v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v.v)); };
          uint16_t* w = a.ws + (t * B + b) * 4 * H + u0;
          _mm256_mask_storeu_epi16(w, m, bf(gi));
          _mm256_mask_storeu_epi16(w + H, m, bf(gf));
          _mm256_mask_storeu_epi16(w + 2 * H, m, bf(gg));
          _mm256_mask_storeu_epi16(w + 3 * H, m, bf(go));
          _mm256_mask_storeu_epi16(a.cs + (t * B + b) * H + u0, m, bf(cy));
        }
      }
    }
  }
}

// The recurrence backward on the bf16 kernel's saved states (lstm_layer_fwd.backward on bf16): the
// float32 one's schedule (one team; per step the cell backward of a thread's units, a barrier,
// then dh of the same units = grad_gates_t W_hh), with W_hh^T packed in blocks of 64 units (4
// tiles of 16) and the product by the forward's engines. dh and dc are carried in float32 from
// step to step; grad_gates are rounded to bf16 once, as stored (the weight gradients' GEMM operand)
// and as the product's A operand, in a zero-padded double buffer (gbuf: the next step's cell
// backward writes one half while a slower thread may still read the other).
struct Bf16BwdArgs {
  const uint16_t* grad_out;  // (T, B, H) bf16, or null
  const uint16_t* ws;        // (T, B, 4H) bf16: the activated gates of every step
  const uint16_t* cs;        // (T, B, H) bf16: the cell state after every step
  const uint16_t* c0;        // (B, H) bf16
  uint16_t* packed;          // W_hh^T: ceil(H / 64) blocks of Kp / 32 chunks (pack_blocks)
  uint16_t* gbuf;            // 2 x (Bp, Kp) bf16, zero past B rows and 4H columns
  uint16_t* grad_gates;      // (T, B, 4H) bf16 out
  float* dh;                 // (B, H): grad_hn, then each step's product; grad_h0 at the end
  float* dc;                 // (B, H): grad_cn, then each step's grad_cx; grad_c0 at the end
  int64_t T, B, H, Kp, Bp;
  bool reverse;
};

SK_AVX512_ENTRY void bwd_pack(const Bf16BwdArgs& a, const uint16_t* wt, int64_t sb0, int64_t sb1) {
  pack_blocks(wt, a.H, 4 * a.H, sb0, sb1, a.packed, 64, 16, 0);
}

// Step s (the forward's step s, time t) for units [u0, u1): dh = the carried dh + grad_out[t], dc
// the carried dc, the cell backward from the saved gates and cell states (bf16, widened).
SK_AVX512BF16_ENTRY void bwd_point(const Bf16BwdArgs& a, int64_t s, int64_t u0, int64_t u1) {
  using S = avx512_isa::Lanes<c10::BFloat16>;
  const int64_t H = a.H, B = a.B, T = a.T, BH = B * H;
  const int64_t t = a.reverse ? T - 1 - s : s;
  const auto bf = [](const uint16_t* p) { return reinterpret_cast<const c10::BFloat16*>(p); };
  const c10::BFloat16* c_prev = bf(s == 0 ? a.c0 : a.cs + (a.reverse ? t + 1 : t - 1) * BH);
  const c10::BFloat16* cy = bf(a.cs + t * BH);
  const c10::BFloat16* ws = bf(a.ws + t * B * 4 * H);
  const c10::BFloat16* go = a.grad_out != nullptr ? bf(a.grad_out + t * BH) : nullptr;
  uint16_t* gg = a.grad_gates + t * B * 4 * H;
  uint16_t* gb = a.gbuf + (s & 1) * a.Bp * a.Kp;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = u0; j < u1; j += 16) {
      const int64_t n = u1 - j < 16 ? u1 - j : 16, o = b * H + j;
      const __mmask16 m = simd::mask16(n);
      Z dh = F::load_n(a.dh + o, n);
      if (go != nullptr) dh = dh + S::load_n(go + o, n);
      const c10::BFloat16* w = ws + b * 4 * H + j;
      Z d[4], dcx;
      avx512_isa::cell_backward<F>(dh, F::load_n(a.dc + o, n), S::load_n(c_prev + o, n), S::load_n(cy + o, n),
                                   S::load_n(w, n), S::load_n(w + H, n), S::load_n(w + 2 * H, n),
                                   S::load_n(w + 3 * H, n), d[0], d[1], d[2], d[3], dcx);
      F::store_n(a.dc + o, dcx, n);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m256i v = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(d[g].v));
        _mm256_mask_storeu_epi16(gg + b * 4 * H + g * H + j, m, v);
        _mm256_mask_storeu_epi16(gb + b * a.Kp + g * H + j, m, v);
      }
    }
  }
}

// dh[:, blocks [sb0, sb1)] = grad_gates_t W_hh[:, those units] by the engine P, from gbuf.
template <class P>
SK_AVX512BF16_FN void bwd_gemm(const Bf16BwdArgs& a, int64_t s, int64_t sb0, int64_t sb1) {
  const int64_t H = a.H, B = a.B, nch = a.Kp / 32;
  const uint16_t* gb = a.gbuf + (s & 1) * a.Bp * a.Kp;
  alignas(64) float acc[P::kMaxRows * 64];
  for (int64_t sb = sb0; sb < sb1; ++sb) {
    const uint16_t* wp = a.packed + sb * nch * 4 * kTile;
    const int64_t u0 = 64 * sb, n = H - u0 < 64 ? H - u0 : 64;
    for (int64_t b0 = 0; b0 < B; b0 += P::kMaxRows) {
      const int64_t nr = B - b0 < P::kMaxRows ? B - b0 : P::kMaxRows;
      P::rows(gb + b0 * a.Kp, a.Kp, wp, nch, acc, 64, nr);  // rows past B: gbuf's zero padding
      for (int64_t r = 0; r < nr; ++r) {
        float* d = a.dh + (b0 + r) * H + u0;
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) F::store_n(d + 16 * g, F::loadu(acc + 64 * r + 16 * g), n - 16 * g);
      }
    }
  }
}

// The engine-generic functions' entries, one per engine and ISA (flatten inlines the function and
// its engine's products into each): fn_amx on the tiles, fn_dp on vdpbf16ps.
#define SK_BF16SEQ_ENTRIES(fn, Args)                                                                        \
  SK_AMX_ENTRY void fn##_amx(const Args& a, int64_t s, int64_t i0, int64_t i1) { fn<Tiles>(a, s, i0, i1); } \
  SK_AVX512BF16_ENTRY void fn##_dp(const Args& a, int64_t s, int64_t i0, int64_t i1) { fn<Dots>(a, s, i0, i1); }
SK_BF16SEQ_ENTRIES(project_chunk, SeqArgs)
SK_BF16SEQ_ENTRIES(seq_step, SeqArgs)
SK_BF16SEQ_ENTRIES(bwd_gemm, Bf16BwdArgs)
#undef SK_BF16SEQ_ENTRIES

}  // namespace bf16seq
}  // namespace
}  // namespace seqkernels

#pragma GCC pop_options
#endif

namespace seqkernels {
namespace {

// Per call, like attention and the KV cache: the choice is one getenv next to a kernel launch,
// and a test can switch paths without a new process. cpu_paths::lstm (below) is the rule.
template <typename S>
simd::Isa lstm_isa() {
  return cpu_paths::lstm(cpu_paths::dt_of<S>());
}

// The at::vec lanes: AVX2 on x86 (has(Avx2): an AVX-512 machine too, for float64), the baseline
// ISA's at::vec elsewhere; false only on x86 without AVX2 or with SEQKERNELS_CPU_ISA=portable.
template <typename S>
bool use_vec_isa() {
  return !SK_LSTM_X86_DISPATCH || lstm_isa<S>() >= simd::Isa::Avx2;
}

// The AVX-512 lanes (float32 accumulation only), when the call may use them.
template <typename S>
bool use_avx512_isa() {
  return SK_LSTM_X86_DISPATCH && lstm_isa<S>() >= simd::Isa::Avx512;
}

#if SK_LSTM_X86_DISPATCH
#define SK_LSTM_AVX512_KERNEL(fn, S)                                       \
  if constexpr (!std::is_same_v<S, double>) {                              \
    if (use_avx512_isa<S>()) return &avx512_isa::fn<avx512_isa::Lanes<S>>; \
  }
#else
#define SK_LSTM_AVX512_KERNEL(fn, S)
#endif

template <typename S>
FwdRangeFn fwd_kernel() {
  SK_LSTM_AVX512_KERNEL(fwd_range, S)
  return use_vec_isa<S>() ? &vec_isa::fwd_range<vec_isa::Lanes<S>> : &scalar_isa::fwd_range<scalar_isa::Lanes<S>>;
}

template <typename S>
BwdRangeFn bwd_kernel() {
  SK_LSTM_AVX512_KERNEL(bwd_range, S)
  return use_vec_isa<S>() ? &vec_isa::bwd_range<vec_isa::Lanes<S>> : &scalar_isa::bwd_range<scalar_isa::Lanes<S>>;
}

template <typename S>
SeqRangeFn seq_kernel() {
  SK_LSTM_AVX512_KERNEL(seq_step_range, S)
  return use_vec_isa<S>() ? &vec_isa::seq_step_range<vec_isa::Lanes<S>>
                          : &scalar_isa::seq_step_range<scalar_isa::Lanes<S>>;
}

// The fused sequence kernel (float32 only): the AVX-512 or AVX2 lanes, or none (portable, non-x86).
struct SeqFusedKernel {
  SeqPackFn pack = nullptr;
  SeqFusedFn step = nullptr;
  int64_t W = 0;  // units per packed block
};

// with_scalar: the one-lane baseline code too (the training ops, which have no other path); without
// it, nullptr where the lanes are not SIMD (inference then keeps its per-step BLAS path).
SeqFusedKernel seq_fused_kernel(bool with_scalar) {
#if SK_LSTM_X86_DISPATCH
  if (use_avx512_isa<float>()) {
    using L = avx512_isa::Lanes<float>;
    return {&avx512_isa::seq_fused_pack<L>, &avx512_isa::seq_fused_step<L>, L::W};
  }
  if (use_vec_isa<float>()) {
    using L = vec_isa::Lanes<float>;
    return {&vec_isa::seq_fused_pack<L>, &vec_isa::seq_fused_step<L>, L::W};
  }
#endif
  if (!with_scalar) return {};
  using L = scalar_isa::Lanes<float>;
  return {&scalar_isa::seq_fused_pack<L>, &scalar_isa::seq_fused_step<L>, L::W};
}

struct SeqBwdKernel {
  SeqBwdPackFn pack = nullptr;
  SeqBwdFn point = nullptr;
  SeqBwdFn gemm = nullptr;
  int64_t W = 0;  // lanes; a super-block is 4 W units
};

SeqBwdKernel seq_bwd_kernel() {
#if SK_LSTM_X86_DISPATCH
  if (use_avx512_isa<float>()) {
    using L = avx512_isa::Lanes<float>;
    return {&avx512_isa::seq_bwd_pack<L>, &avx512_isa::seq_bwd_point<L>, &avx512_isa::seq_bwd_gemm<L>, L::W};
  }
  if (use_vec_isa<float>()) {
    using L = vec_isa::Lanes<float>;
    return {&vec_isa::seq_bwd_pack<L>, &vec_isa::seq_bwd_point<L>, &vec_isa::seq_bwd_gemm<L>, L::W};
  }
#endif
  using L = scalar_isa::Lanes<float>;
  return {&scalar_isa::seq_bwd_pack<L>, &scalar_isa::seq_bwd_point<L>, &scalar_isa::seq_bwd_gemm<L>, L::W};
}

// Below this many multiply-adds a step (B x H x 4H), one thread runs the whole layer: a barrier
// per step would cost more than the second thread saves.
constexpr int64_t kSeqMinFmaPerThread = 1 << 15;

// Work is split into (row, column block) units; a block is a multiple of every SIMD width, and a
// task gets enough units that a thread's start-up cost stays small next to its work.
constexpr int64_t kColBlock = 512;
constexpr int64_t kMinElemsPerTask = 4096;

template <typename Args, typename Fn>
void run_rows(const Args& args, int64_t B, int64_t H, Fn fn) {
  const int64_t nblk = (H + kColBlock - 1) / kColBlock;
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / std::min(H, kColBlock));
  at::parallel_for(0, B * nblk, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / nblk;
      const int64_t j0 = (u % nblk) * kColBlock;
      fn(args, b, j0, std::min(H, j0 + kColBlock));
    }
  });
}

// A 2-D tensor whose last dim is contiguous (a row stride of anything is fine): the GEMM outputs
// and the time-step slices of a projected sequence already are, so nothing is copied for them.
at::Tensor rows_of(const at::Tensor& t) { return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous(); }

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

// Argument checks: common/host_checks.h, shared with the CUDA launchers.
using host::check_2d;

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cpu(const at::Tensor& input_gates,
                                                                 const at::Tensor& hidden_gates, const at::Tensor& cx,
                                                                 const c10::optional<at::Tensor>& bias_ih,
                                                                 const c10::optional<at::Tensor>& bias_hh) {
  const int64_t H = host::check_lstm_fwd(input_gates, hidden_gates, cx, bias_ih, bias_hh, host::kCpu);
  const int64_t B = input_gates.size(0), G = 4 * H;

  auto opts = input_gates.options();
  at::Tensor hy = at::empty({B, H}, opts), cy = at::empty({B, H}, opts), ws = at::empty({B, G}, opts);
  if (B == 0 || H == 0) return {hy, cy, ws};
  const at::Tensor ig = rows_of(input_gates), hg = rows_of(hidden_gates), c = rows_of(cx);
  const at::Tensor bi = bias_ih.has_value() ? bias_ih->contiguous() : at::Tensor();
  const at::Tensor bh = bias_hh.has_value() ? bias_hh->contiguous() : at::Tensor();
  FwdArgs a{ig.data_ptr(),
            row_stride(ig),
            hg.data_ptr(),
            row_stride(hg),
            c.data_ptr(),
            row_stride(c),
            bi.defined() ? bi.data_ptr() : nullptr,
            bh.defined() ? bh.data_ptr() : nullptr,
            hy.data_ptr(),
            cy.data_ptr(),
            ws.data_ptr(),
            H};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_gates.scalar_type(), "lstm_cell_fwd_cpu",
                                  [&] { run_rows(a, B, H, fwd_kernel<scalar_t>()); });
  return {hy, cy, ws};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_bwd_cpu(const c10::optional<at::Tensor>& grad_hy,
                                                     const c10::optional<at::Tensor>& grad_cy, const at::Tensor& cx,
                                                     const at::Tensor& cy, const at::Tensor& workspace) {
  const int64_t H = host::check_lstm_bwd(grad_hy, grad_cy, cx, cy, workspace, host::kCpu);
  const int64_t B = workspace.size(0), G = 4 * H;

  auto opts = workspace.options();
  at::Tensor grad_gates = at::empty({B, G}, opts), grad_cx = at::empty({B, H}, opts);
  if (B == 0 || H == 0) return {grad_gates, grad_cx};
  const at::Tensor gh = grad_hy.has_value() ? rows_of(*grad_hy) : at::Tensor();
  const at::Tensor gc = grad_cy.has_value() ? rows_of(*grad_cy) : at::Tensor();
  const at::Tensor c = rows_of(cx), cyr = rows_of(cy), ws = rows_of(workspace);
  BwdArgs a{gh.defined() ? gh.data_ptr() : nullptr,
            gh.defined() ? row_stride(gh) : 0,
            gc.defined() ? gc.data_ptr() : nullptr,
            gc.defined() ? row_stride(gc) : 0,
            c.data_ptr(),
            row_stride(c),
            cyr.data_ptr(),
            row_stride(cyr),
            ws.data_ptr(),
            row_stride(ws),
            grad_gates.data_ptr(),
            grad_cx.data_ptr(),
            H};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, workspace.scalar_type(), "lstm_cell_bwd_cpu",
                                  [&] { run_rows(a, B, H, bwd_kernel<scalar_t>()); });
  return {grad_gates, grad_cx};
}

// A whole layer (one direction) of an LSTM over T steps of a batch of B, inference only: what
// seqkernels.nn.LSTM runs on CPU tensors when no gradient is needed. input_gates (T, B, 4H) is the
// input projection of every step (x @ W_ih^T, biases not included), weight_hh (4H, H).
//
// Why not the per-step ops from Python: on a few cores the per-step cost is what decides, and there
// the recurrent GEMM split by the BLAS into threads, then the cell split again, forks and joins twice
// a step and streams the whole W_hh (1 MB at H = 256) through each core's cache every step. Here the
// hidden units are split once into one block per thread; each thread keeps its own rows of W_hh
// (all four gates of its units, packed contiguous: 512 KB at H = 256 over two threads), runs its
// recurrent GEMM single-threaded on it and then the cell of its units, so a step is one fork/join and
// every thread reads the same slice step after step. The cell state never leaves its thread's columns.
// lstm_layer_fwd's argument checks.
void check_layer_args(const char* op, const at::Tensor& input_gates, const at::Tensor& h0, const at::Tensor& c0,
                      const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input_gates.dim() == 3 && input_gates.size(2) % 4 == 0, "seqkernels::", op,
              ": input_gates must have shape (T, B, 4*H), got ", input_gates.sizes());
  TORCH_CHECK(input_gates.scalar_type() == at::kFloat || input_gates.scalar_type() == at::kDouble, "seqkernels::", op,
              ": input_gates must be float32 or float64, got ", input_gates.scalar_type());
  TORCH_CHECK(input_gates.device().is_cpu(), "seqkernels::", op, " (CPU kernel): input_gates is on ",
              input_gates.device());
  const int64_t B = input_gates.size(1), G = input_gates.size(2), H = G / 4;
  TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) == G && weight_hh.size(1) == H, "seqkernels::", op,
              ": weight_hh must have shape (", G, ", ", H, "), got ", weight_hh.sizes());
  TORCH_CHECK(weight_hh.scalar_type() == input_gates.scalar_type() && weight_hh.device() == input_gates.device(),
              "seqkernels::", op, ": weight_hh must have input_gates' dtype and device");
  check_2d("h0", h0, B, H, input_gates);
  check_2d("c0", c0, B, H, input_gates);
  host::check_bias(op, "bias", bias, G, input_gates);
}

// How many threads a sequence kernel's team gets: at most one per unit block, and none more than
// its step's multiply-adds (macs) give each at least min_macs (the barrier per step costs more
// than a second thread saves below that); one inside an enclosing parallel region.
int64_t seq_threads(int64_t nblk, int64_t macs, int64_t min_macs) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), nblk, macs / min_macs}));
}

// The team loop of the sequence kernels (lstm_layer_fused, lstm_layer_bf16): one OpenMP team for
// the whole sequence, each thread owning a range of the nblk unit blocks. A thread packs its
// blocks' weights once (k.pack), then per step runs its blocks (k.step) and waits at a barrier for
// the step's h to be complete before the next step reads it. k.enter / k.leave bracket a thread's
// work (the AMX tile configuration); before a step for which k.prologue_at(s), every thread runs
// k.prologue for its own blocks, and a barrier follows (the AMX kernel's chunked projection).
//
// Each step's barrier waits for the slowest thread, and on a shared host that is whichever one the
// host delayed (perf put 8-15% of a T100 B32 H512 layer in libgomp's barrier). So a thread that is
// done with its own blocks takes the others' remaining ones, from the far end of their ranges (the
// attention kernels' run_tasks does the same with its tasks): claimed[j] holds the last step
// whose block j has been taken. A block computes the same values whichever thread runs it.
template <class Team>
void run_sequence(const Team& k, int64_t nblk, int64_t T, int64_t threads) {
#ifdef _OPENMP
  if (threads > 1) {
    std::vector<std::atomic<int64_t>> claimed(nblk);
    for (auto& f : claimed) f.store(-1, std::memory_order_relaxed);
#pragma omp parallel num_threads(threads)
    {
      // The team may be smaller than asked (nested parallelism, a thread limit): split by its size.
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      const auto range = [&](int64_t t) { return std::pair<int64_t, int64_t>{t * nblk / nt, (t + 1) * nblk / nt}; };
      const auto [j0, j1] = range(tid);
      k.enter();
      k.pack(j0, j1);
#pragma omp barrier  // another thread may step these blocks
      for (int64_t s = 0; s < T; ++s) {
        if (k.prologue_at(s)) {
          k.prologue(s, j0, j1);
#pragma omp barrier
        }
        for (int64_t j = j0; j < j1; ++j) {
          if (claimed[j].exchange(s, std::memory_order_acq_rel) != s) k.step(s, j, j + 1);
        }
        for (int64_t o = 1; o < nt; ++o) {
          const auto [v0, v1] = range((tid + o) % nt);
          for (int64_t j = v1 - 1; j >= v0; --j) {
            if (claimed[j].exchange(s, std::memory_order_acq_rel) != s) k.step(s, j, j + 1);
          }
        }
#pragma omp barrier
      }
      k.leave();
    }
    return;
  }
#endif
  k.enter();
  k.pack(0, nblk);
  for (int64_t s = 0; s < T; ++s) {
    if (k.prologue_at(s)) k.prologue(s, 0, nblk);
    k.step(s, 0, nblk);
  }
  k.leave();
}

// The team loop of the sequence backward (lstm_layer_bwd_cpu, float32 and bf16): one OpenMP team,
// each thread owning a range of the nsb super-blocks of NW units (no stealing: a thread's next cell
// backward reads only the dh its own product wrote). A thread packs its super-blocks' weights
// (k.pack), then per step (last to first) runs the cell backward of its units (k.point), waits at a
// barrier for every unit's gate gradients, and computes dh of its units (k.gemm). k.enter / k.leave
// bracket a thread's work (the AMX tile configuration).
template <class Team>
void run_backward(const Team& k, int64_t nsb, int64_t NW, int64_t H, int64_t T, int64_t threads) {
  const auto run = [&](int64_t sb0, int64_t sb1, bool team) {
    const int64_t u0 = std::min(H, sb0 * NW), u1 = std::min(H, sb1 * NW);
    k.enter();
    k.pack(sb0, sb1);
    for (int64_t s = T - 1; s >= 0; --s) {
      k.point(s, u0, u1);
#ifdef _OPENMP
      if (team) {
#pragma omp barrier
      }
#endif
      k.gemm(s, sb0, sb1);  // after step 0's, dh is grad_h0
    }
    k.leave();
  };
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      // The team may be smaller than asked (nested parallelism, a thread limit): split by its size.
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      run(tid * nsb / nt, (tid + 1) * nsb / nt, nt > 1);
    }
    return;
  }
#endif
  run(0, nsb, false);
}

// The float32 AVX2 / AVX-512 path of lstm_layer_fwd, on run_sequence's team: unit blocks of W = 16
// units on AVX-512, 8 on AVX2. A thread packs its blocks of W_hh once (seq_fused_pack: all four
// gates' columns of its units interleaved, its slice stays in its L2 step after step), then per
// step computes the recurrent GEMM of its units for every batch row with the cell fused into the
// GEMM's epilogue (seq_fused_step). No gates buffer, no BLAS call, no fork/join per step.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_fused(const SeqFusedKernel& k, const at::Tensor& ig,
                                                                const at::Tensor& x, const at::Tensor& h0,
                                                                at::Tensor& c, const at::Tensor& weight_ih,
                                                                const at::Tensor& weight_hh, const at::Tensor& bias,
                                                                bool reverse, at::Tensor& out, float* ws = nullptr,
                                                                float* cs = nullptr) {
  const int64_t T = out.size(0), B = out.size(1), H = out.size(2), I = x.defined() ? x.size(2) : 0;
  const int64_t nblk = (H + k.W - 1) / k.W;
  const at::Tensor w = weight_hh.contiguous();
  const at::Tensor wi = x.defined() ? weight_ih.contiguous() : at::Tensor();
  at::Tensor packed = at::empty({nblk * (I + H) * 4 * k.W}, out.options());
  const SeqFusedArgs a{ig.defined() ? ig.data_ptr<float>() : nullptr,
                       x.defined() ? x.data_ptr<float>() : nullptr,
                       h0.data_ptr<float>(),
                       wi.defined() ? wi.data_ptr<float>() : nullptr,
                       w.data_ptr<float>(),
                       bias.defined() ? bias.data_ptr<float>() : nullptr,
                       packed.data_ptr<float>(),
                       c.data_ptr<float>(),
                       out.data_ptr<float>(),
                       ws,
                       cs,
                       T,
                       B,
                       H,
                       I,
                       reverse};
  struct Team {
    const SeqFusedKernel& k;
    const SeqFusedArgs& a;
    void enter() const {}
    void leave() const {}
    bool prologue_at(int64_t) const { return false; }
    void prologue(int64_t, int64_t, int64_t) const {}
    void pack(int64_t j0, int64_t j1) const { k.pack(a, j0, j1); }
    void step(int64_t s, int64_t j0, int64_t j1) const { k.step(a, s, j0, j1); }
  };
  run_sequence(Team{k, a}, nblk, T, seq_threads(nblk, B * H * 4 * H, kSeqMinFmaPerThread));
  return {out, out.select(0, reverse ? 0 : T - 1).clone(), c};
}

#if SK_LSTM_X86_DISPATCH
// Below this many multiply-adds a step per thread, the bf16 sequence kernel runs on one thread: AMX
// tiles do a step's recurrent product at H = 256, B = 16 (4.2 M) in a few microseconds, so the
// barrier is a larger share than for the float32 kernel. vdpbf16ps runs at an eighth of the
// tiles' rate (twice the float32 FMA's): on the Zen 5 EPYC two threads took 0.91x the time of one
// at 2^17 multiply-adds a step (T64 B4 H64), 0.53x at 2^22.
constexpr int64_t kAmxMinMacsPerThread = 1 << 20;
constexpr int64_t kDotsMinMacsPerThread = 1 << 16;

// One bf16 engine's entries (bf16seq), chosen once per call: AMX tiles, or vdpbf16ps.
struct Bf16Engine {
  bool tiles;
  void (*project)(const bf16seq::SeqArgs&, int64_t, int64_t, int64_t);
  void (*step)(const bf16seq::SeqArgs&, int64_t, int64_t, int64_t);
  void (*bwd_gemm)(const bf16seq::Bf16BwdArgs&, int64_t, int64_t, int64_t);
  int64_t min_macs;  // per step and thread, for seq_threads
  void enter() const {
    if (tiles) bf16seq::tiles_on();
  }
  void leave() const {
    if (tiles) bf16seq::tiles_off();
  }
};

// A bf16 tensor's storage as the kernels' raw 16-bit words.
uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

Bf16Engine bf16_engine(bool tiles) {
  using namespace bf16seq;
  if (tiles) return {true, &project_chunk_amx, &seq_step_amx, &bwd_gemm_amx, kAmxMinMacsPerThread};
  return {false, &project_chunk_dp, &seq_step_dp, &bwd_gemm_dp, kDotsMinMacsPerThread};
}

// lstm_layer_fwd.fused on bf16 operands (see bf16seq above; tiles: the AMX engine, else vdpbf16ps),
// on run_sequence's team: 16 units per block, each thread packing W_ih and W_hh for its own blocks
// (its W_hh slice, 1 MB at H = 512 on two threads, stays in its L2), projecting Tc steps of x for
// them at a time (the prologue), then stepping. x, h and the weights are the products' bf16
// operands; the sums and the cell are float32; the output is bf16. The products read 32-column
// chunks (AMX tiles also whole 16-row groups), so x is copied into a zero-padded buffer unless its
// shape is already a multiple of both, and h lives in one (hbuf).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_bf16(bool tiles, const at::Tensor& x, const at::Tensor& h0,
                                                               const at::Tensor& c0, const at::Tensor& weight_ih,
                                                               const at::Tensor& weight_hh, const at::Tensor& bias,
                                                               bool reverse, at::Tensor& ws, at::Tensor& cs) {
  using bf16seq::kTile;
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = weight_hh.size(1);
  const int64_t nblk = (H + 15) / 16, Ip = (I + 31) / 32 * 32, Hp = (H + 31) / 32 * 32, Bp = (B + 15) / 16 * 16;
  // Tc: a multiple of 16 / gcd(B, 16) (so each chunk starts on a 16-row group of x) giving about
  // 256 rows (a 1 MB projection buffer at H = 256).
  const int64_t step_rows = 16 / std::gcd<int64_t>(B, 16);
  const int64_t Tc = std::max<int64_t>(1, (256 / B + step_rows - 1) / step_rows) * step_rows;
  const int64_t N = T * B, Np = tiles ? (N + 15) / 16 * 16 : N;  // the dot engine reads no row past N
  const auto opts = x.options();
  at::Tensor xa = x.reshape({N, I});
  if (Ip != I || Np != N) {
    at::Tensor xp = at::zeros({Np, Ip}, opts);
    xp.narrow(0, 0, N).narrow(1, 0, I).copy_(xa);
    xa = xp;
  }
  const at::Tensor wi = weight_ih.contiguous(), wh = weight_hh.contiguous();
  at::Tensor wpi = at::empty({nblk * (Ip / 32) * 4 * kTile}, opts);
  at::Tensor wph = at::empty({nblk * (Hp / 32) * 4 * kTile}, opts);
  at::Tensor ig = at::empty({(Tc * B + 15) / 16 * 16, nblk * 64}, opts.dtype(at::kFloat));
  at::Tensor hbuf = at::zeros({2, Bp, Hp}, opts);
  hbuf.select(0, 0).narrow(0, 0, B).narrow(1, 0, H).copy_(h0);
  at::Tensor c = at::empty({B, H}, opts.dtype(at::kFloat));
  c.copy_(c0);
  at::Tensor out = at::empty({T, B, H}, opts);
  const at::Tensor bias32 = bias.defined() ? bias.to(at::kFloat) : at::Tensor();
  const bf16seq::SeqArgs a{u16(xa),
                           u16(wpi),
                           u16(wph),
                           bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                           ig.data_ptr<float>(),
                           c.data_ptr<float>(),
                           u16(hbuf),
                           u16(out),
                           ws.numel() > 0 ? u16(ws) : nullptr,
                           cs.numel() > 0 ? u16(cs) : nullptr,
                           T,
                           B,
                           H,
                           I,
                           Ip,
                           Hp,
                           Bp,
                           nblk,
                           Tc,
                           reverse};
  struct Team {
    const bf16seq::SeqArgs& a;
    const uint16_t* wi;
    const uint16_t* wh;
    Bf16Engine e;
    void enter() const { e.enter(); }
    void leave() const { e.leave(); }
    bool prologue_at(int64_t s) const { return bf16seq::chunk_starts(a, s); }
    void prologue(int64_t s, int64_t j0, int64_t j1) const { e.project(a, s, j0, j1); }
    void pack(int64_t j0, int64_t j1) const { bf16seq::pack_entry(a, wi, wh, j0, j1); }
    void step(int64_t s, int64_t j0, int64_t j1) const { e.step(a, s, j0, j1); }
  };
  const Bf16Engine e = bf16_engine(tiles);
  run_sequence(Team{a, u16(wi), u16(wh), e}, nblk, T, seq_threads(nblk, B * H * 4 * (I + H), e.min_macs));
  return {out, out.select(0, reverse ? 0 : T - 1).clone(), c.to(at::kBFloat16)};
}

// lstm_layer_fwd.backward on the bf16 kernel's saved states (see bf16seq::BwdArgs): tensors already
// checked (bf16, shapes), T, B, H > 0. Returns (grad_gates bf16, grad_h0, grad_c0 in bf16).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_bf16(bool tiles, const at::Tensor& go,
                                                                   const c10::optional<at::Tensor>& grad_hn,
                                                                   const c10::optional<at::Tensor>& grad_cn,
                                                                   const at::Tensor& ws, const at::Tensor& cs,
                                                                   const at::Tensor& c0, const at::Tensor& weight_hh,
                                                                   bool reverse) {
  using bf16seq::kTile;
  const int64_t T = ws.size(0), B = ws.size(1), H = ws.size(2) / 4;
  const int64_t Kp = (4 * H + 31) / 32 * 32, Bp = tiles ? (B + 15) / 16 * 16 : B, nsb = (H + 63) / 64;
  const auto opts = ws.options();
  const auto f32 = opts.dtype(at::kFloat);
  at::Tensor dh = grad_hn.has_value() ? grad_hn->to(at::kFloat).contiguous() : at::zeros({B, H}, f32);
  at::Tensor dc = grad_cn.has_value() ? grad_cn->to(at::kFloat).contiguous() : at::zeros({B, H}, f32);
  const at::Tensor wt = weight_hh.t().contiguous();  // (H, 4H): W_hh^T, the product's B operand rows
  at::Tensor packed = at::empty({nsb * (Kp / 32) * 4 * kTile}, opts);
  at::Tensor gbuf = at::zeros({2, Bp, Kp}, opts);
  at::Tensor grad_gates = at::empty({T, B, 4 * H}, opts);
  const at::Tensor wsc = ws.contiguous(), csc = cs.contiguous(), c0c = c0.contiguous();
  const at::Tensor goc = go.defined() ? go.contiguous() : at::Tensor();
  const bf16seq::Bf16BwdArgs a{goc.defined() ? u16(goc) : nullptr,
                               u16(wsc),
                               u16(csc),
                               u16(c0c),
                               u16(packed),
                               u16(gbuf),
                               u16(grad_gates),
                               dh.data_ptr<float>(),
                               dc.data_ptr<float>(),
                               T,
                               B,
                               H,
                               Kp,
                               Bp,
                               reverse};
  struct Team {
    const bf16seq::Bf16BwdArgs& a;
    const uint16_t* wt;
    Bf16Engine e;
    void enter() const { e.enter(); }
    void leave() const { e.leave(); }
    void pack(int64_t sb0, int64_t sb1) const { bf16seq::bwd_pack(a, wt, sb0, sb1); }
    void point(int64_t s, int64_t u0, int64_t u1) const { bf16seq::bwd_point(a, s, u0, u1); }
    void gemm(int64_t s, int64_t sb0, int64_t sb1) const { e.bwd_gemm(a, s, sb0, sb1); }
  };
  const Bf16Engine e = bf16_engine(tiles);
  run_backward(Team{a, u16(wt), e}, nsb, 64, H, T, seq_threads(nsb, B * H * 4 * H, e.min_macs));
  return {grad_gates, dh.to(at::kBFloat16), dc.to(at::kBFloat16)};
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(const at::Tensor& input_gates, const at::Tensor& h0,
                                                                  const at::Tensor& c0, const at::Tensor& weight_hh,
                                                                  const c10::optional<at::Tensor>& bias, bool reverse) {
  check_layer_args("lstm_layer_fwd", input_gates, h0, c0, weight_hh, bias);
  const int64_t T = input_gates.size(0), B = input_gates.size(1), G = input_gates.size(2), H = G / 4;

  auto opts = input_gates.options();
  at::Tensor out = at::empty({T, B, H}, opts);
  at::Tensor c = c0.clone(at::MemoryFormat::Contiguous);  // the running cell state, updated in place
  if (T == 0 || B == 0 || H == 0) return {out, h0.clone(at::MemoryFormat::Contiguous), c};
  const at::Tensor ig = input_gates.contiguous(), h_init = h0.contiguous();
  const at::Tensor bsum = bias.has_value() ? bias->contiguous() : at::Tensor();

  if (input_gates.scalar_type() == at::kFloat) {
    const SeqFusedKernel k = seq_fused_kernel(false);
    if (k.step != nullptr)
      return lstm_layer_fused(k, ig, at::Tensor(), h_init, c, at::Tensor(), weight_hh, bsum, reverse, out);
  }

  // float64, and float32 on the portable path: per step, the BLAS on each thread's block of W_hh
  // rows, then the cell. Unit blocks: one per thread, a multiple of 8 units (the SIMD width) except the last, at least
  // 32 units each so a block's GEMM is not too thin to be worth a thread.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H / 32));
  const int64_t per = ((H + threads - 1) / threads + 7) / 8 * 8;
  const int64_t P = (H + per - 1) / per;
  // Block p's rows of W_hh, packed contiguous (4 nu_p, H): row g * nu_p + (u - u0) = row g * H + u,
  // multiplied as its transposed view. (A contiguous transposed copy, (H, 4 nu_p), makes MKL take a
  // kernel whose float32 sums over K carry about 3x the rounding error of torch's own h @ W^T.)
  at::Tensor w = weight_hh.contiguous();
  std::vector<at::Tensor> wp(P), gates(P);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t u0 = p * per, nu = std::min(per, H - u0);
    wp[p] = w.view({4, H, H}).narrow(1, u0, nu).reshape({4 * nu, H}).contiguous().t();
    gates[p] = at::empty({B, 4 * nu}, opts);
  }

  at::Tensor h_prev = h_init;
  AT_DISPATCH_FLOATING_TYPES(input_gates.scalar_type(), "lstm_layer_fwd_cpu", [&] {
    const SeqRangeFn cell = seq_kernel<scalar_t>();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      at::Tensor h_t = out.select(0, t);
      const at::Tensor ig_t = ig.select(0, t);
      at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t u0 = p * per, nu = std::min(per, H - u0);
          // Inside the parallel region the BLAS runs single-threaded, on this block's weights only.
          at::cpu::mm_out(gates[p], h_prev, wp[p]);
          SeqStepArgs a{ig_t.data_ptr(),
                        gates[p].data_ptr(),
                        bsum.defined() ? bsum.data_ptr() : nullptr,
                        c.data_ptr(),
                        h_t.data_ptr(),
                        H,
                        nu,
                        u0};
          for (int64_t b = 0; b < B; ++b) cell(a, b, u0, u0 + nu);
        }
      });
      h_prev = h_t;
    }
  });
  return {out, h_prev.clone(), c};
}

// lstm_layer_fwd.fused: the layer from its input x (T, B, I) and weight_ih (4H, I) rather than from
// precomputed input gates: the input projection runs in the same kernel, its K loop over x_t before
// the one over h_prev into the same accumulators, so no (T, B, 4H) buffer and no separate GEMM
// (float32). Without weight_ih, input is already the input gates (T, B, 4H), as lstm_layer_fwd's
// (the caller's choice where W_ih is too large to stay in cache step after step: see
// python/seqkernels/ops/lstm.py). With train, it also saves what the backward
// (lstm_layer_fwd.backward) needs: the activated gates of every step, workspace (T, B, 4H), and the
// cell state after every step, cs (T, B, H); without, those two are returned empty. Runs on every
// ISA level (the one-lane baseline code for SEQKERNELS_CPU_ISA=portable). Returns (out, h_n, c_n,
// workspace, cs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fused_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const c10::optional<at::Tensor>& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias, bool reverse, bool train) {
  const char* op = "lstm_layer_fwd.fused";
  const bool project = weight_ih.has_value();
  TORCH_CHECK(input.dim() == 3 && (project || input.size(2) % 4 == 0), "seqkernels::", op,
              project ? ": input must have shape (T, B, I), got "
                      : ": input (the input gates) must have shape "
                        "(T, B, 4*H) without weight_ih, got ",
              input.sizes());
  // bfloat16: the bf16 sequence kernel (with weight_ih), AMX tiles or vdpbf16ps; it has no other
  // path, so the caller asks cpu_paths::lstm first (python/seqkernels/ops/lstm.py widens to float32
  // where neither is available).
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  const simd::Isa bf16_path = bf16 ? cpu_paths::lstm(cpu_paths::Dt::BFloat16) : simd::Isa::Portable;
  TORCH_CHECK(input.scalar_type() == at::kFloat || bf16, "seqkernels::", op,
              ": input must be float32 (or bfloat16 on AVX512_BF16 / AMX-BF16), got ", input.scalar_type());
  if (bf16) {
    TORCH_CHECK(bf16_path >= simd::Isa::Avx512Bf16, "seqkernels::", op,
                ": bfloat16 input needs the AVX512_BF16 or AMX-BF16 path, which this CPU (or SEQKERNELS_CPU_ISA=",
                simd::isa_name(simd::active_isa()), ") does not offer; widen to float32");
    TORCH_CHECK(project, "seqkernels::", op, ": bfloat16 input needs weight_ih (the kernel projects x itself)");
  }
  TORCH_CHECK(input.device().is_cpu(), "seqkernels::", op, " (CPU kernel): input is on ", input.device());
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  if (project) {
    TORCH_CHECK(weight_ih->dim() == 2 && weight_ih->size(0) % 4 == 0 && weight_ih->size(1) == I, "seqkernels::", op,
                ": weight_ih must have shape (4*H, ", I, "), got ", weight_ih->sizes());
    TORCH_CHECK(weight_ih->scalar_type() == input.scalar_type() && weight_ih->device() == input.device(),
                "seqkernels::", op, ": weight_ih must have input's dtype and device");
  }
  const int64_t G = project ? weight_ih->size(0) : I, H = G / 4;
  TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) == G && weight_hh.size(1) == H, "seqkernels::", op,
              ": weight_hh must have shape (", G, ", ", H, "), got ", weight_hh.sizes());
  TORCH_CHECK(weight_hh.scalar_type() == input.scalar_type() && weight_hh.device() == input.device(),
              "seqkernels::", op, ": weight_hh must have input's dtype and device");
  check_2d("h0", h0, B, H, input);
  check_2d("c0", c0, B, H, input);
  host::check_bias(op, "bias", bias, G, input);

  auto opts = input.options();
  const int64_t Ts = train ? T : 0;
  at::Tensor out = at::empty({T, B, H}, opts), ws = at::empty({Ts, B, G}, opts), cs = at::empty({Ts, B, H}, opts);
  if (T == 0 || B == 0 || H == 0)
    return {out, h0.clone(at::MemoryFormat::Contiguous), c0.clone(at::MemoryFormat::Contiguous), ws, cs};
  const at::Tensor in = input.contiguous(), h_init = h0.contiguous();
  const at::Tensor bsum = bias.has_value() ? bias->contiguous() : at::Tensor();
#if SK_LSTM_X86_DISPATCH
  if (bf16) {
    auto [o, h_n, c_n] =
        lstm_layer_bf16(bf16_path == simd::Isa::AmxBf16, in, h_init, c0, *weight_ih, weight_hh, bsum, reverse, ws, cs);
    return {o, h_n, c_n, ws, cs};
  }
#endif
  at::Tensor c = c0.clone(at::MemoryFormat::Contiguous);  // the running cell state, updated in place
  const at::Tensor x = project ? in : at::Tensor(), ig = project ? at::Tensor() : in;
  auto [o, h_n, c_n] =
      lstm_layer_fused(seq_fused_kernel(true), ig, x, h_init, c, project ? *weight_ih : at::Tensor(), weight_hh, bsum,
                       reverse, out, train ? ws.data_ptr<float>() : nullptr, train ? cs.data_ptr<float>() : nullptr);
  return {o, h_n, c_n, ws, cs};
}

// The backward of lstm_layer_fwd.fused(train=True) over the whole sequence (float32): grad_out (T, B, H) (None:
// zeros), grad_hn / grad_cn (B, H) (None: zeros), the forward's workspace and cs, c0 and weight_hh.
// Returns (grad_gates (T, B, 4H): the pre-activation gates' gradients of every step, from which the
// caller gets the input, weight and bias gradients with one GEMM or sum each; grad_h0; grad_c0).
//
// One OpenMP team for the whole sequence, as the forward: each thread owns a range of super-blocks of
// 4 W units (64 on AVX-512, 32 on AVX2); per step it runs the cell backward of its units, waits at a
// barrier for every unit's gate gradients, then computes the recurrent GEMM dh = grad_gates_t @ W_hh
// for its own units only (its packed columns of W_hh), which is all its next step reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(const c10::optional<at::Tensor>& grad_out,
                                                                  const c10::optional<at::Tensor>& grad_hn,
                                                                  const c10::optional<at::Tensor>& grad_cn,
                                                                  const at::Tensor& workspace, const at::Tensor& cs,
                                                                  const at::Tensor& c0, const at::Tensor& weight_hh,
                                                                  bool reverse) {
  TORCH_CHECK(workspace.dim() == 3 && workspace.size(2) % 4 == 0,
              "seqkernels::lstm_layer_fwd.backward: workspace must have shape (T, B, 4*H), got ", workspace.sizes());
  // bfloat16: the saved states of the bf16 sequence kernel, on its engines (AMX tiles or vdpbf16ps).
  const bool bf16 = workspace.scalar_type() == at::kBFloat16;
  TORCH_CHECK(workspace.scalar_type() == at::kFloat || bf16,
              "seqkernels::lstm_layer_fwd.backward: workspace must be float32 (or bfloat16 on AVX512_BF16 / "
              "AMX-BF16), got ",
              workspace.scalar_type());
  const simd::Isa bf16_path = bf16 ? cpu_paths::lstm(cpu_paths::Dt::BFloat16) : simd::Isa::Portable;
  TORCH_CHECK(!bf16 || bf16_path >= simd::Isa::Avx512Bf16,
              "seqkernels::lstm_layer_fwd.backward: bfloat16 needs the AVX512_BF16 or AMX-BF16 path, which this "
              "CPU (or SEQKERNELS_CPU_ISA=",
              simd::isa_name(simd::active_isa()), ") does not offer");
  TORCH_CHECK(workspace.device().is_cpu(), "seqkernels::lstm_layer_fwd.backward (CPU kernel): workspace is on ",
              workspace.device());
  const int64_t T = workspace.size(0), B = workspace.size(1), G = workspace.size(2), H = G / 4;
  auto check_3d = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == T && t.size(1) == B && t.size(2) == H,
                "seqkernels::lstm_layer_fwd.backward: ", name, " must have shape (", T, ", ", B, ", ", H, "), got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == workspace.scalar_type() && t.device() == workspace.device(),
                "seqkernels::lstm_layer_fwd.backward: ", name, " must be a ", workspace.scalar_type(),
                " CPU tensor like workspace, got ", t.scalar_type(), " on ", t.device());
  };
  check_3d("cs", cs);
  if (grad_out.has_value()) check_3d("grad_out", *grad_out);
  check_2d("c0", c0, B, H, workspace);
  if (grad_hn.has_value()) check_2d("grad_hn", *grad_hn, B, H, workspace);
  if (grad_cn.has_value()) check_2d("grad_cn", *grad_cn, B, H, workspace);
  TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) == G && weight_hh.size(1) == H,
              "seqkernels::lstm_layer_fwd.backward: weight_hh must have shape (", G, ", ", H, "), got ",
              weight_hh.sizes());
  TORCH_CHECK(weight_hh.scalar_type() == workspace.scalar_type() && weight_hh.device() == workspace.device(),
              "seqkernels::lstm_layer_fwd.backward: weight_hh must be a CPU tensor of workspace's dtype, got ",
              weight_hh.scalar_type(), " on ", weight_hh.device());

#if SK_LSTM_X86_DISPATCH
  if (bf16 && T > 0 && B > 0 && H > 0)
    return lstm_layer_bwd_bf16(bf16_path == simd::Isa::AmxBf16, grad_out.has_value() ? *grad_out : at::Tensor(),
                               grad_hn, grad_cn, workspace, cs, c0, weight_hh, reverse);
#endif
  auto opts = workspace.options();
  at::Tensor grad_gates = at::empty({T, B, G}, opts);
  at::Tensor dh = grad_hn.has_value() ? grad_hn->clone(at::MemoryFormat::Contiguous) : at::zeros({B, H}, opts);
  at::Tensor dc = grad_cn.has_value() ? grad_cn->clone(at::MemoryFormat::Contiguous) : at::zeros({B, H}, opts);
  if (T == 0 || B == 0 || H == 0) return {grad_gates.zero_(), dh, dc};
  const at::Tensor go = grad_out.has_value() ? grad_out->contiguous() : at::Tensor();
  const at::Tensor wsc = workspace.contiguous(), csc = cs.contiguous(), c0c = c0.contiguous();
  const at::Tensor w = weight_hh.contiguous();
  const SeqBwdKernel k = seq_bwd_kernel();
  const int64_t NW = 4 * k.W, nsb = (H + NW - 1) / NW;
  at::Tensor packed = at::empty({nsb * 4 * H * NW}, opts);
  const SeqBwdArgs a{go.defined() ? go.data_ptr<float>() : nullptr,
                     wsc.data_ptr<float>(),
                     csc.data_ptr<float>(),
                     c0c.data_ptr<float>(),
                     w.data_ptr<float>(),
                     packed.data_ptr<float>(),
                     grad_gates.data_ptr<float>(),
                     dh.data_ptr<float>(),
                     dc.data_ptr<float>(),
                     T,
                     B,
                     H,
                     reverse};
  struct Team {
    const SeqBwdKernel& k;
    const SeqBwdArgs& a;
    void enter() const {}
    void leave() const {}
    void pack(int64_t sb0, int64_t sb1) const { k.pack(a, sb0, sb1); }
    void point(int64_t s, int64_t u0, int64_t u1) const { k.point(a, s, u0, u1); }
    void gemm(int64_t s, int64_t sb0, int64_t sb1) const { k.gemm(a, s, sb0, sb1); }
  };
  run_backward(Team{k, a}, nsb, NW, H, T, seq_threads(nsb, B * H * 4 * H, kSeqMinFmaPerThread));
  return {grad_gates, dh, dc};
}

}  // namespace
}  // namespace seqkernels

namespace seqkernels {
// float32 accumulation (float32, bf16, float16) has AVX2 and AVX-512 lanes; float64 the at::vec
// AVX2 lanes. "portable" on x86 is the scalar code.
simd::Isa cpu_paths::lstm(Dt dt) {
  if (!SK_LSTM_X86_DISPATCH) return simd::Isa::Portable;
  // bfloat16: the bf16 sequence kernel (lstm_layer_bf16) on AMX tiles where they are usable, on
  // vdpbf16ps where AVX512_BF16 is; its cell ops and everything else bf16 take the AVX-512 lanes.
  if (dt == Dt::BFloat16 && simd::path_isa(simd::Isa::AmxBf16) >= simd::Isa::Avx512Bf16)
    return simd::path_isa(simd::Isa::AmxBf16);
  return simd::path_isa(dt == Dt::Float64 ? simd::Isa::Avx2 : simd::Isa::Avx512);
}
}  // namespace seqkernels

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("lstm_layer_fwd", &seqkernels::lstm_layer_fwd_cpu);
  m.impl("lstm_layer_fwd.fused", &seqkernels::lstm_layer_fused_cpu);
  m.impl("lstm_layer_fwd.backward", &seqkernels::lstm_layer_bwd_cpu);
  m.impl("lstm_cell_fwd", &seqkernels::lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &seqkernels::lstm_cell_bwd_cpu);
}
