// One launch macro for every kernel of the extension, so the CUDA-on-CPU harness
// (tests/emulation) can run the same launcher code on the host: under nvcc it is a plain
// triple-chevron launch followed by an error check; under SEQKERNELS_CUDA_EMULATION the shim
// defines sk_emu_launch, which runs the grid block by block on host threads.
#pragma once

#include "../common/macros.h"

#if defined(SEQKERNELS_CUDA_EMULATION)
#define SK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::sk_emu::launch((kernel), dim3(grid), dim3(block), (smem_bytes), ##__VA_ARGS__)
#define SK_CHECK_LAUNCH() ((void)0)
#else
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#define SK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)            \
  do {                                                                    \
    (kernel)<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__);   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                       \
  } while (0)
#endif
