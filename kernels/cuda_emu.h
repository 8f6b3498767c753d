// cuda_emu.h -- Pagoda's CUDA emulation: compiles the kernel sources in kernels/*.cu as plain C++
// and runs them on the CPU with CUDA's execution semantics, so that kernel *logic* is checked in
// every CI run without a GPU (see src/backend/cuda/emulated.rs for the Rust side).
//
// Design
//  * Each CUDA thread of a block is a fiber (its own stack) on the calling OS thread. Blocks run
//    one after another. A fiber runs until it reaches a synchronisation point (__syncthreads,
//    __syncwarp, a warp shuffle/vote), then yields to a tiny scheduler; a barrier is released when
//    every thread it names has arrived. No OS threads, no locks: deterministic, and cheap on 2 cores.
//  * Context switch: a 14-instruction assembly switch on x86-64 and aarch64; ucontext elsewhere
//    (or with -DCUDA_EMU_UCONTEXT, which is ~50x slower because glibc's swapcontext does a syscall).
//  * __shared__ variables are function statics placed in the section "cuda_emu_smem"; every block
//    starts with that section (and the dynamic shared buffer) filled with 0xFF bytes (NaN as f32),
//    so reading shared memory that the block did not write shows up as NaN instead of a stale value.
//  * Checks that a GPU would not make (it would hang or silently compute garbage):
//      - a thread that exits while others wait at __syncthreads (or arrives after one exited),
//      - threads of one block waiting at different __syncthreads call sites,
//      - lanes of a warp at the same sync with different masks or different operations,
//      - deadlock (no thread can run), reported with every waiting thread's file:line,
//      - reading a shuffle value from an exited lane (returns NaN bits, counted as a warning).
//  * The order in which fibers run between two sync points is selectable (forward, reverse,
//    random): running a test in several orders exposes missing __syncthreads / __syncwarp.
//
// Not emulated (a kernel that needs them must keep a portable path under #ifdef CUDA_EMU):
//  inline PTX (asm volatile), cp.async / cuda::pipeline / TMA, mma / wmma / wgmma (tensor cores),
//  cooperative-groups grid sync, clusters / distributed shared memory, texture and surface objects,
//  the exact ulp behaviour of fast-math intrinsics (__expf, ex2.approx, rsqrtf) and of FMA contraction.
//
// Usage: #include <cuda_bf16.h> etc. from the CUDA wheels on the include path; compile the .cu as
//   g++ -std=c++20 -x c++ -include cuda_emu.h -DCUDA_EMU -fno-strict-aliasing -I$CUDA13/include k.cu
// and launch with cuda_emu::launch(kernel, grid, block, dyn_smem_bytes, args...).
#pragma once

#ifndef CUDA_EMU
#define CUDA_EMU 1
#endif

#include <cuda_bf16.h>  // __nv_bfloat16(2) with host conversions; pulls vector_types.h (float4, uint4, dim3)
#include <cuda_fp16.h>  // __half(2)

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(CUDA_EMU_UCONTEXT) && !defined(__x86_64__) && !defined(__aarch64__)
#define CUDA_EMU_UCONTEXT 1
#endif
#ifdef CUDA_EMU_UCONTEXT
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------
// Keywords. The CUDA headers, compiled by a host compiler, define __device__ & co. as nothing.
#undef __shared__
#define __shared__ __attribute__((section("cuda_emu_smem"))) static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif

// Dynamic shared memory. Plain CUDA's `extern __shared__ T name[];` cannot be expressed with macros
// in C++ (`extern` cannot be combined with the `static` that function-scope __shared__ needs), so
// kernels declare it with this macro, which has the same meaning under nvcc (see cuda_compat.cuh).
#define CUDA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::cuda_emu::detail::dynamic_smem())

