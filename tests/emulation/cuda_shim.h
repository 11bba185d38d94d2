// CUDA programming model on the host, for running the project's .cu files on the CPU in tests.
//
// Force-included (-include) by tests/emulation/build.py, with -DSEQKERNELS_CUDA_EMULATION, into
// every translation unit of an emulated extension; the .cu sources are compiled as C++. Test
// infrastructure only: never part of the wheel. docs/EMULATION.md says what is and is not
// modelled. The engine (thread pool, barriers, warp collectives, launch) is
// cuda_shim_runtime.cpp.
//
// Shared memory: `__shared__` expands to `static`, so a static __shared__ array is one object
// shared by all host threads; blocks run one after another so one object per kernel is
// enough. build.py rewrites each `__shared__` declaration to also register the variable
// (SK_EMU_REGISTER_SHARED) so the launcher can poison it between blocks, and rewrites
// `extern __shared__ T name[];` to a pointer to the launch's dynamic shared memory buffer:
// `extern static` cannot be produced by a macro.
#pragma once

#if !defined(SEQKERNELS_CUDA_EMULATION)
#error "cuda_shim.h is only for the CUDA-on-CPU harness (SEQKERNELS_CUDA_EMULATION)"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// ----------------------------------------------------------------------------------------------
// Execution-space and variable qualifiers
// ----------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
#define __managed__
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __CUDA_EMULATION__ 1

// ----------------------------------------------------------------------------------------------
// Built-in vector types
// ----------------------------------------------------------------------------------------------
#define SK_EMU_VEC2(T, N, A)          \
  struct alignas(A) N##2 { T x, y; }; \
  inline N##2 make_##N##2(T x, T y) { return N##2 {x, y}; }
#define SK_EMU_VEC3(T, N)     \
  struct N##3 { T x, y, z; }; \
  inline N##3 make_##N##3(T x, T y, T z) { return N##3 {x, y, z}; }
#define SK_EMU_VEC4(T, N, A)                \
  struct alignas(A) N##4 { T x, y, z, w; }; \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4 {x, y, z, w}; }

SK_EMU_VEC2(float, float, 8)
SK_EMU_VEC3(float, float)
SK_EMU_VEC4(float, float, 16)
SK_EMU_VEC2(double, double, 16)
SK_EMU_VEC3(double, double)
SK_EMU_VEC4(double, double, 32)
SK_EMU_VEC2(int, int, 8)
SK_EMU_VEC3(int, int)
SK_EMU_VEC4(int, int, 16)
SK_EMU_VEC2(unsigned int, uint, 8)
SK_EMU_VEC3(unsigned int, uint)
SK_EMU_VEC4(unsigned int, uint, 16)
SK_EMU_VEC2(short, short, 4)
SK_EMU_VEC4(short, short, 8)
SK_EMU_VEC2(unsigned short, ushort, 4)
SK_EMU_VEC4(unsigned short, ushort, 8)
SK_EMU_VEC2(signed char, char, 2)
SK_EMU_VEC4(signed char, char, 4)
SK_EMU_VEC2(unsigned char, uchar, 2)
SK_EMU_VEC4(unsigned char, uchar, 4)
SK_EMU_VEC2(long long, longlong, 16)
SK_EMU_VEC2(unsigned long long, ulonglong, 16)
#undef SK_EMU_VEC2
#undef SK_EMU_VEC3
#undef SK_EMU_VEC4

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

constexpr int warpSize = 32;

// Minimal runtime-API surface; launchers use csrc/cuda/stream.cuh instead of these.
typedef struct CUstream_st* cudaStream_t;
typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }

// ----------------------------------------------------------------------------------------------
// Engine interface (cuda_shim_runtime.cpp)
// ----------------------------------------------------------------------------------------------
namespace sk_emu {

using Loc = std::source_location;

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  unsigned linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  void* block;      // the running block, nullptr outside a kernel
};

namespace detail {
extern thread_local ThreadState tls;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;
}  // namespace detail

// Compute capability of the emulated device (SEQKERNELS_EMU_ARCH, 80 by default).
int arch();
int multiprocessor_count();
size_t max_dynamic_smem_optin();

