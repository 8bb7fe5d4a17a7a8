// Raw-pointer entry points of the fused CUDA kernels (fused_driver_glue.cu), shared with the torch glue
// (fused_cuda_glue.cpp). No torch headers: the .cu side is plain CUDA.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pararnn {

enum class FusedDtype { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
constexpr int kFusedDtypes = 4;

// The kernels of one cell on one device: the built-in cell compiled into the extension (builtin >= 0),
// or the NVRTC-compiled kernels' CUfunction handles, kFusedDtypes x fused_cuda_kernel_count() of them
// in the order of fused_cuda_kernel_names.
struct FusedCudaCell {
  int builtin = -1;
  std::vector<void*> functions;
  int K = 0, G = 0, P = 0;
};

// Inputs of one call: u [B, T, G, N], params [P, N], bias [G, N] or null, h0 [B, K, N] or null,
// resets [B, T] bytes or null; contiguous device pointers of the dtype's storage type.
struct FusedCudaProblem {
  FusedDtype dtype;
  const void* u;
  const void* params;
  const void* bias;
  const void* h0;
  const uint8_t* resets;
  int64_t batch, steps, channels;
};

// index of a built-in cell ("gru", "lstm", "mgu") compiled into the extension, or -1
int fused_cuda_builtin(const std::string& name);
// kernels per dtype of an NVRTC-compiled cell, and their NVRTC name expressions for the cell's struct
int fused_cuda_kernel_count();
std::vector<std::string> fused_cuda_kernel_names(const std::string& cell_struct);

// traj [B, T, K, N]; iterations and residual [B, N] per sequence
cudaError_t fused_cuda_forward(const FusedCudaCell& cell, const FusedCudaProblem& pb, void* traj, int* iterations,
                               float* residual, int max_its, double tol, double damping, cudaStream_t stream);
size_t fused_cuda_adjoint_workspace_bytes(const FusedCudaCell& cell, const FusedCudaProblem& pb);
// du [B, T, G, N], dparams [P, N], dbias [G, N], dh0 [B, K, N] or null; workspace of the size above
cudaError_t fused_cuda_adjoint(const FusedCudaCell& cell, const FusedCudaProblem& pb, const void* traj,
                               const void* grad, void* du, void* dparams, void* dbias, void* dh0, void* workspace,
                               cudaStream_t stream);

}  // namespace pararnn
