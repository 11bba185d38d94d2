// Warp-level tensor-core primitives used by the attention kernels (torch-free).
//
// Under nvcc these are single PTX instructions (mma.sync m16n8k16 with f32 accumulators,
// ldmatrix, cp.async). Under the CUDA-on-CPU harness (SEQKERNELS_CUDA_EMULATION) they call the
// shim's warp-collective emulation (tests/emulation/cuda_shim.h), which follows the fragment
// layouts documented in the PTX ISA, so a kernel's fragment indexing is executed for real.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", lane = threadIdx.x % 32,
// group = lane / 4, tig = lane % 4):
//   A (16x16, row-major), 4 x b32 = 8 halves:  a[0]: (group,      2*tig + {0,1})
//                                               a[1]: (group + 8,  2*tig + {0,1})
//                                               a[2]: (group,      2*tig + 8 + {0,1})
//                                               a[3]: (group + 8,  2*tig + 8 + {0,1})
//   B (16x8, "col": element (k, n)), 2 x b32:   b[0]: (k = 2*tig + {0,1},     n = group)
//                                               b[1]: (k = 2*tig + 8 + {0,1}, n = group)
//   C/D (16x8, f32), 4 floats:                  c[0..1]: (group,     2*tig + {0,1})
//                                               c[2..3]: (group + 8, 2*tig + {0,1})
// ldmatrix .x1/.x2/.x4 loads 1/2/4 8x8 b16 matrices; lanes 8*m .. 8*m+7 give the row
// addresses of matrix m; lane l receives in r[m] the pair (row l/4, cols 2*(l%4) + {0,1}) of
// matrix m (with .trans: of its transpose).
#pragma once

#include <stdint.h>

#include <type_traits>

#include "../common/macros.h"

#if !defined(SEQKERNELS_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace seqkernels {
namespace mma {

// The tags name the instruction's input type; `elem` is the element type of that format.
struct f16 {
  using elem = __half;
};
struct bf16 {
  using elem = __nv_bfloat16;
};

// The mma tag of an element type: mma_tag_t<__half> is f16, mma_tag_t<__nv_bfloat16> is bf16.
template <typename T>
struct mma_tag;
template <>
struct mma_tag<__half> {
  using type = f16;
};
template <>
struct mma_tag<__nv_bfloat16> {
  using type = bf16;
};
template <typename T>
using mma_tag_t = typename mma_tag<T>::type;

#if defined(SEQKERNELS_CUDA_EMULATION)

// The trailing source-location argument (defaulted, emulation only) makes the emulator's
// messages name the kernel line that called the primitive.
template <typename T>
SK_DEVICE SK_INLINE void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                                      const ::sk_emu::Loc& loc = ::sk_emu::Loc::current()) {
  ::sk_emu::mma_m16n8k16(::sk_emu::is_bf16<T>::value, d, a, b, c, loc);
}
template <int N, bool Trans = false>
SK_DEVICE SK_INLINE void ldmatrix(uint32_t r[N], const void* smem_row,
                                  const ::sk_emu::Loc& loc = ::sk_emu::Loc::current()) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  ::sk_emu::ldmatrix(N, Trans, r, smem_row, loc);
}
SK_DEVICE SK_INLINE void cp_async_16(void* smem, const void* gmem, bool pred,
                                     const ::sk_emu::Loc& loc = ::sk_emu::Loc::current()) {
  ::sk_emu::cp_async_16(smem, gmem, pred, loc);
}
SK_DEVICE SK_INLINE void cp_async_commit() {}
template <int N>
SK_DEVICE SK_INLINE void cp_async_wait() {}

#else

// The two input formats differ only in the instruction's type suffix, which asm needs as a
// string literal: one macro spells the operand list once.
#define SK_MMA_M16N8K16(ab)                                                                                         \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ab "." ab                                                   \
               ".f32 {%0,%1,%2,%3}, "                                                                               \
               "{%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"                                                       \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                                     \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), \
                 "f"(c[3]))

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  if constexpr (std::is_same_v<T, bf16>) {
    SK_MMA_M16N8K16("bf16");
  } else {
    static_assert(std::is_same_v<T, f16>, "mma_m16n8k16 takes mma::f16 or mma::bf16");
    SK_MMA_M16N8K16("f16");
  }
}

#undef SK_MMA_M16N8K16

template <int N, bool Trans = false>
__device__ __forceinline__ void ldmatrix(uint32_t r[N], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  if constexpr (N == 1 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (N == 1 && Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (N == 2 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  } else if constexpr (N == 2 && Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  } else if constexpr (N == 4 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    static_assert(N == 4 && Trans, "ldmatrix loads 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

// 16-byte global->shared copy; when pred is false the destination is zero-filled (src-size 0),
// which is how out-of-range rows of a tile become zeros without a branch.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#endif

}  // namespace mma
}  // namespace seqkernels