void set_max_dynamic_smem(const char* name, const void* kernel, size_t bytes);
void* dynamic_smem_base();
template <typename T>
inline T* dynamic_smem() {
  return static_cast<T*>(dynamic_smem_base());
}
bool register_static_shared(void* ptr, size_t bytes, const char* name);

// Runs body() once per CUDA thread of every block of the grid; throws std::runtime_error on a
// launch error, a deadlock or an error raised inside the kernel.
void run_grid(const char* name, const char* file, int line, const void* kernel, dim3 grid, dim3 block,
              size_t smem_bytes, void (*body)(void*), void* ctx);

template <typename... P, typename... A>
void launch(const char* name, const char* file, int line, void (*kernel)(P...), dim3 grid, dim3 block,
            size_t smem_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "SK_LAUNCH: wrong number of kernel arguments");
  // Arguments are converted to the parameter types once, as cudaLaunchKernel copies them; each
  // emulated thread then receives its own copy.
  struct Ctx {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  } ctx{kernel, std::tuple<std::decay_t<P>...>(static_cast<std::decay_t<P>>(std::forward<A>(args))...)};
  run_grid(
      name, file, line, reinterpret_cast<const void*>(kernel), grid, block, smem_bytes,
      [](void* p) {
        Ctx* c = static_cast<Ctx*>(p);
        std::apply([c](auto... a) { c->kernel(a...); }, c->params);
      },
      &ctx);
}

// Block barrier; mode 0 plain, 1 count, 2 and, 3 or. Returns the reduction.
int syncthreads(int mode, int pred, const Loc& loc);

// Warp collectives. `mask` names the participating lanes, which must include the caller.
enum class ShflMode : int { Idx = 0, Up = 1, Down = 2, Bfly = 3 };
uint64_t shfl(unsigned mask, uint64_t bits, ShflMode mode, int b, int width, const Loc& loc);
enum class VoteOp : int {
  Ballot = 0,
  Any = 1,
  All = 2,
  Sync = 3,
  MatchAny = 4,
  MatchAll = 5,
  RedAdd = 6,
  RedMinU = 7,
  RedMaxU = 8,
  RedMinS = 9,
  RedMaxS = 10,
  RedAnd = 11,
  RedOr = 12,
  RedXor = 13
};
uint64_t vote(unsigned mask, VoteOp op, uint64_t value, int* pred, const Loc& loc);
unsigned activemask();

void mma_m16n8k16(bool is_bf16, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                  const Loc& loc = Loc::current());
void ldmatrix(int n, bool trans, uint32_t* r, const void* smem_row, const Loc& loc = Loc::current());
void cp_async_16(void* smem, const void* gmem, bool pred, const Loc& loc = Loc::current());
[[noreturn]] void trap(const Loc& loc);

template <typename T>
struct is_bf16;

}  // namespace sk_emu

#define threadIdx (::sk_emu::detail::tls.thread_idx)
#define blockIdx (::sk_emu::detail::tls.block_idx)
#define blockDim (::sk_emu::detail::g_block_dim)
#define gridDim (::sk_emu::detail::g_grid_dim)

