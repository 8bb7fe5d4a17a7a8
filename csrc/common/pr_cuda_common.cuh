// What every CUDA kernel of the project shares (scan and fused): integer types under NVRTC, storage <->
// compute conversions, traced global loads/stores, affine maps x -> P x + v, and the channel-lane layout.
//
// Layout (docs/design.md section 5): a block is kLanes consecutive channels (threadIdx.x, one warp wide)
// by some number of time groups (threadIdx.y). Every global array is channel-innermost, so the 32 lanes of
// a warp touch 32 consecutive elements at every access: fully coalesced without staging. Time parallelism
// comes from the time groups (each owns a chunk of steps in registers) combined through shared memory.
//
// Compiles under nvcc, NVRTC (__CUDACC_RTC__: no host headers) and g++ against tests/emulation/cuda_emu.h.
#pragma once

#ifdef __CUDACC_RTC__
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif

#ifdef __CUDACC__  // nvcc and NVRTC; the emulator defines software __half / __nv_bfloat16 itself
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// The emulator defines this to count the 32-byte sectors each warp-wide access touches; on a GPU it is empty.
#ifndef PR_TRACE_GLOBAL
#define PR_TRACE_GLOBAL(pointer, bytes, is_store) ((void)0)
#endif

namespace pr_cuda {

// channels per block: one warp spans consecutive channels
constexpr int kLanes = 32;

// storage -> compute (half and bfloat16 are computed in float; torch builds with __CUDA_NO_HALF_CONVERSIONS__,
// so the conversions are spelled out)
__device__ __forceinline__ float to_compute(float x, float) { return x; }
__device__ __forceinline__ double to_compute(double x, double) { return x; }
__device__ __forceinline__ float to_compute(__half x, float) { return __half2float(x); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 x, float) { return __bfloat162float(x); }
__device__ __forceinline__ int to_compute(int x, int) { return x; }
__device__ __forceinline__ void to_storage(int* out, int x) { *out = x; }
__device__ __forceinline__ void to_storage(float* out, float x) { *out = x; }
__device__ __forceinline__ void to_storage(double* out, double x) { *out = x; }
__device__ __forceinline__ void to_storage(__half* out, float x) { *out = __float2half_rn(x); }
__device__ __forceinline__ void to_storage(__nv_bfloat16* out, float x) { *out = __float2bfloat16_rn(x); }

// every global access of a shipped kernel goes through these two (the emulator measures coalescing here)
template <typename C, typename S>
__device__ __forceinline__ C load(const S* p, int64_t i) {
    PR_TRACE_GLOBAL(p + i, sizeof(S), false);
    return to_compute(p[i], C(0));
}
template <typename S, typename C>
__device__ __forceinline__ void store(S* p, int64_t i, C v) {
    PR_TRACE_GLOBAL(p + i, sizeof(S), true);
    to_storage(p + i, v);
}
__device__ __forceinline__ bool load_flag(const uint8_t* p, int64_t i) {
    PR_TRACE_GLOBAL(p + i, 1, false);
    return p[i] != 0;
}

// Affine maps x -> P x + v with P a K x K row-major array (K = 1: diagonal systems).

template <int K, typename C>
__device__ __forceinline__ void affine_identity(C* P, C* v) {
#pragma unroll
    for (int i = 0; i < K; ++i) {
        v[i] = C(0);
#pragma unroll
        for (int j = 0; j < K; ++j) P[i * K + j] = C(i == j);
    }
}

// x <- P x + v
template <int K, typename C>
__device__ __forceinline__ void affine_apply(const C* P, const C* v, C* x) {
    C out[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
        out[i] = v[i];
#pragma unroll
        for (int j = 0; j < K; ++j) out[i] += P[i * K + j] * x[j];
    }
#pragma unroll
    for (int i = 0; i < K; ++i) x[i] = out[i];
}

// (P, v) <- (P1, v1) o (P, v): the map applying (P, v) first, then (P1, v1)
template <int K, typename C>
__device__ __forceinline__ void affine_then(C* P, C* v, const C* P1, const C* v1) {
    C nP[K * K], nv[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
        nv[i] = v1[i];
#pragma unroll
        for (int j = 0; j < K; ++j) {
            nv[i] += P1[i * K + j] * v[j];
            C acc = C(0);
#pragma unroll
            for (int m = 0; m < K; ++m) acc += P1[i * K + m] * P[m * K + j];
            nP[i * K + j] = acc;
        }
    }
#pragma unroll
    for (int i = 0; i < K * K; ++i) P[i] = nP[i];
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = nv[i];
}

// Maps of the time groups of one block, published in shared memory as [group][entry][lane] (lane innermost:
// no bank conflicts). GROUPS x (K*K + K) x kLanes values.
template <int K, int GROUPS, typename C>
struct GroupMaps {
    C entry[GROUPS][K * K + K][kLanes];

    __device__ __forceinline__ void publish(int group, int lane, const C* P, const C* v) {
#pragma unroll
        for (int i = 0; i < K * K; ++i) entry[group][i][lane] = P[i];
#pragma unroll
        for (int i = 0; i < K; ++i) entry[group][K * K + i][lane] = v[i];
    }
    // x <- map of groups [first, last) applied in order to x (call after the barrier that follows publish)
    __device__ __forceinline__ void apply_range(int first, int last, int lane, C* x) const {
        for (int g = first; g < last; ++g) {
            C P[K * K], v[K];
#pragma unroll
            for (int i = 0; i < K * K; ++i) P[i] = entry[g][i][lane];
#pragma unroll
            for (int i = 0; i < K; ++i) v[i] = entry[g][K * K + i][lane];
            affine_apply<K>(P, v, x);
        }
    }
};

}  // namespace pr_cuda
