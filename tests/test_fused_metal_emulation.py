"""The fused Metal kernels in the CPU emulator vs a float64 sequential reference, as pararnn_mlx/fused.py ships
them: its header and bodies (pararnn_core.codegen.sources.metal_kernel_sources), its template and its dispatch
(metal_template, metal_dispatch, metal_reduce_dispatch), forward, adjoint and the ordered parameter reduction.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from pararnn_core.codegen.sources import metal_kernel_sources
from tests.emulation.harness import access_report, compile_metal, have_compiler, reset_access_report
from tests.test_fused_emulation import CELLS, TILE, _aligned, _problem, _reference

pytestmark = pytest.mark.skipif(not have_compiler(), reason="the emulator needs g++")
fused = pytest.importorskip("pararnn_mlx.fused")


@functools.cache
def _kernels(cell_name):
    cell = CELLS[cell_name]
    header, forward_body, adjoint_body, reduce_body = metal_kernel_sources(cell)
    pb = _problem(cell, 1, 2, 2, seed=0)
    example = [("u", pb["u"]), ("params", pb["rec"]), ("bias", pb["bias"]), ("h0", pb["h0"])]
    example = [(n, v.astype(np.float32)) for n, v in example] + [("resets", pb["resets"])]
    forward = compile_metal(
        f"fused_forward_{cell_name}",
        forward_body,
        inputs=[*example, ("dims", np.zeros(7, np.int32)), ("tol_damping", np.zeros(2, np.float32))],
        outputs=[("traj", np.float32), ("iterations", np.int32), ("residual_out", np.float32)],
        template=fused.metal_template(),
        header=header,
    )
    traj = np.zeros((1, 2, cell.state_size, 2), np.float32)
    adjoint = compile_metal(
        f"fused_adjoint_{cell_name}",
        adjoint_body,
        inputs=[*example, ("traj", traj), ("grad", traj), ("dims", np.zeros(6, np.int32))],
        outputs=[("du", np.float32), ("partials", np.float32), ("dh0", np.float32)],
        template=fused.metal_template(),
        header=header,
    )
    reduce = compile_metal(
        f"fused_reduce_{cell_name}",
        reduce_body,
        inputs=[("partials", traj), ("dims", np.zeros(2, np.int32))],
        outputs=[("dparams", np.float32), ("dbias", np.float32)],
        header=header,
    )
    return forward, adjoint, reduce


def run_metal_fused(cell_name, pb, max_its=12, tol=1e-6, damping=1.0):
    cell = CELLS[cell_name]
    forward, adjoint, reduce = _kernels(cell_name)
    batch, steps, gates, channels = pb["u"].shape
    k, rows = cell.state_size, len(cell.params)
    f32 = [_aligned(pb[n].astype(np.float32)) for n in ("u", "rec", "bias", "h0")]
    if rows == 0:
        f32[1] = np.zeros((1, channels), np.float32)
    inputs = [*f32, pb["resets"]]
    grid, group = fused.metal_dispatch(batch, channels)
    dims = np.array([batch, steps, channels, max_its, 1, 1, 1], np.int32)
    traj, iterations, residual = forward(
        inputs=[*inputs, dims, np.array([tol, damping], np.float32)], grid=grid, threadgroup=group,
        output_shapes=[(batch, steps, k, channels), (batch, channels), (batch, channels)],
    )  # fmt: skip
    d_u, partials, d_h0 = adjoint(
        inputs=[*inputs, _aligned(traj), _aligned(pb["upstream"].astype(np.float32)),
                np.array([batch, steps, channels, 1, 1, 1], np.int32)],
        grid=grid, threadgroup=group,
        output_shapes=[pb["u"].shape, (batch, rows + gates, channels), (batch, k, channels)],
    )  # fmt: skip
    reduce_grid, reduce_group = fused.metal_reduce_dispatch(channels)
    d_params, d_bias = reduce(
        inputs=[_aligned(partials), np.array([batch, channels], np.int32)], grid=reduce_grid,
        threadgroup=reduce_group, output_shapes=[(max(1, rows), channels), (gates, channels)],
    )  # fmt: skip
    return [traj, d_u, d_params[:rows], d_bias, d_h0], iterations, residual


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("steps", [1, TILE + 13])
def test_emulated_metal_fused_equals_sequential(cell_name, steps):
    cell = CELLS[cell_name]
    pb = _problem(cell, batch=2, steps=steps, channels=37, seed=steps)
    want = _reference(cell, pb["u"], pb["rec"], pb["bias"], pb["h0"], pb["resets"], pb["upstream"])
    got, iterations, residual = run_metal_fused(cell_name, pb)
    assert np.all(residual <= 1e-6) and np.all((iterations >= 0) & (iterations <= 12)), (iterations, residual)
    for name, value, expected in zip(["trajectory", "d_u", "d_params", "d_bias", "d_h0"], got, want):
        np.testing.assert_allclose(value, expected, rtol=2e-4, atol=2e-4, err_msg=name)


def test_emulated_metal_fused_reports_a_sequence_that_did_not_converge():
    pb = _problem(CELLS["lstm"], batch=1, steps=TILE + 20, channels=3, seed=5)
    _, iterations, residual = run_metal_fused("lstm", pb, max_its=1, tol=1e-12)
    assert np.all(iterations == 1) and np.all(residual > 1e-12), (iterations, residual)


def test_emulated_metal_fused_kernels_are_coalesced():
    """Sector efficiency of the fused Metal kernels, float32, B=4, N=256, GRU; T=256 instead of 2048."""
    kernels = _kernels("gru")
    for kernel in kernels:
        reset_access_report(kernel._dll)
    run_metal_fused("gru", _problem(CELLS["gru"], batch=4, steps=256, channels=256, seed=1))
    for kernel in kernels:
        ((name, (_, useful, sectors)),) = access_report(kernel._dll).items()
        print(f"{useful / sectors:6.1%}  metal {name}")
        assert useful / sectors >= 0.5, f"{name}: {useful / sectors:.1%}"


def test_emulated_metal_fused_is_bitwise_reproducible_across_schedules(monkeypatch):
    """Same results, bit for bit, and the same iteration counts whatever order threadgroups and threads run in."""
    pb = _problem(CELLS["lstm"], batch=2, steps=TILE + 10, channels=8, seed=11)
    runs = []
    for seed in range(4):
        monkeypatch.setenv("PARARNN_EMU_SEED", str(seed))
        runs.append(run_metal_fused("lstm", pb))
    for outs, iterations, residual in runs[1:]:
        np.testing.assert_array_equal(iterations, runs[0][1])
        np.testing.assert_array_equal(residual, runs[0][2])
        for got, first in zip(outs, runs[0][0]):
            np.testing.assert_array_equal(got, first)
