"""A user-style cell: the whole definition a new cell needs, in one small file.

Minimal gated unit: one gate decides how much of the old state to keep.

    f  = sigmoid(a_f * h + u_f)
    h' = f * h + (1 - f) * tanh(a_c * h + u_c)

No Jacobian is written: the backends derive it by forward-mode autodiff, and the
code generator derives it symbolically for the fused kernels.
"""

from pararnn_core.cell import Cell, Normal, Timescales


class MinimalGatedCell(Cell):
    name = "mgu"
    gates = ("f", "c")
    state = ("h",)
    params = {"a_f": Normal(0.1), "a_c": Normal(0.5)}
    gate_bias = {"f": Timescales(kind="retain")}

    def step(self, ops, s, u, p):
        f = ops.sigmoid(p.a_f * s.h + u.f)
        return (f * s.h + (1 - f) * ops.tanh(p.a_c * s.h + u.c),)
