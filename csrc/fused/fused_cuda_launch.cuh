// Launch geometry of the fused CUDA kernels (the ONLY place that knows it), over raw pointers (no torch).
//
// CONTRACT (stable; pararnn_torch's glue and NVRTC path code against it)
// ----------------------------------------------------------------------
// * enum class FusedKernel { forward, adjoint, reduce_params }: the kernels of one cell and dtype.
// * A launcher policy is any type with
//       cudaError_t launch(FusedKernel which, dim3 grid, dim3 block, size_t shared_bytes, void** args,
//                          cudaStream_t stream);
//   `args` is the kernel's argument array in the cudaLaunchKernel / cuLaunchKernel convention (args[i]
//   points to the i-th argument). NvccLauncher<Cell, TI, TC> launches the nvcc-compiled template instances;
//   an NVRTC launcher maps `which` to the CUfunction named by nvrtc_name_expression(which, ...) and calls
//   cuLaunchKernel(f, grid..., block..., shared_bytes, stream, args, nullptr). Kernel parameters use only
//   pointers, int64_t, int and double, so `args` does not depend on the dtype.
// * run_fused_forward(launcher, u, params, bias, h0, resets, traj, iterations, residual, batch, steps,
//   channels, max_its, tol, damping, stream): Newton solve of every (batch, channel) sequence.
//   iterations [B, N] int32 and residual [B, N] float32 (either may be null) receive per sequence the Newton
//   iterations used and the final max-abs residual; residual > tol (or NaN) means not converged, and
//   traj then holds the last (damped) Newton iterate: the caller applies its failure policy.
// * fused_adjoint_workspace_bytes(batch, steps, channels, K, G, P, compute_bytes): device bytes of the
//   workspace run_fused_adjoint needs (compute_bytes = sizeof(TC): 4, or 8 for double IO); may be 0
//   (then workspace may be null).
// * run_fused_adjoint(launcher, u, params, bias, h0, resets, traj, grad, du, dparams, dbias, dh0, workspace,
//   batch, steps, channels, stream): du [B, T, G, N]; dparams [P, N]; dbias [G, N] and dh0 [B, K, N] may be
//   null (not wanted). Deterministic: per-block partials in the workspace, then one ordered reduction.
// * Null inputs: bias, h0 (zeros) and resets (none) may be null. All arrays contiguous, layouts as in
//   fused_kernels.cuh. Returns cudaErrorInvalidConfiguration when a launch dimension would overflow.
// * nvrtc_name_expression(which, cell_struct, dtype) with dtype "f32", "f64", "f16" or "bf16": the name
//   expression to register with nvrtcAddNameExpression for the program made of fused_kernels.cuh (it
//   includes ../common/pr_cuda_common.cuh and fused_math_cuda.cuh, all compile under NVRTC) followed by the
//   generated cell source; e.g. "pararnn_fused::fused_newton_forward<pr_cell_gru, float, float, 8, 8>".
// * PR_FUSED_CUDA_CELL(name, struct) defines the extern "C" entry points pr_fused_cuda_forward_<name>_<sfx>,
//   pr_fused_cuda_adjoint_<name>_<sfx>, pr_fused_cuda_adjoint_workspace_<name>_<sfx> (sfx f32 f64 f16 bf16)
//   for a cell compiled by nvcc; csrc/fused/fused_cuda.cu does so for the built-in cells.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fused_kernels.cuh"