namespace cuda_emu {

struct Options {
  enum Order { Forward, Reverse, Random } order = Forward;
  uint64_t seed = 1;
  bool strict_exit = true;     // a thread exiting while others wait at __syncthreads is an error
  bool poison_smem = true;     // fill shared memory with 0xFF at each block start
  bool strict_warp_sites = true;  // lanes meeting at a warp op must be at the same call site
                                  // (sm_70+ allows different sites; real code rarely means it)
  size_t stack_bytes = 256 * 1024;
};

namespace detail {

enum class St : uint8_t { Ready, AtBlockBar, AtWarpOp, Done };
enum class WOp : uint8_t { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Match };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer (asm switch)
#ifdef CUDA_EMU_UCONTEXT
  ucontext_t uc;
#endif
  char* stack = nullptr;  // mapping incl. guard page
  size_t stack_len = 0;
  uint3 tid{};
  unsigned linear = 0;
  St st = St::Ready;
  // current sync point
  std::source_location site;
  WOp op = WOp::Sync;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t val = 0, res = 0;
  int pred = 0;
};

struct Block {
  uint3 bid{};
  dim3 bdim{}, gdim{};
  unsigned nthreads = 0, nwarps = 0;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<unsigned> warp_waiting, warp_exited;  // per warp: lanes at a warp op / lanes done
  unsigned live = 0, exited = 0, at_bar = 0;
  unsigned bar_count = 0;  // predicate aggregate for __syncthreads_count/and/or
  void (*invoke)(void*) = nullptr;
  void* closure = nullptr;
  std::string error;
  unsigned warnings = 0;
  void* sched_sp = nullptr;
#ifdef CUDA_EMU_UCONTEXT
  ucontext_t sched_uc;
#endif
};

inline Block* g_block = nullptr;
inline Fiber* g_cur = nullptr;
inline unsigned char* g_dyn_smem = nullptr;
inline size_t g_dyn_smem_len = 0;
inline Options g_opts;
inline std::mutex g_launch_mutex;

inline thread_local bool t_in_fiber = false;  // the launching thread is running a CUDA thread

inline void* dynamic_smem() { return g_dyn_smem; }

extern "C" char __start_cuda_emu_smem[] __attribute__((weak));
extern "C" char __stop_cuda_emu_smem[] __attribute__((weak));

// ---- context switch --------------------------------------------------------------------------
#ifndef CUDA_EMU_UCONTEXT
extern "C" void cuda_emu_ctx_switch(void** save_sp, void* new_sp);
#if defined(__x86_64__)
asm(R"(
  .text
  .weak cuda_emu_ctx_switch
  .type cuda_emu_ctx_switch,@function
cuda_emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_ctx_switch, .-cuda_emu_ctx_switch
)");
#elif defined(__aarch64__)
asm(R"(
  .text
  .weak cuda_emu_ctx_switch
  .type cuda_emu_ctx_switch,%function
cuda_emu_ctx_switch:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
  .size cuda_emu_ctx_switch, .-cuda_emu_ctx_switch
)");
#endif
#endif

[[noreturn]] inline void fiber_main();

inline void fiber_prepare(Fiber& f) {
#ifdef CUDA_EMU_UCONTEXT
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack + 4096;
  f.uc.uc_stack.ss_size = f.stack_len - 4096;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, (void (*)())fiber_main, 0);
#else
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_len) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
#if defined(__x86_64__)
  *--sp = nullptr;                                       // fake return address of fiber_main
  *--sp = reinterpret_cast<void*>(&fiber_main);          // popped by `ret`
  for (int i = 0; i < 6; i++) *--sp = nullptr;           // rbp rbx r12-r15
#else
  sp -= 22;                                              // 176 bytes frame
  std::memset(sp, 0, 176);
  sp[11] = reinterpret_cast<void*>(&fiber_main);         // x30 (lr) slot
#endif
  f.sp = sp;
#endif
}

inline uint64_t g_resumes = 0;  // fiber resumptions, for measuring the emulator's overhead

inline void switch_to_fiber(Fiber& f) {
  g_cur = &f;
  g_resumes++;
  t_in_fiber = true;
#ifdef CUDA_EMU_UCONTEXT
  swapcontext(&g_block->sched_uc, &f.uc);
#else
  cuda_emu_ctx_switch(&g_block->sched_sp, f.sp);
#endif
  t_in_fiber = false;
}

inline void yield_to_scheduler() {
  Fiber& f = *g_cur;
#ifdef CUDA_EMU_UCONTEXT
  swapcontext(&f.uc, &g_block->sched_uc);
#else
  cuda_emu_ctx_switch(&f.sp, g_block->sched_sp);
#endif
}

