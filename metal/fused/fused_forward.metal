// Fused Newton forward, body of an mx.fast.metal_kernel (assembled by pararnn_core.codegen.sources
// metal_kernel_sources: header = metal/common/pr_metal_common.metal + fused_math.metal + the generated cell
// + "typedef pr_cell_<cell> Cell;" + fused_header.metal).
// Same algorithm and layout as csrc/fused/fused_kernels.cuh (fused_newton_forward): threadgroups of PR_LANES
// channels x GROUPS time groups, tiles of GROUPS * CHUNK steps in registers across Newton iterations, damped
// update, per-channel convergence (a converged channel is frozen), per-sequence iterations and residual; the
// caller applies the failure policy to a sequence whose residual exceeds tol.
//
// Inputs: u [B, T, G, N] (without bias), params [P or 1, N], bias [G, N], h0 [B, K, N], resets [B, T] bool,
// dims int32 [B, T, N, max_its, has_bias, has_h0, has_resets], tol_damping float [2].
// Outputs: traj [B, T, K, N] float, iterations [B, N] int32, residual [B, N] float. Template: GROUPS, CHUNK.
// Dispatch (pararnn_mlx/fused.py metal_dispatch): grid (PR_LANES * B * ceil(N / PR_LANES), GROUPS, 1),
// threadgroup (PR_LANES, GROUPS, 1).

  constexpr int K = Cell::K, G = Cell::G, P = Cell::P > 0 ? Cell::P : 1;
  threadgroup float sh_last[GROUPS][K][PR_LANES];
  threadgroup float sh_residual[GROUPS][PR_LANES];
  threadgroup float sh_carry[K][PR_LANES];
  threadgroup float maps[GROUPS][K * K + K][PR_LANES];
  const long batch = dims[0], steps = dims[1], N = dims[2];
  const int max_its = dims[3];
  const bool has_bias = dims[4] != 0, has_h0 = dims[5] != 0, has_resets = dims[6] != 0;
  const float tol = tol_damping[0], damping = tol_damping[1];
  const long blocks = (N + PR_LANES - 1) / PR_LANES, block = threadgroup_position_in_grid.x;
  const int lane = thread_position_in_threadgroup.x, group = thread_position_in_threadgroup.y;
  const long b = block / blocks, n = (block % blocks) * PR_LANES + lane;
  const bool active = n < N;
  const long TILE = long(GROUPS) * CHUNK;
  float p[P], start[K], carry[K], bias_n[G];
  for (int q = 0; q < P; ++q) p[q] = active && Cell::P > 0 ? pr_load(params, q * N + n) : 0.0f;
  for (int i = 0; i < G; ++i) bias_n[i] = active && has_bias ? pr_load(bias, i * N + n) : 0.0f;
  for (int k = 0; k < K; ++k) carry[k] = start[k] = active && has_h0 ? pr_load(h0, (b * K + k) * N + n) : 0.0f;
  int most_its = 0;
  float worst = 0.0f;
  for (long t0 = 0; t0 < steps; t0 += TILE) {
    float h[CHUNK][K], g[CHUNK][G], A[CHUNK][K * K], rhs[CHUNK][K], fval[CHUNK][K];
    bool restart[CHUNK], valid[CHUNK];
    for (int c = 0; c < CHUNK; ++c) {
      const long t = t0 + group * CHUNK + c;
      valid[c] = active && t < steps;
      restart[c] = t == 0 || (valid[c] && has_resets && pr_load(resets, b * steps + t) != 0.0f);
      for (int i = 0; i < G; ++i) g[c][i] = valid[c] ? pr_load(u, ((b * steps + t) * G + i) * N + n) + bias_n[i] : 0.0f;
      const bool from_carry = t == t0 && !restart[c];
      float s0[K];
      for (int k = 0; k < K; ++k) s0[k] = from_carry ? carry[k] : start[k];
      Cell::step(s0, g[c], p, h[c]);
    }
    bool frozen = !active;
    int its = 0, channel_its = 0;
    float channel_residual = 0.0f;
    for (;; ++its) {
      for (int k = 0; k < K; ++k) sh_last[group][k][lane] = h[CHUNK - 1][k];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      float residual = 0.0f, prev[K];
      for (int k = 0; k < K; ++k) prev[k] = group > 0 ? sh_last[group - 1][k][lane] : carry[k];
      for (int c = 0; c < CHUNK; ++c) {
        const long t = t0 + group * CHUNK + c;
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
      sh_residual[group][lane] = residual;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (!frozen) {
        channel_residual = 0.0f;
        for (int y = 0; y < GROUPS; ++y)
          if (!(sh_residual[y][lane] <= channel_residual)) channel_residual = sh_residual[y][lane];
        if (channel_residual <= tol || its == max_its) {
          frozen = true;  // the final f (one free Picard step), then the channel stops
          channel_its = its;
          for (int c = 0; c < CHUNK; ++c)
            for (int k = 0; k < K; ++k) h[c][k] = fval[c][k];
        }
      }
      // every simdgroup holds all channels of the threadgroup: its vote is the threadgroup's
      if (simd_all(frozen)) break;
      float sumP[K * K], sumv[K];
      pr_affine_identity<K>(sumP, sumv);
      for (int c = 0; c < CHUNK; ++c) pr_affine_then<K>(sumP, sumv, A[c], rhs[c]);
      PR_PUBLISH_MAP(maps, K, group, lane, sumP, sumv);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (!frozen) {
        float x[K];
        for (int k = 0; k < K; ++k) x[k] = carry[k];
        PR_APPLY_MAPS(maps, K, 0, group, lane, x);
        for (int c = 0; c < CHUNK; ++c) {
          pr_affine_apply<K>(A[c], rhs[c], x);
          for (int k = 0; k < K; ++k) h[c][k] += damping * (x[k] - h[c][k]);
        }
      }
    }
    if (channel_its > most_its) most_its = channel_its;
    if (!(channel_residual <= worst)) worst = channel_residual;
    const long last = (t0 + TILE < steps ? t0 + TILE : steps) - 1;
    for (int c = 0; c < CHUNK; ++c) {
      const long t = t0 + group * CHUNK + c;
      if (valid[c])
        for (int k = 0; k < K; ++k) pr_store(traj, ((b * steps + t) * K + k) * N + n, h[c][k]);
      if (t == last)
        for (int k = 0; k < K; ++k) sh_carry[k][lane] = h[c][k];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int k = 0; k < K; ++k) carry[k] = sh_carry[k][lane];
  }
  if (active && group == 0) {
    iterations[b * N + n] = most_its;
    residual_out[b * N + n] = worst;
  }
