// Engine of the CUDA-on-CPU harness (see cuda_shim.h and docs/EMULATION.md).
//
// A launch runs its blocks one after another. Each CUDA thread of a block is a host thread of
// a pool (real threads, so ThreadSanitizer sees the kernel's concurrency), reused across blocks
// and launches. All rendezvous of a block (__syncthreads, warp collectives) go through one
// mutex; every thread records what it waits on, so a rendezvous that can never complete is
// detected exactly (every live thread waiting) and reported instead of hanging. A watchdog
// covers the remaining case of a thread that never reaches a rendezvous (an infinite loop).
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

// cuda_shim.h is force-included by build.py.

long long clock64() {
  return static_cast<long long>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

namespace sk_emu {
namespace detail {
thread_local ThreadState tls;
dim3 g_block_dim;
dim3 g_grid_dim;
}  // namespace detail

namespace {

constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxSmemCapacity = 227 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

// Thrown inside kernel threads to unwind them once the block has failed.
struct Abort {};

int env_int(const char* name, int dflt) {
  const char* v = getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return atoi(v);
}

std::string fmt_loc(const Loc& l) {
  std::ostringstream os;
  os << l.file_name() << ":" << l.line();
  return os.str();
}

std::string hex(unsigned v) {
  char buf[16];
  snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

enum class Wait : int { Running, Barrier, Warp, Exited };

const char* vote_name(VoteOp op) {
  switch (op) {
    case VoteOp::Ballot:
      return "__ballot_sync";
    case VoteOp::Any:
      return "__any_sync";
    case VoteOp::All:
      return "__all_sync";
    case VoteOp::Sync:
      return "__syncwarp";
    case VoteOp::MatchAny:
      return "__match_any_sync";
    case VoteOp::MatchAll:
      return "__match_all_sync";
    default:
      return "__reduce_*_sync";
  }
}

// Collective kinds (beyond VoteOp values) used to check that the lanes of a rendezvous agree.
constexpr int kKindShfl = 100;
constexpr int kKindMma = 101;
constexpr int kKindLdmatrix = 102;

struct Slot {
  std::condition_variable cv;
  Wait wait = Wait::Running;
  bool released = false;
  // What the thread waits at, for diagnostics and agreement checks.
  int kind = 0;
  unsigned mask = 0;
  const char* file = "";
  int line = 0;
  // Collective inputs and outputs.
  uint64_t value = 0;
  int b = 0, width = 32, mode = 0;
  uint32_t regs[10] = {};
  const void* ptr = nullptr;
  uint64_t out = 0;
  int out_pred = 0;
  uint32_t out_regs[4] = {};
};

struct Group {
  unsigned mask;
  unsigned arrived;
  int kind;
};

struct BlockState {
  std::mutex mu;
  int nthreads = 0;
  int nwarps = 0;
  std::vector<Slot> slots;
  std::vector<std::vector<Group>> groups;  // open warp rendezvous, per warp
  int bar_arrived = 0;
  int bar_mode = 0;
  int bar_acc = 0;
  const char* bar_file = "";
  int bar_line = 0;
  int n_waiting = 0;
  int n_exited = 0;
  int n_done = 0;  // exited or unwound
  uint64_t progress = 0;
  bool aborted = false;
  std::string error;
  std::condition_variable done_cv;

  void reset(int n) {
    nthreads = n;
    nwarps = (n + 31) / 32;
    if (static_cast<int>(slots.size()) < n) slots = std::vector<Slot>(n);
    for (int i = 0; i < n; ++i) {
      Slot& s = slots[i];
      s.wait = Wait::Running;
      s.released = false;
      s.kind = 0;
    }
    groups.assign(nwarps, {});
    bar_arrived = 0;
    n_waiting = n_exited = n_done = 0;
    aborted = false;
    error.clear();
  }
};

struct LaunchInfo {
  const char* name = "";
  const char* file = "";
  int line = 0;
  dim3 grid, block;
  size_t smem = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
};

// Engine state is never destroyed: pool threads wait on these condition variables until the
// process ends, and destroying a waited-on condition variable at exit blocks forever.
LaunchInfo g_launch;
BlockState& g_block = *new BlockState;
std::mutex& g_launch_mu = *new std::mutex;  // one launch at a time: static shared memory is per kernel

alignas(128) unsigned char g_dyn_smem[kMaxSmemCapacity];
size_t g_dyn_size = 0;

std::mutex g_static_mu;
struct StaticShared {
  void* ptr;
  size_t bytes;
  const char* name;
};
std::vector<StaticShared> g_static_shared;

std::mutex g_attr_mu;
std::map<const void*, size_t> g_max_dyn_attr;

// ---------------------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------------------
std::string where() {
  std::ostringstream os;
  const ThreadState& t = detail::tls;
  os << "kernel " << g_launch.name << " (launched at " << g_launch.file << ":" << g_launch.line << "), block ("
     << t.block_idx.x << "," << t.block_idx.y << "," << t.block_idx.z << ")";
  return os.str();
}

std::string describe_slot(const Slot& s) {
  std::ostringstream os;
  switch (s.wait) {
    case Wait::Running:
      os << "running";
      break;
    case Wait::Exited:
      os << "exited";
      break;
    case Wait::Barrier:
      os << "waiting at __syncthreads at " << s.file << ":" << s.line;
      break;
    case Wait::Warp: {
      const char* what = s.kind == kKindShfl       ? "__shfl_*_sync"
                         : s.kind == kKindMma      ? "mma_m16n8k16"
                         : s.kind == kKindLdmatrix ? "ldmatrix"
                                                   : vote_name(static_cast<VoteOp>(s.kind));
      os << "waiting in " << what << "(mask=" << hex(s.mask) << ") at " << s.file << ":" << s.line;
      break;
    }
  }
  return os.str();
}

// "threads 0-31: waiting at ...; threads 32-63: exited", runs of equal state merged.
std::string describe_block(BlockState& b) {
  std::ostringstream os;
  int start = 0;
  std::string cur = b.nthreads > 0 ? describe_slot(b.slots[0]) : "";
  for (int i = 1; i <= b.nthreads; ++i) {
    std::string d = i < b.nthreads ? describe_slot(b.slots[i]) : "";
    if (i == b.nthreads || d != cur) {
      os << "\n    thread" << (i - 1 > start ? "s " : " ") << start;
      if (i - 1 > start) os << "-" << (i - 1);
      os << ": " << cur;
      start = i;
      cur = d;
    }
  }
  return os.str();
}

// Fails the block: records the first error, wakes every waiting thread so it unwinds.
void fail_locked(BlockState& b, const std::string& msg) {
  if (!b.aborted) {
    b.aborted = true;
    b.error = msg;
  }
  for (int i = 0; i < b.nthreads; ++i) b.slots[i].cv.notify_one();
}

[[noreturn]] void fail_and_throw(BlockState& b, std::unique_lock<std::mutex>& lk, const std::string& msg) {
  fail_locked(b, msg);
  lk.unlock();
  throw Abort{};
}

BlockState& current_block(const char* what) {
  if (detail::tls.block == nullptr) {
    throw std::runtime_error(std::string("sk_emu: ") + what + " called outside a kernel launched with SK_LAUNCH");
  }
  return *static_cast<BlockState*>(detail::tls.block);
}

void check_deadlock_locked(BlockState& b) {
  if (b.n_waiting > 0 && b.n_waiting + b.n_exited == b.nthreads) {
    fail_locked(b, "sk_emu: deadlock in " + where() + ": every thread is waiting or has exited" + describe_block(b));
  }
}

// Blocks the calling thread (slot already filled, counted in n_waiting) until released.
void wait_released(BlockState& b, Slot& me, std::unique_lock<std::mutex>& lk) {
  check_deadlock_locked(b);
  me.cv.wait(lk, [&] { return me.released || b.aborted; });
  if (!me.released) {
    lk.unlock();
    throw Abort{};
  }
  me.released = false;
  me.wait = Wait::Running;
}

void release_locked(BlockState& b, Slot& s) {
  s.released = true;
  --b.n_waiting;
  s.cv.notify_one();
}

// ---------------------------------------------------------------------------------------------
// Warp collectives
// ---------------------------------------------------------------------------------------------
struct WarpCtx {
  BlockState* b;
  int warp, lane, base, lanes_in_warp;
};

WarpCtx warp_ctx(BlockState& b) {
  const unsigned t = detail::tls.linear;
  WarpCtx w;
  w.b = &b;
  w.warp = static_cast<int>(t / 32);
  w.lane = static_cast<int>(t % 32);
  w.base = w.warp * 32;
  w.lanes_in_warp = std::min(32, b.nthreads - w.base);
  return w;
}

using Completer = void (*)(BlockState&, const WarpCtx&, unsigned mask);

// Joins (or opens) the rendezvous of `mask` in the caller's warp. The last lane to arrive runs
// `complete`, which reads every lane's inputs and writes their outputs, then releases them.
void warp_rendezvous(BlockState& b, const WarpCtx& w, Slot& me, int kind, unsigned mask, const Loc& loc,
                     Completer complete, const char* what) {
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.aborted) {
    lk.unlock();
    throw Abort{};
  }
  const unsigned bit = 1u << w.lane;
  const unsigned existing = w.lanes_in_warp == 32 ? kFullMask : ((1u << w.lanes_in_warp) - 1u);
  if (!(mask & bit)) {
    fail_and_throw(b, lk,
                   "sk_emu: " + std::string(what) + " at " + fmt_loc(loc) + " in " + where() + ": lane " +
                       std::to_string(w.lane) + " of warp " + std::to_string(w.warp) + " calls it with mask " +
                       hex(mask) + " that does not include itself");
  }
  if (mask & ~existing) {
    fail_and_throw(b, lk,
                   "sk_emu: " + std::string(what) + " at " + fmt_loc(loc) + " in " + where() + ": mask " + hex(mask) +
                       " names lanes that do not exist (warp " + std::to_string(w.warp) + " has " +
                       std::to_string(w.lanes_in_warp) + " threads, blockDim not a multiple of 32)");
  }
  for (int l = 0; l < w.lanes_in_warp; ++l) {
    if ((mask >> l & 1u) && b.slots[w.base + l].wait == Wait::Exited) {
      fail_and_throw(b, lk,
                     "sk_emu: " + std::string(what) + " at " + fmt_loc(loc) + " in " + where() + ": mask " + hex(mask) +
                         " includes lane " + std::to_string(l) + " of warp " + std::to_string(w.warp) +
                         ", which has already exited" + describe_block(b));
    }
  }
  me.kind = kind;
  me.mask = mask;
  me.file = loc.file_name();
  me.line = static_cast<int>(loc.line());
  std::vector<Group>& open = b.groups[w.warp];
  Group* g = nullptr;
  for (Group& cand : open) {
    if (cand.mask == mask && !(cand.arrived & bit)) {
      g = &cand;
      break;
    }
  }
  if (g == nullptr) {
    open.push_back(Group{mask, 0u, kind});
    g = &open.back();
  } else if (g->kind != kind) {
    const int other = __builtin_ctz(g->arrived);
    fail_and_throw(b, lk,
                   "sk_emu: divergent warp collectives with mask " + hex(mask) + " in " + where() + ": lane " +
                       std::to_string(w.lane) + " of warp " + std::to_string(w.warp) + " calls " + what + " at " +
                       fmt_loc(loc) + " while lane " + std::to_string(other) + " is " +
                       describe_slot(b.slots[w.base + other]));
  }
  g->arrived |= bit;
  if (g->arrived == mask) {
    const size_t idx = static_cast<size_t>(g - open.data());
    open.erase(open.begin() + static_cast<std::ptrdiff_t>(idx));
    try {
      complete(b, w, mask);
    } catch (const std::exception& e) {
      fail_and_throw(b, lk, std::string(e.what()) + " (at " + fmt_loc(loc) + " in " + where() + ")");
    }
    ++b.progress;
    for (int l = 0; l < 32; ++l) {
      if (l != w.lane && (mask >> l & 1u)) release_locked(b, b.slots[w.base + l]);
    }
    me.wait = Wait::Running;
    return;
  }
  me.wait = Wait::Warp;
  ++b.n_waiting;
  wait_released(b, me, lk);
}

Slot& my_slot(BlockState& b) { return b.slots[detail::tls.linear]; }

void complete_shfl(BlockState& b, const WarpCtx& w, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Slot& s = b.slots[w.base + l];
    const int width = s.width;
    const unsigned segmask = static_cast<unsigned>(32 - width) & 0x1fu;
    const unsigned cval = s.mode == static_cast<int>(ShflMode::Up) ? 0u : 0x1fu;
    const int lane = l;
    const int max_lane = static_cast<int>((static_cast<unsigned>(lane) & segmask) | (cval & ~segmask));
    const int min_lane = static_cast<int>(static_cast<unsigned>(lane) & segmask);
    const int bval = s.b & 0x1f;
    int j = lane;
    bool pval = true;
    switch (static_cast<ShflMode>(s.mode)) {
      case ShflMode::Up:
        j = lane - bval;
        pval = j >= max_lane;
        break;
      case ShflMode::Down:
        j = lane + bval;
        pval = j <= max_lane;
        break;
      case ShflMode::Bfly:
        j = lane ^ bval;
        pval = j <= max_lane;
        break;
      case ShflMode::Idx:
        j = min_lane | (bval & static_cast<int>(~segmask & 0x1fu));
        pval = j <= max_lane;
        break;
    }
    if (!pval) j = lane;
    // Reading a lane that does not take part is undefined: give it garbage bits so a kernel
    // that uses the value shows it.
    s.out = (mask >> j & 1u) ? b.slots[w.base + j].value : ~0ull;
  }
}

template <VoteOp Op>
void complete_vote(BlockState& b, const WarpCtx& w, unsigned mask) {
  uint64_t acc = 0;
  bool all_equal = true;
  const uint64_t first = b.slots[w.base + __builtin_ctz(mask)].value;
  switch (Op) {
    case VoteOp::All:
      acc = 1;
      break;
    case VoteOp::RedAnd:
      acc = 0xffffffffull;
      break;
    case VoteOp::RedMinU:
      acc = 0xffffffffull;
      break;
    case VoteOp::RedMaxS:
      acc = static_cast<uint32_t>(INT32_MIN);
      break;
    case VoteOp::RedMinS:
      acc = static_cast<uint32_t>(INT32_MAX);
      break;
    default:
      acc = 0;
      break;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const uint64_t v = b.slots[w.base + l].value;
    const uint32_t v32 = static_cast<uint32_t>(v);
    switch (Op) {
      case VoteOp::Ballot:
        acc |= v ? (1ull << l) : 0;
        break;
      case VoteOp::Any:
        acc |= v ? 1 : 0;
        break;
      case VoteOp::All:
        acc &= v ? 1 : 0;
        break;
      case VoteOp::RedAdd:
        acc = static_cast<uint32_t>(acc + v32);
        break;
      case VoteOp::RedMinU:
        acc = std::min<uint32_t>(static_cast<uint32_t>(acc), v32);
        break;
      case VoteOp::RedMaxU:
        acc = std::max<uint32_t>(static_cast<uint32_t>(acc), v32);
        break;
      case VoteOp::RedMinS:
        acc = static_cast<uint32_t>(std::min(static_cast<int32_t>(acc), static_cast<int32_t>(v32)));
        break;
      case VoteOp::RedMaxS:
        acc = static_cast<uint32_t>(std::max(static_cast<int32_t>(acc), static_cast<int32_t>(v32)));
        break;
      case VoteOp::RedAnd:
        acc &= v32;
        break;
      case VoteOp::RedOr:
        acc |= v32;
        break;
      case VoteOp::RedXor:
        acc ^= v32;
        break;
      case VoteOp::MatchAll:
        all_equal = all_equal && v == first;
        break;
      default:
        break;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Slot& s = b.slots[w.base + l];
    if (Op == VoteOp::MatchAny) {
      uint64_t m = 0;
      for (int k = 0; k < 32; ++k) {
        if ((mask >> k & 1u) && b.slots[w.base + k].value == s.value) m |= 1ull << k;
      }
      s.out = m;
    } else if (Op == VoteOp::MatchAll) {
      s.out = all_equal ? mask : 0;
      s.out_pred = all_equal ? 1 : 0;
    } else {
      s.out = acc;
    }
  }
}

Completer vote_completer(VoteOp op) {
  switch (op) {
    case VoteOp::Ballot:
      return complete_vote<VoteOp::Ballot>;
    case VoteOp::Any:
      return complete_vote<VoteOp::Any>;
    case VoteOp::All:
      return complete_vote<VoteOp::All>;
    case VoteOp::Sync:
      return complete_vote<VoteOp::Sync>;
    case VoteOp::MatchAny:
      return complete_vote<VoteOp::MatchAny>;
    case VoteOp::MatchAll:
      return complete_vote<VoteOp::MatchAll>;
    case VoteOp::RedAdd:
      return complete_vote<VoteOp::RedAdd>;
    case VoteOp::RedMinU:
      return complete_vote<VoteOp::RedMinU>;
    case VoteOp::RedMaxU:
      return complete_vote<VoteOp::RedMaxU>;
    case VoteOp::RedMinS:
      return complete_vote<VoteOp::RedMinS>;
    case VoteOp::RedMaxS:
      return complete_vote<VoteOp::RedMaxS>;
    case VoteOp::RedAnd:
      return complete_vote<VoteOp::RedAnd>;
    case VoteOp::RedOr:
      return complete_vote<VoteOp::RedOr>;
    case VoteOp::RedXor:
      return complete_vote<VoteOp::RedXor>;
  }
  return complete_vote<VoteOp::Sync>;
}

// ---------------------------------------------------------------------------------------------
// Shared memory bookkeeping
// ---------------------------------------------------------------------------------------------
bool in_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c >= g_dyn_smem && c + bytes <= g_dyn_smem + g_dyn_size) return true;
  std::lock_guard<std::mutex> lk(g_static_mu);
  for (const StaticShared& s : g_static_shared) {
    const auto* base = static_cast<const unsigned char*>(s.ptr);
    if (c >= base && c + bytes <= base + s.bytes) return true;
  }
  return false;
}

void check_shared_16(const void* p, const char* what, int lane) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    throw std::runtime_error(std::string("sk_emu: ") + what + ": lane " + std::to_string(lane) +
                             " gives an address that is not 16-byte aligned");
  }
  if (!in_shared(p, 16)) {
    throw std::runtime_error(std::string("sk_emu: ") + what + ": lane " + std::to_string(lane) +
                             " gives an address that is not inside this launch's shared memory");
  }
}

