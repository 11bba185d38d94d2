// Argument checks that the CPU launchers (csrc/cpu/*.cpp) and the CUDA launchers (csrc/cuda/*.cu)
// both make, written once so that both backends reject the same calls with the same words.
//
// Host only, and unlike the rest of csrc/common this header includes ATen (it checks at::Tensor
// arguments): include it from launchers, never from a kernel header, which stay torch-free.
//
// What differs between the backends is a parameter, not a second copy: the device the kernels run
// on (`Device`: the CPU, or cudart's kernel device, the CPU itself under the CUDA-on-CPU harness)
// and the limits of one backend only (dtypes without a kernel, grid and index-width bounds), which
// stay at the call site after the shared check. The public Python layer validates first; these
// guard direct calls of torch.ops.seqkernels.*. Every message names its argument.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

namespace seqkernels {
namespace host {

// Where a backend's kernels read their tensors: `ok` tells, `name` says it in errors.
struct Device {
  bool (*ok)(const at::Tensor&);
  const char* (*name)();
};

inline bool on_cpu(const at::Tensor& t) { return t.device().is_cpu(); }
inline const char* cpu_name() { return "CPU"; }
constexpr Device kCpu{&on_cpu, &cpu_name};

// `name...` is the argument's name, with the op in front where the op's messages carry it.
template <typename... Name>
void check_device(const Device& dev, const at::Tensor& t, const Name&... name) {
  TORCH_CHECK(dev.ok(t), name..., " must be a tensor on ", dev.name(), ", got one on ", t.device());
}

inline bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// ---------------------------------------------------------------------------------------------
// Attention (seqkernels::attention_fwd / attention_bwd)

struct AttentionGeometry {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

// q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) of one floating dtype on dev, Hq a
// multiple of Hkv. `op` prefixes every message.
inline AttentionGeometry check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Device& dev,
                                   const char* op) {
  check_device(dev, q, op, ": q");
  check_device(dev, k, op, ": k");
  check_device(dev, v, op, ": v");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k and v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, Hq, Lq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, Hkv, Lk, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, Hkv, Lk, Dv), got ", v.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(is_float_type(st), op, ": q must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, op, ": k and v must have q's dtype ", st, ", got ",
              k.scalar_type(), " and ", v.scalar_type());
  AttentionGeometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == g.B && v.size(0) == g.B, op, ": q, k, v batch sizes differ: ", g.B, ", ", k.size(0), ", ",
              v.size(0));
  TORCH_CHECK(k.size(3) == g.D, op, ": k's head dim ", k.size(3), " must equal q's ", g.D);
  TORCH_CHECK(v.size(1) == g.Hkv && v.size(2) == g.Lk, op, ": v ", v.sizes(),
              " must be (B, Hkv, Lk, Dv) with k's Hkv = ", g.Hkv, " and Lk = ", g.Lk);
  TORCH_CHECK(g.Hkv > 0 && g.Hq % g.Hkv == 0, op, ": query heads (", g.Hq, ") must be a multiple of kv heads (", g.Hkv,
              "): grouped-query attention needs the number of query heads to be a multiple of the number of "
              "kv heads");
  return g;
}

// attn_mask as the kernels read it: expanded to (B, Hq, Lq, Lk) (stride 0 on broadcast dims), bool
// (True takes part), q's dtype or float32 (added to the scaled scores), on dev.
inline void check_attn_mask(const at::Tensor& m, const AttentionGeometry& g, at::ScalarType qt, const Device& dev,
                            const char* op) {
  check_device(dev, m, op, ": attn_mask");
  TORCH_CHECK(m.dim() == 4 && m.size(0) == g.B && m.size(1) == g.Hq && m.size(2) == g.Lq && m.size(3) == g.Lk, op,
              ": attn_mask must be expanded to (B, Hq, Lq, Lk) = (", g.B, ", ", g.Hq, ", ", g.Lq, ", ", g.Lk, "), got ",
              m.sizes());
  const at::ScalarType dt = m.scalar_type();
  TORCH_CHECK(dt == at::kBool || dt == at::kFloat || dt == qt, op, ": attn_mask must be bool, ", qt,
              " or float32, got ", dt);
}

