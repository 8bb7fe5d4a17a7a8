// The fused ops' registry, input checks and CPU implementation.
//
// On the CPU a cell's kernels are the exact sequential sweep and its adjoint (csrc/fused/fused_cpu.h),
// compiled at first use into a small shared library per cell (pararnn_core/codegen/native.py) that
// Python loads and whose entry points it registers here (pararnn::fused_register_cpu). The op calls
// them directly: no Python on the call path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "fused_glue.h"
#include "output_pool.h"

namespace pararnn {
namespace {

std::mutex registry_mutex;

OutputPool& output_pool() {
  static OutputPool pool;
  return pool;
}

std::unordered_map<std::string, FusedCellShape>& shapes() {
  static std::unordered_map<std::string, FusedCellShape> table;
  return table;
}

// The C ABI of a cell's CPU library (PR_FUSED_CPU_ENTRY in fused_cpu.h).
template <typename T>
using CpuForward = void (*)(const T* u, const T* params, const T* bias, const T* h0, const uint8_t* resets, T* traj,
                            int64_t batch, int64_t steps, int64_t channels, int threads);
template <typename T>
using CpuBackward = void (*)(const T* u, const T* params, const T* bias, const T* h0, const uint8_t* resets,
                             const T* traj, const T* grad, T* du, T* dparams, T* dbias, T* dh0, int64_t batch,
                             int64_t steps, int64_t channels, int threads);

struct CpuKernels {
  CpuForward<float> forward_f32 = nullptr;
  CpuForward<double> forward_f64 = nullptr;
  CpuBackward<float> backward_f32 = nullptr;
  CpuBackward<double> backward_f64 = nullptr;

