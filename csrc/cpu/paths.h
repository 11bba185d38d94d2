// The instruction-set path each CPU kernel family takes now, per input dtype: one function per
// family, defined beside that family's dispatch and used by it, so what `seqkernels info` prints
// (seqkernels_cpu_isa_report in kv_cache.cpp) is the rule the kernels follow, not a copy of it.
// Each is simd::active_isa() capped at the highest path the family has for that dtype. Included
// only by the ATen-using drivers (it names c10's dtypes); the kernel code stays torch-free.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <type_traits>

#include "cpu/simd.h"

namespace seqkernels {
namespace cpu_paths {

enum class Dt { Float32, Float64, BFloat16, Float16 };

// The kernels' dtypes (anything else is refused before a kernel is chosen: float32 stands in).
inline Dt dt_of(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Double:
      return Dt::Float64;
    case c10::ScalarType::BFloat16:
      return Dt::BFloat16;
    case c10::ScalarType::Half:
      return Dt::Float16;
    default:
      return Dt::Float32;
  }
}
template <typename S>
constexpr Dt dt_of() {
  return std::is_same_v<S, double>          ? Dt::Float64
         : std::is_same_v<S, c10::BFloat16> ? Dt::BFloat16
         : std::is_same_v<S, c10::Half>     ? Dt::Float16
                                            : Dt::Float32;
}

simd::Isa attention_fwd(Dt dt);
simd::Isa attention_bwd(Dt dt);
simd::Isa decode_attention(Dt dt);
simd::Isa lstm(Dt dt);

// Whether the float kernels apply the softmax scale to the scores after Q K^T rather than to Q as
// they pack it (attention.cpp: where |q| |scale| would overflow). The attention forward, backward
// and decode ask it alike.
bool scale_after_products(const at::Tensor& q, double scale);

}  // namespace cpu_paths
}  // namespace seqkernels
