// Math functions used by the generated cell code in CUDA kernels (pr_sigmoid, pr_tanh, ...).
// Accurate libdevice versions (no __expf): the fused kernels must match the sequential reference.
#pragma once
#ifndef __CUDACC_RTC__  // NVRTC has the device math functions built in, and no host headers
#include <cmath>
#endif

__device__ __forceinline__ float pr_exp(float x) { return expf(x); }
__device__ __forceinline__ float pr_log(float x) { return logf(x); }
__device__ __forceinline__ float pr_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ float pr_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float pr_softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float pr_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ float pr_pow(float x, float y) { return powf(x, y); }

__device__ __forceinline__ double pr_exp(double x) { return exp(x); }
__device__ __forceinline__ double pr_log(double x) { return log(x); }
__device__ __forceinline__ double pr_tanh(double x) { return tanh(x); }
__device__ __forceinline__ double pr_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ double pr_softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }
__device__ __forceinline__ double pr_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ double pr_pow(double x, double y) { return pow(x, y); }
