"""Which solver modes run on which device, and how ``auto`` chooses."""

from __future__ import annotations

import torch

from pararnn_core.layer_spec import pick_mode
from pararnn_core.newton import ScanPair
from pararnn_torch import _ext
from pararnn_torch.fused import fused_unavailable_reason, solve_fused
from pararnn_torch.kernels import native_scan_pair
from pararnn_torch.solver import solve_newton, solve_sequential


def unavailable_modes(device, cell=None) -> dict[str, str]:
    """Modes that cannot run on ``device`` (for ``cell``, when given), with the reason and what to do."""
    missing = {}
    kernel = _ext.missing_reason(device)
    if kernel is not None:
        missing["kernel"] = kernel + "; or use mode='parallel'"
    fused = fused_unavailable_reason(cell, device)
    if fused is not None:
        missing["fused"] = fused
    return missing


def resolve_mode(mode: str, device, cell=None) -> str:
    return pick_mode(mode, unavailable_modes(device, cell))


# torch.compile traces around the solve instead of into it: Newton's data-dependent
# stopping and the autograd.Function's Python state make dynamo recurse without end
@torch.compiler.disable
def run_mode(mode: str, cell, u, recurrent, h0, resets, config, bias=None):
    """Solve with a resolved mode; returns (trajectory [B, T, K, N], SolveInfo).

    ``bias`` [G, N], when given, is added to the gates ``u`` (the fused kernels
    add it inside their sweep, saving a pass over u forward and backward).
    """
    if mode == "fused":
        return solve_fused(cell, u, recurrent, h0, resets, bias)
    if bias is not None:
        u = u + bias
    if mode == "sequential":
        return solve_sequential(cell, u, recurrent, h0, resets, config)
    if mode == "parallel":
        return solve_newton(cell, u, recurrent, h0, resets, config, ScanPair(), mode)
    if mode == "kernel":
        return solve_newton(cell, u, recurrent, h0, resets, config, native_scan_pair(), mode)
    raise ValueError(f"mode {mode!r} cannot run here: {unavailable_modes(u.device, cell).get(mode, 'unknown mode')}")
