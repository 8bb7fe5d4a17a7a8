"""Mode dispatch and autograd wiring of the trajectory solve for PyTorch.

Every mode maps the gates ``u`` [B, T, G, N], the recurrent parameters [P, N],
an optional initial state [B, K, N] and optional resets [B, T] to the
trajectory [B, T, K, N]. ``parallel`` and ``kernel`` share one autograd
Function (Newton forward, adjoint backward) and differ only in the linear scan.
"""

from __future__ import annotations

import torch

from pararnn_core.cell import Cell
from pararnn_core.newton import NewtonConfig, ScanPair, SolveInfo, adjoint, newton_solve, sequential_solve
from pararnn_core.pipeline import HIGHER_ORDER_MESSAGE
from pararnn_torch.ops import ops


def _unpack(u, recurrent, h0):
    return list(u.unbind(2)), list(recurrent.unbind(0)), (list(h0.unbind(1)) if h0 is not None else None)


class _NewtonSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, recurrent, h0, resets, cell: Cell, config: NewtonConfig, scans: ScanPair, mode: str,
                info_sink: list):
        gates, params, h0_list = _unpack(u, recurrent, h0)
        with torch.no_grad():
            traj, info = newton_solve(cell, ops, gates, params, h0_list, resets, config, scan=scans.forward)
        info_sink.append(info)
        out = torch.stack(traj, 2)
        ctx.cell, ctx.config, ctx.scans, ctx.mode = cell, config, scans, mode
        ctx.save_for_backward(u, recurrent, h0, resets, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_higher_order(ctx.mode)
        u, recurrent, h0, resets, out = ctx.saved_tensors
        gates, params, h0_list = _unpack(u, recurrent, h0)
        d_gates, d_params, d_h0 = adjoint(
            ctx.cell,
            ops,
            gates,
            params,
            h0_list,
            resets,
            list(out.unbind(2)),
            list(grad_out.unbind(2)),
            scan=ctx.scans.reverse,
            chunk=ctx.config.chunk,
        )
        d_u = torch.stack(d_gates, 2)
        d_rec = torch.stack(d_params, 0)
        d_h0 = torch.stack(d_h0, 1) if d_h0 is not None and ctx.needs_input_grad[2] else None
        return d_u, d_rec, d_h0, None, None, None, None, None, None


def solve_newton(cell, u, recurrent, h0, resets, config, scans: ScanPair, mode: str):
    sink: list[SolveInfo] = []
    with torch.autocast(u.device.type, enabled=False):
        out = _NewtonSolve.apply(u, recurrent, h0, resets, cell, config, scans, mode, sink)
    info = sink[0]
    info.mode = mode
    return out, info


def solve_sequential(cell, u, recurrent, h0, resets):
    gates, params, h0_list = _unpack(u, recurrent, h0)
    with torch.autocast(u.device.type, enabled=False):
        traj = sequential_solve(cell, ops, gates, params, h0_list, resets)
    return traj, SolveInfo(mode="sequential", exact=True)


def refuse_higher_order(mode: str):
    """Called first in the backward of the adjoint-based modes: with ``create_graph=True`` autograd runs the
    backward in grad mode to differentiate it again, which these backwards do not support."""
    if torch.is_grad_enabled():
        raise RuntimeError(HIGHER_ORDER_MESSAGE.format(mode=mode))
