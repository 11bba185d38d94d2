// One launch macro for every kernel of the extension, so the CUDA-on-CPU harness
// (tests/emulation, docs/EMULATION.md) can run the same launcher code on the host: under nvcc
// it is a plain triple-chevron launch followed by an error check; under
// SEQKERNELS_CUDA_EMULATION the shim runs the grid block by block on host threads.
//
// `kernel` must be one macro argument: for a template instantiation take its address first
// (`auto kernel = &_attention_fwd_kernel<T, 64>; SK_LAUNCH(kernel, ...)`), since the comma
// inside `<...>` would split the macro arguments.
#pragma once

#include "../common/macros.h"

#if defined(SEQKERNELS_CUDA_EMULATION)
#define SK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                    \
  ::sk_emu::launch(#kernel, __FILE__, __LINE__, (kernel), dim3(grid), dim3(block), \
                   static_cast<size_t>(smem_bytes), ##__VA_ARGS__)
#define SK_CHECK_LAUNCH() ((void)0)
// Dynamic shared memory above 48 KiB needs this opt-in before the launch, as on the GPU; the
// emulator enforces it (and the per-arch maximum) so a forgotten opt-in fails in CI.
#define SK_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  ::sk_emu::set_max_dynamic_smem(#kernel, reinterpret_cast<const void*>(kernel), static_cast<size_t>(bytes))
#else
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#define SK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)         \
  do {                                                                  \
    (kernel)<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                     \
  } while (0)
#define SK_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  C10_CUDA_CHECK(cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)))
#endif
