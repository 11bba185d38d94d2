// The one SIMD layer of the CPU kernels (attention.cpp, kv_cache.cpp, lstm_cell.cpp): which
// instruction set a call takes, and the AVX2 building blocks they share. Torch-free on purpose,
// like the kernel headers (DESIGN §9), so the sanitizer build and any later kernel can take it
// as is; the portable (at::vec) policies stay in the .cpp files that need ATen.
//
// Instruction-set choice, made in one place. The levels are ordered,
// Portable < Avx2 < Avx512 < Avx512Bf16 < AmxBf16:
//   cpu_features()  what this CPU and OS can run, probed once per process: CPUID for the
//                   instructions, and XGETBV (XCR0) for the OS saving the registers they use
//                   (bits 1-2 for xmm/ymm; bits 5-7, opmask and the upper zmm state, for AVX-512;
//                   bits 17-18, the tile configuration and data, for AMX). Linux also wants each
//                   process to ask before it touches the 8 KiB of tile data (arch_prctl
//                   ARCH_REQ_XCOMP_PERM); the probe asks, and AMX counts only if that succeeds.
//   supported_isa() the best level the CPU and OS support (Avx512 needs F, BW, VL and DQ;
//                   Avx512Bf16 those and AVX512_BF16; AmxBf16 those and AMX-TILE + AMX-BF16).
//   active_isa()    the level a call may use: supported_isa(), lowered by the one variable
//                   SEQKERNELS_CPU_ISA = portable | avx2 | avx512 | avx512_bf16 | amx_bf16 |
//                   native. "default" is the older spelling of portable; unset, "native" or
//                   any other value means the best supported level. A request can only lower
//                   the level: asking for one the CPU lacks (avx512 on an AVX2-only CPU) gives
//                   the best supported one, never a crash. The variable is read on every
//                   call (a getenv, tens of nanoseconds next to a kernel call's microseconds),
//                   so a test can switch paths inside one process.
//   has(level)      active_isa() >= level: what a kernel with paths for several levels asks,
//                   from the highest it has down (`if (has(Isa::Avx512)) ... else if
//                   (has(Isa::Avx2)) ...`), so a new level never sends it to a lower path.
//   selected_isa()  active_isa() capped at Avx2: the meaning this function had before the AVX-512
//                   level existed. Callers written against it (attention.cpp) compare
//                   `selected_isa() == Isa::Avx2`; with the uncapped level that comparison would
//                   turn false on an AVX-512 machine and silently send them to the portable path.
//                   Kept so they need no change; new code uses has() / active_isa().
//
// The extension is compiled for the baseline ISA; the AVX2 code lives in functions with a target
// attribute (SK_AVX2_FN for helpers, SK_AVX2_ENTRY for the flattened entry points a driver calls
// through a pointer), and the driver picks them per call. Every AVX2 helper here carries the same
// target string, so it inlines into any caller compiled for it (an entry point, or lstm_cell.cpp's
// `#pragma GCC target` region, which must use SK_AVX2_TARGET too). The AVX-512 code does the same
// with SK_AVX512_TARGET / SK_AVX512_FN / SK_AVX512_ENTRY; that target includes the AVX2 one, so
// AVX-512 code may call the AVX2 helpers (a 256-bit half of a reduction, say) and they inline.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/attention_math.h"  // kLog2e

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SK_SIMD_X86 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
// F16C comes with every AVX2 CPU; it is part of the one AVX2 target so that the KV cache's
// float16 loads and the LSTM cell's float16 stores are in the same ISA as the math around them.
#define SK_AVX2_TARGET "avx2,fma,f16c"
#define SK_AVX2_FN __attribute__((target(SK_AVX2_TARGET))) inline
#define SK_AVX2_ENTRY __attribute__((target(SK_AVX2_TARGET), flatten, noinline))
// `#pragma GCC target` does not expand macros; this spelling of it does, for a region (between
// `#pragma GCC push_options` and `pop_options`) compiled for the same target as the helpers.
#define SK_SIMD_PRAGMA_STR_(x) _Pragma(#x)
#define SK_SIMD_PRAGMA_(x) SK_SIMD_PRAGMA_STR_(x)
#define SK_AVX2_TARGET_PRAGMA SK_SIMD_PRAGMA_(GCC target(SK_AVX2_TARGET))
// AVX-512 F + BW + VL + DQ: every AVX-512 CPU since Skylake-SP has all four (Xeon Phi, without
// BW/VL/DQ, takes the AVX2 path). BW and VL give the masked 16-bit loads of float16/bfloat16 tails,
// DQ the float and/or/andnot on zmm.
#define SK_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define SK_AVX512_FN __attribute__((target(SK_AVX512_TARGET))) inline
#define SK_AVX512_ENTRY __attribute__((target(SK_AVX512_TARGET), flatten, noinline))
#define SK_AVX512_TARGET_PRAGMA SK_SIMD_PRAGMA_(GCC target(SK_AVX512_TARGET))
// AVX-512 plus the bfloat16 dot product (vdpbf16ps: Cooper Lake, Sapphire Rapids, Zen 4): the
// attention forward's bf16 path. A superset of the AVX-512 target, so it inlines those helpers.
#define SK_AVX512BF16_TARGET SK_AVX512_TARGET ",avx512bf16"
#define SK_AVX512BF16_FN __attribute__((target(SK_AVX512BF16_TARGET))) inline
#define SK_AVX512BF16_ENTRY __attribute__((target(SK_AVX512BF16_TARGET), flatten, noinline))
// AMX tiles with bf16 dot products (Sapphire Rapids and later Xeons): the bf16 attention's
// products (forward and backward) on 16 x 32 bf16 tiles. A superset of the AVX512_BF16 target: the softmax between
// the products is that path's AVX-512 code. The tile instructions themselves are g++'s inline
// assembly macros (amxtileintrin.h); the target is what lets _tile_loadconfig inline.
#define SK_AMX_TARGET SK_AVX512BF16_TARGET ",amx-tile,amx-bf16"
#define SK_AMX_FN __attribute__((target(SK_AMX_TARGET))) inline
#define SK_AMX_ENTRY __attribute__((target(SK_AMX_TARGET), flatten, noinline))
// __m256 values only cross function boundaries inside code compiled for AVX2 (entry points, the
// helpers and SK_POLICY_INLINE code inlined into them), never through the baseline-ISA drivers, so
// g++'s note that the by-value vector ABI differs between ISAs does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
// g++ 12 flags the AVX-512 intrinsics' own `__m512 __Y = __Y;` placeholder (an undefined
// pass-through operand) as uninitialized wherever they are inlined (GCC PR 105593, fixed in 13).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define SK_SIMD_X86 0
#endif

