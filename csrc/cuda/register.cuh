// How a csrc/cuda/<op>.cu launcher registers its op, one line per op after the launcher:
//
//     SK_REGISTER_CUDA(kv_cache_append, seqkernels::kv_cache_append_cuda);
//
// Under nvcc this is TORCH_LIBRARY_IMPL(seqkernels, CUDA, m) { m.impl("kv_cache_append", ...) },
// i.e. the CUDA kernel of the op declared in csrc/registration.cpp. Under the CUDA-on-CPU
// harness (SEQKERNELS_CUDA_EMULATION) the same launcher is registered for CPU tensors in the
// harness's own namespace SK_EMU_NAMESPACE (set by tests/emulation/build.py, which also defines
// the schemas there from csrc/registration.cpp), so the emulated op never shadows the real
// `seqkernels::` ops and several emulated extensions can be loaded into one process.
// `fn` must be a plain (non-template, non-overloaded) function whose signature matches the
// schema; the dispatcher checks that at load time, so a mismatch fails the emulation tests.
#pragma once

#include <torch/library.h>

#if defined(SEQKERNELS_CUDA_EMULATION)
#if !defined(SK_EMU_NAMESPACE)
#error "SK_EMU_NAMESPACE is set by tests/emulation/build.py; build emulated kernels through it"
#endif
#define SK_REGISTER_CUDA(op_name, fn) \
  TORCH_LIBRARY_IMPL(SK_EMU_NAMESPACE, CPU, m) { m.impl(#op_name, TORCH_FN(fn)); }
#else
#define SK_REGISTER_CUDA(op_name, fn) \
  TORCH_LIBRARY_IMPL(seqkernels, CUDA, m) { m.impl(#op_name, TORCH_FN(fn)); }
#endif
