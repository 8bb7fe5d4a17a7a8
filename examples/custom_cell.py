"""A cell of your own, fused on the CPU without writing C++: python examples/custom_cell.py"""

import torch

from pararnn_core import Cell, Normal
from pararnn_torch import ParaRNN


class LeakyTanhCell(Cell):
    """h' = (1 - a) h + a tanh(w h + u_c), with a learned leak a = sigmoid(u_a + b_a * h)."""

    name = "leaky_tanh"
    gates = ("a", "c")
    state = ("h",)
    params = {"b_a": Normal(0.1), "w": Normal(0.5)}

    def step(self, ops, s, u, p):
        a = ops.sigmoid(u.a + p.b_a * s.h)
        return ((1 - a) * s.h + a * ops.tanh(p.w * s.h + u.c),)


if __name__ == "__main__":
    layer = ParaRNN(LeakyTanhCell(), input_size=32, hidden_size=64, mode="fused")
    x = torch.randn(2, 100, 32)
    y = layer(x)  # the kernels are generated and compiled at first use, then cached
    reference = ParaRNN(LeakyTanhCell(), input_size=32, hidden_size=64, mode="sequential")
    reference.load_state_dict(layer.state_dict())
    print(f"fused vs sequential, max difference: {(y - reference(x)).abs().max():.2e}")
