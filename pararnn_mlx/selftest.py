"""The Metal kernels that ``auto`` picks on a Mac, on this Mac, against the references, with speed.

    python -m pararnn_mlx.selftest

Runs the Metal scan (mode='kernel') against the framework scan, and the fused Metal Newton solve and adjoint
(mode='fused': forward, dL/du, dL/drecurrent, dL/dh0) against the sequential solve, for GRU and LSTM, then
times both. Everything it needs ships with the package (no tests/ folder). Without a Metal device it says so
in one line and exits 1 (nothing was verified); on a mismatch it exits 1 as well.
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
import numpy as np

from pararnn_core.cell import get_cell
from pararnn_core.newton import NewtonConfig
from pararnn_core.ops import NumpyOps
from pararnn_core.scan import block_scan
from pararnn_mlx import fused, metal_scan
from pararnn_mlx.solver import solve_sequential

# (B, T, K, N): T = 1, T not a multiple of a tile, T over many tiles, a partial channel block
SCAN_CASES = [(1, 1, 1, 3), (2, 77, 2, 33), (3, 3001, 1, 20), (2, 2500, 2, 16)]
FUSED_CASES = [(1, 1, 5), (2, 77, 37), (2, 2000, 64)]  # (B, T, N)
SPEED_CASE = (4, 8192, 256)


def _scan_inputs(B, T, K, N, rng):
    A = (rng.uniform(-0.9, 0.9, (B, T, K, K, N)) / K).astype(np.float32)
    b = rng.standard_normal((B, T, K, N)).astype(np.float32)
    h0 = rng.standard_normal((B, K, N)).astype(np.float32)
    return A, b, h0


def scan_reference(A, b, h0, reverse):
    K = b.shape[2]
    A64, b64 = A.astype(np.float64), b.astype(np.float64)
    A_nested = [[A64[:, :, i, j] for j in range(K)] for i in range(K)]
    b_list = [b64[:, :, i].copy() for i in range(K)]
    edge = -1 if reverse else 0
    for i in range(K):
        b_list[i][:, edge] += sum(A64[:, edge, i, j] * h0[:, j] for j in range(K))
    return np.stack(block_scan(NumpyOps(), A_nested, b_list, reverse=reverse), 2)


def _report(name, err, tol):
    print(f"  {name}  err {err:.2e}  {'ok' if err <= tol else 'FAIL'}")
    return bool(err <= tol)


def check_scan(rng) -> bool:
    ok = True
    for B, T, K, N in SCAN_CASES:
        for reverse in (False, True):
            A, b, h0 = _scan_inputs(B, T, K, N, rng)
            got = np.array(metal_scan.scan(mx.array(A), mx.array(b), mx.array(h0), reverse))
            tol = 64 * np.finfo(np.float32).eps * max(1.0, T**0.5)
            err = np.abs(got - scan_reference(A, b, h0, reverse)).max()
            ok &= _report(f"scan  B={B} T={T:5} K={K} N={N:3} reverse={reverse!s:5}", err, tol)
    return ok


def _fused_problem(cell, B, T, N, rng):
    u = mx.array(rng.normal(size=(B, T, cell.num_gates, N)).astype(np.float32))
    rec = mx.array((0.5 * rng.normal(size=(len(cell.params), N))).astype(np.float32))
    h0 = mx.array(rng.normal(size=(B, cell.state_size, N)).astype(np.float32))
    resets = mx.array(rng.random((B, T)) < 0.05)
    weights = mx.array(rng.normal(size=(B, T, cell.state_size, N)).astype(np.float32))
    return u, rec, h0, resets, weights


def _value_and_grads(solve, cell, u, rec, h0, resets, weights):
    def loss(u, rec, h0):
        return mx.sum(solve(cell, u, rec, h0, resets) * weights)

    traj = solve(cell, u, rec, h0, resets)
    grads = mx.grad(loss, argnums=(0, 1, 2))(u, rec, h0)
    return [np.array(traj), *(np.array(g) for g in grads)]


def check_fused(rng) -> bool:
    ok = True
    config = NewtonConfig()
    for name in ("gru", "lstm"):
        cell = get_cell(name)
        for B, T, N in FUSED_CASES:
            problem = _fused_problem(cell, B, T, N, rng)
            got = _value_and_grads(lambda *a: fused.solve_fused(*a, config)[0], cell, *problem)
            want = _value_and_grads(lambda *a: solve_sequential(*a, None)[0], cell, *problem)
            for what, g, w in zip(("traj", "d_u", "d_rec", "d_h0"), got, want):
                err = np.abs(g - w).max() / max(1.0, np.abs(w).max())
                ok &= _report(f"fused {name:4} B={B} T={T:5} N={N:3} {what:5}", err, 2e-4)
    return ok


def _time(fn, repeats=10):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def speed(rng) -> None:
    B, T, N = SPEED_CASE
    A, b, _ = (mx.array(x) for x in _scan_inputs(B, T, 1, N, rng))
    elapsed = _time(lambda: mx.eval(metal_scan.scan(A, b)))
    moved = (A.size + 2 * b.size) * 4
    print(f"  scan  B={B} T={T} K=1 N={N} float32: {elapsed * 1e3:.2f} ms, {moved / elapsed / 1e9:.1f} GB/s")
    cell = get_cell("gru")
    u, rec, h0, resets, _ = _fused_problem(cell, B, T, N, rng)
    elapsed = _time(lambda: mx.eval(fused.solve_fused(cell, u, rec, h0, None)[0]))
    moved = (u.size + B * T * N) * 4
    print(f"  fused GRU forward B={B} T={T} N={N} float32: {elapsed * 1e3:.2f} ms, {moved / elapsed / 1e9:.1f} GB/s")


def main() -> int:
    rng = np.random.default_rng(0)
    reason = metal_scan.unavailable_reason(mx.Device(mx.gpu))
    if reason is not None:
        print(f"selftest: not run - {reason}")
        return 1
    mx.set_default_device(mx.gpu)
    print(f"Metal device: {mx.metal.device_info().get('device_name', 'unknown')}")
    ok = check_scan(rng)
    ok &= check_fused(rng)
    speed(rng)
    print("\nselftest:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
