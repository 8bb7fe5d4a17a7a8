"""The native scan op torch.ops.pararnn.scan on CPU, and mode='kernel' of the torch layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pararnn_torch import _ext
from pararnn_torch.kernels import native_scan_pair, scan
from pararnn_torch.layer import ParaGRU, ParaLSTM
from pararnn_torch.modes import resolve_mode, unavailable_modes
from tests.emulation.scan_cases import random_scan_inputs, reference_scan, tolerance

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason=f"native extension not built: {_ext.missing_reason('cpu')}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_cpu_scan_matches_framework_scan(dtype, K, reverse, with_h0):
    # N = 300 spans several channel blocks and a partial one; T = 1 and T = 77 odd lengths
    for B, T, N in [(1, 1, 3), (2, 77, 300)]:
        A, b, h0 = random_scan_inputs(B, T, K, N, dtype, with_h0, seed=K)
        h = scan(torch.from_numpy(A), torch.from_numpy(b), None if h0 is None else torch.from_numpy(h0), reverse)
        assert h.shape == (B, T, K, N) and h.dtype == torch.from_numpy(b).dtype
        err = np.abs(h.numpy() - reference_scan(A, b, h0, reverse)).max()
        assert err <= tolerance(dtype, T), err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_storage_is_computed_in_float32(dtype):
    A, b, h0 = random_scan_inputs(2, 50, 2, 8, np.float32, True)
    A16, b16, h016 = (torch.from_numpy(x).to(dtype) for x in (A, b, h0))
    h = scan(A16, b16, h016)
    assert h.dtype == dtype
    expected = reference_scan(A16.float().numpy(), b16.float().numpy(), h016.float().numpy())
    # one rounding of the output to the storage type, not T accumulated ones
    assert np.abs(h.float().numpy() - expected).max() <= 2 * torch.finfo(dtype).eps * (1 + np.abs(expected).max())


def test_chunked_sequence_continues_through_h0():
    A, b, _ = random_scan_inputs(2, 64, 2, 5, np.float64, False)
    A, b = torch.from_numpy(A), torch.from_numpy(b)
    whole = scan(A, b)
    first = scan(A[:, :40], b[:, :40])
    second = scan(A[:, 40:], b[:, 40:], first[:, -1].contiguous())
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    back = scan(A, b, reverse=True)
    late = scan(A[:, 40:], b[:, 40:], reverse=True)
    early = scan(A[:, :40], b[:, :40], late[:, 0].contiguous(), reverse=True)
    torch.testing.assert_close(torch.cat([early, late], 1), back)


def test_out_variant_and_bad_input_messages():
    A, b, _ = random_scan_inputs(1, 10, 1, 4, np.float32, False)
    A, b = torch.from_numpy(A), torch.from_numpy(b)
    out = torch.empty_like(b)
    assert torch.ops.pararnn.scan.out(A, b, None, False, out=out) is out
    torch.testing.assert_close(out, scan(A, b))
    with pytest.raises(RuntimeError, match=r"A must be \[B, T, K, K, N\]"):
        scan(A[:, :5], b)
    with pytest.raises(RuntimeError, match="one dtype"):
        scan(A.double(), b)
    with pytest.raises(RuntimeError, match=r"h0 must be \[B, K, N\]"):
        scan(A, b, torch.zeros(1, 1, 3))
    with pytest.raises(RuntimeError, match="block size K must be 1..4"):
        scan(torch.zeros(1, 2, 5, 5, 3), torch.zeros(1, 2, 5, 3))


def test_scan_entries_reads_separate_block_entries():
    A, b, _ = random_scan_inputs(2, 45, 2, 70, np.float32, False)
    entries = [torch.from_numpy(A[:, :, i, j].copy()) for i in range(2) for j in range(2)]
    rhs = [torch.from_numpy(b[:, :, i].copy()) for i in range(2)]
    for reverse in (False, True):
        got = torch.stack(torch.ops.pararnn.scan_entries(entries, rhs, reverse), 2).numpy()
        assert np.abs(got - reference_scan(A, b, None, reverse)).max() <= tolerance(np.float32, 45)
    with pytest.raises(RuntimeError, match="K\\*K = 4"):
        torch.ops.pararnn.scan_entries(entries[:3], rhs)


def test_scan_compiles_with_torch_compile():
    A, b, h0 = (torch.from_numpy(x) for x in random_scan_inputs(2, 33, 2, 6, np.float32, True))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def two_scans(A, b, h0):
        return torch.ops.pararnn.scan(A, b * 2, h0, False) + torch.ops.pararnn.scan(A, b, None, True)

    torch.testing.assert_close(two_scans(A, b, h0), scan(A, b * 2, h0) + scan(A, b, None, True))


def test_kernel_mode_is_available_and_auto_prefers_it_over_parallel():
    assert "kernel" not in unavailable_modes(torch.device("cpu"))
    assert resolve_mode("auto", torch.device("cpu")) in ("fused", "kernel")  # fused, when built, ranks first


@pytest.mark.parametrize("layer_cls", [ParaGRU, ParaLSTM])
def test_kernel_mode_equals_parallel_forward_and_backward(layer_cls):
    torch.manual_seed(0)
    layer = layer_cls(6, 16, num_heads=2)
    x = torch.randn(3, 70, 6)
    h0 = None
    resets = torch.zeros(3, 70, dtype=torch.bool)
    resets[1, 30] = True
    results = {}
    for mode in ("parallel", "kernel"):
        layer.mode = mode
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi, state=h0, resets=resets)
        (y.sin().sum()).backward()
        results[mode] = (y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()])
        assert layer.last_solve.mode == mode
    (yp, gxp, gpp), (yk, gxk, gpk) = results["parallel"], results["kernel"]
    torch.testing.assert_close(yk, yp, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gxk, gxp, atol=2e-5, rtol=1e-4)
    for a, b in zip(gpk, gpp):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_native_scan_pair_matches_framework_block_scan():
    from pararnn_core.scan import block_scan
    from pararnn_torch.ops import ops

    A, b, _ = random_scan_inputs(2, 40, 2, 7, np.float64, False)
    A_nested = [[torch.from_numpy(A[:, :, i, j].copy()) for j in range(2)] for i in range(2)]
    b_list = [torch.from_numpy(b[:, :, i].copy()) for i in range(2)]
    pair = native_scan_pair()
    for reverse, solve in ((False, pair.forward), (True, pair.reverse)):
        for got, want in zip(solve(A_nested, b_list), block_scan(ops, A_nested, b_list, reverse=reverse)):
            torch.testing.assert_close(got, want)


def test_torch_compile_of_a_layer_in_kernel_mode():
    torch.manual_seed(0)
    layer = ParaLSTM(6, 16, mode="kernel")
    x = torch.randn(2, 40, 6)
    compiled = torch.compile(layer, backend="aot_eager")
    y = compiled(x)
    y.sin().sum().backward()
    compiled_grad = layer.weight.grad.clone()
    layer.zero_grad()
    eager = layer(x)
    eager.sin().sum().backward()
    torch.testing.assert_close(y, eager)
    torch.testing.assert_close(compiled_grad, layer.weight.grad)
    assert layer.last_solve.mode == "kernel"
