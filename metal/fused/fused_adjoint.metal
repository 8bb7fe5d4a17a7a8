// Fused adjoint, body of an mx.fast.metal_kernel (header as fused_forward.metal).
// Same algorithm and layout as csrc/fused/fused_kernels.cuh (fused_adjoint): one threadgroup per (batch row,
// PR_LANES channels), tiles from the last, lam_t = g_t + mask_{t+1} J_{t+1}^T lam_{t+1} through the groups'
// maps, then the generated vjp at every step emits dL/du_t and dL/dh0; parameter and bias gradients are summed
// over the groups in a fixed order into per-batch-row partials, which fused_reduce.metal sums over the batch
// in order (deterministic, no atomics).
//
// Inputs: u, params, bias, h0, resets as the forward, traj [B, T, K, N], grad [B, T, K, N],
// dims int32 [B, T, N, has_bias, has_h0, has_resets].
// Outputs: du [B, T, G, N], partials [B, P + G, N], dh0 [B, K, N]. Template: GROUPS, CHUNK.
// Dispatch: as the forward.

  constexpr int K = Cell::K, G = Cell::G, P = Cell::P > 0 ? Cell::P : 1;
  constexpr int ROWS = Cell::P + G + K;  // per-thread sums: parameter rows, bias rows, h0 rows
  constexpr int REDUCE_ROWS = 8;         // rows summed over the groups per round
  threadgroup float sh_carry[K][PR_LANES];
  threadgroup float sh_sum[REDUCE_ROWS][GROUPS][PR_LANES];
  threadgroup float maps[GROUPS][K * K + K][PR_LANES];
  const long batch = dims[0], steps = dims[1], N = dims[2];
  const bool has_bias = dims[3] != 0, has_h0 = dims[4] != 0, has_resets = dims[5] != 0;
  const long blocks = (N + PR_LANES - 1) / PR_LANES, block = threadgroup_position_in_grid.x;
  const int lane = thread_position_in_threadgroup.x, group = thread_position_in_threadgroup.y;
  const long b = block / blocks, n = (block % blocks) * PR_LANES + lane;
  const bool active = n < N;
  const long TILE = long(GROUPS) * CHUNK;
  float p[P], bias_n[G], start[K], carry[K], sums[ROWS];
  for (int q = 0; q < P; ++q) p[q] = active && Cell::P > 0 ? pr_load(params, q * N + n) : 0.0f;
  for (int i = 0; i < G; ++i) bias_n[i] = active && has_bias ? pr_load(bias, i * N + n) : 0.0f;
  for (int k = 0; k < K; ++k) {
    start[k] = active && has_h0 ? pr_load(h0, (b * K + k) * N + n) : 0.0f;
    carry[k] = 0.0f;
  }
  for (int r = 0; r < ROWS; ++r) sums[r] = 0.0f;
  const long tiles = (steps + TILE - 1) / TILE;
  for (long tile = tiles - 1; tile >= 0; --tile) {
    const long t0 = tile * TILE, t1 = (t0 + TILE < steps) ? t0 + TILE : steps;
    float A[CHUNK][K * K], gv[CHUNK][K];
    for (int c = 0; c < CHUNK; ++c) {
      const long t = t0 + group * CHUNK + c;
      const bool valid = active && t < t1;
      for (int i = 0; i < K * K; ++i) A[c][i] = 0.0f;
      for (int k = 0; k < K; ++k) gv[c][k] = valid ? pr_load(grad, ((b * steps + t) * K + k) * N + n) : 0.0f;
      if (t == t1 - 1)
        for (int k = 0; k < K; ++k) gv[c][k] += carry[k];
      const bool linked = active && t + 1 < t1 && !(has_resets && pr_load(resets, b * steps + t + 1) != 0.0f);
      if (linked) {
        float s[K], gates[G], out[K], jac[K * K];
        for (int k = 0; k < K; ++k) s[k] = pr_load(traj, ((b * steps + t) * K + k) * N + n);
        for (int i = 0; i < G; ++i) gates[i] = pr_load(u, ((b * steps + t + 1) * G + i) * N + n) + bias_n[i];
        Cell::step_jacobian(s, gates, p, out, jac);
        for (int i = 0; i < K; ++i)
          for (int j = 0; j < K; ++j) A[c][i * K + j] = jac[j * K + i];
      }
    }
    float sumP[K * K], sumv[K];
    pr_affine_identity<K>(sumP, sumv);
    for (int c = CHUNK - 1; c >= 0; --c) pr_affine_then<K>(sumP, sumv, A[c], gv[c]);
    const int position = GROUPS - 1 - group;  // scan order: the last group first
    PR_PUBLISH_MAP(maps, K, position, lane, sumP, sumv);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float lam[K];
    for (int k = 0; k < K; ++k) lam[k] = 0.0f;
    PR_APPLY_MAPS(maps, K, 0, position, lane, lam);
    for (int c = CHUNK - 1; c >= 0; --c) {
      const long t = t0 + group * CHUNK + c;
      pr_affine_apply<K>(A[c], gv[c], lam);
      if (!active || t >= t1) continue;
      const bool restart = t == 0 || (has_resets && pr_load(resets, b * steps + t) != 0.0f);
      float s[K], gates[G], d_s[K], d_u[G], d_p[P];
      for (int k = 0; k < K; ++k) s[k] = restart ? start[k] : pr_load(traj, ((b * steps + t - 1) * K + k) * N + n);
      for (int i = 0; i < G; ++i) gates[i] = pr_load(u, ((b * steps + t) * G + i) * N + n) + bias_n[i];
      Cell::vjp(s, gates, p, lam, d_s, d_u, d_p);
      for (int i = 0; i < G; ++i) {
        pr_store(du, ((b * steps + t) * G + i) * N + n, d_u[i]);
        sums[Cell::P + i] += d_u[i];
      }
      for (int q = 0; q < Cell::P; ++q) sums[q] += d_p[q];
      if (restart)
        for (int k = 0; k < K; ++k) sums[Cell::P + G + k] += d_s[k];
      if (t == t0)
        for (int k = 0; k < K; ++k) sh_carry[k][lane] = restart ? 0.0f : d_s[k];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int k = 0; k < K; ++k) carry[k] = sh_carry[k][lane];
  }
  for (int r0 = 0; r0 < ROWS; r0 += REDUCE_ROWS) {
    if (r0 > 0) threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous round is done reading sh_sum
    for (int j = 0; j < REDUCE_ROWS; ++j)
      if (r0 + j < ROWS) sh_sum[j][group][lane] = sums[r0 + j];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = group; j < REDUCE_ROWS; j += GROUPS) {
      const int r = r0 + j;
      if (r >= ROWS || !active) continue;
      float total = 0.0f;
      for (int y = 0; y < GROUPS; ++y) total += sh_sum[j][y][lane];
      if (r < Cell::P + G)
        pr_store(partials, (b * (Cell::P + G) + r) * N + n, total);
      else
        pr_store(dh0, (b * K + (r - Cell::P - G)) * N + n, total);
    }
  }