inline std::string where(const std::source_location& s) {
  return std::string(s.file_name()) + ":" + std::to_string(s.line());
}

inline std::string tname(const Fiber& f) {
  char b[64];
  std::snprintf(b, sizeof b, "thread (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z);
  return b;
}

inline void fail(const std::string& msg) {
  if (g_block->error.empty()) {
    char b[64];
    std::snprintf(b, sizeof b, "block (%u,%u,%u): ", g_block->bid.x, g_block->bid.y, g_block->bid.z);
    g_block->error = b + msg;
  }
}

// ---- memory faults -------------------------------------------------------------------------
// A SIGSEGV/SIGBUS raised by a CUDA thread (out-of-bounds pointer, stack overflow into the guard
// page) ends the launch with an error naming the thread, like CUDA's "illegal address" error,
// instead of killing the test process. Faults elsewhere go to the previous handler.
inline struct sigaction g_old_segv, g_old_bus;

inline void fault_handler(int sig, siginfo_t* si, void* uctx) {
  if (t_in_fiber && g_cur && g_block) {
    t_in_fiber = false;
    char b[160];
    std::snprintf(b, sizeof b, "%s: invalid memory access at %p (signal %d)", tname(*g_cur).c_str(), si->si_addr, sig);
    if (g_block->error.empty()) {
      char p[64];
      std::snprintf(p, sizeof p, "block (%u,%u,%u): ", g_block->bid.x, g_block->bid.y, g_block->bid.z);
      g_block->error = std::string(p) + b;
    }
#ifdef CUDA_EMU_UCONTEXT
    setcontext(&g_block->sched_uc);
#else
    void* dead;
    cuda_emu_ctx_switch(&dead, g_block->sched_sp);  // abandon the fiber, back to the scheduler
#endif
  }
  struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
  if (old.sa_flags & SA_SIGINFO) {
    if (old.sa_sigaction) old.sa_sigaction(sig, si, uctx);
  } else if (old.sa_handler == SIG_DFL || old.sa_handler == SIG_IGN) {
    sigaction(sig, &old, nullptr);  // the faulting instruction re-runs under the default action
  } else {
    old.sa_handler(sig);
  }
}

struct FaultGuard {
  stack_t old_ss{};
  std::vector<char> alt;
  FaultGuard() : alt(256 * 1024) {
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, &old_ss);
    struct sigaction sa{};
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  }
  ~FaultGuard() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaltstack(&old_ss, nullptr);
  }
};

// ---- block barrier -------------------------------------------------------------------------
inline void try_release_block_barrier() {
  Block& b = *g_block;
  if (b.at_bar == 0) return;
  if (b.exited > 0 && g_opts.strict_exit) {
    std::string w;
    for (auto& f : *b.fibers)
      if (f.st == St::AtBlockBar) { w = where(f.site); break; }
    fail(std::to_string(b.exited) + " thread(s) exited while " + std::to_string(b.at_bar) +
         " wait at __syncthreads (" + w + "): a GPU would hang or misbehave");
    return;
  }
  if (b.at_bar < b.live) return;
  // every live thread is here: check they are at the same call site
  const Fiber* first = nullptr;
  for (auto& f : *b.fibers) {
    if (f.st != St::AtBlockBar) continue;
    if (!first) first = &f;
    else if (f.site.line() != first->site.line() || std::strcmp(f.site.file_name(), first->site.file_name()) != 0) {
      fail("threads wait at different __syncthreads: " + tname(*first) + " at " + where(first->site) + ", " +
           tname(f) + " at " + where(f.site));
      return;
    }
  }
  unsigned agg = b.bar_count;
  for (auto& f : *b.fibers)
    if (f.st == St::AtBlockBar) { f.st = St::Ready; f.res = agg; }
  b.at_bar = 0;
  b.bar_count = 0;
}

inline unsigned block_barrier(int pred, std::source_location site) {
  Fiber& f = *g_cur;
  Block& b = *g_block;
  f.st = St::AtBlockBar;
  f.site = site;
  b.at_bar++;
  b.bar_count += pred ? 1 : 0;
  try_release_block_barrier();
  yield_to_scheduler();
  return static_cast<unsigned>(f.res);
}