// kv_lengths: a contiguous int32 (B,) tensor on dev (values are clamped by the kernels; the public
// layer range-checks CPU tensors).
inline const int32_t* check_kv_lengths(const std::optional<at::Tensor>& kv_lengths, const AttentionGeometry& g,
                                       const Device& dev, const char* op) {
  if (!kv_lengths.has_value() || !kv_lengths->defined()) return nullptr;
  const at::Tensor& t = *kv_lengths;
  check_device(dev, t, op, ": kv_lengths");
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == g.B && t.is_contiguous(), op,
              ": kv_lengths must be a contiguous int32 tensor of shape (B,) = (", g.B, ",), got ", t.scalar_type(), " ",
              t.sizes());
  return t.data_ptr<int32_t>();
}

inline void check_dropout_p(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dropout_p must be in [0, 1], got ", p);
}

inline void check_window(int64_t window_left, int64_t window_right, const char* op) {
  TORCH_CHECK(window_left >= -1, op, ": window_left must be >= 0, or -1 for unbounded, got ", window_left);
  TORCH_CHECK(window_right >= -1, op, ": window_right must be >= 0, or -1 for unbounded, got ", window_right);
}

// The score modifiers of attention_fwd / attention_bwd / decode_attention: alibi_slopes (B, Hq)
// and sinks (Hq,), contiguous, of the accumulation type `acc` (float64 for float64 inputs, float32
// otherwise) on dev; softcap finite and >= 0 (0 = off). Returns them as raw pointers.
template <typename T>
struct ModifierArgs {
  T softcap;
  const T* alibi;
  const T* sinks;
};

inline void check_modifier_tensor(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape,
                                  const char* shape_name, at::ScalarType acc, const Device& dev, const char* op) {
  if (!t.has_value()) return;
  check_device(dev, *t, op, ": ", name);
  TORCH_CHECK(t->scalar_type() == acc, op, ": ", name, " must be ", acc, " (the accumulation type), got ",
              t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " must have shape ", shape_name, " = ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
}

template <typename T>
ModifierArgs<T> check_modifiers(const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                                double softcap, int64_t B, int64_t Hq, const Device& dev, const char* op) {
  const auto acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  TORCH_CHECK(softcap >= 0 && softcap < std::numeric_limits<double>::infinity(), op,
              ": softcap must be a finite number >= 0 (0 = off), got ", softcap);
  // The cap is applied in T: one past T's range would be inf there (inf * tanh(s / inf) = NaN), one
  // below T's smallest normal value may round to 0.
  TORCH_CHECK(softcap == 0 || (softcap >= std::numeric_limits<T>::min() && softcap <= std::numeric_limits<T>::max()),
              op, ": softcap must lie in [", std::numeric_limits<T>::min(), ", ", std::numeric_limits<T>::max(),
              "] (the range of the accumulation type), got ", softcap);
  check_modifier_tensor(alibi_slopes, "alibi_slopes", {B, Hq}, "(B, Hq)", acc, dev, op);
  check_modifier_tensor(sinks, "sinks", {Hq}, "(Hq,)", acc, dev, op);
  return {static_cast<T>(softcap), alibi_slopes ? alibi_slopes->data_ptr<T>() : nullptr,
          sinks ? sinks->data_ptr<T>() : nullptr};
}

// Packed sequences (the last four arguments of attention_fwd / attention_bwd; docs/INTERNALS.md
// "Packed sequences"). Without cu_seqlens_q the call is the padded form: n = -1 and nothing else
// is looked at. With it: cu_seqlens_q and cu_seqlens_k contiguous int32 (N+1,) on dev, q, k, v
// (1, H, total, D) views (the batch dim is the packing, N the sequence count), no attn_mask and no
// kv_lengths (a sequence's keys are its span), max_seqlen_q/k >= 0. Values (start at 0,
// non-decreasing, end at the totals, lengths <= max_seqlen) are checked here on CPU tensors only
// (on a GPU that would cost a host sync); kernels clamp every span into the tensors (seq_span), so
// bad values never reach memory outside them.
struct Varlen {
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t n = -1;  // sequences; -1: not packed
  int64_t max_q = 0, max_k = 0;
  bool packed() const { return n >= 0; }
};

inline void check_cu_values(const at::Tensor& cu, int64_t total, int64_t max_len, const char* name, const char* op) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0, op, ": ", name, " must start at 0, got ", c[0]);
  for (int64_t b = 0; b < n; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], op, ": ", name, " must be non-decreasing, got ", c[b], " then ", c[b + 1],
                " at index ", b + 1);
    TORCH_CHECK(c[b + 1] - c[b] <= max_len, op, ": ", name, ": sequence ", b, " has length ", c[b + 1] - c[b],
                ", above max_seqlen ", max_len);
  }
  TORCH_CHECK(c[n] == total, op, ": ", name, " must end at the total length ", total, ", got ", c[n]);
}

