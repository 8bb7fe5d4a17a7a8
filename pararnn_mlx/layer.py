"""MLX layers: ``ParaRNN`` over any pararnn_core cell, and ``ParaGRU``/``ParaLSTM``.

Same constructor arguments, call signature, modes and parameter names/shapes as
pararnn_torch, so a safetensors file written by either framework loads in the other.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from pararnn_core.cell import Cell
from pararnn_core.layer_spec import PROJECTION_EINSUM, RecurrentLayerConfig, from_apple_tensors
from pararnn_core.newton import NewtonConfig, step_fn
from pararnn_mlx.modes import resolve_mode, run_mode
from pararnn_mlx.ops import from_numpy, ops

_LOW_PRECISION = (mx.float16, mx.bfloat16)


@functools.cache
def _compiled_step(cell: Cell):
    """One token of the cell as a single compiled graph (generation calls it once per token)."""
    return mx.compile(step_fn(cell, ops))


def _init_rows(rows, size, dtype):
    out = []
    for row in rows:
        if row[0] == "normal":
            out.append(mx.random.normal((size,), dtype=mx.float32, loc=row[1], scale=row[2]))
        else:
            out.append(mx.array(row[1], dtype=mx.float32))
    return mx.stack(out, 0).astype(dtype) if out else mx.zeros((0, size), dtype=dtype)


class ParaRNN(RecurrentLayerConfig, nn.Module):
    """A recurrent layer over any cell, trained in parallel along the sequence.

    ``layer(x)`` maps x [B, T, input_size] to y [B, T, hidden_size]; with
    ``return_state=True`` it also returns the final state (an array [B, N] for
    single-component cells, else a tuple in ``cell.state`` order, e.g. (c, h)).
    ``state`` is the initial state in the same form (zeros when None);
    ``resets`` [B, T] bool marks positions where the state restarts from it.

    After every call, ``last_solve`` holds the solve's diagnostics (mode,
    Newton iterations, final residual, whether it converged or fell back).
    The parallel solve reads its residual to stop early, so it cannot run
    inside ``mx.compile``; ``step`` can.
    """

    def __init__(
        self,
        cell,
        input_size: int,
        hidden_size: int,
        num_heads: int = 1,
        mode: str = "auto",
        newton: NewtonConfig | None = None,
        dtype=None,
    ):
        super().__init__()
        self._configure(cell, input_size, hidden_size, num_heads, mode, newton)
        if dtype is not None and not isinstance(dtype, mx.Dtype):
            raise TypeError(f"dtype must be an mlx.core.Dtype such as mx.float32, got {dtype!r}")
        dtype = dtype or mx.float32
        shapes = self.spec.param_shapes()
        self.weight = mx.zeros(shapes["weight"], dtype=dtype)
        self.bias = mx.zeros(shapes["bias"], dtype=dtype)
        self.recurrent = mx.zeros(shapes["recurrent"], dtype=dtype)
        self.reset_parameters()

    def _extra_repr(self) -> str:
        return self.describe()

    def reset_parameters(self):
        """Paper App. C: Kaiming-uniform projection, small Gaussian recurrent
        vectors, gate biases spreading memory time scales (see LayerSpec.init_plan)."""
        plan = self.spec.init_plan()
        (_, bound), = plan["weight"]
        dtype = self.weight.dtype
        self.weight = mx.random.uniform(-bound, bound, self.weight.shape, dtype=mx.float32).astype(dtype)
        self.bias = _init_rows(plan["bias"], self.hidden_size, dtype)
        self.recurrent = _init_rows(plan["recurrent"], self.hidden_size, dtype)

    # -- pieces ----------------------------------------------------------------
    def project(self, x: mx.array) -> mx.array:
        """Gates u = W x + b for every position: x [..., D] -> u [..., G, N]."""
        xh = x.reshape(*x.shape[:-1], self.num_heads, self.spec.head_input)
        u = mx.einsum(PROJECTION_EINSUM, xh, self.weight.astype(x.dtype))
        u = u.reshape(*u.shape[:-2], self.hidden_size)
        return u + self.bias.astype(u.dtype)

    @staticmethod
    def _compute_dtype(dtype):
        return mx.float32 if dtype in _LOW_PRECISION else dtype

    def _state_to_array(self, state, batch, dtype):
        if state is None:
            return None
        parts = (state,) if isinstance(state, mx.array) else tuple(state)
        self.spec.check_state([tuple(p.shape) for p in parts], batch)
        return mx.stack([p.astype(dtype) for p in parts], 1)

    def _array_to_state(self, stacked, dtype):
        parts = tuple(stacked[:, k].astype(dtype) for k in range(stacked.shape[1]))
        return parts[0] if len(parts) == 1 else parts

    def resolved_mode(self, device=None) -> str:
        """The mode ``auto`` picks (or the set mode) on ``device`` (default: MLX's default device)."""
        return resolve_mode(self.mode, device, self.cell)

    # -- forward ------------------------------------------------------------------
    def __call__(self, x: mx.array, state=None, resets: mx.array | None = None, return_state: bool = False):
        if not isinstance(x, mx.array):
            raise TypeError(f"x must be an mlx.core.array, got {type(x).__name__}")
        self.spec.check_input(tuple(x.shape))
        if not mx.issubdtype(x.dtype, mx.floating):
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
        if not mx.all(mx.isfinite(x)).item():
            raise ValueError("x contains NaN or inf; the recurrence would spread them to every later step")
        batch, length = x.shape[:2]
        if resets is not None:
            if not isinstance(resets, mx.array):
                raise TypeError(f"resets must be an mlx.core.array, got {type(resets).__name__}")
            self.spec.check_resets(tuple(resets.shape), batch, length, resets.dtype == mx.bool_)
        mode = self.resolved_mode()
        u = self.project(x)
        compute = self._compute_dtype(u.dtype)
        h0 = self._state_to_array(state, batch, compute)
        traj, info = run_mode(mode, self.cell, u.astype(compute), self.recurrent.astype(compute), h0, resets,
                              self.newton)
        self.last_solve = info
        y = traj[:, :, self.cell.output_index].astype(u.dtype)
        if not return_state:
            return y
        return y, self._array_to_state(traj[:, -1], u.dtype)

    def step(self, x_t: mx.array, state=None):
        """One token for every sequence of the batch: x_t [B, D] -> (y_t [B, N], new state).

        No evaluation happens here, so ``step`` may sit inside an ``mx.compile``d decode step.
        """
        self.spec.check_step_input(tuple(x_t.shape))
        batch = x_t.shape[0]
        u = self.project(x_t)
        out_dtype = u.dtype
        compute = self._compute_dtype(out_dtype)
        h = self._state_to_array(state, batch, compute)
        if h is None:
            h = mx.zeros((batch, self.cell.state_size, self.hidden_size), dtype=compute)
        u = u.astype(compute)
        recurrent = self.recurrent.astype(compute)
        new = _compiled_step(self.cell)(
            [h[:, k] for k in range(h.shape[1])],
            [u[:, g] for g in range(u.shape[1])],
            [recurrent[p] for p in range(recurrent.shape[0])],
        )
        new = mx.stack(list(new), 1)
        return new[:, self.cell.output_index].astype(out_dtype), self._array_to_state(new, out_dtype)

    # -- Apple checkpoints ------------------------------------------------------------
    @classmethod
    def _from_apple(cls, cell_name, state_dict, num_heads, **kwargs):
        arrays = {k: v if isinstance(v, mx.array) else from_numpy(v) for k, v in state_dict.items()}
        tensors = from_apple_tensors(cell_name, arrays, num_heads, ops.concat)
        kwargs.setdefault("dtype", tensors["weight"].dtype)
        layer = cls._construct(cell_name, tensors["input_size"], tensors["hidden_size"], num_heads, **kwargs)
        dtype = layer.weight.dtype
        layer.update({name: tensors[name].astype(dtype) for name in ("weight", "bias", "recurrent")})
        return layer


class ParaGRU(ParaRNN):
    """The ParaRNN paper's diagonal GRU (see pararnn_core.cells.gru)."""

    fixed_cell = "gru"

    def __init__(self, input_size, hidden_size, num_heads=1, mode="auto", newton=None, dtype=None):
        super().__init__(self.fixed_cell, input_size, hidden_size, num_heads, mode, newton, dtype)


class ParaLSTM(ParaRNN):
    """The ParaRNN paper's CIFG LSTM with peepholes, state (c, h) (see pararnn_core.cells.lstm)."""

    fixed_cell = "lstm"

    def __init__(self, input_size, hidden_size, num_heads=1, mode="auto", newton=None, dtype=None):
        super().__init__(self.fixed_cell, input_size, hidden_size, num_heads, mode, newton, dtype)