// ---- warp operations -----------------------------------------------------------------------
inline unsigned lane_of(const Fiber& f) { return f.linear & 31; }

inline Fiber& lane_fiber(unsigned warp, unsigned lane) { return (*g_block->fibers)[warp * 32 + lane]; }

inline unsigned warp_lanes(unsigned warp) {  // lanes that exist in this warp (partial last warp)
  unsigned n = g_block->nthreads - warp * 32;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1);
}

// Releases the lanes of `group` (all waiting at a warp op with the same mask) and computes results.
inline bool release_warp_group(unsigned warp, unsigned group, Fiber& f) {
  for (unsigned j = 0; j < 32; j++) {
    if (!(group >> j & 1)) continue;
    Fiber& g = lane_fiber(warp, j);
    if (g.mask != f.mask || g.op != f.op) {
      fail("warp " + std::to_string(warp) + ": lanes " + std::to_string(f.linear & 31) + " and " + std::to_string(j) +
           " meet with different masks or operations (" + where(f.site) + " vs " + where(g.site) + ")");
      return false;
    }
    if (g_opts.strict_warp_sites &&
        (g.site.line() != f.site.line() || std::strcmp(g.site.file_name(), f.site.file_name()) != 0)) {
      fail("warp " + std::to_string(warp) + ": lanes " + std::to_string(f.linear & 31) + " and " + std::to_string(j) +
           " meet at different warp-op call sites (" + where(f.site) + " vs " + where(g.site) +
           "): a shuffle/vote inside divergent code?");
      return false;
    }
  }
  for (unsigned j = 0; j < 32; j++) {
    if (!(group >> j & 1)) continue;
    Fiber& g = lane_fiber(warp, j);
    const unsigned w = static_cast<unsigned>(g.width), base = j & ~(w - 1);
    unsigned src = j;
    switch (g.op) {
      case WOp::ShflIdx: src = base + (static_cast<unsigned>(g.arg) & (w - 1)); break;
      case WOp::ShflUp: src = ((j - base) >= static_cast<unsigned>(g.arg)) ? j - g.arg : j; break;
      case WOp::ShflDown: src = ((j - base) + g.arg < w) ? j + g.arg : j; break;
      case WOp::ShflXor: src = j ^ static_cast<unsigned>(g.arg); src = (src >= base + w) ? j : src; break;
      default: break;
    }
    switch (g.op) {
      case WOp::ShflIdx: case WOp::ShflUp: case WOp::ShflDown: case WOp::ShflXor:
        if (src < 32 && (group >> src & 1)) g.res = lane_fiber(warp, src).val;
        else { g.res = ~uint64_t(0); g_block->warnings++; }  // source lane not taking part: undefined
        break;
      case WOp::Ballot: case WOp::Any: case WOp::All: {
        unsigned ballot = 0;
        for (unsigned k = 0; k < 32; k++)
          if ((group >> k & 1) && lane_fiber(warp, k).pred) ballot |= 1u << k;
        g.res = g.op == WOp::Ballot ? ballot : g.op == WOp::Any ? (ballot != 0) : (ballot == group);
        break;
      }
      case WOp::Match: {
        unsigned mm = 0;
        for (unsigned k = 0; k < 32; k++)
          if ((group >> k & 1) && lane_fiber(warp, k).val == g.val) mm |= 1u << k;
        g.res = mm;
        break;
      }
      default: g.res = 0;
    }
  }
  for (unsigned j = 0; j < 32; j++)
    if (group >> j & 1) lane_fiber(warp, j).st = St::Ready;
  g_block->warp_waiting[warp] &= ~group;
  return true;
}

// A waiting lane's op completes once every non-exited lane its mask names is waiting too.
inline void try_release_lane(unsigned warp, Fiber& f) {
  const unsigned m = f.mask & warp_lanes(warp);
  const unsigned waiting = g_block->warp_waiting[warp], exited = g_block->warp_exited[warp];
  if ((m & ~(waiting | exited)) != 0) return;
  release_warp_group(warp, m & waiting, f);
}