inline Varlen check_varlen(const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                           int64_t max_seqlen_q, int64_t max_seqlen_k, const AttentionGeometry& g, bool has_mask,
                           bool has_kv_lengths, const Device& dev, const char* op) {
  Varlen vl;
  const bool hq = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
  const bool hk = cu_seqlens_k.has_value() && cu_seqlens_k->defined();
  TORCH_CHECK(hq == hk, op, ": cu_seqlens_q and cu_seqlens_k must be given together");
  if (!hq) return vl;
  const at::Tensor& cq = *cu_seqlens_q;
  const at::Tensor& ck = *cu_seqlens_k;
  check_device(dev, cq, op, ": cu_seqlens_q");
  check_device(dev, ck, op, ": cu_seqlens_k");
  TORCH_CHECK(cq.scalar_type() == at::kInt && cq.dim() == 1 && cq.size(0) >= 1 && cq.is_contiguous(), op,
              ": cu_seqlens_q must be a contiguous 1-D int32 tensor (N+1,), got ", cq.scalar_type(), " ", cq.sizes());
  TORCH_CHECK(ck.scalar_type() == at::kInt && ck.dim() == 1 && ck.is_contiguous(), op,
              ": cu_seqlens_k must be a contiguous 1-D int32 tensor (N+1,), got ", ck.scalar_type(), " ", ck.sizes());
  TORCH_CHECK(ck.size(0) == cq.size(0), op, ": cu_seqlens_k has ", ck.size(0) - 1, " sequences, cu_seqlens_q ",
              cq.size(0) - 1);
  TORCH_CHECK(g.B == 1, op, ": with cu_seqlens, q, k and v must be (1, H, total, D) views of the packed tensors, got ",
              "batch ", g.B);
  TORCH_CHECK(!has_mask, op, ": attn_mask is not taken with cu_seqlens (a sequence sees its own keys)");
  TORCH_CHECK(!has_kv_lengths, op, ": kv_lengths is not taken with cu_seqlens (a sequence's keys are its span)");
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ",
              max_seqlen_q, ", ", max_seqlen_k);
  if (cq.device().is_cpu()) check_cu_values(cq, g.Lq, max_seqlen_q, "cu_seqlens_q", op);
  if (ck.device().is_cpu()) check_cu_values(ck, g.Lk, max_seqlen_k, "cu_seqlens_k", op);
  vl.cu_q = cq.data_ptr<int32_t>();
  vl.cu_k = ck.data_ptr<int32_t>();
  vl.n = cq.size(0) - 1;
  vl.max_q = max_seqlen_q;
  vl.max_k = max_seqlen_k;
  return vl;
}

// The grid the dropout keep mask is indexed on (docs/INTERNALS.md, "Dropout"): element (b, h, i, j)
// of the call (i, j local to the sequence) draws the Philox word of
//   n = ((b * Hq + h) * len_q + row0 + i) * len_k + col0 + j.
// `grid` empty: row0 = col0 = 0 and (len_q, len_k) = (Lq, Lk), or (max_seqlen_q, max_seqlen_k) when
// packed: the call's own index. [row0, col0, len_q, len_k]: the call is the block at (row0, col0) of a
// larger (.., len_q, len_k) attention (ring attention's blocks draw the global positions' mask).
struct DropoutGrid {
  int64_t row0 = 0, col0 = 0, len_q = 0, len_k = 0;
};

