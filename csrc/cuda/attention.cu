// CUDA kernels of seqkernels::attention_fwd / attention_bwd: the thin torch-facing launcher.
// It validates the normalized arguments (docs/INTERNALS.md), fills the torch-free
// AttentionParams, and picks a kernel with compile-time switches over dtype (float16,
// bfloat16), head-dim tile (64, 128, 256: a head dim runs in the smallest tile that holds it,
// zero padded) and the general variant (attn_mask or dropout present).
//
// Supported: float16 / bfloat16 q, k, v on sm_80+; head dims D, Dv <= 256 (a head dim that is
// not a multiple of 8 is zero padded to one through a copy); any window / bottom_right;
// kv_lengths; GQA/MQA without copies of k and v; attn_mask bool, q's dtype or float32 in any
// expanded layout; dropout with the Philox keep rule; the score modifiers softcap, ALiBi and
// sinks (a kMods variant of the general forward and of the backward kernels, so the kernels
// without them keep their registers); packed sequences (cu_seqlens, attention_varlen: one tile
// schedule per launch, see schedule_tiles, read by attn::locate_tile in every kernel). float32
// inputs are rejected (the tensor core path is 16-bit only): the Python layer runs them on the
// triton or reference backend.

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/host_checks.h"
#include "common/philox.h"
#include "cuda/attention_bwd.cuh"
#include "cuda/attention_fwd.cuh"
#include "cuda/attention_params.h"
#include "cuda/launch.cuh"
#include "cuda/param_fill.h"
#include "cuda/register.cuh"
#include "cuda/stream.cuh"

namespace seqkernels {
namespace {

using attn::AttentionBwdParams;
using attn::AttentionParams;

// Head-dim tiles with kernels; max(D, Dv) rounded up to a multiple of 8 runs in the first
// that holds it.
constexpr int kHeadDimTiles[] = {64, 128, 256};
constexpr int kMaxHeadDim = 256;

int head_dim_tile(int64_t d) {
  for (int t : kHeadDimTiles) {
    if (d <= t) return t;
  }
  return -1;
}

int64_t round_up8(int64_t x) { return (x + 7) / 8 * 8; }

// The element type's mma tag, or a clear error for dtypes without a tensor-core kernel.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kHalf) {
    f(mma::f16{});
  } else if (dtype == at::kBFloat16) {
    f(mma::bf16{});
  } else {
    TORCH_CHECK(false, "seqkernels attention (CUDA backend): q, k and v must be float16 or bfloat16, got ", dtype,
                "; float32 and float64 run on the triton, cpu or reference backends");
  }
}

template <typename F>
void dispatch_head_dim(int tile, F&& f) {
  switch (tile) {
    case 64:
      f(std::integral_constant<int, 64>{});
      break;
    case 128:
      f(std::integral_constant<int, 128>{});
      break;
    case 256:
      f(std::integral_constant<int, 256>{});
      break;
    default:
      TORCH_CHECK(false, "seqkernels attention (CUDA backend): no kernel for head-dim tile ", tile);
  }
}

template <typename F>
void dispatch_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The kernels move rows in 16-byte chunks: the last dim must be contiguous, every row start
// 16-byte aligned, and the head dim a multiple of 8. Returns t itself when it already is so,
// else a copy (zero padded along the last dim to `dim`).
at::Tensor kernel_layout(const at::Tensor& t, int64_t dim) {
  at::Tensor r = t;
  if (r.size(3) != dim) r = at::constant_pad_nd(r, {0, dim - r.size(3)}, 0);
  bool ok = r.stride(3) == 1 || r.size(3) <= 1;
  for (int d = 0; d < 3 && ok; ++d) ok = r.size(d) <= 1 || r.stride(d) % 8 == 0;
  ok = ok && reinterpret_cast<uintptr_t>(r.data_ptr()) % 16 == 0;
  return ok ? r : r.contiguous();
}

// kernel_layout ignores the strides of dims of size 1; so do the kernels (param_fill.h).
using cudart::stride_of;

// Where the kernels read their tensors (the CPU under the CUDA-on-CPU harness), for the shared
// checks of common/host_checks.h.
constexpr host::Device kDevice{&cudart::on_kernel_device, &cudart::kernel_device_name};

