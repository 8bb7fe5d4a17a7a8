// Fused CPU kernels over a generated cell struct (see pararnn_core/codegen/printer.py).
//
// On a CPU the fastest exact solve is the sequential sweep itself: one pass over
// time with the state in registers, vectorised over contiguous channels and
// parallel over (batch, channel block) work items. The backward pass is the
// reverse adjoint sweep  lam_t = g_t + J_{t+1}^T lam_{t+1}, emitting dL/du_t,
// the per-channel parameter gradients (reduced over batch and time) and dL/dh0.
//
// Layouts (all contiguous, channel-last): u [B, T, G, N] (the projection
// without its bias), bias [G, N] (may be null), traj and grad [B, T, K, N],
// params [P, N], h0 [B, K, N] (may be null: zeros), resets [B, T]
// bytes (may be null): where set, the previous state is h0 instead of traj[t-1].
// The state components of one time step and of h0 share the stride N, so "the
// previous state" is one pointer either way.
//
// Threads: OpenMP when the compiler has it, else std::thread (see parallel_items).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "fused_math_cpu.h"

namespace pararnn_fused {

// channels per work item: 8 AVX-512 / 16 AVX2 vectors of independent work per time step (latency hiding),
// still 8 work items at B=4, N=256 for the cores to share
constexpr int64_t kLanes = 128;

// Work items are handed out one at a time, so when another process holds a core the other threads take
// over its share instead of waiting. With OpenMP (g++ -fopenmp) the items run on the OpenMP thread pool:
// inside a torch process that is torch's own libgomp pool (same soname, loaded once), so the sweep does
// not fight torch's spinning workers for the cores right after a matmul. Without OpenMP (Apple clang),
// std::thread.
template <typename Fn>
void parallel_items(int64_t items, int threads, Fn&& fn) {
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < items; ++i) fn(i);
#else
    std::atomic<int64_t> next{0};
    auto run = [&] {
        for (int64_t i = next++; i < items; i = next++) fn(i);
    };
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int w = 1; w < threads; ++w) pool.emplace_back(run);
    run();
    for (auto& t : pool) t.join();
#endif
}