// Code written once over a vector policy P (attention.cpp's products, softmax rows and blocks,
// kv_cache.cpp's decode pieces) has no target of its own: it becomes P's code by being inlined into
// an entry point (or method) that carries P's target. `flatten` on the entry does that at -O1 and
// above, but g++ inlines nothing at -O0 unless it is always_inline: an out-of-line instance there
// is baseline code that receives P's vectors in memory from, and hands them to, helpers that pass
// them in registers, and every SIMD path computes garbage (seen in the -O0 sanitizer build). Every
// such template, and every member of a products class that such a template calls, is
// SK_POLICY_INLINE, so that what it compiles to does not depend on the optimization level.
#if defined(__GNUC__) || defined(__clang__)
#define SK_POLICY_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define SK_POLICY_INLINE __forceinline
#else
#define SK_POLICY_INLINE inline
#endif

namespace seqkernels {
namespace simd {

struct CpuFeatures {
  bool avx2 = false;     // AVX2 + FMA + F16C, and the OS saves ymm: what the AVX2 kernels need
  bool avx512f = false;  // the AVX-512 bits: CPUID and the OS saving the zmm/opmask state
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512_bf16 = false;
  bool amx_bf16 = false;  // AMX-TILE + AMX-BF16, the OS saving the tile state, and Linux's permission
  bool avx512() const { return avx2 && avx512f && avx512bw && avx512vl && avx512dq; }
};

// CPUID says what the CPU has; XCR0 (XGETBV, allowed once CPUID reports OSXSAVE) says which
// register states the OS saves on a context switch. An instruction set whose registers the OS
// does not save cannot be used (a hypervisor or kernel may hide AVX-512 that way).
inline CpuFeatures probe_cpu_features() {
  CpuFeatures f;
#if SK_SIMD_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(1, 0, a, b, c, d);
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
  if (!osxsave || !avx) return f;
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const uint64_t xcr0 = (uint64_t{xcr0_hi} << 32) | xcr0_lo;
  const bool os_ymm = (xcr0 & 0x6) == 0x6;            // bits 1-2: SSE and AVX state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;          // and bits 5-7: opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_tiles = (xcr0 & 0x60000) == 0x60000;  // bits 17-18: XTILECFG, XTILEDATA
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned leaf7_subleaves = a;                       // the highest valid subleaf of leaf 7
  const bool amx_cpu = ((d >> 24) & 1) && ((d >> 22) & 1);  // AMX-TILE, AMX-BF16
  f.avx2 = os_ymm && ((b >> 5) & 1) && fma && f16c;
  f.avx512f = os_zmm && ((b >> 16) & 1);
  f.avx512dq = f.avx512f && ((b >> 17) & 1);
  f.avx512bw = f.avx512f && ((b >> 30) & 1);
  f.avx512vl = f.avx512f && ((b >> 31) & 1);
  if (leaf7_subleaves >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512_bf16 = f.avx512f && ((a >> 5) & 1);
  }
  if (f.avx512_bf16 && amx_cpu && os_tiles) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): without it the first tile
    // instruction of the process faults. Granted once per process; asking again is harmless.
    f.amx_bf16 = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#endif
  }
#endif
  return f;
}

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures f = probe_cpu_features();
  return f;
}