// The dtypes with tensor-core kernels, the shared q/k/v checks, then the kernels' size limits.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "seqkernels attention (CUDA backend): q, k and v must be float16 or bfloat16, got ", q.scalar_type(),
              "; float32 and float64 run on the triton, cpu or reference backends");
  host::check_qkv(q, k, v, kDevice, op);
  TORCH_CHECK(q.size(3) <= kMaxHeadDim && v.size(3) <= kMaxHeadDim,
              "seqkernels attention (CUDA backend): head dims up to ", kMaxHeadDim,
              " are supported (tiles 64, 128, 256; smaller dims are zero padded to the next "
              "tile), got D=",
              q.size(3), ", Dv=", v.size(3));
  TORCH_CHECK(q.size(2) < (int64_t(1) << 30) && k.size(2) < (int64_t(1) << 30), op,
              ": sequence lengths must be below 2^30, got Lq=", q.size(2), ", Lk=", k.size(2));
}

// The score modifiers, checked as on the CPU (common/host_checks.h).
// `batch`: q's batch, or the number of sequences when packed (alibi_slopes is (N, Hq) then).
host::ModifierArgs<float> check_modifiers(const std::optional<at::Tensor>& alibi_slopes,
                                          const std::optional<at::Tensor>& sinks, double softcap, const at::Tensor& q,
                                          int64_t batch, const char* op) {
  return host::check_modifiers<float>(alibi_slopes, sinks, softcap, batch, q.size(1), kDevice, op);
}

// The kernels' grids are 1-D: blocks * batch * heads must fit gridDim.x.
unsigned grid_size(int64_t blocks, int64_t batch_heads) {
  const int64_t g = blocks * batch_heads;
  TORCH_CHECK(g < (int64_t(1) << 31), "attention: ", blocks, " blocks x ", batch_heads,
              " (batch x heads) exceeds the CUDA grid limit");
  return static_cast<unsigned>(g);
}

// The kernels read one mask format: an additive float32 mask. A bool mask becomes 0 / -inf and
// a 16-bit one float32; only the stored values are converted (broadcast dims are collapsed
// first and expanded again), so an expanded mask is never materialized.
// The sizes the shared mask and length checks read (B, Hq, Lq, Lk); head dims are not among them.
host::AttentionGeometry geometry(const at::Tensor& q, const at::Tensor& k) {
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), k.size(3)};
}

at::Tensor mask_for_kernel(const std::optional<at::Tensor>& attn_mask, const at::Tensor& q, const at::Tensor& k,
                           const char* op) {
  if (!attn_mask.has_value()) return at::Tensor();
  const at::Tensor& m = *attn_mask;
  host::check_attn_mask(m, geometry(q, k), q.scalar_type(), kDevice, op);
  const at::ScalarType dt = m.scalar_type();
  if (dt == at::kFloat) return m;
  at::Tensor base = m;
  for (int d = 0; d < 4; ++d) {
    if (m.stride(d) == 0 && m.size(d) > 1) base = base.narrow(d, 0, 1);
  }
  at::Tensor conv;
  if (dt == at::kBool) {
    conv = at::full(base.sizes(), -std::numeric_limits<float>::infinity(), base.options().dtype(at::kFloat));
    conv.masked_fill_(base, 0.0);
  } else {
    conv = base.to(at::kFloat);
  }
  return conv.expand(m.sizes());
}

// ---------------------------------------------------------------------------------------------
// Filling AttentionParams / AttentionBwdParams: one helper per block of fields, shared by the
// forward and backward launchers.

// The kernels' view of a (B, H, L, D) tensor already in kernel_layout.
template <typename Rows>
Rows rows_view(const at::Tensor& t) {
  using E = std::remove_pointer_t<decltype(Rows::ptr)>;
  return {static_cast<E*>(t.data_ptr()), stride_of(t, 0), stride_of(t, 1), stride_of(t, 2)};
}

// q, k, v and the problem sizes; d and dv are the head dims padded to multiples of 8.
void fill_qkv(AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t d,
              int64_t dv) {
  p.q = rows_view<attn::InRows>(q);
  p.k = rows_view<attn::InRows>(k);
  p.v = rows_view<attn::InRows>(v);
  p.batch = static_cast<int>(q.size(0));
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.len_q = static_cast<int>(q.size(2));
  p.len_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(d);
  p.head_dim_v = static_cast<int>(dv);
}

