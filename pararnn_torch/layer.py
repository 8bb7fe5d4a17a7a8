"""PyTorch layers: ``ParaRNN`` over any pararnn_core cell, and ``ParaGRU``/``ParaLSTM``."""

from __future__ import annotations

import torch
from torch import nn

from pararnn_core.layer_spec import PROJECTION_EINSUM, from_apple_tensors
from pararnn_core.newton import NewtonConfig
from pararnn_core.pipeline import ArrayBackend, RecurrentLayer
from pararnn_torch.modes import TABLE, resolve_mode, unavailable_modes
from pararnn_torch.ops import ops
from pararnn_torch.projection import project_rows

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class TorchBackend(ArrayBackend):
    name = "torch"
    array_type = torch.Tensor
    array_name = "torch.Tensor"
    table = TABLE
    ops = ops

    def is_floating(self, x):
        return x.is_floating_point()

    def is_bool(self, x):
        return x.dtype == torch.bool

    def device_key(self, x):
        return x.device

    def check_device(self, layer, x, what):
        if x.device != layer.weight.device:
            raise ValueError(f"{what} is on {x.device} but the layer's parameters are on {layer.weight.device}")

    def traced(self, x):
        # inside torch.compile / torch.export a value check would be a data-dependent guard
        return torch.compiler.is_compiling()

    def all_finite(self, x):
        # min and max propagate NaN and hold any inf; several times faster than isfinite(x).all() on CPU
        return all(bool(torch.isfinite(v)) for v in torch.aminmax(x.detach()))

    def compute_dtype(self, dtype):
        return torch.float32 if dtype in _LOW_PRECISION else dtype

    def cast(self, x, dtype):
        return x.to(dtype)

    def stack(self, parts, axis):
        return torch.stack(list(parts), axis)

    def unstack(self, x, axis):
        return x.unbind(axis)

    def zeros(self, shape, like, dtype):
        return like.new_zeros(shape, dtype=dtype)


class ParaRNN(RecurrentLayer, nn.Module):
    """A recurrent layer over any cell, trained in parallel along the sequence.

    ``forward(x)`` maps x [B, T, input_size] to y [B, T, hidden_size]; with
    ``return_state=True`` it also returns the final state (a tensor [B, N] for
    single-component cells, else a tuple in ``cell.state`` order, e.g. (c, h)).
    ``state`` is the initial state in the same form (zeros when None);
    ``resets`` [B, T] bool marks positions where the state restarts from it.

    After every forward, ``last_solve`` holds the solve's diagnostics (mode,
    Newton iterations, final residual, whether it converged or fell back).
    """

    backend = TorchBackend()

    def __init__(
        self,
        cell,
        input_size: int,
        hidden_size: int,
        num_heads: int = 1,
        mode: str = "auto",
        newton: NewtonConfig | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._configure(cell, input_size, hidden_size, num_heads, mode, newton)
        shapes = self.spec.param_shapes()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shapes["weight"], **factory))
        self.bias = nn.Parameter(torch.empty(shapes["bias"], **factory))
        self.recurrent = nn.Parameter(torch.empty(shapes["recurrent"], **factory))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return self.describe()

    @torch.no_grad()
    def reset_parameters(self):
        """Paper App. C: Kaiming-uniform projection, small Gaussian recurrent
        vectors, gate biases spreading memory time scales (see LayerSpec.init_plan)."""
        plan = self.spec.init_plan()
        (_, bound), = plan["weight"]
        self.weight.uniform_(-bound, bound)
        for tensor, rows in ((self.bias, plan["bias"]), (self.recurrent, plan["recurrent"])):
            for i, row in enumerate(rows):
                if row[0] == "normal":
                    tensor[i].normal_(row[1], row[2])
                else:
                    tensor[i].copy_(torch.tensor(row[1], dtype=tensor.dtype))

    # -- pieces ----------------------------------------------------------------
    def project(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """Gates u = W x + b for every position: x [..., D] -> u [..., G, N] (without b if not add_bias)."""
        weight = self.weight.to(x.dtype)
        if self.num_heads == 1:
            # one [B*T, D] x [D, G*N] product (and two in the backward), by the fastest route on this CPU;
            # the einsum would go through bmm with transposed operands, measurably slower
            u = project_rows(x, weight.flatten(0, 1).flatten(1)).unflatten(-1, weight.shape[2:])
        else:
            xh = x.unflatten(-1, (self.num_heads, self.spec.head_input))
            u = torch.einsum(PROJECTION_EINSUM, xh, weight).flatten(-2)
        return u + self.bias.to(u.dtype) if add_bias else u

    def resolved_mode(self, device=None) -> str:
        """The mode ``auto`` picks (or the set mode) on ``device`` (default: the parameters' device)."""
        return resolve_mode(self.mode, device if device is not None else self.weight.device, self.cell)

    def forward(self, x: torch.Tensor, state=None, resets: torch.Tensor | None = None, return_state: bool = False):
        return self._forward(x, state, resets, return_state)

    def step(self, x_t: torch.Tensor, state=None):
        """One token for every sequence of the batch: x_t [B, D] -> (y_t [B, N], new state)."""
        return self._step(x_t, state)

    # -- Apple checkpoints ------------------------------------------------------------
    @classmethod
    def _from_apple(cls, cell_name, state_dict, num_heads, **kwargs):
        tensors = from_apple_tensors(cell_name, state_dict, num_heads, ops.concat)
        weight = tensors["weight"]
        kwargs.setdefault("dtype", weight.dtype)
        kwargs.setdefault("device", weight.device)
        layer = cls._construct(cell_name, tensors["input_size"], tensors["hidden_size"], num_heads, **kwargs)
        with torch.no_grad():
            for name in ("weight", "bias", "recurrent"):
                getattr(layer, name).copy_(tensors[name])
        return layer


class ParaGRU(ParaRNN):
    """The ParaRNN paper's diagonal GRU (see pararnn_core.cells.gru)."""

    fixed_cell = "gru"

    def __init__(self, input_size, hidden_size, num_heads=1, mode="auto", newton=None, device=None, dtype=None):
        super().__init__(self.fixed_cell, input_size, hidden_size, num_heads, mode, newton, device, dtype)


class ParaLSTM(ParaRNN):
    """The ParaRNN paper's CIFG LSTM with peepholes, state (c, h) (see pararnn_core.cells.lstm)."""

    fixed_cell = "lstm"

    def __init__(self, input_size, hidden_size, num_heads=1, mode="auto", newton=None, device=None, dtype=None):
        super().__init__(self.fixed_cell, input_size, hidden_size, num_heads, mode, newton, device, dtype)



__all__ = ["ParaRNN", "ParaGRU", "ParaLSTM", "unavailable_modes"]
