// Launch of the fused CUDA kernels of a registered cell (plain CUDA: raw pointers, no torch headers).
//
// Built-in cells call the extern "C" entry points fused_cuda.cu instantiates with NvccLauncher; an
// NVRTC-compiled cell goes through DriverLauncher, which hands the very same geometry code
// (fused_cuda_launch.cuh: run_fused_forward / run_fused_adjoint) to cuLaunchKernel with the cell's
// CUfunction handles. cuLaunchKernel is looked up through the runtime (cudaGetDriverEntryPoint), so
// the extension does not link libcuda; <cuda.h> is used for its types only.
#include <cuda.h>

#include "fused_cuda_glue.h"
#include "fused_cuda_launch.cuh"

namespace pararnn {
namespace {

using pararnn_fused_launch::FusedKernel;
constexpr FusedKernel kKernels[] = {FusedKernel::forward, FusedKernel::adjoint, FusedKernel::reduce_params};
constexpr int kKernelCount = sizeof(kKernels) / sizeof(kKernels[0]);
const char* const kDtypeSuffix[kFusedDtypes] = {"f32", "f64", "f16", "bf16"};

// ---- built-in cells: the entry points of fused_cuda.cu ----------------------------------------------

using ForwardEntry = cudaError_t (*)(const void*, const void*, const void*, const void*, const uint8_t*, void*, int*,
                                     float*, int64_t, int64_t, int64_t, int, double, double, cudaStream_t);
using WorkspaceEntry = size_t (*)(int64_t, int64_t, int64_t);
using AdjointEntry = cudaError_t (*)(const void*, const void*, const void*, const void*, const uint8_t*, const void*,
                                     const void*, void*, void*, void*, void*, void*, int64_t, int64_t, int64_t,
                                     cudaStream_t);

struct BuiltinEntries {
  ForwardEntry forward;
  WorkspaceEntry workspace;
  AdjointEntry adjoint;
};

struct BuiltinCell {
  const char* name;
  BuiltinEntries by_dtype[kFusedDtypes];
};

}  // namespace
}  // namespace pararnn

#define PR_DECLARE_BUILTIN_ENTRY(NAME, SUFFIX)                                                                       \
  extern "C" cudaError_t pr_fused_cuda_forward_##NAME##_##SUFFIX(const void*, const void*, const void*, const void*, \
                                                                 const uint8_t*, void*, int*, float*, int64_t,       \
                                                                 int64_t, int64_t, int, double, double,              \
                                                                 cudaStream_t);                                      \
  extern "C" size_t pr_fused_cuda_adjoint_workspace_##NAME##_##SUFFIX(int64_t, int64_t, int64_t);                   \
  extern "C" cudaError_t pr_fused_cuda_adjoint_##NAME##_##SUFFIX(                                                    \
      const void*, const void*, const void*, const void*, const uint8_t*, const void*, const void*, void*, void*,   \
      void*, void*, void*, int64_t, int64_t, int64_t, cudaStream_t);
#define PR_DECLARE_BUILTIN(NAME)          \
  PR_DECLARE_BUILTIN_ENTRY(NAME, f32)     \
  PR_DECLARE_BUILTIN_ENTRY(NAME, f64)     \
  PR_DECLARE_BUILTIN_ENTRY(NAME, f16)     \
  PR_DECLARE_BUILTIN_ENTRY(NAME, bf16)
#define PR_BUILTIN_ENTRIES(NAME, SUFFIX)                                                 \
  {                                                                                      \
    &pr_fused_cuda_forward_##NAME##_##SUFFIX, &pr_fused_cuda_adjoint_workspace_##NAME##_##SUFFIX, \
        &pr_fused_cuda_adjoint_##NAME##_##SUFFIX                                         \
  }
#define PR_BUILTIN(NAME)                                                                                     \
  {                                                                                                          \
    #NAME, {                                                                                                 \
      PR_BUILTIN_ENTRIES(NAME, f32), PR_BUILTIN_ENTRIES(NAME, f64), PR_BUILTIN_ENTRIES(NAME, f16),           \
          PR_BUILTIN_ENTRIES(NAME, bf16)                                                                     \
    }                                                                                                        \
  }

PR_DECLARE_BUILTIN(gru)
PR_DECLARE_BUILTIN(lstm)
PR_DECLARE_BUILTIN(mgu)

namespace pararnn {
namespace {

// order = the dtype enum (FusedDtype)
const BuiltinCell kBuiltins[] = {PR_BUILTIN(gru), PR_BUILTIN(lstm), PR_BUILTIN(mgu)};

// ---- NVRTC-compiled cells: cuLaunchKernel on registered handles -----------------------------------------

using LaunchKernel = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  CUstream, void**, void**);

LaunchKernel driver_launch_kernel() {
  static const LaunchKernel resolved = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t status = cudaGetDriverEntryPointByVersion("cuLaunchKernel", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint("cuLaunchKernel", &fn, cudaEnableDefault, &found);
#endif
    return (status == cudaSuccess && found == cudaDriverEntryPointSuccess) ? reinterpret_cast<LaunchKernel>(fn)
                                                                           : nullptr;
  }();
  return resolved;
}

// Launcher policy of fused_cuda_launch.cuh over the CUfunctions of one cell and dtype (kernel order kKernels).
class DriverLauncher {
 public:
  explicit DriverLauncher(void* const* functions) : functions_(functions) {}

