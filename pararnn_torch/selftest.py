"""Native scan kernels against the framework scan on this machine's devices, with errors and speed.

    python -m pararnn_torch.selftest

On a CUDA GPU it runs the CUDA kernel; on every machine the CPU kernel. It
says what it cannot run (no GPU, extension not built) and exits non-zero when
a kernel that runs disagrees with the reference.
"""

from __future__ import annotations

import sys
import time

import torch

from pararnn_core.scan import block_scan
from pararnn_torch import _ext
from pararnn_torch.ops import ops

# (B, T, K, N): T = 1, T not a multiple of any chunk, T over several GPU tiles, a large case for speed
CASES = [(1, 1, 1, 3), (2, 77, 2, 33), (3, 3001, 1, 20), (2, 2500, 2, 16)]
SPEED_CASE = (4, 8192, 1, 256)


def reference(A, b, h0, reverse):
    K = b.shape[2]
    A_nested = [[A[:, :, i, j].double() for j in range(K)] for i in range(K)]
    b_list = [b[:, :, i].double().clone() for i in range(K)]
    if h0 is not None:
        edge = -1 if reverse else 0
        for i in range(K):
            b_list[i][:, edge] += sum(A_nested[i][j][:, edge] * h0[:, j].double() for j in range(K))
    return torch.stack(block_scan(ops, A_nested, b_list, reverse=reverse), 2)


def _inputs(B, T, K, N, dtype, device, generator):
    A = (torch.rand(B, T, K, K, N, generator=generator, dtype=torch.float64) * 1.8 - 0.9) / K
    b = torch.randn(B, T, K, N, generator=generator, dtype=torch.float64)
    h0 = torch.randn(B, K, N, generator=generator, dtype=torch.float64)
    return A.to(device, dtype), b.to(device, dtype), h0.to(device, dtype)


def check_device(device: str) -> bool:
    generator = torch.Generator().manual_seed(0)
    ok = True
    print(f"\n[{device}] kernel vs framework scan (max abs error; tolerance scales with sqrt(T))")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for B, T, K, N in CASES:
            for reverse in (False, True):
                A, b, h0 = _inputs(B, T, K, N, dtype, device, generator)
                got = torch.ops.pararnn.scan(A, b, h0, reverse).double().cpu()
                want = reference(A.cpu(), b.cpu(), h0.cpu(), reverse)
                err = float((got - want).abs().max())
                eps = torch.finfo(dtype).eps
                tol = (
                    (64 * eps * max(1.0, T**0.5))
                    if dtype != torch.bfloat16
                    else 4 * eps * (1 + float(want.abs().max()))
                )
                status = "ok" if err <= tol else "FAIL"
                ok &= status == "ok"
                print(f"  {str(dtype):15} B={B} T={T:5} K={K} N={N:3} reverse={reverse!s:5}  err {err:.2e}  {status}")
    B, T, K, N = SPEED_CASE
    A, b, _ = _inputs(B, T, K, N, torch.float32, device, generator)
    out = torch.empty_like(b)

    def timed(fn, repeats):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    kernel_s = timed(lambda: torch.ops.pararnn.scan.out(A, b, None, False, out=out), 5)
    A_nested, b_list = [[A[:, :, 0, 0]]], [b[:, :, 0]]
    framework_s = timed(lambda: block_scan(ops, A_nested, b_list), 1)
    moved = (A.numel() + 2 * b.numel()) * 4
    print(
        f"  speed B={B} T={T} K={K} N={N} float32: kernel {kernel_s * 1e3:.2f} ms ({moved / kernel_s / 1e9:.1f} GB/s), "
        f"framework scan {framework_s * 1e3:.2f} ms, {framework_s / kernel_s:.1f}x"
    )
    return ok


def main() -> int:
    print(f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}")
    reason = _ext.missing_reason("cpu")
    if reason is not None:
        print(f"native extension unavailable: {reason}")
        return 1
    ok = check_device("cpu")
    if torch.cuda.is_available():
        cuda_reason = _ext.missing_reason("cuda")
        if cuda_reason is None:
            print(f"\nCUDA device: {torch.cuda.get_device_name()}")
            ok &= check_device("cuda")
        else:
            print(f"\nCUDA device present but the CUDA kernel is not available: {cuda_reason}")
    else:
        print(
            "\nno CUDA device here: the CUDA kernel was not run (tests/test_emulation.py runs it emulated on the CPU)"
        )
    print("\nselftest:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