inline DropoutGrid check_dropout_grid(at::IntArrayRef grid, const AttentionGeometry& g, const Varlen& vl,
                                      const char* op) {
  const int64_t rows = vl.packed() ? vl.max_q : g.Lq, keys = vl.packed() ? vl.max_k : g.Lk;
  if (grid.empty()) return {0, 0, rows, keys};
  TORCH_CHECK(grid.size() == 4, op, ": dropout_grid must be empty or [row0, col0, len_q, len_k], got ", grid);
  const DropoutGrid d{grid[0], grid[1], grid[2], grid[3]};
  TORCH_CHECK(d.row0 >= 0 && d.col0 >= 0 && d.row0 + rows <= d.len_q && d.col0 + keys <= d.len_k, op,
              ": dropout_grid [row0, col0, len_q, len_k] = ", grid, " must hold the call's ", rows, " x ", keys,
              " (rows x keys) block: row0, col0 >= 0, row0 + ", rows, " <= len_q, col0 + ", keys, " <= len_k");
  return d;
}

// ---------------------------------------------------------------------------------------------
// KV cache (seqkernels::kv_cache_append / decode_attention)

// k_cache and v_cache: 4-D on dev, one dtype, equal but for the head dim, head dim contiguous.
// Which dtypes have kernels is the backend's to check.
inline void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const Device& dev) {
  check_device(dev, k_cache, "k_cache");
  check_device(dev, v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4, "k_cache: expected a 4-D tensor, got ", k_cache.sizes());
  TORCH_CHECK(v_cache.dim() == 4, "v_cache: expected a 4-D tensor, got ", v_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache: dtype ", v_cache.scalar_type(),
              " does not match k_cache's ", k_cache.scalar_type());
  TORCH_CHECK(
      k_cache.size(0) == v_cache.size(0) && k_cache.size(1) == v_cache.size(1) && k_cache.size(2) == v_cache.size(2),
      "v_cache: shape ", v_cache.sizes(), " must match k_cache ", k_cache.sizes(), " except the head dim");
  TORCH_CHECK(k_cache.size(3) <= 1 || k_cache.stride(3) == 1, "k_cache: the head dim must have stride 1");
  TORCH_CHECK(v_cache.size(3) <= 1 || v_cache.stride(3) == 1, "v_cache: the head dim must have stride 1");
}

// How positions map to cache slots: a contiguous cache (B, Hkv, S_max, D) has block_size 0; a
// paged one (num_blocks, Hkv, block_size, D) is read through block_table (B, max_blocks).
struct CacheGeometry {
  int64_t capacity;    // positions per sequence
  int64_t block_size;  // 0 for a contiguous cache
  int64_t max_blocks;
  int64_t num_blocks;
};

inline CacheGeometry check_layout(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_table, int64_t B,
                                  const Device& dev) {
  if (!block_table.has_value()) {
    TORCH_CHECK(k_cache.size(0) == B, "k_cache: a contiguous cache is (B, Hkv, S_max, D) with B=", B, ", got ",
                k_cache.sizes());
    return {k_cache.size(2), 0, 0, 0};
  }
  const at::Tensor& t = *block_table;
  check_device(dev, t, "block_table");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B, "block_table: expected shape (", B, ", max_blocks), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(), "block_table: expected a contiguous int32 tensor, got ",
              t.scalar_type(), t.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(k_cache.size(2) >= 1, "k_cache: block_size (dim 2 of a paged cache) must be >= 1");
  return {t.size(1) * k_cache.size(2), k_cache.size(2), t.size(1), k_cache.size(0)};
}

