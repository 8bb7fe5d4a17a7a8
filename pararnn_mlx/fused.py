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
from pararnn_core.newton import NewtonConfig, SolveInfo
from pararnn_mlx.ops import from_numpy

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


def solve_fused(cell: Cell, u, recurrent, h0, resets, config: NewtonConfig | None = None):
    """Trajectory [B, T, K, N] with the fused kernels of the default device; differentiable in u, recurrent, h0."""
    reason = fused_unavailable_reason(cell)
    if reason is not None:
        raise RuntimeError(f"mode='fused' cannot run cell {cell.name!r}: {reason}")
    if mx.default_device().type == mx.cpu:
        return _solve_cpu(cell, u, recurrent, h0, resets)
    return _solve_metal(cell, u, recurrent, h0, resets, config or NewtonConfig())


def _solve_cpu(cell, u, recurrent, h0, resets):
    lib = _library_for(cell)
    host_resets = _host(resets)

    @mx.custom_function
    def solve(u, recurrent, *initial):
        h0 = _host(initial[0]) if initial else None
        return from_numpy(lib.sweep(_host(u), _host(recurrent), None, h0, host_resets))

    @solve.vjp
    def solve_vjp(primals, grad_out, out):
        u, recurrent, *initial = primals
        h0 = _host(initial[0]) if initial else None
        d_u, d_rec, _, d_h0 = lib.adjoint_sweep(
            _host(u), _host(recurrent), None, h0, host_resets, _host(out), _host(grad_out)
        )
        grads = (from_numpy(d_u), from_numpy(d_rec))
        return grads + ((from_numpy(d_h0),) if initial else ())

    out = solve(u, recurrent, *(() if h0 is None else (h0,)))
    return out, SolveInfo(mode="fused")


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


def _solve_metal(cell, u, recurrent, h0, resets, config):
    batch, steps, gates, channels = u.shape
    k = cell.state_size
    forward, adjoint = _metal_kernels(f"{cell.name}_{definition_hash(cell)}", *metal_kernel_sources(cell))
    params_rows = recurrent.shape[0]
    template = [("THREADS", METAL_THREADS), ("CHUNK", METAL_CHUNK)]
    flags = [0, int(h0 is not None), int(resets is not None)]  # has_bias (added by the layer), has_h0, has_resets
    fixed_inputs = [
        mx.zeros((gates, channels), mx.float32),
        resets if resets is not None else mx.zeros((batch, steps), mx.bool_),
    ]
    infos = []

    def common(u, recurrent, h0_in):
        params = recurrent.astype(mx.float32) if params_rows else mx.zeros((1, channels), mx.float32)
        h0_arr = h0_in.astype(mx.float32) if h0_in is not None else mx.zeros((batch, k, channels), mx.float32)
        return [u.astype(mx.float32), params, fixed_inputs[0], h0_arr, fixed_inputs[1]]

    @mx.custom_function
    def solve(u, recurrent, *initial):
        dims = mx.array([batch, steps, channels, config.max_its, *flags], mx.int32)
        tol = mx.array([config.tolerance(4)], mx.float32)
        traj, iterations = forward(
            inputs=[*common(u, recurrent, initial[0] if initial else None), dims, tol],
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
        u, recurrent, *initial = primals
        dims = mx.array([batch, steps, channels, *flags], mx.int32)
        d_u, d_params, _, d_h0 = adjoint(
            inputs=[*common(u, recurrent, initial[0] if initial else None), out.astype(mx.float32),
                    grad_out.astype(mx.float32), dims],
            template=template,
            grid=(METAL_THREADS * channels, 1, 1),
            threadgroup=(METAL_THREADS, 1, 1),
            output_shapes=[(batch, steps, gates, channels), (max(1, params_rows), channels), (gates, channels),
                           (batch, k, channels)],
            output_dtypes=[mx.float32] * 4,
        )  # fmt: skip
        grads = (d_u.astype(u.dtype), d_params[:params_rows].astype(recurrent.dtype))
        return grads + ((d_h0.astype(initial[0].dtype),) if initial else ())

    out = solve(u, recurrent, *(() if h0 is None else (h0,)))
    info = SolveInfo(mode="fused")
    if infos:
        worst = int(mx.min(infos[-1]).item())
        info.fell_back = worst < 0
        info.iterations = int(mx.max(infos[-1]).item()) if worst >= 0 else -1
    return out, info
