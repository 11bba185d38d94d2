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

// dst[k * dst_ld + l] = src[l * ld + k] for l < W, k < K (zero for l >= nrows): one gate's W rows
// of a weight matrix, transposed into the packed block. The AVX-512 lanes transpose 16 x 16 tiles
// in registers (the one-float strided stores were 4% of an inference call at T128 B16 H256).
template <class L>
void pack_gate_rows(const float* src, int64_t ld, int64_t nrows, int64_t K, float* dst, int64_t dst_ld) {
  constexpr int64_t W = L::W;
  if constexpr (L::kTransposeRows) {
    L::transpose_rows(src, ld, nrows, K, dst, dst_ld);
  } else {
    for (int64_t l = 0; l < W; ++l) {
      float* d = dst + l;
      if (l < nrows) {
        for (int64_t k = 0; k < K; ++k) d[k * dst_ld] = src[l * ld + k];
      } else {
        for (int64_t k = 0; k < K; ++k) d[k * dst_ld] = 0.f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The fused sequence kernel (lstm_layer_fwd, float32, the AVX2 and AVX-512 lanes): the recurrent
// GEMM of a block of W hidden units and the cell of those units in one pass, no gates buffer.
//
// Packed weights: block j (units [j W, j W + W)) is a (I + H, 4, W) array, element (k, g, l) =
// W_ih[g H + j W + l, k] for k < I (the input projection, when the kernel is given the input x) and
// W_hh[g H + j W + l, k - I] after, zero for units past H; a step reads it front to back.
template <class L>
void seq_fused_pack(const SeqFusedArgs& a, int64_t blk0, int64_t blk1) {
  constexpr int64_t W = L::W;
  const int64_t H = a.H, I = a.I, K = I + H;
  for (int64_t j = blk0; j < blk1; ++j) {
    float* dst = a.packed + j * K * 4 * W;
    const int64_t nrows = H - j * W < W ? H - j * W : W;
    for (int g = 0; g < 4; ++g) {
      if (I > 0) pack_gate_rows<L>(a.weight_ih + (g * H + j * W) * I, I, nrows, I, dst + g * W, 4 * W);
      pack_gate_rows<L>(a.weight_hh + (g * H + j * W) * H, H, nrows, H, dst + I * 4 * W + g * W, 4 * W);
    }
  }
}

// part[g][r] = sum over k in [k0, k1) of x[r ld + k] wp[k, g, :], summed from zero: one chunk of
// the K loop of the tiles below, 4 R vector registers.
template <class L, int R>
__attribute__((always_inline)) inline void seq_partial(typename L::V (&part)[4][R], const float* wp, const float* x,
                                                       int64_t ld, int64_t k0, int64_t k1) {
  using V = typename L::V;
  constexpr int64_t W = L::W;
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) part[g][r] = L::bcast(0.f);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const float* wk = wp + k * 4 * W;
    const V w0 = L::loadu(wk), w1 = L::loadu(wk + W), w2 = L::loadu(wk + 2 * W), w3 = L::loadu(wk + 3 * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V xb = L::bcast(x[r * ld + k]);
      part[0][r] = L::fma(xb, w0, part[0][r]);
      part[1][r] = L::fma(xb, w1, part[1][r]);
      part[2][r] = L::fma(xb, w2, part[2][r]);
      part[3][r] = L::fma(xb, w3, part[3][r]);
    }
  }
}

// The K loops sum in chunks of kSeqChunk terms, each from zero, added to the running total once: a
// sequential float32 sum's rounding error grows with its length, and at H = 49 a single chain put
// the cell state 10% past the parity bound against a BLAS that blocks its sums (MKL on an AVX-512
// Xeon). In the forward step (seq_fused_step) a chunk is also the unit of the loop order.
constexpr int64_t kSeqChunk = 32;

// acc[g][r] += sum over k < K of src[r ld + k] wp[k, g, :], chunk by chunk (the backward's tiles).
template <class L, int R>
__attribute__((always_inline)) inline void seq_kloop(typename L::V (&acc)[4][R], const float* wp, const float* src,
                                                     int64_t ld, int64_t K) {
  for (int64_t k0 = 0; k0 < K; k0 += kSeqChunk) {
    typename L::V part[4][R];
    seq_partial<L, R>(part, wp, src, ld, k0, K - k0 < kSeqChunk ? K : k0 + kSeqChunk);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[g][r] = acc[g][r] + part[g][r];
    }
  }
}

// acc[(b0 + r) 4 W + g W + :] += sum over k in [k0, k1) of src[(b0 + r) ld + k] wp[k, g, :] for
// r < R: one chunk for R rows, added to the rows' totals in memory (seq_fused_step's loop order).
template <class L, int R>
__attribute__((always_inline)) inline void seq_chunk_rows(float* acc, const float* wp, const float* src, int64_t ld,
                                                          int64_t k0, int64_t k1, int64_t b0) {
  typename L::V part[4][R];
  seq_partial<L, R>(part, wp, src + b0 * ld, ld, k0, k1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* ar = acc + (b0 + r) * 4 * L::W;
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) L::storeu(ar + g * L::W, L::loadu(ar + g * L::W) + part[g][r]);
  }
}

