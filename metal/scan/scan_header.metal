// Helpers of the structured-scan Metal kernel (the `header` of mx.fast.metal_kernel).
// Same algorithm as csrc/scan_kernel.cuh; see metal/scan.metal.

constant constexpr int kScanMaxSimdgroups = 32;

// x -> P x + v; `later.then_after(earlier)` is the map of earlier followed by later
template <int K>
struct ScanMap {
  float P[K][K];
  float v[K];

  void set_identity() {
    for (int i = 0; i < K; ++i) {
      v[i] = 0.0f;
      for (int j = 0; j < K; ++j) P[i][j] = i == j ? 1.0f : 0.0f;
    }
  }
  void then_after(thread const ScanMap& earlier) {
    float nP[K][K], nv[K];
    for (int i = 0; i < K; ++i) {
      nv[i] = v[i];
      for (int j = 0; j < K; ++j) {
        nv[i] += P[i][j] * earlier.v[j];
        float acc = 0.0f;
        for (int m = 0; m < K; ++m) acc += P[i][m] * earlier.P[m][j];
        nP[i][j] = acc;
      }
    }
    for (int i = 0; i < K; ++i) {
      v[i] = nv[i];
      for (int j = 0; j < K; ++j) P[i][j] = nP[i][j];
    }
  }
  void apply(thread float* h) const {
    float out[K];
    for (int i = 0; i < K; ++i) {
      out[i] = v[i];
      for (int j = 0; j < K; ++j) out[i] += P[i][j] * h[j];
    }
    for (int i = 0; i < K; ++i) h[i] = out[i];
  }
  void shuffle_up_from(thread const ScanMap& mine, ushort delta) {
    for (int i = 0; i < K; ++i) {
      v[i] = simd_shuffle_up(mine.v[i], delta);
      for (int j = 0; j < K; ++j) P[i][j] = simd_shuffle_up(mine.P[i][j], delta);
    }
  }
};
