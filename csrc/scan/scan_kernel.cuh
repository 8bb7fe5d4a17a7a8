// Structured linear scan on a GPU, plain CUDA (no torch headers).
//
//   forward:  h_t = A_t h_{t-1} + b_t,  h_0 = h0 (or 0)
//   reverse:  h_t = A_t h_{t+1} + b_t,  h_{T+1} = h0 (or 0)
//
// A [B, T, K, K, N], b and h [B, T, K, N], h0 [B, K, N], all contiguous: one K x K block per channel and
// time step (K = 1: diagonal).
//
// Layout (csrc/common/pr_cuda_common.cuh): a block is kLanes consecutive channels of one batch row
// (threadIdx.x) by GROUPS time groups (threadIdx.y), so every warp-wide load and store covers consecutive
// channels of one time step (coalesced). The sequence is cut in tiles of GROUPS * CHUNK steps (in scan order:
// from the end for reverse). In a tile, each thread composes its CHUNK steps in registers into one affine map;
// the groups publish their maps in shared memory; each thread applies the maps of the earlier groups to the
// state carried into the tile, replays its chunk and writes h. Every thread also applies all the tile's maps
// to the carry, so the next tile's carry needs no further exchange.
//
// This header holds only templates; scan_cuda.cu launches them (the one place with the geometry) and
// tests/emulation compiles scan_cuda.cu itself with g++.
#pragma once

#include "../common/pr_cuda_common.cuh"

namespace pararnn {

using pr_cuda::kLanes;

// S: storage type of A, b, h0, h; C: compute type (float for half/bfloat16 storage).
// Launch: grid.x = B * ceil(N / kLanes), block (kLanes, GROUPS).
template <typename S, typename C, int K, int GROUPS, int CHUNK>
__global__ void __launch_bounds__(kLanes* GROUPS)
    structured_scan_kernel(const S* __restrict__ A, const S* __restrict__ b, const S* __restrict__ h0,
                           S* __restrict__ h, int64_t T, int64_t N, int reverse) {
  __shared__ pr_cuda::GroupMaps<K, GROUPS, C> maps;

  const int64_t blocks = (N + kLanes - 1) / kLanes;
  const int64_t batch = blockIdx.x / blocks, channel = (blockIdx.x % blocks) * kLanes + threadIdx.x;
  const int lane = threadIdx.x, group = threadIdx.y;
  const bool active = channel < N;
  constexpr int64_t kTile = int64_t(GROUPS) * CHUNK;

  C carry[K];
#pragma unroll
  for (int i = 0; i < K; ++i) carry[i] = active && h0 ? pr_cuda::load<C>(h0, (batch * K + i) * N + channel) : C(0);

  for (int64_t s0 = 0; s0 < T; s0 += kTile) {
    // 1. this thread's CHUNK steps (identity past the end) and their composed map
    C a_reg[CHUNK][K * K], b_reg[CHUNK][K], P[K * K], v[K];
    pr_cuda::affine_identity<K>(P, v);
#pragma unroll
    for (int c = 0; c < CHUNK; ++c) {
      const int64_t s = s0 + group * CHUNK + c;
      const int64_t t = reverse ? T - 1 - s : s;
      const bool valid = active && s < T;
#pragma unroll
      for (int i = 0; i < K; ++i) {
#pragma unroll
        for (int j = 0; j < K; ++j)
          a_reg[c][i * K + j] = valid ? pr_cuda::load<C>(A, ((batch * T + t) * K * K + i * K + j) * N + channel) : C(i == j);
        b_reg[c][i] = valid ? pr_cuda::load<C>(b, ((batch * T + t) * K + i) * N + channel) : C(0);
      }
      pr_cuda::affine_then<K>(P, v, a_reg[c], b_reg[c]);
    }
    // 2. publish; every thread then reads the maps of the groups before it (and all of them for the carry)
    if (s0 > 0) __syncthreads();  // the previous tile is done reading the maps
    maps.publish(group, lane, P, v);
    __syncthreads();
    C state[K];
#pragma unroll
    for (int i = 0; i < K; ++i) state[i] = carry[i];
    maps.apply_range(0, group, lane, state);
    maps.apply_range(0, GROUPS, lane, carry);
    // 3. replay the chunk and write h
#pragma unroll
    for (int c = 0; c < CHUNK; ++c) {
      const int64_t s = s0 + group * CHUNK + c;
      pr_cuda::affine_apply<K>(a_reg[c], b_reg[c], state);
      if (active && s < T) {
        const int64_t t = reverse ? T - 1 - s : s;
#pragma unroll
        for (int i = 0; i < K; ++i) pr_cuda::store(h, ((batch * T + t) * K + i) * N + channel, state[i]);
      }
    }
  }
}

}  // namespace pararnn
