"""Shapes, inputs and the framework reference for the structured-scan kernel tests."""

from __future__ import annotations

import numpy as np

from pararnn_core.ops import NumpyOps
from pararnn_core.scan import block_scan


def random_scan_inputs(B, T, K, N, dtype, with_h0, seed=0):
    """A [B, T, K, K, N] with a stable spectrum (entries ~0.9/K), b [B, T, K, N], h0 [B, K, N] or None."""
    rng = np.random.default_rng(seed)
    A = (rng.uniform(-0.9, 0.9, (B, T, K, K, N)) / K).astype(dtype)
    b = rng.standard_normal((B, T, K, N)).astype(dtype)
    h0 = rng.standard_normal((B, K, N)).astype(dtype) if with_h0 else None
    return A, b, h0


def reference_scan(A, b, h0=None, reverse=False):
    """h [B, T, K, N] from pararnn_core.scan.block_scan (the `parallel` mode's scan), in float64."""
    A, b = A.astype(np.float64), b.astype(np.float64)
    K = b.shape[2]
    A_nested = [[A[:, :, i, j] for j in range(K)] for i in range(K)]
    b_list = [b[:, :, i].copy() for i in range(K)]
    if h0 is not None:
        edge = -1 if reverse else 0  # the step that reads h0
        for i in range(K):
            b_list[i][:, edge] += sum(A[:, edge, i, j] * h0[:, j].astype(np.float64) for j in range(K))
    return np.stack(block_scan(NumpyOps(), A_nested, b_list, reverse=reverse), axis=2)


def tolerance(dtype, T):
    """Allowed max abs error against the float64 reference: rounding grows with the chain length."""
    eps = np.finfo(dtype).eps
    return 64 * eps * max(1.0, np.sqrt(T))
