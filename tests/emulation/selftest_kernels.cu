// Test-only kernels that exercise the CUDA-on-CPU harness itself (tests/test_emulation_*.py):
// warp shuffles and votes, atomics, barriers, shared memory, half/bf16 conversions, ldmatrix
// and mma against their documented layouts, misuse that must be reported, and planted bugs
// (a race, out-of-bounds writes) the sanitizers must catch. Written like a csrc/cuda launcher
// (SK_LAUNCH, SK_REGISTER_CUDA, cudart helpers) so it is also the worked example of the pattern.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <vector>

#include "cuda/launch.cuh"
#include "cuda/mma.cuh"
#include "cuda/register.cuh"
#include "cuda/stream.cuh"

namespace seqkernels {
namespace selftest {

constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Warp shuffles: every lane in `mask` shuffles its value; lanes outside it keep theirs.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void _shfl_kernel(const T* vals, T* out, int mode, int arg, int width, unsigned mask) {
  const int t = threadIdx.x, lane = t % 32;
  const T v = vals[t];
  if (!(mask >> lane & 1u)) {
    out[t] = v;
    return;
  }
  T r;
  switch (mode) {
    case 0:
      r = __shfl_sync(mask, v, arg, width);
      break;
    case 1:
      r = __shfl_up_sync(mask, v, static_cast<unsigned>(arg), width);
      break;
    case 2:
      r = __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width);
      break;
    default:
      r = __shfl_xor_sync(mask, v, arg, width);
      break;
  }
  out[t] = r;
}

at::Tensor shfl(const at::Tensor& vals, int64_t mode, int64_t arg, int64_t width, int64_t mask) {
  SK_CHECK_DEVICE(vals);
  TORCH_CHECK(vals.dim() == 1 && vals.numel() <= 1024 && vals.is_contiguous(), "vals: 1-D, at most 1024");
  const cudart::DeviceGuard guard(vals);
  auto out = at::empty_like(vals);
  const int n = static_cast<int>(vals.numel());
  const unsigned m = static_cast<unsigned>(mask);
  AT_DISPATCH_SWITCH(vals.scalar_type(), "selftest_shfl", AT_DISPATCH_CASE(at::kInt, [&] {
                       auto kernel = &_shfl_kernel<int>;
                       SK_LAUNCH(kernel, 1, n, 0, cudart::current_stream(), vals.data_ptr<int>(), out.data_ptr<int>(),
                                 int(mode), int(arg), int(width), m);
                     }) AT_DISPATCH_CASE(at::kFloat, [&] {
                       auto kernel = &_shfl_kernel<float>;
                       SK_LAUNCH(kernel, 1, n, 0, cudart::current_stream(), vals.data_ptr<float>(),
                                 out.data_ptr<float>(), int(mode), int(arg), int(width), m);
                     }) AT_DISPATCH_CASE(at::kDouble, [&] {
                       auto kernel = &_shfl_kernel<double>;
                       SK_LAUNCH(kernel, 1, n, 0, cudart::current_stream(), vals.data_ptr<double>(),
                                 out.data_ptr<double>(), int(mode), int(arg), int(width), m);
                     }));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Votes, match and reductions: out[t] = (ballot, any, all, match_any, add, min, max).
// ---------------------------------------------------------------------------------------------
__global__ void _vote_kernel(const int* pred, const int* vals, int* out, unsigned mask) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + 7 * t;
  if (!(mask >> lane & 1u)) {
    for (int i = 0; i < 7; ++i) o[i] = 0;
    return;
  }
  const int p = pred[t], v = vals[t];
  o[0] = static_cast<int>(__ballot_sync(mask, p));
  o[1] = __any_sync(mask, p);
  o[2] = __all_sync(mask, p);
  o[3] = static_cast<int>(__match_any_sync(mask, v));
  o[4] = __reduce_add_sync(mask, v);
  o[5] = __reduce_min_sync(mask, v);
  o[6] = __reduce_max_sync(mask, v);
}

at::Tensor vote(const at::Tensor& pred, const at::Tensor& vals, int64_t mask) {
  SK_CHECK_DEVICE(pred);
  TORCH_CHECK(pred.scalar_type() == at::kInt && vals.scalar_type() == at::kInt, "pred, vals: int32");
  TORCH_CHECK(pred.numel() == vals.numel() && pred.numel() <= 1024, "pred, vals: same size, at most 1024");
  auto out = at::empty({pred.numel(), 7}, pred.options());
  SK_LAUNCH(_vote_kernel, 1, static_cast<int>(pred.numel()), 0, cudart::current_stream(), pred.data_ptr<int>(),
            vals.data_ptr<int>(), out.data_ptr<int>(), static_cast<unsigned>(mask));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Atomics from every thread of every block.
// ---------------------------------------------------------------------------------------------
__global__ void _atomics_kernel(const int* ivals, const float* fvals, int* iout, float* fout, double* dout) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = ivals[i];
  atomicAdd(&iout[0], v);
  atomicMax(&iout[1], v);
  atomicMin(&iout[2], v);
  // The first read is atomic too: a plain load racing with other threads' atomics is a data race.
  int old = atomicAdd(&iout[3], 0), assumed;
  do {
    assumed = old;
    old = atomicCAS(&iout[3], assumed, assumed + 1);
  } while (old != assumed);
  atomicInc(reinterpret_cast<unsigned*>(&iout[4]), 99u);
  atomicAdd(&fout[0], fvals[i]);
  atomicExch(&fout[1], 1.5f);
  atomicAdd(&dout[0], static_cast<double>(fvals[i]));
}

std::vector<at::Tensor> atomics(const at::Tensor& ivals, const at::Tensor& fvals, int64_t blocks) {
  SK_CHECK_DEVICE(ivals);
  TORCH_CHECK(ivals.numel() == fvals.numel() && ivals.numel() % blocks == 0, "ivals, fvals: blocks * threads");
  const int threads = static_cast<int>(ivals.numel() / blocks);
  auto iout = at::tensor({0, std::numeric_limits<int>::min(), std::numeric_limits<int>::max(), 0, 0}, ivals.options());
  auto fout = at::tensor({0.0f, -std::numeric_limits<float>::infinity()}, fvals.options());
  auto dout = at::zeros({1}, fvals.options().dtype(at::kDouble));
  SK_LAUNCH(_atomics_kernel, static_cast<int>(blocks), threads, 0, cudart::current_stream(), ivals.data_ptr<int>(),
            fvals.data_ptr<float>(), iout.data_ptr<int>(), fout.data_ptr<float>(), dout.data_ptr<double>());
  return {iout, fout, dout};
}

// ---------------------------------------------------------------------------------------------
// Block reduction through shared memory and barriers: out[b] = (sum, count>0, all>0, any>0).
// ---------------------------------------------------------------------------------------------
template <bool Dynamic>
__global__ void _block_reduce_kernel(const float* x, int n, float* out) {
  __shared__ float static_buf[1024];
  extern __shared__ __align__(16) float dyn_buf[];
  float* buf = Dynamic ? dyn_buf : static_buf;
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  const float v = i < n ? x[i] : 0.0f;
  buf[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  const int count = __syncthreads_count(v > 0.0f);
  const int all = __syncthreads_and(i >= n || v > 0.0f);
  const int any = __syncthreads_or(v > 0.0f);
  if (t == 0) {
    out[4 * blockIdx.x + 0] = buf[0];
    out[4 * blockIdx.x + 1] = static_cast<float>(count);
    out[4 * blockIdx.x + 2] = static_cast<float>(all);
    out[4 * blockIdx.x + 3] = static_cast<float>(any);
  }
}

at::Tensor block_reduce(const at::Tensor& x, int64_t threads, bool dynamic_smem) {
  SK_CHECK_DEVICE(x);
  TORCH_CHECK(threads > 0 && threads <= 1024 && (threads & (threads - 1)) == 0, "threads: power of two <= 1024");
  const int n = static_cast<int>(x.numel());
  const int blocks = (n + static_cast<int>(threads) - 1) / static_cast<int>(threads);
  auto out = at::empty({blocks, 4}, x.options());
  if (dynamic_smem) {
    auto kernel = &_block_reduce_kernel<true>;
    SK_LAUNCH(kernel, blocks, static_cast<int>(threads), threads * sizeof(float), cudart::current_stream(),
              x.data_ptr<float>(), n, out.data_ptr<float>());
  } else {
    auto kernel = &_block_reduce_kernel<false>;
    SK_LAUNCH(kernel, blocks, static_cast<int>(threads), 0, cudart::current_stream(), x.data_ptr<float>(), n,
              out.data_ptr<float>());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Shared memory poisoning: each block reads its shared memory before writing it.
// out[b] = (static value read, dynamic value read) before this block's own writes.
// ---------------------------------------------------------------------------------------------
__global__ void _poison_kernel(float* out) {
  __shared__ float sbuf[32];
  extern __shared__ float dbuf[];
  const int t = threadIdx.x;
  const float s = sbuf[t], d = dbuf[t];
  __syncthreads();
  sbuf[t] = 1.0f;
  dbuf[t] = 2.0f;
  if (t == 0) {
    out[2 * blockIdx.x] = s;
    out[2 * blockIdx.x + 1] = d;
  }
}

at::Tensor poison(const at::Tensor& like, int64_t blocks) {
  SK_CHECK_DEVICE(like);
  auto out = at::empty({blocks, 2}, like.options().dtype(at::kFloat));
  SK_LAUNCH(_poison_kernel, static_cast<int>(blocks), 32, 32 * sizeof(float), cudart::current_stream(),
            out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------------------------
// half / bfloat16 conversions and arithmetic (raw bits out, compared with torch's).
// ---------------------------------------------------------------------------------------------
__global__ void _convert_kernel(const float* x, const float* y, int n, int16_t* h, int16_t* bf, float* hback,
                                float* bfback, int16_t* hops, int16_t* bops, float* pairs) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half hx = __float2half_rn(x[i]), hy = __float2half_rn(y[i]);
  const __nv_bfloat16 bx = __float2bfloat16_rn(x[i]), by = __float2bfloat16(y[i]);
  h[i] = static_cast<int16_t>(__half_as_ushort(hx));
  bf[i] = static_cast<int16_t>(__bfloat16_as_ushort(bx));
  hback[i] = __half2float(hx);
  bfback[i] = __bfloat162float(bx);
  hops[3 * i + 0] = static_cast<int16_t>(__half_as_ushort(__hadd(hx, hy)));
  hops[3 * i + 1] = static_cast<int16_t>(__half_as_ushort(__hmul(hx, hy)));
  hops[3 * i + 2] = static_cast<int16_t>(__half_as_ushort(__hfma(hx, hy, hx)));
  bops[3 * i + 0] = static_cast<int16_t>(__bfloat16_as_ushort(__hadd(bx, by)));
  bops[3 * i + 1] = static_cast<int16_t>(__bfloat16_as_ushort(__hmul(bx, by)));
  bops[3 * i + 2] = static_cast<int16_t>(__bfloat16_as_ushort(__hfma(bx, by, bx)));
  const float2 hp = __half22float2(__floats2half2_rn(x[i], y[i]));
  const float2 bp = __bfloat1622float2(__floats2bfloat162_rn(x[i], y[i]));
  pairs[4 * i + 0] = hp.x;
  pairs[4 * i + 1] = hp.y;
  pairs[4 * i + 2] = bp.x;
  pairs[4 * i + 3] = bp.y;
}

std::vector<at::Tensor> convert(const at::Tensor& x, const at::Tensor& y) {
  SK_CHECK_DEVICE(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.sizes() == x.sizes(), "x, y: float32, same shape");
  const int n = static_cast<int>(x.numel());
  auto i16 = x.options().dtype(at::kShort);
  auto h = at::empty({n}, i16), bf = at::empty({n}, i16);
  auto hback = at::empty({n}, x.options()), bfback = at::empty({n}, x.options());
  auto hops = at::empty({n, 3}, i16), bops = at::empty({n, 3}, i16);
  auto pairs = at::empty({n, 4}, x.options());
  SK_LAUNCH(_convert_kernel, (n + 255) / 256, 256, 0, cudart::current_stream(), x.data_ptr<float>(),
            y.data_ptr<float>(), n, h.data_ptr<int16_t>(), bf.data_ptr<int16_t>(), hback.data_ptr<float>(),
            bfback.data_ptr<float>(), hops.data_ptr<int16_t>(), bops.data_ptr<int16_t>(), pairs.data_ptr<float>());
  return {h, bf, hback, bfback, hops, bops, pairs};
}

// ---------------------------------------------------------------------------------------------
// ldmatrix: m is a stack of n 8x8 b16 matrices; lane l < 8n gives the address of row l.
// ---------------------------------------------------------------------------------------------
template <int N, bool Trans>
__global__ void _ldmatrix_kernel(const int16_t* m, int* out) {
  __shared__ __align__(16) int16_t tile[32][8];
  const int lane = threadIdx.x;
  if (lane < 8 * N) {
    for (int c = 0; c < 8; ++c) tile[lane][c] = m[lane * 8 + c];
  }
  __syncwarp();
  uint32_t r[N];
  mma::ldmatrix<N, Trans>(r, &tile[lane < 8 * N ? lane : 0][0]);
  for (int i = 0; i < N; ++i) out[lane * N + i] = static_cast<int>(r[i]);
}

at::Tensor ldmatrix(const at::Tensor& m, int64_t n, bool trans) {
  SK_CHECK_DEVICE(m);
  TORCH_CHECK(m.scalar_type() == at::kShort && m.is_contiguous() && m.numel() == n * 64, "m: int16 (n*8, 8)");
  auto out = at::empty({32, n}, m.options().dtype(at::kInt));
  const int16_t* src = m.data_ptr<int16_t>();
  int* dst = out.data_ptr<int>();
  void (*kernel)(const int16_t*, int*) = nullptr;
  if (n == 1) kernel = trans ? &_ldmatrix_kernel<1, true> : &_ldmatrix_kernel<1, false>;
  if (n == 2) kernel = trans ? &_ldmatrix_kernel<2, true> : &_ldmatrix_kernel<2, false>;
  if (n == 4) kernel = trans ? &_ldmatrix_kernel<4, true> : &_ldmatrix_kernel<4, false>;
  TORCH_CHECK(kernel != nullptr, "n: 1, 2 or 4 matrices, got ", n);
  SK_LAUNCH(kernel, 1, 32, 0, cudart::current_stream(), src, dst);
  return out;
}

// ---------------------------------------------------------------------------------------------
// One m16n8k16 tile: cp.async global->shared (rows >= zero_rows_from zero-filled), ldmatrix
// into fragments, mma, scatter of the accumulator. a is A (16x16) or, with a_trans, A^T; b is
// B^T (8x16, "col" operand) or, with b_trans, B (16x8, row-major as a V tile is).
// ---------------------------------------------------------------------------------------------
constexpr int kStride = 24;  // padded smem row (48 bytes: 16-byte aligned rows)

template <typename T, bool ATrans, bool BTrans>
__global__ void _mma_kernel(const T* a, const T* b, const float* c, float* d, int zero_rows_from) {
  __shared__ __align__(16) T sa[16 * kStride];
  __shared__ __align__(16) T sb[16 * kStride];
  const int lane = threadIdx.x;
  {
    const int row = lane / 2, half_row = lane % 2;  // 16 rows x 2 chunks of 8 elements
    mma::cp_async_16(&sa[row * kStride + 8 * half_row], &a[row * 16 + 8 * half_row], row < zero_rows_from);
  }
  constexpr int b_rows = BTrans ? 16 : 8, b_cols = BTrans ? 8 : 16;
  if (lane < b_rows * b_cols / 8) {
    const int chunks = b_cols / 8, row = lane / chunks, col = 8 * (lane % chunks);
    mma::cp_async_16(&sb[row * kStride + col], &b[row * b_cols + col], row < zero_rows_from);
  }
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
  __syncwarp();

  uint32_t af[4], bf[2];
  if (!ATrans) {
    mma::ldmatrix<4, false>(af, &sa[(lane % 16) * kStride + 8 * (lane / 16)]);
  } else {
    const int m = lane / 8, r = lane % 8;  // matrix m: A^T rows 8*(m/2)+r, cols 8*(m%2)
    mma::ldmatrix<4, true>(af, &sa[(8 * (m / 2) + r) * kStride + 8 * (m % 2)]);
  }
  if (!BTrans) {
    const int m = (lane / 8) % 2, r = lane % 8;  // B^T rows r, cols 8m
    mma::ldmatrix<2, false>(bf, &sb[r * kStride + 8 * m]);
  } else {
    const int m = (lane / 8) % 2, r = lane % 8;  // B rows 8m + r
    mma::ldmatrix<2, true>(bf, &sb[(8 * m + r) * kStride]);
  }
  const int g = lane / 4, tig = lane % 4;
  float acc[4] = {c[g * 8 + 2 * tig], c[g * 8 + 2 * tig + 1], c[(g + 8) * 8 + 2 * tig], c[(g + 8) * 8 + 2 * tig + 1]};
  mma::mma_m16n8k16<mma::mma_tag_t<T>>(acc, af, bf, acc);
  d[g * 8 + 2 * tig] = acc[0];
  d[g * 8 + 2 * tig + 1] = acc[1];
  d[(g + 8) * 8 + 2 * tig] = acc[2];
  d[(g + 8) * 8 + 2 * tig + 1] = acc[3];
}

template <typename T>
void launch_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::Tensor& d, bool a_trans,
                bool b_trans, int zero_rows_from) {
  const T* pa = reinterpret_cast<const T*>(a.data_ptr());
  const T* pb = reinterpret_cast<const T*>(b.data_ptr());
  void (*kernel)(const T*, const T*, const float*, float*, int) =
      a_trans ? (b_trans ? &_mma_kernel<T, true, true> : &_mma_kernel<T, true, false>)
              : (b_trans ? &_mma_kernel<T, false, true> : &_mma_kernel<T, false, false>);
  SK_LAUNCH(kernel, 1, 32, 0, cudart::current_stream(), pa, pb, c.data_ptr<float>(), d.data_ptr<float>(),
            zero_rows_from);
}

at::Tensor mma_tile(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool a_trans, bool b_trans,
                    int64_t zero_rows_from) {
  SK_CHECK_DEVICE(a);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a, b: same dtype");
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && a.is_contiguous(), "a: contiguous (16, 16)");
  TORCH_CHECK(b.sizes() == (b_trans ? at::IntArrayRef({16, 8}) : at::IntArrayRef({8, 16})) && b.is_contiguous(),
              "b: contiguous (16, 8) with b_trans, (8, 16) without");
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.sizes() == at::IntArrayRef({16, 8}), "c: float32 (16, 8)");
  auto d = at::empty({16, 8}, c.options());
  if (a.scalar_type() == at::kHalf) {
    launch_mma<__half>(a, b, c.contiguous(), d, a_trans, b_trans, static_cast<int>(zero_rows_from));
  } else {
    TORCH_CHECK(a.scalar_type() == at::kBFloat16, "a: float16 or bfloat16");
    launch_mma<__nv_bfloat16>(a, b, c.contiguous(), d, a_trans, b_trans, static_cast<int>(zero_rows_from));
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// Planted bugs for the sanitizers.
// ---------------------------------------------------------------------------------------------
__global__ void _race_kernel(const float* x, float* out, int n, bool sync) {
  __shared__ float buf[1024];
  const int t = threadIdx.x;
  buf[t] = x[t];
  if (sync) __syncthreads();
  out[t] = buf[(t + 1) % n];
}

at::Tensor race(const at::Tensor& x, bool sync) {
  SK_CHECK_DEVICE(x);
  auto out = at::empty_like(x);
  const int n = static_cast<int>(x.numel());
  SK_LAUNCH(_race_kernel, 1, n, 0, cudart::current_stream(), x.data_ptr<float>(), out.data_ptr<float>(), n, sync);
  return out;
}

// where: 0 nothing out of bounds, 1 global write one past `out`, 2 dynamic shared memory one
// past the launch's size, 3 a static __shared__ array one past its end.
__global__ void _oob_kernel(const float* x, float* out, int n, int where) {
  extern __shared__ float dyn[];
  __shared__ float sbuf[64];
  const int t = threadIdx.x;
  const bool last = t == n - 1;
  dyn[t] = x[t];
  sbuf[t % 64] = x[t];
  if (last && where == 2) dyn[n] = x[t];
  if (last && where == 3) sbuf[64 + (n - 1 - t)] = x[t];
  __syncthreads();
  out[t] = dyn[t] + sbuf[t % 64];
  if (last && where == 1) out[n] = x[t];
}

at::Tensor oob(const at::Tensor& x, int64_t where) {
  SK_CHECK_DEVICE(x);
  auto out = at::empty_like(x);
  const int n = static_cast<int>(x.numel());
  TORCH_CHECK(n <= 64, "x: at most 64 elements");
  SK_LAUNCH(_oob_kernel, 1, n, n * sizeof(float), cudart::current_stream(), x.data_ptr<float>(), out.data_ptr<float>(),
            n, static_cast<int>(where));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Misuse the emulator must report as an error (never hang).
// ---------------------------------------------------------------------------------------------
__global__ void _misuse_kernel(int which, volatile int* spin) {
  const int t = threadIdx.x, lane = t % 32;
  __shared__ __align__(16) int16_t tile[8 * 8];
  switch (which) {
    case 0:  // barrier in divergent code
      if (t < 16) __syncthreads();
      break;
    case 1:  // two different barriers
      if (t < 16) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      break;
    case 2:  // a lane named in the mask has exited
      if (lane == 5) return;
      (void)__shfl_sync(kFull, t, 0);
      break;
    case 3:  // lane 0 waits in __syncwarp for lanes that wait at __syncthreads
      if (t == 0) __syncwarp();
      __syncthreads();
      break;
    case 4:  // mask without the calling lane
      if (lane == 0) (void)__shfl_sync(0x2u, t, 1);
      break;
    case 5:  // width not a power of two
      (void)__shfl_xor_sync(kFull, t, 1, 12);
      break;
    case 6:
      if (t == 3) __trap();
      __syncthreads();
      break;
    case 7: {  // mma by half a warp
      uint32_t a[4] = {}, b[2] = {};
      float acc[4] = {};
      if (lane < 16) mma::mma_m16n8k16<mma::f16>(acc, a, b, acc);
      break;
    }
    case 8: {  // ldmatrix from a misaligned shared address
      uint32_t r[1];
      mma::ldmatrix<1, false>(r, &tile[1]);
      break;
    }
    case 9:  // thread 0 never reaches the barrier: only the watchdog can end this
      if (t == 0) {
        while (*spin == 0) {
        }
      }
      __syncthreads();
      break;
    default:
      break;
  }
}

void misuse(const at::Tensor& like, int64_t which) {
  SK_CHECK_DEVICE(like);
  auto spin = at::zeros({1}, like.options().dtype(at::kInt));
  SK_LAUNCH(_misuse_kernel, 1, 64, 0, cudart::current_stream(), static_cast<int>(which), spin.data_ptr<int>());
}

// ---------------------------------------------------------------------------------------------
// Launch configuration: every thread writes its (threadIdx, blockIdx, blockDim, gridDim) and
// touches the last byte of the dynamic shared memory it asked for.
// ---------------------------------------------------------------------------------------------
__global__ void _launch_kernel(int* out, int smem_bytes) {
  extern __shared__ unsigned char bytes[];
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  int* o = out + 12 * (b * blockDim.x * blockDim.y * blockDim.z + t);
  o[0] = threadIdx.x, o[1] = threadIdx.y, o[2] = threadIdx.z;
  o[3] = blockIdx.x, o[4] = blockIdx.y, o[5] = blockIdx.z;
  o[6] = blockDim.x, o[7] = blockDim.y, o[8] = blockDim.z;
  o[9] = gridDim.x, o[10] = gridDim.y, o[11] = gridDim.z;
  if (t == 0 && smem_bytes > 0) bytes[smem_bytes - 1] = 1;
}

at::Tensor launch_config(const at::Tensor& like, int64_t bx, int64_t by, int64_t bz, int64_t smem_bytes, bool optin) {
  SK_CHECK_DEVICE(like);
  const dim3 grid(2, 3, 2), block(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(bz));
  const int64_t threads = bx * by * bz;
  auto out = at::zeros({12 * threads, 12}, like.options().dtype(at::kInt));
  if (optin) SK_SET_MAX_DYNAMIC_SMEM(_launch_kernel, smem_bytes);
  SK_LAUNCH(_launch_kernel, grid, block, smem_bytes, cudart::current_stream(), out.data_ptr<int>(),
            static_cast<int>(smem_bytes));
  return out;
}

int64_t device_info(const at::Tensor& like, int64_t which) {
  SK_CHECK_DEVICE(like);
  switch (which) {
    case 0:
      return cudart::compute_capability();
    case 1:
      return cudart::multiprocessor_count();
    default:
      return static_cast<int64_t>(cudart::max_dynamic_smem());
  }
}

}  // namespace selftest
}  // namespace seqkernels

SK_REGISTER_CUDA(selftest_shfl, seqkernels::selftest::shfl);
SK_REGISTER_CUDA(selftest_vote, seqkernels::selftest::vote);
SK_REGISTER_CUDA(selftest_atomics, seqkernels::selftest::atomics);
SK_REGISTER_CUDA(selftest_block_reduce, seqkernels::selftest::block_reduce);
SK_REGISTER_CUDA(selftest_poison, seqkernels::selftest::poison);
SK_REGISTER_CUDA(selftest_convert, seqkernels::selftest::convert);
SK_REGISTER_CUDA(selftest_ldmatrix, seqkernels::selftest::ldmatrix);
SK_REGISTER_CUDA(selftest_mma, seqkernels::selftest::mma_tile);
SK_REGISTER_CUDA(selftest_race, seqkernels::selftest::race);
SK_REGISTER_CUDA(selftest_oob, seqkernels::selftest::oob);
SK_REGISTER_CUDA(selftest_misuse, seqkernels::selftest::misuse);
SK_REGISTER_CUDA(selftest_launch, seqkernels::selftest::launch_config);
SK_REGISTER_CUDA(selftest_device_info, seqkernels::selftest::device_info);
