"""Which solver modes run on which MLX device, and how ``auto`` chooses.

Native modes register here: add the mode's reason-to-be-unavailable logic to
:func:`unavailable_modes` and its solve to :func:`run_mode`.
"""

from __future__ import annotations

import mlx.core as mx

from pararnn_core.layer_spec import pick_mode
from pararnn_core.newton import ScanPair
from pararnn_mlx import metal_scan
from pararnn_mlx.fused import fused_unavailable_reason, solve_fused
from pararnn_mlx.solver import solve_newton, solve_sequential


def unavailable_modes(device=None, cell=None) -> dict[str, str]:
    """Modes that cannot run on ``device`` (default: MLX's default device) for ``cell`` (when given),
    with the reason and what to do."""
    missing = {}
    fused = fused_unavailable_reason(cell, device)
    if fused is not None:
        missing["fused"] = fused
    kernel = metal_scan.unavailable_reason(device)
    if kernel is not None:
        missing["kernel"] = kernel
    return missing


def resolve_mode(mode: str, device=None, cell=None) -> str:
    device = device or mx.default_device()
    return pick_mode(mode, unavailable_modes(device, cell))


def run_mode(mode: str, cell, u, recurrent, h0, resets, config):
    """Solve with a resolved mode; returns (trajectory [B, T, K, N], SolveInfo)."""
    if mode == "sequential":
        return solve_sequential(cell, u, recurrent, h0, resets, config)
    if mode == "parallel":
        return solve_newton(cell, u, recurrent, h0, resets, config, ScanPair(), mode)
    if mode == "fused":
        return solve_fused(cell, u, recurrent, h0, resets, config)
    if mode == "kernel" and metal_scan.unavailable_reason() is None:
        return solve_newton(cell, u, recurrent, h0, resets, config, metal_scan.native_scan_pair(), mode)
    reason = unavailable_modes(mx.default_device(), cell).get(mode, "unknown mode")
    raise ValueError(f"mode {mode!r} cannot run here: {reason}")
