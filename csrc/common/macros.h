// Portability macros shared by the CPU and CUDA sources (torch-free).
#pragma once

#if defined(__CUDACC__) || defined(SEQKERNELS_CUDA_EMULATION)
#define SK_HOST_DEVICE __host__ __device__
#define SK_DEVICE __device__
#define SK_INLINE __forceinline__
#else
#define SK_HOST_DEVICE
#define SK_DEVICE
#define SK_INLINE inline
#endif
