// Fused LSTM cell kernels (torch-free): the pointwise part of torch.nn.LSTMCell, forward and
// backward. The launcher (lstm_cell.cu) validates, fills the param structs and picks the
// instantiation; the GEMMs stay in cuBLAS (the Python layer calls torch.mm).
//
// Layout (docs/INTERNALS.md): input_gates, hidden_gates (B, 4H) with gate blocks i, f, g, o of
// width H; cx, cy, hy (B, H); workspace (B, 4H) = the activated gates. Every tensor has a unit
// stride on its last dim and any row stride (in elements).
//
// Work split: one thread owns VEC consecutive hidden units j..j+VEC-1 of one row and all four
// gates of them. With VEC * sizeof(T) == 16 every load and store is one 128-bit access
// (ld.global.v4), four independent gate loads per operand are in flight per thread, and the
// kernel is a pure stream over memory; VEC == 1 is the fallback for unaligned shapes.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../common/macros.h"
#include "elem.cuh"

#if !defined(SEQKERNELS_CUDA_EMULATION)
#include <cuda_runtime.h>
#endif

namespace seqkernels {
namespace lstm_cuda {

#include "../common/lstm_gates.h"

struct FwdParams {
  const void* input_gates;
  const void* hidden_gates;
  const void* cx;
  const void* bias_ih;  // nullptr when absent
  const void* bias_hh;
  void* hy;
  void* cy;
  void* workspace;
  int64_t rows;  // B
  int64_t H;
  int64_t input_gates_rs, hidden_gates_rs, cx_rs;  // row strides (elements)
};

struct BwdParams {
  const void* grad_hy;  // nullptr when absent (reads as zero)
  const void* grad_cy;
  const void* cx;
  const void* cy;
  const void* workspace;
  void* grad_gates;
  void* grad_cx;
  int64_t rows;
  int64_t H;
  int64_t grad_hy_rs, grad_cy_rs, cx_rs, cy_rs, workspace_rs;
};

// Storage type -> compute type (acc_t: double for double, float otherwise), and the
// conversions: elem.cuh.
using elem::acc_t;
using elem::from_acc;
using elem::to_acc;

struct DeviceMath {
  // exp of -x overflows to inf for very negative x, giving sigmoid 0 exactly as it should.
  // Full-precision expf, not __expf: the approximate one (ex2.approx) put float32 outputs at
  // 2.9x torch's error on an H100, outside the §5 bound, and this memory-bound kernel does not
  // notice the few extra instructions.
  static SK_DEVICE SK_INLINE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
  static SK_DEVICE SK_INLINE float tanh(float x) { return tanhf(x); }
  static SK_DEVICE SK_INLINE double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
  static SK_DEVICE SK_INLINE double tanh(double x) { return ::tanh(x); }
};

// VEC elements of T as one aligned access of VEC * sizeof(T) bytes: a 16-byte vector moves as
// uint4 (ld/st.global.v4; building the value in registers first keeps nvcc from splitting the
// store), anything narrower element by element.
template <typename T, int VEC>
SK_DEVICE SK_INLINE void load(const T* p, acc_t<T> (&out)[VEC]) {
  if constexpr (sizeof(T) * VEC == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[VEC];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_acc(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_acc(p[k]);
  }
}

// Row b, columns j.. of an optional operand: an absent one (nullptr) reads as zeros.
template <typename T, int VEC>
SK_DEVICE SK_INLINE void load_or_zero(const T* base, int64_t row_stride, int64_t b, int64_t j, acc_t<T> (&out)[VEC]) {
  if (base != nullptr) {
    load<T, VEC>(base + b * row_stride + j, out);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = acc_t<T>(0);
  }
}

// The w-th 32-bit word of the 16 bytes e[0..VEC), assembled with shifts so the four words stay
// in registers. The store goes through __stcg (st.global.cg.v4): a plain uint4 assignment gets
// split into four 32-bit stores by nvcc here; cache-global also suits data read by the next
// kernel (the recurrent GEMM, the backward) rather than by this one.
template <typename T>
SK_DEVICE SK_INLINE uint32_t word_of(const T* e, int w) {
  if constexpr (sizeof(T) == 4) {
    uint32_t u;
    memcpy(&u, &e[w], 4);
    return u;
  } else if constexpr (sizeof(T) == 2) {
    uint16_t lo, hi;
    memcpy(&lo, &e[2 * w], 2);
    memcpy(&hi, &e[2 * w + 1], 2);
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  } else {
    uint64_t u;
    memcpy(&u, &e[w / 2], 8);
    return static_cast<uint32_t>(w % 2 == 0 ? u : u >> 32);
  }
}

template <typename T, int VEC>
SK_DEVICE SK_INLINE void store(T* p, const acc_t<T> (&in)[VEC]) {
  T e[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) e[k] = from_acc<T>(in[k]);
  if constexpr (sizeof(T) * VEC == 16) {
    __stcg(reinterpret_cast<uint4*>(p), make_uint4(word_of(e, 0), word_of(e, 1), word_of(e, 2), word_of(e, 3)));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = e[k];
  }
}

// The four gate blocks i, f, g, o (H apart) of a (B, 4H) tensor, from `row` (row b, column j).
template <typename T, int VEC>
SK_DEVICE SK_INLINE void load_gates(const T* row, int64_t H, acc_t<T> (&i)[VEC], acc_t<T> (&f)[VEC], acc_t<T> (&g)[VEC],
                                    acc_t<T> (&o)[VEC]) {
  load<T, VEC>(row, i);
  load<T, VEC>(row + H, f);
  load<T, VEC>(row + 2 * H, g);
  load<T, VEC>(row + 3 * H, o);
}
template <typename T, int VEC>
SK_DEVICE SK_INLINE void store_gates(T* row, int64_t H, const acc_t<T> (&i)[VEC], const acc_t<T> (&f)[VEC],
                                     const acc_t<T> (&g)[VEC], const acc_t<T> (&o)[VEC]) {
  store<T, VEC>(row, i);
  store<T, VEC>(row + H, f);
  store<T, VEC>(row + 2 * H, g);
  store<T, VEC>(row + 3 * H, o);
}

// Grid: ceil(rows * H / VEC / blockDim.x) blocks, one (row, VEC-column group) per thread:
// this thread's row b and first hidden unit j, false for the threads past the end.
template <int VEC>
SK_DEVICE SK_INLINE bool thread_item(int64_t rows, int64_t H, int64_t& b, int64_t& j) {
  const int64_t groups = H / VEC;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= rows * groups) return false;
  b = item / groups;
  j = (item - b * groups) * VEC;
  return true;
}

template <typename T, int VEC>
__global__ void lstm_cell_fwd_kernel(FwdParams p) {
  using A = acc_t<T>;
  int64_t b, j;
  if (!thread_item<VEC>(p.rows, p.H, b, j)) return;
  const int64_t H = p.H;
  const T* ig = static_cast<const T*>(p.input_gates) + b * p.input_gates_rs + j;
  const T* hg = static_cast<const T*>(p.hidden_gates) + b * p.hidden_gates_rs + j;
  const T* bih = static_cast<const T*>(p.bias_ih);
  const T* bhh = static_cast<const T*>(p.bias_hh);

  A pre[4][VEC], tmp[VEC];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    load<T, VEC>(ig + g * H, pre[g]);
    load<T, VEC>(hg + g * H, tmp);
#pragma unroll
    for (int k = 0; k < VEC; ++k) pre[g][k] += tmp[k];
    if (bih != nullptr) {
      load<T, VEC>(bih + g * H + j, tmp);
#pragma unroll
      for (int k = 0; k < VEC; ++k) pre[g][k] += tmp[k];
    }
    if (bhh != nullptr) {
      load<T, VEC>(bhh + g * H + j, tmp);
#pragma unroll
      for (int k = 0; k < VEC; ++k) pre[g][k] += tmp[k];
    }
  }
  A c[VEC];
  load<T, VEC>(static_cast<const T*>(p.cx) + b * p.cx_rs + j, c);