// One chunk [k0, k1) of the K loop for every batch row: R rows at a time, the remainder by
// narrower tiles (row_tiles in lstm_cell.cpp).
template <class L>
void seq_chunk(float* acc, const float* wp, const float* src, int64_t ld, int64_t k0, int64_t k1, int64_t B) {
  constexpr int R = L::kSeqRows;
  static_assert(R >= 1 && R <= 6, "the remainder tiles below cover R <= 6");
  const RowTiles rt = row_tiles(B, R);
  int64_t b0 = 0;
  for (int64_t f = 0; f < rt.full; ++f, b0 += R) seq_chunk_rows<L, R>(acc, wp, src, ld, k0, k1, b0);
  if constexpr (R > 4) {
    if (rt.four != 0) {
      seq_chunk_rows<L, 4>(acc, wp, src, ld, k0, k1, b0);
      b0 += 4;
    }
  }
  switch (rt.last) {
    case 0:
      break;
    case 1:
      seq_chunk_rows<L, 1>(acc, wp, src, ld, k0, k1, b0);
      break;
    case 2:
      if constexpr (R > 2) seq_chunk_rows<L, 2>(acc, wp, src, ld, k0, k1, b0);
      break;
    case 3:
      if constexpr (R > 3) seq_chunk_rows<L, 3>(acc, wp, src, ld, k0, k1, b0);
      break;
    case 4:
      if constexpr (R > 4) seq_chunk_rows<L, 4>(acc, wp, src, ld, k0, k1, b0);
      break;
    default:
      if constexpr (R > 5) seq_chunk_rows<L, 5>(acc, wp, src, ld, k0, k1, b0);
      break;
  }
}

// Prefetches the 4 gates' runs of n floats of one row of input gates (H apart) into L2, for reading.
inline void prefetch_gate_row(const float* p, int64_t H, int64_t n) {
  for (int g = 0; g < 4; ++g) {
    __builtin_prefetch(p + g * H, 0, 2);
    __builtin_prefetch(p + g * H + n - 1, 0, 2);
  }
}