// Poisoning runs outside the sanitizers' view of "the kernel": shadow state is untouched.
__attribute__((no_sanitize_address, no_sanitize_thread)) void poison_bytes(void* p, size_t n) {
  volatile unsigned char* c = static_cast<volatile unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) c[i] = 0xFF;
}

void poison_shared() {
  poison_bytes(g_dyn_smem, g_dyn_size);
  std::lock_guard<std::mutex> lk(g_static_mu);
  for (const StaticShared& s : g_static_shared) poison_bytes(s.ptr, s.bytes);
}

void complete_mma(BlockState& b, const WarpCtx& w, unsigned) {
  const bool bf16 = b.slots[w.base].mode != 0;
  float A[16][16], B[16][8], C[16][8];
  auto narrow = [bf16](uint32_t bits) {
    return bf16 ? bf16_to_f32(static_cast<uint16_t>(bits)) : f16_to_f32(static_cast<uint16_t>(bits));
  };
  for (int l = 0; l < 32; ++l) {
    const Slot& s = b.slots[w.base + l];
    if ((s.mode != 0) != bf16) throw std::runtime_error("sk_emu: mma_m16n8k16: lanes disagree on f16 vs bf16");
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 2; ++i) {
      A[g][2 * t + i] = narrow(s.regs[0] >> (16 * i));
      A[g + 8][2 * t + i] = narrow(s.regs[1] >> (16 * i));
      A[g][2 * t + 8 + i] = narrow(s.regs[2] >> (16 * i));
      A[g + 8][2 * t + 8 + i] = narrow(s.regs[3] >> (16 * i));
      B[2 * t + i][g] = narrow(s.regs[4] >> (16 * i));
      B[2 * t + 8 + i][g] = narrow(s.regs[5] >> (16 * i));
      C[g][2 * t + i] = bits_f32(s.regs[6 + i]);
      C[g + 8][2 * t + i] = bits_f32(s.regs[8 + i]);
    }
  }
  for (int l = 0; l < 32; ++l) {
    Slot& s = b.slots[w.base + l];
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 2; ++r) {
      for (int i = 0; i < 2; ++i) {
        const int row = g + 8 * r, col = 2 * t + i;
        float acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc = fmaf(A[row][k], B[k][col], acc);
        s.out_regs[2 * r + i] = f32_bits(acc);
      }
    }
  }
}

