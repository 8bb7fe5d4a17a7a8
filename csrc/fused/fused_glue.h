// Torch-side registry and input checks of the fused ops (pararnn::fused_forward / fused_backward).
//
// A cell's kernels are registered under a key (its definition hash) from Python at first use:
// its sizes once, then per device type the code that runs it (CPU: function pointers of the cell's
// runtime-compiled library; CUDA: the built-in kernels compiled into this extension, or NVRTC-compiled
// CUfunction handles). The ops look the key up; an unknown key is an error saying what to call first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace pararnn {

// state components K, gates G, per-channel parameters P of a cell
struct FusedCellShape {
  int64_t K = 0, G = 0, P = 0;
};

// The sizes [K, G, P] a registration passes from Python, checked (op names the caller in the error).
FusedCellShape fused_shape_from(const char* op, at::IntArrayRef shape);

// Records the sizes of the cell behind key (the same key must always name the same sizes).
void register_fused_shape(const std::string& key, const FusedCellShape& shape);
FusedCellShape fused_shape(const std::string& key);

// Contiguous operands of one fused call and its sizes.
struct FusedOperands {
  at::Tensor u, recurrent;
  std::optional<at::Tensor> bias, h0, resets;
  int64_t batch = 0, steps = 0, channels = 0;
};

// Checks u [B, T, G, N], recurrent [P, N], bias [G, N], h0 [B, K, N], resets [B, T] bool against the cell's
// sizes and each other (one dtype and device), naming what was expected; returns them contiguous.
FusedOperands fused_operands(const char* op, const FusedCellShape& shape, const at::Tensor& u,
                             const at::Tensor& recurrent, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& resets);

// A [B, T, K, N] tensor (trajectory or its gradient) of the operands' dtype and device, made contiguous.
at::Tensor trajectory_operand(const char* op, const char* name, const at::Tensor& t, const FusedOperands& in,
                              int64_t K);

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline const uint8_t* resets_or_null(const FusedOperands& in) {
  return in.resets.has_value() ? static_cast<const uint8_t*>(in.resets->data_ptr()) : nullptr;
}

}  // namespace pararnn
