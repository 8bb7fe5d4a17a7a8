// Host runtime that runs GPU kernels on CPU threads (shared by cuda_emu.h and metal_emu.h).
//
// Every thread of a block is a real std::thread, so barriers and shuffles are
// exercised with lanes running concurrently: a missing barrier shows up as a
// race (wrong result) and a barrier that not every thread reaches shows up as a
// reported deadlock instead of a hang. Blocks run one after another on the same
// threads; block-shared memory is a function-local `static` (see the prelude
// headers), so running blocks one at a time keeps it private to a block.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
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

// A barrier for a group of threads (a block or a warp). Every thread of the
// group must reach it: a thread that returns from the kernel while others wait
// (barrier in divergent code, undefined behaviour on a GPU) breaks the barrier
// and the launch reports it, as does a wait that never completes.
class Barrier {
 public:
  void reset(int parties) {
    std::lock_guard<std::mutex> lock(mutex_);
    parties_ = parties;
    arrived_ = exited_ = 0;
    broken_ = false;
  }
  void wait(const char* what) {
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
  // the calling thread returned from the kernel
  void exit() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++exited_;
    if (arrived_ > 0) {
      broken_ = true;
      cv_.notify_all();
    }
  }

 private:
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
};

constexpr int kWarpSize = 32;
constexpr int kSlotBytes = 16;  // largest shuffled value (double2 / long long)

struct Warp {
  Barrier barrier;
  unsigned char slots[kWarpSize][kSlotBytes];
};

struct Launch {
  Dim3 grid, block;
  Barrier block_barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  int threads = 0;
};

inline Launch*& current_launch() {
  static Launch* launch = nullptr;
  return launch;
}

struct ThreadState {
  Dim3 thread_idx, block_idx;
  int linear_tid = 0;
};
inline thread_local ThreadState this_thread_state;

inline Warp& my_warp() { return *current_launch()->warps[this_thread_state.linear_tid / kWarpSize]; }
inline int my_lane() { return this_thread_state.linear_tid % kWarpSize; }
inline int warp_width() {
  int first = this_thread_state.linear_tid / kWarpSize * kWarpSize;
  int rest = current_launch()->threads - first;
  return rest < kWarpSize ? rest : kWarpSize;
}

inline void sync_block() { current_launch()->block_barrier.wait("block barrier"); }
inline void sync_warp() { my_warp().barrier.wait("warp barrier"); }

// Every lane publishes `value`, then reads the value of lane `source(lane)`
// (a lane outside the warp keeps its own value, as the shuffles do).
template <class T, class Source>
T exchange(T value, Source source) {
  static_assert(sizeof(T) <= kSlotBytes, "shuffled type too large for the emulator");
  Warp& warp = my_warp();
  int lane = my_lane();
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.barrier.wait("warp shuffle");
  int from = source(lane);
  T result = value;
  if (from >= 0 && from < warp_width()) std::memcpy(&result, warp.slots[from], sizeof(T));
  warp.barrier.wait("warp shuffle");
  return result;
}

template <class T>
T warp_sum(T value) {
  Warp& warp = my_warp();
  std::memcpy(warp.slots[my_lane()], &value, sizeof(T));
  warp.barrier.wait("warp reduction");
  T total = T(0);
  for (int lane = 0; lane < warp_width(); ++lane) {
    T v;
    std::memcpy(&v, warp.slots[lane], sizeof(T));
    total += v;
  }
  warp.barrier.wait("warp reduction");
  return total;
}

// Runs body() once per thread of every block. Returns "" or an error message.
inline std::string launch(Dim3 grid, Dim3 block, const std::function<void()>& body) {
  Launch state;
  state.grid = grid;
  state.block = block;
  state.threads = int(block.x * block.y * block.z);
  int num_warps = (state.threads + kWarpSize - 1) / kWarpSize;
  for (int w = 0; w < num_warps; ++w) state.warps.emplace_back(new Warp());
  current_launch() = &state;
  Barrier between_blocks;
  between_blocks.reset(state.threads);
  auto reset_groups = [&] {
    state.block_barrier.reset(state.threads);
    for (int w = 0; w < num_warps; ++w) {
      int width = std::min(kWarpSize, state.threads - w * kWarpSize);
      state.warps[w]->barrier.reset(width);
    }
  };
  reset_groups();
  std::mutex error_mutex;
  std::string error;
  auto thread_main = [&](int tid) {
    ThreadState& me = this_thread_state;
    me.linear_tid = tid;
    me.thread_idx = Dim3{unsigned(tid % block.x), unsigned(tid / block.x % block.y), unsigned(tid / (block.x * block.y))};
    try {
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            me.block_idx = Dim3{bx, by, bz};
            body();
            state.block_barrier.exit();
            my_warp().barrier.exit();
            between_blocks.wait("end of block");
            if (tid == 0) reset_groups();
            between_blocks.wait("end of block");
          }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (error.empty()) error = e.what();
    }
  };
  std::vector<std::thread> threads;
  for (int tid = 0; tid < state.threads; ++tid) threads.emplace_back(thread_main, tid);
  for (auto& t : threads) t.join();
  current_launch() = nullptr;
  return error;
}

}  // namespace emu
