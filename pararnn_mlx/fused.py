"""``mode="fused"`` for MLX on the CPU: the generated sweep and adjoint kernels, shared with pararnn_torch.

The compiled library comes from pararnn_core.codegen (ctypes, no torch); here
it is wrapped in an ``mx.custom_function`` whose vjp is the adjoint sweep, so
``mx.grad`` gets dL/du, dL/drecurrent and dL/dh0 from one reverse pass.

On a Metal device the fused Metal kernels are not wired in this build:
``fused_unavailable_reason`` says so and ``auto`` picks another mode.
"""

from __future__ import annotations

import weakref

import mlx.core as mx
import numpy as np

from pararnn_core.cell import Cell
from pararnn_core.codegen import CodegenError, NativeBuildError, load_cpu_library
from pararnn_core.codegen.native import compiler
from pararnn_core.newton import SolveInfo

_libraries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _library_for(cell: Cell):
    lib = _libraries.get(cell)
    if lib is None:
        lib = _libraries[cell] = load_cpu_library(cell)
    return lib


def fused_unavailable_reason(cell: Cell | None, device=None) -> str | None:
    """None when ``mode='fused'`` runs ``cell`` (any cell when None) on ``device``; else why not and what to do."""
    device = device or mx.default_device()
    if device.type != mx.cpu:
        return (
            "the fused Metal kernels are not wired into this build; use mode='kernel' or 'parallel' on the GPU, "
            "or run on mx.cpu for the fused CPU kernels"
        )
    try:
        if cell is None:
            compiler()
        else:
            _library_for(cell)
    except (CodegenError, NativeBuildError) as exc:
        return f"{exc} (use mode='parallel' or 'sequential')"
    return None


def _host(x):
    return None if x is None else np.asarray(x)


def solve_fused(cell: Cell, u, recurrent, h0, resets):
    """Trajectory [B, T, K, N] with the fused CPU kernels; differentiable in u, recurrent and h0."""
    reason = fused_unavailable_reason(cell)
    if reason is not None:
        raise RuntimeError(f"mode='fused' cannot run cell {cell.name!r}: {reason}")
    lib = _library_for(cell)
    host_resets = _host(resets)

    @mx.custom_function
    def solve(u, recurrent, *initial):
        h0 = _host(initial[0]) if initial else None
        return mx.array(lib.sweep(_host(u), _host(recurrent), None, h0, host_resets))

    @solve.vjp
    def solve_vjp(primals, grad_out, out):
        u, recurrent, *initial = primals
        h0 = _host(initial[0]) if initial else None
        d_u, d_rec, _, d_h0 = lib.adjoint_sweep(
            _host(u), _host(recurrent), None, h0, host_resets, _host(out), _host(grad_out)
        )
        grads = (mx.array(d_u), mx.array(d_rec))
        return grads + ((mx.array(d_h0),) if initial else ())

    out = solve(u, recurrent, *(() if h0 is None else (h0,)))
    return out, SolveInfo(mode="fused")
