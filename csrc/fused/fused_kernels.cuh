// Fused CUDA kernels over a generated cell struct (pararnn_core/codegen/printer.py, target "cuda").
//
// Layout (shared with the scan, csrc/common/pr_cuda_common.cuh): a block is pr_cuda::kLanes consecutive
// channels of one batch row (threadIdx.x = lane = channel) by GROUPS time groups (threadIdx.y). Every global
// access of a warp touches 32 consecutive channels of one time step: coalesced without staging.
//
// fused_newton_forward: the sequence is cut into tiles of GROUPS * CHUNK steps; group y holds steps
// [y*CHUNK, (y+1)*CHUNK) of the tile in registers across all Newton iterations. Per iteration: residual
// and Jacobian of every step (generated step_jacobian), the chunk composed into one affine map, the maps of
// the earlier groups applied from the carried state (shared memory), the replay giving the Newton iterate,
// damped: h <- h + damping (h_newton - h). Convergence is per channel (max residual over the tile's groups);
// a converged channel is frozen while the block's other channels iterate. The tile's first step starts from
// the exact state carried from the previous tile (or h0). Per (batch, channel) the kernel reports the Newton
// iterations used (max over tiles) and the final max-abs residual (max over tiles); a sequence with
// residual > tol did not converge and the caller applies its failure policy (the trajectory is the last
// Newton iterate).
//
// fused_adjoint: one block per (batch row, 32 channels), tiles from the last: lam_t = g_t + mask_{t+1}
// J_{t+1}^T lam_{t+1} as the same group scan run backwards, then the generated vjp at every step emits dL/du_t
// and dL/dh0 (at restarts), and accumulates dL/dparams, dL/dbias per thread. Those are summed over the groups
// in a fixed order into per-batch-row partials (workspace [B, P+G, N]); fused_reduce_params sums the partials
// over the batch in order. No atomics: the gradients are bitwise reproducible.
//
// Layouts as the CPU kernels (csrc/fused/fused_cpu.h): u [B, T, G, N] (without bias), bias [G, N],
// params [P, N], h0 [B, K, N], resets [B, T] bytes, traj and grad [B, T, K, N]. IO type TI (float, double,
// __half, __nv_bfloat16), compute type TC (float, or double for double IO). Launch geometry:
// fused_cuda_launch.cuh (the only place that knows it).
#pragma once

#include "../common/pr_cuda_common.cuh"
#include "fused_math_cuda.cuh"

