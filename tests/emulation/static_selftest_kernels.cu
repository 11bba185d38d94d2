// Torch-free kernels for testing the static GPU-code report itself
// (python/seqkernels/kernel_report.py, tests/test_static_cuda.py): one that must use tensor
// cores, one plain kernel, one that must need local memory (a dynamically indexed
// per-thread array) and one that must spill registers, so the report's parsing of registers, spills, stack and HMMA is
// checked on kernels with known answers. Never compiled into the extension.
#include <stdint.h>

#include "cuda/mma.cuh"

namespace seqkernels {
namespace static_selftest {

__global__ void _selftest_mma_kernel(const uint32_t* a, const uint32_t* b, float* d) {
  const int lane = threadIdx.x;
  uint32_t af[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  uint32_t bf[2] = {b[2 * lane], b[2 * lane + 1]};
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma::mma_m16n8k16<mma::f16>(acc, af, bf, acc);
  mma::mma_m16n8k16<mma::bf16>(acc, af, bf, acc);
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = acc[i];
}

__global__ void _selftest_plain_kernel(const float* x, float* y, int n) {
  __shared__ float buf[128];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  buf[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  if (i < n) y[i] = buf[threadIdx.x] + buf[(threadIdx.x + 1) % blockDim.x];
}

__global__ void _selftest_local_memory_kernel(const int* idx, float* y) {
  float scratch[256];
  for (int k = 0; k < 256; ++k) scratch[k] = static_cast<float>(k * threadIdx.x);
  y[threadIdx.x] = scratch[idx[threadIdx.x] & 255];
}

// 48 values live across a loop with at most 32 registers per thread (1024 threads, 2 blocks per
// SM): ptxas has to spill.
__global__ void __launch_bounds__(1024, 2) _selftest_spill_kernel(const float* x, float* y, int steps) {
  float v[48];
#pragma unroll
  for (int k = 0; k < 48; ++k) v[k] = x[threadIdx.x + 1024 * k];
  for (int s = 0; s < steps; ++s) {
#pragma unroll
    for (int k = 0; k < 48; ++k) v[k] = v[k] * v[(k + 7) % 48] + v[(k + 13) % 48];
  }
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < 48; ++k) acc += v[k];
  y[threadIdx.x] = acc;
}

}  // namespace static_selftest
}  // namespace seqkernels
