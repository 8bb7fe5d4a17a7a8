"""The framework scans of pararnn_core against a plain loop (numpy backend)."""

import numpy as np
import pytest

from pararnn_core.ops import NumpyOps
from pararnn_core.scan import block_scan

ops = NumpyOps()


def loop_block(A, b, reverse):
    k = len(b)
    B, T, N = b[0].shape
    h = np.zeros((k, B, N))
    out = np.zeros((k, B, T, N))
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        h = np.stack([sum(A[i][j][:, t] * h[j] for j in range(k)) + b[i][:, t] for i in range(k)])
        out[:, :, t] = h
    return out


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("length,chunk", [(1, None), (2, None), (7, 3), (64, None), (100, 7), (257, 16), (33, 64)])
def test_block_scan_matches_loop(k, length, chunk, reverse):
    rng = np.random.default_rng(length * 10 + k)
    A = [[0.7 * rng.uniform(-1, 1, (2, length, 5)) for _ in range(k)] for _ in range(k)]
    b = [rng.standard_normal((2, length, 5)) for _ in range(k)]
    got = block_scan(ops, A, b, reverse=reverse, chunk=chunk)
    np.testing.assert_allclose(np.stack(got), loop_block(A, b, reverse), atol=1e-12)
