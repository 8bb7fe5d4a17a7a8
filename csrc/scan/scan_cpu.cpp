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
#include <vector>

#include "scan_checks.h"

namespace pararnn {
namespace {

// channels per work item: long contiguous rows keep the hardware prefetcher streaming
constexpr int64_t kChannelBlock = 256;
// steps ahead to prefetch: each step touches rows K*N apart, too far for the prefetcher to follow alone
constexpr int64_t kPrefetchSteps = 8;

// Where the K x K blocks, right-hand sides and outputs live: one base pointer per
// block entry plus element strides, so that the stacked layout (A [B, T, K, K, N])
// and separate per-entry tensors ([B, T, N] each, no stacking copy) share one kernel.
template <typename S, int K>
struct ScanOperands {
  const S* A[K][K];
  const S* b[K];
  const S* h0[K];  // entries null when there is no initial value
  S* h[K];
  int64_t a_step, bh_step;  // elements between time steps (per batch row: T * step)
  int64_t h0_batch;         // elements between batch rows of h0
};

template <typename S, typename C, int K>
void scan_block(const ScanOperands<S, K>& op, int64_t batch, int64_t T, int64_t n0, int64_t width, bool reverse) {
  C state[K][kChannelBlock];
  for (int i = 0; i < K; ++i)
    for (int64_t n = 0; n < width; ++n) state[i][n] = op.h0[i] ? C(op.h0[i][batch * op.h0_batch + n0 + n]) : C(0);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t a_at = (batch * T + t) * op.a_step + n0, bh_at = (batch * T + t) * op.bh_step + n0;
    if (s + kPrefetchSteps < T) {
      const int64_t ahead = reverse ? -kPrefetchSteps : kPrefetchSteps;
      for (int64_t n = 0; n < width; n += 64 / int64_t(sizeof(S))) {
        for (int i = 0; i < K; ++i) {
          for (int j = 0; j < K; ++j) __builtin_prefetch(op.A[i][j] + a_at + ahead * op.a_step + n);
          __builtin_prefetch(op.b[i] + bh_at + ahead * op.bh_step + n);
        }
      }
    }
    C next[K][kChannelBlock];
    for (int i = 0; i < K; ++i) {
      const S* b_i = op.b[i] + bh_at;
      for (int64_t n = 0; n < width; ++n) next[i][n] = C(b_i[n]);
      for (int j = 0; j < K; ++j) {
        const S* a_ij = op.A[i][j] + a_at;
        for (int64_t n = 0; n < width; ++n) next[i][n] += C(a_ij[n]) * state[j][n];
      }
    }
    for (int i = 0; i < K; ++i) {
      S* h_i = op.h[i] + bh_at;
      for (int64_t n = 0; n < width; ++n) {
        state[i][n] = next[i][n];
        h_i[n] = S(next[i][n]);
      }
    }
  }
}

template <typename S, typename C, int K>
void scan_all(const ScanOperands<S, K>& op, int64_t B, int64_t T, int64_t N, bool reverse) {
  const int64_t blocks_per_row = (N + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, B * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t batch = item / blocks_per_row, n0 = item % blocks_per_row * kChannelBlock;
      scan_block<S, C, K>(op, batch, T, n0, std::min(kChannelBlock, N - n0), reverse);
    }
  });
}

// stacked layout: A [B, T, K, K, N], b and h [B, T, K, N], h0 [B, K, N]
template <typename S, int K>
ScanOperands<S, K> stacked_operands(const at::Tensor& A, const at::Tensor& b, const S* h0, at::Tensor& h) {
  const int64_t N = b.size(3);
  ScanOperands<S, K> op;
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) op.A[i][j] = A.data_ptr<S>() + (i * K + j) * N;
    op.b[i] = b.data_ptr<S>() + i * N;
    op.h[i] = h.data_ptr<S>() + i * N;
    op.h0[i] = h0 ? h0 + i * N : nullptr;
  }
  op.a_step = K * K * N;
  op.bh_step = K * N;
  op.h0_batch = K * N;
  return op;
}