// attn_mask in mask_for_kernel's format, or an undefined tensor for none.
void fill_mask(AttentionParams& p, const at::Tensor& mask) {
  p.mask = {nullptr, 0, 0, 0, 0};
  if (mask.defined()) {
    p.mask = {mask.data_ptr<float>(), stride_of(mask, 0), stride_of(mask, 1), stride_of(mask, 2), stride_of(mask, 3)};
  }
}

// Which keys a row sees: kv_lengths, the window and its alignment.
void fill_band(AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
               const std::optional<at::Tensor>& kv_lengths, int64_t window_left, int64_t window_right,
               bool bottom_right, const char* op) {
  host::check_window(window_left, window_right, op);
  // A window wider than both lengths bounds nothing; folding it to -1 keeps the kernels'
  // int arithmetic far from overflow.
  const int64_t span = q.size(2) + k.size(2);
  p.window_left = window_left > span ? -1 : static_cast<int>(window_left);
  p.window_right = window_right > span ? -1 : static_cast<int>(window_right);
  p.bottom_right = bottom_right;
  p.kv_lengths = host::check_kv_lengths(kv_lengths, geometry(q, k), kDevice, op);
}

void fill_mods(AttentionParams& p, const host::ModifierArgs<float>& mods) {
  p.softcap = mods.softcap;
  p.alibi = mods.alibi;
  p.sinks = mods.sinks;
}

void fill_dropout(AttentionParams& p, double dropout_p, int64_t seed, int64_t offset, const char* op) {
  host::check_dropout_p(dropout_p, op);
  p.dropout = dropout_p > 0.0;
  p.dropout_threshold = dropout_threshold(dropout_p);
  p.dropout_rescale = dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.f;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
}

// Everything but the outputs (and, for the backward, its own inputs). q/k/v are already in
// kernel layout, attn_mask in mask_for_kernel's.
void fill_common(AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& attn_mask, const std::optional<at::Tensor>& kv_lengths, double scale,
                 int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p, int64_t seed,
                 int64_t offset, int64_t d, int64_t dv, const host::ModifierArgs<float>& mods, const char* op) {
  fill_qkv(p, q, k, v, d, dv);
  p.scale = static_cast<float>(scale);
  fill_band(p, q, k, kv_lengths, window_left, window_right, bottom_right, op);
  fill_mask(p, attn_mask);
  fill_dropout(p, dropout_p, seed, offset, op);
  fill_mods(p, mods);
}

// ---------------------------------------------------------------------------------------------
// Packed sequences (attention_varlen): the varlen fields of the params, the token-major outputs,
// and the per-launch tile schedule.

// host::check_varlen on the op's arguments. Builds with SEQKERNELS_EMU_UNCHECKED_CU_SEQLENS (test
// builds of the CUDA-on-CPU harness only, tests/test_attention_cuda.py) leave the values of
// cu_seqlens unchecked, as they are for GPU tensors, so that the emulated kernels meet what a GPU
// launch can meet (decreasing values, values outside [0, total]).
host::Varlen varlen_args(const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                         int64_t max_seqlen_q, int64_t max_seqlen_k, const at::Tensor& q, const at::Tensor& k,
                         bool has_mask, bool has_kv_lengths, const char* op) {
#ifdef SEQKERNELS_EMU_UNCHECKED_CU_SEQLENS
  if (cu_seqlens_q.has_value() && cu_seqlens_q->defined() && cu_seqlens_k.has_value() && cu_seqlens_k->defined()) {
    // Stand-ins that pass the value checks (all sequences empty but the last); the real pointers
    // replace theirs.
    auto stand_in = [](const at::Tensor& cu, int64_t total) {
      at::Tensor s = at::zeros_like(cu);
      if (s.dim() == 1 && s.numel() > 0) s.select(0, -1).fill_(total);
      return s;
    };
    const int64_t lq = q.size(2), lk = k.size(2);
    host::Varlen vl =
        host::check_varlen(stand_in(*cu_seqlens_q, lq), stand_in(*cu_seqlens_k, lk), std::max(max_seqlen_q, lq),
                           std::max(max_seqlen_k, lk), geometry(q, k), has_mask, has_kv_lengths, kDevice, op);
    vl.cu_q = cu_seqlens_q->data_ptr<int32_t>();
    vl.cu_k = cu_seqlens_k->data_ptr<int32_t>();
    vl.max_q = max_seqlen_q;
    vl.max_k = max_seqlen_k;
    return vl;
  }
#endif
  return host::check_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, geometry(q, k), has_mask,
                            has_kv_lengths, kDevice, op);
}

