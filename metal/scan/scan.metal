// Structured linear scan, body of an mx.fast.metal_kernel (loaded by pararnn_mlx/metal_scan.py; header:
// metal/common/pr_metal_common.metal).
//
//   forward:  h_t = A_t h_{t-1} + b_t,  h_0 = h0 (or 0)
//   reverse:  h_t = A_t h_{t+1} + b_t,  h_{T+1} = h0 (or 0)
//
// Inputs: A [B, T, K, K, N], b [B, T, K, N], h0 [B, K, N] (ignored unless dims[4] != 0),
// dims = uint32 [B, T, N, reverse, has_h0]. Output: h [B, T, K, N]. Template: T (storage dtype; compute is
// float), K, GROUPS (time groups), CHUNK (steps per thread). The sequence length is an input, so new
// lengths reuse the build. Dispatch (pararnn_mlx/metal_scan.py dispatch()): threadgroups of PR_LANES
// channels x GROUPS, grid (PR_LANES * B * ceil(N / PR_LANES), GROUPS, 1).
//
// Same algorithm as csrc/scan/scan_kernel.cuh: per-thread chunk composed in registers, the groups' maps
// through threadgroup memory, each thread applying the earlier groups' maps to the carried state (and all of
// them to the carry for the next tile).

  threadgroup float maps[GROUPS][K * K + K][PR_LANES];

  const uint seq_len = dims[1], channels = dims[2];
  const bool reverse = dims[3] != 0, has_h0 = dims[4] != 0;
  const uint blocks = (channels + PR_LANES - 1) / PR_LANES;
  const uint block = threadgroup_position_in_grid.x;
  const uint batch = block / blocks, lane = thread_position_in_threadgroup.x;
  const uint channel = (block % blocks) * PR_LANES + lane;
  const int group = thread_position_in_threadgroup.y;
  const bool active = channel < channels;
  const uint tile_len = GROUPS * CHUNK;

  float carry[K];
  for (int i = 0; i < K; ++i) carry[i] = active && has_h0 ? pr_load(h0, (long(batch) * K + i) * channels + channel) : 0.0f;

  for (uint s0 = 0; s0 < seq_len; s0 += tile_len) {
    float a_reg[CHUNK][K * K], b_reg[CHUNK][K], P[K * K], v[K];
    pr_affine_identity<K>(P, v);
    for (int c = 0; c < CHUNK; ++c) {
      const uint s = s0 + group * CHUNK + c;
      const long t = reverse ? long(seq_len) - 1 - s : long(s);
      const bool valid = active && s < seq_len;
      for (int i = 0; i < K; ++i) {
        for (int j = 0; j < K; ++j)
          a_reg[c][i * K + j] =
              valid ? pr_load(A, ((long(batch) * seq_len + t) * K * K + i * K + j) * channels + channel) : float(i == j);
        b_reg[c][i] = valid ? pr_load(b, ((long(batch) * seq_len + t) * K + i) * channels + channel) : 0.0f;
      }
      pr_affine_then<K>(P, v, a_reg[c], b_reg[c]);
    }
    if (s0 > 0) threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile is done reading maps
    PR_PUBLISH_MAP(maps, K, group, lane, P, v);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float state[K];
    for (int i = 0; i < K; ++i) state[i] = carry[i];
    PR_APPLY_MAPS(maps, K, 0, group, lane, state);
    PR_APPLY_MAPS(maps, K, 0, GROUPS, lane, carry);
    for (int c = 0; c < CHUNK; ++c) {
      const uint s = s0 + group * CHUNK + c;
      pr_affine_apply<K>(a_reg[c], b_reg[c], state);
      if (active && s < seq_len) {
        const long t = reverse ? long(seq_len) - 1 - s : long(s);
        for (int i = 0; i < K; ++i) pr_store(h, ((long(batch) * seq_len + t) * K + i) * channels + channel, state[i]);
      }
    }
  }
