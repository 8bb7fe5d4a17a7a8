// Host entry of the CUDA structured scan (shared by scan_cuda.cu and its torch glue).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pararnn {

enum class ScanDtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// A [B, T, K, K, N], b and h [B, T, K, N], h0 [B, K, N] or null; contiguous device pointers.
cudaError_t launch_structured_scan(ScanDtype dtype, const void* A, const void* b, const void* h0, void* h, int64_t B,
                                   int64_t T, int64_t N, int K, bool reverse, cudaStream_t stream);

}  // namespace pararnn
