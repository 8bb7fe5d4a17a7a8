// CUDA launchers of the structured scan (plain CUDA: raw pointers, no torch headers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "scan_cuda.h"
#include "scan_kernel.cuh"

namespace pararnn {

template <>
__device__ __forceinline__ float to_compute<float, __half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ __half to_storage<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ float to_compute<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_storage<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 4;

template <typename S, typename C>
cudaError_t launch_typed(const void* A, const void* b, const void* h0, void* h, int64_t B, int64_t T, int64_t N,
                         int K, bool reverse, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(B * N)), block(kThreads);
  const S *a_ptr = static_cast<const S*>(A), *b_ptr = static_cast<const S*>(b), *h0_ptr = static_cast<const S*>(h0);
  S* h_ptr = static_cast<S*>(h);
  switch (K) {
    case 1: structured_scan_kernel<S, C, 1, kChunk><<<grid, block, 0, stream>>>(a_ptr, b_ptr, h0_ptr, h_ptr, T, N, reverse); break;
    case 2: structured_scan_kernel<S, C, 2, kChunk><<<grid, block, 0, stream>>>(a_ptr, b_ptr, h0_ptr, h_ptr, T, N, reverse); break;
    case 3: structured_scan_kernel<S, C, 3, kChunk><<<grid, block, 0, stream>>>(a_ptr, b_ptr, h0_ptr, h_ptr, T, N, reverse); break;
    case 4: structured_scan_kernel<S, C, 4, kChunk><<<grid, block, 0, stream>>>(a_ptr, b_ptr, h0_ptr, h_ptr, T, N, reverse); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_structured_scan(ScanDtype dtype, const void* A, const void* b, const void* h0, void* h, int64_t B,
                                   int64_t T, int64_t N, int K, bool reverse, cudaStream_t stream) {
  if (B * N == 0 || T == 0) return cudaSuccess;
  if (B * N > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // one block per sequence on grid.x
  switch (dtype) {
    case ScanDtype::kFloat32: return launch_typed<float, float>(A, b, h0, h, B, T, N, K, reverse, stream);
    case ScanDtype::kFloat64: return launch_typed<double, double>(A, b, h0, h, B, T, N, K, reverse, stream);
    case ScanDtype::kFloat16: return launch_typed<__half, float>(A, b, h0, h, B, T, N, K, reverse, stream);
    case ScanDtype::kBFloat16: return launch_typed<__nv_bfloat16, float>(A, b, h0, h, B, T, N, K, reverse, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pararnn
