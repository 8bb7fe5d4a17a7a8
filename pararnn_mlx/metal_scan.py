"""The structured-scan Metal kernel (metal/scan/scan.metal) as an MLX op, and its use as mode='kernel'.

The kernel is built with ``mx.fast.metal_kernel`` only when a Metal device is
present (``mx.metal.is_available()``); elsewhere :func:`unavailable_reason`
says why and the ``kernel`` mode is reported unavailable. On a CPU-only MLX the
``parallel`` mode (compiled framework scan) is the fast path.

The same kernel source is compiled with g++ and run on the CPU by
tests/test_emulation.py, so it is tested on machines without a Mac.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from pararnn_core.kernel_sources import metal_dir
from pararnn_core.newton import ScanPair

#: launch geometry (metal/scan/scan.metal): threadgroups of LANES consecutive channels x GROUPS time groups,
#: CHUNK steps per thread
LANES, GROUPS, CHUNK = 32, 8, 4
_STORAGE_TYPES = (mx.float32, mx.float16, mx.bfloat16)


def unavailable_reason(device=None) -> str | None:
    """None when the Metal scan can run on ``device`` (default: MLX's default device); else why not."""
    device = device or mx.default_device()
    if not mx.metal.is_available():
        return "no Metal device (the Metal scan kernel needs a Mac with Apple silicon); use mode='parallel'"
    if device.type != mx.gpu:
        return "the Metal scan runs on the GPU device, not on MLX's CPU device; use mode='parallel'"
    try:
        metal_dir()
    except FileNotFoundError as error:
        return str(error)
    return None


def kernel_source() -> tuple[str, str]:
    """(body, header) handed to mx.fast.metal_kernel (the emulator tests compile exactly these)."""
    return (metal_dir() / "scan" / "scan.metal").read_text(), (
        metal_dir() / "common" / "pr_metal_common.metal"
    ).read_text()


@functools.cache
def _kernel():
    body, header = kernel_source()
    return mx.fast.metal_kernel(
        name="pararnn_scan", input_names=["A", "b", "h0", "dims"], output_names=["h"], source=body, header=header
    )


def template(dtype, K: int) -> list:
    return [("T", dtype), ("K", K), ("GROUPS", GROUPS), ("CHUNK", CHUNK)]


def dispatch(batch: int, channels: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) in MLX's convention (grid counts threads)."""
    blocks = batch * -(-channels // LANES)
    return (LANES * blocks, GROUPS, 1), (LANES, GROUPS, 1)


def scan(A: mx.array, b: mx.array, h0: mx.array | None = None, reverse: bool = False) -> mx.array:
    """Structured linear scan on the GPU, same contract as ``torch.ops.pararnn.scan``.

    forward: ``h_t = A_t h_{t-1} + b_t`` from h0 (or 0); reverse:
    ``h_t = A_t h_{t+1} + b_t`` from h0 (or 0). A [B, T, K, K, N], b [B, T, K, N],
    h0 [B, K, N]; float32, float16 or bfloat16 storage, computed in float32.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"Metal scan unavailable: {reason}")
    if b.ndim != 4 or A.shape != (b.shape[0], b.shape[1], b.shape[2], b.shape[2], b.shape[3]):
        raise ValueError(f"Metal scan expects A [B, T, K, K, N] and b [B, T, K, N], got {A.shape} and {b.shape}")
    if b.dtype not in _STORAGE_TYPES or A.dtype != b.dtype:
        raise TypeError(f"Metal scan supports one dtype of {_STORAGE_TYPES} for A and b, got {A.dtype}, {b.dtype}")
    B, T, K, N = b.shape
    if h0 is not None and h0.shape != (B, K, N):
        raise ValueError(f"Metal scan expects h0 [B, K, N] = {(B, K, N)}, got {h0.shape}")
    dims = mx.array([B, T, N, int(reverse), int(h0 is not None)], dtype=mx.uint32)
    grid, threadgroup = dispatch(B, N)
    (h,) = _kernel()(
        inputs=[A, b, h0.astype(b.dtype) if h0 is not None else mx.zeros((1,), b.dtype), dims],
        template=template(b.dtype, K),
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[b.shape],
        output_dtypes=[b.dtype],
    )
    return h


def _solver(reverse: bool):
    def solve(A_nested, b_list):
        A = mx.stack([mx.stack(row, 2) for row in A_nested], 2)
        return [scan(A, mx.stack(b_list, 2), None, reverse)[:, :, k] for k in range(len(b_list))]

    return solve


def native_scan_pair() -> ScanPair:
    """Linear solvers of the Newton step and of the adjoint in the Metal kernel."""
    return ScanPair(forward=_solver(False), reverse=_solver(True))
