// LSTM cell gate math shared by the CPU kernels (scalar and at::vec lanes) and the CUDA kernel
// (torch-free). One definition of the formulas, so every C++ backend computes the same thing.
//
// Gates arrive pre-activation in torch's order (i, f, g, o) as the sum
// input_gates + hidden_gates (+ bias_ih + bias_hh). Forward:
//   i = sigmoid(gi), f = sigmoid(gf), g = tanh(gg), o = sigmoid(go)
//   cy = f * cx + i * g,  hy = o * tanh(cy)
// Backward, from the saved activated gates and cy (tanh(cy) is recomputed, not stored):
//   dc  = grad_cy + grad_hy * o * (1 - tanh(cy)^2)
//   di  = dc * g * i (1 - i),  df = dc * cx * f (1 - f),  dg = dc * i * (1 - g^2)
//   do  = grad_hy * tanh(cy) * o (1 - o),  grad_cx = dc * f
//
// `M` is a math policy giving `M::sigmoid(V)` and `M::tanh(V)` for the value type `V` (float,
// double, or a SIMD vector); `V(1)` must broadcast the constant.
//
// No include guard and no namespace on purpose: include it inside your own namespace. The CPU
// file compiles these templates once per instruction set (baseline and AVX2), and a function's
// target ISA is fixed where it is defined, so each ISA needs its own definition to inline the
// SIMD operators into.

#include "macros.h"

template <class M, class V>
SK_HOST_DEVICE SK_INLINE void cell_forward(V gi, V gf, V gg, V go, V cx, V& i, V& f, V& g, V& o, V& cy, V& hy) {
  i = M::sigmoid(gi);
  f = M::sigmoid(gf);
  g = M::tanh(gg);
  o = M::sigmoid(go);
  cy = f * cx + i * g;
  hy = o * M::tanh(cy);
}

template <class M, class V>
SK_HOST_DEVICE SK_INLINE void cell_backward(V grad_hy, V grad_cy, V cx, V cy, V i, V f, V g, V o, V& di, V& df, V& dg,
                                            V& d_o, V& grad_cx) {
  const V one(1);
  const V tc = M::tanh(cy);
  const V dc = grad_cy + grad_hy * o * (one - tc * tc);
  d_o = grad_hy * tc * o * (one - o);
  di = dc * g * i * (one - i);
  df = dc * cx * f * (one - f);
  dg = dc * i * (one - g * g);
  grad_cx = dc * f;
}