// cu_seqlens (already through varlen_args), the dropout index's grid; padded: no cu_seqlens.
void fill_varlen(AttentionParams& p, const host::Varlen& vl, const host::DropoutGrid& grid) {
  p.cu_q = vl.packed() ? vl.cu_q : nullptr;
  p.cu_k = vl.packed() ? vl.cu_k : nullptr;
  p.num_seqs = vl.packed() ? static_cast<int>(vl.n) : 0;
  p.tile_offsets = nullptr;
  p.tile_bound = 0;
  p.drop_len_q = grid.len_q;
  p.drop_len_k = grid.len_k;
  p.drop_row0 = grid.row0;
  p.drop_col0 = grid.col0;
}

// A (1, H, total, d8) view of zero-filled token-major storage (total, H, d8): packed outputs are
// laid out like the packed inputs, and rows in no sequence (unchecked cu_seqlens) stay 0.
at::Tensor token_major_zeros(int64_t total, int64_t heads, int64_t d8, const at::TensorOptions& opts) {
  return at::zeros({total, heads, d8}, opts).permute({1, 0, 2}).unsqueeze(0);
}

// An output of the kernels narrowed to its head dim d: contiguous (padded form) or token-major
// (packed form, what the fake kernels promise).
at::Tensor unpad_output(const at::Tensor& t, int64_t d, bool packed) {
  if (t.size(3) == d) return t;
  if (!packed) return t.narrow(3, 0, d).contiguous();
  return t.select(0, 0).permute({1, 0, 2}).narrow(2, 0, d).contiguous().permute({1, 0, 2}).unsqueeze(0);
}

// The schedule of a packed launch over tiles of `block` rows of the sequences' spans of cu
// (cu_seqlens_q or _k, total rows): the cumulative tile counts (N + 1,) int32 on cu's device,
// computed with tensor ops (no host sync), from the spans clamped as seq_span clamps them. Sets
// p.tile_offsets and p.tile_bound (ceil(total / block) + N: at least the tile count whenever the
// spans do not overlap, i.e. for every valid cu_seqlens; with overlapping unchecked values the
// tiles past the bound are left undone, never out of bounds) and returns the offsets, which must
// outlive the launch.
at::Tensor schedule_tiles(AttentionParams& p, const at::Tensor& cu, int64_t total, int block) {
  const at::Tensor c = cu.to(at::kLong).clamp(0, total);
  const at::Tensor len = c.slice(0, 1).sub(c.slice(0, 0, c.size(0) - 1)).clamp_min(0);
  const at::Tensor tiles = at::floor_divide(len.add(block - 1), block);
  const at::Tensor offsets =
      at::cat({at::zeros({1}, c.options()), tiles.cumsum(0)}).clamp_max(std::numeric_limits<int32_t>::max() / 2);
  const at::Tensor offsets32 = offsets.to(at::kInt).contiguous();
  p.tile_offsets = offsets32.data_ptr<int32_t>();
  p.tile_bound = static_cast<int>((total + block - 1) / block + p.num_seqs);
  return offsets32;
}

// The 1-D grid of a kernel over tiles of `block` rows along `len` (len_q or len_k) and `heads`
// heads: padded, every (batch, head) has ceil(len / block) tiles; packed, see schedule_tiles.
// `lp` is the params of this launch (a copy of the shared ones), `sched` keeps its schedule alive.
template <int kBlock>
unsigned tile_grid(AttentionParams& lp, const at::Tensor& cu, int64_t len, int64_t heads, at::Tensor& sched) {
  if (!lp.packed()) return grid_size((len + kBlock - 1) / kBlock, int64_t(lp.batch) * heads);
  sched = schedule_tiles(lp, cu, len, kBlock);
  return grid_size(lp.tile_bound, heads);
}