  A gi[VEC], gf[VEC], gg[VEC], go[VEC], cy[VEC], hy[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    cell_forward<DeviceMath>(pre[0][k], pre[1][k], pre[2][k], pre[3][k], c[k], gi[k], gf[k], gg[k], go[k], cy[k],
                             hy[k]);
  }
  store_gates<T, VEC>(static_cast<T*>(p.workspace) + b * 4 * H + j, H, gi, gf, gg, go);
  store<T, VEC>(static_cast<T*>(p.cy) + b * H + j, cy);
  store<T, VEC>(static_cast<T*>(p.hy) + b * H + j, hy);
}

template <typename T, int VEC>
__global__ void lstm_cell_bwd_kernel(BwdParams p) {
  using A = acc_t<T>;
  int64_t b, j;
  if (!thread_item<VEC>(p.rows, p.H, b, j)) return;
  const int64_t H = p.H;

  A dh[VEC], dcy[VEC], c[VEC], cyv[VEC], gi[VEC], gf[VEC], gg[VEC], go[VEC];
  load_or_zero<T, VEC>(static_cast<const T*>(p.grad_hy), p.grad_hy_rs, b, j, dh);
  load_or_zero<T, VEC>(static_cast<const T*>(p.grad_cy), p.grad_cy_rs, b, j, dcy);
  load<T, VEC>(static_cast<const T*>(p.cx) + b * p.cx_rs + j, c);
  load<T, VEC>(static_cast<const T*>(p.cy) + b * p.cy_rs + j, cyv);
  load_gates<T, VEC>(static_cast<const T*>(p.workspace) + b * p.workspace_rs + j, H, gi, gf, gg, go);

  A di[VEC], df[VEC], dg[VEC], d_o[VEC], dcx[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    cell_backward<DeviceMath>(dh[k], dcy[k], c[k], cyv[k], gi[k], gf[k], gg[k], go[k], di[k], df[k], dg[k], d_o[k],
                              dcx[k]);
  }
  store_gates<T, VEC>(static_cast<T*>(p.grad_gates) + b * 4 * H + j, H, di, df, dg, d_o);
  store<T, VEC>(static_cast<T*>(p.grad_cx) + b * H + j, dcx);
}

}  // namespace lstm_cuda
}  // namespace seqkernels
