// Math functions used by the generated cell code on the host (pr_sigmoid, pr_tanh, ...).
//
// float: branch-free polynomial versions (Cephes-style, ~2 ulp) that g++/clang
// vectorise over the channel loop; libm calls would block vectorisation.
// double: libm, since the float64 path is for exactness checks, not speed.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pararnn_fused_math {

inline float bits_to_float(int32_t bits) {
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

inline int32_t float_to_bits(float x) {
    int32_t out;
    std::memcpy(&out, &x, sizeof(out));
    return out;
}

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2; inputs clamped to the normal range
inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
    const float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    return y * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// log(x) for x > 0: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a polynomial in m - 1
inline float log_f32(float x) {
    const int32_t bits = float_to_bits(x);
    int32_t e = ((bits >> 23) & 0xff) - 127;
    float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
    const bool big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e = big ? e + 1 : e;
    const float f = m - 1.0f;
    const float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z - 0.5f * z + f;
    const float ef = static_cast<float>(e);
    const float out = y + ef * 0.693147180559945f;
    return x > 0.0f ? out : (x == 0.0f ? -INFINITY : NAN);
}

inline float tanh_f32(float x) {
    const float a = std::fabs(x);
    // small |x|: odd polynomial keeps the relative accuracy that 1 - 2/(e^2x + 1) loses
    const float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const float small = p * z * x + x;
    const float e = exp_f32(-2.0f * a);
    const float large = (1.0f - e) / (1.0f + e);
    const float signed_large = x < 0.0f ? -large : large;
    return a < 0.625f ? small : signed_large;
}

inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// softplus(x) = max(x, 0) + log(1 + exp(-|x|))
inline float softplus_f32(float x) {
    const float positive = x > 0.0f ? x : 0.0f;
    return positive + log_f32(1.0f + exp_f32(-std::fabs(x)));
}

}  // namespace pararnn_fused_math

inline float pr_exp(float x) { return pararnn_fused_math::exp_f32(x); }
inline float pr_log(float x) { return pararnn_fused_math::log_f32(x); }
inline float pr_tanh(float x) { return pararnn_fused_math::tanh_f32(x); }
inline float pr_sigmoid(float x) { return pararnn_fused_math::sigmoid_f32(x); }
inline float pr_softplus(float x) { return pararnn_fused_math::softplus_f32(x); }
inline float pr_sqrt(float x) { return std::sqrt(x); }
inline float pr_pow(float x, float y) { return std::pow(x, y); }

inline double pr_exp(double x) { return std::exp(x); }
inline double pr_log(double x) { return std::log(x); }
inline double pr_tanh(double x) { return std::tanh(x); }
inline double pr_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double pr_softplus(double x) { return (x > 0.0 ? x : 0.0) + std::log1p(std::exp(-std::fabs(x))); }
inline double pr_sqrt(double x) { return std::sqrt(x); }
inline double pr_pow(double x, double y) { return std::pow(x, y); }