// Ordered: a higher level includes the lower ones. Avx512Bf16 is Avx512 plus vdpbf16ps, AmxBf16
// that plus the tiles; only the paths that take bfloat16 operands as they are (the attention
// forward and backward) differ between the three.
enum class Isa { Portable = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, AmxBf16 = 4 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AmxBf16:
      return "amx_bf16";
    case Isa::Avx512Bf16:
      return "avx512_bf16";
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "portable";
  }
}

// The best level the CPU and OS support (probed once).
inline Isa supported_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512()) return f.avx512_bf16 ? (f.amx_bf16 ? Isa::AmxBf16 : Isa::Avx512Bf16) : Isa::Avx512;
  return f.avx2 ? Isa::Avx2 : Isa::Portable;
}

// The level SEQKERNELS_CPU_ISA asks for; the highest when unset, "native" or unknown.
inline Isa requested_isa() {
  const char* e = std::getenv("SEQKERNELS_CPU_ISA");
  if (e == nullptr) return Isa::AmxBf16;
  if (std::strcmp(e, "portable") == 0 || std::strcmp(e, "default") == 0) return Isa::Portable;
  if (std::strcmp(e, "avx2") == 0) return Isa::Avx2;
  if (std::strcmp(e, "avx512") == 0) return Isa::Avx512;
  if (std::strcmp(e, "avx512_bf16") == 0) return Isa::Avx512Bf16;
  return Isa::AmxBf16;
}

inline Isa min_isa(Isa a, Isa b) { return static_cast<int>(a) < static_cast<int>(b) ? a : b; }

// The level a call may use: the request, never above what the CPU supports.
inline Isa active_isa() { return min_isa(requested_isa(), supported_isa()); }

inline bool has(Isa level) { return static_cast<int>(active_isa()) >= static_cast<int>(level); }

// The level a kernel whose highest path is `top` takes now (cpu/paths.h names each family's top).
inline Isa path_isa(Isa top) { return min_isa(active_isa(), top); }

inline bool portable_forced() { return requested_isa() == Isa::Portable; }

// The pre-AVX-512 meaning (see the top of this file): Portable or Avx2, never Avx512.
inline Isa selected_isa() { return min_isa(active_isa(), Isa::Avx2); }

#if SK_SIMD_X86
// ---------------------------------------------------------------------------------------------
// Natural exp and tanh (float32): the LSTM gates, and the attention softcap (Avx2Float::tanh,
// in the attention and decode kernels alike). exp(x) is not exp2(x log2 e): rounding
// x log2 e costs a relative error of |x| ulps at the gates' |x| up to 88, so exp keeps its own
// Cody-Waite reduction.

