// Fused Newton forward, body of an mx.fast.metal_kernel (assembled by pararnn_mlx/fused.py:
// header = fused_math.metal + the generated cell (metal/generated/<cell>_cell.metal) + "typedef pr_cell_<cell> Cell;").
// Same algorithm as csrc/fused_kernels.cuh (fused_newton_forward): one threadgroup per (batch, channel)
// sequence, tiles of THREADS * CHUNK steps held in registers across Newton iterations, a threadgroup scan
// of the per-thread affine maps, a threadgroup max of the residual, the exact state carried between tiles,
// and an exact sequential sweep (iterations = -1) for a tile that misses the tolerance.
//
// Inputs: u [B, T, G, N] (without bias), params [P or 1, N], bias [G, N], h0 [B, K, N], resets [B, T] bool,
// dims int32 [B, T, N, max_its, has_bias, has_h0, has_resets], tol float [1].
// Outputs: traj [B, T, K, N] float, iterations [B * N] int32. Template: THREADS, CHUNK.
// Dispatch: grid (THREADS * B * N, 1, 1), threadgroup (THREADS, 1, 1).

  constexpr int K = Cell::K, G = Cell::G, P = Cell::P > 0 ? Cell::P : 1;
  threadgroup float shA[THREADS][K * K];
  threadgroup float shb[THREADS][K];
  threadgroup float sh_red[THREADS];
  threadgroup float sh_carry[K];
  const long batch = dims[0], steps = dims[1], N = dims[2];
  const int max_its = dims[3];
  const bool has_bias = dims[4] != 0, has_h0 = dims[5] != 0, has_resets = dims[6] != 0;
  const long seq = threadgroup_position_in_grid.x, b = seq / N, n = seq % N;
  const int tid = thread_position_in_threadgroup.x;
  const long TILE = long(THREADS) * CHUNK;
  float p[P], start[K], carry[K], bias_n[G];
  for (int q = 0; q < Cell::P; ++q) p[q] = params[q * N + n];
  for (int i = 0; i < G; ++i) bias_n[i] = has_bias ? bias[i * N + n] : 0.0f;
  for (int k = 0; k < K; ++k) carry[k] = start[k] = has_h0 ? h0[(b * K + k) * N + n] : 0.0f;
  int most_its = 0;
  for (long t0 = 0; t0 < steps; t0 += TILE) {
    float h[CHUNK][K], g[CHUNK][G], A[CHUNK][K * K], rhs[CHUNK][K], fval[CHUNK][K];
    bool restart[CHUNK], valid[CHUNK];
    for (int c = 0; c < CHUNK; ++c) {
      const long t = t0 + long(tid) * CHUNK + c;
      valid[c] = t < steps;
      restart[c] = t == 0 || (has_resets && valid[c] && resets[b * steps + t]);
      for (int i = 0; i < G; ++i) g[c][i] = valid[c] ? u[((b * steps + t) * G + i) * N + n] + bias_n[i] : 0.0f;
      Cell::step((t == t0 && !restart[c]) ? carry : start, g[c], p, h[c]);
    }
    int its = 0;
    bool converged = false;
    for (; its <= max_its; ++its) {
      for (int k = 0; k < K; ++k) shb[tid][k] = h[CHUNK - 1][k];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      float residual = 0.0f, prev[K];
      for (int k = 0; k < K; ++k) prev[k] = tid > 0 ? shb[tid - 1][k] : carry[k];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int c = 0; c < CHUNK; ++c) {
        const long t = t0 + long(tid) * CHUNK + c;
        const bool fixed = restart[c] || t == t0;  // previous state known exactly: no Jacobian link
        float s[K], jac[K * K];
        for (int k = 0; k < K; ++k) s[k] = restart[c] ? start[k] : (t == t0 ? carry[k] : prev[k]);
        Cell::step_jacobian(s, g[c], p, fval[c], jac);
        for (int k = 0; k < K; ++k) {
          const float diff = fabs(fval[c][k] - h[c][k]);
          if (valid[c] && !(diff <= residual)) residual = diff;  // NaN propagates
          rhs[c][k] = fval[c][k];
        }
        for (int i = 0; i < K * K; ++i) A[c][i] = fixed ? 0.0f : jac[i];
        for (int i = 0; i < K; ++i)
          for (int j = 0; j < K; ++j) rhs[c][i] -= A[c][i * K + j] * s[j];
        for (int k = 0; k < K; ++k) prev[k] = h[c][k];
      }
      // threadgroup max of the residual
      sh_red[tid] = residual;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int half_width = THREADS / 2; half_width > 0; half_width >>= 1) {
        if (tid < half_width && !(sh_red[tid + half_width] <= sh_red[tid])) sh_red[tid] = sh_red[tid + half_width];
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      residual = sh_red[0];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (residual <= tol[0] || its == max_its) {
        converged = residual <= tol[0];
        for (int c = 0; c < CHUNK; ++c)
          for (int k = 0; k < K; ++k) h[c][k] = fval[c][k];
        break;
      }
      // this thread's chunk as one affine map (later steps applied after earlier ones)
      float sumA[K * K], sumb[K];
      for (int i = 0; i < K * K; ++i) sumA[i] = (i % (K + 1) == 0) ? 1.0f : 0.0f;
      for (int i = 0; i < K; ++i) sumb[i] = 0.0f;
      for (int c = 0; c < CHUNK; ++c) pr_affine_after<K>(A[c], rhs[c], sumA, sumb);
      // inclusive Hillis-Steele scan of the maps over the threadgroup
      for (int offset = 1; offset < THREADS; offset <<= 1) {
        for (int i = 0; i < K * K; ++i) shA[tid][i] = sumA[i];
        for (int i = 0; i < K; ++i) shb[tid][i] = sumb[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (tid >= offset) {
          float earlierA[K * K], earlierb[K];
          for (int i = 0; i < K * K; ++i) earlierA[i] = shA[tid - offset][i];
          for (int i = 0; i < K; ++i) earlierb[i] = shb[tid - offset][i];
          pr_affine_compose<K>(sumA, sumb, earlierA, earlierb);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      // the tile's first step is fixed (A = 0): every inclusive prefix is the constant map to its b
      for (int k = 0; k < K; ++k) shb[tid][k] = sumb[k];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      float x[K];
      for (int k = 0; k < K; ++k) x[k] = tid > 0 ? shb[tid - 1][k] : carry[k];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int c = 0; c < CHUNK; ++c) {
        pr_affine_apply<K>(A[c], rhs[c], x);
        for (int k = 0; k < K; ++k) h[c][k] = x[k];
      }
    }
    if (!converged) {
      // exact fallback: one thread sweeps the tile sequentially through device memory
      if (tid == 0) {
        float s[K], gg[G], out[K];
        for (int k = 0; k < K; ++k) s[k] = carry[k];
        for (long t = t0; t < t0 + TILE && t < steps; ++t) {
          if (t == 0 || (has_resets && resets[b * steps + t]))
            for (int k = 0; k < K; ++k) s[k] = start[k];
          for (int i = 0; i < G; ++i) gg[i] = u[((b * steps + t) * G + i) * N + n] + bias_n[i];
          Cell::step(s, gg, p, out);
          for (int k = 0; k < K; ++k) {
            s[k] = out[k];
            traj[((b * steps + t) * K + k) * N + n] = out[k];
          }
        }
      }
      threadgroup_barrier(mem_flags::mem_device);
      for (int c = 0; c < CHUNK; ++c) {
        const long t = t0 + long(tid) * CHUNK + c;
        if (valid[c])
          for (int k = 0; k < K; ++k) h[c][k] = traj[((b * steps + t) * K + k) * N + n];
      }
      most_its = -1;
    } else if (most_its >= 0 && its > most_its) {
      most_its = its;
    }
    const long tile_end = (t0 + TILE < steps ? t0 + TILE : steps) - 1;
    for (int c = 0; c < CHUNK; ++c) {
      const long t = t0 + long(tid) * CHUNK + c;
      if (!valid[c]) continue;
      for (int k = 0; k < K; ++k) traj[((b * steps + t) * K + k) * N + n] = h[c][k];
      if (t == tile_end)
        for (int k = 0; k < K; ++k) sh_carry[k] = h[c][k];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int k = 0; k < K; ++k) carry[k] = sh_carry[k];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) iterations[seq] = most_its;
