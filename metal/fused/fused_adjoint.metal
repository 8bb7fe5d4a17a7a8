// Fused adjoint, body of an mx.fast.metal_kernel (header as fused_forward.metal).
// Same algorithm as csrc/fused_kernels.cuh (fused_adjoint): one threadgroup per channel looping over the
// batch, so parameter and bias gradients are reduced over batch and time in the kernel. Per tile, from
// the last: lam_t = g_t + mask_{t+1} J_{t+1}^T lam_{t+1} as a reversed threadgroup scan, then the
// generated vjp at every step emits dL/du_t and accumulates dL/dparams, dL/dbias and (at restarts) dL/dh0.
//
// Inputs: u, params, bias, h0, resets as the forward, traj [B, T, K, N], grad [B, T, K, N],
// dims int32 [B, T, N, has_bias, has_h0, has_resets].
// Outputs: du [B, T, G, N], dparams [P or 1, N], dbias [G, N], dh0 [B, K, N]. Template: THREADS, CHUNK.
// Dispatch: grid (THREADS * N, 1, 1), threadgroup (THREADS, 1, 1).

  constexpr int K = Cell::K, G = Cell::G, P = Cell::P > 0 ? Cell::P : 1;
  threadgroup float shA[THREADS][K * K];
  threadgroup float shb[THREADS][K];
  threadgroup float sh_red[THREADS];
  threadgroup float sh_carry[K];
  const long batch = dims[0], steps = dims[1], N = dims[2];
  const bool has_bias = dims[3] != 0, has_h0 = dims[4] != 0, has_resets = dims[5] != 0;
  const long n = threadgroup_position_in_grid.x;
  const int tid = thread_position_in_threadgroup.x;
  const long TILE = long(THREADS) * CHUNK;
  float p[P], dp[P], db[G], bias_n[G];
  for (int q = 0; q < P; ++q) {
    p[q] = q < Cell::P ? params[q * N + n] : 0.0f;
    dp[q] = 0.0f;
  }
  for (int i = 0; i < G; ++i) {
    bias_n[i] = has_bias ? bias[i * N + n] : 0.0f;
    db[i] = 0.0f;
  }
  const long tiles = (steps + TILE - 1) / TILE;
  for (long b = 0; b < batch; ++b) {
    float start[K], carry[K], dstart[K];
    for (int k = 0; k < K; ++k) {
      start[k] = has_h0 ? h0[(b * K + k) * N + n] : 0.0f;
      carry[k] = dstart[k] = 0.0f;
    }
    for (long tile = tiles - 1; tile >= 0; --tile) {
      const long t0 = tile * TILE, t1 = (t0 + TILE < steps) ? t0 + TILE : steps;
      float A[CHUNK][K * K], gv[CHUNK][K];
      for (int c = 0; c < CHUNK; ++c) {
        const long t = t0 + long(tid) * CHUNK + c;
        for (int i = 0; i < K * K; ++i) A[c][i] = 0.0f;
        for (int k = 0; k < K; ++k) gv[c][k] = t < t1 ? grad[((b * steps + t) * K + k) * N + n] : 0.0f;
        if (t == t1 - 1)
          for (int k = 0; k < K; ++k) gv[c][k] += carry[k];
        const bool next_restarts = has_resets && t + 1 < t1 && resets[b * steps + t + 1];
        if (t + 1 < t1 && !next_restarts) {
          float s[K], g[G], out[K], jac[K * K];
          for (int k = 0; k < K; ++k) s[k] = traj[((b * steps + t) * K + k) * N + n];
          for (int i = 0; i < G; ++i) g[i] = u[((b * steps + t + 1) * G + i) * N + n] + bias_n[i];
          Cell::step_jacobian(s, g, p, out, jac);
          for (int i = 0; i < K; ++i)
            for (int j = 0; j < K; ++j) A[c][i * K + j] = jac[j * K + i];  // transposed
        }
      }
      // this thread's chunk from its last step to its first, then a suffix scan (position THREADS-1-tid)
      float sumA[K * K], sumb[K];
      for (int i = 0; i < K * K; ++i) sumA[i] = (i % (K + 1) == 0) ? 1.0f : 0.0f;
      for (int i = 0; i < K; ++i) sumb[i] = 0.0f;
      for (int c = CHUNK - 1; c >= 0; --c) pr_affine_after<K>(A[c], gv[c], sumA, sumb);
      const int pos = THREADS - 1 - tid;
      for (int offset = 1; offset < THREADS; offset <<= 1) {
        for (int i = 0; i < K * K; ++i) shA[pos][i] = sumA[i];
        for (int i = 0; i < K; ++i) shb[pos][i] = sumb[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (pos >= offset) {
          float laterA[K * K], laterb[K];
          for (int i = 0; i < K * K; ++i) laterA[i] = shA[pos - offset][i];
          for (int i = 0; i < K; ++i) laterb[i] = shb[pos - offset][i];
          pr_affine_compose<K>(sumA, sumb, laterA, laterb);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      // the tile's last step has A = 0: every suffix is the constant map to its b
      for (int k = 0; k < K; ++k) shb[pos][k] = sumb[k];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      float lam[K];
      for (int k = 0; k < K; ++k) lam[k] = pos > 0 ? shb[pos - 1][k] : 0.0f;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int c = CHUNK - 1; c >= 0; --c) {
        const long t = t0 + long(tid) * CHUNK + c;
        pr_affine_apply<K>(A[c], gv[c], lam);
        if (t >= t1) continue;
        const bool restart = t == 0 || (has_resets && resets[b * steps + t]);
        float s[K], g[G], d_s[K], d_u[G], d_p[P];
        for (int k = 0; k < K; ++k) s[k] = restart ? start[k] : traj[((b * steps + t - 1) * K + k) * N + n];
        for (int i = 0; i < G; ++i) g[i] = u[((b * steps + t) * G + i) * N + n] + bias_n[i];
        Cell::vjp(s, g, p, lam, d_s, d_u, d_p);
        for (int i = 0; i < G; ++i) {
          du[((b * steps + t) * G + i) * N + n] = d_u[i];
          db[i] += d_u[i];
        }
        for (int q = 0; q < Cell::P; ++q) dp[q] += d_p[q];
        for (int k = 0; k < K; ++k)
          if (restart) dstart[k] += d_s[k];
        if (t == t0)
          for (int k = 0; k < K; ++k) sh_carry[k] = restart ? 0.0f : d_s[k];
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int k = 0; k < K; ++k) carry[k] = sh_carry[k];
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    // threadgroup sums of dh0 for this batch row
    for (int k = 0; k < K; ++k) {
      sh_red[tid] = dstart[k];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int half_width = THREADS / 2; half_width > 0; half_width >>= 1) {
        if (tid < half_width) sh_red[tid] += sh_red[tid + half_width];
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      if (tid == 0) dh0[(b * K + k) * N + n] = sh_red[0];
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
  // threadgroup sums of the parameter and bias gradients (rows of P, then G)
  for (int r = 0; r < P + G; ++r) {
    sh_red[tid] = r < P ? dp[r] : db[r - P];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int half_width = THREADS / 2; half_width > 0; half_width >>= 1) {
      if (tid < half_width) sh_red[tid] += sh_red[tid + half_width];
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (tid == 0) {
      if (r < P) dparams[r * N + n] = sh_red[0];
      else dbias[(r - P) * N + n] = sh_red[0];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