inline void check_seqlens(const at::Tensor& s, int64_t B, const Device& dev) {
  check_device(dev, s, "cache_seqlens");
  TORCH_CHECK(s.dim() == 1 && s.size(0) == B, "cache_seqlens: expected shape (", B, ",), got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kInt && s.is_contiguous(),
              "cache_seqlens: expected a contiguous int32 tensor, got ", s.scalar_type(),
              s.is_contiguous() ? "" : " (not contiguous)");
}

// The rows kv_cache_append writes: k_new (B, Hkv, T, D) and v_new (B, Hkv, T, Dv) in the cache's
// dtype, on dev, with the cache's Hkv, D and Dv (check_cache first).
inline void check_new_rows(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const Device& dev) {
  check_device(dev, k_new, "k_new");
  check_device(dev, v_new, "v_new");
  TORCH_CHECK(k_new.dim() == 4 && v_new.dim() == 4, "k_new, v_new: expected 4-D tensors (B, Hkv, T, D), got ",
              k_new.sizes(), " and ", v_new.sizes());
  TORCH_CHECK(k_new.scalar_type() == k_cache.scalar_type() && v_new.scalar_type() == k_cache.scalar_type(),
              "k_new, v_new: dtype must match the cache's ", k_cache.scalar_type(), ", got ", k_new.scalar_type(),
              " and ", v_new.scalar_type());
  const int64_t B = k_new.size(0), H = k_new.size(1), T = k_new.size(2), D = k_new.size(3);
  const int64_t Dv = v_cache.size(3);
  TORCH_CHECK(v_new.size(0) == B && v_new.size(1) == H && v_new.size(2) == T && v_new.size(3) == Dv,
              "v_new: expected shape (", B, ", ", H, ", ", T, ", ", Dv, "), got ", v_new.sizes());
  TORCH_CHECK(k_cache.size(1) == H && k_cache.size(3) == D, "k_new: shape ", k_new.sizes(), " does not fit k_cache ",
              k_cache.sizes());
}

// The packed form of kv_cache_append (cu_seqlens) and decode_attention (cu_seqlens_q): a
// contiguous int32 (B+1,) tensor on dev, B = cache_seqlens.numel(), over the (1, H, total, D) view
// `rows` (batch dim 1). Values (start at 0, non-decreasing, end at total, lengths <= max_len) are
// checked on CPU tensors only (check_cu_values); kernels clamp every span (seq_span). Returns the
// values, or nullptr when cu is absent (the padded form).
inline const int32_t* check_kv_packed(const std::optional<at::Tensor>& cu, const at::Tensor& rows, int64_t B,
                                      int64_t max_len, const Device& dev, const char* name, const char* op) {
  if (!cu.has_value() || !cu->defined()) return nullptr;
  const at::Tensor& c = *cu;
  check_device(dev, c, op, ": ", name);
  TORCH_CHECK(c.scalar_type() == at::kInt && c.dim() == 1 && c.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D int32 tensor (B+1,), got ", c.scalar_type(), " ", c.sizes());
  TORCH_CHECK(c.size(0) == B + 1, op, ": ", name, " has ", c.size(0), " entries, expected B+1 = ", B + 1,
              " (B = cache_seqlens.numel())");
  TORCH_CHECK(rows.dim() == 4 && rows.size(0) == 1, op, ": with ", name,
              ", the rows must be the (1, H, total, D) view of the token-major (total, H, D) tensor, got ",
              rows.sizes());
  TORCH_CHECK(max_len >= 0, op, ": max_seqlen must be >= 0, got ", max_len);
  if (c.device().is_cpu()) check_cu_values(c, rows.size(2), max_len, name, op);
  return c.data_ptr<int32_t>();
}

// decode_attention's q (B, Hq, Tq, D) against the cache (check_cache first), num_splits in
// [1, max_splits] and the window. A backend's head-dim limits are its own.
inline void check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, int64_t num_splits, int64_t window_left,
                              int64_t window_right, int64_t max_splits, const Device& dev) {
  check_device(dev, q, "q");
  TORCH_CHECK(q.dim() == 4, "q: expected a 4-D tensor (B, Hq, Tq, D), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q: dtype ", q.scalar_type(), " does not match the cache's ",
              k_cache.scalar_type());
  const int64_t Hq = q.size(1), D = q.size(3), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == D, "k_cache: head dim ", k_cache.size(3), " must equal q's ", D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q: the number of query heads (", Hq,
              ") must be a multiple of the number of key/value heads (", Hkv, ")");
  TORCH_CHECK(num_splits >= 1 && num_splits <= max_splits, "num_splits: expected a value in [1, ", max_splits,
              "], got ", num_splits);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window_left, window_right: expected >= -1, got ", window_left,
              ", ", window_right);
}