  cudaError_t launch(FusedKernel which, dim3 grid, dim3 block, size_t shared_bytes, void** args,
                     cudaStream_t stream) const {
    const LaunchKernel launch_kernel = driver_launch_kernel();
    if (launch_kernel == nullptr) return cudaErrorSymbolNotFound;
    const CUresult status =
        launch_kernel(static_cast<CUfunction>(functions_[static_cast<int>(which)]), grid.x, grid.y, grid.z, block.x,
                      block.y, block.z, static_cast<unsigned>(shared_bytes), reinterpret_cast<CUstream>(stream),
                      args, nullptr);
    // the runtime's error codes equal the driver's (e.g. 209 = no kernel image, 701 = out of resources)
    return static_cast<cudaError_t>(status);
  }

 private:
  void* const* functions_;
};

DriverLauncher driver_launcher(const FusedCudaCell& cell, FusedDtype dtype) {
  return DriverLauncher(cell.functions.data() + static_cast<int>(dtype) * kKernelCount);
}

const BuiltinEntries& builtin_entries(const FusedCudaCell& cell, FusedDtype dtype) {
  return kBuiltins[cell.builtin].by_dtype[static_cast<int>(dtype)];
}

bool usable(const FusedCudaCell& cell) {
  const int builtins = static_cast<int>(sizeof(kBuiltins) / sizeof(kBuiltins[0]));
  return cell.builtin >= 0 ? cell.builtin < builtins
                           : cell.functions.size() == static_cast<size_t>(kFusedDtypes * kKernelCount);
}

}  // namespace

int fused_cuda_builtin(const std::string& name) {
  for (int i = 0; i < static_cast<int>(sizeof(kBuiltins) / sizeof(kBuiltins[0])); ++i)
    if (name == kBuiltins[i].name) return i;
  return -1;
}

int fused_cuda_kernel_count() { return kKernelCount; }

std::vector<std::string> fused_cuda_kernel_names(const std::string& cell_struct) {
  std::vector<std::string> names;
  for (const char* dtype : kDtypeSuffix)
    for (const FusedKernel which : kKernels)
      names.push_back(pararnn_fused_launch::nvrtc_name_expression(which, cell_struct, dtype));
  return names;
}

cudaError_t fused_cuda_forward(const FusedCudaCell& cell, const FusedCudaProblem& pb, void* traj, int* iterations,
                               float* residual, int max_its, double tol, double damping, cudaStream_t stream) {
  if (!usable(cell)) return cudaErrorInvalidValue;
  if (cell.builtin >= 0)
    return builtin_entries(cell, pb.dtype)
        .forward(pb.u, pb.params, pb.bias, pb.h0, pb.resets, traj, iterations, residual, pb.batch, pb.steps,
                 pb.channels, max_its, tol, damping, stream);
  DriverLauncher launcher = driver_launcher(cell, pb.dtype);
  return pararnn_fused_launch::run_fused_forward(launcher, pb.u, pb.params, pb.bias, pb.h0, pb.resets, traj,
                                                 iterations, residual, pb.batch, pb.steps, pb.channels, max_its,
                                                 tol, damping, stream);
}

size_t fused_cuda_adjoint_workspace_bytes(const FusedCudaCell& cell, const FusedCudaProblem& pb) {
  if (!usable(cell)) return 0;
  if (cell.builtin >= 0) return builtin_entries(cell, pb.dtype).workspace(pb.batch, pb.steps, pb.channels);
  const size_t compute_bytes = pb.dtype == FusedDtype::kFloat64 ? sizeof(double) : sizeof(float);
  return pararnn_fused_launch::fused_adjoint_workspace_bytes(pb.batch, pb.steps, pb.channels, cell.K, cell.G, cell.P,
                                                             compute_bytes);
}

cudaError_t fused_cuda_adjoint(const FusedCudaCell& cell, const FusedCudaProblem& pb, const void* traj,
                               const void* grad, void* du, void* dparams, void* dbias, void* dh0, void* workspace,
                               cudaStream_t stream) {
  if (!usable(cell)) return cudaErrorInvalidValue;
  if (cell.builtin >= 0)
    return builtin_entries(cell, pb.dtype)
        .adjoint(pb.u, pb.params, pb.bias, pb.h0, pb.resets, traj, grad, du, dparams, dbias, dh0, workspace,
                 pb.batch, pb.steps, pb.channels, stream);
  DriverLauncher launcher = driver_launcher(cell, pb.dtype);
  return pararnn_fused_launch::run_fused_adjoint(launcher, pb.u, pb.params, pb.bias, pb.h0, pb.resets, traj, grad,
                                                 du, dparams, dbias, dh0, workspace, pb.batch, pb.steps, pb.channels,
                                                 stream);
}

}  // namespace pararnn
