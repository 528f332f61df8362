// The CUDA emulator's runtime (see csrc/cuda_emu.h): grid and block scheduling with fibers, barriers, warp
// collectives, shared memory, cp.async queues, the race and memory checkers behind the __tsan_* hooks, and the
// few CUDA runtime API calls the entry points make. Compiled without instrumentation.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <pybind11/stl.h>
#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <numeric>
#include <random>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"
#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;
constexpr size_t kStaticSharedLimit = 48 * 1024;    // static __shared__ per block
constexpr size_t kDefaultDynamicLimit = 48 * 1024;  // dynamic, without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kSharedLimit = 227 * 1024;         // sm_90 opt-in maximum per block
constexpr size_t kArenaBytes = kSharedLimit + 1024;
constexpr size_t kMaxReports = 12;
constexpr size_t kRedzone = 32;  // unused bytes after each static __shared__ variable (and the dynamic ones)

enum State : int { kReady, kWaitBarrier, kWaitWarp, kDone };

struct Copy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
  const void* pc;  // the cp.async's place in the kernel code
  int flight;      // index into Emu::flights, -1: the destination was invalid (reported, not copied)
  bool src_ok;     // false: the source was invalid (reported); the copy lands 0xff bytes
};

struct Flight {  // a cp.async in flight: issued, not yet covered by a cp.async.wait_group
  int thread;
  const void* pc;
};

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  uintptr_t stack_lo = 0, stack_hi = 0;
  uint3 tid{};
  int linear = 0;
  State state = kReady;
  uint64_t wait_gen = 0;
  bool coll_done = false;
  const void* coll_pc = nullptr;               // where the thread's current warp collective was called
  int depth = 0;                               // Emu::depth while the fiber is switched out
  std::vector<Copy> open_copies;                // cp.async not yet committed
  std::vector<std::vector<Copy>> copy_groups;   // committed, oldest first
};

struct Warp {
  unsigned arrived = 0;  // lanes waiting in a collective
  unsigned exited = 0;   // lanes that returned, or that the block does not have
  unsigned mask[kWarpSize];
  Combine fn[kWarpSize];
  const char* what[kWarpSize];
  uint32_t sync_count[kWarpSize];  // completed __syncwarp per lane (orders shared accesses within the warp)
  unsigned char in[kWarpSize][kSlotBytes];
  unsigned char out[kWarpSize][kSlotBytes];
};

struct Shadow {  // racecheck state of one shared-memory byte within the current barrier interval
  uint32_t epoch;
  int16_t writer;  // thread, | 0x4000 when atomic; -1 none
  int16_t reader;  // thread; -1 none; -2 several (rfirst, rpc: the first one's)
  int16_t rfirst;
  uint32_t wsync, rsync;
  const void* wpc;  // where the accesses are in the kernel code
  const void* rpc;
};

struct GShadow {  // cross-block state of one byte of a writable tensor within the current launch
  uint32_t launch;
  int32_t wblock, rblock;    // linear block index; -1 none; rblock -2: several blocks read it
  uint16_t wthread, rthread; // wthread | 0x8000: an atomic
  const void* wpc;
  const void* rpc;
};

struct Range {
  uintptr_t lo, hi;
  bool writable;
  std::string name;
  std::vector<GShadow> shadow;  // writable ranges: allocated at their first access
};

struct Undo {  // a reported access the kernel code carries out right after the hook: undone at the next event
  unsigned char* p = nullptr;
  std::vector<unsigned char> saved;
};

struct Emu {
  std::mutex mu;
  // launch
  Config cfg{};
  const void* kernel = nullptr;
  void (*run)(void*) = nullptr;
  void* run_ctx = nullptr;
  uint3 block{};
  int nthreads = 0, live = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  bool aborted = false;
  // barrier
  int arrived = 0;
  uint64_t gen = 0;
  int reduce_acc[3] = {0, 1, 0}, reduce_res[3] = {0, 0, 0};
  // shared memory
  unsigned char* arena = nullptr;
  Shadow* shadow = nullptr;
  size_t dyn_bytes = 0, static_used = 0;
  // Redzones: bytes between this block's shared variables that belong to none; an access there is an overflow of
  // the variable before it (on a GPU the variables' layout is the compiler's, so the overflow lands anywhere).
  uint8_t* redzone = nullptr;
  std::vector<std::pair<size_t, size_t>> redzones;  // [lo, hi) offsets, this block
  size_t static_payload = 0;                         // bytes of this block's static variables
  uint64_t block_serial = 0;
  uint32_t epoch = 0;
  std::map<const void*, int> max_dynamic_smem;
  int optin_reported = int(kSharedLimit);  // what cudaDeviceGetAttribute says (tests lower it)
  // stacks
  char* stacks = nullptr;
  int stacks_for = 0;
  // checks
  std::vector<Range> ranges;
  std::vector<std::pair<uintptr_t, uintptr_t>> readonly;  // this library's read-only segments
  std::vector<std::string> reports;
  size_t report_count = 0, race_count = 0, memcheck_count = 0;
  Undo undo;
  std::vector<std::pair<uintptr_t, uintptr_t>> writable_maps;  // snapshot of /proc/self/maps, for poisoned reads
  bool maps_loaded = false;
  // cp.async in flight (this block)
  std::vector<Flight> flights;
  int32_t* inflight = nullptr;  // per shared-memory byte: 1 + index into flights of the copy in flight there; 0 none
  size_t in_flight = 0;
  // cross-block checks and the schedule
  uint32_t launch_epoch = 0;
  int64_t block_linear = 0;
  int block_order = 0;  // 0 forward (x fastest), 1 reverse, 2 shuffled by order_seed
  uint64_t order_seed = 0;
  bool cp_async_early = false;  // copies land at issue (default: at the wait that covers them)
  bool issuing_copy = false;    // the access being checked is a cp.async's write at its issue
  // Mutations applied without a rebuild (dalle_kernels.emu_mutations, CI): calls at these source lines skip a
  // __syncthreads() (kind 0) or a cp.async.commit_group (1), or wait for `value` groups instead (2).
  struct Edit {
    int kind;
    std::string line;
    int value;
  };
  std::vector<Edit> edits;
  std::map<std::pair<const void*, int>, int> edit_cache;
  // > 0 while the runtime works on a thread's behalf: the instrumented library code it calls (std::string's
  // members, instantiated in the kernels' translation units too, and the linker keeps one copy) is not checked
  int depth = 0;
  // stats
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0;
  cudaError_t last_error = cudaSuccess;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
};

Emu* const g_emu = new Emu();  // never destroyed: fibers may be abandoned mid-kernel after a deadlock
inline Emu& E() { return *g_emu; }

struct InRuntime {  // the runtime's own work on a thread's behalf: not checked (see Emu::depth)
  InRuntime() { ++E().depth; }
  ~InRuntime() { --E().depth; }
};

thread_local Fiber* tl_fiber __attribute__((tls_model("initial-exec"))) = nullptr;

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Context switch
#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.globl cuda_emu_switch
.hidden cuda_emu_switch
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch, .-cuda_emu_switch
)");
#endif

