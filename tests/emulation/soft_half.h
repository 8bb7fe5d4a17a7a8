// Software IEEE half and bfloat16 (bit-exact round to nearest even), shared by cuda_emu.h and metal_emu.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace emu {

inline float half_to_float(uint16_t bits) {
  const uint32_t sign = uint32_t(bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
  float magnitude;
  if (exponent == 0)
    magnitude = std::ldexp(float(mantissa), -24);
  else if (exponent == 31)
    magnitude = mantissa ? NAN : INFINITY;
  else
    magnitude = std::ldexp(float(mantissa | 0x400), int(exponent) - 25);
  uint32_t out;
  std::memcpy(&out, &magnitude, 4);
  out |= sign;
  float result;
  std::memcpy(&result, &out, 4);
  return result;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00u);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00u);
  if (a < std::ldexp(1.0f, -14)) return uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.0f)));  // subnormal
  int e;
  const float m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  uint32_t q = uint32_t(std::nearbyint(std::ldexp(m, 11)));  // 11 significant bits, ties to even
  if (q == 2048) {
    q = 1024;
    ++e;
  }
  if (e + 14 >= 31) return uint16_t(sign | 0x7c00u);
  return uint16_t(sign | uint16_t((e + 14) << 10) | uint16_t(q & 0x3ff));
}

inline float bfloat16_to_float(uint16_t bits) {
  const uint32_t x = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline uint16_t float_to_bfloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if (std::isnan(f)) return uint16_t((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

}  // namespace emu
