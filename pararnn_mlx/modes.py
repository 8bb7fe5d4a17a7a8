"""The solver table of MLX: each mode's availability check and solve (see pararnn_core.solvers).

MLX arrays carry no device; a solve runs on MLX's default device, named here
"cpu" or "gpu" (the key the table caches by).
"""

from __future__ import annotations

import mlx.core as mx

from pararnn_core.newton import ScanPair
from pararnn_core.solvers import NEWTON_FIELDS, SolverEntry, SolverTable
from pararnn_mlx import metal_scan
from pararnn_mlx.fused import fused_unavailable_reason, solve_fused
from pararnn_mlx.solver import solve_newton, solve_sequential

ALL_SETTINGS = frozenset(NEWTON_FIELDS)


def device_key(device=None) -> str:
    """"cpu" or "gpu" for ``device`` (default: MLX's default device)."""
    device = device or mx.default_device()
    return "cpu" if device.type == mx.cpu else "gpu"


def _device(key: str) -> mx.Device:
    return mx.Device(mx.cpu if key == "cpu" else mx.gpu)


def _sequential(cell, u, recurrent, bias, h0, resets, config, traced):
    return solve_sequential(cell, u + bias, recurrent, h0, resets)


def _parallel(cell, u, recurrent, bias, h0, resets, config, traced):
    return solve_newton(cell, u + bias, recurrent, h0, resets, config, ScanPair(), "parallel")


def _kernel(cell, u, recurrent, bias, h0, resets, config, traced):
    return solve_newton(cell, u + bias, recurrent, h0, resets, config, metal_scan.native_scan_pair(), "kernel")


def _fused(cell, u, recurrent, bias, h0, resets, config, traced):
    return solve_fused(cell, u, recurrent, h0, resets, config, bias, traced)


def _always(cell, key):
    return None


TABLE = SolverTable(
    "pararnn_mlx",
    [
        SolverEntry("sequential", _sequential, _always, exact=True),
        # Newton in framework ops reads its residual to stop: not inside mx.compile (auto then takes sequential)
        SolverEntry("parallel", _parallel, _always, honours=ALL_SETTINGS, traceable=False),
        SolverEntry("kernel", _kernel, lambda cell, key: metal_scan.unavailable_reason(_device(key)),
                    honours=ALL_SETTINGS - {"chunk"}, traceable=False),
        # CPU: the exact sweep of the shared C++ library, through host memory (not inside mx.compile)
        SolverEntry("fused", _fused, lambda cell, key: fused_unavailable_reason(cell, _device(key)), exact=True,
                    traceable=False, device_types=("cpu",)),
        # Metal: the whole Newton solve in one kernel
        SolverEntry("fused", _fused, lambda cell, key: fused_unavailable_reason(cell, _device(key)),
                    honours=frozenset({"max_its", "tol"}), device_types=("gpu",)),
    ],
    device_type=lambda key: key,
)


def unavailable_modes(device=None, cell=None) -> dict[str, str]:
    """Modes that cannot run on ``device`` (default: MLX's default device) for ``cell`` (when given),
    with the reason and what to do."""
    return TABLE.unavailable_modes(device_key(device), cell)


def resolve_mode(mode: str, device=None, cell=None) -> str:
    """The mode that runs for ``mode`` (``auto``: the first available of AUTO_ORDER) on ``device``."""
    return TABLE.choose(mode, cell, device_key(device)).mode
