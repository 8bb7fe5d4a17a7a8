"""Fused CUDA kernels (csrc/fused_kernels.cuh + generated cells) run in the CPU emulator vs the sequential reference.

The same instantiations nvcc compiles (see test_fused_cuda_sources_compile_with_nvcc) run here with one
std::thread per GPU thread; shapes are small (blocks of 32 threads, tiles of 128 steps) so every path is hit:
several tiles with a carried state, a partial tile, T = 1, resets, h0, the sequential fallback, fp32 and fp64.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pararnn_core.cell import get_cell
from pararnn_core.codegen import cell_sources
from pararnn_torch.solver import solve_sequential
from tests.emulation.harness import CSRC, compile_cuda, have_compiler
from tests.test_fused import PeepholeCell

pytestmark = pytest.mark.skipif(not have_compiler(), reason="the emulator needs g++")

THREADS, CHUNK = 32, 4
CELLS = ["gru", "lstm", "mgu", PeepholeCell()]
_C_TYPES = {np.float32: "float", np.float64: "double"}


def _source(cell) -> str:
    return '#include "fused_kernels.cuh"\n' + cell_sources(cell).text("cuda")


@functools.cache
def _kernels(cell_key, dtype):
    cell = _CELLS_BY_NAME[cell_key]
    c = _C_TYPES[dtype]
    struct = cell_sources(cell).struct_name
    forward = compile_cuda(
        _source(cell),
        f"pararnn_fused::fused_newton_forward<{struct}, {c}, {c}, {THREADS}, {CHUNK}>",
        [f"const {c}*"] * 4 + ["const uint8_t*", f"{c}*", "int*", "int64_t", "int64_t", "int64_t", "int", c],
    )
    adjoint = compile_cuda(
        _source(cell),
        f"pararnn_fused::fused_adjoint<{struct}, {c}, {c}, {THREADS}, {CHUNK}>",
        [f"const {c}*"] * 4 + ["const uint8_t*", f"const {c}*", f"const {c}*"] + [f"{c}*"] * 4 + ["int64_t"] * 3,
    )
    return forward, adjoint


_CELLS_BY_NAME = {getattr(c, "name", c): get_cell(c) for c in CELLS}


def _reference(cell, u, rec, bias, h0, resets, upstream):
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (u, rec, bias, h0)]
    tu, trec, tbias, th0 = tensors
    traj, _ = solve_sequential(cell, tu + tbias, trec, th0, torch.tensor(resets))
    grads = torch.autograd.grad((traj * torch.tensor(upstream)).sum(), tensors)
    return [traj.detach().numpy()] + [g.numpy() for g in grads]


# float32 for every cell; float64 (tight tolerances) for a K=2 built-in and the test-local cell
CASES = [(name, steps, np.float32) for name in _CELLS_BY_NAME for steps in (1, 37, 300)] + [
    (name, steps, np.float64) for name in ("lstm", PeepholeCell.name) for steps in (37, 300)
]


@pytest.mark.parametrize("cell_name, steps, dtype", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_emulated_cuda_fused_equals_sequential(cell_name, steps, dtype):
    cell = _CELLS_BY_NAME[cell_name]
    rng = np.random.default_rng(steps)
    batch, channels, k, g = 2, 3, cell.state_size, cell.num_gates
    u = rng.normal(size=(batch, steps, g, channels))
    rec = 0.5 * rng.normal(size=(len(cell.params), channels))
    bias = 0.3 * rng.normal(size=(g, channels))
    h0 = rng.normal(size=(batch, k, channels))
    resets = rng.random((batch, steps)) < 0.05
    upstream = rng.normal(size=(batch, steps, k, channels))
    want = _reference(cell, u, rec, bias, h0, resets, upstream)

    forward, adjoint = _kernels(cell_name, dtype)
    cast = [np.ascontiguousarray(a, dtype=dtype) for a in (u, rec, bias, h0, upstream)]
    flags = resets.astype(np.uint8)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    traj = np.full((batch, steps, k, channels), np.nan, dtype)
    iterations = np.zeros(batch * channels, np.int32)
    forward(grid=(batch * channels,), block=(THREADS,),
            args=[*cast[:4], flags, traj, iterations, batch, steps, channels, 12, tol])  # fmt: skip
    d_u = np.full_like(cast[0], np.nan)
    d_rec, d_bias, d_h0 = (np.full_like(a, np.nan) for a in cast[1:4])
    adjoint(grid=(channels,), block=(THREADS,),
            args=[*cast[:4], flags, traj, cast[4], d_u, d_rec, d_bias, d_h0, batch, steps, channels])  # fmt: skip

    assert np.all(iterations >= 0), "Newton fell back to the sequential sweep on a well-conditioned problem"
    rtol, atol = (2e-4, 2e-4) if dtype == np.float32 else (1e-9, 1e-9)
    names = ["trajectory", "d_u", "d_recurrent", "d_bias", "d_h0"]
    for name, got, expected in zip(names, [traj, d_u, d_rec, d_bias, d_h0], want):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=name)


def test_emulated_cuda_fused_falls_back_exactly_when_newton_stops_early():
    cell = _CELLS_BY_NAME["lstm"]
    rng = np.random.default_rng(5)
    batch, steps, channels = 1, 150, 2
    u = rng.normal(size=(batch, steps, 3, channels))
    rec, bias = rng.normal(size=(5, channels)), np.zeros((3, channels))
    h0, resets = np.zeros((batch, 2, channels)), np.zeros((batch, steps), bool)
    want = _reference(cell, u, rec, bias, h0, resets, np.zeros((batch, steps, 2, channels)))[0]
    forward, _ = _kernels("lstm", np.float64)
    traj = np.full((batch, steps, 2, channels), np.nan)
    iterations = np.zeros(batch * channels, np.int32)
    max_its, tol = 1, 1e-14  # one Newton step cannot reach 1e-14 on 150 steps: the tile must fall back
    args = [u, rec, bias, h0, resets.astype(np.uint8), traj, iterations, batch, steps, channels, max_its, tol]
    forward(grid=(batch * channels,), block=(THREADS,), args=args)
    assert np.all(iterations == -1)
    np.testing.assert_allclose(traj, want, rtol=1e-12, atol=1e-12)


def _cuda_home():
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
        return home
    nvcc = shutil.which("nvcc")
    for candidate in ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(candidate, "include", "cuda_runtime_api.h")):
            return candidate
    return None


@pytest.mark.skipif(shutil.which("nvcc") is None or _cuda_home() is None, reason="nvcc / CUDA toolkit not installed")
def test_fused_cuda_sources_compile_with_nvcc(tmp_path):
    """csrc/fused_cuda.cu (built-in cells) plus the test-local cell, fp32/fp64/fp16/bf16, for sm_80 and sm_90."""
    user = PeepholeCell()
    unit = tmp_path / "fused_all.cu"
    instantiate = f"PR_FUSED_CUDA_CELL({user.name}, pr_cell_{user.name})"
    unit.write_text(f'#include "fused_cuda.cu"\n{cell_sources(user).text("cuda")}\n{instantiate}\n')
    out = subprocess.run(
        ["nvcc", "-c", "-std=c++17", "-O3", f"-I{CSRC / 'fused'}", "-gencode=arch=compute_80,code=sm_80",
         "-gencode=arch=compute_90,code=sm_90", str(unit), "-o", str(tmp_path / "fused_all.o")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_HOME": _cuda_home()},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
