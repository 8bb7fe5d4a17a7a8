"""Layer behaviour, written once and run on every backend (see tests/backends.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pararnn_core import NewtonConfig, NewtonConvergenceError, NewtonConvergenceWarning

CELLS = ["gru", "lstm", "mgu"]
# float32 tolerances: outputs ~1e-6 abs; gradients accumulate over B*T terms, hence relative
TOL = {"float64": dict(y=1e-9, g=1e-7), "float32": dict(y=2e-5, g=2e-4)}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def assert_runs_close(got, ref, tol, what=""):
    for key in ref:
        if key in ("y",):
            assert rel_err(got[key], ref[key]) <= tol["y"], f"{what} {key}"
        elif key == "state" or key == "d_state":
            for g, r in zip(got[key], ref[key]):
                bound = tol["y"] if key == "state" else tol["g"]
                assert rel_err(g, r) <= bound, f"{what} {key}"
        else:
            assert rel_err(got[key], ref[key]) <= tol["g"], f"{what} {key}: {rel_err(got[key], ref[key])}"


def random_state(cell_k, batch, n, rng, scale=0.5):
    return tuple((scale * rng.standard_normal((batch, n))) for _ in range(cell_k))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("length", [1, 2, 3, 17, 256, 1000])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch,heads", [(1, 1), (3, 2)])
def test_parallel_matches_sequential(backend, cell, length, dtype, batch, heads, rng):
    layer = backend.make_layer(cell, 6, 8, heads, dtype=dtype)
    k = 2 if cell == "lstm" else 1
    x = rng.standard_normal((batch, length, 6))
    state = random_state(k, batch, 8, rng)
    runs = {}
    for mode in ("sequential", "parallel"):
        backend.set_mode(layer, mode)
        runs[mode] = backend.run(layer, x, state=state, grads=True)
    assert_runs_close(runs["parallel"], runs["sequential"], TOL[dtype], f"{cell} T={length}")
    info = backend.last_solve(layer)
    assert info.mode == "parallel" and info.converged and not info.fell_back


@pytest.mark.parametrize("cell", CELLS)
def test_resets_equal_separate_segments(backend, cell, rng):
    layer = backend.make_layer(cell, 4, 6, 2, dtype="float64", mode="parallel")
    k = 2 if cell == "lstm" else 1
    x = rng.standard_normal((2, 40, 4))
    state = random_state(k, 2, 6, rng)
    resets = np.zeros((2, 40), bool)
    cuts = [0, 13, 29, 40]
    resets[0, cuts[1:-1]] = True
    resets[1, 13] = True
    whole = backend.run(layer, x, state=state, resets=resets)
    # batch row 0: three documents, each restarting from the initial state
    for a, b in zip(cuts[:-1], cuts[1:]):
        seg = backend.run(layer, x[:1, a:b], state=tuple(s[:1] for s in state))
        np.testing.assert_allclose(whole["y"][0, a:b], seg["y"][0], atol=1e-10)
    seg = backend.run(layer, x[1:, 13:], state=tuple(s[1:] for s in state))
    np.testing.assert_allclose(whole["y"][1, 13:], seg["y"][0], atol=1e-10)
    # the sequential reference agrees, gradients included
    backend.set_mode(layer, "sequential")
    seq = backend.run(layer, x, state=state, resets=resets, grads=True)
    backend.set_mode(layer, "parallel")
    par = backend.run(layer, x, state=state, resets=resets, grads=True)
    assert_runs_close(par, seq, TOL["float64"], f"{cell} resets")


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("cell", CELLS)
def test_chunks_with_state_carry_equal_one_pass(backend, cell, mode, rng):
    layer = backend.make_layer(cell, 4, 6, 1, dtype="float64", mode=mode)
    x = rng.standard_normal((2, 50, 4))
    whole = backend.run(layer, x)
    state, ys = None, []
    for a, b in ((0, 7), (7, 8), (8, 31), (31, 50)):
        part = backend.run(layer, x[:, a:b], state=state)
        ys.append(part["y"])
        state = part["state"]
    np.testing.assert_allclose(np.concatenate(ys, 1), whole["y"], atol=1e-10)
    for s, w in zip(state, whole["state"]):
        np.testing.assert_allclose(s, w, atol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
def test_step_loop_equals_forward(backend, cell, rng):
    layer = backend.make_layer(cell, 4, 6, 2, dtype="float64")
    k = 2 if cell == "lstm" else 1
    x = rng.standard_normal((3, 20, 4))
    state = random_state(k, 3, 6, rng)
    whole = backend.run(layer, x, state=state)
    y, final = backend.step_loop(layer, x, state)
    atol = backend.float64_cross_path_atol  # step() and the auto mode may use different implementations
    np.testing.assert_allclose(y, whole["y"], atol=atol)
    for s, w in zip(final, whole["state"]):
        np.testing.assert_allclose(s, w, atol=atol)
    # no state means zeros
    y0, _ = backend.step_loop(layer, x[:, :3])
    np.testing.assert_allclose(y0, backend.run(layer, x[:, :3])["y"], atol=atol)


@pytest.mark.parametrize("cell", CELLS)
def test_newton_converges_on_saturated_inputs(backend, cell, rng):
    layer = backend.make_layer(cell, 8, 16, 2, dtype="float32", mode="parallel")
    params = backend.params(layer)
    params["weight"] = params["weight"] * 8.0  # pre-activations of tens: gates saturate
    params["recurrent"] = params["recurrent"] * 10.0
    backend.set_params(layer, params)
    x = 3.0 * rng.standard_normal((2, 300, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewtonConvergenceWarning)
        got = backend.run(layer, x)
    info = backend.last_solve(layer)
    assert info.converged and info.residual <= 1e-5
    assert info.residuals[-1] == info.residual and len(info.residuals) == info.iterations + 1
    backend.set_mode(layer, "sequential")
    ref = backend.run(layer, x)
    assert rel_err(got["y"], ref["y"]) < 1e-4


def test_newton_non_convergence_policies(backend, rng):
    x = rng.standard_normal((2, 200, 4))
    layer = backend.make_layer("gru", 4, 8, 1, dtype="float64", mode="sequential")
    reference = backend.run(layer, x)["y"]
    params = backend.params(layer)
    # one iteration cannot solve a 200-step nonlinear recurrence to 1e-14
    tight = dict(max_its=1, tol=1e-14)

    layer = backend.make_layer("gru", 4, 8, 1, dtype="float64", mode="parallel",
                               newton=NewtonConfig(on_failure="fallback", **tight))
    backend.set_params(layer, params)
    with pytest.warns(NewtonConvergenceWarning, match="Falling back"):
        y = backend.run(layer, x)["y"]
    info = backend.last_solve(layer)
    assert info.fell_back and not info.converged and info.residual > 1e-14
    np.testing.assert_allclose(y, reference, atol=1e-12)

    layer = backend.make_layer("gru", 4, 8, 1, dtype="float64", mode="parallel",
                               newton=NewtonConfig(on_failure="warn", **tight))
    backend.set_params(layer, params)
    with pytest.warns(NewtonConvergenceWarning, match="did not reach"):
        y = backend.run(layer, x)["y"]
    assert not backend.last_solve(layer).fell_back
    assert np.max(np.abs(y - reference)) > 1e-12  # the unconverged Newton result is kept

    layer = backend.make_layer("gru", 4, 8, 1, dtype="float64", mode="parallel",
                               newton=NewtonConfig(on_failure="raise", **tight))
    with pytest.raises(NewtonConvergenceError, match="max_its"):
        backend.run(layer, x)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_low_precision_close_to_float32(backend, cell, low, rng):
    """bf16/fp16 parameters and inputs are solved in float32; the documented bound
    is the rounding of the input and weights: 5e-2 abs (bf16), 1e-2 abs (fp16)."""
    ref_layer = backend.make_layer(cell, 8, 16, 2, dtype="float32")
    params = backend.params(ref_layer)
    x = rng.standard_normal((2, 64, 8)).astype(np.float32)
    ref = backend.run(ref_layer, x)
    layer = backend.make_layer(cell, 8, 16, 2, dtype=low)
    backend.set_params(layer, params)
    got = backend.run(layer, x, grads=True)
    bound = 5e-2 if low == "bfloat16" else 1e-2
    assert np.max(np.abs(got["y"] - ref["y"])) < bound
    assert np.all(np.isfinite(got["d_weight"]))


BAD_INPUTS = [
    ("wrong rank", dict(x=np.zeros((5, 4))), ValueError, r"shape \[batch, time, 4\]"),
    ("wrong features", dict(x=np.zeros((2, 5, 3))), ValueError, "input_size=4"),
    ("empty time", dict(x=np.zeros((2, 0, 4))), ValueError, "empty time"),
    ("nan input", dict(x=np.full((2, 5, 4), np.nan)), ValueError, "NaN or inf"),
    ("inf input", dict(x=np.full((2, 5, 4), np.inf)), ValueError, "NaN or inf"),
    ("state shape", dict(x=np.zeros((2, 5, 4)), state=(np.zeros((2, 7)),)), ValueError, r"must have shape \(2, 6\)"),
    ("state count", dict(x=np.zeros((2, 5, 4)), state=(np.zeros((2, 6)), np.zeros((2, 6)))), ValueError,
     "expected 1 tensors"),
    ("resets shape", dict(x=np.zeros((2, 5, 4)), resets=np.zeros((2, 4), bool)), ValueError, "resets must have shape"),
    ("resets dtype", dict(x=np.zeros((2, 5, 4)), resets=np.zeros((2, 5), np.float32)), ValueError, "boolean"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_errors(backend, name, kwargs, exc, match):
    layer = backend.make_layer("gru", 4, 6, 2, dtype="float32")
    kwargs = dict(kwargs)
    if "x" in kwargs:
        kwargs["x"] = kwargs["x"].astype(np.float32)
    if "state" in kwargs:
        kwargs["state"] = tuple(s.astype(np.float32) for s in kwargs["state"])
    with pytest.raises(exc, match=match):
        backend.call_raw(layer, **kwargs)


@pytest.mark.parametrize(
    "args,match",
    [
        (("gru", 4, 6, 4), "hidden_size=6 is not divisible by num_heads=4"),
        (("gru", 5, 6, 2), "input_size=5 is not divisible by num_heads=2"),
        (("gru", 0, 6, 1), "input_size must be a positive int"),
        (("nope", 4, 6, 1), "unknown cell 'nope'"),
    ],
)
def test_bad_construction(backend, args, match):
    with pytest.raises(ValueError, match=match):
        backend.make_layer(*args)


def test_unknown_mode_is_rejected(backend):
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        backend.make_layer("gru", 4, 6, 1, mode="fast")
    layer = backend.make_layer("gru", 4, 6, 1)
    with pytest.raises(ValueError, match="unknown mode"):
        backend.set_mode(layer, "Parallel")
