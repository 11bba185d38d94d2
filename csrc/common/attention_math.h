// Visibility rule and online-softmax bookkeeping shared by the CPU and CUDA attention kernels
// (torch-free). docs/INTERNALS.md defines the rule; keeping one implementation means the
// backends cannot drift apart on the off-by-one details of windows and bottom-right alignment.
#pragma once

#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace seqkernels {

// log2(e) and ln(2): kernels evaluate the softmax with exp2 (cheaper than exp) on scores times
// log2(e), and turn the log2-domain row statistics back into a natural-log lse with ln(2).
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// The keys that the window / causal / length rule lets query row `i` see, as the half-open
// interval [lo, hi) (empty when lo >= hi); attn_mask then filters inside it. Lk_b is the
// batch's key length (kv_lengths[b] or Lk).
//
//   window_left = 2, window_right = 0 (causal with a 3-key window), bottom_right, Lq = Lk_b = 5:
//        j: 0 1 2 3 4
//     i=0   x . . . .      lo = max(0, i + off - 2), hi = min(Lk_b, i + off + 0 + 1),
//     i=1   x x . . .      off = Lk_b - Lq (bottom_right) or 0
//     i=2   x x x . .
//     i=3   . x x x .
//     i=4   . . x x x
struct KeyRange {
  int64_t lo, hi;
};

SK_HOST_DEVICE SK_INLINE KeyRange visible_keys(int64_t i, int64_t Lq, int64_t Lk_b, int64_t window_left,
                                               int64_t window_right, bool bottom_right) {
  const int64_t diag = i + (bottom_right ? Lk_b - Lq : 0);
  int64_t lo = window_left >= 0 ? diag - window_left : 0;
  int64_t hi = window_right >= 0 ? diag + window_right + 1 : Lk_b;
  if (lo < 0) lo = 0;
  if (hi > Lk_b) hi = Lk_b;
  if (hi < lo) hi = lo;
  return {lo, hi};
}

// Clamp of kv_lengths[b] into [0, Lk]; the public layer validates, kernels still never read
// outside the tensor.
SK_HOST_DEVICE SK_INLINE int64_t batch_key_length(const int32_t* kv_lengths, int64_t b, int64_t Lk) {
  if (kv_lengths == nullptr) return Lk;
  const int64_t n = kv_lengths[b];
  return n < 0 ? 0 : (n > Lk ? Lk : n);
}

// Online softmax in the log2 domain: a row keeps its running max `m` (of scores times log2(e))
// and sum `l` of exp2(s * log2(e) - m); a block that raises the max to m_new rescales the old sum
// and output by exp2(m - m_new). A row that has seen only -inf keeps m = -inf and must neither
// rescale (inf - inf is NaN) nor shift its scores by -inf. When it is done, its lse (natural
// log) follows from m and log2(l); a row that saw no key has lse -inf.
template <typename T>
SK_HOST_DEVICE SK_INLINE T softmax_lse(T m, T log2_l) {
  return m == -T(INFINITY) ? -T(INFINITY) : (m + log2_l) * T(kLn2);
}

// The same bookkeeping with the running max kept in the natural-log domain: `m` is the largest
// score itself and `l` the sum of exp(s - m), each term evaluated as exp2((s - m) * log2(e)).
// Subtracting before scaling keeps every argument <= 0 with exactly 0 for the max element, for
// any finite scores: a log2-domain max m * log2(e) overflows to -inf for scores near the type's
// lowest value (a mask of finfo.min), and its rounding error (up to ulp(m), thousands for scores
// of 1e10) is an exponent argument of its own that overflows exp2. l >= 1 whenever m is finite.
template <typename T>
SK_HOST_DEVICE SK_INLINE T softmax_lse_ln(T m, T l) {
  return m == -T(INFINITY) ? -T(INFINITY) : m + log(l);
}

// A saved lse carries a rounding of up to ulp(lse) / 2 that every P = exp(s - lse) of its row
// inherits. Below 2^16 that is at most 2^-9 (float32) or 2^-38 (float64), no more than the
// rounding of the row's scores themselves at that magnitude, so P stays as accurate as plain
// softmax's. Above it the rounding can swallow ln(l)
// entirely (scores of 1e9, rows masked by finfo.min: every key tied at the max would get P = 1
// instead of 1 / l), so the backward recomputes such a row's max and l. Ordinary attention rows stay
// far below the threshold and cost nothing; the backends share this rule.
constexpr double kLseRecomputeAbove = 65536.0;

