// seqkernels::lstm_cell_fwd / lstm_cell_bwd on CUDA tensors: validation, the param structs and
// the choice of instantiation for the kernels of lstm_cell.cuh (schemas in
// csrc/registration.cpp, contract in docs/INTERNALS.md).
//
// The vector path (16-byte accesses) needs H to be a multiple of the vector width and every base
// pointer and row stride aligned to it; anything else takes the one-element path, which is
// correct for every shape and stride.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/host_checks.h"
#include "cuda/launch.cuh"
#include "cuda/lstm_cell.cuh"
#include "cuda/register.cuh"
#include "cuda/stream.cuh"

namespace seqkernels {
namespace {

constexpr int kThreads = 256;

// Where the kernels read their tensors (the CPU under the CUDA-on-CPU harness), for the shared
// checks of common/host_checks.h.
constexpr host::Device kDevice{&cudart::on_kernel_device, &cudart::kernel_device_name};

// Last dim contiguous; rows may be strided (the per-step slices of a projected sequence are).
at::Tensor rows_of(const at::Tensor& t) { return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous(); }

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

// Whether `t` (2-D rows or a 1-D bias) can be read VEC elements at a time.
bool vec_ok(const at::Tensor& t, int vec) {
  if (!t.defined()) return true;
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (addr % (static_cast<uintptr_t>(vec) * t.element_size()) != 0) return false;
  return t.dim() == 1 || row_stride(t) % vec == 0;
}

template <typename Params>
int64_t num_blocks(const Params& p, int vec) {
  return (p.rows * (p.H / vec) + kThreads - 1) / kThreads;
}

template <typename T, typename Params, typename Kernel16, typename Kernel1>
void launch(const Params& p, bool vector_path, Kernel16 k16, Kernel1 k1) {
  constexpr int VEC = 16 / sizeof(T);
  const cudaStream_t stream = cudart::current_stream();
  if (vector_path) {
    auto kernel = k16;
    SK_LAUNCH(kernel, dim3(static_cast<unsigned>(num_blocks(p, VEC))), dim3(kThreads), 0, stream, p);
  } else {
    auto kernel = k1;
    SK_LAUNCH(kernel, dim3(static_cast<unsigned>(num_blocks(p, 1))), dim3(kThreads), 0, stream, p);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cuda(const at::Tensor& input_gates,
                                                                  const at::Tensor& hidden_gates, const at::Tensor& cx,
                                                                  const std::optional<at::Tensor>& bias_ih,
                                                                  const std::optional<at::Tensor>& bias_hh) {
  const int64_t H = host::check_lstm_fwd(input_gates, hidden_gates, cx, bias_ih, bias_hh, kDevice);
  const int64_t B = input_gates.size(0), G = 4 * H;
  const at::Tensor bi = bias_ih.has_value() ? bias_ih->contiguous() : at::Tensor();
  const at::Tensor bh = bias_hh.has_value() ? bias_hh->contiguous() : at::Tensor();
  TORCH_CHECK(B * G < (int64_t(1) << 40), "seqkernels::lstm_cell_fwd: input_gates is too large (", B, " x ", G, ")");

  const cudart::DeviceGuard guard(input_gates);
  auto opts = input_gates.options();
  at::Tensor hy = at::empty({B, H}, opts), cy = at::empty({B, H}, opts), ws = at::empty({B, G}, opts);
  if (B == 0 || H == 0) return {hy, cy, ws};
  const at::Tensor ig = rows_of(input_gates), hg = rows_of(hidden_gates), c = rows_of(cx);

  lstm_cuda::FwdParams p{ig.data_ptr(),
                         hg.data_ptr(),
                         c.data_ptr(),
                         bi.defined() ? bi.data_ptr() : nullptr,
                         bh.defined() ? bh.data_ptr() : nullptr,
                         hy.data_ptr(),
                         cy.data_ptr(),
                         ws.data_ptr(),
                         B,
                         H,
                         row_stride(ig),
                         row_stride(hg),
                         row_stride(c)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_gates.scalar_type(), "lstm_cell_fwd_cuda", [&] {
    using T = cudart::device_type_t<scalar_t>;
    constexpr int VEC = 16 / sizeof(T);
    const bool vector_path = H % VEC == 0 && vec_ok(ig, VEC) && vec_ok(hg, VEC) && vec_ok(c, VEC) && vec_ok(bi, VEC) &&
                             vec_ok(bh, VEC) && vec_ok(hy, VEC) && vec_ok(ws, VEC);
    launch<T>(p, vector_path, &lstm_cuda::lstm_cell_fwd_kernel<T, VEC>, &lstm_cuda::lstm_cell_fwd_kernel<T, 1>);
  });
  return {hy, cy, ws};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_bwd_cuda(const std::optional<at::Tensor>& grad_hy,
                                                      const std::optional<at::Tensor>& grad_cy, const at::Tensor& cx,
                                                      const at::Tensor& cy, const at::Tensor& workspace) {
  const int64_t H = host::check_lstm_bwd(grad_hy, grad_cy, cx, cy, workspace, kDevice);
  const int64_t B = workspace.size(0), G = 4 * H;
  TORCH_CHECK(B * G < (int64_t(1) << 40), "seqkernels::lstm_cell_bwd: workspace is too large (", B, " x ", G, ")");

  const cudart::DeviceGuard guard(workspace);
  auto opts = workspace.options();
  at::Tensor grad_gates = at::empty({B, G}, opts), grad_cx = at::empty({B, H}, opts);
  if (B == 0 || H == 0) return {grad_gates, grad_cx};
  const at::Tensor gh = grad_hy.has_value() ? rows_of(*grad_hy) : at::Tensor();
  const at::Tensor gc = grad_cy.has_value() ? rows_of(*grad_cy) : at::Tensor();
  const at::Tensor c = rows_of(cx), cyr = rows_of(cy), ws = rows_of(workspace);

  lstm_cuda::BwdParams p{gh.defined() ? gh.data_ptr() : nullptr,
                         gc.defined() ? gc.data_ptr() : nullptr,
                         c.data_ptr(),
                         cyr.data_ptr(),
                         ws.data_ptr(),
                         grad_gates.data_ptr(),
                         grad_cx.data_ptr(),
                         B,
                         H,
                         gh.defined() ? row_stride(gh) : 0,
                         gc.defined() ? row_stride(gc) : 0,
                         row_stride(c),
                         row_stride(cyr),
                         row_stride(ws)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, workspace.scalar_type(), "lstm_cell_bwd_cuda", [&] {
    using T = cudart::device_type_t<scalar_t>;
    constexpr int VEC = 16 / sizeof(T);
    const bool vector_path = H % VEC == 0 && vec_ok(gh, VEC) && vec_ok(gc, VEC) && vec_ok(c, VEC) && vec_ok(cyr, VEC) &&
                             vec_ok(ws, VEC) && vec_ok(grad_gates, VEC) && vec_ok(grad_cx, VEC);
    launch<T>(p, vector_path, &lstm_cuda::lstm_cell_bwd_kernel<T, VEC>, &lstm_cuda::lstm_cell_bwd_kernel<T, 1>);
  });
  return {grad_gates, grad_cx};
}

}  // namespace seqkernels

SK_REGISTER_CUDA(lstm_cell_fwd, seqkernels::lstm_cell_fwd_cuda);
SK_REGISTER_CUDA(lstm_cell_bwd, seqkernels::lstm_cell_bwd_cuda);
