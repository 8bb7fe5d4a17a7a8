// Schema of the native structured scan (implementations: scan_cpu.cpp, scan_cuda_glue.cpp).
#include <torch/library.h>

TORCH_LIBRARY(pararnn, m) {
  // forward: h_t = A_t h_{t-1} + b_t from h0 (or 0); reverse: h_t = A_t h_{t+1} + b_t from h0 (or 0)
  m.def("scan(Tensor A, Tensor b, Tensor? h0=None, bool reverse=False) -> Tensor");
  // the same into a preallocated contiguous h (saves the page faults of a fresh allocation)
  m.def("scan.out(Tensor A, Tensor b, Tensor? h0=None, bool reverse=False, *, Tensor(a!) out) -> Tensor(a!)");
  // the same from zero with the block entries as separate tensors (no stacking copy): A = K*K tensors
  // [B, T, N] in row-major block order, b = K tensors [B, T, N]; returns K tensors [B, T, N]
  m.def("scan_entries(Tensor[] A, Tensor[] b, bool reverse=False) -> Tensor[]");
}
