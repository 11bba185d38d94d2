// Arguments of the CUDA attention kernels, filled by the launcher (attention.cu) from the
// normalized op arguments (docs/INTERNALS.md). Torch-free so the kernels compile under nvcc and
// under the CUDA-on-CPU harness alike. Strides are in elements; the last dimension of q, k, v,
// out, grad_out is contiguous and every row starts on a 16-byte boundary (the launcher copies
// when that does not hold), because tiles move through cp.async in 16-byte chunks.
#pragma once

#include <stdint.h>

namespace seqkernels {
namespace attn {

struct AttentionParams {
  // q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), out (B, Hq, Lq, Dv).
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (B, Hq, Lq), contiguous
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;

  // Additive float32 mask, expanded (B, Hq, Lq, Lk) view with stride 0 on broadcast dims
  // (the launcher turns bool masks into 0 / -inf and 16-bit ones into float32), or nullptr.
  const float* mask;
  int64_t mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;

  const int32_t* kv_lengths;  // (B,) or nullptr

  int batch, heads_q, heads_kv, len_q, len_k;
  int head_dim, head_dim_v;  // actual D and Dv; multiples of 8, at most the kernel's tile width

  float scale;  // on the raw q.k products (the softmax stays in the natural-log domain)

  int window_left, window_right;  // -1: unbounded
  bool bottom_right;

  // Dropout on the normalized probabilities; keep iff philox word >= threshold.
  bool dropout;
  uint64_t dropout_threshold;
  float dropout_rescale;  // 1 / (1 - p), unused when everything is dropped
  uint64_t seed, offset;
};

struct AttentionBwdParams : AttentionParams {
  // grad_out (B, Hq, Lq, Dv); grad_q/k/v contiguous like q, k, v.
  const void* dout;
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  float* delta;     // (B, Hq, Lq) rowsum(dO * O), written by the preprocess kernel
  // (B, Hq, Lq) each, written by the preprocess kernel: P = exp2((s - row_shift) log2 e - row_log2l).
  // row_shift = lse (+inf for rows that see nothing) and row_log2l = 0 for ordinary rows; for rows
  // whose lse is too large to keep log(l) (kLseRecomputeAbove), the exact max and log2(l).
  float* row_shift;
  float* row_log2l;
  float* dq_accum;  // (B, Hq, Lq, head_dim_padded) float32 for the atomic dQ path, else nullptr
  int dq_accum_row_stride;  // padded head dim of dq_accum
};

}  // namespace attn
}  // namespace seqkernels
