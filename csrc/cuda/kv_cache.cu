// CUDA launchers of seqkernels::kv_cache_append and seqkernels::decode_attention: validate the
// (already normalized) arguments, pick the compile-time variant, launch the kernels of
// kv_cache.cuh. Runs unchanged under the CUDA-on-CPU harness (docs/EMULATION.md).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/full.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "common/host_checks.h"
#include "cuda/kv_cache.cuh"
#include "cuda/launch.cuh"
#include "cuda/param_fill.h"
#include "cuda/register.cuh"
#include "cuda/stream.cuh"

namespace seqkernels {
namespace {

// Where the kernels read their tensors (the CPU under the CUDA-on-CPU harness), for the shared
// checks of common/host_checks.h.
constexpr host::Device kDevice{&cudart::on_kernel_device, &cudart::kernel_device_name};

// The shared cache checks, then the dtypes these kernels have.
void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  host::check_cache(k_cache, v_cache, kDevice);
  const auto dt = k_cache.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "k_cache: the CUDA kernels take float16, bfloat16 or float32, got ", dt);
}

// The shared layout checks, then the kernels' 32-bit positions.
kv::CacheLayout check_layout(const at::Tensor& k_cache, const std::optional<at::Tensor>& block_table, int64_t B) {
  const host::CacheGeometry g = host::check_layout(k_cache, block_table, B, kDevice);
  TORCH_CHECK(g.capacity < (int64_t{1} << 31),
              block_table.has_value() ? "block_table: max_blocks * block_size must stay below 2^31 positions"
                                      : "k_cache: at most 2^31 - 1 positions per sequence");
  if (!block_table.has_value()) return {nullptr, g.capacity, kv::FastDiv::make(1), 0, 0};
  return {block_table->data_ptr<int32_t>(), g.capacity, kv::FastDiv::make(static_cast<uint32_t>(g.block_size)),
          g.max_blocks, g.num_blocks};
}

// Widest copy (16, 8, 4 or 2 bytes, at least one element) that divides every byte count,
// stride and address in `values`.
int vector_bytes(int64_t elt, std::initializer_list<int64_t> values) {
  for (int v = 16; v > elt; v /= 2) {
    bool ok = true;
    for (int64_t x : values) ok &= (x % v) == 0;
    if (ok) return v;
  }
  return static_cast<int>(elt);
}

using cudart::address;
using cudart::copy_strides;

// Packed form: cu (B + 1,) int32 contiguous on the kernel device, and the packed tensor a
// (1, H, total, D) view. The values are not checked (that would cost a host sync on a GPU): the
// kernels clamp every span into [0, total] (docs/INTERNALS.md "Packed sequences").
const int32_t* check_cu(const std::optional<at::Tensor>& cu, int64_t B, const at::Tensor& packed, const char* name,
                        const char* op) {
  if (!cu.has_value()) return nullptr;
  const at::Tensor& c = *cu;
  host::check_device(kDevice, c, op, ": ", name);
  TORCH_CHECK(c.scalar_type() == at::kInt && c.dim() == 1 && c.size(0) == B + 1 && c.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D int32 tensor of B+1 = ", B + 1, " offsets, got ", c.scalar_type(), " ",
              c.sizes());
  TORCH_CHECK(packed.size(0) == 1, op, ": with ", name, " the packed rows must be a (1, H, total, D) view, got ",
              packed.sizes());
  return c.data_ptr<int32_t>();
}

}  // namespace