// exp(x): x = n ln2 + r, |r| <= ln2/2, ln2 split in two so n ln2 is exact to float precision,
// then a degree-7 polynomial for e^r (Cephes expf coefficients), scaled by 2^n through the
// exponent bits. x is clamped to the finite range first (max/min with the constant as first
// operand keep a NaN x as NaN). A few ulps, about twice Sleef's throughput.
SK_AVX2_FN __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-87.3365447505531f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|), which cannot overflow; below
// |x| = 0.625, where 1 - e would lose relative accuracy, an odd polynomial (Cephes tanhf).
SK_AVX2_FN __m256 tanh_ps(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 e = exp_ps(_mm256_mul_ps(ax, _mm256_set1_ps(-2.f)));
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 big = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 large = _mm256_or_ps(big, _mm256_and_ps(sign, x));
  return _mm256_blendv_ps(large, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

// ---------------------------------------------------------------------------------------------
// AVX2 policies: the vector type and the few operations the attention kernels are written
// against (csrc/cpu/attention.cpp's VecPortable is the portable twin); the KV cache's decode
// uses the float one's reductions and exp2.

struct Avx2Float {
  using T = float;
  using V = __m256;
  static constexpr int W = 8;
  SK_AVX2_FN static V zero() { return _mm256_setzero_ps(); }
  SK_AVX2_FN static V set1(float x) { return _mm256_set1_ps(x); }
  SK_AVX2_FN static V load(const float* p) { return _mm256_loadu_ps(p); }
  SK_AVX2_FN static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  SK_AVX2_FN static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  SK_AVX2_FN static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  SK_AVX2_FN static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  SK_AVX2_FN static V add(V a, V b) { return _mm256_add_ps(a, b); }
  SK_AVX2_FN static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  // max returns its second operand when either is NaN: the kernels take the running max as
  // a shift and let NaN reach the sum through exp2.
  SK_AVX2_FN static V max(V a, V b) { return _mm256_max_ps(a, b); }
  // One bit per NaN lane (0: none).
  SK_AVX2_FN static int nan_bits(V x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
  // 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2, 2^f by a degree-6 minimax polynomial
  // (relative error 8e-8, under one ulp, over [-126, 0]), 2^n built in the exponent field.
  // Inputs below about -126.5 give exactly 0 (the exponent field becomes 0), so -inf scores
  // vanish without a compare; NaN stays NaN. Of the softmax exp2s the kernels had, this one is
  // as accurate as the Taylor form the decode used and about a quarter cheaper.
  SK_AVX2_FN static V exp2(V x) { return exp2_nonpos(_mm256_min_ps(_mm256_set1_ps(127.0f), x)); }
  // exp2 for x <= 0 (a score minus its row max), without the upper clamp.
  SK_AVX2_FN static V exp2_nonpos(V x) {
    const V xc = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);
    const V n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(xc, n);
    V p = _mm256_set1_ps(1.533758041e-04f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339986571e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618519805e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550329015e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264625e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471825e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  SK_AVX2_FN static V tanh(V x) { return tanh_ps(x); }
  SK_AVX2_FN static float hmax(V x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  SK_AVX2_FN static float hsum(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};

// 2^f for |f| <= 1/2 as 1 + f q(f), q a degree-10 fit of (2^f - 1) / f at Chebyshev nodes
// (relative error 2.0e-17 in exact arithmetic; p(0) = 1 exactly, so a row's max gets P = 1).
// Highest power first; the AVX2 and AVX-512 float64 policies evaluate it in the same order, so
// they agree lane for lane.
constexpr double kExp2Poly64[12] = {4.4549605981865186e-10, 7.072585949269223e-09, 1.0178062445845774e-07,
                                    1.321544258792169e-06,  1.525273382983612e-05, 0.0001540353044173605,
                                    0.0013333558146416936,  0.009618129107606888,  0.0555041086648216,
                                    0.24022650695910097,    0.6931471805599453,    1.0};
// tanh(x) = x + x z P(z) / Q(z), z = x^2, for |x| < 0.625 (Cephes tanh; Q monic, highest power
// first): relative error 4.9e-18 in exact arithmetic.
constexpr double kTanhP64[3] = {-9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3};
constexpr double kTanhQ64[3] = {1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3};
SK_AVX2_FN __m256d exp2_poly64(__m256d f) {
  __m256d p = _mm256_set1_pd(kExp2Poly64[0]);
#pragma GCC unroll 11
  for (int i = 1; i < 12; ++i) p = _mm256_fmadd_pd(p, f, _mm256_set1_pd(kExp2Poly64[i]));
  return p;
}

struct Avx2Double {
  using T = double;
  using V = __m256d;
  static constexpr int W = 4;
  SK_AVX2_FN static V zero() { return _mm256_setzero_pd(); }
  SK_AVX2_FN static V set1(double x) { return _mm256_set1_pd(x); }
  SK_AVX2_FN static V load(const double* p) { return _mm256_loadu_pd(p); }
  SK_AVX2_FN static void store(double* p, V x) { _mm256_storeu_pd(p, x); }
  SK_AVX2_FN static V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  SK_AVX2_FN static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  SK_AVX2_FN static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  SK_AVX2_FN static V add(V a, V b) { return _mm256_add_pd(a, b); }
  SK_AVX2_FN static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  SK_AVX2_FN static V max(V a, V b) { return _mm256_max_pd(a, b); }
  SK_AVX2_FN static int nan_bits(V x) { return _mm256_movemask_pd(_mm256_cmp_pd(x, x, _CMP_UNORD_Q)); }
  // 2^x as Avx2Float::exp2, in float64: n = round(x), |f| <= 1/2, 2^f = 1 + f q(f) with q of
  // degree 10 (kExp2Poly64; relative error 2e-17 before rounding, within about one ulp after, a
  // thousandth of the float64 parity floor), 2^n in the exponent field. libm's exp2 per lane was
  // the whole float64 forward (8 ns a score, NOTES entry 16). The clamps at +-1023 keep n in the
  // field; below about -1022.5 the biased exponent is 0 and the result exactly 0 (no subnormal
  // outputs, which libm would round to: under 2^-1022 of a row whose max contributes 1, invisible
  // in any sum they enter), -inf gives 0, NaN stays NaN (max/min return their second operand,
  // x, on NaN).
  SK_AVX2_FN static V exp2(V x) { return exp2_nonpos(_mm256_min_pd(_mm256_set1_pd(1023.0), x)); }
  SK_AVX2_FN static V exp2_nonpos(V x) {
    const V xc = _mm256_max_pd(_mm256_set1_pd(-1023.0), x);
    // Adding 1.5 * 2^52 rounds xc to an integer (to nearest, ties to even, as vroundpd) and leaves
    // it, plus 2^51, in the low mantissa bits: n + 1023 shifted into the exponent field needs no
    // float-to-int64 conversion, which AVX2 lacks.
    const V magic = _mm256_set1_pd(6755399441055744.0);
    const V t = _mm256_add_pd(xc, magic);
    const V f = _mm256_sub_pd(xc, _mm256_sub_pd(t, magic));
    const __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(exp2_poly64(f), _mm256_castsi256_pd(e));
  }
  // tanh (the softcap) as tanh_ps, in float64: sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) by the
  // exp2 above, and below |x| = 0.625, where 1 - e loses digits, x + x z P(z) / Q(z) with z = x^2
  // (kTanhP64 / kTanhQ64; relative error 5e-18 there). NaN takes the e branch and stays NaN.
  SK_AVX2_FN static V tanh(V x) {
    const V sign = _mm256_set1_pd(-0.0);
    const V ax = _mm256_andnot_pd(sign, x);
    const V e = exp2_nonpos(_mm256_mul_pd(ax, _mm256_set1_pd(-2.0 * kLog2e)));
    const V one = _mm256_set1_pd(1.0);
    const V big = _mm256_or_pd(_mm256_div_pd(_mm256_sub_pd(one, e), _mm256_add_pd(one, e)), _mm256_and_pd(sign, x));
    const V z = _mm256_mul_pd(x, x);
    V p = _mm256_set1_pd(kTanhP64[0]), q = _mm256_add_pd(z, _mm256_set1_pd(kTanhQ64[0]));
    for (int i = 1; i < 3; ++i) {
      p = _mm256_fmadd_pd(p, z, _mm256_set1_pd(kTanhP64[i]));
      q = _mm256_fmadd_pd(q, z, _mm256_set1_pd(kTanhQ64[i]));
    }
    const V small = _mm256_fmadd_pd(_mm256_mul_pd(x, z), _mm256_div_pd(p, q), x);
    return _mm256_blendv_pd(big, small, _mm256_cmp_pd(ax, _mm256_set1_pd(0.625), _CMP_LT_OQ));
  }
  SK_AVX2_FN static double hmax(V x) {
    __m128d m = _mm_max_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    m = _mm_max_sd(m, _mm_unpackhi_pd(m, m));
    return _mm_cvtsd_f64(m);
  }
  SK_AVX2_FN static double hsum(V x) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
};

// sigmoid(x) = 1 / (1 + exp(-x)).
SK_AVX2_FN __m256 sigmoid_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_xor_ps(x, _mm256_set1_ps(-0.f)))));
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (16 float lanes): the same algorithms and constants as the AVX2 functions above, lane
// for lane, so the two paths agree to the rounding of the reductions' order.

SK_AVX512_FN __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), _mm512_max_ps(_mm512_set1_ps(-87.3365447505531f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// tanh(x) for |x| < 0.625: x + x^3 p(x^2) (tanh_ps below that threshold).
SK_AVX512_FN __m512 tanh_small_ps(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
  return _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
}

// tanh and sigmoid from a math policy M giving e^x (M::exp) and a / b (M::div): ExactMath below
// (exp_ps and vdivps: tanh_ps, sigmoid_ps) or a cheaper one where the result is rounded to bf16
// anyway (the bf16 LSTM kernel's cell, lstm_cell.cpp).
template <class M>
SK_AVX512_FN __m512 tanh_ps_by(__m512 x) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512 ax = _mm512_andnot_ps(sign, x);
  const __m512 e = M::exp(_mm512_mul_ps(ax, _mm512_set1_ps(-2.f)));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 big = M::div(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 small = tanh_small_ps(x);
  const __m512 large = _mm512_or_ps(big, _mm512_and_ps(sign, x));
  // NaN compares false (ordered), as _CMP_LT_OQ in the AVX2 blend: a NaN x takes `large`, NaN too.
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ), large, small);
}
template <class M>
SK_AVX512_FN __m512 sigmoid_ps_by(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  return M::div(one, _mm512_add_ps(one, M::exp(_mm512_xor_ps(x, _mm512_set1_ps(-0.f)))));
}
struct ExactMath {
  SK_AVX512_FN static __m512 exp(__m512 x) { return exp_ps(x); }
  SK_AVX512_FN static __m512 div(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
};
SK_AVX512_FN __m512 tanh_ps(__m512 x) { return tanh_ps_by<ExactMath>(x); }
SK_AVX512_FN __m512 sigmoid_ps(__m512 x) { return sigmoid_ps_by<ExactMath>(x); }

// The AVX-512 twin of Avx2Float: same interface, W = 16.
struct Avx512Float {
  using T = float;
  using V = __m512;
  static constexpr int W = 16;
  SK_AVX512_FN static V zero() { return _mm512_setzero_ps(); }
  SK_AVX512_FN static V set1(float x) { return _mm512_set1_ps(x); }
  SK_AVX512_FN static V load(const float* p) { return _mm512_loadu_ps(p); }
  SK_AVX512_FN static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  SK_AVX512_FN static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  SK_AVX512_FN static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  SK_AVX512_FN static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  SK_AVX512_FN static V add(V a, V b) { return _mm512_add_ps(a, b); }
  SK_AVX512_FN static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  // Second operand on NaN, as Avx2Float::max (vmaxps has the same rule at every width).
  SK_AVX512_FN static V max(V a, V b) { return _mm512_max_ps(a, b); }
  SK_AVX512_FN static int nan_bits(V x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
  SK_AVX512_FN static V exp2(V x) { return exp2_nonpos(_mm512_min_ps(_mm512_set1_ps(127.0f), x)); }
  // Avx2Float::exp2_nonpos, 16 lanes: 2^f for f in [-1/2, 1/2] by Poly::eval, the rest here
  // (Avx512FloatBf16P passes a shorter polynomial).
  template <class Poly>
  SK_AVX512_FN static V exp2_reduced(V x) {
    const V xc = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);
    const V n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V p = Poly::eval(_mm512_sub_ps(xc, n));
    // p * 2^n by vscalefps (one instruction for the exponent bits, the add and the multiply),
    // and 0 where n is the clamp's -127, as the AVX2 path's biased exponent of 0 gives: bitwise
    // the AVX2 result, which scales by the same exact power of two. No subnormal leaves for a
    // masked score (whose FMAs in P V would then take microcode assists). NaN stays NaN.
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(n, _mm512_set1_ps(-127.0f), _CMP_NEQ_UQ), p, n);
  }
  // Avx2Float's degree-6 polynomial.
  struct Exp2Deg6 {
    SK_AVX512_FN static V eval(V f) {
      V p = _mm512_set1_ps(1.533758041e-04f);
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339986571e-03f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618519805e-03f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550329015e-02f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264625e-01f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-01f));
      return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    }
  };
  SK_AVX512_FN static V exp2_nonpos(V x) { return exp2_reduced<Exp2Deg6>(x); }
  SK_AVX512_FN static V tanh(V x) { return tanh_ps(x); }
  // The two 256-bit halves first, then Avx2Float's tree (the order of a reduction is the only
  // difference from the AVX2 path).
  SK_AVX512_FN static __m256 fold(V x) {
    return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  }
  SK_AVX512_FN static float hmax(V x) {
    const __m256 m =
        _mm256_max_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return Avx2Float::hmax(m);
  }
  SK_AVX512_FN static float hsum(V x) { return Avx2Float::hsum(fold(x)); }
};

