"""The peer a user would write without this library: the same cell, stepped in a Python loop over time,
with the step compiled by torch.compile, trained by backpropagation through the loop."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from pararnn_core.newton import step_fn
from pararnn_torch.ops import ops


class CompiledLoop(torch.nn.Module):
    """x [B, T, D] -> y [B, T, N] with ``layer``'s projection and cell; the step is compiled for one batch size.

    The cell's step is first traced to a graph of plain tensor ops (make_fx runs the cell's Python as is),
    then that graph is compiled: dynamo cannot trace the cell's named-field helper itself.
    """

    def __init__(self, layer, batch: int):
        super().__init__()
        self.layer = layer
        step = step_fn(layer.cell, ops)

        def one_step(h, u_t, params):
            new = step(list(h.unbind(1)), list(u_t.unbind(1)), list(params.unbind(0)))
            return torch.stack(list(new), 1)

        k, g, n = layer.cell.state_size, layer.cell.num_gates, layer.hidden_size
        examples = (torch.zeros(batch, k, n), torch.zeros(batch, g, n), layer.recurrent.detach())
        self.step = torch.compile(make_fx(one_step)(*examples), dynamic=False)

    def forward(self, x):
        layer = self.layer
        u = layer.project(x)
        h = u.new_zeros((x.shape[0], layer.cell.state_size, layer.hidden_size))
        outputs = []
        for t in range(x.shape[1]):
            h = self.step(h, u[:, t], layer.recurrent)
            outputs.append(h[:, layer.cell.output_index])
        return torch.stack(outputs, 1)
