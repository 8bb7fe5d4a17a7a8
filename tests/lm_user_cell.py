"""A user cell for the LM tests (registered on import, found again through config.cell_module)."""

from pararnn_core.cell import Cell, Normal


class LeakyCell(Cell):
    name = "leaky_test"
    gates = ("f", "c")
    state = ("h",)
    params = {"a": Normal(0.1)}

    def step(self, ops, s, u, p):
        f = ops.sigmoid(u.f)
        return (f * s.h + (1 - f) * ops.tanh(p.a * s.h + u.c),)
