// Math functions used by the generated cell code in Metal kernels (pr_sigmoid, pr_tanh, ...).
// precise:: versions: MLX builds kernels with fast math, and the fused kernels must match the reference.
static inline float pr_exp(float x) { return precise::exp(x); }
static inline float pr_log(float x) { return log(x); }
static inline float pr_tanh(float x) { return precise::tanh(x); }
static inline float pr_sigmoid(float x) { return 1.0f / (1.0f + precise::exp(-x)); }
static inline float pr_softplus(float x) { return max(x, 0.0f) + log(1.0f + precise::exp(-fabs(x))); }
static inline float pr_sqrt(float x) { return sqrt(x); }
static inline float pr_pow(float x, float y) { return pow(x, y); }