void kv_cache_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new_in,
                          const at::Tensor& v_new_in, const at::Tensor& cache_seqlens,
                          const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cu_seqlens) {
  check_cache(k_cache, v_cache);
  host::check_new_rows(k_new_in, v_new_in, k_cache, v_cache, kDevice);
  // Packed (cu_seqlens): k_new is the (1, H, total, D) view and B the number of sequences.
  const int64_t nseq = cu_seqlens.has_value() ? cache_seqlens.numel() : k_new_in.size(0);
  const int32_t* cu = check_cu(cu_seqlens, nseq, k_new_in, "cu_seqlens", "seqkernels::kv_cache_append (cuda)");
  const int64_t B = k_new_in.size(0), H = k_new_in.size(1), T = k_new_in.size(2), D = k_new_in.size(3);
  const int64_t Dv = v_cache.size(3);
  const kv::CacheLayout layout = check_layout(k_cache, block_table, nseq);
  host::check_seqlens(cache_seqlens, nseq, kDevice);
  if (nseq == 0 || B == 0 || H == 0 || T == 0) return;
  const cudart::DeviceGuard guard(k_cache);
  // The kernel copies whole rows as bytes, so the new rows' head dim must be contiguous.
  const at::Tensor k_new = k_new_in.stride(3) == 1 ? k_new_in : k_new_in.contiguous();
  const at::Tensor v_new = v_new_in.stride(3) == 1 ? v_new_in : v_new_in.contiguous();

  const int64_t elt = k_cache.element_size();
  kv::AppendParams p{};
  p.k_new = static_cast<const char*>(k_new.data_ptr());
  p.v_new = static_cast<const char*>(v_new.data_ptr());
  p.k_cache = static_cast<char*>(k_cache.data_ptr());
  p.v_cache = static_cast<char*>(v_cache.data_ptr());
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  p.layout = layout;
  TORCH_CHECK(B * H * T < (int64_t{1} << 32) && T < (int64_t{1} << 31) && H < (int64_t{1} << 31),
              "k_new: B * Hkv * T must be below 2^32 rows per launch");
  p.H = kv::FastDiv::make(static_cast<uint32_t>(H));
  p.T = kv::FastDiv::make(static_cast<uint32_t>(T));
  p.rows = static_cast<uint32_t>(B * H * T);
  p.cu = cu;
  p.nseq = nseq;
  copy_strides(p.kn, k_new, elt);  // bytes
  copy_strides(p.vn, v_new, elt);
  copy_strides(p.kc, k_cache, elt);
  copy_strides(p.vc, v_cache, elt);
  const int vec = vector_bytes(
      elt, {D * elt, Dv * elt, p.kn[0], p.kn[1], p.kn[2], p.vn[0], p.vn[1], p.vn[2], p.kc[0], p.kc[1], p.kc[2], p.vc[0],
            p.vc[1], p.vc[2], address(k_new), address(v_new), address(k_cache), address(v_cache)});
  p.k_chunks = static_cast<uint32_t>(D * elt / vec);
  p.chunks = static_cast<uint32_t>((D + Dv) * elt / vec);
  constexpr int kRows = kv::kAppendRowsPerBlock;
  const int64_t max_blocks = static_cast<int64_t>(cudart::multiprocessor_count()) * 32;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min((B * H * T + kRows - 1) / kRows, max_blocks))));
  const dim3 block(32, kRows);
  const cudaStream_t stream = cudart::current_stream();
  switch (vec) {
    case 16: {
      auto kernel = &kv::_kv_cache_append_kernel<16>;
      SK_LAUNCH(kernel, grid, block, 0, stream, p);
      break;
    }
    case 8: {
      auto kernel = &kv::_kv_cache_append_kernel<8>;
      SK_LAUNCH(kernel, grid, block, 0, stream, p);
      break;
    }
    case 4: {
      auto kernel = &kv::_kv_cache_append_kernel<4>;
      SK_LAUNCH(kernel, grid, block, 0, stream, p);
      break;
    }
    default: {
      auto kernel = &kv::_kv_cache_append_kernel<2>;
      SK_LAUNCH(kernel, grid, block, 0, stream, p);
      break;
    }
  }
}

namespace {

// The modifiers are a compile-time variant, so the kernel without them keeps its registers.
template <typename T, int HEAD, int ROWS>
void launch_decode(const kv::DecodeParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int kThreads = kv::DecodeGeometry<T, HEAD>::kThreads;
  if (p.softcap > 0.0f || p.alibi != nullptr || p.sinks != nullptr) {
    auto kernel = &kv::_decode_attention_kernel<T, HEAD, ROWS, true>;
    SK_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, p);
  } else {
    auto kernel = &kv::_decode_attention_kernel<T, HEAD, ROWS, false>;
    SK_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, p);
  }
}

template <typename T, int HEAD>
void launch_decode_rows(int rows, const kv::DecodeParams& p, dim3 grid, cudaStream_t stream) {
  switch (rows) {
    case 1:
      launch_decode<T, HEAD, 1>(p, grid, stream);
      break;
    case 4:
      launch_decode<T, HEAD, 4>(p, grid, stream);
      break;
    default:
      launch_decode<T, HEAD, 8>(p, grid, stream);
      break;
  }
}