  template <typename T>
  CpuForward<T> forward() const {
    if constexpr (std::is_same_v<T, float>) return forward_f32; else return forward_f64;
  }
  template <typename T>
  CpuBackward<T> backward() const {
    if constexpr (std::is_same_v<T, float>) return backward_f32; else return backward_f64;
  }
};

std::unordered_map<std::string, CpuKernels>& cpu_kernels() {
  static std::unordered_map<std::string, CpuKernels> table;
  return table;
}

template <typename Fn>
Fn to_function(int64_t address) {
  TORCH_CHECK(address != 0, "pararnn::fused_register_cpu: a kernel address is null");
  return reinterpret_cast<Fn>(static_cast<uintptr_t>(address));
}

// functions: addresses of pr_fused_forward_f32, pr_fused_forward_f64, pr_fused_backward_f32, pr_fused_backward_f64
void register_cpu(const std::string& key, at::IntArrayRef shape, at::IntArrayRef functions) {
  const FusedCellShape sizes = fused_shape_from("pararnn::fused_register_cpu", shape);
  TORCH_CHECK(functions.size() == 4, "pararnn::fused_register_cpu: expected 4 kernel addresses (forward f32, f64, "
              "backward f32, f64), got ", functions.size());
  register_fused_shape(key, sizes);
  CpuKernels kernels;
  kernels.forward_f32 = to_function<CpuForward<float>>(functions[0]);
  kernels.forward_f64 = to_function<CpuForward<double>>(functions[1]);
  kernels.backward_f32 = to_function<CpuBackward<float>>(functions[2]);
  kernels.backward_f64 = to_function<CpuBackward<double>>(functions[3]);
  const std::lock_guard<std::mutex> lock(registry_mutex);
  cpu_kernels().insert_or_assign(key, kernels);
}

bool has_cpu(const std::string& key) {
  const std::lock_guard<std::mutex> lock(registry_mutex);
  return cpu_kernels().count(key) > 0;
}

CpuKernels cpu_kernels_of(const std::string& key) {
  const std::lock_guard<std::mutex> lock(registry_mutex);
  const auto found = cpu_kernels().find(key);
  TORCH_CHECK(found != cpu_kernels().end(), "pararnn fused op: no CPU kernels registered for cell key '", key,
              "'; run the cell through pararnn_torch.fused.solve_fused (or fused_unavailable_reason) first");
  return found->second;
}

void check_cpu_dtype(const char* op, const at::Tensor& u) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble, op,
              ": the fused CPU kernels compute in float32 or float64, got ", u.scalar_type(),
              "; cast the inputs (the layers run bfloat16/float16 in float32)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(
    const at::Tensor& u_in, const at::Tensor& recurrent_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& h0_in, const std::optional<at::Tensor>& resets_in, c10::string_view cell_key,
    int64_t /*max_its*/, double /*tol*/, double /*damping*/) {
  const std::string key(cell_key);
  const FusedCellShape shape = fused_shape(key);
  const FusedOperands in =
      fused_operands("pararnn::fused_forward", shape, u_in, recurrent_in, bias_in, h0_in, resets_in);
  check_cpu_dtype("pararnn::fused_forward", in.u);
  const CpuKernels kernels = cpu_kernels_of(key);
  at::Tensor traj = output_pool().empty({in.batch, in.steps, shape.K, in.channels}, in.u.options());
  // the sweep is exact: no Newton iterations, no residual
  at::Tensor iterations = at::zeros({in.batch, in.channels}, in.u.options().dtype(at::kInt));
  at::Tensor residual = at::zeros({in.batch, in.channels}, in.u.options().dtype(at::kFloat));
  if (traj.numel() == 0) return {traj, iterations, residual};
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "pararnn_fused_forward_cpu", [&] {
    kernels.forward<scalar_t>()(in.u.data_ptr<scalar_t>(), in.recurrent.data_ptr<scalar_t>(),
                                data_or_null<scalar_t>(in.bias), data_or_null<scalar_t>(in.h0), resets_or_null(in),
                                traj.data_ptr<scalar_t>(), in.batch, in.steps, in.channels, threads);
  });
  return {traj, iterations, residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& u_in, const at::Tensor& recurrent_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& h0_in, const std::optional<at::Tensor>& resets_in, const at::Tensor& traj_in,
    const at::Tensor& grad_in, c10::string_view cell_key) {
  const std::string key(cell_key);
  const FusedCellShape shape = fused_shape(key);
  const char* op = "pararnn::fused_backward";
  const FusedOperands in = fused_operands(op, shape, u_in, recurrent_in, bias_in, h0_in, resets_in);
  check_cpu_dtype(op, in.u);
  const at::Tensor traj = trajectory_operand(op, "traj", traj_in, in, shape.K);
  const at::Tensor grad = trajectory_operand(op, "grad", grad_in, in, shape.K);
  const CpuKernels kernels = cpu_kernels_of(key);
  at::Tensor d_u = output_pool().empty(in.u.sizes(), in.u.options());
  at::Tensor d_rec = at::empty_like(in.recurrent);
  at::Tensor d_bias = at::empty({shape.G, in.channels}, in.u.options());
  at::Tensor d_h0 = at::zeros({in.batch, shape.K, in.channels}, in.u.options());
  if (in.batch * in.steps * in.channels == 0) {
    d_u.zero_();
    d_rec.zero_();
    d_bias.zero_();
    return {d_u, d_rec, d_bias, d_h0};
  }
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "pararnn_fused_backward_cpu", [&] {
    kernels.backward<scalar_t>()(
        in.u.data_ptr<scalar_t>(), in.recurrent.data_ptr<scalar_t>(), data_or_null<scalar_t>(in.bias),
        data_or_null<scalar_t>(in.h0), resets_or_null(in), traj.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        d_u.data_ptr<scalar_t>(), d_rec.data_ptr<scalar_t>(), d_bias.data_ptr<scalar_t>(),
        in.h0.has_value() ? d_h0.data_ptr<scalar_t>() : nullptr, in.batch, in.steps, in.channels, threads);
  });
  return {d_u, d_rec, d_bias, d_h0};
}

std::string describe(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

}  // namespace

FusedCellShape fused_shape_from(const char* op, at::IntArrayRef shape) {
  TORCH_CHECK(shape.size() == 3, op, ": shape must be [K, G, P], got ", shape.size(), " entries");
  return FusedCellShape{shape[0], shape[1], shape[2]};
}

void register_fused_shape(const std::string& key, const FusedCellShape& shape) {
  TORCH_CHECK(shape.K >= 1 && shape.G >= 1 && shape.P >= 0, "pararnn fused: invalid cell sizes K=", shape.K,
              ", G=", shape.G, ", P=", shape.P);
  const std::lock_guard<std::mutex> lock(registry_mutex);
  const auto [it, inserted] = shapes().emplace(key, shape);
  TORCH_CHECK(inserted || (it->second.K == shape.K && it->second.G == shape.G && it->second.P == shape.P),
              "pararnn fused: cell key '", key, "' was registered with K=", it->second.K, ", G=", it->second.G,
              ", P=", it->second.P, " and now with K=", shape.K, ", G=", shape.G, ", P=", shape.P);
}

