// CUDA dispatch of pararnn::fused_forward / fused_backward and the registration of a cell's CUDA kernels.
//
// A cell key maps, per device, to the built-in kernels compiled into this extension (csrc/fused/fused_cuda.cu)
// or to NVRTC-compiled kernels whose CUfunction handles Python registered (pararnn_torch/nvrtc.py). Either
// way the launch goes through the same geometry code (fused_driver_glue.cu) on torch's current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "fused_cuda_glue.h"
#include "fused_glue.h"

namespace pararnn {
namespace {

std::mutex cuda_registry_mutex;

std::map<std::pair<std::string, int64_t>, FusedCudaCell>& cuda_cells() {
  static std::map<std::pair<std::string, int64_t>, FusedCudaCell> table;
  return table;
}

FusedCudaCell with_shape(FusedCudaCell cell, at::IntArrayRef shape, const char* op) {
  const FusedCellShape sizes = fused_shape_from(op, shape);
  cell.K = static_cast<int>(sizes.K);
  cell.G = static_cast<int>(sizes.G);
  cell.P = static_cast<int>(sizes.P);
  return cell;
}

// Registers the compiled-in kernels of built-in cell `name` for key on every device; false if not compiled in.
bool use_builtin(const std::string& key, const std::string& name, at::IntArrayRef shape) {
  FusedCudaCell cell;
  cell.builtin = fused_cuda_builtin(name);
  if (cell.builtin < 0) return false;
  cell = with_shape(std::move(cell), shape, "pararnn::fused_use_builtin_cuda");
  register_fused_shape(key, FusedCellShape{cell.K, cell.G, cell.P});
  const std::lock_guard<std::mutex> lock(cuda_registry_mutex);
  cuda_cells().insert_or_assign({key, -1}, std::move(cell));
  return true;
}

// Registers NVRTC-compiled kernels of key on one device: CUfunction handles (as integers) in the order of
// fused_cuda_kernel_names, loaded in that device's primary context.
void register_cuda(const std::string& key, at::IntArrayRef shape, int64_t device, at::IntArrayRef functions) {
  const size_t expected = static_cast<size_t>(kFusedDtypes * fused_cuda_kernel_count());
  TORCH_CHECK(functions.size() == expected, "pararnn::fused_register_cuda: expected ", expected,
              " kernel handles (", kFusedDtypes, " dtypes x ", fused_cuda_kernel_count(), " kernels), got ",
              functions.size());
  FusedCudaCell cell = with_shape(FusedCudaCell{}, shape, "pararnn::fused_register_cuda");
  for (const int64_t f : functions) {
    TORCH_CHECK(f != 0, "pararnn::fused_register_cuda: a kernel handle is null");
    cell.functions.push_back(reinterpret_cast<void*>(static_cast<uintptr_t>(f)));
  }
  register_fused_shape(key, FusedCellShape{cell.K, cell.G, cell.P});
  const std::lock_guard<std::mutex> lock(cuda_registry_mutex);
  cuda_cells().insert_or_assign({key, device}, std::move(cell));
}

std::vector<std::string> kernel_names(const std::string& cell_struct) { return fused_cuda_kernel_names(cell_struct); }

FusedCudaCell cuda_cell_of(const std::string& key, int64_t device) {
  const std::lock_guard<std::mutex> lock(cuda_registry_mutex);
  auto found = cuda_cells().find({key, device});
  if (found == cuda_cells().end()) found = cuda_cells().find({key, -1});
  TORCH_CHECK(found != cuda_cells().end(), "pararnn fused op: no CUDA kernels registered for cell key '", key,
              "' on cuda:", device, "; run the cell through pararnn_torch.fused.solve_fused "
              "(or fused_unavailable_reason) on that device first");
  return found->second;
}

FusedDtype to_fused_dtype(const char* op, at::ScalarType type) {
  switch (type) {
    case at::kFloat: return FusedDtype::kFloat32;
    case at::kDouble: return FusedDtype::kFloat64;
    case at::kHalf: return FusedDtype::kFloat16;
    case at::kBFloat16: return FusedDtype::kBFloat16;
    default: TORCH_CHECK(false, op, " on CUDA supports float32, float64, float16, bfloat16; got ", type);
  }
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

FusedCudaProblem problem_of(const char* op, const FusedOperands& in) {
  return FusedCudaProblem{to_fused_dtype(op, in.u.scalar_type()), in.u.data_ptr(), in.recurrent.data_ptr(),
                          ptr_or_null(in.bias), ptr_or_null(in.h0), resets_or_null(in), in.batch, in.steps,
                          in.channels};
}

void check_status(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(status),
              status == cudaErrorNoKernelImageForDevice
                  ? " (the extension holds no code for this GPU: rebuild it with TORCH_CUDA_ARCH_LIST set to this "
                    "GPU's compute capability)"
                  : "");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(
    const at::Tensor& u_in, const at::Tensor& recurrent_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& h0_in, const std::optional<at::Tensor>& resets_in, c10::string_view cell_key,
    int64_t max_its, double tol, double damping) {
  const char* op = "pararnn::fused_forward";
  const std::string key(cell_key);
  const FusedCellShape shape = fused_shape(key);
  const c10::cuda::CUDAGuard guard(u_in.device());
  TORCH_CHECK(max_its >= 1, op, ": max_its must be at least 1, got ", max_its);
  TORCH_CHECK(damping > 0 && damping <= 1, op, ": damping must be in (0, 1], got ", damping);
  const FusedOperands in = fused_operands(op, shape, u_in, recurrent_in, bias_in, h0_in, resets_in);
  const FusedCudaCell cell = cuda_cell_of(key, u_in.device().index());
  at::Tensor traj = at::empty({in.batch, in.steps, shape.K, in.channels}, in.u.options());
  at::Tensor iterations = at::zeros({in.batch, in.channels}, in.u.options().dtype(at::kInt));
  at::Tensor residual = at::zeros({in.batch, in.channels}, in.u.options().dtype(at::kFloat));
  if (traj.numel() == 0) return {traj, iterations, residual};
  check_status(op, fused_cuda_forward(cell, problem_of(op, in), traj.data_ptr(), iterations.data_ptr<int>(),
                                      residual.data_ptr<float>(), static_cast<int>(max_its), tol, damping,
                                      c10::cuda::getCurrentCUDAStream().stream()));
  return {traj, iterations, residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cuda(
    const at::Tensor& u_in, const at::Tensor& recurrent_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& h0_in, const std::optional<at::Tensor>& resets_in, const at::Tensor& traj_in,
    const at::Tensor& grad_in, c10::string_view cell_key) {
  const char* op = "pararnn::fused_backward";
  const std::string key(cell_key);
  const FusedCellShape shape = fused_shape(key);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const FusedOperands in = fused_operands(op, shape, u_in, recurrent_in, bias_in, h0_in, resets_in);
  const at::Tensor traj = trajectory_operand(op, "traj", traj_in, in, shape.K);
  const at::Tensor grad = trajectory_operand(op, "grad", grad_in, in, shape.K);
  const FusedCudaCell cell = cuda_cell_of(key, u_in.device().index());
  at::Tensor d_u = at::empty_like(in.u);
  at::Tensor d_rec = at::empty_like(in.recurrent);
  at::Tensor d_bias = at::empty({shape.G, in.channels}, in.u.options());
  at::Tensor d_h0 = at::zeros({in.batch, shape.K, in.channels}, in.u.options());
  if (in.batch * in.steps * in.channels == 0) {
    d_u.zero_();
    d_rec.zero_();
    d_bias.zero_();
    return {d_u, d_rec, d_bias, d_h0};
  }
  const FusedCudaProblem pb = problem_of(op, in);
  const size_t workspace_bytes = fused_cuda_adjoint_workspace_bytes(cell, pb);
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, in.u.options().dtype(at::kByte));
  check_status(op, fused_cuda_adjoint(cell, pb, traj.data_ptr(), grad.data_ptr(), d_u.data_ptr(), d_rec.data_ptr(),
                                      d_bias.data_ptr(), in.h0.has_value() ? d_h0.data_ptr() : nullptr,
                                      workspace_bytes ? workspace.data_ptr() : nullptr,
                                      c10::cuda::getCurrentCUDAStream().stream()));
  return {d_u, d_rec, d_bias, d_h0};
}

}  // namespace
}  // namespace pararnn

TORCH_LIBRARY_FRAGMENT(pararnn, m) {
  // the compiled-in kernels of a built-in cell for key (false when this build has none of that name)
  m.def("fused_use_builtin_cuda(str cell_key, str builtin, int[] shape) -> bool", &pararnn::use_builtin);
  // NVRTC-compiled kernels of key on one device: CUfunction handles in the order of fused_cuda_kernel_names
  m.def("fused_register_cuda(str cell_key, int[] shape, int device, int[] functions) -> ()",
        &pararnn::register_cuda);
  // NVRTC name expressions of the kernels for a generated cell struct: dtypes f32, f64, f16, bf16 x kernels
  m.def("fused_cuda_kernel_names(str cell_struct) -> str[]", &pararnn::kernel_names);
}

TORCH_LIBRARY_IMPL(pararnn, CUDA, m) {
  m.impl("fused_forward", &pararnn::fused_forward_cuda);
  m.impl("fused_backward", &pararnn::fused_backward_cuda);
}
