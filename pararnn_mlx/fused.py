"""``mode="fused"`` for MLX: generated kernels on the CPU (shared with pararnn_torch) and on Metal.

CPU: the compiled sweep/adjoint library from pararnn_core.codegen (ctypes, no
torch). Metal: metal/fused_forward.metal (Newton solve in one kernel) and
metal/fused_adjoint.metal with the generated cell functions, built with
``mx.fast.metal_kernel``. Either way an ``mx.custom_function`` whose vjp is the
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
from pararnn_mlx.solver import refuse_second_order

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


#: threads per threadgroup and steps per thread of the Metal kernels (tiles of 512 steps)
METAL_THREADS, METAL_CHUNK = 64, 8
_INPUTS = ["u", "params", "bias", "h0", "resets"]


@functools.cache
def _metal_kernels(cell_key: str, header: str, forward_body: str, adjoint_body: str):
    forward = mx.fast.metal_kernel(
        name=f"pararnn_fused_forward_{cell_key}",
        input_names=[*_INPUTS, "dims", "tol"],
        output_names=["traj", "iterations"],
        source=forward_body,
        header=header,
    )
    adjoint = mx.fast.metal_kernel(
        name=f"pararnn_fused_adjoint_{cell_key}",
        input_names=[*_INPUTS, "traj", "grad", "dims"],
        output_names=["du", "dparams", "dbias", "dh0"],
        source=adjoint_body,
        header=header,
    )
    return forward, adjoint


def _solve_metal(cell, u, recurrent, bias, h0, resets, config, traced):
    batch, steps, gates, channels = u.shape
    k = cell.state_size
    forward, adjoint = _metal_kernels(f"{cell.name}_{definition_hash(cell)}", *metal_kernel_sources(cell))
    params_rows = recurrent.shape[0]
    template = [("THREADS", METAL_THREADS), ("CHUNK", METAL_CHUNK)]
    flags = [1, int(h0 is not None), int(resets is not None)]  # has_bias, has_h0, has_resets
    resets_in = resets if resets is not None else mx.zeros((batch, steps), mx.bool_)
    infos = []

    def common(u, recurrent, bias, h0_in):
        params = recurrent.astype(mx.float32) if params_rows else mx.zeros((1, channels), mx.float32)
        h0_arr = h0_in.astype(mx.float32) if h0_in is not None else mx.zeros((batch, k, channels), mx.float32)
        return [u.astype(mx.float32), params, bias.astype(mx.float32), h0_arr, resets_in]

    @mx.custom_function
    def solve(u, recurrent, bias, *initial):
        dims = mx.array([batch, steps, channels, config.max_its, *flags], mx.int32)
        tol = mx.array([config.tolerance(4)], mx.float32)
        traj, iterations = forward(
            inputs=[*common(u, recurrent, bias, initial[0] if initial else None), dims, tol],
            template=template,
            grid=(METAL_THREADS * batch * channels, 1, 1),
            threadgroup=(METAL_THREADS, 1, 1),
            output_shapes=[(batch, steps, k, channels), (batch * channels,)],
            output_dtypes=[mx.float32, mx.int32],
        )
        infos.append(iterations)
        return traj.astype(u.dtype)

    @solve.vjp
    def solve_vjp(primals, grad_out, out):
        u, recurrent, bias, *initial = primals
        dims = mx.array([batch, steps, channels, *flags], mx.int32)
        d_u, d_params, d_bias, d_h0 = adjoint(
            inputs=[*common(u, recurrent, bias, initial[0] if initial else None), out.astype(mx.float32),
                    grad_out.astype(mx.float32), dims],
            template=template,
            grid=(METAL_THREADS * channels, 1, 1),
            threadgroup=(METAL_THREADS, 1, 1),
            output_shapes=[(batch, steps, gates, channels), (max(1, params_rows), channels), (gates, channels),
                           (batch, k, channels)],
            output_dtypes=[mx.float32] * 4,
        )  # fmt: skip
        grads = (d_u.astype(u.dtype), d_params[:params_rows].astype(recurrent.dtype), d_bias.astype(bias.dtype))
        grads = refuse_second_order("fused", grads, primals)
        return grads + ((d_h0.astype(initial[0].dtype),) if initial else ())

    out = solve(u, recurrent, bias, *(() if h0 is None else (h0,)))
    if traced:  # the per-sequence iteration counts cannot be read inside a compiled graph
        return out, SolveInfo(mode="fused", iterations=config.max_its, residual=None, converged=None)
    # a sequence that did not converge reports -1: the kernel recomputed it with the sequential sweep
    worst, most = (int(v.item()) for v in (mx.min(infos[-1]), mx.max(infos[-1])))
    info = SolveInfo(mode="fused", iterations=most, residual=None, converged=worst >= 0, fell_back=worst < 0)
    if worst < 0:
        report_nonconvergence(cell, info, config, config.tolerance(4))
    return out, info
