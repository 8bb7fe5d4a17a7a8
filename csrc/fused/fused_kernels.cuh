// Fused CUDA kernels over a generated cell struct (pararnn_core/codegen/printer.py, target "cuda").
//
// fused_newton_forward: one block per (batch, channel) sequence. The sequence is
// cut into tiles of THREADS * CHUNK steps; thread i holds steps [i*CHUNK, (i+1)*CHUNK)
// of the tile in registers across all Newton iterations. Per iteration: residual
// and Jacobian of every step (generated step_jacobian), the thread's chunk composed
// into one affine map, a block-wide inclusive scan of those maps in shared memory,
// the replay giving the new guess, and a block-wide max of the residual as the
// convergence check. The tile's first step starts from the exact state carried
// from the previous tile (or h0), so tiles are solved one after another exactly;
// a tile that misses the tolerance in max_its iterations is redone by an exact
// sequential sweep and reported (iterations = -1), never silently wrong.
//
// fused_adjoint: one block per channel, looping over the batch so parameter
// gradients are reduced over batch and time inside the kernel (deterministic, no
// atomics). Per tile, from the last: lam_t = g_t + mask_{t+1} J_{t+1}^T lam_{t+1}
// as the same scan run backwards, then the generated vjp at every step emits
// dL/du_t, accumulates dL/dparams, dL/dbias and, at restarts, dL/dh0.
//
// Layouts as the CPU kernels (csrc/fused_cpu.h): u [B, T, G, N] (without bias),
// bias [G, N], params [P, N], h0 [B, K, N], resets [B, T] bytes, traj and grad
// [B, T, K, N]. IO type TI (float, double, or __half / __nv_bfloat16 on nvcc),
// compute type TC (float, or double for double IO).
#pragma once
#include <cstdint>

#include "fused_math_cuda.cuh"

namespace pararnn_fused {

template <typename TC, typename TI>
__device__ __forceinline__ TC load(const TI* p, int64_t i) {
    return static_cast<TC>(p[i]);
}
template <typename TI, typename TC>
__device__ __forceinline__ void store(TI* p, int64_t i, TC v) {
    p[i] = static_cast<TI>(v);
}
#ifdef __CUDACC__
}  // namespace pararnn_fused
#include <cuda_bf16.h>
#include <cuda_fp16.h>
namespace pararnn_fused {
template <>
__device__ __forceinline__ float load<float, __half>(const __half* p, int64_t i) {
    return __half2float(p[i]);
}
template <>
__device__ __forceinline__ void store<__half, float>(__half* p, int64_t i, float v) {
    p[i] = __float2half(v);
}
template <>
__device__ __forceinline__ float load<float, __nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
    return __bfloat162float(p[i]);
}
template <>
__device__ __forceinline__ void store<__nv_bfloat16, float>(__nv_bfloat16* p, int64_t i, float v) {
    p[i] = __float2bfloat16(v);
}
#endif

// x <- A x + b for K x K row-major A
template <int K, typename TC>
__device__ __forceinline__ void affine_apply(const TC* A, const TC* b, TC* x) {
    TC out[K];
    for (int i = 0; i < K; ++i) {
        out[i] = b[i];
        for (int j = 0; j < K; ++j) out[i] += A[i * K + j] * x[j];
    }
    for (int i = 0; i < K; ++i) x[i] = out[i];
}

// (A, b) <- (A, b) o (A1, b1), the map applying (A1, b1) first
template <int K, typename TC>
__device__ __forceinline__ void affine_after(TC* A, TC* b, const TC* A1, const TC* b1) {
    TC nA[K * K], nb[K];
    for (int i = 0; i < K; ++i) {
        nb[i] = b[i];
        for (int j = 0; j < K; ++j) {
            nb[i] += A[i * K + j] * b1[j];
            TC s = TC(0);
            for (int m = 0; m < K; ++m) s += A[i * K + m] * A1[m * K + j];
            nA[i * K + j] = s;
        }
    }
    for (int i = 0; i < K * K; ++i) A[i] = nA[i];
    for (int i = 0; i < K; ++i) b[i] = nb[i];
}

