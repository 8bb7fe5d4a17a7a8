"""Symbolic evaluation of a cell: its step, Jacobian and vector-Jacobian products as sympy expressions.

The cell's ``step`` runs unchanged on sympy symbols through :class:`SympyOps`;
sympy then differentiates it exactly. Everything the fused kernels need comes
from one :class:`Derivation`:

* ``new_state`` (K expressions): the step,
* ``jacobian`` (K x K): d new_i / d s_j, for the Newton linearisation on GPUs,
* ``vjp_state``/``vjp_gates``/``vjp_params``: the transposed products with an
  adjoint vector ``lam`` (K symbols), for the reverse sweep of the adjoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import sympy as sp

from pararnn_core.cell import Cell, Fields, get_cell
from pararnn_core.ops import ArrayOps

#: bump when the generated code changes for the same cell, to invalidate caches
CODEGEN_VERSION = 1


class CodegenError(ValueError):
    """A cell cannot be turned into fused kernels (the other modes still work for it)."""


class sigmoid(sp.Function):  # noqa: N801 - printed as pr_sigmoid
    """Logistic function; its derivative is written through itself so CSE shares it."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)


class softplus(sp.Function):  # noqa: N801 - printed as pr_softplus
    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


#: functions the kernel preludes implement, by sympy class name
SUPPORTED_FUNCTIONS = {"sigmoid", "softplus", "tanh", "exp", "log"}


class SympyOps(ArrayOps):
    """The cell nonlinearities on sympy expressions; anything else is refused with the op's name."""

    def __init__(self, cell_name: str):
        self.cell_name = cell_name

    def sigmoid(self, x):
        return sigmoid(x)

    def tanh(self, x):
        return sp.tanh(x)

    def exp(self, x):
        return sp.exp(x)

    def log(self, x):
        return sp.log(x)

    def softplus(self, x):
        return softplus(x)

    def silu(self, x):
        return x * sigmoid(x)

    def __getattribute__(self, name):
        # array plumbing (where, sum, matmul, ...) has no per-channel symbolic meaning
        if name in _ARRAY_PLUMBING:
            raise CodegenError(
                f"cell {object.__getattribute__(self, 'cell_name')!r} uses ops.{name}, which has no symbolic form "
                f"for kernel generation (fused kernels support +, -, *, /, powers and ops."
                f"{', ops.'.join(sorted(SUPPORTED_FUNCTIONS | {'silu'}))}); use mode='parallel' or 'sequential'"
            )
        return object.__getattribute__(self, name)


_ARRAY_PLUMBING = {
    name
    for name, value in vars(ArrayOps).items()
    if callable(value) and not name.startswith("_") and name not in SUPPORTED_FUNCTIONS | {"silu"}
}


def _check_name(cell: Cell, kind: str, name: str):
    if not (name.isidentifier() and name.isascii()):
        raise CodegenError(
            f"cell {cell.name!r}: {kind} name {name!r} must be an ASCII identifier for kernel generation"
        )


@dataclass(frozen=True)
class Derivation:
    cell_name: str
    state: tuple[sp.Symbol, ...]
    gates: tuple[sp.Symbol, ...]
    params: tuple[sp.Symbol, ...]
    lam: tuple[sp.Symbol, ...]
    new_state: tuple[sp.Expr, ...]
    jacobian: tuple[tuple[sp.Expr, ...], ...]
    vjp_state: tuple[sp.Expr, ...]
    vjp_gates: tuple[sp.Expr, ...]
    vjp_params: tuple[sp.Expr, ...]
    definition_hash: str


def _check_functions(cell: Cell, exprs):
    for expr in exprs:
        for fn in expr.atoms(sp.Function):
            name = type(fn).__name__
            if name not in SUPPORTED_FUNCTIONS:
                raise CodegenError(
                    f"cell {cell.name!r}: the step uses {name}, which the fused kernels do not implement "
                    f"(supported: {', '.join(sorted(SUPPORTED_FUNCTIONS))}); use mode='parallel' or 'sequential'"
                )
        if expr.has(sp.I, sp.zoo, sp.nan, sp.oo):
            raise CodegenError(f"cell {cell.name!r}: the step is not a finite real expression: {expr}")