#define SK_EMU_CAT2(a, b) a##b
#define SK_EMU_CAT(a, b) SK_EMU_CAT2(a, b)
// Appended by build.py after each static __shared__ declaration.
#define SK_EMU_REGISTER_SHARED(var)                                      \
  static const bool SK_EMU_CAT(sk_emu_shared_registered_, __COUNTER__) = \
      ::sk_emu::register_static_shared(static_cast<void*>(&(var)), sizeof(var), #var);

// ----------------------------------------------------------------------------------------------
// Synchronization
// ----------------------------------------------------------------------------------------------
inline void __syncthreads(const sk_emu::Loc& loc = sk_emu::Loc::current()) { sk_emu::syncthreads(0, 0, loc); }
inline int __syncthreads_count(int pred, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return sk_emu::syncthreads(1, pred, loc);
}
inline int __syncthreads_and(int pred, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return sk_emu::syncthreads(2, pred, loc);
}
inline int __syncthreads_or(int pred, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return sk_emu::syncthreads(3, pred, loc);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  sk_emu::vote(mask, sk_emu::VoteOp::Sync, 0, nullptr, loc);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap(const sk_emu::Loc& loc = sk_emu::Loc::current()) { sk_emu::trap(loc); }
inline void __nanosleep(unsigned) {}
long long clock64();

// ----------------------------------------------------------------------------------------------
// Warp shuffles and votes
// ----------------------------------------------------------------------------------------------
namespace sk_emu {
template <typename T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffled types are at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace sk_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return sk_emu::from_bits<T>(sk_emu::shfl(mask, sk_emu::to_bits(var), sk_emu::ShflMode::Idx, src_lane, width, loc));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return sk_emu::from_bits<T>(
      sk_emu::shfl(mask, sk_emu::to_bits(var), sk_emu::ShflMode::Up, static_cast<int>(delta), width, loc));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return sk_emu::from_bits<T>(
      sk_emu::shfl(mask, sk_emu::to_bits(var), sk_emu::ShflMode::Down, static_cast<int>(delta), width, loc));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return sk_emu::from_bits<T>(sk_emu::shfl(mask, sk_emu::to_bits(var), sk_emu::ShflMode::Bfly, lane_mask, width, loc));
}
inline unsigned __ballot_sync(unsigned mask, int pred, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::Ballot, pred != 0, nullptr, loc));
}
inline int __any_sync(unsigned mask, int pred, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<int>(sk_emu::vote(mask, sk_emu::VoteOp::Any, pred != 0, nullptr, loc));
}
inline int __all_sync(unsigned mask, int pred, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<int>(sk_emu::vote(mask, sk_emu::VoteOp::All, pred != 0, nullptr, loc));
}
inline unsigned __activemask() { return sk_emu::activemask(); }
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::MatchAny, sk_emu::to_bits(value), nullptr, loc));
}
template <typename T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::MatchAll, sk_emu::to_bits(value), pred, loc));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::RedAdd, v, nullptr, loc));
}
inline int __reduce_add_sync(unsigned mask, int v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<int>(sk_emu::vote(mask, sk_emu::VoteOp::RedAdd, static_cast<uint32_t>(v), nullptr, loc));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::RedMinU, v, nullptr, loc));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::RedMaxU, v, nullptr, loc));
}
inline int __reduce_min_sync(unsigned mask, int v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<int>(sk_emu::vote(mask, sk_emu::VoteOp::RedMinS, static_cast<uint32_t>(v), nullptr, loc));
}
inline int __reduce_max_sync(unsigned mask, int v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<int>(sk_emu::vote(mask, sk_emu::VoteOp::RedMaxS, static_cast<uint32_t>(v), nullptr, loc));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::RedAnd, v, nullptr, loc));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::RedOr, v, nullptr, loc));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, const sk_emu::Loc& loc = sk_emu::Loc::current()) {
  return static_cast<unsigned>(sk_emu::vote(mask, sk_emu::VoteOp::RedXor, v, nullptr, loc));
}

// ----------------------------------------------------------------------------------------------
// Atomics (device-wide; _block/_system scopes are the same thing here)
// ----------------------------------------------------------------------------------------------
namespace sk_emu {
template <typename T>
inline T atomic_add_float(T* addr, T val) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U* p = reinterpret_cast<U*>(addr);
  U old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T old_v;
    memcpy(&old_v, &old_bits, sizeof(T));
    T new_v = old_v + val;
    U new_bits;
    memcpy(&new_bits, &new_v, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old_v;
  }
}
}  // namespace sk_emu

#define SK_EMU_INT_ATOMICS(T)                                                                                \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }                       \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }                       \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }                     \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }                       \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }                         \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }                       \
  inline T atomicCAS(T* a, T cmp, T v) {                                                                     \
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
    return cmp;                                                                                              \
  }                                                                                                          \
  inline T atomicMax(T* a, T v) {                                                                            \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                            \
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) { \
    }                                                                                                        \
    return old;                                                                                              \
  }                                                                                                          \
  inline T atomicMin(T* a, T v) {                                                                            \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                            \
    while (old > v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) { \
    }                                                                                                        \
    return old;                                                                                              \
  }                                                                                                          \
  inline T atomicAdd_block(T* a, T v) { return atomicAdd(a, v); }                                            \
  inline T atomicAdd_system(T* a, T v) { return atomicAdd(a, v); }                                           \
  inline T atomicCAS_block(T* a, T c, T v) { return atomicCAS(a, c, v); }                                    \
  inline T atomicMax_block(T* a, T v) { return atomicMax(a, v); }                                            \
  inline T atomicMin_block(T* a, T v) { return atomicMin(a, v); }