namespace pararnn_fused_launch {

enum class FusedKernel { forward, adjoint, reduce_params };

// Geometry: blocks of kLanes channels x kGroups time groups, kChunk steps per thread (tiles of 64 steps).
constexpr int kLanes = pr_cuda::kLanes;
constexpr int kGroups = 8;
constexpr int kChunk = 8;
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxGridX = 0x7fffffffLL;

inline int64_t fused_blocks(int64_t batch, int64_t channels) {
    return batch * ((channels + kLanes - 1) / kLanes);
}

// C++ spelling of the IO and compute types of a dtype suffix
inline const char* io_type(const std::string& dtype) {
    if (dtype == "f32") return "float";
    if (dtype == "f64") return "double";
    if (dtype == "f16") return "__half";
    if (dtype == "bf16") return "__nv_bfloat16";
    throw std::invalid_argument("fused CUDA kernels: dtype must be f32, f64, f16 or bf16, got '" + dtype + "'");
}
inline const char* compute_type(const std::string& dtype) {
    io_type(dtype);  // validates
    return dtype == "f64" ? "double" : "float";
}

inline std::string nvrtc_name_expression(FusedKernel which, const std::string& cell_struct, const std::string& dtype) {
    const std::string types = cell_struct + ", " + io_type(dtype) + ", " + compute_type(dtype);
    const std::string geometry = ", " + std::to_string(kGroups) + ", " + std::to_string(kChunk);
    switch (which) {
        case FusedKernel::forward: return "pararnn_fused::fused_newton_forward<" + types + geometry + ">";
        case FusedKernel::adjoint: return "pararnn_fused::fused_adjoint<" + types + geometry + ">";
        case FusedKernel::reduce_params: return "pararnn_fused::fused_reduce_params<" + types + ">";
    }
    throw std::invalid_argument("fused CUDA kernels: unknown FusedKernel");
}

// The nvcc-compiled template instances of one cell and dtype.
template <class Cell, typename TI, typename TC>
struct NvccLauncher {
    cudaError_t launch(FusedKernel which, dim3 grid, dim3 block, size_t shared_bytes, void** args,
                       cudaStream_t stream) {
        switch (which) {
            case FusedKernel::forward:
                return cudaLaunchKernel(pararnn_fused::fused_newton_forward<Cell, TI, TC, kGroups, kChunk>, grid,
                                        block, args, shared_bytes, stream);
            case FusedKernel::adjoint:
                return cudaLaunchKernel(pararnn_fused::fused_adjoint<Cell, TI, TC, kGroups, kChunk>, grid, block,
                                        args, shared_bytes, stream);
            case FusedKernel::reduce_params:
                return cudaLaunchKernel(pararnn_fused::fused_reduce_params<Cell, TI, TC>, grid, block, args,
                                        shared_bytes, stream);
        }
        return cudaErrorInvalidValue;
    }
};

template <class Launcher>
cudaError_t run_fused_forward(Launcher& launcher, const void* u, const void* params, const void* bias,
                              const void* h0, const uint8_t* resets, void* traj, int* iterations, float* residual,
                              int64_t batch, int64_t steps, int64_t channels, int max_its, double tol,
                              double damping, cudaStream_t stream) {
    if (batch <= 0 || channels <= 0 || steps <= 0) return cudaSuccess;
    const int64_t blocks = fused_blocks(batch, channels);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    void* args[] = {&u,     &params, &bias,     &h0,    &resets,  &traj,    &iterations, &residual,
                    &batch, &steps,  &channels, &max_its, &tol, &damping};
    return launcher.launch(FusedKernel::forward, dim3(static_cast<unsigned>(blocks)), dim3(kLanes, kGroups), 0,
                           args, stream);
}

inline size_t fused_adjoint_workspace_bytes(int64_t batch, int64_t steps, int64_t channels, int K, int G, int P,
                                            size_t compute_bytes) {
    (void)steps;
    (void)K;
    if (batch <= 0 || channels <= 0) return 0;
    return static_cast<size_t>(batch) * static_cast<size_t>(P + G) * static_cast<size_t>(channels) * compute_bytes;
}

template <class Launcher>
cudaError_t run_fused_adjoint(Launcher& launcher, const void* u, const void* params, const void* bias,
                              const void* h0, const uint8_t* resets, const void* traj, const void* grad, void* du,
                              void* dparams, void* dbias, void* dh0, void* workspace, int64_t batch, int64_t steps,
                              int64_t channels, cudaStream_t stream) {
    if (channels <= 0 || batch < 0) return cudaSuccess;
    const int64_t blocks = fused_blocks(batch, channels);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    // steps == 0 runs too (the partials and dh0 come out zero); batch == 0 only reduces, to zeros
    if (batch > 0) {
        void* args[] = {&u, &params, &bias, &h0, &resets, &traj, &grad, &du, &workspace, &dh0, &batch, &steps, &channels};
        const cudaError_t status = launcher.launch(FusedKernel::adjoint, dim3(static_cast<unsigned>(blocks)),
                                                   dim3(kLanes, kGroups), 0, args, stream);
        if (status != cudaSuccess) return status;
    }
    void* reduce_args[] = {&workspace, &dparams, &dbias, &batch, &channels};
    const int64_t reduce_blocks = (channels + kReduceThreads - 1) / kReduceThreads;
    return launcher.launch(FusedKernel::reduce_params, dim3(static_cast<unsigned>(reduce_blocks)),
                           dim3(kReduceThreads), 0, reduce_args, stream);
}

}  // namespace pararnn_fused_launch

// extern "C" entry points of one nvcc-compiled cell for one dtype suffix (see the contract above)
#define PR_FUSED_CUDA_ENTRY(NAME, CELL, SUFFIX, TI, TC)                                                          \
    extern "C" cudaError_t pr_fused_cuda_forward_##NAME##_##SUFFIX(                                              \
        const void* u, const void* params, const void* bias, const void* h0, const uint8_t* resets, void* traj,  \
        int* iterations, float* residual, int64_t batch, int64_t steps, int64_t channels, int max_its,           \
        double tol, double damping, cudaStream_t stream) {                                                        \
        pararnn_fused_launch::NvccLauncher<CELL, TI, TC> launcher;                                                \
        return pararnn_fused_launch::run_fused_forward(launcher, u, params, bias, h0, resets, traj, iterations,  \
                                                       residual, batch, steps, channels, max_its, tol, damping,  \
                                                       stream);                                                   \
    }                                                                                                             \
    extern "C" size_t pr_fused_cuda_adjoint_workspace_##NAME##_##SUFFIX(int64_t batch, int64_t steps,            \
                                                                         int64_t channels) {                      \
        return pararnn_fused_launch::fused_adjoint_workspace_bytes(batch, steps, channels, CELL::K, CELL::G,      \
                                                                   CELL::P, sizeof(TC));                          \
    }                                                                                                             \
    extern "C" cudaError_t pr_fused_cuda_adjoint_##NAME##_##SUFFIX(                                              \
        const void* u, const void* params, const void* bias, const void* h0, const uint8_t* resets,              \
        const void* traj, const void* grad, void* du, void* dparams, void* dbias, void* dh0, void* workspace,    \
        int64_t batch, int64_t steps, int64_t channels, cudaStream_t stream) {                                   \
        pararnn_fused_launch::NvccLauncher<CELL, TI, TC> launcher;                                                \
        return pararnn_fused_launch::run_fused_adjoint(launcher, u, params, bias, h0, resets, traj, grad, du,    \
                                                       dparams, dbias, dh0, workspace, batch, steps, channels,   \
                                                       stream);                                                   \
    }

#define PR_FUSED_CUDA_CELL(NAME, CELL)                   \
    PR_FUSED_CUDA_ENTRY(NAME, CELL, f32, float, float)   \
    PR_FUSED_CUDA_ENTRY(NAME, CELL, f64, double, double) \
    PR_FUSED_CUDA_ENTRY(NAME, CELL, f16, __half, float)  \
    PR_FUSED_CUDA_ENTRY(NAME, CELL, bf16, __nv_bfloat16, float)
