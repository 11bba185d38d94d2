// Element conversions of the CUDA kernels (torch-free): the one place that knows how a stored
// element (float, double, __half, __nv_bfloat16) becomes its compute type and back, and how
// 16-bit elements travel as raw bits through the tensor-core tiles.
//
//   acc_t<T>         float, or double for double (the type a kernel computes in)
//   to_acc(x)        stored element -> acc_t<T>
//   from_acc<T>(a)   acc_t<T> -> stored element, round to nearest even
//   Elem<T>::from_bits(u)     16-bit types: raw bits -> float
//   Elem<T>::pack2(lo, hi)    16-bit types: two floats -> one 32-bit word (lo in the low half),
//                             the layout of an mma A fragment register
//
// Explicit intrinsics only: torch compiles CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and
// friends (docs/EMULATION.md), so there are no implicit conversions to lean on.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../common/macros.h"

#if !defined(SEQKERNELS_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace seqkernels {
namespace elem {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using acc = float;
  static SK_DEVICE SK_INLINE float to_acc(float x) { return x; }
  static SK_DEVICE SK_INLINE float from_acc(float x) { return x; }
};

template <>
struct Elem<double> {
  using acc = double;
  static SK_DEVICE SK_INLINE double to_acc(double x) { return x; }
  static SK_DEVICE SK_INLINE double from_acc(double x) { return x; }
};

template <>
struct Elem<__half> {
  using acc = float;
  static SK_DEVICE SK_INLINE float to_acc(__half x) { return __half2float(x); }
  static SK_DEVICE SK_INLINE __half from_acc(float x) { return __float2half_rn(x); }
  static SK_DEVICE SK_INLINE float from_bits(uint16_t u) { return __half2float(__ushort_as_half(u)); }
  // The paired intrinsic is one cvt.rn.f16x2.f32 on sm_80+ (two scalar conversions and a
  // byte permute otherwise).
  static SK_DEVICE SK_INLINE uint32_t pack2(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
  }
};

template <>
struct Elem<__nv_bfloat16> {
  using acc = float;
  static SK_DEVICE SK_INLINE float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static SK_DEVICE SK_INLINE __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
  static SK_DEVICE SK_INLINE float from_bits(uint16_t u) { return __bfloat162float(__ushort_as_bfloat16(u)); }
  static SK_DEVICE SK_INLINE uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
  }
};

template <typename T>
using acc_t = typename Elem<T>::acc;

template <typename T>
SK_DEVICE SK_INLINE acc_t<T> to_acc(T x) {
  return Elem<T>::to_acc(x);
}

template <typename T>
SK_DEVICE SK_INLINE T from_acc(acc_t<T> x) {
  return Elem<T>::from_acc(x);
}

}  // namespace elem
}  // namespace seqkernels
