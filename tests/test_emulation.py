"""The CUDA and Metal scan kernels, compiled unmodified with g++ and run on CPU threads (tests/emulation)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.emulation.harness import CSRC, METAL, EmulationError, compile_cuda, compile_metal, have_compiler
from tests.emulation.scan_cases import random_scan_inputs, reference_scan, tolerance

pytestmark = pytest.mark.skipif(
    not have_compiler(), reason="g++ not found: the GPU kernel emulation needs a C++ compiler"
)

CHUNK = 3  # steps per thread; odd so that T is rarely a multiple of it
SCAN_PARAMS = ["const {S}*", "const {S}*", "const {S}*", "{S}*", "int64_t", "int64_t", "int"]
CTYPE = {np.float32: "float", np.float64: "double"}

# (B, T, N, threads): T = 1; T not a multiple of the chunk or the warp; T over
# several tiles of one block (carry); several blocks; 3 warps per block
SHAPES = [(1, 1, 2, 64), (2, 45, 1, 64), (2, 400, 3, 64), (1, 300, 2, 96)]
DIRECTIONS = [(False, False), (False, True), (True, False), (True, True)]  # (reverse, with h0)


def cuda_scan(dtype, K):
    S = CTYPE[dtype]
    return compile_cuda(
        CSRC / "scan" / "scan_kernel.cuh",
        f"pararnn::structured_scan_kernel<{S}, {S}, {K}, {CHUNK}>",
        [p.format(S=S) for p in SCAN_PARAMS],
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [1, 2])
def test_cuda_scan_kernel_matches_framework_scan(dtype, K):
    kernel = cuda_scan(dtype, K)
    for B, T, N, threads in SHAPES:
        for reverse, with_h0 in DIRECTIONS:
            A, b, h0 = random_scan_inputs(B, T, K, N, dtype, with_h0, seed=T + K)
            h = np.full((B, T, K, N), np.nan, dtype)  # poison: unwritten elements fail
            kernel(grid=(B * N,), block=(threads,), args=[A, b, h0, h, T, N, int(reverse)])
            err = np.abs(h - reference_scan(A, b, h0, reverse)).max()
            assert err <= tolerance(dtype, T), f"B={B} T={T} N={N} K={K} reverse={reverse} h0={with_h0}: {err}"


def metal_scan(K, A, b, h0, dims):
    return compile_metal(
        "pararnn_scan",
        (METAL / "scan" / "scan.metal").read_text(),
        inputs=[("A", A), ("b", b), ("h0", h0), ("dims", dims)],
        outputs=[("h", np.float32)],
        template=[("T", np.float32), ("K", K), ("CHUNK", CHUNK)],
        header=(METAL / "scan" / "scan_header.metal").read_text(),
    )


@pytest.mark.parametrize("K", [1, 2])
def test_metal_scan_kernel_matches_framework_scan(K):
    # Metal has no float64: the Metal kernel computes in float32 for every storage type
    dtype = np.float32
    kernel = None
    for B, T, N, threads in SHAPES:
        for reverse, with_h0 in DIRECTIONS:
            A, b, h0 = random_scan_inputs(B, T, K, N, dtype, with_h0, seed=T + K)
            h0_arg = h0 if with_h0 else np.zeros(1, dtype)
            dims = np.array([B, T, N, reverse, with_h0], np.uint32)
            kernel = kernel or metal_scan(K, A, b, h0_arg, dims)
            (h,) = kernel(
                [A, b, h0_arg, dims],
                grid=(threads, B * N, 1),
                threadgroup=(threads, 1, 1),
                output_shapes=[(B, T, K, N)],
            )
            err = np.abs(h - reference_scan(A, b, h0, reverse)).max()
            assert err <= tolerance(dtype, T), f"B={B} T={T} N={N} K={K} reverse={reverse} h0={with_h0}: {err}"


# ----------------------------------------------------------------------------- the harness itself

SHUFFLE_PROBE = """
__global__ void probe(int* up, int* down, int* idx) {
  int lane = threadIdx.x % 32;
  up[threadIdx.x] = __shfl_up_sync(0xffffffffu, 100 + lane, 3);
  down[threadIdx.x] = __shfl_down_sync(0xffffffffu, 100 + lane, 5);
  idx[threadIdx.x] = __shfl_sync(0xffffffffu, 100 + lane, 7);
}
"""


def test_cuda_shuffles_follow_cuda_semantics():
    kernel = compile_cuda(SHUFFLE_PROBE, "probe", ["int*"] * 3)
    outs = [np.full(64, -1, np.int32) for _ in range(3)]
    kernel(grid=(1,), block=(64,), args=outs)
    up, down, idx = outs
    lane = np.arange(64) % 32
    np.testing.assert_array_equal(up, 100 + np.where(lane >= 3, lane - 3, lane))
    np.testing.assert_array_equal(down, 100 + np.where(lane + 5 < 32, lane + 5, lane))
    np.testing.assert_array_equal(idx, np.full(64, 107))


def test_barrier_in_divergent_code_is_reported_not_hung(monkeypatch):
    monkeypatch.setenv("PARARNN_EMU_TIMEOUT", "2")
    source = "__global__ void stuck(int* out) { if (threadIdx.x < 16) __syncthreads(); out[threadIdx.x] = 1; }"
    kernel = compile_cuda(source, "stuck", ["int*"])
    with pytest.raises(EmulationError, match="deadlock"):
        kernel(grid=(1,), block=(64,), args=[np.zeros(64, np.int32)])


def test_metal_outputs_start_poisoned():
    source = "if (thread_position_in_grid.x % 2 == 0) out[thread_position_in_grid.x] = inp[thread_position_in_grid.x];"
    x = np.arange(64, dtype=np.float32)
    kernel = compile_metal("half_written", source, inputs=[("inp", x)], outputs=[("out", np.float32)])
    (out,) = kernel([x], grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)])
    np.testing.assert_array_equal(out[0::2], x[0::2])
    assert np.isnan(out[1::2]).all()


def test_metal_kernel_with_the_loader_dispatch():
    """The launch parameters pararnn_mlx/metal_scan.py uses on a Mac (CHUNK, threads per threadgroup)."""
    metal_scan = pytest.importorskip("pararnn_mlx.metal_scan")
    B, T, K, N = 1, 1500, 2, 3
    threads = metal_scan.threads_for(T)
    assert threads % 32 == 0 and threads <= metal_scan.MAX_THREADS and threads * metal_scan.CHUNK < T  # several tiles
    A, b, h0 = random_scan_inputs(B, T, K, N, np.float32, True)
    dims = np.array([B, T, N, 0, 1], np.uint32)
    kernel = compile_metal(
        "pararnn_scan",
        (METAL / "scan" / "scan.metal").read_text(),
        inputs=[("A", A), ("b", b), ("h0", h0), ("dims", dims)],
        outputs=[("h", np.float32)],
        template=[("T", np.float32), ("K", K), ("CHUNK", metal_scan.CHUNK)],
        header=(METAL / "scan" / "scan_header.metal").read_text(),
    )
    (h,) = kernel([A, b, h0, dims], grid=(threads, B * N, 1), threadgroup=(threads, 1, 1), output_shapes=[b.shape])
    assert np.abs(h - reference_scan(A, b, h0)).max() <= tolerance(np.float32, T)


def test_mlx_kernel_mode_explains_why_it_is_unavailable_without_metal():
    mx = pytest.importorskip("mlx.core")
    if mx.metal.is_available():
        pytest.skip("a Metal device is present: python -m pararnn_mlx.selftest runs the kernel on it")
    from pararnn_mlx.modes import resolve_mode, unavailable_modes

    assert "no Metal device" in unavailable_modes()["kernel"]
    assert resolve_mode("auto") != "kernel"
    with pytest.raises(ValueError, match="no Metal device"):
        resolve_mode("kernel")