// Software prefetch of rows [R, N] (channels n0..n0+nb) a few steps ahead of the backward sweep: the hardware
// prefetchers do not follow its descending, strided walk (512 B per row, rows a few KB apart). Measured at
// B=4, T=2048, N=256 on 2 cores: the adjoint sweep 25-30% faster; the forward's ascending walk gains nothing.
constexpr int64_t kPrefetchSteps = 8;
template <int R, int Write, typename T>
inline void prefetch_rows(const T* rows, int64_t N, int64_t nb) {
    for (int r = 0; r < R; ++r)
        for (int64_t j = 0; j < nb; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(rows + r * N + j, Write, 3);
}

template <typename T>
struct Problem {
    const T* u;
    const T* params;
    const T* bias;  // [G, N] added to u inside the sweep (saves a pass over u); may be null
    const T* h0;
    const uint8_t* resets;
    int64_t batch, steps, channels;
};

// rows [R, N] of per-channel values for channels n0..n0+nb into a local [R][kLanes] block (zeros when null)
template <int R, typename T>
void load_rows(T (&out)[R > 0 ? R : 1][kLanes], const T* rows, int64_t N, int64_t n0, int64_t nb) {
    for (int r = 0; r < R; ++r)
        for (int64_t j = 0; j < nb; ++j) out[r][j] = rows ? rows[r * N + n0 + j] : T(0);
}

template <typename Cell, typename T>
void forward_item(const Problem<T>& pb, T* traj, const T* zeros, int64_t b, int64_t n0, int64_t nb) {
    constexpr int K = Cell::K, G = Cell::G, P = Cell::P;
    const int64_t N = pb.channels, steps = pb.steps;
    const T* start = (pb.h0 ? pb.h0 + b * K * N : zeros) + n0;
    T par[P > 0 ? P : 1][kLanes], bias[G][kLanes];
    load_rows<P>(par, pb.params, N, n0, nb);
    load_rows<G>(bias, pb.bias, N, n0, nb);
    for (int64_t t = 0; t < steps; ++t) {
        const bool restart = t == 0 || (pb.resets && pb.resets[b * steps + t]);
        const T* prev = restart ? start : traj + ((b * steps + t - 1) * K) * N + n0;
        const T* ut = pb.u + ((b * steps + t) * G) * N + n0;
        T* out = traj + ((b * steps + t) * K) * N + n0;
#pragma GCC ivdep
        for (int64_t j = 0; j < nb; ++j) {
            T s[K], g[G], p[P > 0 ? P : 1], next[K];
            for (int k = 0; k < K; ++k) s[k] = prev[k * N + j];
            for (int i = 0; i < G; ++i) g[i] = ut[i * N + j] + bias[i][j];
            for (int q = 0; q < P; ++q) p[q] = par[q][j];
            Cell::template step<T>(s, g, p, next);
            for (int k = 0; k < K; ++k) out[k * N + j] = next[k];
        }
    }
}

template <typename Cell, typename T>
void backward_item(const Problem<T>& pb, const T* traj, const T* grad, const T* zeros, T* du, T* partial_of_batch,
                   T* dh0, int64_t b, int64_t n0, int64_t nb) {
    constexpr int K = Cell::K, G = Cell::G, P = Cell::P;
    const int64_t N = pb.channels, steps = pb.steps;
    const T* start = (pb.h0 ? pb.h0 + b * K * N : zeros) + n0;
    T par[P > 0 ? P : 1][kLanes], bias[G][kLanes];
    T dpar[P > 0 ? P : 1][kLanes] = {}, dbias[G][kLanes] = {}, carry[K][kLanes] = {}, dstart[K][kLanes] = {};
    load_rows<P>(par, pb.params, N, n0, nb);
    load_rows<G>(bias, pb.bias, N, n0, nb);
    for (int64_t t = steps - 1; t >= 0; --t) {
        const bool restart = t == 0 || (pb.resets && pb.resets[b * steps + t]);
        const T keep = restart ? T(0) : T(1);  // d prev flows into lam_{t-1}, or into h0 at a restart
        const T* prev = restart ? start : traj + ((b * steps + t - 1) * K) * N + n0;
        const T* ut = pb.u + ((b * steps + t) * G) * N + n0;
        const T* gt = grad + ((b * steps + t) * K) * N + n0;
        T* dut = du + ((b * steps + t) * G) * N + n0;
        if (t >= kPrefetchSteps + 1) {
            const int64_t ahead = b * steps + t - kPrefetchSteps;
            prefetch_rows<G, 0>(pb.u + (ahead * G) * N + n0, N, nb);
            prefetch_rows<K, 0>(traj + ((ahead - 1) * K) * N + n0, N, nb);
            prefetch_rows<K, 0>(grad + (ahead * K) * N + n0, N, nb);
            prefetch_rows<G, 1>(du + (ahead * G) * N + n0, N, nb);
        }
#pragma GCC ivdep
        for (int64_t j = 0; j < nb; ++j) {
            T s[K], g[G], p[P > 0 ? P : 1], lam[K], d_s[K], d_u[G], d_p[P > 0 ? P : 1];
            for (int k = 0; k < K; ++k) {
                s[k] = prev[k * N + j];
                lam[k] = gt[k * N + j] + carry[k][j];
            }
            for (int i = 0; i < G; ++i) g[i] = ut[i * N + j] + bias[i][j];
            for (int q = 0; q < P; ++q) p[q] = par[q][j];
            Cell::template vjp<T>(s, g, p, lam, d_s, d_u, d_p);
            for (int i = 0; i < G; ++i) {
                dut[i * N + j] = d_u[i];
                dbias[i][j] += d_u[i];
            }
            for (int q = 0; q < P; ++q) dpar[q][j] += d_p[q];
            for (int k = 0; k < K; ++k) {
                carry[k][j] = keep * d_s[k];
                dstart[k][j] += (T(1) - keep) * d_s[k];
            }
        }
    }
    // this batch's sums: parameter rows, then bias rows
    for (int q = 0; q < P; ++q)
        for (int64_t j = 0; j < nb; ++j) partial_of_batch[q * N + n0 + j] = dpar[q][j];
    for (int i = 0; i < G; ++i)
        for (int64_t j = 0; j < nb; ++j) partial_of_batch[(P + i) * N + n0 + j] = dbias[i][j];
    if (dh0)
        for (int k = 0; k < K; ++k)
            for (int64_t j = 0; j < nb; ++j) dh0[(b * K + k) * N + n0 + j] = dstart[k][j];
}

template <typename Cell, typename T>
void forward(const Problem<T>& pb, T* traj, int threads) {
    const int64_t blocks = (pb.channels + kLanes - 1) / kLanes;
    std::vector<T> zeros(static_cast<size_t>(Cell::K * pb.channels), T(0));
    parallel_items(pb.batch * blocks, threads, [&](int64_t item) {
        const int64_t b = item / blocks, n0 = (item % blocks) * kLanes;
        forward_item<Cell, T>(pb, traj, zeros.data(), b, n0, std::min(kLanes, pb.channels - n0));
    });
}

template <typename Cell, typename T>
void backward(const Problem<T>& pb, const T* traj, const T* grad, T* du, T* dparams, T* dbias, T* dh0, int threads) {
    constexpr int P = Cell::P, G = Cell::G;
    const int64_t N = pb.channels, blocks = (N + kLanes - 1) / kLanes, rows = (P + G) * N;
    std::vector<T> zeros(static_cast<size_t>(Cell::K * N), T(0));
    // per-batch partial sums, reduced in a fixed order afterwards: deterministic, no atomics
    std::vector<T> partial(static_cast<size_t>(pb.batch * rows), T(0));
    parallel_items(pb.batch * blocks, threads, [&](int64_t item) {
        const int64_t b = item / blocks, n0 = (item % blocks) * kLanes;
        backward_item<Cell, T>(pb, traj, grad, zeros.data(), du, partial.data() + b * rows, dh0, b, n0,
                               std::min(kLanes, N - n0));
    });
    for (int64_t i = 0; i < rows; ++i) {
        T sum = T(0);
        for (int64_t b = 0; b < pb.batch; ++b) sum += partial[b * rows + i];
        if (i < P * N)
            dparams[i] = sum;
        else if (dbias)
            dbias[i - P * N] = sum;
    }
}

}  // namespace pararnn_fused

