"""The CUDA and Metal scan kernels, compiled unmodified with g++ and run on CPU threads (tests/emulation)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.emulation.harness import (
    BFLOAT16,
    EmulationError,
    access_report,
    compile_cuda,
    compile_cuda_library,
    compile_metal,
    cuda_entry,
    have_compiler,
    reset_access_report,
)
from tests.emulation.scan_cases import random_scan_inputs, reference_scan, tolerance

pytestmark = pytest.mark.skipif(
    not have_compiler(), reason="g++ not found: the GPU kernel emulation needs a C++ compiler"
)

DIRECTIONS = [(False, False), (False, True), (True, False), (True, True)]  # (reverse, with h0)

# The CUDA scan runs through its own launcher (csrc/scan/scan_cuda.cu: geometry and template instances as
# shipped); this extern "C" shim only exposes launch_structured_scan to ctypes.
_CUDA_SCAN_SHIM = """
#include "scan_cuda.cu"
extern "C" int emu_scan(int dtype, const void* A, const void* b, const void* h0, void* h, int64_t B, int64_t T,
                        int64_t N, int K, int reverse) {
  return pararnn::launch_structured_scan(static_cast<pararnn::ScanDtype>(dtype), A, b, h0, h, B, T, N, K,
                                         reverse != 0, nullptr);
}
"""
# ScanDtype order in csrc/scan/scan_cuda.h
_SCAN_DTYPES = {"f32": 0, "f64": 1, "f16": 2, "bf16": 3}
_SCAN_ARGS = ["int", "void*", "void*", "void*", "void*", "int64_t", "int64_t", "int64_t", "int", "int"]


@functools.cache
def _cuda_scan_library():
    return compile_cuda_library(_CUDA_SCAN_SHIM)


def cuda_scan(dtype, A, b, h0, reverse):
    """h of the shipped CUDA scan for storage dtype f32/f64/f16/bf16 (inputs rounded to it), as float64."""
    B, T, K, N = b.shape
    to, back = _STORAGE[dtype]
    A_s, b_s = _aligned(to(A)), _aligned(to(b))
    h0_s = _aligned(to(h0)) if h0 is not None else None
    h = _aligned(np.full(b.shape, 0xFFFF, np.uint16) if dtype == "bf16" else np.full(b.shape, np.nan, b_s.dtype))
    cuda_entry(_cuda_scan_library(), "emu_scan", _SCAN_ARGS)(_SCAN_DTYPES[dtype], A_s, b_s, h0_s, h, B, T, N, K,
                                                               int(reverse))  # fmt: skip
    return back(h), back(A_s), back(b_s), (back(h0_s) if h0 is not None else None)


def _bf16(a):
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


_STORAGE = {
    "f32": (lambda a: np.ascontiguousarray(a, np.float32), lambda a: a.astype(np.float64)),
    "f64": (lambda a: np.ascontiguousarray(a, np.float64), lambda a: a.astype(np.float64)),
    "f16": (lambda a: np.ascontiguousarray(a, np.float16), lambda a: a.astype(np.float64)),
    "bf16": (_bf16, lambda a: (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)),
}


def _aligned(a):
    """A copy on a 256-byte boundary, as cudaMalloc returns."""
    raw = np.empty(a.nbytes + 256, np.uint8)
    offset = (-raw.ctypes.data) % 256
    out = raw[offset : offset + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


# every K the loader accepts (1..4), every storage type; T = 1, a partial tile, several tiles; N = 37 is a
# full and a partial channel block
@pytest.mark.parametrize("dtype", ["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_cuda_scan_launcher_matches_framework_scan(dtype, K):
    for B, T, N in [(1, 1, 3), (2, 70, 37)]:
        for reverse, with_h0 in DIRECTIONS:
            A, b, h0 = random_scan_inputs(B, T, K, N, np.float64, with_h0, seed=T + K)
            h, A_r, b_r, h0_r = cuda_scan(dtype, A, b, h0, reverse)
            err = np.abs(h - reference_scan(A_r, b_r, h0_r, reverse)).max()
            limit = {"f32": tolerance(np.float32, T), "f64": tolerance(np.float64, T), "f16": 2e-2, "bf16": 1e-1}
            assert err <= limit[dtype], f"{dtype} B={B} T={T} N={N} K={K} reverse={reverse} h0={with_h0}: {err}"


def test_cuda_scan_is_coalesced():
    """Sector efficiency of the shipped scan, float32, B=4, N=256, K=1 and 2; T=256 instead of 2048 (the
    emulator runs each GPU thread as a CPU thread; efficiency does not depend on T)."""
    dll = _cuda_scan_library()
    reset_access_report(dll)
    for K in (1, 2):
        A, b, _ = random_scan_inputs(4, 256, K, 256, np.float64, False, seed=K)
        cuda_scan("f32", A, b, None, False)
    rows = [(name, useful / sectors) for name, (_, useful, sectors) in access_report(dll).items()]
    print("\n".join(f"{eff:6.1%}  {name}" for name, eff in rows))
    assert len(rows) == 2
    for name, efficiency in rows:
        assert efficiency >= 0.5, f"{name}: {efficiency:.1%} sector efficiency"


# storage types of the Metal scan (pararnn_mlx.metal_scan accepts float32, float16, bfloat16): numpy dtype of the
# emulated arrays, conversion from and back to float64
_METAL_STORAGE = {
    "f32": (np.float32, lambda a: np.ascontiguousarray(a, np.float32), lambda a: a.astype(np.float64)),
    "f16": (np.float16, lambda a: np.ascontiguousarray(a, np.float16), lambda a: a.astype(np.float64)),
    "bf16": (BFLOAT16, lambda a: _bf16(a).view(BFLOAT16), lambda a: _STORAGE["bf16"][1](a.view(np.uint16))),
}


@functools.cache
def metal_scan(K, dtype="f32"):
    """The Metal scan as pararnn_mlx/metal_scan.py builds it: its body, header and template."""
    metal_scan = pytest.importorskip("pararnn_mlx.metal_scan")
    body, header = metal_scan.kernel_source()
    storage, to, _ = _METAL_STORAGE[dtype]
    A, b, h0 = (to(x) for x in random_scan_inputs(1, 2, K, 2, np.float32, True))
    inputs = [("A", A), ("b", b), ("h0", h0), ("dims", np.zeros(5, np.uint32))]
    template = metal_scan.template(storage, K)
    return compile_metal("pararnn_scan", body, inputs=inputs, outputs=[("h", storage)], template=template,
                         header=header), metal_scan.dispatch  # fmt: skip


def run_metal_scan(A, b, h0, reverse, dtype="f32"):
    """h of the Metal scan for storage dtype (inputs rounded to it), and the rounded inputs, as float64."""
    B, T, K, N = b.shape
    kernel, dispatch = metal_scan(K, dtype)
    _, to, back = _METAL_STORAGE[dtype]
    A_s, b_s = _aligned(to(A)), _aligned(to(b))
    h0_s = _aligned(to(h0)) if h0 is not None else to(np.zeros(1))
    dims = np.array([B, T, N, reverse, h0 is not None], np.uint32)
    grid, group = dispatch(B, N)
    (h,) = kernel([A_s, b_s, h0_s, dims], grid=grid, threadgroup=group, output_shapes=[(B, T, K, N)])
    return back(h), back(A_s), back(b_s), (back(h0_s) if h0 is not None else None)


# the loader accepts any K (layers use 1 and 2); every storage type it accepts
@pytest.mark.parametrize("K, dtype", [(1, "f32"), (2, "f32"), (4, "f32"), (2, "f16"), (2, "bf16")])
def test_metal_scan_kernel_matches_framework_scan(K, dtype):
    # Metal has no float64: the Metal kernel computes in float32 for every storage type
    limit = {"f32": None, "f16": 2e-2, "bf16": 1e-1}[dtype]
    for B, T, N in [(1, 1, 3), (2, 70, 37)]:
        for reverse, with_h0 in DIRECTIONS:
            A, b, h0 = random_scan_inputs(B, T, K, N, np.float64, with_h0, seed=T + K)
            h, A_r, b_r, h0_r = run_metal_scan(A, b, h0, reverse, dtype)
            err = np.abs(h - reference_scan(A_r, b_r, h0_r, reverse)).max()
            assert err <= (limit or tolerance(np.float32, T)), f"{dtype} B={B} T={T} N={N} K={K} {reverse}: {err}"


def test_metal_scan_is_coalesced():
    """Sector efficiency of the Metal scan, float32, B=4, N=256, K=2; T=256 instead of 2048 (emulator speed)."""
    A, b, _ = random_scan_inputs(4, 256, 2, 256, np.float32, False, seed=2)
    kernel, _ = metal_scan(2)
    reset_access_report(kernel._dll)
    run_metal_scan(A, b, None, False)
    ((name, (_, useful, sectors)),) = access_report(kernel._dll).items()
    print(f"{useful / sectors:6.1%}  metal {name}")
    assert useful / sectors >= 0.5


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


def test_mlx_kernel_mode_explains_why_it_is_unavailable_without_metal():
    mx = pytest.importorskip("mlx.core")
    if mx.metal.is_available():
        pytest.skip("a Metal device is present: python -m pararnn_mlx.selftest runs the kernel on it")
    from pararnn_mlx.modes import resolve_mode, unavailable_modes

    assert "no Metal device" in unavailable_modes()["kernel"]
    assert resolve_mode("auto") != "kernel"
    with pytest.raises(ValueError, match="no Metal device"):
        resolve_mode("kernel")


def test_launch_limits_are_enforced():
    kernel = compile_cuda("__global__ void noop(int* out) { out[0] = 1; }", "noop", ["int*"])
    with pytest.raises(EmulationError, match="1024 threads"):
        kernel(grid=(1,), block=(1025,), args=[np.zeros(1, np.int32)])
    with pytest.raises(EmulationError, match="grid"):
        kernel(grid=(1, 70000), block=(1,), args=[np.zeros(1, np.int32)])
    big = "__global__ void big(float* out) { __shared__ float s[12289]; s[threadIdx.x] = 1; out[0] = s[0]; }"
    with pytest.raises(EmulationError, match="shared memory"):
        compile_cuda(big, "big", ["float*"])(grid=(1,), block=(32,), args=[np.zeros(1, np.float32)])


def test_shared_memory_is_poisoned_before_every_block():
    source = """__global__ void stale(float* out) {
      __shared__ float s[64];
      out[blockIdx.x * 64 + threadIdx.x] = s[threadIdx.x];  // read before any write: poison
      __syncthreads();
      s[threadIdx.x] = 1.0f;
    }"""
    out = np.zeros(3 * 64, np.float32)
    compile_cuda(source, "stale", ["float*"])(grid=(3,), block=(64,), args=[out])
    assert np.isnan(out).all()