// exp2_poly64 at 8 lanes: the same coefficients in the same order.
SK_AVX512_FN __m512d exp2_poly64(__m512d f) {
  __m512d p = _mm512_set1_pd(kExp2Poly64[0]);
#pragma GCC unroll 11
  for (int i = 1; i < 12; ++i) p = _mm512_fmadd_pd(p, f, _mm512_set1_pd(kExp2Poly64[i]));
  return p;
}

// The AVX-512 twin of Avx2Double: W = 8, the same exp2 (reduction, polynomial, order), so the two
// agree lane for lane but for the reductions' order. 2^n by vscalefpd, zeroed where n is the
// clamp's -1023, as Avx512Float::exp2_reduced: bitwise the AVX2 form's product by the exponent
// field.
struct Avx512Double {
  using T = double;
  using V = __m512d;
  static constexpr int W = 8;
  SK_AVX512_FN static V zero() { return _mm512_setzero_pd(); }
  SK_AVX512_FN static V set1(double x) { return _mm512_set1_pd(x); }
  SK_AVX512_FN static V load(const double* p) { return _mm512_loadu_pd(p); }
  SK_AVX512_FN static void store(double* p, V x) { _mm512_storeu_pd(p, x); }
  SK_AVX512_FN static V bcast(const double* p) { return _mm512_set1_pd(*p); }
  SK_AVX512_FN static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  SK_AVX512_FN static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  SK_AVX512_FN static V add(V a, V b) { return _mm512_add_pd(a, b); }
  SK_AVX512_FN static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  SK_AVX512_FN static V max(V a, V b) { return _mm512_max_pd(a, b); }
  SK_AVX512_FN static int nan_bits(V x) { return _mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q); }
  SK_AVX512_FN static V exp2(V x) { return exp2_nonpos(_mm512_min_pd(_mm512_set1_pd(1023.0), x)); }
  SK_AVX512_FN static V exp2_nonpos(V x) {
    const V xc = _mm512_max_pd(_mm512_set1_pd(-1023.0), x);
    const V n = _mm512_roundscale_pd(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V p = exp2_poly64(_mm512_sub_pd(xc, n));
    return _mm512_maskz_scalef_pd(_mm512_cmp_pd_mask(n, _mm512_set1_pd(-1023.0), _CMP_NEQ_UQ), p, n);
  }
  // Avx2Double::tanh, 8 lanes.
  SK_AVX512_FN static V tanh(V x) {
    const V sign = _mm512_set1_pd(-0.0);
    const V ax = _mm512_andnot_pd(sign, x);
    const V e = exp2_nonpos(_mm512_mul_pd(ax, _mm512_set1_pd(-2.0 * kLog2e)));
    const V one = _mm512_set1_pd(1.0);
    const V big = _mm512_or_pd(_mm512_div_pd(_mm512_sub_pd(one, e), _mm512_add_pd(one, e)), _mm512_and_pd(sign, x));
    const V z = _mm512_mul_pd(x, x);
    V p = _mm512_set1_pd(kTanhP64[0]), q = _mm512_add_pd(z, _mm512_set1_pd(kTanhQ64[0]));
    for (int i = 1; i < 3; ++i) {
      p = _mm512_fmadd_pd(p, z, _mm512_set1_pd(kTanhP64[i]));
      q = _mm512_fmadd_pd(q, z, _mm512_set1_pd(kTanhQ64[i]));
    }
    const V small = _mm512_fmadd_pd(_mm512_mul_pd(x, z), _mm512_div_pd(p, q), x);
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(ax, _mm512_set1_pd(0.625), _CMP_LT_OQ), big, small);
  }
  // The two 256-bit halves first, then Avx2Double's tree.
  SK_AVX512_FN static double hmax(V x) {
    return Avx2Double::hmax(_mm256_max_pd(_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd(x, 1)));
  }
  SK_AVX512_FN static double hsum(V x) {
    return Avx2Double::hsum(_mm256_add_pd(_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd(x, 1)));
  }
};