SK_EMU_INT_ATOMICS(int)
SK_EMU_INT_ATOMICS(unsigned int)
SK_EMU_INT_ATOMICS(unsigned long long)
SK_EMU_INT_ATOMICS(long long)
#undef SK_EMU_INT_ATOMICS

inline unsigned short atomicCAS(unsigned short* a, unsigned short cmp, unsigned short v) {
  __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline float atomicAdd(float* a, float v) { return sk_emu::atomic_add_float(a, v); }
inline double atomicAdd(double* a, double v) { return sk_emu::atomic_add_float(a, v); }
inline float atomicExch(float* a, float v) {
  uint32_t b;
  memcpy(&b, &v, 4);
  uint32_t o = __atomic_exchange_n(reinterpret_cast<uint32_t*>(a), b, __ATOMIC_SEQ_CST);
  float r;
  memcpy(&r, &o, 4);
  return r;
}
inline float atomicAdd_block(float* a, float v) { return atomicAdd(a, v); }
inline float atomicAdd_system(float* a, float v) { return atomicAdd(a, v); }
inline double atomicAdd_block(double* a, double v) { return atomicAdd(a, v); }
// Wrapping increment/decrement with the PTX semantics of atom.inc/atom.dec.
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  unsigned old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (
      !__atomic_compare_exchange_n(a, &old, old >= limit ? 0u : old + 1u, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  unsigned old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(a, &old, (old == 0u || old > limit) ? limit : old - 1u, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_RELAXED)) {
  }
  return old;
}

// ----------------------------------------------------------------------------------------------
// Integer and bit intrinsics, reinterpretation, conversions with explicit rounding
// ----------------------------------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31));
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<int64_t>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}

inline int __float_as_int(float f) { return sk_emu::from_bits<int>(sk_emu::to_bits(f)); }
inline unsigned __float_as_uint(float f) { return sk_emu::from_bits<unsigned>(sk_emu::to_bits(f)); }
inline float __int_as_float(int i) { return sk_emu::from_bits<float>(sk_emu::to_bits(i)); }
inline float __uint_as_float(unsigned i) { return sk_emu::from_bits<float>(sk_emu::to_bits(i)); }
inline long long __double_as_longlong(double d) { return sk_emu::from_bits<long long>(sk_emu::to_bits(d)); }
inline double __longlong_as_double(long long i) { return sk_emu::from_bits<double>(sk_emu::to_bits(i)); }

