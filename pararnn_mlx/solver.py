"""Trajectory solves for MLX and their gradient wiring.

Every mode maps the gates ``u`` [B, T, G, N], the recurrent parameters [P, N],
an optional initial state [B, K, N] and optional resets [B, T] to the
trajectory [B, T, K, N]. ``parallel`` (and the native ``kernel`` mode) run the
core Newton solve forward and the core adjoint backward, joined by an
``mx.custom_function`` so ``mx.grad`` never differentiates through Newton
iterations. ``sequential`` is the step loop, differentiated by MLX itself.

The framework scans are wrapped in ``mx.compile`` (one fused graph per shape
instead of thousands of small ops); ``mx.disable_compile()`` or the environment
variable ``MLX_DISABLE_COMPILE=1`` runs them uncompiled for debugging.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from pararnn_core.newton import ScanPair, SolveInfo, adjoint, newton_solve, sequential_solve
from pararnn_core.pipeline import HIGHER_ORDER_MESSAGE
from pararnn_core.scan import block_scan
from pararnn_mlx.ops import ops


@functools.cache
def framework_scan(reverse: bool, chunk: int | None) -> Callable:
    """The chunked core scan, compiled once per (direction, chunk); MLX re-traces per shape."""
    return mx.compile(lambda A, b: block_scan(ops, A, b, reverse=reverse, chunk=chunk))


def _detached(x):
    """A copy of ``x`` with no autodiff history.

    MLX (seen in 0.32) returns zero gradients for a whole ``mx.grad`` when, inside
    it, an ``mx.jvp`` closure captures an array computed from the differentiated
    inputs and the graph is then evaluated; ``mx.stop_gradient`` is not enough.
    Newton does both (forward-mode Jacobians, residual checks), so it solves on
    fresh copies; the custom vjp supplies the gradient.
    """
    return mx.array(np.asarray(x), dtype=x.dtype)


def _unpack(u, recurrent, h0):
    # Gates are split (one multi-output op): the sequential loop then splits them along time,
    # and per-step slices of sliced gates would each scatter a full-size cotangent in the
    # backward. Parameters stay slices: measured linear in T, where split rows were not.
    gates = ops.unstack(u, 2)
    params = [recurrent[p] for p in range(recurrent.shape[0])]
    h0_list = [h0[:, k] for k in range(h0.shape[1])] if h0 is not None else None
    return gates, params, h0_list


def _components(traj):
    return [traj[:, :, k] for k in range(traj.shape[2])]


def solve_newton(cell, u, recurrent, h0, resets, config, scans: ScanPair, mode: str):
    """Newton forward, adjoint backward; gradients flow to u, recurrent and h0 (when given).

    Not for compiled graphs: Newton stops on its residual (a host read), and MLX
    (0.32) fails to compile a custom vjp that itself calls ``mx.vjp``.
    """
    forward_scan = scans.forward or framework_scan(False, config.chunk)
    reverse_scan = scans.reverse or framework_scan(True, config.chunk)
    infos: list[SolveInfo] = []

    # resets, cell and config are not differentiated, so the closure may hold them;
    # everything that needs a gradient is an argument of the custom function
    @mx.custom_function
    def solve(u, recurrent, *initial):
        initial = [_detached(h) for h in initial]
        gates, params, h0_list = _unpack(_detached(u), _detached(recurrent), initial[0] if initial else None)
        traj, info = newton_solve(cell, ops, gates, params, h0_list, resets, config, scan=forward_scan)
        infos.append(info)
        return mx.stack(traj, 2)

    @solve.vjp
    def solve_vjp(primals, grad_out, out):
        u, recurrent, *initial = primals
        gates, params, h0_list = _unpack(u, recurrent, initial[0] if initial else None)
        d_gates, d_params, d_h0 = adjoint(
            cell, ops, gates, params, h0_list, resets, _components(out), _components(grad_out),
            scan=reverse_scan, chunk=config.chunk,
        )
        grads = (mx.stack(d_gates, 2), mx.stack(d_params, 0))
        if initial:
            grads += (mx.stack(d_h0, 1),)
        return grads

    out = solve(u, recurrent, *(() if h0 is None else (h0,)))
    info = infos[-1]
    info.mode = mode
    return out, info


def solve_sequential(cell, u, recurrent, h0, resets):
    gates, params, h0_list = _unpack(u, recurrent, h0)
    return sequential_solve(cell, ops, gates, params, h0_list, resets), SolveInfo(mode="sequential", exact=True)


def refuse_second_order(mode: str, grads: tuple, primals) -> tuple:
    """``grads`` unchanged, joined to ``primals`` through a function whose own vjp raises: differentiating the
    adjoint backward of ``mode`` (``mx.grad`` of ``mx.grad``) is an error instead of a silently wrong result."""

    @mx.custom_function
    def guard(grads, primals):
        return grads

    @guard.vjp
    def refuse(args, cotangents, outputs):
        raise RuntimeError(HIGHER_ORDER_MESSAGE.format(mode=mode))

    return tuple(guard(tuple(grads), tuple(primals)))