// Inclusive scan over block positions 0..THREADS-1: (A, b) of position p becomes M_p o ... o M_0.
template <int K, int THREADS, typename TC>
__device__ void block_affine_scan(TC* A, TC* b, int pos, TC (*shA)[K * K], TC (*shb)[K]) {
    for (int offset = 1; offset < THREADS; offset <<= 1) {
        for (int i = 0; i < K * K; ++i) shA[pos][i] = A[i];
        for (int i = 0; i < K; ++i) shb[pos][i] = b[i];
        __syncthreads();
        if (pos >= offset) affine_after<K>(A, b, shA[pos - offset], shb[pos - offset]);
        __syncthreads();
    }
}

template <int THREADS, typename TC>
__device__ TC block_max(TC v, TC* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        // written so that a NaN anywhere reaches sh[0] (and fails the convergence check)
        if (threadIdx.x < half && !(sh[threadIdx.x + half] <= sh[threadIdx.x])) sh[threadIdx.x] = sh[threadIdx.x + half];
        __syncthreads();
    }
    const TC out = sh[0];
    __syncthreads();
    return out;
}

template <int THREADS, typename TC>
__device__ TC block_sum(TC v, TC* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) sh[threadIdx.x] += sh[threadIdx.x + half];
        __syncthreads();
    }
    const TC out = sh[0];
    __syncthreads();
    return out;
}

template <class Cell, typename TI, typename TC>
__device__ __forceinline__ void load_gates(const TI* u, const TI* bias, int64_t base, int64_t N, int64_t n, TC* g) {
    for (int i = 0; i < Cell::G; ++i) g[i] = load<TC>(u, base + i * N) + (bias ? load<TC>(bias, i * N + n) : TC(0));
}

