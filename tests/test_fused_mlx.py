"""mode='fused' in pararnn_mlx on the CPU (the shared generated library) against the sequential reference."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from pararnn_core.cell import get_cell  # noqa: E402
from pararnn_mlx import ParaRNN  # noqa: E402
from pararnn_mlx.fused import solve_fused  # noqa: E402
from pararnn_mlx.solver import solve_sequential  # noqa: E402
from pararnn_torch.selftest import SelftestCell  # noqa: E402

pytestmark = pytest.mark.skipif(mx.default_device().type != mx.cpu, reason="the MLX fused CPU path needs mx.cpu")


@pytest.mark.parametrize("cell", ["gru", "lstm", SelftestCell()], ids=lambda c: getattr(c, "name", c))
@pytest.mark.parametrize("steps, with_resets", [(1, False), (37, True), (300, True)])
def test_mlx_fused_equals_sequential(cell, steps, with_resets):
    cell = get_cell(cell)
    rng = np.random.default_rng(0)
    batch, channels = 2, 70
    u = mx.array(rng.normal(size=(batch, steps, cell.num_gates, channels)).astype(np.float32))
    rec = mx.array(0.5 * rng.normal(size=(len(cell.params), channels)).astype(np.float32))
    h0 = mx.array(rng.normal(size=(batch, cell.state_size, channels)).astype(np.float32))
    resets = mx.array(rng.random((batch, steps)) < 0.1) if with_resets else None
    weights = mx.array(rng.normal(size=(batch, steps, cell.state_size, channels)).astype(np.float32))

    bias = mx.array(rng.normal(size=(cell.num_gates, channels)).astype(np.float32))

    def loss(solve):
        return lambda u, rec, bias, h0: (solve(cell, u, rec, bias, h0, resets) * weights).sum()

    def fused_solve(cell, u, rec, bias, h0, resets):
        return solve_fused(cell, u, rec, h0, resets, None, bias)[0]

    def sequential_solve(cell, u, rec, bias, h0, resets):
        return solve_sequential(cell, u + bias, rec, h0, resets)[0]

    fused = mx.value_and_grad(loss(fused_solve), argnums=(0, 1, 2, 3))(u, rec, bias, h0)
    reference = mx.value_and_grad(loss(sequential_solve), argnums=(0, 1, 2, 3))(u, rec, bias, h0)
    np.testing.assert_allclose(np.asarray(fused[0]), np.asarray(reference[0]), rtol=1e-4, atol=1e-3)
    for got, want in zip(fused[1], reference[1]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_mlx_layer_auto_prefers_fused_on_cpu():
    layer = ParaRNN("lstm", 8, 16, num_heads=2)
    assert layer.resolved_mode() == "fused"
    x = mx.random.normal((2, 20, 8))
    y = layer(x)
    layer.mode = "sequential"
    np.testing.assert_allclose(np.asarray(y), np.asarray(layer(x)), rtol=1e-5, atol=1e-5)
