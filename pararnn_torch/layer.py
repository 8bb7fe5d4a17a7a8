"""PyTorch layers: ``ParaRNN`` over any pararnn_core cell, and ``ParaGRU``/``ParaLSTM``."""

from __future__ import annotations

import torch
from torch import nn

from pararnn_core.layer_spec import PROJECTION_EINSUM, RecurrentLayerConfig, from_apple_tensors
from pararnn_core.newton import NewtonConfig, step_fn
from pararnn_torch.modes import resolve_mode, run_mode, unavailable_modes
from pararnn_torch.ops import ops

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ParaRNN(RecurrentLayerConfig, nn.Module):
    """A recurrent layer over any cell, trained in parallel along the sequence.

    ``forward(x)`` maps x [B, T, input_size] to y [B, T, hidden_size]; with
    ``return_state=True`` it also returns the final state (a tensor [B, N] for
    single-component cells, else a tuple in ``cell.state`` order, e.g. (c, h)).
    ``state`` is the initial state in the same form (zeros when None);
    ``resets`` [B, T] bool marks positions where the state restarts from it.

    After every forward, ``last_solve`` holds the solve's diagnostics (mode,
    Newton iterations, final residual, whether it converged or fell back).
    """

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
        xh = x.unflatten(-1, (self.num_heads, self.spec.head_input))
        u = torch.einsum(PROJECTION_EINSUM, xh, self.weight.to(x.dtype)).flatten(-2)
        return u + self.bias.to(u.dtype) if add_bias else u

    def _compute_dtype(self, dtype):
        return torch.float32 if dtype in _LOW_PRECISION else dtype

    def _state_to_tensor(self, state, batch, dtype, device):
        if state is None:
            return None
        parts = (state,) if isinstance(state, torch.Tensor) else tuple(state)
        self.spec.check_state([tuple(p.shape) for p in parts], batch)
        return torch.stack([p.to(device=device, dtype=dtype) for p in parts], 1)

    def _tensor_to_state(self, stacked, dtype):
        parts = tuple(p.to(dtype) for p in stacked.unbind(1))
        return parts[0] if len(parts) == 1 else parts

    def resolved_mode(self, device=None) -> str:
        """The mode ``auto`` picks (or the set mode) on ``device``."""
        return resolve_mode(self.mode, device or self.weight.device, self.cell)

    # -- forward ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state=None, resets: torch.Tensor | None = None, return_state: bool = False):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        self.spec.check_input(tuple(x.shape))
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {self.weight.device}")
        # min and max propagate NaN and hold any inf; several times faster than isfinite(x).all() on CPU
        if not all(bool(torch.isfinite(v)) for v in torch.aminmax(x.detach())):
            raise ValueError("x contains NaN or inf; the recurrence would spread them to every later step")
        batch, length = x.shape[:2]
        if resets is not None:
            self.spec.check_resets(tuple(resets.shape), batch, length, resets.dtype == torch.bool)
            resets = resets.to(x.device)
        mode = self.resolved_mode(x.device)
        u = self.project(x, add_bias=False)  # the solve adds the bias (inside the sweep in fused mode)
        compute = self._compute_dtype(u.dtype)
        h0 = self._state_to_tensor(state, batch, compute, x.device)
        rec, bias = self.recurrent.to(compute), self.bias.to(compute)
        traj, info = run_mode(mode, self.cell, u.to(compute), rec, h0, resets, self.newton, bias=bias)
        self.last_solve = info
        y = traj[:, :, self.cell.output_index].to(u.dtype)
        if not return_state:
            return y
        return y, self._tensor_to_state(traj[:, -1], u.dtype)

    def step(self, x_t: torch.Tensor, state=None):
        """One token for every sequence of the batch: x_t [B, D] -> (y_t [B, N], new state)."""
        self.spec.check_step_input(tuple(x_t.shape))
        batch = x_t.shape[0]
        u = self.project(x_t)
        compute = self._compute_dtype(u.dtype)
        h = self._state_to_tensor(state, batch, compute, x_t.device)
        if h is None:
            h = u.new_zeros((batch, self.cell.state_size, self.hidden_size), dtype=compute)

        step = step_fn(self.cell, ops)
        new = step(list(h.unbind(1)), list(u.to(compute).unbind(1)), list(self.recurrent.to(compute)))
        new = torch.stack(list(new), 1)
        return new[:, self.cell.output_index].to(u.dtype), self._tensor_to_state(new, u.dtype)

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
