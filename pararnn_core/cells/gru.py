"""ParaGRU: the diagonal GRU of the ParaRNN paper (docs/design.md section 1).

    z = sigmoid(a_z * h + u_z)
    r = sigmoid(a_r * h + u_r)
    c = tanh(a_c * (r * h) + u_c)
    h' = (1 - z) * h + z * c
"""

from pararnn_core.cell import Cell, Normal, Timescales


class GRUCell(Cell):
    name = "gru"
    gates = ("z", "r", "c")
    state = ("h",)
    params = {"a_z": Normal(0.1), "a_r": Normal(0.1), "a_c": Normal(0.1)}
    gate_bias = {"z": Timescales(kind="update")}

    def step(self, ops, s, u, p):
        z = ops.sigmoid(p.a_z * s.h + u.z)
        r = ops.sigmoid(p.a_r * s.h + u.r)
        c = ops.tanh(p.a_c * (r * s.h) + u.c)
        return ((1 - z) * s.h + z * c,)

    def step_and_jacobian(self, ops, s, u, p):
        h = s.h
        z = ops.sigmoid(p.a_z * h + u.z)
        r = ops.sigmoid(p.a_r * h + u.r)
        c = ops.tanh(p.a_c * (r * h) + u.c)
        dz = z * (1 - z) * p.a_z
        dr = r * (1 - r) * p.a_r
        dc = (1 - c * c) * p.a_c * (r + h * dr)
        new_h = h + z * (c - h)
        return (new_h,), [[(1 - z) + (c - h) * dz + z * dc]]
