// Test-only kernels compiled into the sanitized CPU build (emulation.build.build_cpu, from
// tests/test_cpu_sanitizers.py), to prove that the harness reports the kind of bug it looks for
// in csrc/cpu: a SIMD-width load at the tail of a row that reads past the end of the buffer even
// though the lanes past the end are thrown away, and undefined behaviour that UBSan must stop.
//
// Registered like the real kernels, with TORCH_LIBRARY_IMPL(seqkernels, CPU, m): the build's
// -Dseqkernels=<namespace> moves it into the sanitized library's namespace with them.
//
//   cpu_sanitize_selftest(x, 0): sum of a float32 tensor, 8-lane loads and a partial tail (clean)
//   cpu_sanitize_selftest(x, 1): the same with a full 8-lane load at the tail whose lanes past
//                                the end are discarded: a heap-buffer-overflow READ
//   cpu_sanitize_selftest(x, 2): a signed 32-bit overflow on the element count (UBSan)

#include <ATen/ATen.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <cstring>

namespace seqkernels {
namespace {

// Eight floats, loaded and stored as one 32-byte access (what _mm256_loadu_ps does), at the
// baseline ISA.
typedef float v8f __attribute__((vector_size(32), aligned(4)));

float sum_floats(const float* p, int64_t n, bool overread) {
  v8f acc = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += *reinterpret_cast<const v8f*>(p + i);
  float tail = 0;
  if (i < n) {
    v8f t;
    if (overread) {
      // BUG (planted): reads 8 lanes although only n - i remain; the extra lanes are dropped
      // below, so the result is right and only a sanitizer can tell.
      t = *reinterpret_cast<const v8f*>(p + i);
    } else {
      float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(buf, p + i, sizeof(float) * static_cast<size_t>(n - i));
      std::memcpy(&t, buf, sizeof(t));
    }
    for (int64_t k = 0; k < n - i; ++k) tail += t[k];
  }
  float s = tail;
  for (int k = 0; k < 8; ++k) s += acc[k];
  return s;
}

at::Tensor cpu_sanitize_selftest(const at::Tensor& x, int64_t which) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "cpu_sanitize_selftest: contiguous float32");
  const int64_t n = x.numel();
  if (which == 2) {
    volatile int32_t big = INT32_MAX;
    const int32_t count = big + static_cast<int32_t>(n);  // BUG (planted): signed overflow for n >= 1
    return at::full({1}, static_cast<float>(count), x.options());
  }
  return at::full({1}, sum_floats(x.const_data_ptr<float>(), n, which == 1), x.options());
}

}  // namespace
}  // namespace seqkernels

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) { m.impl("cpu_sanitize_selftest", &seqkernels::cpu_sanitize_selftest); }
