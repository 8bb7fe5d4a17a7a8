"""PyTorch-only behaviour: gradcheck, autocast, Apple checkpoints, initialisation."""

import numpy as np
import pytest
import torch

from pararnn_core import NewtonConfig
from pararnn_torch import ParaGRU, ParaLSTM, ParaRNN


@pytest.mark.parametrize("cell", ["gru", "lstm", "mgu"])
@pytest.mark.parametrize("with_resets", [False, True])
def test_gradcheck_parallel(cell, with_resets):
    torch.manual_seed(0)
    layer = ParaRNN(cell, 4, 4, 2, mode="parallel", dtype=torch.float64, newton=NewtonConfig(tol=1e-13))
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    k = layer.cell.state_size
    h0 = tuple(0.5 * torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(k))
    resets = torch.zeros(2, 9, dtype=torch.bool)
    if with_resets:
        resets[0, 4] = resets[1, 2] = True

    def fn(x, weight, bias, recurrent, *state):
        params = dict(weight=weight, bias=bias, recurrent=recurrent)
        y, final = torch.func.functional_call(
            layer, params, (x,), dict(state=state if k > 1 else state[0], resets=resets, return_state=True)
        )
        finals = final if isinstance(final, tuple) else (final,)
        return (y,) + finals

    inputs = (x, *(p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias, layer.recurrent)), *h0)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [ParaGRU, ParaLSTM])
def test_autocast_bfloat16(cls):
    torch.manual_seed(0)
    layer = cls(16, 16, 2)
    x = torch.randn(2, 32, 16, requires_grad=True)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # the projection ran in bf16; the solve in float32
    assert (y.float() - ref).abs().max() < 5e-2
    y.float().square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()


def apple_reference(cell, A, B, b, x, C=None):
    """Apple's cell tensors, evaluated step by step from the paper's equations (numpy)."""
    H, Dh, _, Nh = B.shape
    Bsz, T, _ = x.shape
    u = np.einsum("bthi,higj->btghj", x.reshape(Bsz, T, H, Dh), B).reshape(Bsz, T, 3, H * Nh) + b
    sig = lambda v: 1 / (1 + np.exp(-v))
    h = np.zeros((Bsz, H * Nh))
    c = np.zeros_like(h)
    ys = []
    for t in range(T):
        if cell == "gru":  # rows z, r, c
            z = sig(A[0] * h + u[:, t, 0])
            r = sig(A[1] * h + u[:, t, 1])
            cand = np.tanh(A[2] * h * r + u[:, t, 2])
            h = (1 - z) * h + z * cand
        else:  # rows f, o, c; peepholes C rows f, o
            f = sig(A[0] * h + C[0] * c + u[:, t, 0])
            cand = np.tanh(A[2] * h + u[:, t, 2])
            c = f * c + (1 - f) * cand
            o = sig(A[1] * h + C[1] * c + u[:, t, 1])
            h = o * np.tanh(c)
        ys.append(h)
    return np.stack(ys, 1)


@pytest.mark.parametrize("cell,cls", [("gru", ParaGRU), ("lstm", ParaLSTM)])
@pytest.mark.parametrize("heads", [1, 2])
def test_from_apple_state_dict_matches_equations(cell, cls, heads):
    rng = np.random.default_rng(3)
    N, D = 8, 6
    tensors = {
        "A": rng.normal(0, 0.5, (3, N)),
        "B": rng.normal(0, 0.5, (heads, D // heads, 3, N // heads)),
        "b": rng.normal(0, 0.5, (3, N)),
    }
    if cell == "lstm":
        tensors["C"] = rng.normal(0, 0.5, (2, N))
    sd = {f"model.layers.0.cell.{k}": torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    layer = cls.from_apple_state_dict(sd, num_heads=heads)
    assert (layer.input_size, layer.hidden_size, layer.num_heads) == (D, N, heads)
    x = rng.standard_normal((2, 30, D))
    y = layer(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(y, apple_reference(cell, **tensors, x=x), atol=2e-6)


def test_from_apple_state_dict_errors():
    good = {"A": torch.zeros(3, 4), "B": torch.zeros(1, 2, 3, 4), "b": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"missing keys \['b'\]"):
        ParaGRU.from_apple_state_dict({k: v for k, v in good.items() if k != "b"})
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        ParaGRU.from_apple_state_dict({**good, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="is num_heads right"):
        ParaGRU.from_apple_state_dict(good, num_heads=2)
    with pytest.raises(ValueError, match=r"missing keys \['C'\]"):
        ParaLSTM.from_apple_state_dict(good)
    with pytest.raises(ValueError, match=r"C must have shape \[2, 4\]"):
        ParaLSTM.from_apple_state_dict({**good, "C": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="needs cell='gru' or cell='lstm'"):
        ParaRNN.from_apple_state_dict(good)
    generic = ParaRNN.from_apple_state_dict(good, cell="gru")
    assert generic.cell.name == "gru" and type(generic) is ParaRNN


def test_initialisation_follows_the_plan():
    torch.manual_seed(0)
    layer = ParaLSTM(64, 128, 2).requires_grad_(False)
    bound = 1 / np.sqrt(32)
    assert layer.weight.abs().max() <= bound and layer.weight.std() > 0.5 * bound / np.sqrt(3)
    forget_bias = torch.sigmoid(layer.bias[0])
    # a spread of memory time scales 1/(1-f) from 2 to 256 steps, repeated per head
    timescales = 1 / (1 - forget_bias)
    assert timescales.min().item() == pytest.approx(2, rel=1e-3)
    assert timescales.max().item() == pytest.approx(256, rel=1e-2)
    assert torch.equal(layer.bias[0, :64], layer.bias[0, 64:])
    assert torch.count_nonzero(layer.bias[1:]) == 0
    assert 0.05 < layer.recurrent.std() < 0.15


def test_mode_strings_and_auto():
    layer = ParaGRU(4, 4)
    assert layer.mode == "auto" and layer.resolved_mode() in ("parallel", "kernel", "fused")
    for mode in ("sequential", "parallel"):
        layer.mode = mode
        layer(torch.randn(1, 3, 4))
        assert layer.last_solve.mode == mode


def test_layer_check_of_the_main_job_runs_every_mode(capsys):
    """scripts/main.sh ends with this check; exact modes print no Newton iteration count."""
    from pararnn_torch import demo

    assert demo.main(["--length", "24", "--batch", "2", "--size", "8", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "largest error" in out and "OK" in out and "ParaLSTM" in out