// After a lane exits: any waiting group may now be complete.
inline void try_release_warp(unsigned warp) {
  for (unsigned l = 0; l < 32 && g_block->error.empty(); l++)
    if (g_block->warp_waiting[warp] >> l & 1) try_release_lane(warp, lane_fiber(warp, l));
}

inline uint64_t warp_op(WOp op, unsigned mask, uint64_t val, int arg, int width, int pred, std::source_location site) {
  Fiber& f = *g_cur;
  if (!(mask >> lane_of(f) & 1)) {
    fail(tname(f) + " calls a warp operation at " + where(site) + " with a mask that excludes its own lane");
    yield_to_scheduler();
  }
  if (width <= 0 || width > 32 || (width & (width - 1))) {
    fail("warp operation at " + where(site) + " with width " + std::to_string(width));
    yield_to_scheduler();
  }
  f.st = St::AtWarpOp;
  f.op = op;
  f.mask = mask;
  f.val = val;
  f.arg = arg;
  f.width = width;
  f.pred = pred;
  f.site = site;
  g_block->warp_waiting[f.linear / 32] |= 1u << lane_of(f);
  try_release_lane(f.linear / 32, f);
  yield_to_scheduler();
  return f.res;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type larger than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// ---- fiber entry and block runner ------------------------------------------------------------
[[noreturn]] inline void fiber_main() {
  for (;;) {
    g_block->invoke(g_block->closure);
    Fiber& f = *g_cur;
    Block& b = *g_block;
    f.st = St::Done;
    b.live--;
    b.exited++;
    b.warp_exited[f.linear / 32] |= 1u << lane_of(f);
    // a lane's exit can complete a warp op that names it; and can break a block barrier
    try_release_warp(f.linear / 32);
    if (b.at_bar > 0) try_release_block_barrier();
    yield_to_scheduler();  // never resumed (fiber_prepare re-arms it for the next block)
  }
}

inline std::vector<Fiber>& fiber_pool(unsigned n, size_t stack_bytes) {
  static std::vector<Fiber> pool;
  static size_t pool_stack = 0;
  if (pool_stack != stack_bytes) {
    for (auto& f : pool) munmap(f.stack, f.stack_len);
    pool.clear();
    pool_stack = stack_bytes;
  }
  while (pool.size() < n) {
    Fiber f;
    f.stack_len = stack_bytes + 4096;
    void* p = mmap(nullptr, f.stack_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { std::perror("cuda_emu: mmap"); std::abort(); }
    mprotect(p, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f.stack = static_cast<char*>(p);
    pool.push_back(f);
  }
  return pool;
}

inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Runs one block; returns false with g_block->error set on a detected bug.
inline bool run_block(Block& b, std::vector<Fiber>& fibers, uint64_t& rng) {
  for (unsigned i = 0; i < b.nthreads; i++) {
    Fiber& f = fibers[i];
    f.linear = i;
    f.tid = uint3{i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y)};
    f.st = St::Ready;
    fiber_prepare(f);
  }
  b.live = b.nthreads;
  b.exited = b.at_bar = b.bar_count = 0;
  b.warp_waiting.assign(b.nwarps, 0);
  b.warp_exited.assign(b.nwarps, 0);
  std::vector<unsigned> order(b.nthreads);
  for (unsigned i = 0; i < b.nthreads; i++) order[i] = g_opts.order == Options::Reverse ? b.nthreads - 1 - i : i;
  while (b.live > 0) {
    if (g_opts.order == Options::Random)
      for (unsigned i = b.nthreads; i > 1; i--) std::swap(order[i - 1], order[splitmix(rng) % i]);
    bool ran = false;
    for (unsigned i : order) {
      if (fibers[i].st != St::Ready) continue;
      switch_to_fiber(fibers[i]);
      ran = true;
      if (!b.error.empty()) return false;
    }
    if (!ran) {
      std::string msg = "deadlock: no thread can run;";
      int shown = 0;
      for (unsigned i = 0; i < b.nthreads && shown < 8; i++) {
        Fiber& f = fibers[i];
        if (f.st == St::Done) continue;
        msg += " " + tname(f) + (f.st == St::AtBlockBar ? " at __syncthreads " : " at warp op ") + where(f.site) + ";";
        shown++;
      }
      msg += " (" + std::to_string(b.exited) + " exited)";
      fail(msg);
      return false;
    }
  }
  return true;
}

}  // namespace detail

// Launches `kernel` over `grid` x `block` threads. Returns an empty string on success, or a
// description of the first detected error (deadlock, divergent barrier, ...).
template <typename... KArgs, typename... Args>
std::string launch_opts(const Options& opts, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dyn_smem,
                        Args&&... args) {
  using namespace detail;
  static_assert(sizeof...(KArgs) == sizeof...(Args), "wrong number of kernel arguments");
  std::lock_guard<std::mutex> lock(g_launch_mutex);  // __shared__ statics are process-global
  g_opts = opts;
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) return "invalid block size " + std::to_string(nthreads);
  auto tuple = std::tuple<std::decay_t<KArgs>...>(static_cast<KArgs>(args)...);
  auto call = [&]() { std::apply(kernel, tuple); };  // each thread gets its own by-value copies
  Block b;
  b.bdim = block;
  b.gdim = grid;
  b.nthreads = nthreads;
  b.nwarps = (nthreads + 31) / 32;
  b.closure = &call;
  b.invoke = [](void* c) { (*static_cast<decltype(call)*>(c))(); };
  std::vector<Fiber>& fibers = fiber_pool(nthreads, opts.stack_bytes);
  b.fibers = &fibers;
  std::vector<unsigned char> dyn(dyn_smem + 16);
  g_dyn_smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dyn.data()) + 15) & ~uintptr_t(15));
  g_dyn_smem_len = dyn_smem;
  g_block = &b;
  uint64_t rng = opts.seed;
  std::string err;
  FaultGuard fault_guard;
  for (unsigned z = 0; z < grid.z && err.empty(); z++)
    for (unsigned y = 0; y < grid.y && err.empty(); y++)
      for (unsigned x = 0; x < grid.x && err.empty(); x++) {
        b.bid = uint3{x, y, z};
        if (opts.poison_smem) {
          if (__start_cuda_emu_smem && __stop_cuda_emu_smem)
            std::memset(__start_cuda_emu_smem, 0xFF, __stop_cuda_emu_smem - __start_cuda_emu_smem);
          std::memset(g_dyn_smem, 0xFF, dyn_smem);
        }
        if (!run_block(b, fibers, rng)) err = b.error;
      }
  if (err.empty() && b.warnings) err.clear();  // warnings are reported through last_warnings()
  g_block = nullptr;
  g_cur = nullptr;
  return err;
}