namespace {

[[noreturn]] void fiber_main();
void flush_undo();

void yield_to_scheduler(Fiber* f) {
  Emu& e = E();
  f->depth = e.depth;
  e.depth = 0;
#if defined(__x86_64__)
  cuda_emu_switch(&f->sp, e.sched_sp);
#else
  swapcontext(&f->ctx, &e.sched_ctx);
#endif
  e.depth = f->depth;
}

void switch_to(Fiber* f) {
  Emu& e = E();
  ++e.switches;
  tl_fiber = f;
#if defined(__x86_64__)
  cuda_emu_switch(&e.sched_sp, f->sp);
#else
  swapcontext(&e.sched_ctx, &f->ctx);
#endif
  tl_fiber = nullptr;
  flush_undo();
}

void init_fiber(Fiber* f, char* stack_base) {
  f->stack_lo = reinterpret_cast<uintptr_t>(stack_base);
  f->stack_hi = f->stack_lo + kStackBytes;
#if defined(__x86_64__)
  uint64_t* sp = reinterpret_cast<uint64_t*>(f->stack_hi & ~uintptr_t(15));
  *--sp = 0;                                          // fake return address of fiber_main (keeps the ABI alignment)
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);    // popped by the first switch's ret
  for (int i = 0; i < 6; ++i) *--sp = 0;              // rbp rbx r12 r13 r14 r15
  --sp;
  reinterpret_cast<uint32_t*>(sp)[0] = 0x1f80;        // mxcsr: round to nearest, exceptions masked
  reinterpret_cast<uint16_t*>(sp)[2] = 0x037f;        // x87 control word
  f->sp = sp;
#else
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = stack_base;
  f->ctx.uc_stack.ss_size = kStackBytes;
  f->ctx.uc_link = nullptr;
  makecontext(&f->ctx, fiber_main, 0);
#endif
}

void ensure_stacks(int n) {
  Emu& e = E();
  if (e.stacks_for >= n) return;
  const size_t per = kStackBytes + kGuardBytes;
  if (e.stacks) munmap(e.stacks, per * e.stacks_for);
  void* p = mmap(nullptr, per * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fiber stacks");
  e.stacks = static_cast<char*>(p);
  for (int i = 0; i < n; ++i) mprotect(e.stacks + i * per, kGuardBytes, PROT_NONE);  // overflow faults
  e.stacks_for = n;
}

std::string fmt(const char* f, va_list ap) {
  char buf[1024];
  vsnprintf(buf, sizeof(buf), f, ap);
  return buf;
}

// The launched kernel's name, with its template arguments ("attn_fwd_mma_kernel<__half, 16, 64>"), from the line
// tables; the launch expression's text where they do not say.
const char* kernel_name() {
  Emu& e = E();
  static std::map<const void*, std::string> cache;
  auto it = cache.find(e.kernel);
  if (it != cache.end()) return it->second.c_str();
  std::string name;
  Dl_info info{};
  if (dladdr(e.kernel, &info) != 0 && info.dli_fname != nullptr && std::strchr(info.dli_fname, '\'') == nullptr) {
    char cmd[4096];
    snprintf(cmd, sizeof(cmd), "addr2line -f -C -e '%s' 0x%llx 2>/dev/null", info.dli_fname,
             static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(e.kernel) -
                                             reinterpret_cast<uintptr_t>(info.dli_fbase)));
    if (FILE* f = popen(cmd, "r")) {
      char line[2048];
      if (fgets(line, sizeof(line), f) != nullptr) name = line;
      pclose(f);
    }
  }
  // "void dalle::(anonymous namespace)::k<__half, 16>(dalle::(anonymous namespace)::Args)" -> "k<__half, 16>"
  for (const char* ns : {"dalle::(anonymous namespace)::", "(anonymous namespace)::", "dalle::"})
    for (size_t p; (p = name.find(ns)) != std::string::npos;) name.erase(p, std::strlen(ns));
  if (name.rfind("void ", 0) == 0) name.erase(0, 5);
  int depth = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    if (name[i] == '<') ++depth;
    if (name[i] == '>') --depth;
    if (name[i] == '(' && depth == 0) { name.resize(i); break; }
  }
  if (name.empty() || name.find('?') != std::string::npos) name = e.cfg.name;
  return (cache[e.kernel] = name).c_str();
}