// kMods runs in the general variant's tiles (its scores all take the element-wise path).
// cu: cu_seqlens_q when packed (undefined otherwise).
template <typename Tag, int kTile, bool kGeneral, bool kMods>
void launch_fwd(const AttentionParams& p, const at::Tensor& cu, cudaStream_t stream) {
  static_assert(kGeneral || !kMods, "the modifiers are a variant of the general kernel");
  using Kt = typename attn::FwdConfig<kTile, kGeneral>::type;
  auto kernel = &attn::_attention_fwd_kernel<Tag, Kt, kGeneral, kMods>;
  constexpr int smem = Kt::kSmemBytes;
  if (smem > 48 * 1024) SK_SET_MAX_DYNAMIC_SMEM(kernel, smem);
  AttentionParams lp = p;
  at::Tensor sched;
  const unsigned grid = tile_grid<Kt::kBlockM>(lp, cu, p.len_q, p.heads_q, sched);
  SK_LAUNCH(kernel, dim3(grid), dim3(Kt::kThreads), smem, stream, lp);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& kv_lengths, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, int64_t seed, int64_t offset, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks, double softcap, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool deterministic,
    at::IntArrayRef dropout_grid) {
  (void)deterministic;  // recorded by the autograd layer for the backward
  constexpr const char* op = "seqkernels::attention_fwd (cuda)";
  check_qkv(q_in, k_in, v_in, op);
  const host::Varlen vl =
      varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_in, k_in,
                  attn_mask.has_value() && attn_mask->defined(), kv_lengths.has_value() && kv_lengths->defined(), op);
  const host::DropoutGrid drop_grid = host::check_dropout_grid(dropout_grid, geometry(q_in, k_in), vl, op);
  const bool packed = vl.packed();
  const auto mods = check_modifiers(alibi_slopes, sinks, softcap, q_in, packed ? vl.n : q_in.size(0), op);
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2);
  const int64_t D = q_in.size(3), Dv = v_in.size(3);
  const int64_t D8 = round_up8(D), Dv8 = round_up8(Dv);
  const int tile = head_dim_tile(std::max(D8, Dv8));

  // Packed: token-major out, 0 and lse -inf on rows in no sequence (unchecked cu_seqlens).
  at::Tensor out =
      packed ? token_major_zeros(Lq, Hq, Dv8, q_in.options()) : at::empty({B, Hq, Lq, Dv8}, q_in.options());
  at::Tensor lse =
      packed ? at::full({B, Hq, Lq}, -std::numeric_limits<float>::infinity(), q_in.options().dtype(at::kFloat))
             : at::empty({B, Hq, Lq}, q_in.options().dtype(at::kFloat));
  if (lse.numel() == 0) {
    return {packed ? unpad_output(out, Dv, true) : (Dv8 == Dv ? out : out.narrow(3, 0, Dv)), lse};
  }
  const cudart::DeviceGuard guard(q_in);
  const at::Tensor q = kernel_layout(q_in, D8), k = kernel_layout(k_in, D8), v = kernel_layout(v_in, Dv8);

  const at::Tensor mask = mask_for_kernel(attn_mask, q_in, k_in, op);
  AttentionParams p;
  fill_common(p, q, k, v, mask, kv_lengths, scale, window_left, window_right, bottom_right, dropout_p, seed, offset, D8,
              Dv8, mods, op);
  fill_varlen(p, vl, drop_grid);
  p.out = rows_view<attn::OutRows>(out);
  p.lse = lse.data_ptr<float>();
  const at::Tensor cu_q = packed ? *cu_seqlens_q : at::Tensor();

  const bool general = p.mask.ptr != nullptr || p.dropout;
  const cudaStream_t stream = cudart::current_stream();
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    dispatch_head_dim(tile, [&](auto tile_c) {
      constexpr int kTile = decltype(tile_c)::value;
      if (p.mods_any()) {
        launch_fwd<decltype(tag), kTile, true, true>(p, cu_q, stream);
      } else {
        dispatch_bool(general, [&](auto general_c) {
          launch_fwd<decltype(tag), kTile, decltype(general_c)::value, false>(p, cu_q, stream);
        });
      }
    });
  });
  return {unpad_output(out, Dv, packed), lse};
}

