"""Code generation from cell definitions: freshness of shipped sources, exact derivatives, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from pararnn_core.cell import Cell, Fields, Normal, get_cell
from pararnn_core.codegen import BUILTIN_CELLS, CodegenError, cell_sources, derive, print_cell
from pararnn_core.codegen.sources import render, shipped_paths
from pararnn_core.ops import NumpyOps

_NUMPY_FUNCTIONS = [{"sigmoid": lambda x: 1 / (1 + np.exp(-x)), "softplus": lambda x: np.logaddexp(0, x)}, "numpy"]


class AllFunctionsCell(Cell):
    """Test-only cell touching every supported nonlinearity and a K=2 block."""

    name = "test_codegen_all_functions"
    gates = ("a", "b")
    state = ("x", "y")
    params = {"w": Normal(0.3), "v": Normal(0.3)}

    def step(self, ops, s, u, p):
        x = ops.tanh(p.w * s.y + u.a) + 0.5 * ops.silu(s.x) * ops.exp(-ops.softplus(u.b))
        y = ops.sigmoid(p.v * x - s.y) * ops.log(1 + s.x * s.x) + (s.y / 3) ** 2
        return x, y


def _fields(cell, s, u, p):
    return Fields(cell.state, s), Fields(cell.gates, u), Fields(cell.param_names, p)


def _evaluate(exprs, derivation, s, u, p, lam=None):
    symbols = list(derivation.state + derivation.gates + derivation.params + derivation.lam)
    args = list(s) + list(u) + list(p) + (list(lam) if lam is not None else [np.zeros_like(s[0])] * len(s))
    fn = sp.lambdify(symbols, list(exprs), modules=_NUMPY_FUNCTIONS)
    return [np.broadcast_to(v, s[0].shape) for v in fn(*args)]


def _random_inputs(cell, rng, n=50):
    s = [rng.normal(size=n) for _ in cell.state]
    u = [rng.normal(size=n) * 2 for _ in cell.gates]
    p = [rng.normal(size=n) * 0.5 for _ in cell.params]
    return s, u, p


@pytest.mark.parametrize("name", BUILTIN_CELLS)
def test_shipped_sources_are_fresh(name):
    """Fails when a built-in cell changed without `python -m pararnn_core.codegen`."""
    fresh = render(name)
    for target, path in shipped_paths(name).items():
        assert path.read_text() == fresh[target], f"{path} is stale: run python -m pararnn_core.codegen"
    assert cell_sources(name).paths == shipped_paths(name)


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_symbolic_jacobian_equals_closed_form(name):
    cell = get_cell(name)
    derivation = derive(cell)
    s, u, p = _random_inputs(cell, np.random.default_rng(0))
    jac = _evaluate([e for row in derivation.jacobian for e in row], derivation, s, u, p)
    new, closed = cell.step_and_jacobian(NumpyOps(), *_fields(cell, s, u, p))
    k = cell.state_size
    for i in range(k):
        for j in range(k):
            np.testing.assert_allclose(jac[i * k + j], closed[i][j], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_evaluate(derivation.new_state, derivation, s, u, p), new, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm", "mgu", AllFunctionsCell()], ids=lambda c: getattr(c, "name", c))
def test_vector_jacobian_products_match_finite_differences(cell):
    cell = get_cell(cell)
    derivation = derive(cell)
    rng = np.random.default_rng(1)
    s, u, p = _random_inputs(cell, rng)
    s[0] = np.abs(s[0]) + 0.1  # keep log(1 + x^2) and friends well inside their domains
    lam = [rng.normal(size=s[0].shape) for _ in cell.state]
    k, g = len(s), len(u)
    vjp = _evaluate(derivation.vjp_state + derivation.vjp_gates + derivation.vjp_params, derivation, s, u, p, lam)
    ops = NumpyOps()

    def objective(values):
        parts = [values[:k], values[k : k + g], values[k + g :]]
        out = cell.step(ops, *_fields(cell, *parts))
        return sum(weight * o for weight, o in zip(lam, out))

    values, eps = s + u + p, 1e-6
    for index in range(len(values)):
        up = [v + eps if i == index else v for i, v in enumerate(values)]
        down = [v - eps if i == index else v for i, v in enumerate(values)]
        numeric = (objective(up) - objective(down)) / (2 * eps)
        np.testing.assert_allclose(vjp[index], numeric, rtol=1e-6, atol=1e-7)


def test_each_nonlinearity_is_evaluated_once_per_function():
    """The tape-based derivation keeps CSE able to share sigmoid/tanh between step, Jacobian and VJP."""
    text = print_cell(derive("lstm"), "cpp")
    assert text.count("pr_sigmoid(") == 6 and text.count("pr_tanh(") == 6  # 2 + 2 in each of 3 functions


def test_targets_differ_only_in_qualifiers():
    derivation = derive("gru")
    cpp, cuda, metal = (print_cell(derivation, t) for t in ("cpp", "cuda", "metal"))
    assert "template <typename T>" in cpp and "__device__ __forceinline__" in cuda
    assert "thread const float* s" in metal and "template" not in metal and "T(" not in metal
    assert cpp.replace("__attribute__((always_inline)) static inline", "") == cuda.replace(
        "__device__ __forceinline__ static", ""
    ).replace("CUDA C++", "host C++")


def test_user_cell_sources_are_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARARNN_CACHE_DIR", str(tmp_path))
    first = cell_sources(AllFunctionsCell())
    assert all(path.is_relative_to(tmp_path) and path.exists() for path in first.paths.values())
    stamps = {t: p.stat().st_mtime_ns for t, p in first.paths.items()}
    second = cell_sources(AllFunctionsCell())
    assert {t: p.stat().st_mtime_ns for t, p in second.paths.items()} == stamps
    assert "struct pr_cell_test_codegen_all_functions" in first.text("cuda")


class WhereCell(Cell):
    name = "test_codegen_where"
    gates = ("c",)
    state = ("h",)

    def step(self, ops, s, u, p):
        return (ops.where(s.h > 0, s.h, u.c),)


class BranchCell(Cell):
    name = "test_codegen_branch"
    gates = ("c",)
    state = ("h",)

    def step(self, ops, s, u, p):
        return (s.h if s.h > 0 else u.c,)


class SinCell(Cell):
    name = "test_codegen_sin"
    gates = ("c",)
    state = ("h",)

    def step(self, ops, s, u, p):
        return (sp.sin(s.h) + u.c,)


@pytest.mark.parametrize(
    "cell, named",
    [(WhereCell(), "ops.where"), (BranchCell(), "Python branches"), (SinCell(), "uses sin")],
    ids=["op-without-symbolic-form", "python-branch", "unsupported-function"],
)
def test_cells_that_cannot_be_generated_get_a_clear_error(cell, named):
    with pytest.raises(CodegenError, match=named) as info:
        derive(cell)
    assert cell.name in str(info.value) and "mode='parallel'" in str(info.value)
