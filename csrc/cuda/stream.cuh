// Host-side CUDA context for the torch-facing launchers (csrc/cuda/<op>.cu): current stream,
// device guard, the device check on input tensors and the device properties a launcher uses
// to pick a configuration. Under nvcc these wrap ATen's CUDA context; under the CUDA-on-CPU
// harness (SEQKERNELS_CUDA_EMULATION) "device" tensors are CPU tensors, the stream is a dummy
// and the properties are those of the emulated arch (SEQKERNELS_EMU_ARCH, default 80), so a
// launcher runs unchanged in both.
#pragma once

#include <ATen/core/Tensor.h>

#if defined(SEQKERNELS_CUDA_EMULATION)
#include <stdint.h>
#else
// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a bare CUDA
// toolkit (as in CI) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace seqkernels {
namespace cudart {

// The element type a kernel sees for a tensor's scalar type (at::Half -> __half, ...), so
// launchers can `reinterpret_cast<const device_type_t<scalar_t>*>(t.data_ptr())` inside an
// AT_DISPATCH block.
template <typename T>
struct device_type {
  using type = T;
};
template <>
struct device_type<at::Half> {
  using type = __half;
};
template <>
struct device_type<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using device_type_t = typename device_type<T>::type;

#if defined(SEQKERNELS_CUDA_EMULATION)

inline cudaStream_t current_stream() { return nullptr; }

class DeviceGuard {
 public:
  explicit DeviceGuard(const at::Tensor&) {}
};

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
inline const char* kernel_device_name() { return "CPU (CUDA emulation)"; }
// Compute capability as major * 10 + minor (80 for A100, 90 for H100).
inline int compute_capability() { return ::sk_emu::arch(); }
inline int multiprocessor_count() { return ::sk_emu::multiprocessor_count(); }
// Largest dynamic shared memory per block after SK_SET_MAX_DYNAMIC_SMEM (the opt-in maximum).
inline size_t max_dynamic_smem() { return ::sk_emu::max_dynamic_smem_optin(); }

#else

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

class DeviceGuard {
 public:
  explicit DeviceGuard(const at::Tensor& t) : guard_(t.device()) {}

 private:
  c10::cuda::CUDAGuard guard_;
};

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
inline const char* kernel_device_name() { return "CUDA"; }
inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}
inline int compute_capability() {
  return device_attribute(cudaDevAttrComputeCapabilityMajor) * 10 + device_attribute(cudaDevAttrComputeCapabilityMinor);
}
inline int multiprocessor_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }
inline size_t max_dynamic_smem() {
  return static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

#endif

}  // namespace cudart
}  // namespace seqkernels

// TORCH_CHECK that a tensor argument lives where the kernels run (CUDA; CPU under emulation).
#define SK_CHECK_DEVICE(t)                                                           \
  TORCH_CHECK(::seqkernels::cudart::on_kernel_device(t), #t " must be a tensor on ", \
              ::seqkernels::cudart::kernel_device_name(), ", got one on ", (t).device())
