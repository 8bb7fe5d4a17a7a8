// Structured linear scan on a GPU, plain CUDA (no torch headers).
//
//   forward:  h_t = A_t h_{t-1} + b_t,  h_0 = h0 (or 0)
//   reverse:  h_t = A_t h_{t+1} + b_t,  h_{T+1} = h0 (or 0)
//
// A [B, T, K, K, N], b and h [B, T, K, N], h0 [B, K, N], all contiguous: one
// K x K block per channel and time step (K = 1: diagonal).
//
// One thread block scans one (batch, channel) sequence. The sequence is cut in
// tiles of blockDim.x * CHUNK steps. In a tile, each thread composes its CHUNK
// steps in registers into one affine map x -> P x + v; lanes combine maps with
// warp shuffles (inclusive Hillis-Steele scan, log2(32) rounds); warps combine
// through shared memory; the state entering the tile is carried from the
// previous tile. Each thread then replays its chunk from its entering state and
// writes h. Work O(T K^3), depth O(T / (blockDim * CHUNK) * (CHUNK + log T)).
//
// This header holds only templates; scan_cuda.cu instantiates them for the
// extension and tests/emulation compiles this same file with g++.
#pragma once

#include <cstdint>

namespace pararnn {

constexpr int kScanMaxWarps = 32;

// storage <-> compute conversions; scan_cuda.cu specialises them for __half and
// __nv_bfloat16 (torch builds with __CUDA_NO_HALF_CONVERSIONS__, so no implicit casts)
template <typename C, typename S>
__device__ __forceinline__ C to_compute(S x) {
  return static_cast<C>(x);
}
template <typename S, typename C>
__device__ __forceinline__ S to_storage(C x) {
  return static_cast<S>(x);
}

// x -> P x + v; `later.then_after(earlier)` is the map of earlier followed by later
template <typename C, int K>
struct AffineMap {
  C P[K][K];
  C v[K];

