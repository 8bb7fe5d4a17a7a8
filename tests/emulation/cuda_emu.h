// CUDA built-ins for compiling unmodified CUDA sources with g++ (see README.md).
// Supported: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncthreads_and/_count, __syncwarp,
// __shfl_sync/__shfl_up_sync/__shfl_down_sync/__shfl_xor_sync (full warps of 32), static __shared__ arrays
// (poisoned before every block), __global__/__device__/__host__/__forceinline__/__launch_bounds__, software
// __half / __nv_bfloat16 with their conversions, and the runtime calls the launchers make (cudaLaunchKernel with
// a kernel pointer and an argument array, cudaGetLastError). cuda_include/ holds stand-ins for the toolkit's
// cuda_runtime.h, cuda_fp16.h and cuda_bf16.h, so host launch code compiles unmodified too.
// Not supported: extern (dynamic) __shared__, atomics, cooperative groups.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu_runtime.h"
#include "soft_half.h"

using dim3 = emu::Dim3;

namespace emu_cuda {
inline const emu::Dim3& block_dim() { return emu::current_launch()->block; }
inline const emu::Dim3& grid_dim() { return emu::current_launch()->grid; }
}  // namespace emu_cuda

#define threadIdx (emu::this_thread_state.thread_idx)
#define blockIdx (emu::this_thread_state.block_idx)
#define blockDim (emu_cuda::block_dim())
#define gridDim (emu_cuda::grid_dim())
#define warpSize (emu::kWarpSize)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// block-shared memory: one instance shared by the threads of the running block (blocks run one at a time);
// the runtime finds these statics in the symbol table, poisons them before every block and sums their size
#define __shared__ static

// the coalescing probe of csrc/common/pr_cuda_common.cuh
#define PR_TRACE_GLOBAL(pointer, bytes, is_store) emu::trace_global(pointer, unsigned(bytes))

inline void __syncthreads() { emu::sync_block(); }
inline int __syncthreads_and(int predicate) {
  return emu::sync_block_count(predicate != 0) == emu::current_launch()->threads;
}
inline int __syncthreads_count(int predicate) { return emu::sync_block_count(predicate != 0); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }

template <class T>
T __shfl_sync(unsigned, T value, int src_lane, int width = 32) {
  return emu::exchange(value, [&](int lane) { return lane / width * width + (src_lane % width); });
}
template <class T>
T __shfl_up_sync(unsigned, T value, unsigned delta, int width = 32) {
  return emu::exchange(value, [&](int lane) { return int(lane % width) >= int(delta) ? lane - int(delta) : lane; });
}
template <class T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
  return emu::exchange(value, [&](int lane) { return int(lane % width) + int(delta) < width ? lane + int(delta) : lane; });
}
template <class T>
T __shfl_xor_sync(unsigned, T value, int mask, int width = 32) {
  return emu::exchange(value, [&](int lane) { return lane ^ mask; });
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ------------------------------------------------------------------ 16-bit floats (bit-exact round to nearest even)

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) { return emu::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{emu::float_to_half(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return emu::bfloat16_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{emu::float_to_bfloat16(f)}; }

// ------------------------------------------------------------------ the runtime calls of the launchers

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719,
                   cudaErrorInvalidConfiguration = 9 };
using cudaStream_t = struct emu_stream*;

namespace emu_cuda {
inline std::string& last_error() {
  static std::string message;
  return message;
}
template <class... P, size_t... I>
void call_with(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}
}  // namespace emu_cuda

// runs the kernel to completion in the emulator; a failure (deadlock, launch limit) is kept for emu_last_error
template <class... P>
cudaError_t cudaLaunchKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args, size_t shared_bytes,
                             cudaStream_t) {
  if (shared_bytes != 0) {
    emu_cuda::last_error() = "the emulator has no dynamic shared memory";
    return cudaErrorInvalidValue;
  }
  const std::string error = emu::launch(emu::function_name(reinterpret_cast<const void*>(kernel)), emu::kCudaLimits,
                                        grid, block, [&] { emu_cuda::call_with(kernel, args, std::index_sequence_for<P...>{}); });
  if (!error.empty()) {
    emu_cuda::last_error() = error;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

extern "C" __attribute__((used, visibility("default"))) const char* emu_last_error() { return emu_cuda::last_error().c_str(); }
