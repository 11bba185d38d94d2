// Arguments of the CUDA attention kernels, filled by the launcher (attention.cu) from the
// normalized op arguments (docs/INTERNALS.md). Torch-free so the kernels compile under nvcc and
// under the CUDA-on-CPU harness alike. Strides are in elements; the last dimension of q, k, v,
// out, grad_out is contiguous and every row starts on a 16-byte boundary (the launcher copies
// when that does not hold), because tiles move through cp.async in 16-byte chunks.
#pragma once

#include <stdint.h>

#include "../common/macros.h"

namespace seqkernels {
namespace attn {

// A (B, H, L, D) tensor of 16-bit elements (moved as raw bits) with a contiguous last dim:
// its base and the element strides of the other three dims. One type for every tensor of the
// kernels, so that each row address is computed one way.
template <typename E>
struct Rows {
  E* ptr;
  int64_t batch_stride, head_stride, row_stride;
  // The first element of row i of (b, h).
  SK_HOST_DEVICE SK_INLINE E* at(int b, int h, int i) const {
    return ptr + b * batch_stride + h * head_stride + static_cast<int64_t>(i) * row_stride;
  }
};
using InRows = Rows<const uint16_t>;
using OutRows = Rows<uint16_t>;

// Additive float32 mask, expanded (B, Hq, Lq, Lk) view with stride 0 on broadcast dims
// (the launcher turns bool masks into 0 / -inf and 16-bit ones into float32); ptr nullptr
// when there is none.
struct MaskView {
  const float* ptr;
  int64_t batch_stride, head_stride, row_stride, col_stride;
  // Offset of row i of (b, h); add j * col_stride for column j.
  SK_HOST_DEVICE SK_INLINE int64_t row(int b, int h, int i) const {
    return static_cast<int64_t>(b) * batch_stride + static_cast<int64_t>(h) * head_stride +
           static_cast<int64_t>(i) * row_stride;
  }
};

struct AttentionParams {
  // q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), out (B, Hq, Lq, Dv).
  InRows q, k, v;
  OutRows out;
  float* lse;  // (B, Hq, Lq), contiguous

  MaskView mask;

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

  // Score modifiers (common/attention_math.h ScoreMods); the kernels compiled with kMods read
  // them, the others never look (the launcher picks the variant from mods_any()).
  float softcap;       // > 0: s <- softcap * tanh(s / softcap); 0: off
  const float* alibi;  // (B, Hq) slopes, or nullptr
  const float* sinks;  // (Hq,) sink logits, or nullptr
  SK_HOST_DEVICE SK_INLINE bool mods_any() const { return softcap > 0.f || alibi != nullptr || sinks != nullptr; }

  // Packed sequences (attention_varlen, docs/INTERNALS.md): cu_q / cu_k are cu_seqlens_q/k
  // (num_seqs + 1,), nullptr for the padded form. Packed, batch is 1 (the memory batch of the
  // (1, H, total, D) views), len_q / len_k are the totals and sequence b is
  // seq_span(cu_q, cu_k, b, len_q, len_k) (common/attention_math.h); alibi is (num_seqs, Hq).
  const int32_t* cu_q;
  const int32_t* cu_k;
  int num_seqs;
  // The schedule of the packed launch in flight (set per launch, for its own tile size):
  // tile_offsets[b] = tiles of sequences < b, (num_seqs + 1,); the grid is tile_bound x heads,
  // tile_bound >= tile_offsets[num_seqs] (ceil(total / tile) + num_seqs). Unused when padded.
  const int32_t* tile_offsets;
  int tile_bound;
  // The dropout index n = ((b * Hq + h) * drop_len_q + drop_row0 + i) * drop_len_k + drop_col0 + j
  // (host::check_dropout_grid): dims len_q and len_k padded, max_seqlen_q and max_seqlen_k packed,
  // or the caller's dropout_grid, where the call's block starts at (drop_row0, drop_col0).
  int64_t drop_len_q, drop_len_k, drop_row0, drop_col0;
  SK_HOST_DEVICE SK_INLINE bool packed() const { return cu_q != nullptr; }
};

struct AttentionBwdParams : AttentionParams {
  // grad_out (B, Hq, Lq, Dv); grad_q/k/v contiguous like q, k, v. `out` is an input here.
  InRows dout;
  OutRows dq, dk, dv;
  float* delta;  // (B, Hq, Lq) rowsum(dO * O), written by the preprocess kernel
  // (B, Hq, Lq) each, written by the preprocess kernel: P = exp2((s - row_shift) log2 e - row_log2l).
  // row_shift = lse (+inf for rows that see nothing) and row_log2l = 0 for ordinary rows; for rows
  // whose lse is too large to keep log(l) (kLseRecomputeAbove), the exact max and log2(l).
  float* row_shift;
  float* row_log2l;
  float* dq_accum;          // (B, Hq, Lq, head_dim_padded) float32 for the atomic dQ path, else nullptr
  int dq_accum_row_stride;  // padded head dim of dq_accum
  // (B, Hq, Lq) float32, -p_sink * delta per row (written by the preprocess kernel when sinks is
  // given, else nullptr); the launcher sums it over (B, Lq) into grad_sinks, deterministically.
  float* dsink_rows;
};

}  // namespace attn
}  // namespace seqkernels