std::string where(int thread) {
  Emu& e = E();
  char buf[512];
  const Fiber& f = e.fibers[thread];
  snprintf(buf, sizeof(buf), "%s block (%u,%u,%u) thread (%u,%u,%u)", kernel_name(), e.block.x, e.block.y, e.block.z,
           f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

void add_report(std::string msg) {
  Emu& e = E();
  ++e.report_count;
  if (e.reports.size() < kMaxReports) e.reports.push_back(std::move(msg));
}

Fiber* current(const char* what) {
  Fiber* f = tl_fiber;
  if (f == nullptr) throw std::logic_error(std::string("cuda_emu: ") + what + " called outside a kernel");
  return f;
}

Warp& warp_of(const Fiber* f) { return E().warps[f->linear / kWarpSize]; }

void complete_barrier() {
  Emu& e = E();
  for (int k = 0; k < 3; ++k) e.reduce_res[k] = e.reduce_acc[k];
  e.reduce_acc[0] = 0, e.reduce_acc[1] = 1, e.reduce_acc[2] = 0;
  e.arrived = 0;
  ++e.gen;
  ++e.epoch;  // a new barrier interval for the race detector
}

bool ready(const Fiber& f) {
  Emu& e = E();
  switch (f.state) {
    case kReady: return true;
    case kWaitBarrier: return e.gen != f.wait_gen;
    case kWaitWarp: return f.coll_done;
    default: return false;
  }
}

void report_deadlock() {
  Emu& e = E();
  int bar = 0, coll = 0;
  std::string example;
  for (auto& f : e.fibers) {
    if (f.state == kWaitBarrier) ++bar;
    if (f.state == kWaitWarp) {
      ++coll;
      if (example.empty()) {
        const Warp& w = warp_of(&f);
        const int lane = f.linear % kWarpSize;
        char buf[200];
        snprintf(buf, sizeof(buf), "; e.g. thread %d waits in %s with mask 0x%08x (lanes arrived 0x%08x, exited 0x%08x)",
                 f.linear, w.what[lane], w.mask[lane], w.arrived, w.exited);
        example = buf;
      }
    }
  }
  char buf[256];
  snprintf(buf, sizeof(buf), "deadlock: %s block (%u,%u,%u): %d threads wait at __syncthreads, %d in warp collectives "
           "that can never complete", kernel_name(), e.block.x, e.block.y, e.block.z, bar, coll);
  add_report(buf + example);
  e.aborted = true;
}

void run_block() {
  Emu& e = E();
  for (int t = 0; t < e.nthreads; ++t) {
    Fiber& f = e.fibers[t];
    init_fiber(&f, e.stacks + t * (kStackBytes + kGuardBytes) + kGuardBytes);
    f.state = kReady;
    f.coll_done = false;
    f.open_copies.clear();
    f.copy_groups.clear();
  }
  for (size_t w = 0; w < e.warps.size(); ++w) {
    Warp& wp = e.warps[w];
    wp.arrived = 0;
    const int lanes = std::min(kWarpSize, e.nthreads - static_cast<int>(w) * kWarpSize);
    wp.exited = lanes == kWarpSize ? 0u : ~((1u << lanes) - 1u);
    std::memset(wp.sync_count, 0, sizeof(wp.sync_count));
  }
  // copies the previous block never waited for (reported) are no longer in flight
  if (e.in_flight > 0) std::memset(e.inflight, 0, kArenaBytes * sizeof(int32_t));
  e.flights.clear();
  e.in_flight = 0;
  e.live = e.nthreads;
  e.arrived = 0;
  e.reduce_acc[0] = 0, e.reduce_acc[1] = 1, e.reduce_acc[2] = 0;
  e.static_used = 0;
  for (auto& [lo, hi] : e.redzones) std::memset(e.redzone + lo, 0, hi - lo);
  e.redzones.clear();
  ++e.block_serial;
  ++e.epoch;
  std::memset(e.arena, 0xff, kArenaBytes);  // uninitialized shared memory reads as NaN / all-ones
  int alive = e.nthreads;
  while (alive > 0) {
    bool progress = false;
    for (int t = 0; t < e.nthreads; ++t) {
      Fiber& f = e.fibers[t];
      if (f.state == kDone || !ready(f)) continue;
      f.state = kReady;
      switch_to(&f);
      progress = true;
      if (f.state == kDone) --alive;
    }
    if (!progress) {
      report_deadlock();
      return;
    }
  }
}

[[noreturn]] void fiber_main() {
  Emu& e = E();
  Fiber* f = tl_fiber;
  e.run(e.run_ctx);
  flush_undo();
  InRuntime busy;
  if (!f->open_copies.empty() || !f->copy_groups.empty())
    add_report("cp.async: " + where(f->linear) + " returned with cp.async copies it never waited for");
  f->state = kDone;
  --e.live;
  Warp& w = warp_of(f);
  w.exited |= 1u << (f->linear % kWarpSize);
  if (e.arrived > 0 && e.arrived == e.live) complete_barrier();  // exited threads count as arrived
  yield_to_scheduler(f);
  __builtin_unreachable();
}

// ---------------------------------------------------------------------------------------------------------------
// Checks
// The source line of a place in the kernel code (a return address into it), as "csrc/attention.cu:455", with the
// lines it is inlined at after it ("csrc/ptx.h:236 <- csrc/attention.cu:300 <- csrc/attention.cu:392"); read from
// the extension's line tables (built with -g1) by addr2line, once per place. Frames outside csrc/ are left out.
std::string source_line(const void* pc) {
  if (pc == nullptr) return "an unknown line";
  static std::map<const void*, std::string> cache;
  auto it = cache.find(pc);
  if (it != cache.end()) return it->second;
  std::string out;
  Dl_info info{};
  if (dladdr(pc, &info) != 0 && info.dli_fname != nullptr && std::strchr(info.dli_fname, '\'') == nullptr) {
    char cmd[4096];
    snprintf(cmd, sizeof(cmd), "addr2line -i -e '%s' 0x%llx 2>/dev/null", info.dli_fname,
             static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(pc) - 1 -
                                             reinterpret_cast<uintptr_t>(info.dli_fbase)));
    if (FILE* f = popen(cmd, "r")) {
      char line[2048];
      while (fgets(line, sizeof(line), f) != nullptr) {
        std::string l(line);
        l = l.substr(0, l.find_first_of(" \n"));
        const size_t c = l.rfind("csrc/");
        if (c == std::string::npos || l.find("cuda_emu.h") != std::string::npos) continue;
        out += (out.empty() ? "" : " <- ") + l.substr(c);
      }
      pclose(f);
    }
  }
  if (out.empty()) {
    char buf[64];
    snprintf(buf, sizeof(buf), "code address %p (no line table)", pc);
    out = buf;
  }
  return cache[pc] = out;
}

void race(int a, const void* apc, int b, const void* bpc, const char* kind, size_t offset, size_t bytes) {
  Emu& e = E();
  ++e.race_count;
  char buf[1024];
  snprintf(buf, sizeof(buf), "racecheck: %s block (%u,%u,%u): %s hazard on shared memory offset %zu (%zu bytes) "
           "between thread %d at %s and thread %d%s at %s with no __syncthreads() between the accesses", kernel_name(),
           e.block.x, e.block.y, e.block.z, kind, offset, bytes, a, source_line(apc).c_str(), b,
           e.issuing_copy ? "'s cp.async" : "", source_line(bpc).c_str());
  add_report(buf);
}

// An access to bytes a cp.async is still writing: the copy may land at any time from its issue to the
// cp.async.wait_group that covers it (and other threads see it only after a barrier that follows that wait).
void async_race(int t, const void* pc, bool write, const Flight& fl, size_t offset, size_t bytes) {
  Emu& e = E();
  ++e.race_count;
  char buf[1024];
  if (fl.thread == t) {
    snprintf(buf, sizeof(buf), "racecheck: %s block (%u,%u,%u): cp.async hazard on shared memory offset %zu (%zu "
             "bytes): thread %d %s it at %s before the cp.async.wait_group that covers its own cp.async at %s",
             kernel_name(), e.block.x, e.block.y, e.block.z, offset, bytes, t, write ? "writes" : "reads",
             source_line(pc).c_str(), source_line(fl.pc).c_str());
  } else {
    snprintf(buf, sizeof(buf), "racecheck: %s block (%u,%u,%u): cp.async hazard on shared memory offset %zu (%zu "
             "bytes): thread %d %s it at %s while thread %d's cp.async at %s may still be writing it (in flight "
             "until thread %d's cp.async.wait_group and a __syncthreads() after it)", kernel_name(), e.block.x,
             e.block.y, e.block.z, offset, bytes, t, write ? "writes" : "reads", source_line(pc).c_str(), fl.thread,
             source_line(fl.pc).c_str(), fl.thread);
  }
  add_report(buf);
}

bool ordered_in_warp(int earlier, uint32_t earlier_sync, int later) {
  if (earlier / kWarpSize != later / kWarpSize) return false;
  return E().warps[earlier / kWarpSize].sync_count[earlier % kWarpSize] > earlier_sync;
}

void check_shared(int t, size_t off, size_t n, bool write, bool atomic, const void* pc) {
  Emu& e = E();
  const uint32_t sync = e.warps[t / kWarpSize].sync_count[t % kWarpSize];
  for (size_t b = off; b < off + n; ++b) {
    if (e.in_flight > 0 && e.inflight[b] != 0) {
      async_race(t, pc, write, e.flights[e.inflight[b] - 1], b, n);
      return;
    }
    Shadow& s = e.shadow[b];
    if (s.epoch != e.epoch) s = Shadow{e.epoch, -1, -1, -1, 0, 0, nullptr, nullptr};
    const int w = s.writer < 0 ? -1 : (s.writer & 0x3fff);
    const bool w_atomic = s.writer >= 0 && (s.writer & 0x4000);
    if (write) {
      if (w >= 0 && w != t && !(atomic && w_atomic) && !ordered_in_warp(w, s.wsync, t)) {
        race(w, s.wpc, t, pc, "write-after-write", b, n);
        return;
      }
      if (s.reader == -2 || (s.reader >= 0 && s.reader != t && !ordered_in_warp(s.reader, s.rsync, t))) {
        race(s.rfirst, s.rpc, t, pc, s.reader == -2 ? "write-after-read (several readers)" : "write-after-read", b, n);
        return;
      }
      s.writer = static_cast<int16_t>(t | (atomic ? 0x4000 : 0));
      s.wsync = sync;
      s.wpc = pc;
    } else {
      if (w >= 0 && w != t && !ordered_in_warp(w, s.wsync, t)) {
        race(w, s.wpc, t, pc, "read-after-write", b, n);
        return;
      }
      if (s.reader == -1) {
        s.reader = s.rfirst = static_cast<int16_t>(t);
        s.rsync = sync;
        s.rpc = pc;
      } else if (s.reader == t) {
        s.rsync = sync;
      } else {
        s.reader = -2;
      }
    }
  }
}

// A landed cp.async: the issuing thread's write in the current barrier interval (hazards with other threads were
// checked while it was in flight).
void mark_written(int t, size_t off, size_t n, const void* pc) {
  Emu& e = E();
  const uint32_t sync = e.warps[t / kWarpSize].sync_count[t % kWarpSize];
  for (size_t b = off; b < off + n; ++b) {
    Shadow& s = e.shadow[b];
    if (s.epoch != e.epoch) s = Shadow{e.epoch, -1, -1, -1, 0, 0, nullptr, nullptr};
    s.writer = static_cast<int16_t>(t);
    s.wsync = sync;
    s.wpc = pc;
  }
}

std::string block_name(int64_t linear) {
  const dim3 g = E().cfg.grid;
  char buf[64];
  snprintf(buf, sizeof(buf), "(%lld,%lld,%lld)", static_cast<long long>(linear % g.x),
           static_cast<long long>(linear / g.x % g.y), static_cast<long long>(linear / (int64_t(g.x) * g.y)));
  return buf;
}

// Two blocks of one launch touching the same byte of global memory, at least one writing, not both atomically:
// blocks run in any order and at the same time on a GPU, and nothing orders them within a launch.
void global_race(const Range& r, uintptr_t a, size_t n, const char* kind, int64_t other_block, int other_thread,
                 const void* other_pc, int t, const void* pc) {
  Emu& e = E();
  ++e.race_count;
  const std::string other = other_block == -2 ? std::string("several other blocks (first: thread ") +
                                                    std::to_string(other_thread) + ")"
                                              : "block " + block_name(other_block) + " thread " +
                                                    std::to_string(other_thread);
  char buf[1024];
  snprintf(buf, sizeof(buf), "racecheck: %s: %s hazard between blocks on global memory at 0x%llx (%zu bytes, byte "
           "%llu of %s): %s at %s and block (%u,%u,%u) thread %d at %s, in one launch without atomics",
           kernel_name(), kind, static_cast<unsigned long long>(a), n, static_cast<unsigned long long>(a - r.lo),
           r.name.c_str(), other.c_str(), source_line(other_pc).c_str(), e.block.x, e.block.y, e.block.z, t,
           source_line(pc).c_str());
  add_report(buf);
}

void check_global(Range& r, int t, uintptr_t a, size_t n, bool write, bool atomic, const void* pc) {
  Emu& e = E();
  if (r.shadow.empty()) r.shadow.resize(r.hi - r.lo);  // zero: launch 0, stale (launch_epoch starts at 1)
  const int32_t blk = static_cast<int32_t>(e.block_linear);
  for (size_t i = a - r.lo; i < a - r.lo + n; ++i) {
    GShadow& s = r.shadow[i];
    if (s.launch != e.launch_epoch) s = GShadow{e.launch_epoch, -1, -1, 0, 0, nullptr, nullptr};
    const bool w_atomic = (s.wthread & 0x8000) != 0;
    if (s.wblock >= 0 && s.wblock != blk && !(atomic && w_atomic)) {
      global_race(r, a, n, write ? "write-after-write" : "read-after-write", s.wblock, s.wthread & 0x7fff, s.wpc, t,
                  pc);
      return;
    }
    if (write && s.rblock != -1 && s.rblock != blk) {
      global_race(r, a, n, "write-after-read", s.rblock, s.rthread, s.rpc, t, pc);
      return;
    }
    if (write) {
      s.wblock = blk;
      s.wthread = static_cast<uint16_t>(t | (atomic ? 0x8000 : 0));
      s.wpc = pc;
    } else if (s.rblock == -1) {
      s.rblock = blk;
      s.rthread = static_cast<uint16_t>(t);
      s.rpc = pc;
    } else if (s.rblock != blk) {
      s.rblock = -2;
    }
  }
}

void memcheck(int t, uintptr_t a, size_t n, bool write, const char* why, const void* pc) {
  Emu& e = E();
  ++e.memcheck_count;
  char buf[1024];
  snprintf(buf, sizeof(buf), "memcheck: %s: invalid %s of %zu bytes at 0x%llx at %s: %s (not carried out)",
           where(t).c_str(), write ? "write" : "read", n, static_cast<unsigned long long>(a),
           source_line(pc).c_str(), why);
  add_report(buf);
}

// Undo the reported access that the kernel code performed after its hook returned: put back the bytes it wrote
// (or the ones a poisoned read saw). Called at every event that follows it: the thread's next access, its next call
// into the runtime, the scheduler regaining control, the end of the launch.
void flush_undo() {
  Undo& u = E().undo;
  if (u.p == nullptr) return;
  std::memcpy(u.p, u.saved.data(), u.saved.size());
  u.p = nullptr;
}

bool writable_memory(uintptr_t a, size_t n) {
  Emu& e = E();
  auto inside = [&]() {
    for (auto& r : e.writable_maps)
      if (a >= r.first && a + n <= r.second) return true;
    return false;
  };
  if (inside()) return true;
  if (e.maps_loaded) return false;
  e.maps_loaded = true;  // read once per checked call: a miss after that is not writable memory
  e.writable_maps.clear();
  if (FILE* f = fopen("/proc/self/maps", "r")) {
    char line[512];
    while (fgets(line, sizeof(line), f) != nullptr) {
      unsigned long long lo, hi;
      char perms[8];
      if (sscanf(line, "%llx-%llx %7s", &lo, &hi, perms) == 3 && perms[0] == 'r' && perms[1] == 'w')
        e.writable_maps.emplace_back(lo, hi);
    }
    fclose(f);
  }
  return inside();
}

// A reported access from the kernel code is not carried out: the hook runs before the access, so a write is let
// happen and undone at the next event, and a read finds 0xff bytes (NaN; put back at the next event). Nothing
// outside the checked tensors is changed for good: the heap survives an out-of-bounds write.
void suppress(uintptr_t a, size_t n, bool write) {
  Emu& e = E();
  flush_undo();
  if (!write && !writable_memory(a, n)) return;  // cannot poison read-only memory: the read sees what is there
  auto* p = reinterpret_cast<unsigned char*>(a);
  e.undo.saved.assign(p, p + n);
  e.undo.p = p;
  if (!write) std::memset(p, 0xff, n);
}

// Checks one access of thread t; false: it is invalid (reported), and must not be carried out.
bool classify(int t, uintptr_t a, size_t n, bool write, bool atomic, const void* pc) {
  Emu& e = E();
  const uintptr_t arena = reinterpret_cast<uintptr_t>(e.arena);
  if (a >= arena && a < arena + kArenaBytes) {
    const size_t off = a - arena;
    const size_t used = e.static_used > 0 ? e.static_used : e.dyn_bytes;
    if (off + n > used) {
      char why[160];
      snprintf(why, sizeof(why), "shared memory offset %zu is beyond the %zu bytes this block has", off, used);
      memcheck(t, a, n, write, why, pc);
      return false;
    }
    if (!e.redzones.empty()) {
      for (size_t b = off; b < off + n; ++b) {
        if (e.redzone[b]) {
          char why[200];
          snprintf(why, sizeof(why), "shared memory offset %zu is past the end of a __shared__ variable (in the "
                   "gap after it)", b);
          memcheck(t, a, n, write, why, pc);
          return false;
        }
      }
    }
    check_shared(t, off, n, write, atomic, pc);
    return true;
  }
  for (Range& r : e.ranges) {
    if (a >= r.lo && a + n <= r.hi) {
      if (write && !r.writable) {
        memcheck(t, a, n, write, ("write to the read-only input " + r.name).c_str(), pc);
        return false;
      }
      if (r.writable) check_global(r, t, a, n, write, atomic, pc);
      return true;
    }
  }
  if (!write) {
    for (auto& r : e.readonly)
      if (a >= r.first && a + n <= r.second) return true;  // constants of the kernel code
  }
  const uintptr_t sb = reinterpret_cast<uintptr_t>(e.stacks);
  if (a >= sb && a < sb + e.stacks_for * (kStackBytes + kGuardBytes)) {
    memcheck(t, a, n, write, "local memory of another thread", pc);
    return false;
  }
  std::string why = "outside the tensors passed to the kernel";
  const Range* near = nullptr;
  uintptr_t dist = ~uintptr_t(0);
  for (const Range& r : e.ranges) {
    const uintptr_t d = a < r.lo ? r.lo - a : (a >= r.hi ? a - r.hi + 1 : 0);
    if (d < dist) dist = d, near = &r;
  }
  if (near != nullptr) {
    char buf[200];
    snprintf(buf, sizeof(buf), " (%llu bytes %s %s)", static_cast<unsigned long long>(a < near->lo ? near->lo - a : a + n - near->hi),
             a < near->lo ? "before" : "past the end of", near->name.c_str());
    why += buf;
  }
  memcheck(t, a, n, write, why.c_str(), pc);
  return false;
}

inline void on_access(const void* p, size_t n, bool write, const void* pc) {
  Fiber* f = tl_fiber;
  if (f == nullptr || E().depth > 0) return;
  InRuntime busy;
  flush_undo();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a >= f->stack_lo && a < f->stack_hi) return;  // the thread's own locals and parameters
  if (!classify(f->linear, a, n, write, false, pc)) suppress(a, n, write);
}