// Step s (of T; time index T - 1 - s when reverse) for the unit blocks [blk0, blk1). Per unit
// block, the GEMM runs chunk by chunk of kSeqChunk values of K (x_t's, then h_prev's), each chunk
// for every batch row before the next: the chunk's packed weights (kSeqChunk x 4 W floats, 8 KB
// with AVX-512) stay in L1 across the row tiles instead of the whole block's (I + H) x 4 W being
// streamed from L2 once per row tile, and every chunk is summed from zero before it is added to
// the rows' accumulators (the rounding error of one chunk's length, not K's). Then the epilogue
// per row: + input gates (when given) + bias, the cell, c and h stored.
template <class L>
void seq_fused_step(const SeqFusedArgs& a, int64_t s, int64_t blk0, int64_t blk1) {
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const int64_t H = a.H, B = a.B, T = a.T, BH = B * H;
  const int64_t t = a.reverse ? T - 1 - s : s;
  const float* h_prev = s == 0 ? a.h0 : a.out + (a.reverse ? t + 1 : t - 1) * BH;
  const float* ig = a.input_gates != nullptr ? a.input_gates + t * B * 4 * H : nullptr;
  const float* x_t = a.x != nullptr ? a.x + t * B * a.I : nullptr;
  float* h_out = a.out + t * BH;
  float* ws_t = a.ws != nullptr ? a.ws + t * B * 4 * H : nullptr;
  float* cs_t = a.cs != nullptr ? a.cs + t * BH : nullptr;
  // The rows' accumulators of one unit block (B x 4 W floats), per thread: the team's threads
  // run their own unit blocks.
  thread_local std::vector<float> acc_buf;
  if (acc_buf.size() < static_cast<size_t>(B * 4 * W)) acc_buf.resize(B * 4 * W);
  float* acc = acc_buf.data();
  const float* bias = a.bias;
  for (int64_t j = blk0; j < blk1; ++j) {
    const float* wp = a.packed + j * (a.I + H) * 4 * W;
    const int64_t u0 = j * W, n = H - u0 < W ? H - u0 : W;
    std::fill(acc, acc + B * 4 * W, 0.f);
    for (int64_t k0 = 0; k0 < a.I; k0 += kSeqChunk)
      seq_chunk<L>(acc, wp, x_t, a.I, k0, a.I - k0 < kSeqChunk ? a.I : k0 + kSeqChunk, B);
    const int64_t nch = (H + kSeqChunk - 1) / kSeqChunk;
    for (int64_t c = 0; c < nch; ++c) {
      // This block's input gates are read by the epilogue only, rows of a (T, B, 4H) projection
      // far larger than the caches; loaded there, they stalled the cell math (half of the
      // epilogue's time at T100 B32 H512). Fetched into L2 during the GEMM instead, a few rows per
      // chunk: all at once, they filled the line-fill buffers and stalled the prefetches
      // themselves. (Prefetching the epilogue's stores too, h_out, was slower.)
      if (ig != nullptr) {
        for (int64_t b = c * B / nch; b < (c + 1) * B / nch; ++b) prefetch_gate_row(ig + b * 4 * H + u0, H, n);
      }
      const int64_t k0 = c * kSeqChunk;
      seq_chunk<L>(acc, wp + a.I * 4 * W, h_prev, H, k0, H - k0 < kSeqChunk ? H : k0 + kSeqChunk, B);
    }
    for (int64_t b = 0; b < B; ++b) {
      const float* ar = acc + b * 4 * W;
      const float* igr = ig != nullptr ? ig + b * 4 * H + u0 : nullptr;
      V pre[4];
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        V x = L::loadu(ar + g * W);
        if (ig != nullptr) x = x + L::load_n(igr + g * H, n);
        if (bias != nullptr) x = x + L::load_n(bias + g * H + u0, n);
        pre[g] = x;
      }
      float* c = a.c + b * H + u0;
      V gi, gf, gg, go, cy, hy;
      cell_forward<L>(pre[0], pre[1], pre[2], pre[3], L::load_n(c, n), gi, gf, gg, go, cy, hy);
      L::store_n(c, cy, n);
      L::store_n(h_out + b * H + u0, hy, n);
      if (ws_t != nullptr) {  // training: the activated gates and the cell state, for the backward
        float* wsr = ws_t + b * 4 * H + u0;
        L::store_n(wsr, gi, n);
        L::store_n(wsr + H, gf, n);
        L::store_n(wsr + 2 * H, gg, n);
        L::store_n(wsr + 3 * H, go, n);
        L::store_n(cs_t + b * H + u0, cy, n);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The sequence backward (lstm_layer_bwd, float32): per step, the cell backward of a thread's units
// (seq_bwd_point), then after a barrier the recurrent GEMM dh[:, units] = grad_gates_t @ W_hh[:, units]
// of the same units (seq_bwd_gemm), so the next step's cell backward reads only its own thread's dh.
//
// Packed W_hh for it: super-blocks of 4 W units, each (4H, 4W): element (k, l) = W_hh[k, sb 4W + l],
// zero past H (W_hh's rows are already the K dimension; packing only pads and groups the columns).
template <class L>
void seq_bwd_pack(const SeqBwdArgs& a, int64_t sb0, int64_t sb1) {
  constexpr int64_t NW = 4 * L::W;
  const int64_t H = a.H;
  for (int64_t sb = sb0; sb < sb1; ++sb) {
    float* dst = a.packed + sb * 4 * H * NW;
    const int64_t u0 = sb * NW, n = H - u0 < NW ? H - u0 : NW;
    for (int64_t k = 0; k < 4 * H; ++k) {
      const float* src = a.weight_hh + k * H + u0;
      float* d = dst + k * NW;
      for (int64_t l = 0; l < n; ++l) d[l] = src[l];
      for (int64_t l = n; l < NW; ++l) d[l] = 0.f;
    }
  }
}

// Step s of the backward (the forward's step s, time t) for units [u0, u1): dh = grad_out[t] + the
// carried dh, dc = the carried dc; the cell backward from the saved gates, c_prev and c_t; grad_gates[t]
// stored, dc carried on (grad_cx). The carried dh is replaced by seq_bwd_gemm after the barrier.
template <class L>
void seq_bwd_point(const SeqBwdArgs& a, int64_t s, int64_t u0, int64_t u1) {
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const int64_t H = a.H, B = a.B, T = a.T, BH = B * H;
  const int64_t t = a.reverse ? T - 1 - s : s;
  const float* c_prev = s == 0 ? a.c0 : a.cs + (a.reverse ? t + 1 : t - 1) * BH;
  const float* cy = a.cs + t * BH;
  const float* ws = a.ws + t * B * 4 * H;
  const float* go = a.grad_out != nullptr ? a.grad_out + t * BH : nullptr;
  float* gg = a.grad_gates + t * B * 4 * H;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = u0; j < u1; j += W) {
      const int64_t n = u1 - j < W ? u1 - j : W;
      const int64_t o = b * H + j;
      V dh = L::load_n(a.dh + o, n);
      if (go != nullptr) dh = dh + L::load_n(go + o, n);
      const float* w = ws + b * 4 * H + j;
      V di, df, dg, d_o, dcx;
      cell_backward<L>(dh, L::load_n(a.dc + o, n), L::load_n(c_prev + o, n), L::load_n(cy + o, n), L::load_n(w, n),
                       L::load_n(w + H, n), L::load_n(w + 2 * H, n), L::load_n(w + 3 * H, n), di, df, dg, d_o, dcx);
      float* g = gg + b * 4 * H + j;
      L::store_n(g, di, n);
      L::store_n(g + H, df, n);
      L::store_n(g + 2 * H, dg, n);
      L::store_n(g + 3 * H, d_o, n);
      L::store_n(a.dc + o, dcx, n);
    }
  }
}

// Rows [b0, b0 + R) of dh[:, sb 4W + [0, n)] = gg_t @ W_hh[:, those units]: 4 R accumulators
// (4 vectors of units x R rows), K = 4H.
template <class L, int R>
void seq_bwd_tile(const SeqBwdArgs& a, const float* wp, const float* gg_t, int64_t b0, int64_t u0, int64_t n) {
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const int64_t H = a.H, K = 4 * H;
  V acc[4][R];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[v][r] = L::bcast(0.f);
  }
  seq_kloop<L, R>(acc, wp, gg_t + b0 * K, K, K);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* d = a.dh + (b0 + r) * H + u0;
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      if (v * W < n) L::store_n(d + v * W, acc[v][r], n - v * W < W ? n - v * W : W);
    }
  }
}

