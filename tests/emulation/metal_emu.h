// Metal built-ins for compiling unmodified mx.fast.metal_kernel bodies with g++ (see README.md).
// Supported: the thread-position attributes that MLX passes to the kernel
// (as parameters of the generated signature, see harness.metal_signature),
// threadgroup_barrier, simdgroup_barrier, simd_shuffle/_up/_down/_xor, simd_sum,
// threadgroup/device/constant/thread qualifiers, uint/uint3/ushort, metal:: math, float16_t/bfloat16_t storage.
// Simdgroups are 32 wide, as on Apple GPUs. Not supported: half/bfloat arithmetic, atomics,
// vector types other than uint3.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "emu_runtime.h"
#include "soft_half.h"

using uint = unsigned int;
using ushort = unsigned short;
using ulong = unsigned long;

// MLX's names of the 16-bit storage types (half, bfloat): converted to and from float explicitly, as in Metal
struct float16_t {
  uint16_t bits = 0;
  float16_t() = default;
  float16_t(float f) : bits(emu::float_to_half(f)) {}
  operator float() const { return emu::half_to_float(bits); }
};
struct bfloat16_t {
  uint16_t bits = 0;
  bfloat16_t() = default;
  bfloat16_t(float f) : bits(emu::float_to_bfloat16(f)) {}
  operator float() const { return emu::bfloat16_to_float(bits); }
};

struct uint3 {
  uint x = 0, y = 0, z = 0;
};

namespace metal {
using std::abs;
using std::exp;
using std::fabs;
using std::fma;
using std::log;
using std::max;
using std::min;
using std::sqrt;
using std::tanh;
namespace precise {
using std::exp;
using std::tanh;
}  // namespace precise
namespace fast {
using std::exp;
using std::tanh;
}  // namespace fast

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags) { emu::sync_block(); }
inline void simdgroup_barrier(mem_flags) { emu::sync_warp(); }

template <class T>
T simd_shuffle(T value, ushort src_lane) {
  return emu::exchange(value, [&](int) { return int(src_lane); });
}
template <class T>
T simd_shuffle_up(T value, ushort delta) {
  return emu::exchange(value, [&](int lane) { return lane >= int(delta) ? lane - int(delta) : lane; });
}
template <class T>
T simd_shuffle_down(T value, ushort delta) {
  return emu::exchange(value, [&](int lane) { return lane + int(delta); });
}
template <class T>
T simd_shuffle_xor(T value, ushort mask) {
  return emu::exchange(value, [&](int lane) { return lane ^ int(mask); });
}
template <class T>
T simd_sum(T value) {
  return emu::warp_sum(value);
}
}  // namespace metal

using namespace metal;

// address-space qualifiers carry no meaning on the host; threadgroup memory is
// shared by the threads of the running threadgroup (like __shared__ above)
#define device
#define constant
#define thread
#define threadgroup static
// the coalescing probe (metal/common/pr_metal_common.metal)
#define PR_TRACE_GLOBAL(pointer, bytes, is_store) emu::trace_global(pointer, unsigned(bytes))
#define METAL_FUNC inline

// simd_all / simd_any: a vote over the simdgroup (a warp exchange, so also a simdgroup barrier here)
namespace metal {
inline bool simd_all(bool predicate) {
  return emu::warp_sum(int(predicate)) == emu::warp_width();
}
inline bool simd_any(bool predicate) { return emu::warp_sum(int(predicate)) > 0; }
}  // namespace metal