// The softmax policy of the kernels that round P to bfloat16 before P V (the attention forward and
// backward on bf16 operands, AVX512_BF16 and AMX): Avx512Float with 2^f by a degree-4 polynomial,
// relative error 2.9e-6 (about 25 float32 ulps, under a thousandth of a bf16 ulp) against 8e-8,
// two FMAs fewer per 16 scores. p(0) = 1 exactly, so a row's max still gets P = 1; the range
// reduction, the clamp and vscalefps are Avx512Float's, so -inf still gives exactly 0 and NaN
// stays NaN. torch's CPU flash attention evaluates its softmax with a 20-ulp exp (exp_u20) for
// every dtype; the float32 kernels here keep the full-precision polynomial.
struct Avx512FloatBf16P : Avx512Float {
  struct Exp2Deg4 {
    SK_AVX512_FN static V eval(V f) {
      V p = _mm512_set1_ps(9.582830593e-03f);
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.590636656e-02f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402409911e-01f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931241751e-01f));
      return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    }
  };
  // Both redefined: Avx512Float::exp2 calls Avx512Float::exp2_nonpos.
  SK_AVX512_FN static V exp2(V x) { return exp2_nonpos(_mm512_min_ps(_mm512_set1_ps(127.0f), x)); }
  SK_AVX512_FN static V exp2_nonpos(V x) { return exp2_reduced<Exp2Deg4>(x); }
};