template <class L>
void seq_bwd_gemm(const SeqBwdArgs& a, int64_t s, int64_t sb0, int64_t sb1) {
  constexpr int64_t NW = 4 * L::W;
  constexpr int R = L::kSeqRows;
  static_assert(R >= 1 && R <= 6, "the remainder tiles below cover R <= 6");
  const int64_t H = a.H, B = a.B, T = a.T;
  const int64_t t = a.reverse ? T - 1 - s : s;
  const float* gg_t = a.grad_gates + t * B * 4 * H;
  for (int64_t sb = sb0; sb < sb1; ++sb) {
    const float* wp = a.packed + sb * 4 * H * NW;
    const int64_t u0 = sb * NW, n = H - u0 < NW ? H - u0 : NW;
    int64_t b0 = 0;
    for (; b0 + R <= B; b0 += R) seq_bwd_tile<L, R>(a, wp, gg_t, b0, u0, n);
    switch (B - b0) {
      case 0:
        break;
      case 1:
        seq_bwd_tile<L, 1>(a, wp, gg_t, b0, u0, n);
        break;
      case 2:
        if constexpr (R > 2) seq_bwd_tile<L, 2>(a, wp, gg_t, b0, u0, n);
        break;
      case 3:
        if constexpr (R > 3) seq_bwd_tile<L, 3>(a, wp, gg_t, b0, u0, n);
        break;
      case 4:
        if constexpr (R > 4) seq_bwd_tile<L, 4>(a, wp, gg_t, b0, u0, n);
        break;
      default:
        if constexpr (R > 5) seq_bwd_tile<L, 5>(a, wp, gg_t, b0, u0, n);
        break;
    }
  }
}