// ---------------------------------------------------------------------------------------------
// LSTM cell (seqkernels::lstm_cell_fwd / lstm_cell_bwd; the CPU's lstm_layer_fwd too)

// The tensor every other argument is checked against: (B, 4*H) gates of a floating dtype on dev.
// Returns H.
inline int64_t check_gates(const char* op, const char* name, const at::Tensor& t, const Device& dev) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) % 4 == 0, "seqkernels::", op, ": ", name, " must have shape (B, 4*H), got ",
              t.sizes());
  TORCH_CHECK(is_float_type(t.scalar_type()), "seqkernels::", op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  check_device(dev, t, "seqkernels::", op, ": ", name);
  return t.size(1) / 4;
}

// A (rows, cols) tensor with like's dtype and device.
inline void check_2d(const char* name, const at::Tensor& t, int64_t rows, int64_t cols, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "seqkernels::lstm_cell: ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "seqkernels::lstm_cell: ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type(), " (one dtype for all inputs)");
  TORCH_CHECK(t.device() == like.device(), "seqkernels::lstm_cell: ", name, " is on ", t.device(), ", expected ",
              like.device());
}

// An optional (gates,) bias with like's dtype and device.
inline void check_bias(const char* op, const char* name, const std::optional<at::Tensor>& b, int64_t gates,
                       const at::Tensor& like) {
  if (!b.has_value()) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == gates, "seqkernels::", op, ": ", name, " must have shape (", gates,
              ",), got ", b->sizes());
  TORCH_CHECK(b->scalar_type() == like.scalar_type() && b->device() == like.device(), "seqkernels::", op, ": ", name,
              " must have input_gates' dtype and device (", like.scalar_type(), ", ", like.device(), "), got ",
              b->scalar_type(), ", ", b->device());
}

// The forward's arguments: input_gates (B, 4*H) on dev, hidden_gates (B, 4*H) and cx (B, H), the
// optional (4*H,) biases, one dtype and device. Returns H.
inline int64_t check_lstm_fwd(const at::Tensor& input_gates, const at::Tensor& hidden_gates, const at::Tensor& cx,
                              const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
                              const Device& dev) {
  const int64_t H = check_gates("lstm_cell_fwd", "input_gates", input_gates, dev);
  const int64_t B = input_gates.size(0), G = 4 * H;
  check_2d("hidden_gates", hidden_gates, B, G, input_gates);
  check_2d("cx", cx, B, H, input_gates);
  check_bias("lstm_cell_fwd", "bias_ih", bias_ih, G, input_gates);
  check_bias("lstm_cell_fwd", "bias_hh", bias_hh, G, input_gates);
  return H;
}

// The backward's arguments: the forward's workspace (B, 4*H) on dev, cx and cy (B, H), the
// optional grad_hy / grad_cy (B, H), one dtype and device. Returns H.
inline int64_t check_lstm_bwd(const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
                              const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& workspace,
                              const Device& dev) {
  const int64_t H = check_gates("lstm_cell_bwd", "workspace", workspace, dev);
  const int64_t B = workspace.size(0);
  check_2d("cx", cx, B, H, workspace);
  check_2d("cy", cy, B, H, workspace);
  if (grad_hy.has_value()) check_2d("grad_hy", *grad_hy, B, H, workspace);
  if (grad_cy.has_value()) check_2d("grad_cy", *grad_cy, B, H, workspace);
  return H;
}

}  // namespace host
}  // namespace seqkernels
