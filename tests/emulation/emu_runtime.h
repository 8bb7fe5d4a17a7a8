// Host runtime that runs GPU kernels on CPU threads (shared by cuda_emu.h and metal_emu.h).
//
// Every thread of a block is a real std::thread. Two schedules (PARARNN_EMU_SCHEDULE):
//  * "serial" (default): one thread runs at a time, from one barrier to the next, in a random order drawn
//    afresh at every barrier. A missing barrier then reliably lets a reader run before its writer and read
//    the poisoned or stale value; a barrier that not every thread reaches is reported (no runnable thread).
//  * "concurrent": all threads of a block run at once (the mode for ThreadSanitizer, which sees a barrier as a
//    synchronisation and any missing one as a race).
// Strictness: blocks run in a shuffled order (PARARNN_EMU_SEED), block-shared memory (every kernel
// section) is poisoned with 0xff bytes (NaN in every float type) before every block, launch limits are checked
// (threads per block, block/grid dimensions, shared memory), and every global access made through
// PR_TRACE_GLOBAL is logged per thread so that the distinct 32-byte sectors of each warp-wide access are
// counted (coalescing report, see stats()).
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>


namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct Deadlock : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Limits {
  const char* target;
  size_t shared_bytes;  // per block
};
constexpr Limits kCudaLimits{"CUDA", 48 * 1024};
constexpr Limits kMetalLimits{"Metal", 32 * 1024};

inline bool serial_schedule() {
  const char* env = std::getenv("PARARNN_EMU_SCHEDULE");
  return !env || std::string(env) != "concurrent";
}

// Serial schedule: exactly one thread holds the baton; a thread that blocks hands it to a random runnable one.
struct Scheduler {
  std::mutex mutex;
  std::vector<std::unique_ptr<std::condition_variable>> turn;  // one per thread: a hand-off wakes one thread
  std::vector<char> runnable;
  int running = -1;
  bool failed = false;
  std::mt19937_64 rng;

  // with the lock held: give the baton to a random runnable thread (the caller is no longer running)
  void pass_on() {
    std::vector<int> ready;
    for (int i = 0; i < int(runnable.size()); ++i)
      if (runnable[i]) ready.push_back(i);
    if (ready.empty()) {
      running = -1;
      return;
    }
    running = ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(rng)];
    turn[running]->notify_one();
  }
  void fail() {
    failed = true;
    for (auto& cv : turn) cv->notify_all();
  }
  void wait_turn(std::unique_lock<std::mutex>& lock, int me) {
    turn[me]->wait(lock, [&] { return running == me || failed; });
  }
};