int find_readonly_segments(dl_phdr_info* info, size_t, void* data) {
  auto* self = static_cast<uintptr_t*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (*self >= lo && *self < hi) {
      for (int j = 0; j < info->dlpi_phnum; ++j) {
        const ElfW(Phdr)& q = info->dlpi_phdr[j];
        if (q.p_type == PT_LOAD && !(q.p_flags & PF_W))
          E().readonly.emplace_back(info->dlpi_addr + q.p_vaddr, info->dlpi_addr + q.p_vaddr + q.p_memsz);
      }
      return 1;
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Warp collectives
template <int kKind>
void shfl_combine(const unsigned char (*in)[kSlotBytes], unsigned char (*out)[kSlotBytes], unsigned mask, int t0) {
  struct In { uint64_t v; int32_t arg, width; };
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1)) continue;
    In x;
    std::memcpy(&x, in[l], sizeof(x));
    const int w = x.width;
    if (w < 1 || w > kWarpSize || (w & (w - 1)) != 0) {
      report("shuffle: %s: width %d is not a power of 2 in [1, 32]", where(t0 + l).c_str(), w);
      std::memcpy(out[l], &x.v, 8);
      continue;
    }
    const int seg = l & ~(w - 1), pos = l & (w - 1);
    int src = l;
    if (kKind == 0) src = seg + (x.arg & (w - 1));
    if (kKind == 1) src = pos >= x.arg ? l - x.arg : l;
    if (kKind == 2) src = pos + x.arg < w ? l + x.arg : l;
    if (kKind == 3) {
      src = l ^ x.arg;
      if (src >= seg + w || src < 0 || src >= kWarpSize) src = l;  // later groups: own value
    }
    if (!(mask >> src & 1)) {
      report("shuffle: %s reads lane %d, which is not in the mask 0x%08x (undefined value on the GPU)",
             where(t0 + l).c_str(), src, mask);
      src = l;
    }
    uint64_t v;
    std::memcpy(&v, in[src], 8);
    std::memcpy(out[l], &v, 8);
  }
}