template <typename scalar_t>
void run_decode(const kv::DecodeParams& p, dim3 grid, int rows, int64_t widest, cudaStream_t stream) {
  using T = cudart::device_type_t<scalar_t>;
  if (widest <= 64) {
    launch_decode_rows<T, 64>(rows, p, grid, stream);
  } else if (widest <= 128) {
    launch_decode_rows<T, 128>(rows, p, grid, stream);
  } else {
    launch_decode_rows<T, 256>(rows, p, grid, stream);
  }
  if (p.num_splits > 1) {
    kv::MergeParams mp{p.out_partial, p.lse_partial, p.out, p.lse, p.lse_rows, p.Dv, p.num_splits};
    mp.sinks = p.sinks;  // merged once, after the splits
    mp.Hq = p.Hq;
    mp.Tq = p.Tq;  // packed: total_q (the view's one batch entry)
    mp.cu_q = p.cu_q;
    mp.B = p.B;
    constexpr int kWarps = 4;
    const dim3 mgrid(static_cast<unsigned>((mp.rows + kWarps - 1) / kWarps));
    auto kernel = &kv::_decode_merge_kernel<T>;
    SK_LAUNCH(kernel, mgrid, dim3(32 * kWarps), 0, stream, mp);
  }
}

// ---------------------------------------------------------------------------------------------
// Filling DecodeParams, one block of fields at a time.

// q (contiguous) and the caches (element strides over (outer, kv head, slot)), with the sizes
// the kernel indexes them by.
void fill_qkv(kv::DecodeParams& p, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  copy_strides(p.k_stride, k_cache);
  copy_strides(p.v_stride, v_cache);
  p.B = q.size(0);
  p.Hq = q.size(1);
  for (int i = 0; i < 3; ++i) p.q_stride[i] = q.stride(i);
  p.Hkv = k_cache.size(1);
  p.G = p.Hq / p.Hkv;
  p.Tq = q.size(2);
  p.D = q.size(3);
  p.Dv = v_cache.size(3);
  p.n_rows = p.G * p.Tq;
  // 16-byte loads of K/V rows need the head dims, the strides and the bases aligned to them.
  const int64_t vec_elems = 16 / k_cache.element_size();
  p.vec_ok = p.D % vec_elems == 0 && p.Dv % vec_elems == 0 && address(k_cache) % 16 == 0 && address(v_cache) % 16 == 0;
  for (int i = 0; i < 3; ++i) p.vec_ok &= k_cache.stride(i) % vec_elems == 0 && v_cache.stride(i) % vec_elems == 0;
}

// Which keys a row sees: the cache lengths, where positions live, the window.
void fill_band(kv::DecodeParams& p, const at::Tensor& seqlens, const kv::CacheLayout& layout, int64_t window_left) {
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.layout = layout;
  p.window_left = window_left;
  p.window_right = 0;  // causal: the right side is clamped to 0 (-1 included), as in decode_attention_ref
}

