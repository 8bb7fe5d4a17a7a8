"""``mode="fused"`` for MLX: generated kernels on the CPU (shared with pararnn_torch) and on Metal.

CPU: the compiled sweep/adjoint library from pararnn_core.codegen (ctypes, no
torch). Metal: metal/fused/fused_forward.metal (Newton solve in one kernel, per-sequence iterations and
residual; on_failure applied here), metal/fused/fused_adjoint.metal and fused_reduce.metal (ordered
parameter-gradient reduction) with the generated cell functions, built with ``mx.fast.metal_kernel``.
Either way an ``mx.custom_function`` whose vjp is the
adjoint kernel, so ``mx.grad`` gets dL/du, dL/drecurrent and dL/dh0 from one
reverse pass. (The Metal kernels are verified in the CPU emulator,
tests/test_fused_metal_emulation.py; no Mac was available to run them.)
"""

from __future__ import annotations

import functools
import weakref

import mlx.core as mx
import numpy as np

from pararnn_core.cell import Cell
from pararnn_core.codegen import CodegenError, NativeBuildError, definition_hash, load_cpu_library
from pararnn_core.codegen.native import compiler
from pararnn_core.codegen.sources import metal_kernel_sources
from pararnn_core.newton import NewtonConfig, SolveInfo, report_nonconvergence
from pararnn_mlx.ops import from_numpy
from pararnn_mlx.solver import refuse_second_order, solve_sequential

_libraries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _library_for(cell: Cell):
    lib = _libraries.get(cell)
    if lib is None:
        lib = _libraries[cell] = load_cpu_library(cell)
    return lib


def fused_unavailable_reason(cell: Cell | None, device=None) -> str | None:
    """None when ``mode='fused'`` runs ``cell`` (any cell when None) on ``device``; else why not and what to do."""
    device = device or mx.default_device()
    try:
        if device.type == mx.cpu:
            if cell is None:
                compiler()
            else:
                _library_for(cell)
        elif not mx.metal.is_available():
            return "no Metal device for the fused Metal kernels; use mode='parallel' or run on mx.cpu"
        elif cell is not None:
            metal_kernel_sources(cell)
    except (CodegenError, NativeBuildError) as exc:
        return f"{exc} (use mode='parallel' or 'sequential')"
    return None


def _host(x):
    return None if x is None else np.asarray(x)


def solve_fused(cell: Cell, u, recurrent, h0, resets, config: NewtonConfig | None = None, bias=None,
                traced: bool = False):
    """Trajectory [B, T, K, N] over gates ``u + bias`` with the fused kernels of the default device;
    differentiable in u, recurrent, bias and h0 (the kernels add the bias inside their sweep)."""
    if bias is None:
        bias = mx.zeros((u.shape[2], u.shape[3]), u.dtype)
    if mx.default_device().type == mx.cpu:
        return _solve_cpu(cell, u, recurrent, bias, h0, resets)
    return _solve_metal(cell, u, recurrent, bias, h0, resets, config or NewtonConfig(), traced)


def _solve_cpu(cell, u, recurrent, bias, h0, resets):
    lib = _library_for(cell)
    host_resets = _host(resets)

    @mx.custom_function
    def solve(u, recurrent, bias, *initial):
        h0 = _host(initial[0]) if initial else None
        return from_numpy(lib.sweep(_host(u), _host(recurrent), _host(bias), h0, host_resets))

    @solve.vjp
    def solve_vjp(primals, grad_out, out):
        u, recurrent, bias, *initial = primals
        h0 = _host(initial[0]) if initial else None
        d_u, d_rec, d_bias, d_h0 = lib.adjoint_sweep(
            _host(u), _host(recurrent), _host(bias), h0, host_resets, _host(out), _host(grad_out)
        )
        grads = refuse_second_order("fused", (from_numpy(d_u), from_numpy(d_rec), from_numpy(d_bias)), primals)
        return grads + ((from_numpy(d_h0),) if initial else ())

    out = solve(u, recurrent, bias, *(() if h0 is None else (h0,)))
    return out, SolveInfo(mode="fused", exact=True)


#: launch geometry of the Metal kernels (metal/fused/*.metal): threadgroups of METAL_LANES channels x
#: METAL_GROUPS time groups, METAL_CHUNK steps per thread (tiles of 64 steps)
METAL_LANES, METAL_GROUPS, METAL_CHUNK = 32, 8, 8
METAL_REDUCE_THREADS = 256
_INPUTS = ["u", "params", "bias", "h0", "resets"]


def metal_template() -> list:
    return [("GROUPS", METAL_GROUPS), ("CHUNK", METAL_CHUNK)]