void complete_ldmatrix(BlockState& b, const WarpCtx& w, unsigned) {
  const int n = b.slots[w.base].b;
  const bool trans = b.slots[w.base].mode != 0;
  for (int l = 0; l < 32; ++l) {
    if (b.slots[w.base + l].b != n || (b.slots[w.base + l].mode != 0) != trans) {
      throw std::runtime_error("sk_emu: ldmatrix: lanes disagree on the number of matrices or .trans");
    }
  }
  uint16_t M[4][8][8];
  for (int m = 0; m < n; ++m) {
    for (int r = 0; r < 8; ++r) {
      const int lane = 8 * m + r;
      const void* p = b.slots[w.base + lane].ptr;
      check_shared_16(p, "ldmatrix", lane);
      memcpy(M[m][r], p, 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    Slot& s = b.slots[w.base + l];
    const int row = l / 4, col = 2 * (l % 4);
    for (int m = 0; m < n; ++m) {
      const uint16_t lo = trans ? M[m][col][row] : M[m][row][col];
      const uint16_t hi = trans ? M[m][col + 1][row] : M[m][row][col + 1];
      s.out_regs[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Thread pool
// ---------------------------------------------------------------------------------------------
// Each worker waits on its own mutex. A pool-wide one would order the threads of a block for
// ThreadSanitizer: a worker that finished its kernel body and went back to wait on it would
// happen-before every worker that took it later, so on a loaded machine, where the threads of a
// block run one after the other, a missing __syncthreads went unreported (seen on a 2-core CI run).
// With one mutex per worker the only edges are launcher -> worker, none between workers' bodies.
struct Worker {
  pthread_t thread;
  unsigned index = 0;
  std::mutex mu;
  std::condition_variable cv;
  uint64_t gen = 0;  // block generation the launcher asked this worker to run (guarded by mu)
};

std::mutex& g_pool_mu = *new std::mutex;
std::vector<std::unique_ptr<Worker>>& g_workers = *new std::vector<std::unique_ptr<Worker>>;
uint64_t g_block_gen = 0;
uint3 g_cur_block_idx;

void thread_finished_locked(BlockState& b, Slot& me, bool normal_exit) {
  me.wait = Wait::Exited;
  ++b.n_exited;
  ++b.n_done;
  ++b.progress;
  if (normal_exit && !b.aborted) {
    if (b.bar_arrived > 0) {
      fail_locked(b, "sk_emu: __syncthreads in divergent code in " + where() + ": thread " +
                         std::to_string(&me - b.slots.data()) + " exited while other threads wait at the barrier" +
                         describe_block(b));
    } else {
      const int t = static_cast<int>(&me - b.slots.data());
      const int warp = t / 32, lane = t % 32;
      for (const Group& g : b.groups[warp]) {
        if (g.mask >> lane & 1u) {
          fail_locked(b, "sk_emu: lane " + std::to_string(lane) + " of warp " + std::to_string(warp) + " in " +
                             where() + " exited while lanes of mask " + hex(g.mask) +
                             " wait for it in a warp collective" + describe_block(b));
          break;
        }
      }
      if (!b.aborted) check_deadlock_locked(b);
    }
  }
  b.done_cv.notify_all();
}

void run_one_thread(unsigned linear) {
  BlockState& b = g_block;
  const dim3 bd = g_launch.block;
  ThreadState& t = detail::tls;
  t.linear = linear;
  t.thread_idx = uint3{linear % bd.x, (linear / bd.x) % bd.y, linear / (bd.x * bd.y)};
  t.block_idx = g_cur_block_idx;
  t.block = &b;
  bool normal = true;
  try {
    g_launch.body(g_launch.ctx);
  } catch (const Abort&) {
    normal = false;
  } catch (const std::exception& e) {
    normal = false;
    std::lock_guard<std::mutex> lk(b.mu);
    fail_locked(b, std::string(e.what()) + " [thread " + std::to_string(linear) + " of " + where() + "]");
  } catch (...) {
    normal = false;
    std::lock_guard<std::mutex> lk(b.mu);
    fail_locked(b, "sk_emu: unknown exception in thread " + std::to_string(linear) + " of " + where());
  }
  t.block = nullptr;
  std::lock_guard<std::mutex> lk(b.mu);
  thread_finished_locked(b, b.slots[linear], normal);
}

void* worker_main(void* arg) {
  Worker& me = *static_cast<Worker*>(arg);
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(me.mu);
      me.cv.wait(lk, [&] { return me.gen != seen; });
      seen = me.gen;
    }
    run_one_thread(me.index);
  }
  return nullptr;
}

void ensure_workers(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  while (static_cast<int>(g_workers.size()) < n) {
    auto w = std::make_unique<Worker>();
    Worker* raw = w.get();
    raw->index = static_cast<unsigned>(g_workers.size());
    g_workers.push_back(std::move(w));
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    // Kernels keep fragments and accumulators in local arrays; sanitizers enlarge frames.
    pthread_attr_setstacksize(&attr, 4u << 20);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int rc = pthread_create(&raw->thread, &attr, worker_main, raw);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
      g_workers.pop_back();
      throw std::runtime_error("sk_emu: cannot create a host thread for the emulated block (errno " +
                               std::to_string(rc) + ")");
    }
  }
}

std::string launch_where(const LaunchInfo& L) {
  return std::string("kernel ") + L.name + " (launched at " + L.file + ":" + std::to_string(L.line) + ")";
}

// Runs one block to completion; returns the block's error ("" when it succeeded).
std::string run_block(uint3 bid, int nthreads) {
  BlockState& b = g_block;
  {
    std::lock_guard<std::mutex> lk(b.mu);
    b.reset(nthreads);
  }
  poison_shared();
  {
    std::lock_guard<std::mutex> lk(g_pool_mu);
    g_cur_block_idx = bid;
    ++g_block_gen;
    for (int i = 0; i < nthreads; ++i) {
      Worker& w = *g_workers[i];
      {
        std::lock_guard<std::mutex> wl(w.mu);
        w.gen = g_block_gen;
      }
      w.cv.notify_one();
    }
  }
  const int timeout_s = env_int("SEQKERNELS_EMU_TIMEOUT", 60);
  std::unique_lock<std::mutex> lk(b.mu);
  uint64_t last_progress = b.progress;
  auto last_change = std::chrono::steady_clock::now();
  bool timed_out = false;
  while (b.n_done < nthreads) {
    b.done_cv.wait_for(lk, std::chrono::milliseconds(200));
    if (b.progress != last_progress) {
      last_progress = b.progress;
      last_change = std::chrono::steady_clock::now();
      continue;
    }
    const double idle = std::chrono::duration<double>(std::chrono::steady_clock::now() - last_change).count();
    if (!timed_out && idle > timeout_s) {
      timed_out = true;
      fail_locked(b, "sk_emu: no progress for " + std::to_string(timeout_s) + " s (SEQKERNELS_EMU_TIMEOUT) in " +
                         launch_where(g_launch) + ", block (" + std::to_string(bid.x) + "," + std::to_string(bid.y) +
                         "," + std::to_string(bid.z) + "): a thread never reaches a barrier or loops forever" +
                         describe_block(b));
      last_change = std::chrono::steady_clock::now();
    } else if (timed_out && idle > 5.0) {
      // Threads that never return cannot be unwound: stop the process rather than hang CI.
      fprintf(stderr, "%s\nsk_emu: aborting the process.\n", b.error.c_str());
      fflush(stderr);
      abort();
    }
  }
  return b.aborted ? b.error : std::string();
}

size_t arch_smem_optin(int a) {
  if (a >= 90) return 227 * 1024;
  if (a == 86 || a == 89) return 99 * 1024;
  if (a >= 80) return 163 * 1024;
  return 96 * 1024;
}

void check_dim(bool ok, const LaunchInfo& L, const std::string& what) {
  if (!ok) throw std::runtime_error("sk_emu: invalid configuration argument for " + launch_where(L) + ": " + what);
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points (declared in cuda_shim.h)
// ---------------------------------------------------------------------------------------------
int arch() { return env_int("SEQKERNELS_EMU_ARCH", 80); }
int multiprocessor_count() { return arch() >= 90 ? 132 : 108; }
size_t max_dynamic_smem_optin() { return arch_smem_optin(arch()); }

void set_max_dynamic_smem(const char* name, const void* kernel, size_t bytes) {
  if (bytes > max_dynamic_smem_optin()) {
    throw std::runtime_error("sk_emu: SK_SET_MAX_DYNAMIC_SMEM(" + std::string(name) + ", " + std::to_string(bytes) +
                             "): more than the " + std::to_string(max_dynamic_smem_optin()) +
                             " bytes of dynamic shared memory sm_" + std::to_string(arch()) + " allows");
  }
  std::lock_guard<std::mutex> lk(g_attr_mu);
  g_max_dyn_attr[kernel] = bytes;
}

void* dynamic_smem_base() {
  if (detail::tls.block == nullptr) {
    throw std::runtime_error("sk_emu: extern __shared__ memory used outside a kernel launched with SK_LAUNCH");
  }
  return g_dyn_smem;
}

bool register_static_shared(void* ptr, size_t bytes, const char* name) {
  poison_bytes(ptr, bytes);
  std::lock_guard<std::mutex> lk(g_static_mu);
  g_static_shared.push_back(StaticShared{ptr, bytes, name});
  return true;
}

void run_grid(const char* name, const char* file, int line, const void* kernel, dim3 grid, dim3 block,
              size_t smem_bytes, void (*body)(void*), void* ctx) {
  if (detail::tls.block != nullptr) {
    throw std::runtime_error(std::string("sk_emu: kernel ") + name +
                             " launched from inside a kernel: dynamic "
                             "parallelism is not supported by the emulator");
  }
  std::lock_guard<std::mutex> launch_lock(g_launch_mu);
  LaunchInfo L;
  L.name = name;
  L.file = file;
  L.line = line;
  L.grid = grid;
  L.block = block;
  L.smem = smem_bytes;
  L.body = body;
  L.ctx = ctx;
  check_dim(grid.x >= 1 && grid.y >= 1 && grid.z >= 1, L, "empty grid " + dims(grid));
  check_dim(grid.x <= 2147483647u && grid.y <= 65535u && grid.z <= 65535u, L, "grid " + dims(grid) + " too large");
  check_dim(block.x >= 1 && block.y >= 1 && block.z >= 1, L, "empty block " + dims(block));
  check_dim(block.x <= 1024 && block.y <= 1024 && block.z <= 64, L, "block " + dims(block) + " too large");
  const uint64_t nthreads64 = static_cast<uint64_t>(block.x) * block.y * block.z;
  check_dim(nthreads64 <= 1024, L, "block " + dims(block) + " has more than 1024 threads");
  const size_t optin = max_dynamic_smem_optin();
  if (smem_bytes > optin) {
    throw std::runtime_error("sk_emu: " + launch_where(L) + " asks for " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory; sm_" + std::to_string(arch()) + " allows at most " +
                             std::to_string(optin));
  }
  if (smem_bytes > kDefaultDynamicSmem) {
    size_t allowed = kDefaultDynamicSmem;
    {
      std::lock_guard<std::mutex> lk(g_attr_mu);
      auto it = g_max_dyn_attr.find(kernel);
      if (it != g_max_dyn_attr.end()) allowed = it->second;
    }
    if (smem_bytes > allowed) {
      throw std::runtime_error("sk_emu: " + launch_where(L) + " asks for " + std::to_string(smem_bytes) +
                               " bytes of dynamic shared memory but its limit is " + std::to_string(allowed) +
                               ": call SK_SET_MAX_DYNAMIC_SMEM(kernel, bytes) before launching (above 48 KiB "
                               "the GPU needs the opt-in)");
    }
  }
  const int nthreads = static_cast<int>(nthreads64);
  ensure_workers(nthreads);
  g_launch = L;
  detail::g_block_dim = block;
  detail::g_grid_dim = grid;
  g_dyn_size = smem_bytes;
#if defined(__SANITIZE_ADDRESS__)
  ASAN_POISON_MEMORY_REGION(g_dyn_smem + smem_bytes, kMaxSmemCapacity - smem_bytes);
#endif
  std::string err;
  for (unsigned z = 0; z < grid.z && err.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && err.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && err.empty(); ++x) {
        err = run_block(uint3{x, y, z}, nthreads);
      }
    }
  }
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(g_dyn_smem, kMaxSmemCapacity);
#endif
  g_dyn_size = 0;
  if (!err.empty()) throw std::runtime_error(err);
}

int syncthreads(int mode, int pred, const Loc& loc) {
  BlockState& b = current_block("__syncthreads");
  Slot& me = my_slot(b);
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.aborted) {
    lk.unlock();
    throw Abort{};
  }
  if (b.n_exited > 0) {
    fail_and_throw(b, lk,
                   "sk_emu: __syncthreads in divergent code in " + where() + ": thread " +
                       std::to_string(detail::tls.linear) + " reaches __syncthreads at " + fmt_loc(loc) +
                       " after other threads of the block exited" + describe_block(b));
  }
  if (b.bar_arrived == 0) {
    b.bar_file = loc.file_name();
    b.bar_line = static_cast<int>(loc.line());
    b.bar_mode = mode;
    b.bar_acc = mode == 2 ? 1 : 0;
  } else if (b.bar_line != static_cast<int>(loc.line()) || strcmp(b.bar_file, loc.file_name()) != 0 ||
             b.bar_mode != mode) {
    fail_and_throw(b, lk,
                   "sk_emu: __syncthreads in divergent code in " + where() + ": thread " +
                       std::to_string(detail::tls.linear) + " reaches the barrier at " + fmt_loc(loc) +
                       " while others wait at " + b.bar_file + ":" + std::to_string(b.bar_line) + describe_block(b));
  }
  switch (mode) {
    case 1:
      b.bar_acc += pred != 0;
      break;
    case 2:
      b.bar_acc = b.bar_acc && pred != 0;
      break;
    case 3:
      b.bar_acc = b.bar_acc || pred != 0;
      break;
    default:
      break;
  }
  me.file = loc.file_name();
  me.line = static_cast<int>(loc.line());
  ++b.bar_arrived;
  if (b.bar_arrived == b.nthreads) {
    const int result = b.bar_acc;
    b.bar_arrived = 0;
    ++b.progress;
    for (int i = 0; i < b.nthreads; ++i) {
      Slot& s = b.slots[i];
      if (&s != &me && s.wait == Wait::Barrier) {
        s.out_pred = result;
        release_locked(b, s);
      }
    }
    return result;
  }
  me.wait = Wait::Barrier;
  ++b.n_waiting;
  wait_released(b, me, lk);
  return me.out_pred;
}

uint64_t shfl(unsigned mask, uint64_t bits, ShflMode mode, int bval, int width, const Loc& loc) {
  BlockState& b = current_block("__shfl_*_sync");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    throw std::runtime_error("sk_emu: __shfl_*_sync at " + fmt_loc(loc) + ": width " + std::to_string(width) +
                             " is not a power of two in [1, 32]");
  }
  const WarpCtx w = warp_ctx(b);
  Slot& me = my_slot(b);
  me.value = bits;
  me.mode = static_cast<int>(mode);
  me.b = bval;
  me.width = width;
  warp_rendezvous(b, w, me, kKindShfl, mask, loc, complete_shfl, "__shfl_*_sync");
  return me.out;
}

