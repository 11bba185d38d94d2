// Row kernels of the fused LSTM cell, written once against a "lanes" policy L:
//   L::S (storage type), L::V (value type: a scalar, an at::vec::Vectorized of the compute type
//   or lstm_cell.cpp's AVX-512 wrapper avx512_isa::Z), L::W (lanes per V), L::load / L::load_n / L::store_n (n <= W),
//   and the math policy L::sigmoid / L::tanh used by common/lstm_gates.h.
//
// No include guard on purpose: lstm_cell.cpp includes this file three times, once for the baseline
// ISA and once in each region compiled for AVX2+FMA and for AVX-512, into three namespaces. A
// function's target ISA is fixed where it is defined, so each ISA needs its own definition
// (of the gate math too, or the SIMD operators could not be inlined into it).

#include "../common/lstm_gates.h"

// Columns [j0, j1) of row b: gates = input_gates + hidden_gates (+ biases), then the cell.
template <class L>
void fwd_range(const FwdArgs& a, int64_t b, int64_t j0, int64_t j1) {
  using S = typename L::S;
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const int64_t H = a.H;
  const S* ig = static_cast<const S*>(a.input_gates) + b * a.input_gates_rs;
  const S* hg = static_cast<const S*>(a.hidden_gates) + b * a.hidden_gates_rs;
  const S* cx = static_cast<const S*>(a.cx) + b * a.cx_rs;
  const S* bih = static_cast<const S*>(a.bias_ih);
  const S* bhh = static_cast<const S*>(a.bias_hh);
  S* hy = static_cast<S*>(a.hy) + b * H;
  S* cy = static_cast<S*>(a.cy) + b * H;
  S* ws = static_cast<S*>(a.workspace) + b * 4 * H;
  for (int64_t j = j0; j < j1; j += W) {
    const int64_t n = j1 - j < W ? j1 - j : W;
    V pre[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t col = k * H + j;
      V x = L::load_n(ig + col, n) + L::load_n(hg + col, n);
      if (bih != nullptr) x = x + L::load_n(bih + col, n);
      if (bhh != nullptr) x = x + L::load_n(bhh + col, n);
      pre[k] = x;
    }
    V gi, gf, gg, go, c, h;
    cell_forward<L>(pre[0], pre[1], pre[2], pre[3], L::load_n(cx + j, n), gi, gf, gg, go, c, h);
    L::store_n(ws + j, gi, n);
    L::store_n(ws + H + j, gf, n);
    L::store_n(ws + 2 * H + j, gg, n);
    L::store_n(ws + 3 * H + j, go, n);
    L::store_n(cy + j, c, n);
    L::store_n(hy + j, h, n);
  }
}

// Columns [j0, j1) of row b of the backward; an absent grad_hy / grad_cy reads as zero.
template <class L>
void bwd_range(const BwdArgs& a, int64_t b, int64_t j0, int64_t j1) {
  using S = typename L::S;
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const int64_t H = a.H;
  const S* gh = a.grad_hy ? static_cast<const S*>(a.grad_hy) + b * a.grad_hy_rs : nullptr;
  const S* gc = a.grad_cy ? static_cast<const S*>(a.grad_cy) + b * a.grad_cy_rs : nullptr;
  const S* cx = static_cast<const S*>(a.cx) + b * a.cx_rs;
  const S* cy = static_cast<const S*>(a.cy) + b * a.cy_rs;
  const S* ws = static_cast<const S*>(a.workspace) + b * a.workspace_rs;
  S* gg = static_cast<S*>(a.grad_gates) + b * 4 * H;
  S* gcx = static_cast<S*>(a.grad_cx) + b * H;
  const V zero(0);
  for (int64_t j = j0; j < j1; j += W) {
    const int64_t n = j1 - j < W ? j1 - j : W;
    const V dh = gh ? L::load_n(gh + j, n) : zero;
    const V dcy = gc ? L::load_n(gc + j, n) : zero;
    V di, df, dg, d_o, dcx;
    cell_backward<L>(dh, dcy, L::load_n(cx + j, n), L::load_n(cy + j, n), L::load_n(ws + j, n),
                     L::load_n(ws + H + j, n), L::load_n(ws + 2 * H + j, n), L::load_n(ws + 3 * H + j, n), di, df, dg,
                     d_o, dcx);
    L::store_n(gg + j, di, n);
    L::store_n(gg + H + j, df, n);
    L::store_n(gg + 2 * H + j, dg, n);
    L::store_n(gg + 3 * H + j, d_o, n);
    L::store_n(gcx + j, dcx, n);
  }
}

// One time step of the sequence kernel (lstm_layer_fwd) for hidden units [j0, j1) of row b:
// pre-activation gates = this step's input projection (gate k of unit j at k*H + j) + the recurrent
// GEMM's result for the calling thread's block of units (gate k of unit j at k*nu + j - u0) + the
// bias; the cell state is updated in place and h is written to the step's output row.
template <class L>
void seq_step_range(const SeqStepArgs& a, int64_t b, int64_t j0, int64_t j1) {
  using S = typename L::S;
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const int64_t H = a.H, nu = a.nu, u0 = a.u0;
  const S* ig = static_cast<const S*>(a.input_gates) + b * 4 * H;
  const S* hg = static_cast<const S*>(a.hidden_gates) + b * 4 * nu - u0;
  const S* bias = static_cast<const S*>(a.bias);
  S* c = static_cast<S*>(a.c) + b * H;
  S* h = static_cast<S*>(a.h_out) + b * H;
  for (int64_t j = j0; j < j1; j += W) {
    const int64_t n = j1 - j < W ? j1 - j : W;
    V pre[4];
    for (int k = 0; k < 4; ++k) {
      V x = L::load_n(ig + k * H + j, n) + L::load_n(hg + k * nu + j, n);
      if (bias != nullptr) x = x + L::load_n(bias + k * H + j, n);
      pre[k] = x;
    }
    V gi, gf, gg, go, cy, hy;
    cell_forward<L>(pre[0], pre[1], pre[2], pre[3], L::load_n(c + j, n), gi, gf, gg, go, cy, hy);
    L::store_n(c + j, cy, n);
    L::store_n(h + j, hy, n);
  }
}
