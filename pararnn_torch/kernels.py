"""Python side of the native scan ``torch.ops.pararnn.scan``: fake implementation and solver adapters."""

from __future__ import annotations

import torch

from pararnn_core.newton import ScanPair
from pararnn_torch import _ext

if _ext.loaded():

    @torch.library.register_fake("pararnn::scan")
    def _scan_fake(A, b, h0=None, reverse=False):
        # shape/dtype propagation for torch.compile and meta tensors: h has the layout of b
        return torch.empty_like(b, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pararnn::scan_entries")
    def _scan_entries_fake(A, b, reverse=False):
        return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in b]


def scan(A: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor:
    """Structured linear scan in native code.

    forward: ``h_t = A_t h_{t-1} + b_t`` from ``h_0 = h0`` (or 0); reverse:
    ``h_t = A_t h_{t+1} + b_t`` from ``h_{T+1} = h0`` (or 0). A [B, T, K, K, N]
    (block (i, j) of channel n at ``A[:, t, i, j, n]``), b [B, T, K, N], h0
    [B, K, N]; returns h [B, T, K, N]. K up to 4; float32/float64, and
    float16/bfloat16 storage computed in float32. The last state (``h[:, -1]``,
    or ``h[:, 0]`` in reverse) seeds the next chunk of a long sequence.
    """
    reason = _ext.missing_reason(b.device)
    if reason is not None:
        raise RuntimeError(f"pararnn native scan unavailable: {reason}")
    return torch.ops.pararnn.scan(A, b, h0, reverse)


def _block_tensor(A_nested) -> torch.Tensor:
    """KxK nested lists of [B, T, N] -> [B, T, K, K, N] (a view, no copy, when K = 1)."""
    if len(A_nested) == 1:
        return A_nested[0][0].unsqueeze(2).unsqueeze(2)
    return torch.stack([torch.stack(row, 2) for row in A_nested], 2)


def _solver(reverse: bool):
    def solve(A_nested, b_list):
        if b_list[0].device.type == "cpu":
            # the CPU kernel reads the block entries in place: no stacking copy
            return torch.ops.pararnn.scan_entries([a for row in A_nested for a in row], b_list, reverse)
        b = b_list[0].unsqueeze(2) if len(b_list) == 1 else torch.stack(b_list, 2)
        return list(scan(_block_tensor(A_nested), b, None, reverse).unbind(2))

    return solve


def native_scan_pair() -> ScanPair:
    """Linear solvers of the Newton step and of the adjoint, in the native kernel."""
    return ScanPair(forward=_solver(False), reverse=_solver(True))
