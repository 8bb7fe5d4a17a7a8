"""The linear baseline: ParaGRU's gated update with the state removed from the gates.

    z  = sigmoid(u_z)                 (ParaGRU: sigmoid(a_z * h + u_z))
    c  = tanh(u_c)                    (ParaGRU: tanh(a_c * (r * h) + u_c), r its reset gate)
    h' = (1 - z) * h + z * c

Gates depend on the input only, so h' is linear in h with an input-dependent diagonal
transition 1 - z_t in (0, 1): the selective-SSM form (Mamba-style, also minGRU). Its
Jacobian does not depend on the state, so it runs through the same ParaRNN layer,
modes and scan as the nonlinear cells (Newton converges in one step). The reset gate
has nothing to act on without the state, so the cell has two gates.
"""

from pararnn_core.cell import Cell, Timescales

#: registry name; prefixed so that it cannot collide with a built-in or a user's cell
LINEAR_CELL = "pararnn_tasks_linear_gru"


class LinearGatedCell(Cell):
    name = LINEAR_CELL
    gates = ("z", "c")
    state = ("h",)
    gate_bias = {"z": Timescales(kind="update")}

    def step(self, ops, s, u, p):
        z = ops.sigmoid(u.z)
        return ((1 - z) * s.h + z * ops.tanh(u.c),)

    def step_and_jacobian(self, ops, s, u, p):
        z = ops.sigmoid(u.z)
        return ((1 - z) * s.h + z * ops.tanh(u.c),), [[1 - z]]
