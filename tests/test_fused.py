"""mode='fused' on the CPU (generated sweep + adjoint kernels) against the sequential reference."""

from __future__ import annotations

import pytest
import torch

from pararnn_core.cell import Cell, Normal, get_cell
from pararnn_torch import ParaRNN
from pararnn_torch.fused import solve_fused
from pararnn_torch.modes import unavailable_modes
from pararnn_torch.solver import solve_sequential


class PeepholeCell(Cell):
    """Defined only here: a K=2 cell (state r, h) with softplus and exp, so fused kernels are truly generated."""

    name = "test_fused_peephole"
    gates = ("i", "c", "o")
    state = ("r", "h")
    params = {"a": Normal(0.2), "b": Normal(0.2), "d": Normal(0.2)}

    def step(self, ops, s, u, p):
        keep = ops.exp(-ops.softplus(u.i + p.a * s.h))
        r = keep * s.r + (1 - keep) * ops.tanh(u.c + p.b * s.r)
        return r, ops.sigmoid(u.o + p.d * r) * ops.tanh(r)


CELLS = ["gru", "lstm", "mgu", PeepholeCell()]
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


def test_fused_ops_have_consistent_fake_implementations():
    """torch.library.opcheck: schema, fake (meta) shapes and autograd registration of the custom ops."""
    from pararnn_torch.fused import _library_for, fused_backward, fused_forward

    cell, u, recurrent, bias, h0, resets, upstream = _problem("lstm", 2, 5, 9, torch.float32, True, True)
    key, _ = _library_for(cell)
    args = [t.detach() for t in (u, recurrent, bias, h0)]
    torch.library.opcheck(fused_forward, (*args, resets, key), test_utils=("test_schema", "test_faketensor"))
    traj = fused_forward(*args, resets, key)
    torch.library.opcheck(
        fused_backward, (*args, resets, traj, upstream, key), test_utils=("test_schema", "test_faketensor")
    )