// One split writes out and lse itself; several write float32 partials that the merge combines.
void fill_outputs(kv::DecodeParams& p, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_partial,
                  const at::Tensor& lse_partial, int64_t num_splits) {
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  for (int i = 0; i < 3; ++i) {
    p.o_stride[i] = out.stride(i);
    p.l_stride[i] = lse.stride(i);
  }
  p.lse_rows = lse.numel();
  p.out_partial = num_splits > 1 ? out_partial.data_ptr<float>() : nullptr;
  p.lse_partial = num_splits > 1 ? lse_partial.data_ptr<float>() : nullptr;
  p.num_splits = num_splits;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& block_table, double scale, int64_t window_left, int64_t window_right,
    int64_t num_splits, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
    double softcap, const std::optional<at::Tensor>& cu_seqlens_q, int64_t max_seqlen_q) {
  constexpr const char* op = "seqkernels::decode_attention (cuda)";
  check_cache(k_cache, v_cache);
  // 65535: the splits are the grid's z dimension.
  host::check_decode_args(q_in, k_cache, num_splits, window_left, window_right, 65535, kDevice);
  // After the decode checks, which establish that q is (B, Hq, Tq, D) (the modifiers' shapes
  // are read from it).
  // Packed (cu_seqlens_q): q is the (1, Hq, total_q, D) view and B the number of sequences.
  const bool packed = cu_seqlens_q.has_value();
  const int64_t B = packed ? cache_seqlens.numel() : q_in.size(0);
  const int32_t* cu_q = check_cu(cu_seqlens_q, B, q_in, "cu_seqlens_q", op);
  TORCH_CHECK(max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0, got ", max_seqlen_q);
  const host::ModifierArgs<float> mods =
      host::check_modifiers<float>(alibi_slopes, sinks, softcap, B, q_in.size(1), kDevice, op);
  const int64_t Hq = q_in.size(1), Tq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_cache.size(1), Dv = v_cache.size(3);
  TORCH_CHECK(D >= 1 && Dv >= 1 && D <= 256 && Dv <= 256, "q, v_cache: head dims must be in [1, 256], got D=", D,
              ", Dv=", Dv);
  const kv::CacheLayout layout = check_layout(k_cache, block_table, B);
  host::check_seqlens(cache_seqlens, B, kDevice);
  const cudart::DeviceGuard guard(q_in);

  // Packed: out is (total_q, Hq, Dv) storage seen as (1, Hq, total_q, Dv); rows in no sequence
  // (unchecked offsets only) keep 0 / -inf.
  const int64_t OB = q_in.size(0);
  at::Tensor out = packed ? at::zeros({Tq, Hq, Dv}, q_in.options()).permute({1, 0, 2}).unsqueeze(0)
                          : at::empty({OB, Hq, Tq, Dv}, q_in.options());
  at::Tensor lse = packed ? at::full({OB, Hq, Tq}, -INFINITY, q_in.options().dtype(at::kFloat))
                          : at::empty({OB, Hq, Tq}, q_in.options().dtype(at::kFloat));
  if ((out.numel() == 0 && lse.numel() == 0) || B == 0) return {out, lse};
  // The head dim must be contiguous; the other dims are read through their strides.
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();

  // Packed: the row tile is sized for the longest sequence (max_seqlen_q, else the mean).
  const int64_t G = Hq / Hkv;
  const int64_t per_seq = packed ? (max_seqlen_q > 0 ? max_seqlen_q : (Tq + B - 1) / B) : Tq;
  const int64_t n_rows = G * per_seq;
  const int rows = n_rows >= 5 ? 8 : (n_rows >= 2 ? 4 : 1);
  TORCH_CHECK(G * Tq < (int64_t{1} << 31), "q: Hq / Hkv * Tq must be below 2^31");
  dim3 grid;
  at::Tensor tile_cu;
  if (packed) {
    // Row tiles of every sequence, cumulated on the device (no host sync): at most
    // ceil(G * total_q / rows) + B tiles, each program finds its (sequence, tile) by binary search.
    const int64_t tiles = (G * Tq + rows - 1) / rows + B;
    TORCH_CHECK(tiles * Hkv <= 0x7fffffff, "q: too many query rows for one launch");
    const at::Tensor cu = cu_seqlens_q->to(at::kLong);
    const at::Tensor c0 = cu.slice(0, 0, B).clamp(0, Tq);
    const at::Tensor c1 = at::maximum(cu.slice(0, 1, B + 1).clamp(0, Tq), c0);
    const at::Tensor per = at::floor_divide(c1.sub(c0).mul(G).add(rows - 1), rows);
    tile_cu = at::cat({at::zeros({1}, per.options()), at::cumsum(per, 0)});
    grid = dim3(static_cast<unsigned>(tiles * Hkv), 1, static_cast<unsigned>(num_splits));
  } else {
    const int64_t row_tiles = (n_rows + rows - 1) / rows;
    TORCH_CHECK(row_tiles <= 65535, "q: too many query rows per kv head (", n_rows, "); at most ", 65535 * rows);
    TORCH_CHECK(B * Hkv <= 0x7fffffff, "q: B * Hkv is too large for one launch");
    grid = dim3(static_cast<unsigned>(B * Hkv), static_cast<unsigned>(row_tiles), static_cast<unsigned>(num_splits));
  }

  at::Tensor out_partial, lse_partial;
  if (num_splits > 1) {
    out_partial = at::empty({num_splits, lse.numel(), Dv}, q_in.options().dtype(at::kFloat));
    lse_partial = at::empty({num_splits, lse.numel()}, q_in.options().dtype(at::kFloat));
  }
  kv::DecodeParams p{};
  fill_qkv(p, q, k_cache, v_cache);
  p.B = B;
  p.qk_scale = static_cast<float>(scale);
  fill_band(p, cache_seqlens, layout, window_left);
  fill_outputs(p, out, lse, out_partial, lse_partial, num_splits);
  p.softcap = mods.softcap;
  p.alibi = mods.alibi;
  p.sinks = mods.sinks;
  p.cu_q = cu_q;
  p.tile_cu = packed ? tile_cu.data_ptr<int64_t>() : nullptr;
  p.total_q = Tq;

  const cudaStream_t stream = cudart::current_stream();
  const int64_t widest = std::max(D, Dv);
  AT_DISPATCH_SWITCH(q.scalar_type(), "decode_attention_cuda", AT_DISPATCH_CASE(at::kHalf, [&] {
                       run_decode<scalar_t>(p, grid, rows, widest, stream);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       run_decode<scalar_t>(p, grid, rows, widest, stream);
                     }) AT_DISPATCH_CASE(at::kFloat, [&] { run_decode<scalar_t>(p, grid, rows, widest, stream); }));
  return {out, lse};
}

}  // namespace seqkernels

SK_REGISTER_CUDA(kv_cache_append, seqkernels::kv_cache_append_cuda);
SK_REGISTER_CUDA(decode_attention, seqkernels::decode_attention_cuda);
