"""The peer a user would write without this library: the same cell, stepped in a Python loop over time,
with the step compiled by torch.compile, trained by backpropagation through the loop."""

from __future__ import annotations

import torch

from pararnn_core.newton import step_fn
from pararnn_torch.ops import ops


class CompiledLoop(torch.nn.Module):
    """x [B, T, D] -> y [B, T, N] with ``layer``'s projection and cell; the step is compiled once per shape."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        step = step_fn(layer.cell, ops)

        def one_step(h, u_t, params):
            new = step(list(h.unbind(1)), list(u_t.unbind(1)), list(params.unbind(0)))
            return torch.stack(list(new), 1)

        self.step = torch.compile(one_step, dynamic=False)

    def forward(self, x):
        layer = self.layer
        u = layer.project(x)
        h = u.new_zeros((x.shape[0], layer.cell.state_size, layer.hidden_size))
        outputs = []
        for t in range(x.shape[1]):
            h = self.step(h, u[:, t], layer.recurrent)
            outputs.append(h[:, layer.cell.output_index])
        return torch.stack(outputs, 1)