uint64_t vote(unsigned mask, VoteOp op, uint64_t value, int* pred, const Loc& loc) {
  BlockState& b = current_block(vote_name(op));
  const WarpCtx w = warp_ctx(b);
  Slot& me = my_slot(b);
  me.value = value;
  warp_rendezvous(b, w, me, static_cast<int>(op), mask, loc, vote_completer(op), vote_name(op));
  if (pred != nullptr) *pred = me.out_pred;
  return me.out;
}

unsigned activemask() {
  BlockState& b = current_block("__activemask");
  const WarpCtx w = warp_ctx(b);
  std::lock_guard<std::mutex> lk(b.mu);
  unsigned m = 0;
  for (int l = 0; l < w.lanes_in_warp; ++l) {
    if (b.slots[w.base + l].wait != Wait::Exited) m |= 1u << l;
  }
  return m;
}

void mma_m16n8k16(bool is_bf16, float d[4], const uint32_t a[4], const uint32_t b_frag[2], const float c[4],
                  const Loc& loc) {
  BlockState& b = current_block("mma_m16n8k16");
  const WarpCtx w = warp_ctx(b);
  Slot& me = my_slot(b);
  me.mode = is_bf16 ? 1 : 0;
  for (int i = 0; i < 4; ++i) me.regs[i] = a[i];
  me.regs[4] = b_frag[0];
  me.regs[5] = b_frag[1];
  for (int i = 0; i < 4; ++i) me.regs[6 + i] = f32_bits(c[i]);
  warp_rendezvous(b, w, me, kKindMma, kFullMask, loc, complete_mma, "mma_m16n8k16 (mma.sync.aligned, whole warp)");
  for (int i = 0; i < 4; ++i) d[i] = bits_f32(me.out_regs[i]);
}