template <typename... KArgs, typename... Args>
std::string launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t dyn_smem, Args&&... args) {
  return launch_opts(Options{}, kernel, grid, block, dyn_smem, std::forward<Args>(args)...);
}

// cuLaunchKernel-style entry: arguments as an array of pointers to their values.
template <typename... KArgs, size_t... I>
std::string launch_params_impl(const Options& o, void (*kernel)(KArgs...), dim3 g, dim3 b, size_t smem,
                               void** params, std::index_sequence<I...>) {
  return launch_opts(o, kernel, g, b, smem, *static_cast<std::decay_t<KArgs>*>(params[I])...);
}
template <typename... KArgs>
std::string launch_params(const Options& o, void (*kernel)(KArgs...), dim3 g, dim3 b, size_t smem, void** params) {
  return launch_params_impl(o, kernel, g, b, smem, params, std::index_sequence_for<KArgs...>{});
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------------
// Built-in variables and intrinsics.
#define threadIdx (static_cast<const uint3&>(::cuda_emu::detail::g_cur->tid))
#define blockIdx (static_cast<const uint3&>(::cuda_emu::detail::g_block->bid))
#define blockDim (static_cast<const dim3&>(::cuda_emu::detail::g_block->bdim))
#define gridDim (static_cast<const dim3&>(::cuda_emu::detail::g_block->gdim))
#ifndef warpSize
#define warpSize 32
#endif

inline void __syncthreads(std::source_location s = std::source_location::current()) {
  ::cuda_emu::detail::block_barrier(0, s);
}
inline int __syncthreads_count(int p, std::source_location s = std::source_location::current()) {
  return static_cast<int>(::cuda_emu::detail::block_barrier(p, s));
}
inline int __syncthreads_or(int p, std::source_location s = std::source_location::current()) {
  return ::cuda_emu::detail::block_barrier(p, s) != 0;
}
inline int __syncthreads_and(int p, std::source_location s = std::source_location::current()) {
  return static_cast<int>(::cuda_emu::detail::block_barrier(p, s)) == static_cast<int>(::cuda_emu::detail::g_block->live);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location s = std::source_location::current()) {
  ::cuda_emu::detail::warp_op(::cuda_emu::detail::WOp::Sync, mask, 0, 0, 32, 0, s);
}

#define CUDA_EMU_SHFL(NAME, OP)                                                                          \
  template <typename T>                                                                                  \
  inline T NAME(unsigned mask, T var, int arg, int width = 32,                                           \
                std::source_location s = std::source_location::current()) {                            \
    using namespace ::cuda_emu::detail;                                                                  \
    return from_bits<T>(warp_op(WOp::OP, mask, to_bits(var), arg, width, 0, s));                         \
  }
CUDA_EMU_SHFL(__shfl_sync, ShflIdx)
CUDA_EMU_SHFL(__shfl_up_sync, ShflUp)
CUDA_EMU_SHFL(__shfl_down_sync, ShflDown)
CUDA_EMU_SHFL(__shfl_xor_sync, ShflXor)
#undef CUDA_EMU_SHFL

inline unsigned __ballot_sync(unsigned mask, int p, std::source_location s = std::source_location::current()) {
  return static_cast<unsigned>(::cuda_emu::detail::warp_op(::cuda_emu::detail::WOp::Ballot, mask, 0, 0, 32, p != 0, s));
}
inline int __any_sync(unsigned mask, int p, std::source_location s = std::source_location::current()) {
  return static_cast<int>(::cuda_emu::detail::warp_op(::cuda_emu::detail::WOp::Any, mask, 0, 0, 32, p != 0, s));
}
inline int __all_sync(unsigned mask, int p, std::source_location s = std::source_location::current()) {
  return static_cast<int>(::cuda_emu::detail::warp_op(::cuda_emu::detail::WOp::All, mask, 0, 0, 32, p != 0, s));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v, std::source_location s = std::source_location::current()) {
  using namespace ::cuda_emu::detail;
  return static_cast<unsigned>(warp_op(WOp::Match, mask, to_bits(v), 0, 32, 0, s));
}
inline unsigned __activemask() {
  using namespace ::cuda_emu::detail;
  unsigned w = g_cur->linear / 32, m = 0;
  for (unsigned l = 0; l < 32; l++)
    if ((warp_lanes(w) >> l & 1) && lane_fiber(w, l).st != St::Done) m |= 1u << l;
  return m;
}

// Fences: fibers of a block run on one OS thread, blocks run one after another.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Atomics. Launches are serialised, so these only need to be atomic w.r.t. the compiler; the
// __atomic builtins keep them correct even if host threads touch the same memory.
template <typename T>
inline T cuda_emu_atomic_rmw(T* p, T v, T (*f)(T, T)) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(p, &old, f(old, v), false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline float atomicAdd(float* p, float v) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED), nv;
  do {
    float f;
    std::memcpy(&f, &old, 4);
    f += v;
    std::memcpy(&nv, &f, 4);
  } while (!__atomic_compare_exchange_n(u, &old, nv, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  float r;
  std::memcpy(&r, &old, 4);
  return r;
}
inline double atomicAdd(double* p, double v) {
  uint64_t* u = reinterpret_cast<uint64_t*>(p);
  uint64_t old = __atomic_load_n(u, __ATOMIC_RELAXED), nv;
  do {
    double f;
    std::memcpy(&f, &old, 8);
    f += v;
    std::memcpy(&nv, &f, 8);
  } while (!__atomic_compare_exchange_n(u, &old, nv, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  double r;
  std::memcpy(&r, &old, 8);
  return r;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* p, int c, int v) { __atomic_compare_exchange_n(p, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) { __atomic_compare_exchange_n(p, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) {
  __atomic_compare_exchange_n(p, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return c;
}
inline int atomicMax(int* p, int v) { return cuda_emu_atomic_rmw<int>(p, v, [](int a, int b) { return a > b ? a : b; }); }
inline int atomicMin(int* p, int v) { return cuda_emu_atomic_rmw<int>(p, v, [](int a, int b) { return a < b ? a : b; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return cuda_emu_atomic_rmw<unsigned>(p, v, [](unsigned a, unsigned b) { return a > b ? a : b; }); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return cuda_emu_atomic_rmw<unsigned>(p, v, [](unsigned a, unsigned b) { return a < b ? a : b; }); }
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd

// Reinterpretation and integer intrinsics.
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }

// Float intrinsics. The fast-math ones are computed exactly here; on the GPU they are
// approximations (a few ulp), so compare emulated and GPU results with a tolerance.
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// CUDA's device code has the classification functions in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;
inline float exp10f(float x) { return std::pow(10.0f, x); }

// ---------------------------------------------------------------------------------------------
// C entry point for other languages (Rust FFI): launch a kernel by name with cuLaunchKernel-style
// arguments. Kernel sources register their entry points with CUDA_EMU_REGISTER(name) (kernels/
// common.cuh's PAGODA_KERNEL does it), and one translation unit that includes them all expands
// CUDA_EMU_DEFINE_LAUNCH once.
namespace cuda_emu {
struct KernelEntry {
  const char* name;
  size_t nparams;
  std::string (*launch)(const Options&, dim3, dim3, size_t, void**);
};
template <typename... KArgs>
constexpr size_t arity(void (*)(KArgs...)) { return sizeof...(KArgs); }
inline std::vector<KernelEntry>& registry() {
  static std::vector<KernelEntry> entries;
  return entries;
}
struct Registrar {
  explicit Registrar(KernelEntry e) { registry().push_back(e); }
};
}  // namespace cuda_emu

extern "C" struct CudaEmuLaunchConfig {
  unsigned grid[3];
  unsigned block[3];
  unsigned shared_mem_bytes;
  unsigned order;  // 0 forward, 1 reverse, 2 random
  unsigned long long seed;
};

#define CUDA_EMU_REGISTER(name)                                                                    \
  static ::cuda_emu::Registrar cuda_emu_registrar_##name{::cuda_emu::KernelEntry{                  \
      #name, ::cuda_emu::arity(&name), [](const ::cuda_emu::Options& o, dim3 g, dim3 b, size_t s, \
                                          void** p) { return ::cuda_emu::launch_params(o, name, g, b, s, p); }}};

#define CUDA_EMU_DEFINE_LAUNCH()                                                                              \
  extern "C" int cuda_emu_launch(const char* name, const CudaEmuLaunchConfig* cfg, void** params,            \
                                 size_t nparams, char* err, size_t errlen) {                                \
    std::string msg;                                                                                          \
    const ::cuda_emu::KernelEntry* e = nullptr;                                                               \
    for (const auto& k : ::cuda_emu::registry())                                                              \
      if (std::strcmp(k.name, name) == 0) e = &k;                                                             \
    if (!e) msg = std::string("no kernel named ") + name;                                                     \
    else if (e->nparams != nparams)                                                                           \
      msg = std::string(name) + " takes " + std::to_string(e->nparams) + " arguments, " +                     \
            std::to_string(nparams) + " given";                                                               \
    else {                                                                                                    \
      ::cuda_emu::Options o;                                                                                  \
      o.order = static_cast<::cuda_emu::Options::Order>(cfg->order);                                          \
      o.seed = cfg->seed;                                                                                     \
      msg = e->launch(o, dim3(cfg->grid[0], cfg->grid[1], cfg->grid[2]),                                     \
                      dim3(cfg->block[0], cfg->block[1], cfg->block[2]), cfg->shared_mem_bytes, params);      \
    }                                                                                                         \
    if (msg.empty()) return 0;                                                                                \
    if (errlen > 0) {                                                                                         \
      std::strncpy(err, msg.c_str(), errlen - 1);                                                             \
      err[errlen - 1] = 0;                                                                                    \
    }                                                                                                         \
    return 1;                                                                                                 \
  }
