// Structured linear scan, body of an mx.fast.metal_kernel (loaded by pararnn_mlx/metal_scan.py).
//
//   forward:  h_t = A_t h_{t-1} + b_t,  h_0 = h0 (or 0)
//   reverse:  h_t = A_t h_{t+1} + b_t,  h_{T+1} = h0 (or 0)
//
// Inputs: A [B, T, K, K, N], b [B, T, K, N], h0 [B, K, N] (ignored unless
// dims[4] != 0), dims = uint32 [B, T, N, reverse, has_h0]. Output: h [B, T, K, N].
// Template: T (storage dtype; compute is float), K (block size), CHUNK (steps
// per thread). The sequence length is an input, so new lengths reuse the build.
// Dispatch: grid (threads, B * N, 1), threadgroup (threads, 1, 1), threads a
// multiple of 32 up to 1024: one threadgroup per (batch, channel) sequence.
//
// Same algorithm as csrc/scan_kernel.cuh: per-thread chunk composed in
// registers, simdgroup shuffle scan of the chunk maps, simdgroups combined
// through threadgroup memory, state carried from tile to tile.

  threadgroup float warp_maps[kScanMaxSimdgroups][K * K + K];
  threadgroup float carry[2][K];

  const uint seq_len = dims[1], channels = dims[2];
  const bool reverse = dims[3] != 0, has_h0 = dims[4] != 0;
  const uint seq = threadgroup_position_in_grid.y;
  const uint batch = seq / channels, channel = seq % channels;
  const uint tid = thread_position_in_threadgroup.x;
  const uint lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const uint threads = threads_per_threadgroup.x;
  const uint tile_len = threads * CHUNK;
  const uint num_tiles = (seq_len + tile_len - 1) / tile_len;

  if (tid < uint(K)) carry[0][tid] = has_h0 ? float(h0[(batch * K + tid) * channels + channel]) : 0.0f;

  for (uint tile = 0; tile < num_tiles; ++tile) {
    float a_reg[CHUNK][K][K], b_reg[CHUNK][K];
    ScanMap<K> mine;
    mine.set_identity();
    for (int c = 0; c < CHUNK; ++c) {
      const uint s = tile * tile_len + tid * CHUNK + c;
      const ulong t = reverse ? seq_len - 1 - s : s;
      ScanMap<K> step;
      for (int i = 0; i < K; ++i) {
        for (int j = 0; j < K; ++j) {
          step.P[i][j] = s < seq_len ? float(A[((ulong(batch) * seq_len + t) * K * K + i * K + j) * channels + channel])
                                     : (i == j ? 1.0f : 0.0f);
          a_reg[c][i][j] = step.P[i][j];
        }
        step.v[i] = s < seq_len ? float(b[((ulong(batch) * seq_len + t) * K + i) * channels + channel]) : 0.0f;
        b_reg[c][i] = step.v[i];
      }
      step.then_after(mine);
      mine = step;
    }
    ScanMap<K> inclusive = mine;
    for (ushort delta = 1; delta < 32; delta *= 2) {
      ScanMap<K> earlier;
      earlier.shuffle_up_from(inclusive, delta);
      if (lane >= delta) inclusive.then_after(earlier);
    }
    ScanMap<K> lane_before;
    lane_before.shuffle_up_from(inclusive, 1);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile is done reading warp_maps
    if (lane == 31 || tid == threads - 1) {
      for (int i = 0; i < K; ++i) {
        warp_maps[warp][K * K + i] = inclusive.v[i];
        for (int j = 0; j < K; ++j) warp_maps[warp][i * K + j] = inclusive.P[i][j];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float state[K];
    for (int i = 0; i < K; ++i) state[i] = carry[tile & 1][i];
    for (uint w = 0; w < warp; ++w) {
      float next[K];
      for (int i = 0; i < K; ++i) {
        next[i] = warp_maps[w][K * K + i];
        for (int j = 0; j < K; ++j) next[i] += warp_maps[w][i * K + j] * state[j];
      }
      for (int i = 0; i < K; ++i) state[i] = next[i];
    }
    if (lane > 0) lane_before.apply(state);
    for (int c = 0; c < CHUNK; ++c) {
      const uint s = tile * tile_len + tid * CHUNK + c;
      float next[K];
      for (int i = 0; i < K; ++i) {
        next[i] = b_reg[c][i];
        for (int j = 0; j < K; ++j) next[i] += a_reg[c][i][j] * state[j];
      }
      for (int i = 0; i < K; ++i) state[i] = next[i];
      if (s < seq_len) {
        const ulong t = reverse ? seq_len - 1 - s : s;
        for (int i = 0; i < K; ++i) h[((ulong(batch) * seq_len + t) * K + i) * channels + channel] = T(state[i]);
      }
    }
    if (tid == threads - 1) {
      for (int i = 0; i < K; ++i) carry[(tile + 1) & 1][i] = state[i];
    }
  }
