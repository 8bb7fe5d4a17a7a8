"""Fused Metal kernel bodies (metal/fused_*.metal + generated cells) in the CPU emulator vs the sequential reference.

The header and bodies are exactly what pararnn_mlx/fused.py hands to mx.fast.metal_kernel; the emulator
wraps them in MLX's signature. Small shapes: threadgroups of 32 threads, tiles of 128 steps.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from pararnn_core.codegen.sources import metal_kernel_sources
from tests.emulation.harness import compile_metal, have_compiler
from tests.test_fused_emulation import _CELLS_BY_NAME, _reference

pytestmark = pytest.mark.skipif(not have_compiler(), reason="the emulator needs g++")

THREADS, CHUNK = 32, 4


def _inputs(cell, batch, steps, channels, rng):
    return dict(
        u=rng.normal(size=(batch, steps, cell.num_gates, channels)),
        params=0.5 * rng.normal(size=(max(1, len(cell.params)), channels)),
        bias=0.3 * rng.normal(size=(cell.num_gates, channels)),
        h0=rng.normal(size=(batch, cell.state_size, channels)),
        resets=rng.random((batch, steps)) < 0.05,
    )


@functools.cache
def _kernels(cell_name, batch, steps, channels):
    cell = _CELLS_BY_NAME[cell_name]
    header, forward_body, adjoint_body = metal_kernel_sources(cell)
    example = {k: (v.astype(np.float32) if v.dtype != bool else v) for k, v in
               _inputs(cell, batch, steps, channels, np.random.default_rng(0)).items()}  # fmt: skip
    template = [("THREADS", THREADS), ("CHUNK", CHUNK)]
    forward = compile_metal(
        f"fused_forward_{cell_name}",
        forward_body,
        inputs=[*example.items(), ("dims", np.zeros(7, np.int32)), ("tol", np.zeros(1, np.float32))],
        outputs=[("traj", np.float32), ("iterations", np.int32)],
        template=template,
        header=header,
    )
    traj = np.zeros((batch, steps, cell.state_size, channels), np.float32)
    adjoint = compile_metal(
        f"fused_adjoint_{cell_name}",
        adjoint_body,
        inputs=[*example.items(), ("traj", traj), ("grad", traj), ("dims", np.zeros(6, np.int32))],
        outputs=[("du", np.float32), ("dparams", np.float32), ("dbias", np.float32), ("dh0", np.float32)],
        template=template,
        header=header,
    )
    return forward, adjoint


@pytest.mark.parametrize("cell_name", list(_CELLS_BY_NAME))
@pytest.mark.parametrize("steps", [1, 37, 300])
def test_emulated_metal_fused_equals_sequential(cell_name, steps):
    cell = _CELLS_BY_NAME[cell_name]
    batch, channels, k = 2, 3, cell.state_size
    rng = np.random.default_rng(steps)
    data = _inputs(cell, batch, steps, channels, rng)
    upstream = rng.normal(size=(batch, steps, k, channels))
    rec = data["params"][: len(cell.params)]
    want = _reference(cell, data["u"], rec, data["bias"], data["h0"], data["resets"], upstream)

    forward, adjoint = _kernels(cell_name, batch, steps, channels)
    f32 = {name: (v.astype(np.float32) if v.dtype != bool else v) for name, v in data.items()}
    dims = np.array([batch, steps, channels, 12, 1, 1, 1], np.int32)
    traj, iterations = forward(
        inputs=[*f32.values(), dims, np.array([1e-5], np.float32)],
        grid=(THREADS * batch * channels, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(batch, steps, k, channels), (batch * channels,)],
    )
    adjoint_dims = np.array([batch, steps, channels, 1, 1, 1], np.int32)
    d_u, d_params, d_bias, d_h0 = adjoint(
        inputs=[*f32.values(), traj, upstream.astype(np.float32), adjoint_dims],
        grid=(THREADS * channels, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[data["u"].shape, data["params"].shape, data["bias"].shape, data["h0"].shape],
    )
    assert np.all(iterations >= 0)
    got = [traj, d_u, d_params[: len(cell.params)], d_bias, d_h0]
    for name, value, expected in zip(["trajectory", "d_u", "d_params", "d_bias", "d_h0"], got, want):
        np.testing.assert_allclose(value, expected, rtol=2e-4, atol=2e-4, err_msg=name)
