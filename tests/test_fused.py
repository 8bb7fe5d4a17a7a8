"""mode='fused' on the CPU (generated sweep + adjoint kernels) against the sequential reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pararnn_core.cell import Cell, get_cell
from pararnn_core.newton import NewtonConfig, NewtonConvergenceError, NewtonConvergenceWarning
from pararnn_torch import ParaRNN, fused
from pararnn_torch.fused import cell_key, fused_unavailable_reason, solve_fused
from pararnn_torch.modes import unavailable_modes
from pararnn_torch.selftest import SelftestCell
from pararnn_torch.solver import solve_sequential

CELLS = ["gru", "lstm", "mgu", SelftestCell()]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def _problem(cell, batch, steps, channels, dtype, with_h0, with_resets, seed=0):
    g = torch.Generator().manual_seed(seed)
    cell = get_cell(cell)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()

    u = rand(batch, steps, cell.num_gates, channels, scale=1.5)
    recurrent = rand(len(cell.params), channels, scale=0.5)
    bias = rand(cell.num_gates, channels, scale=0.5)
    h0 = rand(batch, cell.state_size, channels) if with_h0 else None
    resets = (torch.rand(batch, steps, generator=g) < 0.1) if with_resets else None
    upstream = torch.randn(batch, steps, cell.state_size, channels, generator=g, dtype=torch.float64).to(dtype)
    return cell, u, recurrent, bias, h0, resets, upstream


def _outputs_and_grads(solve, cell, u, recurrent, bias, h0, resets, upstream):
    traj = solve(cell, u, recurrent, bias, h0, resets)
    inputs = [t for t in (u, recurrent, bias, h0) if t is not None]
    return [traj, *torch.autograd.grad((traj * upstream).sum(), inputs)]


def _fused(cell, u, recurrent, bias, h0, resets):
    return solve_fused(cell, u, recurrent, h0, resets, bias)[0]


def _sequential(cell, u, recurrent, bias, h0, resets):
    return solve_sequential(cell, u + bias, recurrent, h0, resets)[0]


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: getattr(c, "name", c))
@pytest.mark.parametrize(
    "steps, channels, with_h0, with_resets",
    [(1, 8, False, False), (3, 70, True, False), (17, 130, True, True), (256, 64, False, True), (1000, 16, True, True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_equals_sequential(cell, steps, channels, with_h0, with_resets, dtype):
    """Trajectory and gradients w.r.t. u, recurrent params, bias and h0 (N not a multiple of the 64-lane block)."""
    problem = _problem(cell, 2, steps, channels, dtype, with_h0, with_resets)
    fused = _outputs_and_grads(_fused, *problem)
    reference = _outputs_and_grads(_sequential, *problem)
    names = ["trajectory", "d_u", "d_recurrent", "d_bias", "d_h0"]
    for name, got, want in zip(names, fused, reference):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: getattr(c, "name", c))
@pytest.mark.parametrize("num_heads", [1, 2])
def test_layer_fused_equals_sequential(cell, num_heads):
    """Through the layer: heads, initial state, resets; gradients of x, every parameter and the state."""
    torch.manual_seed(0)
    fused = ParaRNN(cell, 12, 20, num_heads=num_heads, mode="fused", dtype=torch.float64)
    reference = ParaRNN(cell, 12, 20, num_heads=num_heads, mode="sequential", dtype=torch.float64)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(3, 40, 12, dtype=torch.float64)
    k = fused.cell.state_size
    state = [torch.randn(3, 20, dtype=torch.float64) for _ in range(k)]
    resets = torch.rand(3, 40) < 0.1
    results = []
    for layer in (fused, reference):
        xs = x.clone().requires_grad_()
        st = [s.clone().requires_grad_() for s in state]
        y, final = layer(xs, state=st[0] if k == 1 else tuple(st), resets=resets, return_state=True)
        final = (final,) if k == 1 else final
        loss = (y * torch.linspace(-1, 1, 20, dtype=torch.float64)).sum() + sum(f.square().sum() for f in final)
        grads = torch.autograd.grad(loss, [xs, *st, *layer.parameters()])
        results.append([y, *final, *grads])
    assert fused.last_solve.mode == "fused"
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


def test_auto_prefers_fused_on_cpu_and_low_precision_runs_in_float32():
    layer = ParaRNN("gru", 16, 16)
    assert layer.resolved_mode() == "fused"
    x = torch.randn(2, 30, 16)
    y_bf16 = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y_bf16.dtype == torch.bfloat16 and layer.last_solve.mode == "fused"
    layer.mode = "sequential"
    torch.testing.assert_close(y_bf16.float(), layer(x.to(torch.bfloat16)).float(), rtol=0.05, atol=0.05)


class UngeneratableCell(Cell):
    name = "test_fused_ungeneratable"
    gates = ("c",)
    state = ("h",)

    def step(self, ops, s, u, p):
        return (ops.where(u.c > 0, ops.tanh(s.h + u.c), s.h),)


def test_cell_without_symbolic_form_keeps_other_modes():
    layer = ParaRNN(UngeneratableCell(), 8, 8)
    reason = unavailable_modes(torch.device("cpu"), layer.cell)["fused"]
    assert "ops.where" in reason
    assert layer.resolved_mode() != "fused"
    layer(torch.randn(2, 5, 8))  # auto still runs
    layer.mode = "fused"
    with pytest.raises(ValueError, match="ops.where"):
        layer(torch.randn(2, 5, 8))


def _op_args(cell_name="lstm", steps=5, channels=9):
    cell, u, recurrent, bias, h0, resets, upstream = _problem(cell_name, 2, steps, channels, torch.float32, True, True)
    assert fused_unavailable_reason(cell, "cpu") is None
    return cell, [t.detach() for t in (u, recurrent, bias, h0)], resets, upstream


def test_fused_ops_pass_opcheck():
    """torch.library.opcheck of the C++ ops: schema, fake (meta) shapes, autograd registration."""
    cell, args, resets, upstream = _op_args()
    key = cell_key(cell)
    forward_args = (*[a.clone().requires_grad_(i != 3) for i, a in enumerate(args)], resets, key, 12, 1e-6, 1.0)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")  # AOT dispatch: the compile test
    torch.library.opcheck(torch.ops.pararnn.fused_forward.default, forward_args, test_utils=checks)
    traj, _, _ = torch.ops.pararnn.fused_forward(*args, resets, key, 12, 1e-6, 1.0)
    backward_args = (*args, resets, traj, upstream, key)
    torch.library.opcheck(torch.ops.pararnn.fused_backward.default, backward_args, test_utils=checks)


def test_fused_ops_trace_under_torch_compile():
    """A compiled graph (fullgraph: no break) around the forward op and its autograd equals eager."""
    cell, args, resets, upstream = _op_args("gru", steps=7, channels=5)
    key = cell_key(cell)

    def loss(u, recurrent, bias, h0):
        traj, _, _ = torch.ops.pararnn.fused_forward(u, recurrent, bias, h0, resets, key, 12, 1e-6, 1.0)
        return (traj * upstream).sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        inputs = [a.clone().requires_grad_() for a in args]
        value = fn(*inputs)
        results.append([value, *torch.autograd.grad(value, inputs)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_fused_ops_explain_bad_input():
    cell, args, resets, _ = _op_args("gru", steps=4, channels=6)
    key = cell_key(cell)
    with pytest.raises(RuntimeError, match="unknown cell key 'nope'"):
        torch.ops.pararnn.fused_forward(*args, resets, "nope", 12, 1e-6, 1.0)
    with pytest.raises(RuntimeError, match=r"recurrent must be \[P, N\] = \[3, 6\]"):
        torch.ops.pararnn.fused_forward(args[0], args[1][:2], None, None, None, key, 12, 1e-6, 1.0)
    with pytest.raises(RuntimeError, match="resets must be a bool tensor"):
        torch.ops.pararnn.fused_forward(args[0], args[1], None, None, resets.float(), key, 12, 1e-6, 1.0)
    with pytest.raises(RuntimeError, match="compute in float32 or float64"):
        torch.ops.pararnn.fused_forward(args[0].half(), args[1].half(), None, None, None, key, 12, 1e-6, 1.0)


def test_cpu_sweep_reports_exact_solve():
    cell, args, resets, _ = _op_args("gru", steps=4, channels=6)
    u, recurrent, bias, h0 = args
    _, info = solve_fused(cell, u, recurrent, h0, resets, bias, NewtonConfig())
    assert (info.mode, info.iterations, info.residual, info.converged) == ("fused", None, None, True)


def test_cpu_outputs_reuse_only_storage_nothing_holds():
    """The op's megabyte outputs come from a pool: a trajectory still referenced (here through a view) is
    never handed out again; once every reference is gone the next call reuses its storage."""
    cell = get_cell("gru")
    assert fused_unavailable_reason(cell, "cpu") is None
    key = cell_key(cell)
    torch.manual_seed(0)
    u, recurrent = torch.randn(2, 4096, 3, 64), torch.randn(3, 64) * 0.5  # trajectory of 2 MiB

    def forward(inputs):
        return torch.ops.pararnn.fused_forward(inputs, recurrent, None, None, None, key, 1, 0.0, 1.0)[0]

    first = forward(u)
    kept_view = first[:, -1]  # a view keeps the storage alive
    expected = kept_view.clone()
    address = first.data_ptr()
    del first
    second = forward(u * 0.5)
    assert second.data_ptr() != address and torch.equal(kept_view, expected)
    del kept_view, second
    third = forward(u)
    assert third.data_ptr() == address  # nothing held it: reused
    assert torch.equal(third[:, -1], expected)
    fused.release_cpu_outputs()  # storage in use stays: neither freed nor handed out again
    fourth = forward(u * 0.5)
    assert fourth.data_ptr() != address and torch.equal(third[:, -1], expected)


def test_availability_is_decided_once_per_cell_and_device(monkeypatch):
    cell = SelftestCell()
    assert fused_unavailable_reason(cell, "cpu") is None

    def fail(*_):
        raise AssertionError("re-checked on the hot path")

    monkeypatch.setattr(fused, "_first_check", fail)
    monkeypatch.setattr(fused, "definition_hash", fail)
    assert fused_unavailable_reason(cell, torch.device("cpu")) is None
    solve_fused(cell, *_problem(cell, 1, 3, 4, torch.float32, False, False)[1:3], None, None)


@pytest.mark.parametrize("on_failure", ["fallback", "warn", "raise"])
def test_newton_kernel_results_follow_the_failure_policy(on_failure):
    """What the CUDA forward reports per sequence becomes SolveInfo and the shared failure policy (tested here
    on CPU tensors: the report does not depend on the device)."""
    cell, u, recurrent, bias, h0, resets, _ = _problem("gru", 2, 6, 4, torch.float32, True, True)
    exact = _sequential(cell, u, recurrent, bias, h0, resets)
    config = NewtonConfig(max_its=3, on_failure=on_failure)
    iterations = torch.full((2, 4), 3, dtype=torch.int32)
    residual = torch.full((2, 4), 1e-8)
    traj, info = fused._newton_report(cell, exact + 1, iterations, residual, u, recurrent, h0, resets, bias,
                                      config, 1e-6)
    assert (info.iterations, info.converged, info.fell_back) == (3, True, False)
    residual[1, 2] = 0.5
    if on_failure == "raise":
        with pytest.raises(NewtonConvergenceError, match="did not reach tol"):
            fused._newton_report(cell, exact + 1, iterations, residual, u, recurrent, h0, resets, bias, config, 1e-6)
        return
    with pytest.warns(NewtonConvergenceWarning, match="did not reach tol"):
        traj, info = fused._newton_report(cell, exact + 1, iterations, residual, u, recurrent, h0, resets, bias,
                                          config, 1e-6)
    assert info.residual == pytest.approx(0.5) and not info.converged
    assert info.fell_back == (on_failure == "fallback")
    torch.testing.assert_close(traj, exact if on_failure == "fallback" else exact + 1)


def test_device_check_without_gpu_says_so_in_one_line_and_fails(tmp_path):
    """scripts/device_check.sh on a machine without a CUDA GPU (this one): one line, non-zero exit, no output dir."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "PARARNN_DEVICE_CHECK_OUT": str(tmp_path / "out")}
    result = subprocess.run([str(root / "scripts" / "device_check.sh")], capture_output=True, text=True, env=env,
                            timeout=120)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("device_check: no CUDA GPU"), lines
    assert not (tmp_path / "out").exists()


def test_nvrtc_targets_the_device_or_ptx_for_a_newer_one(monkeypatch):
    from pararnn_torch import nvrtc

    monkeypatch.setattr(nvrtc, "supported_archs", lambda: [75, 80, 90, 120])
    assert nvrtc.target_for((9, 0)) == "sm_90"
    assert nvrtc.target_for((10, 3)) == "compute_90"  # a GPU this NVRTC does not know: PTX the driver JITs
    with pytest.raises(nvrtc.NvrtcError, match="sm_75 and newer"):
        nvrtc.target_for((7, 0))


def test_nvrtc_without_cuda_bindings_says_what_to_install():
    from pararnn_torch import nvrtc

    try:
        import cuda.bindings  # noqa: F401
    except ImportError:
        nvrtc.bindings.cache_clear()
        with pytest.raises(nvrtc.NvrtcError, match=r"pip install 'pararnn-mlx\[cuda\]'"):
            nvrtc.bindings()
    else:
        pytest.skip("cuda-bindings is installed here")