// (p[0], p[1]) as one 32-bit word in all 16 lanes: the A operand of a vdpbf16ps that pairs along
// the sum index (the bf16 attention's products, the bf16 LSTM sequence kernel's). p need not be
// 4-byte aligned.
SK_AVX512BF16_FN __m512bh bf16_pair_bcast(const uint16_t* p) {
  int32_t x;
  std::memcpy(&x, p, sizeof(x));
  return (__m512bh)_mm512_set1_epi32(x);
}

// The first n lanes of a 16-lane mask (n >= 16: all of them, n <= 0: none): the tails of the
// AVX-512 loads and stores.
inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 x 16 float transpose in registers: r[j] holds row j on entry, column j on exit (decode's
// key tiles, the attention forward's K^T panels).
SK_AVX512_FN void transpose16_ps(__m512* r) {
  __m512 t[16], u[16];
#pragma GCC unroll 16
  for (int j = 0; j < 8; ++j) {
    t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
    t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
  }
  // u[4g + c] holds, in 128-bit lane l, element c + 4l of rows 4g .. 4g+3.
#pragma GCC unroll 16
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 16
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);       // cols c, c+8 of rows 0-7
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);       // cols c+4, c+12 of rows 0-7
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);  // cols c, c+8 of rows 8-15
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);  // cols c+4, c+12 of rows 8-15
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[c + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// Lane r = the horizontal sum (or max) of v[r], for 16 vectors at once: four rounds of shuffles
// (lanes 8 apart, then 4, 2, 1), each pairing two vectors' halves so that one op reduces both.
// The tree is Avx512Float::hsum's (fold the 256-bit halves, then Avx2Float::hsum), so every
// lane's sum is bitwise hsum(v[r]). For the softmax's per-row reductions (attention forward).
template <class Op>
SK_AVX512_FN __m512 reduce16_rows(const __m512* v, Op op) {
  __m512 w[8], x[4], y[2];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)  // quarters 0-1: row 2k, 2-3: row 2k + 1
    w[k] = op(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44), _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)  // quarter q: row 4k + q
    x[k] = op(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88), _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