template <int kKind>
void vote_combine(const unsigned char (*in)[kSlotBytes], unsigned char (*out)[kSlotBytes], unsigned mask, int) {
  unsigned ballot = 0;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1)) continue;
    int p;
    std::memcpy(&p, in[l], sizeof(p));
    if (p) ballot |= 1u << l;
  }
  const unsigned r = kKind == 0 ? ballot : (kKind == 1 ? unsigned(ballot != 0) : unsigned(ballot == mask));
  for (int l = 0; l < kWarpSize; ++l)
    if (mask >> l & 1) std::memcpy(out[l], &r, sizeof(r));
}

template <int kKind>
void match_combine(const unsigned char (*in)[kSlotBytes], unsigned char (*out)[kSlotBytes], unsigned mask, int) {
  uint64_t v[kWarpSize];
  for (int l = 0; l < kWarpSize; ++l)
    if (mask >> l & 1) std::memcpy(&v[l], in[l], 8);
  bool all = true;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1)) continue;
    unsigned same = 0;
    for (int k = 0; k < kWarpSize; ++k)
      if ((mask >> k & 1) && v[k] == v[l]) same |= 1u << k;
    if (same != mask) all = false;
    std::memcpy(out[l], &same, 4);
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1)) continue;
    const unsigned r = kKind == 0 ? 0u : (all ? mask : 0u);
    const int pred = all;
    if (kKind == 1) std::memcpy(out[l], &r, 4);
    std::memcpy(out[l] + 4, &pred, 4);
  }
}

