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

#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
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

// The float32 AVX2 / AVX-512 path of lstm_layer_fwd: one OpenMP team for the whole sequence, each
// thread owning a range of unit blocks (W = 16 units on AVX-512, 8 on AVX2). A thread packs its
// blocks of W_hh once (seq_fused_pack: all four gates' columns of its units interleaved, its slice
// stays in its L2 step after step), then per step computes the recurrent GEMM of its units for
// every batch row with the cell fused into the GEMM's epilogue (seq_fused_step), and waits at a
// barrier for the step's h to be complete before the next step reads it. No gates buffer, no
// BLAS call, no fork/join per step.
//
// Each step's barrier waits for the slowest thread, and on a shared host that is whichever one the
// host delayed (perf put 8-15% of a T100 B32 H512 layer in libgomp's barrier). So a thread that is
// done with its own blocks takes the others' remaining ones, from the far end of their ranges (the
// attention kernels' run_tasks does the same with its tasks): claimed[j] holds the last step
// whose block j has been taken. A block computes the same values whichever thread runs it.
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
  int64_t threads = std::min<int64_t>(at::get_num_threads(), nblk);
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, B * H * 4 * H / kSeqMinFmaPerThread));
  if (at::in_parallel_region()) threads = 1;
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
      k.pack(a, j0, j1);
#pragma omp barrier  // another thread may step these blocks
      for (int64_t s = 0; s < T; ++s) {
        for (int64_t j = j0; j < j1; ++j) {
          if (claimed[j].exchange(s, std::memory_order_acq_rel) != s) k.step(a, s, j, j + 1);
        }
        for (int64_t o = 1; o < nt; ++o) {
          const auto [v0, v1] = range((tid + o) % nt);
          for (int64_t j = v1 - 1; j >= v0; --j) {
            if (claimed[j].exchange(s, std::memory_order_acq_rel) != s) k.step(a, s, j, j + 1);
          }
        }
#pragma omp barrier
      }
    }
    threads = 0;
  }
#endif
  if (threads != 0) {
    k.pack(a, 0, nblk);
    for (int64_t s = 0; s < T; ++s) k.step(a, s, 0, nblk);
  }
  return {out, out.select(0, reverse ? 0 : T - 1).clone(), c};
}

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
  TORCH_CHECK(input.scalar_type() == at::kFloat, "seqkernels::", op, ": input must be float32, got ",
              input.scalar_type());
  TORCH_CHECK(input.device().is_cpu(), "seqkernels::", op, " (CPU kernel): input is on ", input.device());
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  if (project) {
    TORCH_CHECK(weight_ih->dim() == 2 && weight_ih->size(0) % 4 == 0 && weight_ih->size(1) == I, "seqkernels::", op,
                ": weight_ih must have shape (4*H, ", I, "), got ", weight_ih->sizes());
    TORCH_CHECK(weight_ih->scalar_type() == at::kFloat && weight_ih->device() == input.device(), "seqkernels::", op,
                ": weight_ih must have input's dtype and device");
  }
  const int64_t G = project ? weight_ih->size(0) : I, H = G / 4;
  TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) == G && weight_hh.size(1) == H, "seqkernels::", op,
              ": weight_hh must have shape (", G, ", ", H, "), got ", weight_hh.sizes());
  TORCH_CHECK(weight_hh.scalar_type() == at::kFloat && weight_hh.device() == input.device(), "seqkernels::", op,
              ": weight_hh must have input's dtype and device");
  check_2d("h0", h0, B, H, input);
  check_2d("c0", c0, B, H, input);
  host::check_bias(op, "bias", bias, G, input);

  auto opts = input.options();
  const int64_t Ts = train ? T : 0;
  at::Tensor out = at::empty({T, B, H}, opts), ws = at::empty({Ts, B, G}, opts), cs = at::empty({Ts, B, H}, opts);
  at::Tensor c = c0.clone(at::MemoryFormat::Contiguous);
  if (T == 0 || B == 0 || H == 0) return {out, h0.clone(at::MemoryFormat::Contiguous), c, ws, cs};
  const at::Tensor in = input.contiguous(), h_init = h0.contiguous();
  const at::Tensor bsum = bias.has_value() ? bias->contiguous() : at::Tensor();
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
  TORCH_CHECK(workspace.scalar_type() == at::kFloat,
              "seqkernels::lstm_layer_fwd.backward: workspace must be float32, got ", workspace.scalar_type());
  TORCH_CHECK(workspace.device().is_cpu(), "seqkernels::lstm_layer_fwd.backward (CPU kernel): workspace is on ",
              workspace.device());
  const int64_t T = workspace.size(0), B = workspace.size(1), G = workspace.size(2), H = G / 4;
  auto check_3d = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == T && t.size(1) == B && t.size(2) == H,
                "seqkernels::lstm_layer_fwd.backward: ", name, " must have shape (", T, ", ", B, ", ", H, "), got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == workspace.device(),
                "seqkernels::lstm_layer_fwd.backward: ", name, " must be a float32 CPU tensor like workspace, got ",
                t.scalar_type(), " on ", t.device());
  };
  check_3d("cs", cs);
  if (grad_out.has_value()) check_3d("grad_out", *grad_out);
  check_2d("c0", c0, B, H, workspace);
  if (grad_hn.has_value()) check_2d("grad_hn", *grad_hn, B, H, workspace);
  if (grad_cn.has_value()) check_2d("grad_cn", *grad_cn, B, H, workspace);
  TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) == G && weight_hh.size(1) == H,
              "seqkernels::lstm_layer_fwd.backward: weight_hh must have shape (", G, ", ", H, "), got ",
              weight_hh.sizes());
  TORCH_CHECK(weight_hh.scalar_type() == at::kFloat && weight_hh.device() == workspace.device(),
              "seqkernels::lstm_layer_fwd.backward: weight_hh must be a float32 CPU tensor like workspace");

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
  int64_t threads = std::min<int64_t>(at::get_num_threads(), nsb);
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, B * H * 4 * H / kSeqMinFmaPerThread));
  if (at::in_parallel_region()) threads = 1;
  auto units = [&](int64_t sb0, int64_t sb1, int64_t& u0, int64_t& u1) {
    u0 = std::min(H, sb0 * NW);
    u1 = std::min(H, sb1 * NW);
  };
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t sb0 = tid * nsb / nt, sb1 = (tid + 1) * nsb / nt;
      int64_t u0 = 0, u1 = 0;
      units(sb0, sb1, u0, u1);
      k.pack(a, sb0, sb1);
      for (int64_t s = T - 1; s >= 0; --s) {
        k.point(a, s, u0, u1);
#pragma omp barrier
        k.gemm(a, s, sb0, sb1);  // after step 0's, dh is grad_h0
      }
    }
    threads = 0;
  }
#endif
  if (threads != 0) {
    k.pack(a, 0, nsb);
    for (int64_t s = T - 1; s >= 0; --s) {
      k.point(a, s, 0, H);
      k.gemm(a, s, 0, nsb);
    }
  }
  return {grad_gates, dh, dc};
}

}  // namespace
}  // namespace seqkernels

namespace seqkernels {
// float32 accumulation (float32, bf16, float16) has AVX2 and AVX-512 lanes; float64 the at::vec
// AVX2 lanes. "portable" on x86 is the scalar code.
simd::Isa cpu_paths::lstm(Dt dt) {
  if (!SK_LSTM_X86_DISPATCH) return simd::Isa::Portable;
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
