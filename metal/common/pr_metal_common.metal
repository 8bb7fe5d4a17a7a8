// What every Metal kernel of the project shares (scan and fused; prepended to their mx.fast.metal_kernel
// headers): traced device loads/stores and affine maps x -> P x + v (P a K x K row-major array).
//
// Layout (as the CUDA kernels, csrc/common/pr_cuda_common.cuh): a threadgroup is PR_LANES consecutive
// channels (thread_position_in_threadgroup.x, one simdgroup wide) by GROUPS time groups (.y), so every
// simdgroup-wide device access covers consecutive channels of one time step (coalesced). The groups exchange
// their chunk maps through threadgroup memory laid out [group][entry][lane].

// The emulator defines this to count the 32-byte sectors each simdgroup-wide access touches.
#ifndef PR_TRACE_GLOBAL
#define PR_TRACE_GLOBAL(pointer, bytes, is_store)
#endif

constant constexpr int PR_LANES = 32;

template <typename S>
static inline float pr_load(const device S* p, long i) {
  PR_TRACE_GLOBAL(p + i, sizeof(S), false);
  return float(p[i]);
}
template <typename S>
static inline void pr_store(device S* p, long i, float v) {
  PR_TRACE_GLOBAL(p + i, sizeof(S), true);
  p[i] = S(v);
}

template <int K>
static inline void pr_affine_identity(thread float* P, thread float* v) {
  for (int i = 0; i < K; ++i) {
    v[i] = 0.0f;
    for (int j = 0; j < K; ++j) P[i * K + j] = i == j ? 1.0f : 0.0f;
  }
}

// x <- P x + v
template <int K>
static inline void pr_affine_apply(thread const float* P, thread const float* v, thread float* x) {
  float out[K];
  for (int i = 0; i < K; ++i) {
    out[i] = v[i];
    for (int j = 0; j < K; ++j) out[i] += P[i * K + j] * x[j];
  }
  for (int i = 0; i < K; ++i) x[i] = out[i];
}

// (P, v) <- (P1, v1) o (P, v): the map applying (P, v) first, then (P1, v1)
template <int K>
static inline void pr_affine_then(thread float* P, thread float* v, thread const float* P1, thread const float* v1) {
  float nP[K * K], nv[K];
  for (int i = 0; i < K; ++i) {
    nv[i] = v1[i];
    for (int j = 0; j < K; ++j) {
      nv[i] += P1[i * K + j] * v[j];
      float acc = 0.0f;
      for (int m = 0; m < K; ++m) acc += P1[i * K + m] * P[m * K + j];
      nP[i * K + j] = acc;
    }
  }
  for (int i = 0; i < K * K; ++i) P[i] = nP[i];
  for (int i = 0; i < K; ++i) v[i] = nv[i];
}

// The groups' chunk maps in threadgroup memory, [group][entry][lane] (entries: P row-major, then v). Macros,
// not functions: kernel bodies declare the threadgroup array, and a function would need an address-space
// qualified pointer parameter for it.
#define PR_PUBLISH_MAP(maps, K, group, lane, P, v)                              \
  do {                                                                          \
    for (int e_ = 0; e_ < (K) * (K); ++e_) maps[group][e_][lane] = (P)[e_];     \
    for (int e_ = 0; e_ < (K); ++e_) maps[group][(K) * (K) + e_][lane] = (v)[e_]; \
  } while (0)

// x <- maps of groups [first, last) applied in order to x (after the barrier that follows the publish)
#define PR_APPLY_MAPS(maps, K, first, last, lane, x)                                   \
  do {                                                                                 \
    for (int g_ = (first); g_ < (last); ++g_) {                                        \
      float P_[(K) * (K)], v_[K];                                                      \
      for (int e_ = 0; e_ < (K) * (K); ++e_) P_[e_] = maps[g_][e_][lane];              \
      for (int e_ = 0; e_ < (K); ++e_) v_[e_] = maps[g_][(K) * (K) + e_][lane];        \
      pr_affine_apply<K>(P_, v_, x);                                                   \
    }                                                                                  \
  } while (0)
