// Host-side helpers of the torch-facing launchers (csrc/cuda/*.cu) for filling the kernels'
// torch-free param structs from tensors: strides and addresses read one way everywhere.
#pragma once

#include <ATen/core/Tensor.h>

#include <stdint.h>

namespace seqkernels {
namespace cudart {

// Stride of dim d, 0 for a dim of size <= 1: such a stride is never multiplied by a nonzero
// index, and reporting it as 0 lets alignment checks ignore whatever torch put there.
inline int64_t stride_of(const at::Tensor& t, int d) { return t.size(d) <= 1 ? 0 : t.stride(d); }

// The data pointer as an integer, for alignment tests.
inline int64_t address(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); }

// dst[i] = t.stride(i) * scale for the first N dims (scale 1: elements; the element size: bytes).
template <int N>
inline void copy_strides(int64_t (&dst)[N], const at::Tensor& t, int64_t scale = 1) {
  for (int i = 0; i < N; ++i) dst[i] = t.stride(i) * scale;
}

}  // namespace cudart
}  // namespace seqkernels