template <class Cell, typename TI, typename TC, int THREADS, int CHUNK>
__global__ void __launch_bounds__(THREADS) fused_newton_forward(const TI* u, const TI* params, const TI* bias,
                                                                const TI* h0, const uint8_t* resets, TI* traj,
                                                                int* iterations, int64_t batch, int64_t steps,
                                                                int64_t channels, int max_its, TC tol) {
    constexpr int K = Cell::K, G = Cell::G, P = Cell::P > 0 ? Cell::P : 1;
    constexpr int64_t TILE = int64_t(THREADS) * CHUNK;
    __shared__ TC shA[THREADS][K * K];
    __shared__ TC shb[THREADS][K];
    __shared__ TC sh_red[THREADS];
    __shared__ TC sh_carry[K];
    const int64_t N = channels, b = blockIdx.x / N, n = blockIdx.x % N;
    const int tid = threadIdx.x;
    if (b >= batch) return;  // uniform over the block
    TC p[P], start[K], carry[K];
    for (int q = 0; q < Cell::P; ++q) p[q] = load<TC>(params, q * N + n);
    for (int k = 0; k < K; ++k) carry[k] = start[k] = h0 ? load<TC>(h0, (b * K + k) * N + n) : TC(0);
    int most_its = 0;
    for (int64_t t0 = 0; t0 < steps; t0 += TILE) {
        TC h[CHUNK][K], g[CHUNK][G], A[CHUNK][K * K], rhs[CHUNK][K];
        bool restart[CHUNK], valid[CHUNK];
        // guess h_t = f(known start, u_t): the carried state at the tile's first step, h0 elsewhere
        for (int c = 0; c < CHUNK; ++c) {
            const int64_t t = t0 + int64_t(tid) * CHUNK + c;
            valid[c] = t < steps;
            restart[c] = t == 0 || (resets && valid[c] && resets[b * steps + t]);
            for (int i = 0; i < G; ++i) g[c][i] = TC(0);
            if (valid[c]) load_gates<Cell>(u, bias, ((b * steps + t) * G) * N + n, N, n, g[c]);
            Cell::template step<TC>((t == t0 && !restart[c]) ? carry : start, g[c], p, h[c]);
        }
        int its = 0;
        bool converged = false;
        for (; its <= max_its; ++its) {
            // previous state of each step: the thread's own registers, the previous thread's last step, or fixed
            for (int k = 0; k < K; ++k) shb[tid][k] = h[CHUNK - 1][k];
            __syncthreads();
            TC residual = TC(0), prev[K];
            for (int k = 0; k < K; ++k) prev[k] = tid > 0 ? shb[tid - 1][k] : carry[k];
            __syncthreads();
            TC fval[CHUNK][K];
            for (int c = 0; c < CHUNK; ++c) {
                const int64_t t = t0 + int64_t(tid) * CHUNK + c;
                // at a restart or the tile's first step the previous state is known exactly: no Jacobian link
                const bool fixed = restart[c] || t == t0;
                TC s[K], jac[K * K];
                for (int k = 0; k < K; ++k) s[k] = restart[c] ? start[k] : (t == t0 ? carry[k] : prev[k]);
                Cell::template step_jacobian<TC>(s, g[c], p, fval[c], jac);
                for (int k = 0; k < K; ++k) {
                    const TC diff = fval[c][k] > h[c][k] ? fval[c][k] - h[c][k] : h[c][k] - fval[c][k];
                    if (valid[c] && !(diff <= residual)) residual = diff;
                    rhs[c][k] = fval[c][k];
                }
                for (int i = 0; i < K * K; ++i) A[c][i] = fixed ? TC(0) : jac[i];
                // linearised step: h'_t = A_t h'_{t-1} + (f_t - A_t h_{t-1})
                for (int i = 0; i < K; ++i)
                    for (int j = 0; j < K; ++j) rhs[c][i] -= A[c][i * K + j] * s[j];
                for (int k = 0; k < K; ++k) prev[k] = h[c][k];
            }
            residual = block_max<THREADS>(residual, sh_red);
            if (residual <= tol || its == max_its) {
                converged = residual <= tol;
                for (int c = 0; c < CHUNK; ++c)
                    for (int k = 0; k < K; ++k) h[c][k] = fval[c][k];
                break;
            }
            // compose the chunk, scan across the block, replay from the incoming state
            TC sumA[K * K], sumb[K];
            for (int i = 0; i < K * K; ++i) sumA[i] = (i % (K + 1) == 0) ? TC(1) : TC(0);
            for (int i = 0; i < K; ++i) sumb[i] = TC(0);
            for (int c = 0; c < CHUNK; ++c) {
                TC tA[K * K], tb[K];
                for (int i = 0; i < K * K; ++i) tA[i] = A[c][i];
                for (int i = 0; i < K; ++i) tb[i] = rhs[c][i];
                affine_after<K>(tA, tb, sumA, sumb);
                for (int i = 0; i < K * K; ++i) sumA[i] = tA[i];
                for (int i = 0; i < K; ++i) sumb[i] = tb[i];
            }
            block_affine_scan<K, THREADS>(sumA, sumb, tid, shA, shb);
            // the tile's first step is fixed (A = 0), so every inclusive prefix is the constant map to its b
            for (int k = 0; k < K; ++k) shb[tid][k] = sumb[k];
            __syncthreads();
            TC x[K];
            for (int k = 0; k < K; ++k) x[k] = tid > 0 ? shb[tid - 1][k] : carry[k];
            __syncthreads();
            for (int c = 0; c < CHUNK; ++c) {
                affine_apply<K>(A[c], rhs[c], x);
                for (int k = 0; k < K; ++k) h[c][k] = x[k];
            }
        }
        if (!converged) {
            // exact fallback: one thread sweeps the tile sequentially through global memory
            if (tid == 0) {
                TC s[K], gg[G], out[K];
                for (int k = 0; k < K; ++k) s[k] = carry[k];
                for (int64_t t = t0; t < t0 + TILE && t < steps; ++t) {
                    if (t == 0 || (resets && resets[b * steps + t]))
                        for (int k = 0; k < K; ++k) s[k] = start[k];
                    load_gates<Cell>(u, bias, ((b * steps + t) * G) * N + n, N, n, gg);
                    Cell::template step<TC>(s, gg, p, out);
                    for (int k = 0; k < K; ++k) {
                        s[k] = out[k];
                        store(traj, ((b * steps + t) * K + k) * N + n, out[k]);
                    }
                }
            }
            __syncthreads();
            for (int c = 0; c < CHUNK; ++c) {
                const int64_t t = t0 + int64_t(tid) * CHUNK + c;
                if (valid[c])
                    for (int k = 0; k < K; ++k) h[c][k] = load<TC>(traj, ((b * steps + t) * K + k) * N + n);
            }
            most_its = -1;
        } else if (most_its >= 0 && its > most_its) {
            most_its = its;
        }
        for (int c = 0; c < CHUNK; ++c) {
            const int64_t t = t0 + int64_t(tid) * CHUNK + c;
            if (!valid[c]) continue;
            for (int k = 0; k < K; ++k) store(traj, ((b * steps + t) * K + k) * N + n, h[c][k]);
            if (t == (t0 + TILE < steps ? t0 + TILE : steps) - 1)
                for (int k = 0; k < K; ++k) sh_carry[k] = h[c][k];
        }
        __syncthreads();
        for (int k = 0; k < K; ++k) carry[k] = sh_carry[k];
        __syncthreads();
    }
    if (iterations && tid == 0) iterations[b * N + n] = most_its;
}