void syncwarp_combine(const unsigned char (*)[kSlotBytes], unsigned char (*)[kSlotBytes], unsigned mask, int t0) {
  Warp& w = E().warps[t0 / kWarpSize];
  for (int l = 0; l < kWarpSize; ++l)
    if (mask >> l & 1) ++w.sync_count[l];
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// API of cuda_emu.h
void report(const char* f, ...) {
  InRuntime busy;
  va_list ap;
  va_start(ap, f);
  add_report(fmt(f, ap));
  va_end(ap);
}

uint3 thread_idx() { return current("threadIdx")->tid; }
uint3 block_idx() { return E().block; }
dim3 block_dim() { return E().cfg.block; }
dim3 grid_dim() { return E().cfg.grid; }
int lane_id() { return current("lane_id")->linear % kWarpSize; }
int warp_thread0() { return current("warp_thread0")->linear / kWarpSize * kWarpSize; }
void threadfence() {}

unsigned active_mask() {
  Fiber* f = current("__activemask");
  return ~warp_of(f).exited;
}

// The edit of `kind` at the kernel-code place `pc` (one of the lines it is inlined at), or -1.
int edit_at(const void* pc, int kind) {
  Emu& e = E();
  if (e.edits.empty()) return -1;
  InRuntime busy;
  auto key = std::make_pair(pc, kind);
  auto it = e.edit_cache.find(key);
  if (it != e.edit_cache.end()) return it->second;
  const std::string chain = " <- " + source_line(pc) + " <- ";
  int found = -1;
  for (size_t i = 0; i < e.edits.size() && found < 0; ++i)
    if (e.edits[i].kind == kind && chain.find(" <- " + e.edits[i].line + " <- ") != std::string::npos)
      found = static_cast<int>(i);
  return e.edit_cache[key] = found;
}

void syncthreads() {
  if (edit_at(__builtin_return_address(0), 0) >= 0) return;
  syncthreads_reduce(0, 0);
}

int syncthreads_reduce(int kind, int predicate) {
  Emu& e = E();
  Fiber* f = current("__syncthreads");
  flush_undo();
  e.reduce_acc[0] += predicate != 0;
  e.reduce_acc[1] &= predicate != 0;
  e.reduce_acc[2] |= predicate != 0;
  if (++e.arrived == e.live) {
    complete_barrier();
  } else {
    f->state = kWaitBarrier;
    f->wait_gen = e.gen;
    yield_to_scheduler(f);
  }
  return e.reduce_res[kind];
}

void warp_collective(unsigned mask, Combine combine, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     const char* what) {
  InRuntime busy;
  Fiber* f = current(what);
  f->coll_pc = __builtin_return_address(0);
  flush_undo();
  Warp& w = warp_of(f);
  const int lane = f->linear % kWarpSize;
  if (in_bytes > kSlotBytes || out_bytes > kSlotBytes) throw std::logic_error("cuda_emu: collective slot too small");
  if (!(mask >> lane & 1)) {
    report("%s: %s: the calling lane %d is not in the mask 0x%08x", what, where(f->linear).c_str(), lane, mask);
    mask |= 1u << lane;
  }
  if (mask & w.exited) {
    report("%s: %s: mask 0x%08x names lanes that have exited or do not exist (0x%08x); the GPU would hang", what,
           where(f->linear).c_str(), mask, mask & w.exited);
    mask &= ~w.exited;
  }
  std::memcpy(w.in[lane], in, in_bytes);
  w.mask[lane] = mask;
  w.fn[lane] = combine;
  w.what[lane] = what;
  w.arrived |= 1u << lane;
  f->coll_done = false;
  if ((w.arrived & mask) == mask) {
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(mask >> l & 1)) continue;
      if (w.mask[l] != mask || w.fn[l] != combine) {
        report("warp collective: %s: lanes %d and %d of one warp met in different collectives (%s with mask 0x%08x, "
               "%s with mask 0x%08x)", kernel_name(), lane, l, what, mask, w.what[l], w.mask[l]);
        break;
      }
    }
    const int t0 = f->linear - lane;
    combine(w.in, w.out, mask, t0);
    w.arrived &= ~mask;
    for (int l = 0; l < kWarpSize; ++l)
      if ((mask >> l & 1) && l != lane) E().fibers[t0 + l].coll_done = true;
  } else {
    f->state = kWaitWarp;
    yield_to_scheduler(f);
  }
  std::memcpy(out, w.out[lane], out_bytes);
}

uint64_t shfl(int kind, unsigned mask, uint64_t value, int arg, int width) {
  struct { uint64_t v; int32_t arg, width; } in{value, arg, width};
  static const Combine fns[4] = {shfl_combine<0>, shfl_combine<1>, shfl_combine<2>, shfl_combine<3>};
  static const char* names[4] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
  uint64_t out = 0;
  warp_collective(mask, fns[kind], &in, sizeof(in), &out, sizeof(out), names[kind]);
  return out;
}

unsigned vote(int kind, unsigned mask, int predicate) {
  static const Combine fns[3] = {vote_combine<0>, vote_combine<1>, vote_combine<2>};
  static const char* names[3] = {"__ballot_sync", "__any_sync", "__all_sync"};
  unsigned out = 0;
  warp_collective(mask, fns[kind], &predicate, sizeof(predicate), &out, sizeof(out), names[kind]);
  return out;
}

unsigned match(int kind, unsigned mask, uint64_t value, int* pred) {
  static const Combine fns[2] = {match_combine<0>, match_combine<1>};
  static const char* names[2] = {"__match_any_sync", "__match_all_sync"};
  unsigned out[2] = {0, 0};
  warp_collective(mask, fns[kind], &value, sizeof(value), out, sizeof(out), names[kind]);
  if (pred != nullptr) *pred = static_cast<int>(out[1]);
  return out[0];
}

void syncwarp(unsigned mask) {
  char none = 0;
  warp_collective(mask, syncwarp_combine, &none, 1, &none, 1, "__syncwarp");
}

bool check_access(int thread, const void* p, size_t bytes, bool write, bool atomic, const void* pc) {
  InRuntime busy;
  if (thread < 0) thread = current("atomic")->linear;
  flush_undo();
  Fiber* f = &E().fibers[thread];
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a >= f->stack_lo && a < f->stack_hi) return true;
  return classify(thread, a, bytes, write, atomic, pc);
}

bool is_shared(const void* p, size_t bytes) {
  Emu& e = E();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), arena = reinterpret_cast<uintptr_t>(e.arena);
  return a >= arena && a + bytes <= arena + kArenaBytes;
}

void read_shared(int thread, const void* p, size_t bytes, void* dst) {
  InRuntime busy;
  const void* pc = E().fibers[thread].coll_pc;
  flush_undo();
  if (!is_shared(p, bytes)) {
    memcheck(thread, reinterpret_cast<uintptr_t>(p), bytes, false, "address is not in shared memory (ldmatrix)", pc);
    std::memset(dst, 0xff, bytes);
    return;
  }
  if (classify(thread, reinterpret_cast<uintptr_t>(p), bytes, false, false, pc))
    std::memcpy(dst, p, bytes);
  else
    std::memset(dst, 0xff, bytes);  // not carried out: a poison value
}

// cp.async. At issue: the source is read-checked, the destination write-checked against the accesses of the current
// barrier interval, and its bytes are marked in flight (any access to them before the copy lands is a hazard,
// check_shared). The data lands at issue (early schedule) or at the cp.async.wait_group that covers it (late, the
// default: a read before the wait sees the block's 0xff fill); either way the copy counts as the issuing thread's
// write from the wait on.
void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  Emu& e = E();
  InRuntime busy;
  Fiber* f = current("cp.async");
  const void* pc = __builtin_return_address(0);
  flush_undo();
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst);
  Copy c{dst, src, bytes, src_bytes, pc, -1, true};
  if (d % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    report("cp.async: %s: addresses %p <- %p at %s are not aligned to the copy size %d", where(f->linear).c_str(), dst,
           src, source_line(pc).c_str(), bytes);
  if (src_bytes > 0) c.src_ok = classify(f->linear, reinterpret_cast<uintptr_t>(src), src_bytes, false, false, pc);
  if (!is_shared(dst, bytes)) {
    memcheck(f->linear, d, bytes, true, "cp.async destination is not in shared memory", pc);
  } else if (e.issuing_copy = true, classify(f->linear, d, bytes, true, false, pc)) {
    e.issuing_copy = false;
    c.flight = static_cast<int>(e.flights.size());
    e.flights.push_back(Flight{f->linear, pc});
    const size_t off = d - reinterpret_cast<uintptr_t>(e.arena);
    for (int i = 0; i < bytes; ++i) e.inflight[off + i] = c.flight + 1;
    ++e.in_flight;
  }
  e.issuing_copy = false;
  if (e.cp_async_early && c.flight >= 0) {
    unsigned char buf[16];
    std::memset(buf, c.src_ok ? 0 : 0xff, sizeof(buf));
    if (c.src_ok && src_bytes > 0) std::memcpy(buf, src, src_bytes);
    std::memcpy(dst, buf, bytes);
  }
  f->open_copies.push_back(c);
}

