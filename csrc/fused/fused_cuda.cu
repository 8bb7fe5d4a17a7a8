// Fused CUDA kernels of the built-in cells: extern "C" entry points built from fused_cuda_launch.cuh.
#include "fused_cuda_launch.cuh"
#include "../generated/gru_cell.cuh"
#include "../generated/lstm_cell.cuh"
#include "../generated/mgu_cell.cuh"

PR_FUSED_CUDA_CELL(gru, pr_cell_gru)
PR_FUSED_CUDA_CELL(lstm, pr_cell_lstm)
PR_FUSED_CUDA_CELL(mgu, pr_cell_mgu)
