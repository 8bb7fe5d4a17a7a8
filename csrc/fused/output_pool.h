// Storage for the fused CPU ops' large outputs (the trajectory, dL/du), reused once nothing holds it.
//
// A training step frees these tensors and the next step asks for the same sizes again. glibc hands
// buffers of this size (megabytes) back to the kernel on free, so every step's sweep first-touches fresh
// pages: thousands of page faults inside the kernel, measured at 7-10 ms of a 6 ms adjoint sweep on the
// 2-core VM (B=4, T=2048, N=256). Here each output's storage is remembered and handed out again when its
// only remaining owner is this pool (no tensor or view of it is alive), as a fresh tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <mutex>
#include <vector>

namespace pararnn {

class OutputPool {
 public:
  // A contiguous tensor of these sizes, on storage no live tensor uses, reused where one fits.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
    if (bytes < kMinBytes) return at::empty(sizes, options);
    const std::lock_guard<std::mutex> lock(mutex_);
    for (c10::Storage& kept : kept_) {
      const int64_t size = static_cast<int64_t>(kept.nbytes());
      // use_count 1: this pool is the only owner. At most twice the bytes asked, so a small request does
      // not pin a large buffer.
      if (kept.use_count() == 1 && size >= bytes && size <= 2 * bytes) {
        at::Tensor out = at::empty({0}, options);
        out.set_(kept, 0, sizes);
        return out;
      }
    }
    at::Tensor out = at::empty(sizes, options);
    remember(out.storage(), bytes);
    return out;
  }

  // Forgets every kept storage no tensor uses (before a memory measurement, or when done training).
  void release_unused() {
    const std::lock_guard<std::mutex> lock(mutex_);
    std::vector<c10::Storage> in_use;
    for (c10::Storage& kept : kept_)
      if (kept.use_count() > 1) in_use.push_back(std::move(kept));
    kept_ = std::move(in_use);
  }

 private:
  static constexpr int64_t kMinBytes = int64_t(1) << 20;  // smaller buffers come from malloc's free lists
  static constexpr size_t kMaxKept = 64;                    // e.g. every layer's trajectory of a deep stack
  static constexpr int64_t kMaxKeptBytes = int64_t(1) << 30;  // beyond it, outputs are plain allocations

  // keeps the storage unless the pool is full; a full pool first forgets one nobody uses
  void remember(const c10::Storage& storage, int64_t bytes) {
    int64_t total = bytes;
    for (const c10::Storage& kept : kept_) total += static_cast<int64_t>(kept.nbytes());
    if (kept_.size() >= kMaxKept || total > kMaxKeptBytes) {
      for (auto it = kept_.begin(); it != kept_.end(); ++it) {
        if (it->use_count() == 1) {
          total -= static_cast<int64_t>(it->nbytes());
          kept_.erase(it);
          break;
        }
      }
      if (kept_.size() >= kMaxKept || total > kMaxKeptBytes) return;
    }
    kept_.push_back(storage);
  }

  std::mutex mutex_;
  std::vector<c10::Storage> kept_;
};

}  // namespace pararnn