template <typename S, typename C>
void dispatch_block_size(int64_t K, const at::Tensor& A, const at::Tensor& b, const S* h0, at::Tensor& h,
                         bool reverse) {
  const int64_t B = b.size(0), T = b.size(1), N = b.size(3);
  switch (K) {
    case 1: scan_all<S, C, 1>(stacked_operands<S, 1>(A, b, h0, h), B, T, N, reverse); break;
    case 2: scan_all<S, C, 2>(stacked_operands<S, 2>(A, b, h0, h), B, T, N, reverse); break;
    case 3: scan_all<S, C, 3>(stacked_operands<S, 3>(A, b, h0, h), B, T, N, reverse); break;
    default: scan_all<S, C, 4>(stacked_operands<S, 4>(A, b, h0, h), B, T, N, reverse); break;
  }
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
    dispatch_block_size<scalar_t, C>(K, A, b, h0.has_value() ? h0->data_ptr<scalar_t>() : nullptr, h, reverse);
  });
  return h;
}

at::Tensor scan_cpu(const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& h0, bool reverse) {
  at::Tensor h = at::empty_like(b, at::MemoryFormat::Contiguous);
  return scan_cpu_out(A, b, h0, reverse, h);
}

// separate entries: A = K*K tensors [B, T, N] (row-major blocks), b = K tensors [B, T, N]
template <typename S, typename C, int K>
void scan_entries_typed(const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& b,
                        const std::vector<at::Tensor>& h, bool reverse) {
  const int64_t B = b[0].size(0), T = b[0].size(1), N = b[0].size(2);
  ScanOperands<S, K> op;
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) op.A[i][j] = A[i * K + j].data_ptr<S>();
    op.b[i] = b[i].data_ptr<S>();
    op.h[i] = h[i].data_ptr<S>();
    op.h0[i] = nullptr;
  }
  op.a_step = op.bh_step = N;
  op.h0_batch = 0;
  scan_all<S, C, K>(op, B, T, N, reverse);
}

std::vector<at::Tensor> scan_entries_cpu(at::TensorList A_in, at::TensorList b_in, bool reverse) {
  const int64_t K = static_cast<int64_t>(b_in.size());
  TORCH_CHECK(K >= 1 && K <= kScanMaxBlock, "pararnn::scan_entries: 1..", kScanMaxBlock, " entries of b, got ", K);
  TORCH_CHECK(static_cast<int64_t>(A_in.size()) == K * K, "pararnn::scan_entries: A must hold K*K = ", K * K,
              " tensors (row-major blocks), got ", A_in.size());
  std::vector<at::Tensor> A, b, h;
  for (const auto& x : A_in) A.push_back(x.contiguous());
  for (const auto& x : b_in) b.push_back(x.contiguous());
  for (const auto& x : A) {
    TORCH_CHECK(x.sizes() == b[0].sizes() && x.scalar_type() == b[0].scalar_type() && x.dim() == 3,
                "pararnn::scan_entries: every entry must be [B, T, N] = ", b[0].sizes(), " of dtype ",
                b[0].scalar_type(), ", got ", x.sizes(), " ", x.scalar_type());
  }
  for (const auto& x : b) {
    TORCH_CHECK(x.sizes() == b[0].sizes() && x.scalar_type() == b[0].scalar_type(),
                "pararnn::scan_entries: every entry of b must be ", b[0].sizes(), " ", b[0].scalar_type());
    h.push_back(at::empty_like(x, at::MemoryFormat::Contiguous));
  }
  if (b[0].numel() == 0) return h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b[0].scalar_type(), "pararnn_scan_entries_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    switch (K) {
      case 1: scan_entries_typed<scalar_t, C, 1>(A, b, h, reverse); break;
      case 2: scan_entries_typed<scalar_t, C, 2>(A, b, h, reverse); break;
      case 3: scan_entries_typed<scalar_t, C, 3>(A, b, h, reverse); break;
      default: scan_entries_typed<scalar_t, C, 4>(A, b, h, reverse); break;
    }
  });
  return h;
}

}  // namespace
}  // namespace pararnn

TORCH_LIBRARY_IMPL(pararnn, CPU, m) {
  m.impl("scan", &pararnn::scan_cpu);
  m.impl("scan.out", &pararnn::scan_cpu_out);
  m.impl("scan_entries", &pararnn::scan_entries_cpu);
}
