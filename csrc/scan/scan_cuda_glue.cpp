// CUDA dispatch of pararnn::scan: checks, then the raw-pointer launcher of scan_cuda.cu on torch's current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "scan_checks.h"
#include "scan_cuda.h"

namespace pararnn {
namespace {

ScanDtype to_scan_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ScanDtype::kFloat32;
    case at::kDouble: return ScanDtype::kFloat64;
    case at::kHalf: return ScanDtype::kFloat16;
    case at::kBFloat16: return ScanDtype::kBFloat16;
    default: TORCH_CHECK(false, "pararnn::scan on CUDA supports float32, float64, float16, bfloat16; got ", type);
  }
}

at::Tensor& scan_cuda_out(const at::Tensor& A_in, const at::Tensor& b_in, const std::optional<at::Tensor>& h0_in,
                          bool reverse, at::Tensor& h) {
  const int64_t K = check_scan_inputs(A_in, b_in, h0_in);
  check_scan_output(b_in, h);
  const c10::cuda::CUDAGuard guard(b_in.device());
  const at::Tensor A = A_in.contiguous(), b = b_in.contiguous();
  const std::optional<at::Tensor> h0 = h0_in.has_value() ? std::optional<at::Tensor>(h0_in->contiguous()) : h0_in;
  const cudaError_t status = launch_structured_scan(
      to_scan_dtype(b.scalar_type()), A.data_ptr(), b.data_ptr(), h0.has_value() ? h0->data_ptr() : nullptr,
      h.data_ptr(), b.size(0), b.size(1), b.size(3), static_cast<int>(K), reverse,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "pararnn::scan CUDA launch failed: ", cudaGetErrorString(status));
  return h;
}

at::Tensor scan_cuda(const at::Tensor& A, const at::Tensor& b, const std::optional<at::Tensor>& h0, bool reverse) {
  at::Tensor h = at::empty_like(b, at::MemoryFormat::Contiguous);
  return scan_cuda_out(A, b, h0, reverse, h);
}

}  // namespace
}  // namespace pararnn

TORCH_LIBRARY_IMPL(pararnn, CUDA, m) {
  m.impl("scan", &pararnn::scan_cuda);
  m.impl("scan.out", &pararnn::scan_cuda_out);
}
