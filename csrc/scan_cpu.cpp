// CPU implementation of pararnn::scan: a sequential sweep over time, vectorised
// over contiguous channels and parallel over (batch, channel block) work items.
//
// On a CPU the scan is memory bound (each element of A and b is read once), so
// the fastest algorithm is the exact O(T) sweep; the parallelism comes from the
// B x N independent sequences. The state of a channel block stays in a small
// local array (registers/L1) and the inner loops over channels vectorise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "scan_checks.h"

namespace pararnn {
namespace {

// channels per work item: long contiguous rows keep the hardware prefetcher streaming
constexpr int64_t kChannelBlock = 256;
// steps ahead to prefetch: each step touches rows K*N apart, too far for the prefetcher to follow alone
constexpr int64_t kPrefetchSteps = 8;

template <typename S, typename C, int K>
void scan_block(const S* A, const S* b, const S* h0, S* h, int64_t batch, int64_t T, int64_t N, int64_t n0,
                int64_t width, bool reverse) {
  C state[K][kChannelBlock];
  for (int i = 0; i < K; ++i)
    for (int64_t n = 0; n < width; ++n) state[i][n] = h0 ? C(h0[(batch * K + i) * N + n0 + n]) : C(0);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const S* a_t = A + (batch * T + t) * K * K * N + n0;
    const S* b_t = b + (batch * T + t) * K * N + n0;
    S* h_t = h + (batch * T + t) * K * N + n0;
    if (s + kPrefetchSteps < T) {
      const int64_t ahead = (reverse ? -kPrefetchSteps : kPrefetchSteps);
      for (int64_t n = 0; n < width; n += 64 / int64_t(sizeof(S))) {
        for (int ij = 0; ij < K * K; ++ij) __builtin_prefetch(a_t + ahead * K * K * N + ij * N + n);
        for (int i = 0; i < K; ++i) __builtin_prefetch(b_t + ahead * K * N + i * N + n);
      }
    }
    C next[K][kChannelBlock];
    for (int i = 0; i < K; ++i) {
      for (int64_t n = 0; n < width; ++n) next[i][n] = C(b_t[i * N + n]);
      for (int j = 0; j < K; ++j) {
        const S* a_ij = a_t + (i * K + j) * N;
        for (int64_t n = 0; n < width; ++n) next[i][n] += C(a_ij[n]) * state[j][n];
      }
    }
    for (int i = 0; i < K; ++i)
      for (int64_t n = 0; n < width; ++n) {
        state[i][n] = next[i][n];
        h_t[i * N + n] = S(next[i][n]);
      }
  }
}

template <typename S, typename C, int K>
void scan_all(const at::Tensor& A, const at::Tensor& b, const S* h0, at::Tensor& h, bool reverse) {
  const int64_t B = b.size(0), T = b.size(1), N = b.size(3);
  const int64_t blocks_per_row = (N + kChannelBlock - 1) / kChannelBlock;
  const S* a_ptr = A.data_ptr<S>();
  const S* b_ptr = b.data_ptr<S>();
  S* h_ptr = h.data_ptr<S>();
  at::parallel_for(0, B * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t batch = item / blocks_per_row, n0 = item % blocks_per_row * kChannelBlock;
      scan_block<S, C, K>(a_ptr, b_ptr, h0, h_ptr, batch, T, N, n0, std::min(kChannelBlock, N - n0), reverse);
    }
  });
}

at::Tensor& scan_cpu_out(const at::Tensor& A_in, const at::Tensor& b_in, const std::optional<at::Tensor>& h0_in,
                         bool reverse, at::Tensor& h) {
  const int64_t K = check_scan_inputs(A_in, b_in, h0_in);
  check_scan_output(b_in, h);
  const at::Tensor A = A_in.contiguous(), b = b_in.contiguous();
  const std::optional<at::Tensor> h0 = h0_in.has_value() ? std::optional<at::Tensor>(h0_in->contiguous()) : h0_in;
  if (b.numel() == 0) return h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "pararnn_scan_cpu", [&] {
    using C = at::opmath_type<scalar_t>;  // float for half/bfloat16 storage
    const scalar_t* h0_ptr = h0.has_value() ? h0->data_ptr<scalar_t>() : nullptr;
    switch (K) {
      case 1: scan_all<scalar_t, C, 1>(A, b, h0_ptr, h, reverse); break;
      case 2: scan_all<scalar_t, C, 2>(A, b, h0_ptr, h, reverse); break;
      case 3: scan_all<scalar_t, C, 3>(A, b, h0_ptr, h, reverse); break;
      default: scan_all<scalar_t, C, 4>(A, b, h0_ptr, h, reverse); break;
    }
  });
  return h;
}

at::Tensor scan_cpu(const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& h0, bool reverse) {
  at::Tensor h = at::empty_like(b, at::MemoryFormat::Contiguous);
  return scan_cpu_out(A, b, h0, reverse, h);
}

}  // namespace
}  // namespace pararnn

TORCH_LIBRARY_IMPL(pararnn, CPU, m) {
  m.impl("scan", &pararnn::scan_cpu);
  m.impl("scan.out", &pararnn::scan_cpu_out);
}