def metal_dispatch(batch: int, channels: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) of the forward and adjoint kernels in MLX's convention (grid counts threads)."""
    blocks = batch * -(-channels // METAL_LANES)
    return (METAL_LANES * blocks, METAL_GROUPS, 1), (METAL_LANES, METAL_GROUPS, 1)


def metal_reduce_dispatch(channels: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return (channels, 1, 1), (METAL_REDUCE_THREADS, 1, 1)


@functools.cache
def _metal_kernels(cell_key: str, header: str, forward_body: str, adjoint_body: str, reduce_body: str):
    forward = mx.fast.metal_kernel(
        name=f"pararnn_fused_forward_{cell_key}",
        input_names=[*_INPUTS, "dims", "tol_damping"],
        output_names=["traj", "iterations", "residual_out"],
        source=forward_body,
        header=header,
    )
    adjoint = mx.fast.metal_kernel(
        name=f"pararnn_fused_adjoint_{cell_key}",
        input_names=[*_INPUTS, "traj", "grad", "dims"],
        output_names=["du", "partials", "dh0"],
        source=adjoint_body,
        header=header,
    )
    reduce = mx.fast.metal_kernel(
        name=f"pararnn_fused_reduce_{cell_key}",
        input_names=["partials", "dims"],
        output_names=["dparams", "dbias"],
        source=reduce_body,
        header=header,
    )
    return forward, adjoint, reduce


def _solve_metal(cell, u, recurrent, bias, h0, resets, config, traced):
    batch, steps, gates, channels = u.shape
    k = cell.state_size
    forward, adjoint, reduce = _metal_kernels(f"{cell.name}_{definition_hash(cell)}", *metal_kernel_sources(cell))
    params_rows = recurrent.shape[0]
    grid, threadgroup = metal_dispatch(batch, channels)
    flags = [1, int(h0 is not None), int(resets is not None)]  # has_bias, has_h0, has_resets
    resets_in = resets if resets is not None else mx.zeros((batch, steps), mx.bool_)
    tol = config.tolerance(4)
    reports = []

    def common(u, recurrent, bias, h0_in):
        params = recurrent.astype(mx.float32) if params_rows else mx.zeros((1, channels), mx.float32)
        h0_arr = h0_in.astype(mx.float32) if h0_in is not None else mx.zeros((batch, k, channels), mx.float32)
        return [u.astype(mx.float32), params, bias.astype(mx.float32), h0_arr, resets_in]

    @mx.custom_function
    def solve(u, recurrent, bias, *initial):
        dims = mx.array([batch, steps, channels, config.max_its, *flags], mx.int32)
        traj, iterations, residual = forward(
            inputs=[*common(u, recurrent, bias, initial[0] if initial else None), dims,
                    mx.array([tol, config.damping], mx.float32)],
            template=metal_template(),
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=[(batch, steps, k, channels), (batch, channels), (batch, channels)],
            output_dtypes=[mx.float32, mx.int32, mx.float32],
        )  # fmt: skip
        reports.append((iterations, residual))
        return traj.astype(u.dtype)

    @solve.vjp
    def solve_vjp(primals, grad_out, out):
        u, recurrent, bias, *initial = primals
        dims = mx.array([batch, steps, channels, *flags], mx.int32)
        d_u, partials, d_h0 = adjoint(
            inputs=[*common(u, recurrent, bias, initial[0] if initial else None), out.astype(mx.float32),
                    grad_out.astype(mx.float32), dims],
            template=metal_template(),
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=[(batch, steps, gates, channels), (batch, params_rows + gates, channels),
                           (batch, k, channels)],
            output_dtypes=[mx.float32] * 3,
        )  # fmt: skip
        reduce_grid, reduce_group = metal_reduce_dispatch(channels)
        d_params, d_bias = reduce(
            inputs=[partials, mx.array([batch, channels], mx.int32)],
            template=[],
            grid=reduce_grid,
            threadgroup=reduce_group,
            output_shapes=[(max(1, params_rows), channels), (gates, channels)],
            output_dtypes=[mx.float32] * 2,
        )
        grads = (d_u.astype(u.dtype), d_params[:params_rows].astype(recurrent.dtype), d_bias.astype(bias.dtype))
        grads = refuse_second_order("fused", grads, primals)
        return grads + ((d_h0.astype(initial[0].dtype),) if initial else ())

    out = solve(u, recurrent, bias, *(() if h0 is None else (h0,)))
    if traced:  # the per-sequence reports cannot be read back inside a compiled graph
        return out, SolveInfo(mode="fused", iterations=None, residual=None, converged=None)
    iterations, residual = reports[-1]
    info = SolveInfo(mode="fused", iterations=int(mx.max(iterations).item()), residual=float(mx.max(residual).item()))
    info.converged = bool(info.residual <= tol)  # NaN compares false: not converged
    if not info.converged:
        report_nonconvergence(cell, info, config, tol)
        if config.on_failure == "fallback":
            info.fell_back = True
            out, _ = solve_sequential(cell, u + bias, recurrent, h0, resets)
    return out, info
