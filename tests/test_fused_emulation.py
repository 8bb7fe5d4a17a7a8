"""The shipped fused CUDA kernels run in the CPU emulator against a float64 sequential reference.

What runs is what ships: the extern "C" entry points of csrc/fused/fused_cuda_launch.cuh (PR_FUSED_CUDA_CELL,
as csrc/fused/fused_cuda.cu builds them for the built-in cells), so the launch geometry, the template
instances and the ordered parameter reduction are the ones a GPU gets. Cells: GRU, LSTM, MGU and a test-local
user cell; storage float32, float64, float16 and bfloat16 (software half types in the emulator); T from 1 to
beyond one tile; a partial channel block. The tile length is read from the launch header itself.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pararnn_core.cell import get_cell
from pararnn_core.codegen import cell_sources
from pararnn_torch.selftest import SelftestCell
from pararnn_torch.solver import solve_sequential
from tests.emulation.harness import (
    CSRC,
    access_report,
    compile_cuda_library,
    cuda_entry,
    have_compiler,
    reset_access_report,
)

pytestmark = pytest.mark.skipif(not have_compiler(), reason="the emulator needs g++")

_LAUNCH_HEADER = (CSRC / "fused" / "fused_cuda_launch.cuh").read_text()


def _launch_constant(name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (\d+);", _LAUNCH_HEADER).group(1))


TILE = _launch_constant("kGroups") * _launch_constant("kChunk")
CELLS = {c if isinstance(c, str) else c.name: get_cell(c) for c in ["gru", "lstm", "mgu", SelftestCell()]}
_ARRAY = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "bf16": np.uint16}


def _to_storage(a, dtype):
    if dtype == "bf16":  # round to nearest even, as __float2bfloat16_rn
        bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(a, _ARRAY[dtype])


def _from_storage(a, dtype):
    if dtype == "bf16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def _aligned(a):
    """A copy on a 256-byte boundary, as cudaMalloc returns (sector counts depend on alignment)."""
    raw = np.empty(a.nbytes + 256, np.uint8)
    offset = (-raw.ctypes.data) % 256
    out = raw[offset : offset + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@functools.cache
def _library(cell_name):
    cell = CELLS[cell_name]
    sources = cell_sources(cell)
    instantiate = f"PR_FUSED_CUDA_CELL({cell_name}, {sources.struct_name})"
    text = f'#include "fused_cuda_launch.cuh"\n{sources.text("cuda")}\n{instantiate}\n'
    return compile_cuda_library(text)


def _entries(cell_name, dtype):
    dll = _library(cell_name)
    forward = cuda_entry(dll, f"pr_fused_cuda_forward_{cell_name}_{dtype}",
                         ["void*"] * 4 + ["const uint8_t*", "void*", "int*", "float*", "int64_t", "int64_t", "int64_t",
                                          "int", "double", "double", "void*"])  # fmt: skip
    workspace_name = f"pr_fused_cuda_adjoint_workspace_{cell_name}_{dtype}"
    workspace = cuda_entry(dll, workspace_name, ["int64_t"] * 3, ctypes.c_size_t)
    adjoint = cuda_entry(dll, f"pr_fused_cuda_adjoint_{cell_name}_{dtype}",
                         ["void*"] * 4 + ["const uint8_t*"] + ["void*"] * 7 + ["int64_t"] * 3 + ["void*"])  # fmt: skip
    return dll, forward, workspace, adjoint


def _reference(cell, u, rec, bias, h0, resets, upstream):
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (u, rec, bias, h0)]
    tu, trec, tbias, th0 = tensors
    traj, _ = solve_sequential(cell, tu + tbias, trec, th0, torch.tensor(resets))
    grads = torch.autograd.grad((traj * torch.tensor(upstream)).sum(), tensors)
    return [traj.detach().numpy()] + [g.numpy() for g in grads]


def _problem(cell, batch, steps, channels, seed):
    rng = np.random.default_rng(seed)
    k, g = cell.state_size, cell.num_gates
    return dict(
        u=rng.normal(size=(batch, steps, g, channels)),
        rec=0.5 * rng.normal(size=(len(cell.params), channels)),
        bias=0.3 * rng.normal(size=(g, channels)),
        h0=rng.normal(size=(batch, k, channels)),
        resets=rng.random((batch, steps)) < 0.05,
        upstream=rng.normal(size=(batch, steps, k, channels)),
    )


def run_fused(cell_name, dtype, pb, max_its=12, tol=None, damping=1.0):
    """Forward and adjoint through the shipped entry points; returns outputs as float64 plus the report."""
    cell = CELLS[cell_name]
    dll, forward, workspace_bytes, adjoint = _entries(cell_name, dtype)
    batch, steps, _, channels = pb["u"].shape
    k = cell.state_size
    u, rec, bias, h0, grad = (_aligned(_to_storage(pb[n], dtype)) for n in ("u", "rec", "bias", "h0", "upstream"))
    flags = _aligned(pb["resets"].astype(np.uint8))
    tol = tol if tol is not None else (1e-10 if dtype == "f64" else 1e-6)
    traj = _aligned(np.full((batch, steps, k, channels), 0xFFFF if dtype == "bf16" else np.nan, u.dtype))
    iterations = _aligned(np.full((batch, channels), -7, np.int32))
    residual = _aligned(np.full((batch, channels), np.nan, np.float32))
    forward(u, rec, bias, h0, flags, traj, iterations, residual, batch, steps, channels, max_its, tol, damping, None)
    d_u = _aligned(np.full_like(u, 0xFFFF if dtype == "bf16" else np.nan))
    d_rec, d_bias, d_h0 = (_aligned(np.full_like(a, 0xFFFF if dtype == "bf16" else np.nan)) for a in (rec, bias, h0))
    size = workspace_bytes(batch, steps, channels)
    work = _aligned(np.full(max(size, 1), 0xFF, np.uint8))
    adjoint(u, rec, bias, h0, flags, traj, grad, d_u, d_rec, d_bias, d_h0, work, batch, steps, channels, None)
    outs = [_from_storage(a, dtype) for a in (traj, d_u, d_rec, d_bias, d_h0)]
    return outs, iterations, residual


_TOLERANCE = {"f32": 2e-4, "f64": 1e-9, "f16": 3e-2, "bf16": 1.5e-1}
CASES = (
    [(name, "f32", steps) for name in CELLS for steps in (1, TILE + 13)]
    + [(name, "f64", 2 * TILE + 5) for name in ("lstm", SelftestCell.name)]
    + [(name, dtype, TILE + 5) for name in ("gru", "lstm") for dtype in ("f16", "bf16")]
)


@pytest.mark.parametrize("cell_name, dtype, steps", CASES)
def test_emulated_cuda_fused_equals_sequential(cell_name, dtype, steps):
    cell = CELLS[cell_name]
    pb = _problem(cell, batch=2, steps=steps, channels=37, seed=steps)  # 37: a full and a partial channel block
    if dtype in ("f16", "bf16"):  # the reference sees the rounded inputs
        pb = {n: (_from_storage(_to_storage(v, dtype), dtype) if n != "resets" else v) for n, v in pb.items()}
    want = _reference(cell, pb["u"], pb["rec"], pb["bias"], pb["h0"], pb["resets"], pb["upstream"])
    got, iterations, residual = run_fused(cell_name, dtype, pb)
    tol = 1e-10 if dtype == "f64" else 1e-6
    if dtype in ("f32", "f64"):
        assert np.all(residual <= tol) and np.all((iterations >= 0) & (iterations <= 12)), (iterations, residual)
    scale = _TOLERANCE[dtype]
    for name, g, w in zip(["trajectory", "d_u", "d_recurrent", "d_bias", "d_h0"], got, want):
        np.testing.assert_allclose(g, w, rtol=scale, atol=scale * max(1.0, np.abs(w).max() / 10), err_msg=name)


def test_emulated_cuda_fused_damping_reaches_the_same_solution_in_more_iterations():
    pb = _problem(CELLS["gru"], batch=1, steps=TILE + 3, channels=5, seed=3)
    (traj_full, *_), its_full, _ = run_fused("gru", "f64", pb)
    (traj_damped, *_), its_damped, residual = run_fused("gru", "f64", pb, max_its=60, damping=0.5)
    assert np.all(residual <= 1e-10)
    assert its_damped.min() > its_full.max()
    np.testing.assert_allclose(traj_damped, traj_full, rtol=1e-9, atol=1e-9)


def test_emulated_cuda_fused_reports_a_sequence_that_did_not_converge():
    pb = _problem(CELLS["lstm"], batch=1, steps=TILE + 20, channels=3, seed=5)
    _, iterations, residual = run_fused("lstm", "f64", pb, max_its=1, tol=1e-14)
    assert np.all(iterations == 1) and np.all(residual > 1e-14), (iterations, residual)


def test_emulated_cuda_fused_kernels_are_coalesced():
    """Sector efficiency of every fused kernel, float32, B=4, N=256; T=256 instead of 2048 (the emulator runs
    each GPU thread as a CPU thread; efficiency does not depend on T beyond the first tiles)."""
    rows = []
    for name in ("gru", "lstm"):
        dll = _library(name)
        reset_access_report(dll)
        run_fused(name, "f32", _problem(CELLS[name], batch=4, steps=256, channels=256, seed=1))
        for kernel, (accesses, useful, sectors) in access_report(dll).items():
            if "<" in kernel and ", float, float" in kernel:
                rows.append((kernel.split("(")[0], accesses, useful / sectors))
    print("\n".join(f"{eff:6.1%}  {acc:8d} warp accesses  {k}" for k, acc, eff in rows))
    assert len(rows) == 6
    for kernel, _, efficiency in rows:
        assert efficiency >= 0.5, f"{kernel}: {efficiency:.1%} sector efficiency"


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
    """csrc/fused/fused_cuda.cu (built-in cells) plus the test-local cell, fp32/fp64/fp16/bf16, for sm_80."""
    user = SelftestCell()
    unit = tmp_path / "fused_all.cu"
    instantiate = f"PR_FUSED_CUDA_CELL({user.name}, pr_cell_{user.name})"
    unit.write_text(f'#include "fused_cuda.cu"\n{cell_sources(user).text("cuda")}\n{instantiate}\n')
    out = subprocess.run(
        ["nvcc", "-c", "-std=c++17", "-O3", f"-I{CSRC / 'fused'}", "-gencode=arch=compute_80,code=sm_80",
         str(unit), "-o", str(tmp_path / "fused_all.o")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_HOME": _cuda_home()},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]


def test_emulated_cuda_fused_is_bitwise_reproducible_across_schedules(monkeypatch):
    """Same results, bit for bit, and the same iteration counts whatever order the blocks and threads run in
    (no atomics; every shared value read after the barrier that publishes it)."""
    pb = _problem(CELLS["lstm"], batch=2, steps=TILE + 10, channels=8, seed=11)
    runs = []
    for seed in range(4):
        monkeypatch.setenv("PARARNN_EMU_SEED", str(seed))
        runs.append(run_fused("lstm", "f32", pb))
    for outs, iterations, residual in runs[1:]:
        np.testing.assert_array_equal(iterations, runs[0][1])
        np.testing.assert_array_equal(residual, runs[0][2])
        for got, first in zip(outs, runs[0][0]):
            np.testing.assert_array_equal(got, first)


def test_emulated_cuda_fused_empty_sequences_give_zero_gradients():
    pb = _problem(CELLS["gru"], batch=2, steps=0, channels=5, seed=0)
    (traj, d_u, d_rec, d_bias, d_h0), _, _ = run_fused("gru", "f32", pb)
    assert traj.size == 0 and d_u.size == 0
    for grad in (d_rec, d_bias, d_h0):
        np.testing.assert_array_equal(grad, 0.0)
