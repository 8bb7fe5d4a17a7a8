// Schemas of the extension's ops. Implementations: scan_cpu.cpp, scan_cuda_glue.cpp (scan);
// csrc/fused/fused_glue.cpp (CPU), csrc/fused/fused_cuda_glue.cpp (CUDA) (fused); the fake
// (meta) implementations and autograd are registered from Python (pararnn_torch/kernels.py, fused.py).
#include <torch/library.h>

TORCH_LIBRARY(pararnn, m) {
  // forward: h_t = A_t h_{t-1} + b_t from h0 (or 0); reverse: h_t = A_t h_{t+1} + b_t from h0 (or 0)
  m.def("scan(Tensor A, Tensor b, Tensor? h0=None, bool reverse=False) -> Tensor");
  // the same into a preallocated contiguous h (saves the page faults of a fresh allocation)
  m.def("scan.out(Tensor A, Tensor b, Tensor? h0=None, bool reverse=False, *, Tensor(a!) out) -> Tensor(a!)");
  // the same from zero with the block entries as separate tensors (no stacking copy): A = K*K tensors
  // [B, T, N] in row-major block order, b = K tensors [B, T, N]; returns K tensors [B, T, N]
  m.def("scan_entries(Tensor[] A, Tensor[] b, bool reverse=False) -> Tensor[]");
  // The whole solve of one cell (registered under cell_key, see fused_register_*) over gates u + bias:
  // u [B, T, G, N], recurrent [P, N], bias [G, N], h0 [B, K, N], resets [B, T] bool. Returns the
  // trajectory [B, T, K, N], Newton iterations [B, N] int32 and final residual [B, N] float32 per
  // sequence (the CPU sweep is exact: zeros). max_its, tol, damping: NewtonConfig (CUDA only).
  m.def(
      "fused_forward(Tensor u, Tensor recurrent, Tensor? bias, Tensor? h0, Tensor? resets, str cell_key, "
      "int max_its=12, float tol=1e-6, float damping=1.0) -> (Tensor, Tensor, Tensor)");
  // The adjoint of fused_forward at its trajectory given grad = dL/dtraj: (d_u, d_recurrent, d_bias [G, N],
  // d_h0 [B, K, N], zeros when h0 is None)
  m.def(
      "fused_backward(Tensor u, Tensor recurrent, Tensor? bias, Tensor? h0, Tensor? resets, Tensor traj, "
      "Tensor grad, str cell_key) -> (Tensor, Tensor, Tensor, Tensor)");
}