void cp_async_commit() {
  if (edit_at(__builtin_return_address(0), 1) >= 0) return;
  Fiber* f = current("cp.async.commit_group");
  f->copy_groups.push_back(std::move(f->open_copies));
  f->open_copies.clear();
}

void cp_async_wait(int pending) {
  Emu& e = E();
  const int edit = edit_at(__builtin_return_address(0), 2);
  if (edit >= 0) pending = e.edits[edit].value;
  InRuntime busy;
  Fiber* f = current("cp.async.wait_group");
  flush_undo();
  while (static_cast<int>(f->copy_groups.size()) > pending) {
    for (const Copy& c : f->copy_groups.front()) {
      if (c.flight < 0) continue;  // invalid destination: reported at issue, not copied
      const size_t off = reinterpret_cast<uintptr_t>(c.dst) - reinterpret_cast<uintptr_t>(e.arena);
      for (int i = 0; i < c.bytes; ++i)
        if (e.inflight[off + i] == c.flight + 1) e.inflight[off + i] = 0;
      --e.in_flight;
      if (!e.cp_async_early) {
        unsigned char buf[16];
        std::memset(buf, c.src_ok ? 0 : 0xff, sizeof(buf));
        if (c.src_ok && c.src_bytes > 0) std::memcpy(buf, c.src, c.src_bytes);
        std::memcpy(c.dst, buf, c.bytes);
      }
      mark_written(f->linear, off, c.bytes, c.pc);
    }
    f->copy_groups.erase(f->copy_groups.begin());
  }
}

// Static __shared__ variables follow the dynamic ones (128-byte aligned), each followed by a redzone (and the
// dynamic ones too, when there are both): accesses there are reported as overflows. The limits count the
// variables' bytes, not the redzones.
void* shared_alloc(SharedSite& site, size_t bytes, size_t align) {
  InRuntime busy;
  Emu& e = E();
  current("__shared__");
  if (site.block_serial != e.block_serial) {
    const size_t dyn_end = (e.dyn_bytes + 127) & ~size_t(127);
    const bool first = e.static_used == 0;
    if (first) e.static_payload = 0;
    const size_t lo = first ? e.dyn_bytes : e.static_used;  // where the free space starts
    const size_t start = first ? dyn_end + (e.dyn_bytes > 0 ? kRedzone : 0) : e.static_used;
    const size_t off = (start + align - 1) & ~(align - 1);
    const size_t static_bytes = e.static_payload + bytes;
    if (static_bytes > kStaticSharedLimit || dyn_end + static_bytes > kSharedLimit || off + bytes > kArenaBytes) {
      report("shared memory: %s: static __shared__ variables need %zu bytes (limit %zu) next to %zu dynamic bytes",
             kernel_name(), static_bytes, kStaticSharedLimit, e.dyn_bytes);
      e.aborted = true;
      return e.arena;
    }
    site.offset = off;
    site.block_serial = e.block_serial;
    e.static_payload = static_bytes;
    if (off > lo && (!first || e.dyn_bytes > 0)) {
      std::memset(e.redzone + lo, 1, off - lo);
      e.redzones.emplace_back(lo, off);
    }
    e.static_used = off + bytes;
    if (e.static_used + kRedzone <= kArenaBytes) {
      std::memset(e.redzone + e.static_used, 1, kRedzone);
      e.redzones.emplace_back(e.static_used, e.static_used + kRedzone);
      e.static_used += kRedzone;
    }
  }
  return e.arena + site.offset;
}

void* dynamic_shared() { return E().arena; }

void launch(const Config& cfg, const void* kernel, void (*run)(void*), void* ctx) {
  Emu& e = E();
  std::lock_guard<std::mutex> lock(e.mu);
  const uint64_t nthreads = uint64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  if (nthreads == 0 || nthreads > kMaxThreads || cfg.block.z > 64 || cfg.grid.x == 0 || cfg.grid.y == 0 ||
      cfg.grid.z == 0 || cfg.grid.x > 2147483647u || cfg.grid.y > 65535 || cfg.grid.z > 65535) {
    e.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  auto it = e.max_dynamic_smem.find(kernel);
  const size_t dyn_limit = it == e.max_dynamic_smem.end() ? kDefaultDynamicLimit : size_t(it->second);
  if (cfg.smem > dyn_limit) {
    e.last_error = cudaErrorInvalidValue;  // what the GPU says for too much dynamic shared memory
    return;
  }
  if (e.arena == nullptr) {
    e.arena = static_cast<unsigned char*>(aligned_alloc(4096, kArenaBytes));
    e.shadow = static_cast<Shadow*>(calloc(kArenaBytes, sizeof(Shadow)));
    e.inflight = static_cast<int32_t*>(calloc(kArenaBytes, sizeof(int32_t)));
    e.redzone = static_cast<uint8_t*>(calloc(kArenaBytes, 1));
    uintptr_t self = reinterpret_cast<uintptr_t>(&launch);
    dl_iterate_phdr(find_readonly_segments, &self);
  }
  ensure_stacks(static_cast<int>(nthreads));
  e.cfg = cfg;
  e.kernel = kernel;
  e.run = run;
  e.run_ctx = ctx;
  e.nthreads = static_cast<int>(nthreads);
  e.dyn_bytes = cfg.smem;
  e.fibers.assign(e.nthreads, Fiber{});
  for (int t = 0; t < e.nthreads; ++t) {
    Fiber& f = e.fibers[t];
    f.linear = t;
    f.tid = uint3{unsigned(t % cfg.block.x), unsigned(t / cfg.block.x % cfg.block.y),
                  unsigned(t / (cfg.block.x * cfg.block.y))};
  }
  e.warps.assign((e.nthreads + kWarpSize - 1) / kWarpSize, Warp{});
  e.aborted = false;
  ++e.launches;
  ++e.launch_epoch;  // a new launch for the cross-block check
  // Blocks run one after another, in the order of the schedule: x fastest (forward), its reverse, or a shuffle
  // seeded by the schedule's seed and the launch count (a GPU promises no order at all).
  const int64_t total = int64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  std::vector<int64_t> order;
  if (e.block_order != 0) {
    order.resize(total);
    std::iota(order.begin(), order.end(), int64_t(0));
    if (e.block_order == 1) std::reverse(order.begin(), order.end());
    else std::shuffle(order.begin(), order.end(), std::mt19937_64(e.order_seed * 1000003u + e.launches));
  }
  for (int64_t i = 0; i < total && !e.aborted; ++i) {
    const int64_t b = order.empty() ? i : order[i];
    e.block_linear = b;
    e.block = uint3{unsigned(b % cfg.grid.x), unsigned(b / cfg.grid.x % cfg.grid.y),
                    unsigned(b / (int64_t(cfg.grid.x) * cfg.grid.y))};
    run_block();
    ++e.blocks;
    e.threads += e.nthreads;
  }
  flush_undo();
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------------------------------
// ThreadSanitizer's instrumentation ABI, implemented by the checkers above (no ThreadSanitizer runtime is linked).
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define CUDA_EMU_PC __builtin_return_address(0)
void __tsan_read_range(void* p, unsigned long n) { cuda_emu::on_access(p, n, false, CUDA_EMU_PC); }
void __tsan_write_range(void* p, unsigned long n) { cuda_emu::on_access(p, n, true, CUDA_EMU_PC); }
#define CUDA_EMU_HOOKS(n)                                                                                  \
  void __tsan_read##n(void* p) { cuda_emu::on_access(p, n, false, CUDA_EMU_PC); }                          \
  void __tsan_write##n(void* p) { cuda_emu::on_access(p, n, true, CUDA_EMU_PC); }                          \
  void __tsan_unaligned_read##n(void* p) { cuda_emu::on_access(p, n, false, CUDA_EMU_PC); }                \
  void __tsan_unaligned_write##n(void* p) { cuda_emu::on_access(p, n, true, CUDA_EMU_PC); }                \
  void __tsan_volatile_read##n(void* p) { cuda_emu::on_access(p, n, false, CUDA_EMU_PC); }                 \
  void __tsan_volatile_write##n(void* p) { cuda_emu::on_access(p, n, true, CUDA_EMU_PC); }
CUDA_EMU_HOOKS(1)
CUDA_EMU_HOOKS(2)
CUDA_EMU_HOOKS(4)
CUDA_EMU_HOOKS(8)
CUDA_EMU_HOOKS(16)
#undef CUDA_EMU_HOOKS
// Atomics in instrumented host code (static-local guards, pybind11): performed, not checked.
#define CUDA_EMU_ATOMICS(n, T)                                                                                   \
  T __tsan_atomic##n##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }         \
  void __tsan_atomic##n##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }         \
  T __tsan_atomic##n##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##n##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                         \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
  }                                                                                                              \
  int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                           \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                       \
  }                                                                                                              \
  T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                               \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                            \
    return c;                                                                                                    \
  }
