"""What every mode promises on both backends: non-finite values caught, higher-order gradients right or
refused, the solver decided once, SolveInfo meaning one thing, inputs validated by forward and step alike."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from pararnn_core import NewtonConfig, NewtonConvergenceWarning, get_cell
from pararnn_core.cells.gru import GRUCell
from tests.test_layers import rel_err


def runnable_modes(backend, cell="gru"):
    layer = backend.make_layer(cell, 4, 6)
    modes = []
    for mode in ("sequential", "parallel", "kernel", "fused"):
        try:
            backend.set_mode(layer, mode)
            layer.resolved_mode()
        except ValueError:
            continue
        modes.append(mode)
    return modes


# -- non-finite values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["recurrent", "bias", "state"])
def test_nan_in_weights_or_state_raises_in_every_mode(backend, where, rng):
    x = rng.standard_normal((2, 30, 4))
    for mode in runnable_modes(backend):
        layer = backend.make_layer("gru", 4, 6, mode=mode)
        state = None
        if where == "state":
            state = (np.full((2, 6), np.nan, np.float32),)
        else:
            params = backend.params(layer)
            params[where][0, 0] = np.nan
            backend.set_params(layer, params)
        with pytest.raises((FloatingPointError, ValueError), match="NaN|non-finite"):
            backend.run(layer, x.astype(np.float32), state=state)


def test_zero_batch_returns_empty_outputs(backend):
    layer = backend.make_layer("lstm", 4, 6)
    out = backend.run(layer, np.zeros((0, 5, 4), np.float32))
    assert out["y"].shape == (0, 5, 6) and [s.shape for s in out["state"]] == [(0, 6), (0, 6)]


def test_step_validates_its_input_like_forward(backend):
    layer = backend.make_layer("gru", 4, 6)
    with pytest.raises(TypeError, match="floating-point"):
        layer.step(backend.array(np.zeros((2, 4), np.int64)))
    with pytest.raises(ValueError, match=r"x_t of shape \[batch, 4\]"):
        layer.step(backend.array(np.zeros((2, 5), np.float32)))
    with pytest.raises(TypeError, match="must be a"):
        layer.step(np.zeros((2, 4), np.float32))


def test_integer_and_wrongly_typed_arguments_are_refused(backend):
    layer = backend.make_layer("gru", 4, 6)
    x = backend.array(np.zeros((2, 5, 4), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        layer(backend.array(np.zeros((2, 5, 4), np.int32)))
    with pytest.raises(TypeError, match="resets must be a boolean"):
        layer(x, resets=[[False] * 5] * 2)
    with pytest.raises(TypeError, match="state must be a"):
        layer(x, state=[[0.0] * 6] * 2)


def test_newton_config_rejects_bad_chunk():
    for bad in (-3, 0, 2.5, True):
        with pytest.raises(ValueError, match="chunk must be a positive int"):
            NewtonConfig(chunk=bad)
    with pytest.raises(ValueError, match="max_its"):
        NewtonConfig(max_its=True)


# -- SolveInfo -----------------------------------------------------------------------------------------
def test_exact_modes_report_no_residual(backend, rng):
    x = rng.standard_normal((2, 9, 4)).astype(np.float32)
    for mode in runnable_modes(backend):
        layer = backend.make_layer("gru", 4, 6, mode=mode)
        backend.run(layer, x)
        info = backend.last_solve(layer)
        assert info.mode == mode
        if info.exact:
            assert info.residual is None and info.iterations is None and info.converged
        else:
            assert info.residual is not None and info.residual <= 1e-6 and info.iterations >= 1


def test_convergence_warning_points_at_the_callers_line(backend, rng):
    layer = backend.make_layer("gru", 4, 8, 1, dtype="float64", mode="parallel",
                               newton=NewtonConfig(max_its=1, tol=1e-14, on_failure="warn"))
    with pytest.warns(NewtonConvergenceWarning) as record:
        backend.call_raw(layer, rng.standard_normal((2, 100, 4)))
    # the adapter in tests/ is the first frame outside the library: the user's code
    assert record[0].filename.endswith(("backends.py", "backend_mlx.py")), record[0].filename


# -- settings a mode would ignore ----------------------------------------------------------------------
def test_settings_a_named_mode_ignores_are_an_error(backend, rng):
    x = rng.standard_normal((2, 9, 4)).astype(np.float32)
    modes = runnable_modes(backend)
    if "kernel" in modes:
        layer = backend.make_layer("gru", 4, 6, mode="kernel", newton=NewtonConfig(chunk=16))
        with pytest.raises(ValueError, match=r"mode 'kernel' ignores NewtonConfig chunk=16"):
            backend.run(layer, x)
    # exact modes solve the recurrence exactly: no setting applies, none is ignored
    layer = backend.make_layer("gru", 4, 6, mode="sequential", newton=NewtonConfig(chunk=16, max_its=3))
    backend.run(layer, x)
    layer = backend.make_layer("gru", 4, 6, mode="parallel", newton=NewtonConfig(chunk=4, damping=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.run(layer, x)


# -- higher-order gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gradient_penalty_matches_sequential_or_raises(backend, cell, rng):
    dtype = "float64" if backend.name == "torch" else "float32"
    x = rng.standard_normal((2, 12, 4))
    reference_layer = backend.make_layer(cell, 4, 6, mode="sequential", dtype=dtype)
    reference = backend.gradient_penalty_grads(reference_layer, x)
    assert all(np.all(np.isfinite(v)) for v in reference.values())
    tol = 1e-9 if dtype == "float64" else 2e-4
    for mode in runnable_modes(backend, cell):
        if mode == "sequential":
            continue
        layer = backend.make_layer(cell, 4, 6, mode=mode, dtype=dtype)
        try:
            got = backend.gradient_penalty_grads(layer, x)
        except RuntimeError as error:
            assert "mode='sequential'" in str(error) and f"mode={mode!r}" in str(error)
            continue
        for name, value in reference.items():
            assert rel_err(got[name], value) <= tol, f"{mode} d_{name}"


# -- inside a compiled graph ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "sequential"])
def test_compiled_training_step_gives_the_same_gradients(backend, mode, rng):
    x = rng.standard_normal((2, 20, 4)).astype(np.float32)
    layer = backend.make_layer("gru", 4, 6, mode=mode)
    eager = backend.run(layer, x, grads=True)
    compiled = backend.compiled_training_grads(layer, x)
    for name in ("weight", "bias", "recurrent"):
        assert rel_err(compiled[name], eager["d_" + name]) <= 2e-4, name


def test_newton_in_framework_ops_inside_a_compiled_graph(backend, rng):
    """torch.compile traces around the solve; MLX cannot compile the Newton custom vjp, and says so."""
    x = rng.standard_normal((2, 20, 4)).astype(np.float32)
    layer = backend.make_layer("gru", 4, 6, mode="parallel")
    if backend.name == "mlx":
        with pytest.raises(ValueError, match="cannot run inside a compiled graph"):
            backend.compiled_training_grads(layer, x)
        return
    eager = backend.run(layer, x, grads=True)
    compiled = backend.compiled_training_grads(layer, x)
    assert rel_err(compiled["weight"], eager["d_weight"]) <= 2e-4


# -- decided once --------------------------------------------------------------------------------------
def test_auto_at_one_step_does_no_sympy_and_no_file_read_after_the_first(backend, rng):
    layer = backend.make_layer("lstm", 4, 6)
    x = rng.standard_normal((1, 1, 4)).astype(np.float32)
    backend.run(layer, x)  # the first forward may probe, derive and compile
    opened, sympy_calls = [], []

    def audit(event, args):
        if event == "open" and watching:
            opened.append(args[0])

    def profile(frame, event, arg):
        if event == "call" and "sympy" in frame.f_code.co_filename:
            sympy_calls.append(frame.f_code.co_name)

    watching = False
    sys.addaudithook(audit)
    watching = True
    sys.setprofile(profile)
    try:
        for _ in range(3):
            backend.run(layer, x)
    finally:
        sys.setprofile(None)
        watching = False
    assert not sympy_calls, sympy_calls[:5]
    assert not [f for f in opened if not str(f).startswith("/dev/")], opened[:5]


# -- cells ---------------------------------------------------------------------------------------------
def test_subclassing_a_builtin_cell_leaves_it_registered():
    class MyGRU(GRUCell):
        def step(self, ops, s, u, p):
            return super().step(ops, s, u, p)

    assert type(get_cell("gru")) is GRUCell
    with pytest.raises(TypeError, match="cell name 'gru' is taken"):
        type("Impostor", (GRUCell,), {"name": "gru"})


def test_fixed_cell_layers_refuse_another_cell_for_apple_import(backend):
    with pytest.raises(ValueError, match="builds a 'gru' layer, but cell='lstm'"):
        backend.lib.ParaGRU.from_apple_state_dict({}, cell="lstm")
