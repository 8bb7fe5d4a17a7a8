"""mode='fused' on the MLX CPU inside mx.compile (e.g. mlx_lm.lora's compiled training step): no host
round trip in the traced graph; the exact sequential sweep runs there, with the same values and gradients."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from pararnn_core.cell import get_cell  # noqa: E402
from pararnn_mlx.fused import solve_fused  # noqa: E402

pytestmark = pytest.mark.skipif(mx.default_device().type != mx.cpu, reason="the MLX fused CPU path needs mx.cpu")


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fused_cpu_solve_under_compile_matches_uncompiled(cell):
    cell = get_cell(cell)
    rng = np.random.default_rng(0)
    batch, steps, channels = 2, 23, 12
    u = mx.array(rng.normal(size=(batch, steps, cell.num_gates, channels)).astype(np.float32))
    rec = mx.array(0.5 * rng.normal(size=(len(cell.params), channels)).astype(np.float32))
    h0 = mx.array(rng.normal(size=(batch, cell.state_size, channels)).astype(np.float32))
    resets = mx.array(rng.random((batch, steps)) < 0.2)
    weights = mx.array(rng.normal(size=(batch, steps, cell.state_size, channels)).astype(np.float32))
    modes = []

    def loss(u, rec, h0):
        traj, info = solve_fused(cell, u, rec, h0, resets)
        modes.append(info.mode)
        return (traj * weights).sum()

    step = mx.value_and_grad(loss, argnums=(0, 1, 2))
    eager = step(u, rec, h0)
    compiled = mx.compile(step)(u, rec, h0)
    assert modes == ["fused", "sequential"]  # the native sweep eagerly, its MLX-ops twin while tracing
    np.testing.assert_allclose(np.asarray(compiled[0]), np.asarray(eager[0]), rtol=1e-5, atol=1e-4)
    for got, want in zip(compiled[1], eager[1]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