namespace pararnn_fused {

using pr_cuda::kLanes;
using pr_cuda::load;
using pr_cuda::load_flag;
using pr_cuda::store;

// blocks cover channel blocks of one batch row: blockIdx.x = batch_row * channel_blocks + channel_block
__device__ __forceinline__ int64_t channel_blocks(int64_t channels) { return (channels + kLanes - 1) / kLanes; }

template <class Cell, typename TI, typename TC>
__device__ __forceinline__ void load_gates(const TI* u, const TC* bias, int64_t base, int64_t N, TC* g) {
#pragma unroll
    for (int i = 0; i < Cell::G; ++i) g[i] = load<TC>(u, base + i * N) + bias[i];
}

template <class Cell, typename TI, typename TC, int GROUPS, int CHUNK>
__global__ void __launch_bounds__(kLanes* GROUPS)
    fused_newton_forward(const TI* u, const TI* params, const TI* bias, const TI* h0, const uint8_t* resets, TI* traj,
                         int* iterations, float* residual_out, int64_t batch, int64_t steps, int64_t channels,
                         int max_its, double tol_in, double damping_in) {
    constexpr int K = Cell::K, G = Cell::G, P = Cell::P > 0 ? Cell::P : 1;
    constexpr int64_t TILE = int64_t(GROUPS) * CHUNK;
    __shared__ TC sh_last[GROUPS][K][kLanes];  // each group's last state, for the next group's first step
    __shared__ TC sh_residual[GROUPS][kLanes];
    __shared__ TC sh_carry[K][kLanes];  // state at the tile's last step
    __shared__ pr_cuda::GroupMaps<K, GROUPS, TC> maps;

    const int64_t N = channels, blocks = channel_blocks(N);
    const int64_t b = blockIdx.x / blocks, n = (blockIdx.x % blocks) * kLanes + threadIdx.x;
    const int lane = threadIdx.x, group = threadIdx.y;
    const bool active = n < N;  // lanes past the last channel compute on zeros and store nothing
    const TC tol = TC(tol_in), damping = TC(damping_in);
    TC p[P], bias_n[G], start[K], carry[K];
#pragma unroll
    for (int q = 0; q < P; ++q) p[q] = active && Cell::P > 0 ? load<TC>(params, q * N + n) : TC(0);
#pragma unroll
    for (int i = 0; i < G; ++i) bias_n[i] = active && bias ? load<TC>(bias, i * N + n) : TC(0);
#pragma unroll
    for (int k = 0; k < K; ++k) carry[k] = start[k] = active && h0 ? load<TC>(h0, (b * K + k) * N + n) : TC(0);
    int most_its = 0;
    TC worst = TC(0);
    for (int64_t t0 = 0; t0 < steps; t0 += TILE) {
        TC h[CHUNK][K], g[CHUNK][G], A[CHUNK][K * K], rhs[CHUNK][K], fval[CHUNK][K];
        bool restart[CHUNK], valid[CHUNK];
        // guess h_t = f(known start, u_t): the carried state at the tile's first step, h0 elsewhere
#pragma unroll
        for (int c = 0; c < CHUNK; ++c) {
            const int64_t t = t0 + group * CHUNK + c;
            valid[c] = active && t < steps;
            restart[c] = t == 0 || (valid[c] && resets && load_flag(resets, b * steps + t));
#pragma unroll
            for (int i = 0; i < G; ++i) g[c][i] = TC(0);
            if (valid[c]) load_gates<Cell>(u, bias_n, ((b * steps + t) * G) * N + n, N, g[c]);
            const bool from_carry = t == t0 && !restart[c];
            TC s0[K];  // selected element-wise: a selected array pointer would put both arrays in local memory
#pragma unroll
            for (int k = 0; k < K; ++k) s0[k] = from_carry ? carry[k] : start[k];
            Cell::template step<TC>(s0, g[c], p, h[c]);
        }
        bool frozen = !active;
        int its = 0, channel_its = 0;
        TC channel_residual = TC(0);
        for (;; ++its) {
            // previous state of each step: the group's own registers, the previous group's last step, or fixed
#pragma unroll
            for (int k = 0; k < K; ++k) sh_last[group][k][lane] = h[CHUNK - 1][k];
            __syncthreads();
            TC residual = TC(0), prev[K];
#pragma unroll
            for (int k = 0; k < K; ++k) prev[k] = group > 0 ? sh_last[group - 1][k][lane] : carry[k];
#pragma unroll
            for (int c = 0; c < CHUNK; ++c) {
                const int64_t t = t0 + group * CHUNK + c;
                // at a restart or the tile's first step the previous state is known exactly: no Jacobian link
                const bool fixed = restart[c] || t == t0;
                TC s[K], jac[K * K];
#pragma unroll
                for (int k = 0; k < K; ++k) s[k] = restart[c] ? start[k] : (t == t0 ? carry[k] : prev[k]);
                Cell::template step_jacobian<TC>(s, g[c], p, fval[c], jac);
#pragma unroll
                for (int k = 0; k < K; ++k) {
                    const TC diff = fval[c][k] > h[c][k] ? fval[c][k] - h[c][k] : h[c][k] - fval[c][k];
                    if (valid[c] && !(diff <= residual)) residual = diff;  // NaN-propagating max
                    rhs[c][k] = fval[c][k];
                }
#pragma unroll
                for (int i = 0; i < K * K; ++i) A[c][i] = fixed ? TC(0) : jac[i];
                // linearised step: h'_t = A_t h'_{t-1} + (f_t - A_t h_{t-1})
#pragma unroll
                for (int i = 0; i < K; ++i)
#pragma unroll
                    for (int j = 0; j < K; ++j) rhs[c][i] -= A[c][i * K + j] * s[j];
#pragma unroll
                for (int k = 0; k < K; ++k) prev[k] = h[c][k];
            }
            sh_residual[group][lane] = residual;
            __syncthreads();
            if (!frozen) {
                channel_residual = TC(0);
                for (int y = 0; y < GROUPS; ++y)
                    if (!(sh_residual[y][lane] <= channel_residual)) channel_residual = sh_residual[y][lane];
                if (channel_residual <= tol || its == max_its) {
                    frozen = true;  // the converged channel takes the final f (one free Picard step) and stops
                    channel_its = its;
#pragma unroll
                    for (int c = 0; c < CHUNK; ++c)
#pragma unroll
                        for (int k = 0; k < K; ++k) h[c][k] = fval[c][k];
                }
            }
            if (__syncthreads_and(frozen)) break;  // every channel of the block is done
            // compose the chunk, then the maps of the earlier groups from the carried state, and replay
            TC sumP[K * K], sumv[K];
            pr_cuda::affine_identity<K>(sumP, sumv);
#pragma unroll
            for (int c = 0; c < CHUNK; ++c) pr_cuda::affine_then<K>(sumP, sumv, A[c], rhs[c]);
            maps.publish(group, lane, sumP, sumv);
            __syncthreads();
            if (!frozen) {
                TC x[K];
#pragma unroll
                for (int k = 0; k < K; ++k) x[k] = carry[k];
                maps.apply_range(0, group, lane, x);
#pragma unroll
                for (int c = 0; c < CHUNK; ++c) {
                    pr_cuda::affine_apply<K>(A[c], rhs[c], x);
#pragma unroll
                    for (int k = 0; k < K; ++k) h[c][k] += damping * (x[k] - h[c][k]);
                }
            }
        }
        if (channel_its > most_its) most_its = channel_its;
        if (!(channel_residual <= worst)) worst = channel_residual;
        const int64_t last = (t0 + TILE < steps ? t0 + TILE : steps) - 1;
#pragma unroll
        for (int c = 0; c < CHUNK; ++c) {
            const int64_t t = t0 + group * CHUNK + c;
            if (valid[c])
#pragma unroll
                for (int k = 0; k < K; ++k) store(traj, ((b * steps + t) * K + k) * N + n, h[c][k]);
            if (t == last)
#pragma unroll
                for (int k = 0; k < K; ++k) sh_carry[k][lane] = h[c][k];
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < K; ++k) carry[k] = sh_carry[k][lane];
    }
    if (active && group == 0) {
        if (iterations) store(iterations, b * N + n, most_its);
        if (residual_out) store(residual_out, b * N + n, float(worst));
    }
}

// rows of per-thread parameter-gradient partials summed over a block's groups per round of the reduction
constexpr int kReduceRows = 8;

template <class Cell, typename TI, typename TC, int GROUPS, int CHUNK>
__global__ void __launch_bounds__(kLanes* GROUPS)
    fused_adjoint(const TI* u, const TI* params, const TI* bias, const TI* h0, const uint8_t* resets, const TI* traj,
                  const TI* grad, TI* du, TC* partials, TI* dh0, int64_t batch, int64_t steps, int64_t channels) {
    constexpr int K = Cell::K, G = Cell::G, P = Cell::P > 0 ? Cell::P : 1;
    // per-thread sums: parameter rows, bias rows, then h0 rows
    constexpr int ROWS = Cell::P + G + K;
    constexpr int64_t TILE = int64_t(GROUPS) * CHUNK;
    __shared__ TC sh_carry[K][kLanes];  // d_s of the tile's first step: enters the previous tile's last lam
    __shared__ TC sh_sum[kReduceRows][GROUPS][kLanes];
    __shared__ pr_cuda::GroupMaps<K, GROUPS, TC> maps;

    const int64_t N = channels, blocks = channel_blocks(N);
    const int64_t b = blockIdx.x / blocks, n = (blockIdx.x % blocks) * kLanes + threadIdx.x;
    const int lane = threadIdx.x, group = threadIdx.y;
    const bool active = n < N;
    TC p[P], bias_n[G], start[K], carry[K], sums[ROWS];
#pragma unroll
    for (int q = 0; q < P; ++q) p[q] = active && Cell::P > 0 ? load<TC>(params, q * N + n) : TC(0);
#pragma unroll
    for (int i = 0; i < G; ++i) bias_n[i] = active && bias ? load<TC>(bias, i * N + n) : TC(0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
        start[k] = active && h0 ? load<TC>(h0, (b * K + k) * N + n) : TC(0);
        carry[k] = TC(0);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) sums[r] = TC(0);
    auto restart_at = [&](int64_t t) { return t == 0 || (resets && load_flag(resets, b * steps + t)); };
    auto state_at = [&](int64_t t, TC* s) {  // the state step t starts from
        const bool restart = restart_at(t);
#pragma unroll
        for (int k = 0; k < K; ++k) s[k] = restart ? start[k] : load<TC>(traj, ((b * steps + t - 1) * K + k) * N + n);
    };
    const int64_t tiles = (steps + TILE - 1) / TILE;
    for (int64_t tile = tiles - 1; tile >= 0; --tile) {
        const int64_t t0 = tile * TILE, t1 = (t0 + TILE < steps) ? t0 + TILE : steps;
        // reverse recurrence lam_t = A_t lam_{t+1} + g_t with A_t = mask_{t+1} J_{t+1}^T
        TC A[CHUNK][K * K], gv[CHUNK][K];
#pragma unroll
        for (int c = 0; c < CHUNK; ++c) {
            const int64_t t = t0 + group * CHUNK + c;
            const bool valid = active && t < t1;
#pragma unroll
            for (int i = 0; i < K * K; ++i) A[c][i] = TC(0);
#pragma unroll
            for (int k = 0; k < K; ++k) gv[c][k] = valid ? load<TC>(grad, ((b * steps + t) * K + k) * N + n) : TC(0);
            if (t == t1 - 1)
#pragma unroll
                for (int k = 0; k < K; ++k) gv[c][k] += carry[k];
            if (active && t + 1 < t1 && !restart_at(t + 1)) {
                TC s[K], gates[G], out[K], jac[K * K];
                state_at(t + 1, s);
                load_gates<Cell>(u, bias_n, ((b * steps + t + 1) * G) * N + n, N, gates);
                Cell::template step_jacobian<TC>(s, gates, p, out, jac);
#pragma unroll
                for (int i = 0; i < K; ++i)
#pragma unroll
                    for (int j = 0; j < K; ++j) A[c][i * K + j] = jac[j * K + i];
            }
        }
        // chunk map from its last step to its first; groups published in scan order (the last group first)
        TC sumP[K * K], sumv[K];
        pr_cuda::affine_identity<K>(sumP, sumv);
#pragma unroll
        for (int c = CHUNK - 1; c >= 0; --c) pr_cuda::affine_then<K>(sumP, sumv, A[c], gv[c]);
        const int position = GROUPS - 1 - group;
        maps.publish(position, lane, sumP, sumv);
        __syncthreads();
        // the tile's last step has A = 0 (its successor's contribution is in the carry), so lam starts at 0
        TC lam[K];
#pragma unroll
        for (int k = 0; k < K; ++k) lam[k] = TC(0);
        maps.apply_range(0, position, lane, lam);
#pragma unroll
        for (int c = CHUNK - 1; c >= 0; --c) {
            const int64_t t = t0 + group * CHUNK + c;
            pr_cuda::affine_apply<K>(A[c], gv[c], lam);
            if (!active || t >= t1) continue;
            TC s[K], gates[G], d_s[K], d_u[G], d_p[P];
            state_at(t, s);
            load_gates<Cell>(u, bias_n, ((b * steps + t) * G) * N + n, N, gates);
            Cell::template vjp<TC>(s, gates, p, lam, d_s, d_u, d_p);
#pragma unroll
            for (int i = 0; i < G; ++i) {
                store(du, ((b * steps + t) * G + i) * N + n, d_u[i]);
                sums[Cell::P + i] += d_u[i];
            }
#pragma unroll
            for (int q = 0; q < Cell::P; ++q) sums[q] += d_p[q];
            const bool restart = restart_at(t);
            if (restart)
#pragma unroll
                for (int k = 0; k < K; ++k) sums[Cell::P + G + k] += d_s[k];
            if (t == t0)
#pragma unroll
                for (int k = 0; k < K; ++k) sh_carry[k][lane] = restart ? TC(0) : d_s[k];
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < K; ++k) carry[k] = sh_carry[k][lane];
    }
    // sum the groups' rows in a fixed order: parameter and bias rows into this batch row's partials, h0 rows
    // straight into dh0
#pragma unroll
    for (int r0 = 0; r0 < ROWS; r0 += kReduceRows) {
        if (r0 > 0) __syncthreads();  // the previous round is done reading sh_sum
#pragma unroll
        for (int j = 0; j < kReduceRows; ++j)
            if (r0 + j < ROWS) sh_sum[j][group][lane] = sums[r0 + j < ROWS ? r0 + j : 0];
        __syncthreads();
        for (int j = group; j < kReduceRows; j += GROUPS) {
            const int r = r0 + j;
            if (r >= ROWS || !active) continue;
            TC total = TC(0);
            for (int y = 0; y < GROUPS; ++y) total += sh_sum[j][y][lane];
            if (r < Cell::P + G)
                store(partials, (b * (Cell::P + G) + r) * N + n, total);
            else if (dh0)
                store(dh0, (b * K + (r - Cell::P - G)) * N + n, total);
        }
    }
}

// dparams [P, N] and dbias [G, N] = sum over batch rows, in order, of partials [B, P+G, N]; one thread per
// channel (consecutive threads on consecutive channels) for every row. batch == 0 writes zeros.
template <class Cell, typename TI, typename TC>
__global__ void __launch_bounds__(256) fused_reduce_params(const TC* partials, TI* dparams, TI* dbias, int64_t batch,
                                                           int64_t channels) {
    constexpr int ROWS = Cell::P + Cell::G;
    const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n >= channels) return;
    for (int row = 0; row < ROWS; ++row) {
        TC total = TC(0);
        for (int64_t b = 0; b < batch; ++b) total += load<TC>(partials, (b * ROWS + row) * channels + n);
        if (row < Cell::P)
            store(dparams, row * channels + n, total);
        else if (dbias)
            store(dbias, (row - Cell::P) * channels + n, total);
    }
}

}  // namespace pararnn_fused