// The C ABI of one cell's library, loaded with ctypes by pararnn_core/codegen/native.py.
#define PR_FUSED_CPU_ENTRY(CELL, SUFFIX, T)                                                                     \
    extern "C" void pr_fused_forward_##SUFFIX(const T* u, const T* params, const T* bias, const T* h0,           \
                                              const uint8_t* resets, T* traj, int64_t batch, int64_t steps,      \
                                              int64_t channels, int threads) {                                   \
        pararnn_fused::Problem<T> pb{u, params, bias, h0, resets, batch, steps, channels};                       \
        pararnn_fused::forward<CELL, T>(pb, traj, threads);                                                      \
    }                                                                                                            \
    extern "C" void pr_fused_backward_##SUFFIX(const T* u, const T* params, const T* bias, const T* h0,          \
                                               const uint8_t* resets, const T* traj, const T* grad, T* du,       \
                                               T* dparams, T* dbias, T* dh0, int64_t batch, int64_t steps,       \
                                               int64_t channels, int threads) {                                  \
        pararnn_fused::Problem<T> pb{u, params, bias, h0, resets, batch, steps, channels};                       \
        pararnn_fused::backward<CELL, T>(pb, traj, grad, du, dparams, dbias, dh0, threads);                      \
    }

#define PR_FUSED_CPU_LIBRARY(CELL)                                         \
    PR_FUSED_CPU_ENTRY(CELL, f32, float)                                   \
    PR_FUSED_CPU_ENTRY(CELL, f64, double)                                  \
    extern "C" void pr_fused_cell_shape(int32_t* kgp) {                    \
        kgp[0] = CELL::K;                                                  \
        kgp[1] = CELL::G;                                                  \
        kgp[2] = CELL::P;                                                  \
    }