void ldmatrix(int n, bool trans, uint32_t* r, const void* smem_row, const Loc& loc) {
  BlockState& b = current_block("ldmatrix");
  const WarpCtx w = warp_ctx(b);
  Slot& me = my_slot(b);
  me.b = n;
  me.mode = trans ? 1 : 0;
  me.ptr = smem_row;
  warp_rendezvous(b, w, me, kKindLdmatrix, kFullMask, loc, complete_ldmatrix,
                  "ldmatrix (ldmatrix.sync.aligned, whole warp)");
  for (int i = 0; i < n; ++i) r[i] = me.out_regs[i];
}

void cp_async_16(void* smem, const void* gmem, bool pred, const Loc& loc) {
  current_block("cp_async_16");
  try {
    check_shared_16(smem, "cp_async_16 destination", static_cast<int>(detail::tls.linear % 32));
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string(e.what()) + " at " + fmt_loc(loc));
  }
  if (pred) {
    if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
      throw std::runtime_error("sk_emu: cp_async_16 at " + fmt_loc(loc) +
                               ": global source address not 16-byte aligned");
    }
    memcpy(smem, gmem, 16);
  } else {
    memset(smem, 0, 16);
  }
}

void trap(const Loc& loc) { throw std::runtime_error("sk_emu: __trap() at " + fmt_loc(loc)); }

}  // namespace sk_emu