FusedCellShape fused_shape(const std::string& key) {
  const std::lock_guard<std::mutex> lock(registry_mutex);
  const auto found = shapes().find(key);
  TORCH_CHECK(found != shapes().end(), "pararnn fused op: unknown cell key '", key,
              "'; run the cell through pararnn_torch.fused.solve_fused (or fused_unavailable_reason) first");
  return found->second;
}

FusedOperands fused_operands(const char* op, const FusedCellShape& shape, const at::Tensor& u,
                             const at::Tensor& recurrent, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& resets) {
  TORCH_CHECK(u.dim() == 4 && u.size(2) == shape.G, op, ": u must be [B, T, G=", shape.G, ", N], got ",
              describe(u.sizes()));
  FusedOperands in;
  in.batch = u.size(0);
  in.steps = u.size(1);
  in.channels = u.size(3);
  const auto same_kind = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == u.scalar_type() && t.device() == u.device(), op, ": ", name,
                " must have the dtype and device of u (", u.scalar_type(), ", ", u.device(), "), got ",
                t.scalar_type(), ", ", t.device());
  };
  TORCH_CHECK(recurrent.dim() == 2 && recurrent.size(0) == shape.P && recurrent.size(1) == in.channels, op,
              ": recurrent must be [P, N] = [", shape.P, ", ", in.channels, "], got ", describe(recurrent.sizes()));
  same_kind(recurrent, "recurrent");
  in.u = u.contiguous();
  in.recurrent = recurrent.contiguous();
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == shape.G && bias->size(1) == in.channels, op,
                ": bias must be [G, N] = [", shape.G, ", ", in.channels, "], got ", describe(bias->sizes()));
    same_kind(*bias, "bias");
    in.bias = bias->contiguous();
  }
  if (h0.has_value()) {
    TORCH_CHECK(h0->dim() == 3 && h0->size(0) == in.batch && h0->size(1) == shape.K && h0->size(2) == in.channels,
                op, ": h0 must be [B, K, N] = [", in.batch, ", ", shape.K, ", ", in.channels, "], got ",
                describe(h0->sizes()));
    same_kind(*h0, "h0");
    in.h0 = h0->contiguous();
  }
  if (resets.has_value()) {
    TORCH_CHECK(resets->dim() == 2 && resets->size(0) == in.batch && resets->size(1) == in.steps &&
                    resets->scalar_type() == at::kBool && resets->device() == u.device(),
                op, ": resets must be a bool tensor [B, T] = [", in.batch, ", ", in.steps, "] on ", u.device(),
                ", got ", resets->scalar_type(), " ", describe(resets->sizes()), " on ", resets->device());
    in.resets = resets->contiguous();
  }
  return in;
}

at::Tensor trajectory_operand(const char* op, const char* name, const at::Tensor& t, const FusedOperands& in,
                              int64_t K) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == in.batch && t.size(1) == in.steps && t.size(2) == K &&
                  t.size(3) == in.channels,
              op, ": ", name, " must be [B, T, K, N] = [", in.batch, ", ", in.steps, ", ", K, ", ", in.channels,
              "], got ", describe(t.sizes()));
  TORCH_CHECK(t.scalar_type() == in.u.scalar_type() && t.device() == in.u.device(), op, ": ", name,
              " must have the dtype and device of u (", in.u.scalar_type(), ", ", in.u.device(), "), got ",
              t.scalar_type(), ", ", t.device());
  return t.contiguous();
}

}  // namespace pararnn

TORCH_LIBRARY_FRAGMENT(pararnn, m) {
  // registration of a cell's CPU kernels: key, [K, G, P], addresses of its library's four entry points
  m.def("fused_register_cpu(str cell_key, int[] shape, int[] functions) -> ()", &pararnn::register_cpu);
  m.def("fused_has_cpu(str cell_key) -> bool", &pararnn::has_cpu);
  // drops the CPU output pool's storage that no tensor uses (csrc/fused/output_pool.h)
  m.def("fused_release_cpu_outputs() -> ()", [] { pararnn::output_pool().release_unused(); });
}

TORCH_LIBRARY_IMPL(pararnn, CPU, m) {
  m.impl("fused_forward", &pararnn::fused_forward_cpu);
  m.impl("fused_backward", &pararnn::fused_backward_cpu);
}