namespace sk_emu {
// cvt.*i.s32.f32 semantics: NaN -> 0, saturate at the int range.
template <typename I>
inline I saturating_cast(double v) {
  if (std::isnan(v)) return 0;
  if (v <= static_cast<double>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (v >= static_cast<double>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(v);
}
}  // namespace sk_emu
inline int __float2int_rn(float x) { return sk_emu::saturating_cast<int>(std::nearbyint(static_cast<double>(x))); }
inline int __float2int_rz(float x) { return sk_emu::saturating_cast<int>(std::trunc(static_cast<double>(x))); }
inline int __float2int_rd(float x) { return sk_emu::saturating_cast<int>(std::floor(static_cast<double>(x))); }
inline int __float2int_ru(float x) { return sk_emu::saturating_cast<int>(std::ceil(static_cast<double>(x))); }
inline unsigned __float2uint_rn(float x) {
  return sk_emu::saturating_cast<unsigned>(std::nearbyint(static_cast<double>(x)));
}
inline unsigned __float2uint_rz(float x) {
  return sk_emu::saturating_cast<unsigned>(std::trunc(static_cast<double>(x)));
}
inline long long __float2ll_rn(float x) {
  return sk_emu::saturating_cast<long long>(std::nearbyint(static_cast<double>(x)));
}
inline long long __float2ll_rz(float x) {
  return sk_emu::saturating_cast<long long>(std::trunc(static_cast<double>(x)));
}
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline int __double2int_rn(double x) { return sk_emu::saturating_cast<int>(std::nearbyint(x)); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }

// ----------------------------------------------------------------------------------------------
// Float math intrinsics. The fast-math approximations (__expf, __fdividef...) are computed
// exactly here; kernels' tolerances must hold for the approximate versions on the GPU.
// ----------------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }

// CUDA's global min/max overloads.
#define SK_EMU_MINMAX(T)                           \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
SK_EMU_MINMAX(int)
SK_EMU_MINMAX(unsigned int)
SK_EMU_MINMAX(long)
SK_EMU_MINMAX(unsigned long)
SK_EMU_MINMAX(long long)
SK_EMU_MINMAX(unsigned long long)
#undef SK_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }

// Cache-hinted loads and stores are plain accesses.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldca(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline T __ldlu(const T* p) {
  return *p;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stwb(T* p, T v) {
  *p = v;
}

// ----------------------------------------------------------------------------------------------
// __half and __nv_bfloat16 (cuda_fp16.h / cuda_bf16.h subset). Conversions round to nearest
// even like the hardware; the implicit conversions and operators exist only when the
// corresponding __CUDA_NO_* macro is not defined, as in CUDA (torch defines most of them).
// ----------------------------------------------------------------------------------------------
namespace sk_emu {
inline uint32_t f32_bits(float f) { return from_bits<uint32_t>(to_bits(f)); }
inline float bits_f32(uint32_t b) { return from_bits<float>(to_bits(b)); }

inline uint16_t f32_to_f16_rn(float f) {
  const uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;          // NaN: the canonical NaN cvt.rn.f16.f32 returns
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                        // below 2^-14: subnormal half or zero
    // a * 2^24 is exact and below 2^10, and nearbyint rounds to nearest even.
    const float scaled = bits_f32(ax) * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu);
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry rolls into the exponent
  return sign | static_cast<uint16_t>(h);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return bits_f32(f32_bits(v) | sign);
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t f32_to_bf16_rn(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline uint16_t f32_to_bf16_rz(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>(x >> 16);
}
inline float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }
// double -> float rounding to odd: a following round-to-nearest-even to half or bfloat16 then
// equals the direct rounding of the double (no double-rounding error), since float keeps more
// than two extra bits.
inline float f64_to_f32_odd(double d) {
  float f = static_cast<float>(d);
  if (static_cast<double>(f) == d || std::isnan(d)) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  return bits_f32(f32_bits(f) | 1u);
}
}  // namespace sk_emu

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  __half& operator=(const __half_raw& r) {
    __x = r.x;
    return *this;
  }
  constexpr operator __half_raw() const { return __half_raw{__x}; }
#if !defined(__CUDA_NO_HALF_CONVERSIONS__)
  __half(float f) : __x(sk_emu::f32_to_f16_rn(f)) {}
  __half(double f) : __x(sk_emu::f32_to_f16_rn(static_cast<float>(f))) {}
  __half(int i) : __x(sk_emu::f32_to_f16_rn(static_cast<float>(i))) {}
  operator float() const { return sk_emu::f16_to_f32(__x); }
#endif
};

struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) {
    __x = r.x;
    return *this;
  }
  constexpr operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
#if !defined(__CUDA_NO_BFLOAT16_CONVERSIONS__)
  __nv_bfloat16(float f) : __x(sk_emu::f32_to_bf16_rn(f)) {}
  __nv_bfloat16(double f) : __x(sk_emu::f32_to_bf16_rn(static_cast<float>(f))) {}
  __nv_bfloat16(int i) : __x(sk_emu::f32_to_bf16_rn(static_cast<float>(i))) {}
  operator float() const { return sk_emu::bf16_to_f32(__x); }
#endif
};

struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

// The mma element tags of csrc/cuda/mma.cuh, declared here so the tag -> bf16 flag mapping
// is known before that header is parsed.
namespace seqkernels {
namespace mma {
struct f16;
struct bf16;
}  // namespace mma
}  // namespace seqkernels
namespace sk_emu {
template <>
struct is_bf16<seqkernels::mma::f16> : std::false_type {};
template <>
struct is_bf16<seqkernels::mma::bf16> : std::true_type {};
}  // namespace sk_emu

inline __half sk_emu_make_half(unsigned short b) { return __half(__half_raw{b}); }
inline __nv_bfloat16 sk_emu_make_bf16(unsigned short b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }

