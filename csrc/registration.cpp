// The one schema block of the extension. Every op of the C++ family is declared here; the
// CPU kernels register under these names in csrc/cpu/<op>.cpp and the CUDA kernels in
// csrc/cuda/<op>.cu. Fake (meta) kernels and autograd are registered in Python beside each
// op (python/seqkernels/ops/), so torch.compile and opcheck see every op.
//
// Arguments arrive normalized by the public layer (docs/INTERNALS.md): scale resolved,
// causal folded into the window, masks expanded to (B, Hq, Lq, Lk) with stride 0 on
// broadcast dims, lengths as int32. The score modifiers (docs/DESIGN.md §2) come last, with
// defaults that switch them off: alibi_slopes (B, Hq) and sinks (Hq,) contiguous in the
// accumulation type (float64 for float64 inputs, else float32), softcap 0 = off. grad_sinks is
// (Hq,) in that type when sinks are given, else an empty (0,) tensor.
//
// Packed sequences (seqkernels.attention_varlen, docs/INTERNALS.md "Packed sequences") are the
// last four arguments: with cu_seqlens_q/k (int32 (N+1,)) given, q, k, v are (1, H, total, D)
// views of the token-major packed tensors, sequence b is rows cu_seqlens_q[b]..cu_seqlens_q[b+1]
// against keys cu_seqlens_k[b]..cu_seqlens_k[b+1], alibi_slopes is (N, Hq), out is
// (1, Hq, total_q, Dv) with token-major storage and lse (1, Hq, total_q); max_seqlen_q/k are the
// dims of the dropout index (the padded form's Lq, Lk). attention_fwd's `deterministic` is not
// read by its kernels: the autograd layer records it for the backward (attention_varlen's
// `deterministic=`, FlashAttention's argument). `dropout_grid` ([] or [row0, col0, len_q, len_k],
// host::check_dropout_grid) places the call's keep mask at (row0, col0) of a larger grid: ring
// attention's blocks draw the mask of their global positions.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(seqkernels, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? kv_lengths, "
      "float scale, int window_left, int window_right, bool bottom_right, float dropout_p, "
      "int seed, int offset, Tensor? alibi_slopes=None, Tensor? sinks=None, float softcap=0., "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, "
      "bool deterministic=False, int[] dropout_grid=[]) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? attn_mask, Tensor? kv_lengths, float scale, int window_left, int window_right, "
      "bool bottom_right, float dropout_p, int seed, int offset, bool deterministic, "
      "Tensor? alibi_slopes=None, Tensor? sinks=None, float softcap=0., "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, "
      "int[] dropout_grid=[]) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_sinks)");
  // KV cache ops. Packed form (docs/INTERNALS.md "## KV cache"), B = cache_seqlens.numel():
  // with cu_seqlens (int32 (B+1,)), k_new/v_new are the (1, Hkv, total_new, D|Dv) views of the
  // token-major (total_new, Hkv, D|Dv) rows, and row cu_seqlens[b]+t goes to cache position
  // cache_seqlens[b]+t. With cu_seqlens_q (int32 (B+1,)), q is the (1, Hq, total_q, D) view of the
  // token-major (total_q, Hq, D) queries; sequence b's rows cu_seqlens_q[b]..cu_seqlens_q[b+1] are
  // its newest Tq_b tokens, at positions cache_seqlens[b] - Tq_b + t (causal bottom-right);
  // alibi_slopes is (B, Hq); out is (1, Hq, total_q, Dv) with token-major storage and lse
  // (1, Hq, total_q); max_seqlen_q >= every Tq_b (the public layer passes the longest). cu values
  // (start 0, non-decreasing, end at total, lengths <= max_seqlen_q) are checked on CPU tensors;
  // kernels clamp each span into [0, total] (seq_span), rows in no sequence get 0 / -inf.
  m.def(
      "kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, "
      "Tensor cache_seqlens, Tensor? block_table, Tensor? cu_seqlens=None) -> ()");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
      "Tensor? block_table, float scale, int window_left, int window_right, int num_splits, "
      "Tensor? alibi_slopes=None, Tensor? sinks=None, float softcap=0., "
      "Tensor? cu_seqlens_q=None, int max_seqlen_q=0) -> (Tensor out, Tensor lse)");
  m.def(
      "lstm_cell_fwd(Tensor input_gates, Tensor hidden_gates, Tensor cx, Tensor? bias_ih, "
      "Tensor? bias_hh) -> (Tensor hy, Tensor cy, Tensor workspace)");
  m.def(
      "lstm_cell_bwd(Tensor? grad_hy, Tensor? grad_cy, Tensor cx, Tensor cy, Tensor workspace) "
      "-> (Tensor grad_gates, Tensor grad_cx)");
  // Inference-only fast path of seqkernels.nn.LSTM on CPU tensors (no autograd formula): a whole
  // layer-direction over T steps, from the input projection (T, B, 4H) of every step.
  m.def(
      "lstm_layer_fwd(Tensor input_gates, Tensor h0, Tensor c0, Tensor weight_hh, Tensor? bias, "
      "bool reverse) -> (Tensor out, Tensor h_n, Tensor c_n)");
  // Overloads of the same op (CPU, float32; autograd in python/seqkernels/ops/lstm.py): .fused takes
  // the layer's input x (T, B, I) and weight_ih and projects it inside the kernel (without weight_ih,
  // input is the input gates (T, B, 4H), as above); with train it also
  // returns the activated gates (T, B, 4H) and the cell state after each step (T, B, H) (else both
  // empty); .backward runs the whole recurrence backward from those and returns the gates'
  // gradients of every step. .fused also takes bfloat16 where the AMX-BF16 tiles are usable
  // (with weight_ih; bf16 outputs, workspace and cs).
  m.def(
      "lstm_layer_fwd.fused(Tensor input, Tensor h0, Tensor c0, Tensor? weight_ih, Tensor weight_hh, "
      "Tensor? bias, bool reverse, bool train) -> (Tensor out, Tensor h_n, Tensor c_n, Tensor workspace, "
      "Tensor cs)");
  m.def(
      "lstm_layer_fwd.backward(Tensor? grad_out, Tensor? grad_hn, Tensor? grad_cn, Tensor workspace, Tensor cs, "
      "Tensor c0, Tensor weight_hh, bool reverse) -> (Tensor grad_gates, Tensor grad_h0, Tensor grad_c0)");
}

// Lets `import seqkernels._C` succeed; the ops themselves live in torch.ops.seqkernels.
// `cuda_archs` tells `seqkernels info` which archs the CUDA kernels were compiled for ("" when
// the CUDA part was not built).
static PyModuleDef seqkernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&seqkernels_module);
  if (mod == nullptr) return nullptr;
#ifdef SEQKERNELS_WITH_CUDA
  PyModule_AddStringConstant(mod, "cuda_archs", SEQKERNELS_CUDA_ARCHS);
#else
  PyModule_AddStringConstant(mod, "cuda_archs", "");
#endif
  return mod;
}