  __device__ __forceinline__ void set_identity() {
    for (int i = 0; i < K; ++i) {
      v[i] = C(0);
      for (int j = 0; j < K; ++j) P[i][j] = C(i == j);
    }
  }
  __device__ __forceinline__ void then_after(const AffineMap& earlier) {
    C nP[K][K], nv[K];
    for (int i = 0; i < K; ++i) {
      nv[i] = v[i];
      for (int j = 0; j < K; ++j) {
        nv[i] += P[i][j] * earlier.v[j];
        C acc = C(0);
        for (int m = 0; m < K; ++m) acc += P[i][m] * earlier.P[m][j];
        nP[i][j] = acc;
      }
    }
    for (int i = 0; i < K; ++i) {
      v[i] = nv[i];
      for (int j = 0; j < K; ++j) P[i][j] = nP[i][j];
    }
  }
  __device__ __forceinline__ void apply(C h[K]) const {
    C out[K];
    for (int i = 0; i < K; ++i) {
      out[i] = v[i];
      for (int j = 0; j < K; ++j) out[i] += P[i][j] * h[j];
    }
    for (int i = 0; i < K; ++i) h[i] = out[i];
  }
  __device__ __forceinline__ void shuffle_up_from(const AffineMap& mine, unsigned delta) {
    for (int i = 0; i < K; ++i) {
      v[i] = __shfl_up_sync(0xffffffffu, mine.v[i], delta);
      for (int j = 0; j < K; ++j) P[i][j] = __shfl_up_sync(0xffffffffu, mine.P[i][j], delta);
    }
  }
};

// S: storage type of A, b, h0, h; C: compute type (float for half/bfloat16 storage).
// Launch: gridDim.x = B * N, blockDim.x a multiple of 32 and at most 1024.
template <typename S, typename C, int K, int CHUNK>
__global__ void structured_scan_kernel(const S* __restrict__ A, const S* __restrict__ b, const S* __restrict__ h0,
                                       S* __restrict__ h, int64_t T, int64_t N, int reverse) {
  __shared__ C warp_maps[kScanMaxWarps][K * K + K];
  __shared__ C carry[2][K];

  const int64_t seq = blockIdx.x;
  const int64_t batch = seq / N, channel = seq % N;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int threads = blockDim.x, warps = (threads + 31) / 32;
  const int64_t tile_len = int64_t(threads) * CHUNK;
  const int64_t num_tiles = (T + tile_len - 1) / tile_len;

  if (tid < K) carry[0][tid] = h0 ? to_compute<C>(h0[(batch * K + tid) * N + channel]) : C(0);

  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    // 1. this thread's CHUNK steps (identity past the end) and their composed map
    C a_reg[CHUNK][K][K], b_reg[CHUNK][K];
    AffineMap<C, K> mine;
    mine.set_identity();
    for (int c = 0; c < CHUNK; ++c) {
      const int64_t s = tile * tile_len + int64_t(tid) * CHUNK + c;
      const int64_t t = reverse ? T - 1 - s : s;
      AffineMap<C, K> step;
      for (int i = 0; i < K; ++i) {
        for (int j = 0; j < K; ++j) {
          step.P[i][j] = s < T ? to_compute<C>(A[((batch * T + t) * K * K + i * K + j) * N + channel]) : C(i == j);
          a_reg[c][i][j] = step.P[i][j];
        }
        step.v[i] = s < T ? to_compute<C>(b[((batch * T + t) * K + i) * N + channel]) : C(0);
        b_reg[c][i] = step.v[i];
      }
      step.then_after(mine);
      mine = step;
    }
    // 2. inclusive scan of the maps across the warp
    AffineMap<C, K> inclusive = mine;
    for (unsigned delta = 1; delta < 32; delta *= 2) {
      AffineMap<C, K> earlier;
      earlier.shuffle_up_from(inclusive, delta);
      if (lane >= int(delta)) inclusive.then_after(earlier);
    }
    AffineMap<C, K> lane_before;  // map of the lanes before this one in the warp
    lane_before.shuffle_up_from(inclusive, 1);
    __syncthreads();  // the previous tile is done reading warp_maps
    if (lane == 31 || tid == threads - 1) {
      for (int i = 0; i < K; ++i) {
        warp_maps[warp][K * K + i] = inclusive.v[i];
        for (int j = 0; j < K; ++j) warp_maps[warp][i * K + j] = inclusive.P[i][j];
      }
    }
    __syncthreads();
    // 3. state entering this thread's chunk: carry, then earlier warps, then earlier lanes
    C state[K];
    for (int i = 0; i < K; ++i) state[i] = carry[tile & 1][i];
    for (int w = 0; w < warp && w < warps; ++w) {
      C next[K];
      for (int i = 0; i < K; ++i) {
        next[i] = warp_maps[w][K * K + i];
        for (int j = 0; j < K; ++j) next[i] += warp_maps[w][i * K + j] * state[j];
      }
      for (int i = 0; i < K; ++i) state[i] = next[i];
    }
    if (lane > 0) lane_before.apply(state);
    // 4. replay the chunk and write h
    for (int c = 0; c < CHUNK; ++c) {
      const int64_t s = tile * tile_len + int64_t(tid) * CHUNK + c;
      C next[K];
      for (int i = 0; i < K; ++i) {
        next[i] = b_reg[c][i];
        for (int j = 0; j < K; ++j) next[i] += a_reg[c][i][j] * state[j];
      }
      for (int i = 0; i < K; ++i) state[i] = next[i];
      if (s < T) {
        const int64_t t = reverse ? T - 1 - s : s;
        for (int i = 0; i < K; ++i) h[((batch * T + t) * K + i) * N + channel] = to_storage<S>(state[i]);
      }
    }
    if (tid == threads - 1) {
      for (int i = 0; i < K; ++i) carry[(tile + 1) & 1][i] = state[i];
    }
  }
}

}  // namespace pararnn
