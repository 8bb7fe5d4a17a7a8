// CUDA launcher of the structured scan (plain CUDA: raw pointers, no torch headers). The launch geometry
// lives here only; tests/emulation compiles this file unmodified and calls launch_structured_scan.
#include <cuda_runtime.h>

#include "scan_cuda.h"
#include "scan_kernel.cuh"

namespace pararnn {

namespace {

// blocks of 32 channels x 8 time groups, 4 steps per thread: tiles of 32 steps
constexpr int kGroups = 8;
constexpr int kChunk = 4;

template <typename S, typename C, int K>
cudaError_t launch_k(const void* A, const void* b, const void* h0, void* h, int64_t B, int64_t T, int64_t N,
                     bool reverse, cudaStream_t stream) {
  const int64_t blocks = B * ((N + kLanes - 1) / kLanes);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  int reverse_flag = reverse ? 1 : 0;
  void* args[] = {&A, &b, &h0, &h, &T, &N, &reverse_flag};
  return cudaLaunchKernel(structured_scan_kernel<S, C, K, kGroups, kChunk>, dim3(static_cast<unsigned>(blocks)),
                          dim3(kLanes, kGroups), args, 0, stream);
}

template <typename S, typename C>
cudaError_t launch_typed(const void* A, const void* b, const void* h0, void* h, int64_t B, int64_t T, int64_t N,
                         int K, bool reverse, cudaStream_t stream) {
  switch (K) {
    case 1: return launch_k<S, C, 1>(A, b, h0, h, B, T, N, reverse, stream);
    case 2: return launch_k<S, C, 2>(A, b, h0, h, B, T, N, reverse, stream);
    case 3: return launch_k<S, C, 3>(A, b, h0, h, B, T, N, reverse, stream);
    case 4: return launch_k<S, C, 4>(A, b, h0, h, B, T, N, reverse, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_structured_scan(ScanDtype dtype, const void* A, const void* b, const void* h0, void* h, int64_t B,
                                   int64_t T, int64_t N, int K, bool reverse, cudaStream_t stream) {
  if (B * N == 0 || T == 0) return cudaSuccess;
  switch (dtype) {
    case ScanDtype::kFloat32: return launch_typed<float, float>(A, b, h0, h, B, T, N, K, reverse, stream);
    case ScanDtype::kFloat64: return launch_typed<double, double>(A, b, h0, h, B, T, N, K, reverse, stream);
    case ScanDtype::kFloat16: return launch_typed<__half, float>(A, b, h0, h, B, T, N, K, reverse, stream);
    case ScanDtype::kBFloat16: return launch_typed<__nv_bfloat16, float>(A, b, h0, h, B, T, N, K, reverse, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pararnn
