// CUDA built-ins for compiling unmodified CUDA kernel sources with g++ (see README.md).
// Supported: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncwarp,
// __shfl_sync/__shfl_up_sync/__shfl_down_sync/__shfl_xor_sync (full warps of 32),
// static __shared__ arrays, __global__/__device__/__host__/__forceinline__ and
// __launch_bounds__. Not supported: extern (dynamic) __shared__, atomics,
// cooperative groups, half/bfloat16 types.
#pragma once

#include <cmath>
#include <cstdint>

#include "emu_runtime.h"

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
// block-shared memory: one instance shared by the threads of the running block
#define __shared__ static

inline void __syncthreads() { emu::sync_block(); }
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
