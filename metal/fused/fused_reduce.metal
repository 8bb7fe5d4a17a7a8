// Parameter-gradient reduction of the fused adjoint, body of an mx.fast.metal_kernel (header as
// fused_forward.metal): dparams [P or 1, N] and dbias [G, N] = sum over batch rows, in order, of
// partials [B, P + G, N]. One thread per channel (consecutive threads on consecutive channels).
// Inputs: partials, dims int32 [B, N]. Outputs: dparams, dbias. Dispatch: grid (N, 1, 1), threadgroup (256, 1, 1).

  constexpr int ROWS = Cell::P + Cell::G;
  const long batch = dims[0], N = dims[1], n = thread_position_in_grid.x;
  if (n >= N) return;
  if (Cell::P == 0) dparams[n] = 0.0f;
  for (int row = 0; row < ROWS; ++row) {
    float total = 0.0f;
    for (long b = 0; b < batch; ++b) total += pr_load(partials, (b * ROWS + row) * N + n);
    if (row < Cell::P)
      pr_store(dparams, row * N + n, total);
    else
      pr_store(dbias, (row - Cell::P) * N + n, total);
  }