// cu_q, cu_k: cu_seqlens_q/k when packed (undefined otherwise).
template <typename Tag, int kTile, bool kMods>
void launch_bwd(const AttentionBwdParams& p, const at::Tensor& cu_q, const at::Tensor& cu_k, bool deterministic,
                cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.len_q;
  if (rows > 0) {
    auto kernel = &attn::_attention_bwd_preprocess_kernel<Tag>;
    const unsigned grid = grid_size((rows + 3) / 4, 1);
    SK_LAUNCH(kernel, dim3(grid), dim3(128), 0, stream, p);
  }
  if (p.len_k > 0) {
    using Bt = typename attn::BwdConfig<kTile>::type;
    auto kernel = &attn::_attention_bwd_dkdv_kernel<Tag, Bt, kMods>;
    constexpr int smem = Bt::kSmemBytes;
    if (smem > 48 * 1024) SK_SET_MAX_DYNAMIC_SMEM(kernel, smem);
    AttentionBwdParams lp = p;
    at::Tensor sched;
    const unsigned grid = tile_grid<Bt::kBlockN>(lp, cu_k, p.len_k, p.heads_kv, sched);
    SK_LAUNCH(kernel, dim3(grid), dim3(Bt::kThreads), smem, stream, lp);
  }
  if (rows == 0) return;
  if (deterministic) {
    using Dt = typename attn::DqConfig<kTile>::type;
    auto kernel = &attn::_attention_bwd_dq_kernel<Tag, Dt, kMods>;
    constexpr int smem = Dt::kSmemBytes;
    if (smem > 48 * 1024) SK_SET_MAX_DYNAMIC_SMEM(kernel, smem);
    AttentionBwdParams lp = p;
    at::Tensor sched;
    const unsigned grid = tile_grid<Dt::kBlockM>(lp, cu_q, p.len_q, p.heads_q, sched);
    SK_LAUNCH(kernel, dim3(grid), dim3(Dt::kThreads), smem, stream, lp);
  } else {
    auto kernel = &attn::_attention_bwd_dq_convert_kernel<Tag>;
    const int64_t chunks = rows * (p.head_dim / 8);
    if (chunks > 0) {
      const unsigned grid = grid_size((chunks + 255) / 256, 1);
      SK_LAUNCH(kernel, dim3(grid), dim3(256), 0, stream, p);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& kv_lengths, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, int64_t seed, int64_t offset, bool deterministic,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks, double softcap,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, at::IntArrayRef dropout_grid) {
  constexpr const char* op = "seqkernels::attention_bwd (cuda)";
  check_qkv(q_in, k_in, v_in, op);
  const host::Varlen vl =
      varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_in, k_in,
                  attn_mask.has_value() && attn_mask->defined(), kv_lengths.has_value() && kv_lengths->defined(), op);
  const host::DropoutGrid drop_grid = host::check_dropout_grid(dropout_grid, geometry(q_in, k_in), vl, op);
  const bool packed = vl.packed();
  const auto mods = check_modifiers(alibi_slopes, sinks, softcap, q_in, packed ? vl.n : q_in.size(0), op);
  at::Tensor dsinks = at::zeros({sinks.has_value() ? q_in.size(1) : 0}, q_in.options().dtype(at::kFloat));
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2);
  const int64_t Hkv = k_in.size(1), Lk = k_in.size(2);
  const int64_t D = q_in.size(3), Dv = v_in.size(3);
  for (const at::Tensor* t : {&grad_out_in, &out_in}) {
    SK_CHECK_DEVICE(*t);
    TORCH_CHECK(t->device() == q_in.device() && t->scalar_type() == q_in.scalar_type() && t->dim() == 4 &&
                    t->size(0) == B && t->size(1) == Hq && t->size(2) == Lq && t->size(3) == Dv,
                "attention_bwd: grad_out and out must be ", q_in.scalar_type(), " (B, Hq, Lq, Dv) = (", B, ", ", Hq,
                ", ", Lq, ", ", Dv, ") on ", q_in.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
  }
  SK_CHECK_DEVICE(lse_in);
  TORCH_CHECK(lse_in.device() == q_in.device() && lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 &&
                  lse_in.size(0) == B && lse_in.size(1) == Hq && lse_in.size(2) == Lq,
              "attention_bwd: lse must be float32 (B, Hq, Lq) = (", B, ", ", Hq, ", ", Lq, ") on ", q_in.device(),
              ", got ", lse_in.scalar_type(), " ", lse_in.sizes());

  const int64_t D8 = round_up8(D), Dv8 = round_up8(Dv);
  const int tile = head_dim_tile(std::max(D8, Dv8));
  // Packed: token-major like q, k, v, and zero on rows in no sequence (the kernels write only
  // the sequences' rows; unchecked cu_seqlens may leave others).
  at::Tensor dq = packed ? token_major_zeros(Lq, Hq, D8, q_in.options()) : at::empty({B, Hq, Lq, D8}, q_in.options());
  at::Tensor dk = packed ? token_major_zeros(Lk, Hkv, D8, q_in.options()) : at::empty({B, Hkv, Lk, D8}, q_in.options());
  at::Tensor dv =
      packed ? token_major_zeros(Lk, Hkv, Dv8, q_in.options()) : at::empty({B, Hkv, Lk, Dv8}, q_in.options());
  auto unpad = [packed](const at::Tensor& t, int64_t d) { return unpad_output(t, d, packed); };
  if (B * Hq == 0 || (Lq == 0 && Lk == 0)) return {unpad(dq, D), unpad(dk, D), unpad(dv, Dv), dsinks};

  const cudart::DeviceGuard guard(q_in);
  const at::Tensor q = kernel_layout(q_in, D8), k = kernel_layout(k_in, D8), v = kernel_layout(v_in, Dv8),
                   out = kernel_layout(out_in, Dv8), dout = kernel_layout(grad_out_in, Dv8), lse = lse_in.contiguous();
  at::Tensor delta = at::empty({B, Hq, Lq}, q_in.options().dtype(at::kFloat));
  at::Tensor row_stats = at::empty({2, B, Hq, Lq}, q_in.options().dtype(at::kFloat));
  at::Tensor dq_accum;
  if (!deterministic) dq_accum = at::zeros({B, Hq, Lq, D8}, q_in.options().dtype(at::kFloat));

  // Each row's share of grad_sinks, summed below (a fixed-order reduction: deterministic).
  at::Tensor dsink_rows;
  if (sinks.has_value()) dsink_rows = at::empty({B, Hq, Lq}, q_in.options().dtype(at::kFloat));

  const at::Tensor mask = mask_for_kernel(attn_mask, q_in, k_in, op);
  AttentionBwdParams p;
  fill_common(p, q, k, v, mask, kv_lengths, scale, window_left, window_right, bottom_right, dropout_p, seed, offset, D8,
              Dv8, mods, op);
  p.out = rows_view<attn::OutRows>(out);  // read only: the forward's output
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = rows_view<attn::InRows>(dout);
  p.dq = rows_view<attn::OutRows>(dq);
  p.dk = rows_view<attn::OutRows>(dk);
  p.dv = rows_view<attn::OutRows>(dv);
  p.delta = delta.data_ptr<float>();
  p.row_shift = row_stats.data_ptr<float>();
  p.row_log2l = p.row_shift + B * Hq * Lq;
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.dq_accum_row_stride = static_cast<int>(D8);
  p.dsink_rows = dsink_rows.defined() ? dsink_rows.data_ptr<float>() : nullptr;
  fill_varlen(p, vl, drop_grid);
  const at::Tensor cu_q = packed ? *cu_seqlens_q : at::Tensor(), cu_k = packed ? *cu_seqlens_k : at::Tensor();

  const cudaStream_t stream = cudart::current_stream();
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    dispatch_head_dim(tile, [&](auto tile_c) {
      dispatch_bool(p.mods_any(), [&](auto mods_c) {
        launch_bwd<decltype(tag), decltype(tile_c)::value, decltype(mods_c)::value>(p, cu_q, cu_k, deterministic,
                                                                                    stream);
      });
    });
  });
  if (dsink_rows.defined()) dsinks = dsink_rows.sum({0, 2});
  return {unpad(dq, D), unpad(dk, D), unpad(dv, Dv), dsinks};
}

}  // namespace
}  // namespace seqkernels

SK_REGISTER_CUDA(attention_fwd, seqkernels::attention_fwd_cuda);
SK_REGISTER_CUDA(attention_bwd, seqkernels::attention_bwd_cuda);
