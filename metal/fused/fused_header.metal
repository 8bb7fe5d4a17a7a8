// Helpers of the fused Metal kernels (fused_forward.metal, fused_adjoint.metal); the header also holds
// fused_math.metal and the generated cell struct, typedef'd as Cell.

// x <- A x + b for K x K row-major A
template <int K>
static inline void pr_affine_apply(thread const float* A, thread const float* b, thread float* x) {
  float out[K];
  for (int i = 0; i < K; ++i) {
    out[i] = b[i];
    for (int j = 0; j < K; ++j) out[i] += A[i * K + j] * x[j];
  }
  for (int i = 0; i < K; ++i) x[i] = out[i];
}

// (A, b) <- (A, b) o (A1, b1): the map applying (A1, b1) first
template <int K>
static inline void pr_affine_compose(thread float* A, thread float* b, thread const float* A1,
                                     thread const float* b1) {
  float nA[K * K], nb[K];
  for (int i = 0; i < K; ++i) {
    nb[i] = b[i];
    for (int j = 0; j < K; ++j) {
      nb[i] += A[i * K + j] * b1[j];
      float s = 0.0f;
      for (int m = 0; m < K; ++m) s += A[i * K + m] * A1[m * K + j];
      nA[i * K + j] = s;
    }
  }
  for (int i = 0; i < K * K; ++i) A[i] = nA[i];
  for (int i = 0; i < K; ++i) b[i] = nb[i];
}

// (sumA, sumb) <- (A, b) o (sumA, sumb): append one step after the maps composed so far
template <int K>
static inline void pr_affine_after(thread const float* A, thread const float* b, thread float* sumA,
                                   thread float* sumb) {
  float nA[K * K], nb[K];
  for (int i = 0; i < K * K; ++i) nA[i] = A[i];
  for (int i = 0; i < K; ++i) nb[i] = b[i];
  pr_affine_compose<K>(nA, nb, sumA, sumb);
  for (int i = 0; i < K * K; ++i) sumA[i] = nA[i];
  for (int i = 0; i < K; ++i) sumb[i] = nb[i];
}