template <typename T>
SK_HOST_DEVICE SK_INLINE bool lse_needs_recompute(T lse) {
  // Comparisons only (no libm on either side of the host/device line); NaN compares false.
  const T k = T(kLseRecomputeAbove);
  return (lse >= k || lse <= -k) && lse != T(INFINITY) && lse != -T(INFINITY);
}

// One sequence of a packed batch (attention_varlen): its query rows [q0, q0 + lq) and keys
// [k0, k0 + lk) in the (1, H, total, D) views. The spans are clamped into [0, total] so that
// cu_seqlens values the host did not check (GPU tensors, or a direct call) never move a kernel
// outside its tensors: a decreasing pair gives an empty sequence.
struct SeqSpan {
  int64_t q0, lq, k0, lk;
};

SK_HOST_DEVICE SK_INLINE int64_t clamp_index(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

SK_HOST_DEVICE SK_INLINE SeqSpan seq_span(const int32_t* cu_q, const int32_t* cu_k, int64_t b, int64_t total_q,
                                          int64_t total_k) {
  const int64_t q0 = clamp_index(cu_q[b], 0, total_q), q1 = clamp_index(cu_q[b + 1], q0, total_q);
  const int64_t k0 = clamp_index(cu_k[b], 0, total_k), k1 = clamp_index(cu_k[b + 1], k0, total_k);
  return {q0, q1 - q0, k0, k1 - k0};
}

// ---------------------------------------------------------------------------------------------
// Score modifiers (docs/DESIGN.md §2), applied to the scaled score s = scale * q.k of query i and
// key j in this order, before the mask and the visibility rule:
//   softcap c > 0:  s <- c * tanh(s / c)
//   ALiBi slope a:  s <- s - a * |i + off_b - j|   (off_b = Lk_b - Lq bottom-right, else 0)
// and a sink logit per query head that joins the softmax denominator without a value:
//   p_ij = exp(s_ij - m) / (exp(sink - m) + sum_j exp(s_ij - m)), m and lse including the sink.
// T is the accumulation type (float, or double for float64 inputs).
template <typename T>
struct ScoreMods {
  T softcap;       // > 0: cap the scores; 0: off
  const T* alibi;  // (B, Hq) slopes, row-major; nullptr: off
  const T* sinks;  // (Hq,) sink logits (-inf behaves like none); nullptr: off
  SK_HOST_DEVICE SK_INLINE bool any() const { return softcap > T(0) || alibi != nullptr || sinks != nullptr; }
  SK_HOST_DEVICE SK_INLINE T slope(int64_t b, int64_t h, int64_t Hq) const {
    return alibi != nullptr ? alibi[b * Hq + h] : T(0);
  }
  SK_HOST_DEVICE SK_INLINE T sink(int64_t h) const { return sinks != nullptr ? sinks[h] : -T(INFINITY); }
};

template <typename T>
SK_HOST_DEVICE SK_INLINE T softcap_score(T s, T cap) {
  return cap * tanh(s / cap);
}

// d capped / d s, from the capped score t = c * tanh(s / c): 1 - tanh^2 = 1 - (t / c)^2. The
// backward multiplies dS by it before dS meets q or k.
template <typename T>
SK_HOST_DEVICE SK_INLINE T softcap_grad(T capped, T cap) {
  const T r = capped / cap;
  return T(1) - r * r;
}

// The ALiBi term added to the score of (i, j); `diag` = i + off_b, as in visible_keys.
template <typename T>
SK_HOST_DEVICE SK_INLINE T alibi_bias(T slope, int64_t diag, int64_t j) {
  const int64_t d = diag - j;
  return -slope * T(d < 0 ? -d : d);
}

// A row's statistics (natural-log max m, sum l of exp(s - m)) with the sink logit merged in;
// returns the factor exp(m_old - m_new) by which the row's accumulated output must be scaled.
// A row that saw no key and has a finite sink ends with m = sink, l = 1 (lse = sink, output 0);
// a -inf sink changes nothing.
template <typename T>
SK_HOST_DEVICE SK_INLINE T merge_sink(T sink, T& m, T& l) {
  if (sink == -T(INFINITY)) return T(1);
  if (m == -T(INFINITY)) {
    m = sink;
    l = T(1);
    return T(0);
  }
  if (sink <= m) {
    l += exp(sink - m);
    return T(1);
  }
  const T r = exp(m - sink);
  l = l * r + T(1);
  m = sink;
  return r;
}

}  // namespace seqkernels
