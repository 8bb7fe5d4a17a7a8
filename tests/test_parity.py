"""Cross-backend parity: one set of weights in one safetensors file, run by PyTorch and by MLX.

Tolerance (float32, documented in the README): outputs, final states and gradients
agree to 1e-5 relative (max abs difference / max(1, max |reference|)); the largest
error seen over these cases is about 2e-6. Both backends solve Newton to a residual
of 1e-6, so agreement is set by float32 rounding, not by the solver.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("torch")

from safetensors.numpy import load_file as load_numpy  # noqa: E402
from safetensors.torch import load_file as load_torch  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402

from tests.backend_mlx import MLXBackend  # noqa: E402
from tests.backends import TorchBackend  # noqa: E402

Y_TOL = GRAD_TOL = 1e-5


@pytest.fixture(scope="module")
def torch_backend():
    return TorchBackend()


@pytest.fixture(scope="module")
def mlx_backend():
    return MLXBackend()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def torch_to_mlx_via_file(torch_backend, mlx_backend, torch_layer, tmp_path, cell, sizes, heads, mode):
    """Save the torch layer's state_dict and load the file, unchanged, into a fresh MLX layer."""
    path = str(tmp_path / "layer.safetensors")
    save_torch(torch_layer.state_dict(), path)
    mlx_layer = mlx_backend.make_layer(cell, *sizes, heads, mode=mode, seed=99)  # different init, then loaded
    mlx_layer.load_weights(path)
    return mlx_layer


def assert_same_run(got, ref, what):
    errors = {}
    for key, value in ref.items():
        pairs = zip(got[key], value) if isinstance(value, tuple) else [(got[key], value)]
        errors[key] = max(rel_err(g, r) for g, r in pairs)
    bad = {k: e for k, e in errors.items() if e > (Y_TOL if k in ("y", "state") else GRAD_TOL)}
    assert not bad, f"{what}: relative errors above tolerance {bad}"


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("length", [1, 3, 17, 256, 1000])
@pytest.mark.parametrize("cell", ["gru", "lstm", "mgu"])
def test_torch_parallel_equals_mlx_parallel_and_sequential(torch_backend, mlx_backend, cell, length, heads, tmp_path):
    rng = np.random.default_rng(length * 10 + heads)
    batch, sizes = 2, (8, 16)
    k = 2 if cell == "lstm" else 1
    torch_layer = torch_backend.make_layer(cell, *sizes, heads, mode="parallel")
    mlx_layer = torch_to_mlx_via_file(torch_backend, mlx_backend, torch_layer, tmp_path, cell, sizes, heads, "parallel")
    x = rng.standard_normal((batch, length, sizes[0])).astype(np.float32)
    state = tuple((0.5 * rng.standard_normal((batch, sizes[1]))).astype(np.float32) for _ in range(k))
    resets = rng.random((batch, length)) < 0.05
    resets[0, length // 2] = True

    reference = torch_backend.run(torch_layer, x, state=state, resets=resets, grads=True)
    mlx_parallel = mlx_backend.run(mlx_layer, x, state=state, resets=resets, grads=True)
    assert mlx_backend.last_solve(mlx_layer).mode == "parallel"
    mlx_backend.set_mode(mlx_layer, "sequential")
    mlx_sequential = mlx_backend.run(mlx_layer, x, state=state, resets=resets, grads=True)

    expected_keys = {"y", "state", "d_x", "d_weight", "d_bias", "d_recurrent", "d_state"}
    assert set(reference) == set(mlx_parallel) == expected_keys
    assert_same_run(mlx_parallel, reference, f"{cell} T={length} H={heads} MLX parallel vs torch parallel")
    assert_same_run(mlx_sequential, reference, f"{cell} T={length} H={heads} MLX sequential vs torch parallel")


def test_weights_round_trip_bit_exactly(torch_backend, mlx_backend, tmp_path):
    """torch -> safetensors -> MLX -> safetensors -> torch, with unchanged names, for every cell."""
    for cell in ("gru", "lstm", "mgu"):
        torch_layer = torch_backend.make_layer(cell, 12, 8, 2, seed=3)
        mlx_layer = torch_to_mlx_via_file(torch_backend, mlx_backend, torch_layer, tmp_path, cell, (12, 8), 2, "auto")
        back_path = str(tmp_path / "back.safetensors")
        mlx_layer.save_weights(back_path)
        original = {k: v.numpy() for k, v in torch_layer.state_dict().items()}
        written = load_numpy(back_path)
        assert set(written) == set(original) == {"weight", "bias", "recurrent"}
        restored = torch_backend.make_layer(cell, 12, 8, 2, seed=4)
        restored.load_state_dict(load_torch(back_path))
        for name, value in original.items():
            assert written[name].dtype == value.dtype
            assert np.array_equal(written[name], value), f"{cell}.{name} changed in MLX"
            assert np.array_equal(restored.state_dict()[name].numpy(), value), f"{cell}.{name} changed on the way back"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_torch_and_mlx_agree_at_training_size(torch_backend, mlx_backend, cell, tmp_path):
    """B=2, T=512, D_in=N=64, 2 heads, float32. Outputs and final states within 1e-5 max abs;
    MLX gradients of sum(y**2) w.r.t. every parameter within 1e-4 relative of torch's."""
    import mlx.core as mx
    import torch

    torch_layer = torch_backend.make_layer(cell, 64, 64, 2, mode="auto", seed=7)
    mlx_layer = torch_to_mlx_via_file(torch_backend, mlx_backend, torch_layer, tmp_path, cell, (64, 64), 2, "auto")
    x = np.random.default_rng(5).standard_normal((2, 512, 64)).astype(np.float32)

    xt = torch.tensor(x)
    y_t, final_t = torch_layer(xt, return_state=True)
    (y_t**2).sum().backward()
    torch_grads = {k: v.grad.numpy() for k, v in torch_layer.named_parameters()}

    def loss(params, x):
        mlx_layer.update(params)
        return (mlx_layer(x) ** 2).sum()

    y_m, final_m = mlx_layer(mx.array(x), return_state=True)
    mlx_grads = mx.grad(loss)(mlx_layer.trainable_parameters(), mx.array(x))

    assert np.max(np.abs(np.array(y_m) - y_t.detach().numpy())) <= 1e-5
    finals_t = final_t if isinstance(final_t, tuple) else (final_t,)
    finals_m = final_m if isinstance(final_m, tuple) else (final_m,)
    assert len(finals_m) == len(finals_t) == (2 if cell == "lstm" else 1)
    for fm, ft in zip(finals_m, finals_t):
        assert np.max(np.abs(np.array(fm) - ft.detach().numpy())) <= 1e-5
    assert set(mlx_grads) == set(torch_grads) == {"weight", "bias", "recurrent"}
    for name, ref in torch_grads.items():
        got = np.array(mlx_grads[name])
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-4, name