inline __half __float2half(float f) { return sk_emu_make_half(sk_emu::f32_to_f16_rn(f)); }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return __float2half(static_cast<float>(d)); }
inline float __half2float(__half h) { return sk_emu::f16_to_f32(h.__x); }
inline __half __int2half_rn(int i) { return __float2half(static_cast<float>(i)); }
inline int __half2int_rn(__half h) { return __float2int_rn(__half2float(h)); }
inline int __half2int_rz(__half h) { return __float2int_rz(__half2float(h)); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __ushort_as_half(unsigned short b) { return sk_emu_make_half(b); }
inline __half __short_as_half(short b) { return sk_emu_make_half(static_cast<unsigned short>(b)); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__float2half(a), __float2half(a)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __half2half2(__half a) { return __half2{a, a}; }
inline __half2 __lows2half2(__half2 a, __half2 b) { return __half2{a.x, b.x}; }
inline __half2 __highs2half2(__half2 a, __half2 b) { return __half2{a.y, b.y}; }

inline __nv_bfloat16 __float2bfloat16(float f) { return sk_emu_make_bf16(sk_emu::f32_to_bf16_rn(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return sk_emu_make_bf16(sk_emu::f32_to_bf16_rz(f)); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16(static_cast<float>(d)); }
inline float __bfloat162float(__nv_bfloat16 b) { return sk_emu::bf16_to_f32(b.__x); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __float2bfloat16(static_cast<float>(i)); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return static_cast<short>(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return sk_emu_make_bf16(b); }
inline __nv_bfloat16 __short_as_bfloat16(short b) { return sk_emu_make_bf16(static_cast<unsigned short>(b)); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return make_float2(__bfloat162float(h.x), __bfloat162float(h.y)); }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162{a, a}; }

// Arithmetic: exact in double for these narrow types (division: correctly rounded in double),
// then one rounding to the narrow type, as the hardware does.
#define SK_EMU_NARROW_ARITH(T, TO_F, FROM_F, T2)                                                               \
  inline T __hadd(T a, T b) { return FROM_F(sk_emu::f64_to_f32_odd(static_cast<double>(TO_F(a)) + TO_F(b))); } \
  inline T __hsub(T a, T b) { return FROM_F(sk_emu::f64_to_f32_odd(static_cast<double>(TO_F(a)) - TO_F(b))); } \
  inline T __hmul(T a, T b) { return FROM_F(sk_emu::f64_to_f32_odd(static_cast<double>(TO_F(a)) * TO_F(b))); } \
  inline T __hdiv(T a, T b) { return FROM_F(sk_emu::f64_to_f32_odd(static_cast<double>(TO_F(a)) / TO_F(b))); } \
  inline T __hfma(T a, T b, T c) {                                                                             \
    return FROM_F(sk_emu::f64_to_f32_odd(fma(static_cast<double>(TO_F(a)), TO_F(b), TO_F(c))));                \
  }                                                                                                            \
  inline T __hneg(T a) {                                                                                       \
    T r = a;                                                                                                   \
    r.__x ^= 0x8000u;                                                                                          \
    return r;                                                                                                  \
  }                                                                                                            \
  inline T __habs(T a) {                                                                                       \
    T r = a;                                                                                                   \
    r.__x &= 0x7fffu;                                                                                          \
    return r;                                                                                                  \
  }                                                                                                            \
  inline T __hmax(T a, T b) { return FROM_F(fmaxf(TO_F(a), TO_F(b))); }                                        \
  inline T __hmin(T a, T b) { return FROM_F(fminf(TO_F(a), TO_F(b))); }                                        \
  inline bool __heq(T a, T b) { return TO_F(a) == TO_F(b); }                                                   \
  inline bool __hne(T a, T b) { return TO_F(a) != TO_F(b); }                                                   \
  inline bool __hlt(T a, T b) { return TO_F(a) < TO_F(b); }                                                    \
  inline bool __hle(T a, T b) { return TO_F(a) <= TO_F(b); }                                                   \
  inline bool __hgt(T a, T b) { return TO_F(a) > TO_F(b); }                                                    \
  inline bool __hge(T a, T b) { return TO_F(a) >= TO_F(b); }                                                   \
  inline bool __hisnan(T a) { return std::isnan(TO_F(a)); }                                                    \
  inline int __hisinf(T a) { return std::isinf(TO_F(a)) ? (TO_F(a) > 0 ? 1 : -1) : 0; }                        \
  inline T2 __hadd2(T2 a, T2 b) { return T2{__hadd(a.x, b.x), __hadd(a.y, b.y)}; }                             \
  inline T2 __hsub2(T2 a, T2 b) { return T2{__hsub(a.x, b.x), __hsub(a.y, b.y)}; }                             \
  inline T2 __hmul2(T2 a, T2 b) { return T2{__hmul(a.x, b.x), __hmul(a.y, b.y)}; }                             \
  inline T2 __h2div(T2 a, T2 b) { return T2{__hdiv(a.x, b.x), __hdiv(a.y, b.y)}; }                             \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }             \
  inline T2 __hneg2(T2 a) { return T2{__hneg(a.x), __hneg(a.y)}; }                                             \
  inline T2 __habs2(T2 a) { return T2{__habs(a.x), __habs(a.y)}; }                                             \
  inline T2 __hmax2(T2 a, T2 b) { return T2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }                             \
  inline T2 __hmin2(T2 a, T2 b) { return T2{__hmin(a.x, b.x), __hmin(a.y, b.y)}; }
SK_EMU_NARROW_ARITH(__half, __half2float, __float2half, __half2)
SK_EMU_NARROW_ARITH(__nv_bfloat16, __bfloat162float, __float2bfloat16, __nv_bfloat162)
#undef SK_EMU_NARROW_ARITH

#define SK_EMU_NARROW_OPERATORS(T)                             \
  inline T operator+(T a, T b) { return __hadd(a, b); }        \
  inline T operator-(T a, T b) { return __hsub(a, b); }        \
  inline T operator*(T a, T b) { return __hmul(a, b); }        \
  inline T operator/(T a, T b) { return __hdiv(a, b); }        \
  inline T operator-(T a) { return __hneg(a); }                \
  inline T operator+(T a) { return a; }                        \
  inline T& operator+=(T& a, T b) { return a = __hadd(a, b); } \
  inline T& operator-=(T& a, T b) { return a = __hsub(a, b); } \
  inline T& operator*=(T& a, T b) { return a = __hmul(a, b); } \
  inline T& operator/=(T& a, T b) { return a = __hdiv(a, b); } \
  inline bool operator==(T a, T b) { return __heq(a, b); }     \
  inline bool operator!=(T a, T b) { return __hne(a, b); }     \
  inline bool operator<(T a, T b) { return __hlt(a, b); }      \
  inline bool operator<=(T a, T b) { return __hle(a, b); }     \
  inline bool operator>(T a, T b) { return __hgt(a, b); }      \
  inline bool operator>=(T a, T b) { return __hge(a, b); }
#define SK_EMU_NARROW2_OPERATORS(T2)                               \
  inline T2 operator+(T2 a, T2 b) { return __hadd2(a, b); }        \
  inline T2 operator-(T2 a, T2 b) { return __hsub2(a, b); }        \
  inline T2 operator*(T2 a, T2 b) { return __hmul2(a, b); }        \
  inline T2 operator/(T2 a, T2 b) { return __h2div(a, b); }        \
  inline T2& operator+=(T2& a, T2 b) { return a = __hadd2(a, b); } \
  inline T2& operator-=(T2& a, T2 b) { return a = __hsub2(a, b); } \
  inline T2& operator*=(T2& a, T2 b) { return a = __hmul2(a, b); }
#if !defined(__CUDA_NO_HALF_OPERATORS__)
SK_EMU_NARROW_OPERATORS(__half)
#endif
#if !defined(__CUDA_NO_HALF2_OPERATORS__)
SK_EMU_NARROW2_OPERATORS(__half2)
#endif
#if !defined(__CUDA_NO_BFLOAT16_OPERATORS__)
SK_EMU_NARROW_OPERATORS(__nv_bfloat16)
#endif
#if !defined(__CUDA_NO_BFLOAT162_OPERATORS__)
SK_EMU_NARROW2_OPERATORS(__nv_bfloat162)
#endif
#undef SK_EMU_NARROW_OPERATORS
#undef SK_EMU_NARROW2_OPERATORS