#pragma GCC unroll 2
  for (int k = 0; k < 2; ++k)  // quarter q: elements 0-1 row 8k + q, 2-3 row 8k + 4 + q
    y[k] = op(_mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0x44), _mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0xEE));
  // Element t of quarter q: row 4t + q; lane r takes it from lane 4 (r % 4) + r / 4.
  const __m512 z = op(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}
struct Add16 {
  SK_AVX512_FN __m512 operator()(__m512 a, __m512 b) const { return _mm512_add_ps(a, b); }
};
struct Max16 {
  SK_AVX512_FN __m512 operator()(__m512 a, __m512 b) const { return _mm512_max_ps(a, b); }
};
SK_AVX512_FN __m512 hsum16_rows(const __m512* v) { return reduce16_rows(v, Add16{}); }
// Max without NaN: the callers' partial maxima never hold one (see fwd_softmax_rows16).
SK_AVX512_FN __m512 hmax16_rows(const __m512* v) { return reduce16_rows(v, Max16{}); }

// dst[k * dst_ld + r] = src[r * ld + k] for r < 16, k < K: up to 16 rows of K floats written as
// K rows of 16 (rows >= nrows as zeros, never read), by 16 x 16 register transposes. The packers
// that lay weights or keys out for a 16-wide register tile use it: the float32 attention forward's
// K^T panels, the LSTM sequence kernel's gate blocks, and on 32-bit words (bit moves only) the bf16
// kernels' K^T d-pair panels.
SK_AVX512_FN void transpose_rows16_ps(const float* src, int64_t ld, int64_t nrows, int64_t K, float* dst,
                                      int64_t dst_ld) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t nk = K - k0 < 16 ? K - k0 : 16;
    const __mmask16 km = mask16(nk);
    __m512 r[16];
    for (int64_t t = 0; t < 16; ++t)
      r[t] = t < nrows ? _mm512_maskz_loadu_ps(km, src + t * ld + k0) : _mm512_setzero_ps();
    transpose16_ps(r);
    for (int64_t e = 0; e < nk; ++e) _mm512_storeu_ps(dst + (k0 + e) * dst_ld, r[e]);
  }
}

// ---------------------------------------------------------------------------------------------
// AMX: the tile configuration every AMX kernel here uses. All eight tiles are 16 rows of 64
// bytes (16 x 32 bf16 for A and B, 16 x 16 float32 for C), so one configuration serves every
// product and a kernel never reconfigures between them. The configuration is per thread: an
// entry point loads it when it starts and releases the tiles when it returns (so the OS does
// not save 8 KiB of tile data on each context switch of a thread that is done with them).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;  // palette 1: 8 tiles of up to 16 rows x 64 bytes
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// ldtilecfg by hand, with the whole configuration as the asm's memory operand: g++ 12's
// _tile_loadconfig declares only its first 8 bytes as read, so the stores of colsb and rows are
// dead to the optimizer, and one build (a mutant of attention.cpp's AMX backward) dropped them:
// the tiles were left unconfigured and the first tile instruction raised SIGILL.
SK_AMX_FN void amx_tiles_on() {
  AmxTileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
}
SK_AMX_FN void amx_tiles_off() { _tile_release(); }
// Called before a product's tile loads. g++'s tileloadd is an asm that takes the address as a
// plain register and declares no memory read, so the compiler may still hold back (or move past
// it) stores of the operands it is about to read: the P rows just rounded to bf16, the O rows just
// rescaled. This barrier makes every earlier store land first. (tilestored declares a memory
// clobber already.)
SK_AMX_FN void amx_operands_ready() { __asm__ volatile("" ::: "memory"); }
#endif  // SK_SIMD_X86

}  // namespace simd
}  // namespace seqkernels
