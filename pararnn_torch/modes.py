"""The solver table of PyTorch: each mode's availability check and solve (see pararnn_core.solvers)."""

from __future__ import annotations

import torch

from pararnn_core.newton import ScanPair
from pararnn_core.solvers import NEWTON_FIELDS, SolverEntry, SolverTable
from pararnn_torch import _ext
from pararnn_torch.fused import fused_unavailable_reason, solve_fused
from pararnn_torch.kernels import native_scan_pair
from pararnn_torch.solver import solve_newton, solve_sequential

ALL_SETTINGS = frozenset(NEWTON_FIELDS)


# torch.compile traces around the solves instead of into them: Newton's data-dependent
# stopping and the autograd.Functions' Python state make dynamo recurse without end
@torch.compiler.disable
def _sequential(cell, u, recurrent, bias, h0, resets, config, traced):
    return solve_sequential(cell, u + bias, recurrent, h0, resets)


@torch.compiler.disable
def _parallel(cell, u, recurrent, bias, h0, resets, config, traced):
    return solve_newton(cell, u + bias, recurrent, h0, resets, config, ScanPair(), "parallel")


@torch.compiler.disable
def _kernel(cell, u, recurrent, bias, h0, resets, config, traced):
    return solve_newton(cell, u + bias, recurrent, h0, resets, config, native_scan_pair(), "kernel")


@torch.compiler.disable
def _fused(cell, u, recurrent, bias, h0, resets, config, traced):
    # the fused kernels add the bias inside their sweep, saving a pass over u forward and backward
    return solve_fused(cell, u, recurrent, h0, resets, bias, config)


def _always(cell, device):
    return None


def _kernel_unavailable(cell, device):
    reason = _ext.missing_reason(device)
    return None if reason is None else reason + "; or use mode='parallel'"


TABLE = SolverTable(
    "pararnn_torch",
    [
        SolverEntry("sequential", _sequential, _always, exact=True),
        SolverEntry("parallel", _parallel, _always, honours=ALL_SETTINGS),
        SolverEntry("kernel", _kernel, _kernel_unavailable, honours=ALL_SETTINGS - {"chunk"}),
        # on the CPU the fused kernel is the exact sequential sweep, vectorised over channels
        SolverEntry("fused", _fused, fused_unavailable_reason, exact=True, device_types=("cpu",)),
        # on CUDA the whole Newton solve (and the adjoint) in one kernel each
        SolverEntry("fused", _fused, fused_unavailable_reason, honours=ALL_SETTINGS - {"chunk"},
                    device_types=("cuda",)),
    ],
    device_type=lambda device: device.type,
)


def unavailable_modes(device, cell=None) -> dict[str, str]:
    """Modes that cannot run on ``device`` (for ``cell``, when given), with the reason and what to do."""
    return TABLE.unavailable_modes(torch.device(device), cell)


def resolve_mode(mode: str, device, cell=None) -> str:
    """The mode that runs for ``mode`` (``auto``: the first available of AUTO_ORDER) on ``device``."""
    return TABLE.choose(mode, cell, torch.device(device)).mode