template <class Cell, typename TI, typename TC, int THREADS, int CHUNK>
__global__ void __launch_bounds__(THREADS) fused_adjoint(const TI* u, const TI* params, const TI* bias, const TI* h0,
                                                         const uint8_t* resets, const TI* traj, const TI* grad,
                                                         TI* du, TI* dparams, TI* dbias, TI* dh0, int64_t batch,
                                                         int64_t steps, int64_t channels) {
    constexpr int K = Cell::K, G = Cell::G, P = Cell::P > 0 ? Cell::P : 1;
    constexpr int64_t TILE = int64_t(THREADS) * CHUNK;
    __shared__ TC shA[THREADS][K * K];
    __shared__ TC shb[THREADS][K];
    __shared__ TC sh_red[THREADS];
    __shared__ TC sh_carry[K];
    const int64_t N = channels, n = blockIdx.x;
    const int tid = threadIdx.x;
    if (n >= N) return;
    TC p[P], dp[P], db[G];
    for (int q = 0; q < Cell::P; ++q) {
        p[q] = load<TC>(params, q * N + n);
        dp[q] = TC(0);
    }
    for (int i = 0; i < G; ++i) db[i] = TC(0);
    const int64_t tiles = (steps + TILE - 1) / TILE;
    for (int64_t b = 0; b < batch; ++b) {
        TC start[K], carry[K], dstart[K];
        for (int k = 0; k < K; ++k) {
            start[k] = h0 ? load<TC>(h0, (b * K + k) * N + n) : TC(0);
            carry[k] = dstart[k] = TC(0);
        }
        auto restart_at = [&](int64_t t) { return t == 0 || (resets && resets[b * steps + t]); };
        auto state_at = [&](int64_t t, TC* s) {  // the state step t starts from
            for (int k = 0; k < K; ++k)
                s[k] = restart_at(t) ? start[k] : load<TC>(traj, ((b * steps + t - 1) * K + k) * N + n);
        };
        for (int64_t tile = tiles - 1; tile >= 0; --tile) {
            const int64_t t0 = tile * TILE, t1 = (t0 + TILE < steps) ? t0 + TILE : steps;
            // reverse recurrence lam_t = A_t lam_{t+1} + g_t with A_t = mask_{t+1} J_{t+1}^T
            TC A[CHUNK][K * K], gv[CHUNK][K];
            for (int c = 0; c < CHUNK; ++c) {
                const int64_t t = t0 + int64_t(tid) * CHUNK + c;
                for (int i = 0; i < K * K; ++i) A[c][i] = TC(0);
                for (int k = 0; k < K; ++k)
                    gv[c][k] = t < t1 ? load<TC>(grad, ((b * steps + t) * K + k) * N + n) : TC(0);
                if (t == t1 - 1)
                    for (int k = 0; k < K; ++k) gv[c][k] += carry[k];
                if (t + 1 < t1 && !restart_at(t + 1)) {
                    TC s[K], g[G], out[K], jac[K * K];
                    state_at(t + 1, s);
                    load_gates<Cell>(u, bias, ((b * steps + t + 1) * G) * N + n, N, n, g);
                    Cell::template step_jacobian<TC>(s, g, p, out, jac);
                    for (int i = 0; i < K; ++i)
                        for (int j = 0; j < K; ++j) A[c][i * K + j] = jac[j * K + i];
                }
            }
            // chunk summary from its last step to its first, then a suffix scan (position = THREADS-1-tid)
            TC sumA[K * K], sumb[K];
            for (int i = 0; i < K * K; ++i) sumA[i] = (i % (K + 1) == 0) ? TC(1) : TC(0);
            for (int i = 0; i < K; ++i) sumb[i] = TC(0);
            for (int c = CHUNK - 1; c >= 0; --c) {
                TC tA[K * K], tb[K];
                for (int i = 0; i < K * K; ++i) tA[i] = A[c][i];
                for (int i = 0; i < K; ++i) tb[i] = gv[c][i];
                affine_after<K>(tA, tb, sumA, sumb);
                for (int i = 0; i < K * K; ++i) sumA[i] = tA[i];
                for (int i = 0; i < K; ++i) sumb[i] = tb[i];
            }
            const int pos = THREADS - 1 - tid;
            block_affine_scan<K, THREADS>(sumA, sumb, pos, shA, shb);
            // the tile's last step has A = 0, so every suffix is the constant map to its b
            for (int k = 0; k < K; ++k) shb[pos][k] = sumb[k];
            __syncthreads();
            TC lam[K];
            for (int k = 0; k < K; ++k) lam[k] = pos > 0 ? shb[pos - 1][k] : TC(0);
            __syncthreads();
            for (int c = CHUNK - 1; c >= 0; --c) {
                const int64_t t = t0 + int64_t(tid) * CHUNK + c;
                affine_apply<K>(A[c], gv[c], lam);
                if (t >= t1) continue;
                TC s[K], g[G], d_s[K], d_u[G], d_p[P];
                state_at(t, s);
                load_gates<Cell>(u, bias, ((b * steps + t) * G) * N + n, N, n, g);
                Cell::template vjp<TC>(s, g, p, lam, d_s, d_u, d_p);
                for (int i = 0; i < G; ++i) {
                    store(du, ((b * steps + t) * G + i) * N + n, d_u[i]);
                    db[i] += d_u[i];
                }
                for (int q = 0; q < Cell::P; ++q) dp[q] += d_p[q];
                const bool restart = restart_at(t);
                for (int k = 0; k < K; ++k)
                    if (restart) dstart[k] += d_s[k];
                if (t == t0)
                    for (int k = 0; k < K; ++k) sh_carry[k] = restart ? TC(0) : d_s[k];
            }
            __syncthreads();
            for (int k = 0; k < K; ++k) carry[k] = sh_carry[k];
            __syncthreads();
        }
        for (int k = 0; k < K; ++k) {
            const TC total = block_sum<THREADS>(dstart[k], sh_red);
            if (dh0 && tid == 0) store(dh0, (b * K + k) * N + n, total);
        }
    }
    for (int q = 0; q < Cell::P; ++q) {
        const TC total = block_sum<THREADS>(dp[q], sh_red);
        if (tid == 0) store(dparams, q * N + n, total);
    }
    for (int i = 0; i < G; ++i) {
        const TC total = block_sum<THREADS>(db[i], sh_red);
        if (dbias && tid == 0) store(dbias, i * N + n, total);
    }
}

}  // namespace pararnn_fused