CUDA_EMU_ATOMICS(8, uint8_t)
CUDA_EMU_ATOMICS(16, uint16_t)
CUDA_EMU_ATOMICS(32, uint32_t)
CUDA_EMU_ATOMICS(64, uint64_t)
#undef CUDA_EMU_ATOMICS
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}

// ---------------------------------------------------------------------------------------------------------------
// The CUDA runtime calls the entry points make, answered for one emulated sm_90 device.
cudaError_t cudaGetLastError(void) {
  cudaError_t e = cuda_emu::E().last_error;
  cuda_emu::E().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return cuda_emu::E().last_error; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected (emulator)";
    default: return "unknown error (emulator)";
  }
}
const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 0;  // the emulator is not a device: backend="cuda" stays unavailable
  return cudaErrorNoDevice;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = cuda_emu::E().optin_reported; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(cuda_emu::kStaticSharedLimit); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *v = cuda_emu::kMaxThreads; return cudaSuccess;
    case cudaDevAttrWarpSize: *v = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = 132; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || size_t(value) > cuda_emu::kSharedLimit) return cudaErrorInvalidValue;
  cuda_emu::E().max_dynamic_smem[func] = value;
  return cudaSuccess;
}
}  // extern "C"

// ---------------------------------------------------------------------------------------------------------------
// Python side: which memory a kernel may touch, and what the checkers found.
namespace dalle {

void register_emu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("emu_begin", [](const std::vector<std::tuple<uintptr_t, uintptr_t, bool, std::string>>& ranges) {
    auto& e = cuda_emu::E();
    e.ranges.clear();
    for (auto& [lo, bytes, writable, name] : ranges) e.ranges.push_back({lo, lo + bytes, writable, name});
    e.reports.clear();
    e.report_count = e.race_count = e.memcheck_count = 0;
    e.maps_loaded = false;
  }, py::arg("ranges"),
        "Start a checked call: the (pointer, bytes, writable, name) ranges kernels may access in global memory.");
  m.def("emu_end", []() {
    auto& e = cuda_emu::E();
    cuda_emu::flush_undo();
    std::vector<std::string> out = e.reports;
    if (e.report_count > e.reports.size())
      out.push_back("... and " + std::to_string(e.report_count - e.reports.size()) + " more reports");
    e.ranges.clear();
    e.reports.clear();
    e.report_count = 0;
    return out;
  }, "End a checked call: the racecheck/memcheck/synchronization reports since emu_begin (empty: clean).");
  m.def("emu_set_schedule", [](const std::string& block_order, uint64_t seed, const std::string& cp_async) {
    auto& e = cuda_emu::E();
    const int order = block_order == "forward" ? 0 : block_order == "reverse" ? 1 : block_order == "shuffle" ? 2 : -1;
    if (order < 0) throw std::invalid_argument("block_order must be 'forward', 'reverse' or 'shuffle', got '" + block_order + "'");
    if (cp_async != "late" && cp_async != "early")
      throw std::invalid_argument("cp_async must be 'late' or 'early', got '" + cp_async + "'");
    e.block_order = order;
    e.order_seed = seed;
    e.cp_async_early = cp_async == "early";
  }, py::arg("block_order"), py::arg("seed"), py::arg("cp_async"),
        "How the emulator schedules what a GPU leaves unordered: blocks 'forward' (x fastest), 'reverse' or "
        "'shuffle' (seeded), and cp.async copies landing 'late' (at the wait) or 'early' (at issue).");
  m.def("emu_set_edits", [](const std::vector<std::tuple<std::string, std::string, int>>& edits) {
    auto& e = cuda_emu::E();
    e.edits.clear();
    e.edit_cache.clear();
    for (auto& [kind, line, value] : edits) {
      const int k = kind == "skip_barrier" ? 0 : kind == "skip_commit" ? 1 : kind == "wait_group" ? 2 : -1;
      if (k < 0) throw std::invalid_argument("edit kind must be skip_barrier, skip_commit or wait_group, got " + kind);
      e.edits.push_back({k, line, value});
    }
  }, py::arg("edits"),
        "Mutate kernels without a rebuild (for tests of the checkers): (kind, 'csrc/file.cu:line', value) with kind "
        "'skip_barrier' (that __syncthreads() does nothing), 'skip_commit' (that cp.async.commit_group does "
        "nothing) or 'wait_group' (that cp.async.wait_group waits for `value` pending groups); [] undoes them.");
  m.def("emu_schedule", []() {
    auto& e = cuda_emu::E();
    static const char* orders[3] = {"forward", "reverse", "shuffle"};
    return py::make_tuple(orders[e.block_order], e.order_seed, e.cp_async_early ? "early" : "late");
  }, "The current schedule: (block_order, seed, cp_async).");
  m.def("emu_set_shared_optin", [](int bytes) {
    cuda_emu::E().optin_reported = bytes < 0 ? int(cuda_emu::kSharedLimit) : bytes;
  }, py::arg("bytes"),
        "The opt-in shared memory per block that cudaDeviceGetAttribute reports (-1: the emulated sm_90's 227 KiB); "
        "lets tests steer kernels onto their global-memory paths.");
  m.def("emu_stats", []() {
    auto& e = cuda_emu::E();
    py::dict d;
    d["launches"] = e.launches;
    d["blocks"] = e.blocks;
    d["threads"] = e.threads;
    d["switches"] = e.switches;
    return d;
  }, "Counters since the module was loaded: launches, blocks and threads emulated, fiber switches.");
}

}  // namespace dalle
