"""Print a :class:`Derivation` as device functions for host C++, CUDA C++ and Metal.

Every target gets the same struct, one per cell::

    struct pr_cell_<name> {
        enum { K = ..., G = ..., P = ... };        // state components, gates, parameters
        step(s, u, p, out)                      // out = f(s, u; p)
        step_jacobian(s, u, p, out, jac)        // and jac[i*K + j] = d out_i / d s_j
        vjp(s, u, p, lam, d_s, d_u, d_p)        // d_s = J^T lam, d_u = (df/du)^T lam, d_p = (df/dp)^T lam
    };

The math functions (``pr_sigmoid``, ``pr_tanh``, ``pr_exp``, ``pr_log``,
``pr_softplus``, ``pr_sqrt``, ``pr_pow``) come from each target's prelude
(csrc/fused_math_cpu.h, csrc/fused_math_cuda.cuh, metal/fused_math.metal),
so the generated text holds only the cell's own arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp
from sympy.printing.c import C99CodePrinter

from pararnn_core.codegen.symbolic import Derivation


@dataclass(frozen=True)
class Target:
    name: str
    comment: str
    function_prefix: str  # qualifiers before the return type
    template: bool  # functions templated on the scalar type T
    scalar: str  # scalar type name inside the functions
    pointer: str  # address-space qualifier of pointer parameters ('' on C++/CUDA)


TARGETS = {
    "cpp": Target("cpp", "host C++", "__attribute__((always_inline)) static inline", True, "T", ""),
    "cuda": Target("cuda", "CUDA C++", "__device__ __forceinline__ static", True, "T", ""),
    "metal": Target("metal", "Metal Shading Language", "static inline", False, "float", "thread "),
}

_FUNCTIONS = {
    "sigmoid": "pr_sigmoid",
    "softplus": "pr_softplus",
    "tanh": "pr_tanh",
    "exp": "pr_exp",
    "log": "pr_log",
}


class _KernelPrinter(C99CodePrinter):
    """C printer whose literals take the kernel's scalar type and whose powers avoid pow()."""

    def __init__(self, scalar: str):
        super().__init__({"user_functions": _FUNCTIONS})
        self.scalar = scalar

    def _literal(self, value: float) -> str:
        return f"{self.scalar}({float(value)!r})"

    def _print_Integer(self, expr):
        return self._literal(int(expr))

    def _print_Rational(self, expr):
        return self._literal(expr.p / expr.q)

    def _print_Float(self, expr):
        return self._literal(float(expr))

    def _print_Exp1(self, expr):
        return self._literal(math.e)

    def _print_Pi(self, expr):
        return self._literal(math.pi)

    def _print_Pow(self, expr):
        base, exp = expr.args
        b = self.parenthesize(base, 1000)  # atomic base
        if exp.is_Integer and 0 < abs(int(exp)) <= 8:
            product = "*".join([b] * abs(int(exp)))
            return f"({product})" if exp > 0 else f"({self._literal(1)}/({product}))"
        if exp == sp.Rational(1, 2):
            return f"pr_sqrt({self._print(base)})"
        if exp == -sp.Rational(1, 2):
            return f"({self._literal(1)}/pr_sqrt({self._print(base)}))"
        return f"pr_pow({self._print(base)}, {self._print(exp)})"


def _body(derivation: Derivation, outputs: list[tuple[str, sp.Expr]], printer: _KernelPrinter, indent: str) -> list:
    """Local aliases of the used inputs, CSE temporaries, then the output assignments."""
    exprs = [e for _, e in outputs]
    temps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("t"), optimizations=None)
    used = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
    lines = []
    inputs = (("s", derivation.state), ("u", derivation.gates), ("p", derivation.params), ("lam", derivation.lam))
    for array, symbols in inputs:
        for i, sym in enumerate(symbols):
            if sym in used:
                lines.append(f"{indent}const {printer.scalar} {sym.name} = {array}[{i}];")
    for sym, expr in temps:
        lines.append(f"{indent}const {printer.scalar} {sym.name} = {printer.doprint(expr)};")
    for (target, _), expr in zip(outputs, reduced):
        lines.append(f"{indent}{target} = {printer.doprint(expr)};")
    return lines


def print_cell(derivation: Derivation, target_name: str) -> str:
    """Source text of the cell's struct for one target."""
    target = TARGETS[target_name]
    printer = _KernelPrinter(target.scalar)
    d = derivation
    k, g, p = len(d.state), len(d.gates), len(d.params)
    T, ptr = target.scalar, target.pointer
    template = "template <typename T>\n    " if target.template else ""
    inputs = f"{ptr}const {T}* s, {ptr}const {T}* u, {ptr}const {T}* p"
    functions = [
        ("step", f"{inputs}, {ptr}{T}* out", [(f"out[{i}]", e) for i, e in enumerate(d.new_state)]),
        (
            "step_jacobian",
            f"{inputs}, {ptr}{T}* out, {ptr}{T}* jac",
            [(f"out[{i}]", e) for i, e in enumerate(d.new_state)]
            + [(f"jac[{i * k + j}]", d.jacobian[i][j]) for i in range(k) for j in range(k)],
        ),
        (
            "vjp",
            f"{inputs}, {ptr}const {T}* lam, {ptr}{T}* d_s, {ptr}{T}* d_u, {ptr}{T}* d_p",
            [(f"d_s[{i}]", e) for i, e in enumerate(d.vjp_state)]
            + [(f"d_u[{i}]", e) for i, e in enumerate(d.vjp_gates)]
            + [(f"d_p[{i}]", e) for i, e in enumerate(d.vjp_params)],
        ),
    ]
    lines = [
        f"// Generated by pararnn_core.codegen ({target.comment}) from cell {d.cell_name!r}; do not edit.",
        "// Regenerate with: python -m pararnn_core.codegen",
        f"// definition hash: {d.definition_hash}",
        f"struct pr_cell_{d.cell_name} {{",
        f"    enum {{ K = {k}, G = {g}, P = {p} }};",
    ]
    for name, params, outputs in functions:
        lines.append("")
        lines.append(f"    {template}{target.function_prefix} void {name}({params}) {{")
        lines.extend(_body(d, outputs, printer, " " * 8))
        lines.append("    }")
    lines.append("};")
    return "\n".join(lines) + "\n"
