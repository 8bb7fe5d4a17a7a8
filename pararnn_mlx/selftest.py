"""The Metal scan kernel against the framework scan on this Mac, with errors and speed.

    python -m pararnn_mlx.selftest

Without a Metal device it says so, checks that mode='kernel' reports itself
unavailable, and (in a repository checkout with g++) runs the same Metal kernel
body in the CPU emulator of tests/emulation. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
import numpy as np

from pararnn_core.ops import NumpyOps
from pararnn_core.scan import block_scan
from pararnn_mlx import metal_scan

# (B, T, K, N): T = 1, T not a multiple of a chunk, T over several tiles
CASES = [(1, 1, 1, 3), (2, 77, 2, 33), (3, 3001, 1, 20), (2, 2500, 2, 16)]
SPEED_CASE = (4, 8192, 1, 256)


def _inputs(B, T, K, N, rng):
    A = (rng.uniform(-0.9, 0.9, (B, T, K, K, N)) / K).astype(np.float32)
    b = rng.standard_normal((B, T, K, N)).astype(np.float32)
    h0 = rng.standard_normal((B, K, N)).astype(np.float32)
    return A, b, h0


def reference(A, b, h0, reverse):
    K = b.shape[2]
    A64, b64 = A.astype(np.float64), b.astype(np.float64)
    A_nested = [[A64[:, :, i, j] for j in range(K)] for i in range(K)]
    b_list = [b64[:, :, i].copy() for i in range(K)]
    edge = -1 if reverse else 0
    for i in range(K):
        b_list[i][:, edge] += sum(A64[:, edge, i, j] * h0[:, j] for j in range(K))
    return np.stack(block_scan(NumpyOps(), A_nested, b_list, reverse=reverse), 2)


def _report(name, err, T):
    tol = 64 * np.finfo(np.float32).eps * max(1.0, T**0.5)
    print(f"  {name}  err {err:.2e}  {'ok' if err <= tol else 'FAIL'}")
    return err <= tol


def run_on_metal(rng) -> bool:
    ok = True
    print(f"\nMetal device: {mx.metal.device_info().get('device_name', 'unknown')}")
    for B, T, K, N in CASES:
        for reverse in (False, True):
            A, b, h0 = _inputs(B, T, K, N, rng)
            got = np.array(metal_scan.scan(mx.array(A), mx.array(b), mx.array(h0), reverse))
            ok &= _report(
                f"B={B} T={T:5} K={K} N={N:3} reverse={reverse!s:5}",
                np.abs(got - reference(A, b, h0, reverse)).max(),
                T,
            )
    B, T, K, N = SPEED_CASE
    A, b, _ = (mx.array(x) for x in _inputs(B, T, K, N, rng))
    mx.eval(metal_scan.scan(A, b))
    start = time.perf_counter()
    for _ in range(10):
        mx.eval(metal_scan.scan(A, b))
    elapsed = (time.perf_counter() - start) / 10
    moved = (A.size + 2 * b.size) * 4
    print(f"  speed B={B} T={T} K={K} N={N} float32: {elapsed * 1e3:.2f} ms, {moved / elapsed / 1e9:.1f} GB/s")
    return ok


def run_emulated(rng) -> bool:
    try:
        from tests.emulation.harness import METAL, compile_metal, have_compiler
    except ImportError:
        print("the CPU emulator (tests/emulation) is not importable here: run from a repository checkout")
        return True
    if not have_compiler():
        print("no g++: cannot run the Metal kernel in the CPU emulator")
        return True
    print("\nrunning the Metal kernel body in the CPU emulator (tests/emulation), float32")
    ok = True
    for B, T, K, N in CASES[:3]:
        A, b, h0 = _inputs(B, T, K, N, rng)
        for reverse in (False, True):
            dims = np.array([B, T, N, reverse, 1], np.uint32)
            kernel = compile_metal(
                "pararnn_scan",
                (METAL / "scan" / "scan.metal").read_text(),
                [("A", A), ("b", b), ("h0", h0), ("dims", dims)],
                [("h", np.float32)],
                template=[("T", np.float32), ("K", K), ("CHUNK", metal_scan.CHUNK)],
                header=(METAL / "scan" / "scan_header.metal").read_text(),
            )
            threads = metal_scan.threads_for(T)
            (got,) = kernel(
                [A, b, h0, dims], grid=(threads, B * N, 1), threadgroup=(threads, 1, 1), output_shapes=[b.shape]
            )
            ok &= _report(
                f"emulated B={B} T={T:5} K={K} N={N:3} reverse={reverse!s:5}",
                np.abs(got - reference(A, b, h0, reverse)).max(),
                T,
            )
    return ok


def main() -> int:
    rng = np.random.default_rng(0)
    reason = metal_scan.unavailable_reason(mx.Device(mx.gpu))
    if reason is None:
        ok = run_on_metal(rng)
    else:
        print(f"Metal scan not run on a device: {reason}")
        ok = run_emulated(rng)
    print("\nselftest:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