def step_expressions(cell) -> tuple[tuple[sp.Symbol, ...], tuple[sp.Symbol, ...], tuple[sp.Symbol, ...], tuple]:
    """Run ``cell.step`` on symbols; returns (state, gate, param symbols, new-state expressions)."""
    cell = get_cell(cell)
    for kind, names in (("state", cell.state), ("gate", cell.gates), ("parameter", cell.param_names)):
        for name in names:
            _check_name(cell, kind, name)
    s = tuple(sp.Symbol(f"s_{n}", real=True) for n in cell.state)
    u = tuple(sp.Symbol(f"u_{n}", real=True) for n in cell.gates)
    p = tuple(sp.Symbol(f"p_{n}", real=True) for n in cell.param_names)
    try:
        out = cell.step(SympyOps(cell.name), Fields(cell.state, s), Fields(cell.gates, u), Fields(cell.param_names, p))
    except CodegenError:
        raise
    except Exception as exc:
        raise CodegenError(
            f"cell {cell.name!r}: its step cannot run on symbols for kernel generation "
            f"({type(exc).__name__}: {exc}); fused kernels need a step built from arithmetic and ops.* "
            f"nonlinearities without Python branches on values; use mode='parallel' or 'sequential'"
        ) from exc
    out = tuple(out)
    if len(out) != cell.state_size:
        raise CodegenError(f"cell {cell.name!r}: step returned {len(out)} values, expected {cell.state_size}")
    out = tuple(sp.sympify(e) for e in out)
    _check_functions(cell, out)
    return s, u, p, out


def _hash(cell: Cell, new_state) -> str:
    exprs = [sp.srepr(e) for e in new_state]
    text = repr((CODEGEN_VERSION, cell.name, cell.state, cell.gates, cell.param_names, exprs))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def definition_hash(cell) -> str:
    """Hash of what the kernels compute: the cell's structure and its symbolic step."""
    cell = get_cell(cell)
    return _hash(cell, step_expressions(cell)[3])


def _tape(exprs):
    """Replace every nonlinearity application by a symbol ``w_i``; returns (rewritten exprs, [(w_i, application)]).

    Differentiating through the tape (chain rule over the w_i, each derivative
    written through its own value: sigmoid' = w (1 - w), tanh' = 1 - w^2,
    exp' = w) keeps every nonlinearity argument the original subtree, so CSE
    evaluates each sigmoid/tanh once per step even in the Jacobian and VJP.
    """
    defs, memo = [], {}

    def visit(e):
        if e.is_Atom:
            return e
        rebuilt = e.func(*[visit(a) for a in e.args])
        if isinstance(e, sp.Function):
            if rebuilt not in memo:
                memo[rebuilt] = sp.Symbol(f"w_{len(defs)}", real=True)
                defs.append((memo[rebuilt], rebuilt))
            return memo[rebuilt]
        return rebuilt

    return tuple(visit(e) for e in exprs), defs


def _derivative_of_application(w, application):
    x = application.args[0]
    kind = type(application).__name__
    if kind == "sigmoid":
        return w * (1 - w)
    if kind == "tanh":
        return 1 - w * w
    if kind == "exp":
        return w
    if kind == "log":
        return 1 / x
    if kind == "softplus":
        return sigmoid(x)
    raise CodegenError(f"no derivative rule for {kind}")  # unreachable: _check_functions filters first


def _gradients(outputs, variables, defs):
    """d output / d variable for every pair, by forward accumulation through the tape."""
    fprime = [_derivative_of_application(w, app) for w, app in defs]
    result = []
    for x in variables:
        dw = {}
        for (w, app), dfdx in zip(defs, fprime):
            arg = app.args[0]
            inner = sp.diff(arg, x) + sum((sp.diff(arg, v) * dv for v, dv in dw.items() if arg.has(v)), sp.Integer(0))
            dw[w] = dfdx * inner if inner != 0 else sp.Integer(0)
        through_tape = [sum((sp.diff(o, v) * dv for v, dv in dw.items() if o.has(v)), sp.Integer(0)) for o in outputs]
        result.append([sp.diff(o, x) + extra for o, extra in zip(outputs, through_tape)])
    return result  # result[variable][output]


def derive(cell) -> Derivation:
    """Symbolic step, Jacobian and adjoint products of ``cell``."""
    cell = get_cell(cell)
    s, u, p, new = step_expressions(cell)
    taped, defs = _tape(new)
    expand = {}
    for w, app in defs:
        expand[w] = app.xreplace(expand)

    def full(e):
        return e.xreplace(expand)

    lam = tuple(sp.Symbol(f"lam_{i}", real=True) for i in range(cell.state_size))
    grads = {x: col for x, col in zip(s + u + p, _gradients(taped, s + u + p, defs))}
    jac = tuple(tuple(full(grads[sj][i]) for sj in s) for i in range(len(new)))

    def pullback(wrt):
        return tuple(full(sum((lam[i] * grads[w][i] for i in range(len(new))), sp.Integer(0))) for w in wrt)

    return Derivation(
        cell_name=cell.name,
        state=s,
        gates=u,
        params=p,
        lam=lam,
        new_state=new,
        jacobian=jac,
        vjp_state=pullback(s),
        vjp_gates=pullback(u),
        vjp_params=pullback(p),
        definition_hash=_hash(cell, new),
    )