// A barrier for a group of threads (a block or a warp). Every thread of the group must reach it: a thread that
// returns from the kernel while others wait (barrier in divergent code, undefined behaviour on a GPU) breaks
// the barrier and the launch reports it, as does a wait that never completes.
class Barrier {
 public:
  void reset(int parties, Scheduler* scheduler) {
    std::lock_guard<std::mutex> lock(mutex_);
    parties_ = parties;
    arrived_ = exited_ = 0;
    broken_ = false;
    scheduler_ = scheduler;
    waiting_.clear();
  }
  void wait(const char* what, int me) {
    if (scheduler_) return wait_serial(what, me);
    std::unique_lock<std::mutex> lock(mutex_);
    if (exited_ > 0) broken_ = true;
    if (broken_) throw Deadlock(divergence(what));
    long generation = generation_;
    if (++arrived_ >= parties_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(timeout_seconds()),
                      [&] { return generation_ != generation || broken_; })) {
      throw Deadlock(std::string("emulated kernel deadlocked at ") + what + ": not every thread reached it");
    }
    if (broken_) throw Deadlock(divergence(what));
  }
  // the calling thread returned from the kernel (serial schedule: with the scheduler lock held)
  void exit() {
    if (scheduler_) {
      ++exited_;
      if (arrived_ > 0) broken_ = true;
      return;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    ++exited_;
    if (arrived_ > 0) {
      broken_ = true;
      cv_.notify_all();
    }
  }
  bool broken() const { return broken_; }

 private:
  void wait_serial(const char* what, int me) {
    Scheduler& s = *scheduler_;
    std::unique_lock<std::mutex> lock(s.mutex);
    if (exited_ > 0 || broken_) {
      broken_ = true;
      throw Deadlock(divergence(what));
    }
    if (++arrived_ >= parties_) {
      arrived_ = 0;
      for (int w : waiting_) s.runnable[w] = 1;
      waiting_.clear();
    } else {
      s.runnable[me] = 0;
      waiting_.push_back(me);
    }
    s.pass_on();
    if (s.running == -1) {
      s.fail();
      throw Deadlock(std::string("emulated kernel deadlocked at ") + what + ": not every thread reached it");
    }
    s.wait_turn(lock, me);
    if (s.failed || broken_) throw Deadlock(divergence(what));
  }
  static std::string divergence(const char* what) {
    return std::string("emulated kernel deadlocked at ") + what +
           ": some threads of the group returned without reaching it (barrier inside divergent code?)";
  }
  // a thread that waits this long is stuck (PARARNN_EMU_TIMEOUT overrides, in seconds)
  static int timeout_seconds() {
    const char* env = std::getenv("PARARNN_EMU_TIMEOUT");
    return env ? std::atoi(env) : 60;
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int parties_ = 0, arrived_ = 0, exited_ = 0;
  long generation_ = 0;
  bool broken_ = false;
  Scheduler* scheduler_ = nullptr;
  std::vector<int> waiting_;
};

constexpr int kWarpSize = 32;
constexpr int kSlotBytes = 16;  // largest shuffled value (double2 / long long)
constexpr unsigned kSectorBytes = 32;

struct Warp {
  Barrier barrier;
  unsigned char slots[kWarpSize][kSlotBytes];
};

struct Access {
  uintptr_t address;
  unsigned bytes;
};

// coalescing of the global accesses of one kernel: bytes the warps asked for (distinct addresses) and bytes of
// the distinct 32-byte sectors they touched
struct AccessStats {
  uint64_t warp_accesses = 0, useful_bytes = 0, sector_bytes = 0;
};

inline std::map<std::string, AccessStats>& stats() {
  static std::map<std::string, AccessStats> table;
  return table;
}

struct Launch {
  Dim3 grid, block;
  Barrier block_barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  int threads = 0;
  std::atomic<int> vote_counts[3] = {0, 0, 0};
  std::unique_ptr<Scheduler> scheduler;
  std::vector<std::vector<Access>> accesses;  // per thread of the running block
};

inline Launch*& current_launch() {
  static Launch* launch = nullptr;
  return launch;
}

struct ThreadState {
  Dim3 thread_idx, block_idx;
  int linear_tid = 0;
  long votes = 0;  // block-wide votes taken by this thread in the running block
};
inline thread_local ThreadState this_thread_state;

inline Warp& my_warp() { return *current_launch()->warps[this_thread_state.linear_tid / kWarpSize]; }
inline int my_lane() { return this_thread_state.linear_tid % kWarpSize; }
inline int warp_width() {
  int first = this_thread_state.linear_tid / kWarpSize * kWarpSize;
  int rest = current_launch()->threads - first;
  return rest < kWarpSize ? rest : kWarpSize;
}

inline void sync_block() { current_launch()->block_barrier.wait("block barrier", this_thread_state.linear_tid); }
inline void sync_warp() { my_warp().barrier.wait("warp barrier", this_thread_state.linear_tid); }

// __syncthreads_and / __syncthreads_count: a barrier that also counts the threads whose predicate held.
// Vote k uses counter k % 3; thread 0 clears the counter of vote k + 1 before the barrier of vote k (that
// counter was last read before the barrier of vote k - 1, and is next written after the barrier of vote k).
inline int sync_block_count(bool predicate) {
  Launch& l = *current_launch();
  ThreadState& me = this_thread_state;
  const long k = me.votes++;
  l.vote_counts[k % 3].fetch_add(predicate ? 1 : 0);
  if (me.linear_tid == 0) l.vote_counts[(k + 1) % 3].store(0);
  sync_block();
  return l.vote_counts[k % 3].load();
}

inline void trace_global(const void* address, unsigned bytes) {
  current_launch()->accesses[this_thread_state.linear_tid].push_back(Access{uintptr_t(address), bytes});
}

// Every lane publishes `value`, then reads the value of lane `source(lane)`
// (a lane outside the warp keeps its own value, as the shuffles do).
template <class T, class Source>
T exchange(T value, Source source) {
  static_assert(sizeof(T) <= kSlotBytes, "shuffled type too large for the emulator");
  Warp& warp = my_warp();
  int lane = my_lane();
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.barrier.wait("warp shuffle", this_thread_state.linear_tid);
  int from = source(lane);
  T result = value;
  if (from >= 0 && from < warp_width()) std::memcpy(&result, warp.slots[from], sizeof(T));
  warp.barrier.wait("warp shuffle", this_thread_state.linear_tid);
  return result;
}

template <class T>
T warp_sum(T value) {
  Warp& warp = my_warp();
  std::memcpy(warp.slots[my_lane()], &value, sizeof(T));
  warp.barrier.wait("warp reduction", this_thread_state.linear_tid);
  T total = T(0);
  for (int lane = 0; lane < warp_width(); ++lane) {
    T v;
    std::memcpy(&v, warp.slots[lane], sizeof(T));
    total += v;
  }
  warp.barrier.wait("warp reduction", this_thread_state.linear_tid);
  return total;
}

// Block-shared memory: a kernel's __shared__ / threadgroup arrays are function-local statics (cuda_emu.h,
// metal_emu.h). They are found in this library's ELF symbol table (local statics, mangled _ZZ..., outside
// the emulator's own namespaces), so they can be poisoned before every block and sized per kernel.
struct SharedArray {
  unsigned char* address;
  size_t bytes;
  std::string name;  // demangled: "<enclosing function>::<variable>"
};

inline std::string demangle(const char* symbol) {
  int status = 0;
  char* text = abi::__cxa_demangle(symbol, nullptr, nullptr, &status);
  std::string out = status == 0 && text ? text : symbol;
  std::free(text);
  return out;
}

inline const std::vector<SharedArray>& shared_arrays() {
  static const std::vector<SharedArray> arrays = [] {
    std::vector<SharedArray> out;
    Dl_info info;
    if (!dladdr(reinterpret_cast<const void*>(&shared_arrays), &info)) return out;
    std::ifstream file(info.dli_fname, std::ios::binary);
    const std::vector<char> elf((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    const auto* header = reinterpret_cast<const Elf64_Ehdr*>(elf.data());
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(elf.data() + header->e_shoff);
    for (int i = 0; i < header->e_shnum; ++i) {
      if (sections[i].sh_type != SHT_SYMTAB) continue;
      const char* names = elf.data() + sections[sections[i].sh_link].sh_offset;
      const auto* symbols = reinterpret_cast<const Elf64_Sym*>(elf.data() + sections[i].sh_offset);
      for (size_t j = 0; j < sections[i].sh_size / sizeof(Elf64_Sym); ++j) {
        const Elf64_Sym& sym = symbols[j];
        const char* mangled = names + sym.st_name;
        if (ELF64_ST_TYPE(sym.st_info) != STT_OBJECT || sym.st_size == 0 || std::strncmp(mangled, "_ZZ", 3) != 0)
          continue;
        std::string name = demangle(mangled);
        if (name.rfind("emu", 0) == 0 || name.rfind("std::", 0) == 0) continue;  // the emulator's own state
        out.push_back(SharedArray{static_cast<unsigned char*>(info.dli_fbase) + sym.st_value, size_t(sym.st_size),
                                  name});
      }
    }
    return out;
  }();
  return arrays;
}

// shared bytes of the kernel `name` (its statics' names start with the kernel's demangled name, or contain
// the kernel expression a test launched)
inline size_t shared_bytes_of(const std::string& name) {
  size_t total = 0;
  for (const SharedArray& a : shared_arrays())
    if (a.name.find(name) != std::string::npos) total += a.bytes;
  return total;
}

inline std::string check_limits(const std::string& name, const Limits& limits, Dim3 grid, Dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const size_t shared = shared_bytes_of(name);
  char buf[256];
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    std::snprintf(buf, sizeof buf, "%s launch limit: block (%u, %u, %u) exceeds 1024 threads or a block dimension",
                  limits.target, block.x, block.y, block.z);
    return buf;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    std::snprintf(buf, sizeof buf, "%s launch limit: grid (%u, %u, %u) outside 1..2^31-1 x 1..65535 x 1..65535",
                  limits.target, grid.x, grid.y, grid.z);
    return buf;
  }
  if (shared > limits.shared_bytes) {
    std::snprintf(buf, sizeof buf, "%s launch limit: %zu bytes of block-shared memory, at most %zu", limits.target,
                  shared, limits.shared_bytes);
    return buf;
  }
  return "";
}

inline uint64_t launch_seed() {
  static uint64_t counter = 0;
  const char* env = std::getenv("PARARNN_EMU_SEED");
  return (env ? std::strtoull(env, nullptr, 10) : 0x5eed) + 0x9e3779b97f4a7c15ull * ++counter;
}

// the distinct sectors of each warp-wide access of the finished block, in program order per lane
inline void count_sectors(Launch& state, AccessStats& out) {
  const int warps = (state.threads + kWarpSize - 1) / kWarpSize;
  for (int w = 0; w < warps; ++w) {
    size_t longest = 0;
    const int first = w * kWarpSize, last = std::min(state.threads, first + kWarpSize);
    for (int t = first; t < last; ++t) longest = std::max(longest, state.accesses[t].size());
    for (size_t i = 0; i < longest; ++i) {
      std::set<uintptr_t> sectors, addresses;
      uint64_t useful = 0;
      for (int t = first; t < last; ++t) {
        if (i >= state.accesses[t].size()) continue;
        const Access& a = state.accesses[t][i];
        if (addresses.insert(a.address).second) useful += a.bytes;
        for (uintptr_t s = a.address / kSectorBytes; s <= (a.address + a.bytes - 1) / kSectorBytes; ++s)
          sectors.insert(s);
      }
      out.warp_accesses += 1;
      out.useful_bytes += useful;
      out.sector_bytes += sectors.size() * kSectorBytes;
    }
  }
  for (auto& log : state.accesses) log.clear();
}

// Runs body() once per thread of every block. Returns "" or an error message.
inline std::string launch(const std::string& name, const Limits& limits, Dim3 grid, Dim3 block,
                          const std::function<void()>& body) {
  std::string error = check_limits(name, limits, grid, block);
  if (!error.empty()) return error;
  Launch state;
  state.grid = grid;
  state.block = block;
  state.threads = int(block.x * block.y * block.z);
  state.accesses.resize(state.threads);
  std::mt19937_64 rng(launch_seed());
  if (serial_schedule()) {
    state.scheduler.reset(new Scheduler());
    state.scheduler->runnable.assign(state.threads, 1);
    for (int t = 0; t < state.threads; ++t) state.scheduler->turn.emplace_back(new std::condition_variable());
    state.scheduler->rng.seed(rng());
  }
  Scheduler* scheduler = state.scheduler.get();
  int num_warps = (state.threads + kWarpSize - 1) / kWarpSize;
  for (int w = 0; w < num_warps; ++w) state.warps.emplace_back(new Warp());
  // blocks in a shuffled order
  std::vector<Dim3> order;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) order.push_back(Dim3{bx, by, bz});
  std::shuffle(order.begin(), order.end(), rng);
  AccessStats& totals = stats()[name];
  current_launch() = &state;
  auto reset_block = [&] {
    state.block_barrier.reset(state.threads, scheduler);
    for (int w = 0; w < num_warps; ++w) {
      int width = std::min(kWarpSize, state.threads - w * kWarpSize);
      state.warps[w]->barrier.reset(width, scheduler);
    }
    for (const SharedArray& a : shared_arrays()) std::memset(a.address, 0xff, a.bytes);  // NaN in every float type
    for (auto& count : state.vote_counts) count.store(0);
  };
  std::mutex error_mutex;
  for (const Dim3& block_idx : order) {
    reset_block();
    if (scheduler) {
      std::fill(scheduler->runnable.begin(), scheduler->runnable.end(), 1);
      scheduler->failed = false;
      std::lock_guard<std::mutex> lock(scheduler->mutex);
      scheduler->pass_on();
    }
    auto thread_main = [&](int tid) {
      ThreadState& me = this_thread_state;
      me.linear_tid = tid;
      me.thread_idx =
          Dim3{unsigned(tid % block.x), unsigned(tid / block.x % block.y), unsigned(tid / (block.x * block.y))};
      me.block_idx = block_idx;
      me.votes = 0;
      try {
        if (scheduler) {
          std::unique_lock<std::mutex> lock(scheduler->mutex);
          scheduler->wait_turn(lock, tid);
          if (scheduler->failed) return;
        }
        body();
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = e.what();
      }
      if (scheduler) {
        std::lock_guard<std::mutex> lock(scheduler->mutex);
        state.block_barrier.exit();
        my_warp().barrier.exit();
        scheduler->runnable[tid] = 0;
        if (state.block_barrier.broken() || my_warp().barrier.broken())
          scheduler->fail();
        else
          scheduler->pass_on();
      } else {
        state.block_barrier.exit();
        my_warp().barrier.exit();
      }
    };
    std::vector<std::thread> threads;
    for (int tid = 0; tid < state.threads; ++tid) threads.emplace_back(thread_main, tid);
    for (auto& t : threads) t.join();
    if (!error.empty()) break;
    count_sectors(state, totals);
  }
  current_launch() = nullptr;
  return error;
}

// name of the function at `address` (a kernel template instance), demangled
inline std::string function_name(const void* address) {
  Dl_info info;
  if (!dladdr(address, &info) || !info.dli_sname) return "kernel";
  return demangle(info.dli_sname);
}

}  // namespace emu

// coalescing report of everything launched in this library so far
extern "C" __attribute__((used, visibility("default"))) int emu_stats_count() { return int(emu::stats().size()); }
extern "C" __attribute__((used, visibility("default"))) const char* emu_stats_entry(int i, unsigned long long* values) {
  auto it = emu::stats().begin();
  std::advance(it, i);
  values[0] = it->second.warp_accesses;
  values[1] = it->second.useful_bytes;
  values[2] = it->second.sector_bytes;
  return it->first.c_str();
}
extern "C" __attribute__((used, visibility("default"))) void emu_stats_reset() { emu::stats().clear(); }
