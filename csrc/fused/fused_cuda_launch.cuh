// extern "C" launchers of the fused CUDA kernels for one cell, over raw pointers (no torch headers).
//
// PR_FUSED_CUDA_CELL(name, struct) defines pr_fused_cuda_{forward,adjoint}_<name>_<dtype> for
// f32, f64, f16 and bf16 IO (fp16/bf16 computed in fp32). A translation unit includes this file and
// one or more generated cell sources (pararnn_core.codegen.cell_sources(cell).text("cuda")), then
// instantiates them: csrc/fused_cuda.cu does so for the built-in cells; any other cell the same way.
#pragma once
#include <cuda_runtime.h>

#include "fused_kernels.cuh"

namespace pararnn_fused_launch {

// 64 threads x 8 steps: tiles of 512 steps with the chunk in registers
constexpr int kThreads = 64;
constexpr int kChunk = 8;

template <class Cell, typename TI, typename TC>
cudaError_t launch_forward(const TI* u, const TI* params, const TI* bias, const TI* h0, const uint8_t* resets, TI* traj,
                           int* iterations, int64_t batch, int64_t steps, int64_t channels, int max_its, double tol,
                           cudaStream_t stream) {
    if (batch * channels == 0 || steps == 0) return cudaSuccess;
    pararnn_fused::fused_newton_forward<Cell, TI, TC, kThreads, kChunk>
        <<<static_cast<unsigned>(batch * channels), kThreads, 0, stream>>>(
            u, params, bias, h0, resets, traj, iterations, batch, steps, channels, max_its, static_cast<TC>(tol));
    return cudaGetLastError();
}

template <class Cell, typename TI, typename TC>
cudaError_t launch_adjoint(const TI* u, const TI* params, const TI* bias, const TI* h0, const uint8_t* resets,
                           const TI* traj, const TI* grad, TI* du, TI* dparams, TI* dbias, TI* dh0, int64_t batch,
                           int64_t steps, int64_t channels, cudaStream_t stream) {
    if (channels == 0) return cudaSuccess;
    pararnn_fused::fused_adjoint<Cell, TI, TC, kThreads, kChunk><<<static_cast<unsigned>(channels), kThreads, 0, stream>>>(
        u, params, bias, h0, resets, traj, grad, du, dparams, dbias, dh0, batch, steps, channels);
    return cudaGetLastError();
}

}  // namespace pararnn_fused_launch

#define PR_FUSED_CUDA_ENTRY(NAME, CELL, SUFFIX, TI, TC)                                                           \
    extern "C" cudaError_t pr_fused_cuda_forward_##NAME##_##SUFFIX(                                               \
        const TI* u, const TI* params, const TI* bias, const TI* h0, const uint8_t* resets, TI* traj,             \
        int* iterations, int64_t batch, int64_t steps, int64_t channels, int max_its, double tol,                \
        cudaStream_t stream) {                                                                                     \
        return pararnn_fused_launch::launch_forward<CELL, TI, TC>(u, params, bias, h0, resets, traj, iterations, batch, steps,          \
                                            channels, max_its, tol, stream);                                       \
    }                                                                                                              \
    extern "C" cudaError_t pr_fused_cuda_adjoint_##NAME##_##SUFFIX(                                               \
        const TI* u, const TI* params, const TI* bias, const TI* h0, const uint8_t* resets, const TI* traj,       \
        const TI* grad, TI* du, TI* dparams, TI* dbias, TI* dh0, int64_t batch, int64_t steps, int64_t channels,  \
        cudaStream_t stream) {                                                                                     \
        return pararnn_fused_launch::launch_adjoint<CELL, TI, TC>(u, params, bias, h0, resets, traj, grad, du, dparams, dbias, dh0,     \
                                            batch, steps, channels, stream);                                       \
    }

#define PR_FUSED_CUDA_CELL(NAME, CELL)                          \
    PR_FUSED_CUDA_ENTRY(NAME, CELL, f32, float, float)          \
    PR_FUSED_CUDA_ENTRY(NAME, CELL, f64, double, double)        \
    PR_FUSED_CUDA_ENTRY(NAME, CELL, f16, __half, float)         \
    PR_FUSED_CUDA_ENTRY(NAME, CELL, bf16, __nv_bfloat16, float)

