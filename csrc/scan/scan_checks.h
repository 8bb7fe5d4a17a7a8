// Input checks of pararnn::scan shared by the CPU and CUDA dispatch (messages name what was expected).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace pararnn {

constexpr int64_t kScanMaxBlock = 4;

// Returns K after checking A [B, T, K, K, N], b [B, T, K, N], h0 [B, K, N].
inline int64_t check_scan_inputs(const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& h0) {
  TORCH_CHECK(b.dim() == 4, "pararnn::scan: b must be [B, T, K, N], got ", b.dim(), " dims ", b.sizes());
  const int64_t B = b.size(0), T = b.size(1), K = b.size(2), N = b.size(3);
  TORCH_CHECK(K >= 1 && K <= kScanMaxBlock, "pararnn::scan: block size K must be 1..", kScanMaxBlock, ", got ", K);
  TORCH_CHECK(A.dim() == 5 && A.size(0) == B && A.size(1) == T && A.size(2) == K && A.size(3) == K && A.size(4) == N,
              "pararnn::scan: A must be [B, T, K, K, N] = [", B, ", ", T, ", ", K, ", ", K, ", ", N, "] to match b, got ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == b.scalar_type(), "pararnn::scan: A and b must have one dtype, got ", A.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(A.device() == b.device(), "pararnn::scan: A and b must be on one device, got ", A.device(), " and ",
              b.device());
  if (h0.has_value()) {
    const at::Tensor& h = *h0;
    TORCH_CHECK(h.dim() == 3 && h.size(0) == B && h.size(1) == K && h.size(2) == N,
                "pararnn::scan: h0 must be [B, K, N] = [", B, ", ", K, ", ", N, "], got ", h.sizes());
    TORCH_CHECK(h.scalar_type() == b.scalar_type() && h.device() == b.device(),
                "pararnn::scan: h0 must have the dtype and device of b (", b.scalar_type(), ", ", b.device(),
                "), got ", h.scalar_type(), ", ", h.device());
  }
  return K;
}

inline void check_scan_output(const at::Tensor& b, const at::Tensor& out) {
  TORCH_CHECK(out.sizes() == b.sizes() && out.scalar_type() == b.scalar_type() && out.device() == b.device() &&
                  out.is_contiguous(),
              "pararnn::scan: out must be a contiguous ", b.scalar_type(), " tensor of shape ", b.sizes(), " on ",
              b.device(), ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device(),
              out.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace pararnn
