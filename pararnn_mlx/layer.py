"""MLX layers: ``ParaRNN`` over any pararnn_core cell, and ``ParaGRU``/``ParaLSTM``.

Same constructor arguments, call signature, modes and parameter names/shapes as
pararnn_torch, so a safetensors file written by either framework loads in the other.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from pararnn_core.cell import Cell
from pararnn_core.layer_spec import PROJECTION_EINSUM, from_apple_tensors
from pararnn_core.newton import NewtonConfig, step_fn
from pararnn_core.pipeline import ArrayBackend, RecurrentLayer
from pararnn_mlx.modes import TABLE, device_key, resolve_mode
from pararnn_mlx.ops import from_numpy, ops

_LOW_PRECISION = (mx.float16, mx.bfloat16)


@functools.cache
def _compiled_step(cell: Cell):
    """One token of the cell as a single compiled graph (generation calls it once per token)."""
    return mx.compile(step_fn(cell, ops))


class MlxBackend(ArrayBackend):
    name = "mlx"
    array_type = mx.array
    array_name = "mlx.core.array"
    table = TABLE
    ops = ops
    # reading a value back per token and layer would stall MLX's lazy decode pipeline
    step_checks_finite = False

    def is_floating(self, x):
        return mx.issubdtype(x.dtype, mx.floating)

    def is_bool(self, x):
        return x.dtype == mx.bool_

    def device_key(self, x):
        return device_key()

    def traced(self, x):
        # inside mx.compile (or vmap) an array cannot be evaluated; outside, x is needed anyway
        try:
            mx.eval(x)
        except ValueError:
            return True
        return False

    def all_finite(self, x):
        return bool(mx.all(mx.isfinite(x)).item())

    def compute_dtype(self, dtype):
        return mx.float32 if dtype in _LOW_PRECISION else dtype

    def cast(self, x, dtype):
        return x.astype(dtype)

    def stack(self, parts, axis):
        return mx.stack(list(parts), axis)

    def unstack(self, x, axis):
        return [mx.squeeze(part, axis) for part in mx.split(x, x.shape[axis], axis=axis)]

    def zeros(self, shape, like, dtype):
        return mx.zeros(shape, dtype=dtype)

    def step_function(self, cell):
        return _compiled_step(cell)


def _init_rows(rows, size, dtype):
    out = []
    for row in rows:
        if row[0] == "normal":
            out.append(mx.random.normal((size,), dtype=mx.float32, loc=row[1], scale=row[2]))
        else:
            out.append(mx.array(row[1], dtype=mx.float32))
    return mx.stack(out, 0).astype(dtype) if out else mx.zeros((0, size), dtype=dtype)


class ParaRNN(RecurrentLayer, nn.Module):
    """A recurrent layer over any cell, trained in parallel along the sequence.

    ``layer(x)`` maps x [B, T, input_size] to y [B, T, hidden_size]; with
    ``return_state=True`` it also returns the final state (an array [B, N] for
    single-component cells, else a tuple in ``cell.state`` order, e.g. (c, h)).
    ``state`` is the initial state in the same form (zeros when None);
    ``resets`` [B, T] bool marks positions where the state restarts from it.

    After every call, ``last_solve`` holds the solve's diagnostics (mode,
    Newton iterations, final residual, whether it converged or fell back).
    Inside ``mx.compile`` (e.g. mlx-lm's compiled training step) nothing is
    read back: ``auto`` picks a mode that runs in the graph (the fused Metal
    kernel on a Mac, the exact ``sequential`` loop on the CPU), the checks that
    need values are skipped, and ``last_solve`` has no iteration counts;
    ``step`` never reads values back.
    """

    backend = MlxBackend()

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
    def project(self, x: mx.array, add_bias: bool = True) -> mx.array:
        """Gates u = W x + b for every position: x [..., D] -> u [..., G, N] (without b if not add_bias)."""
        xh = x.reshape(*x.shape[:-1], self.num_heads, self.spec.head_input)
        u = mx.einsum(PROJECTION_EINSUM, xh, self.weight.astype(x.dtype))
        u = u.reshape(*u.shape[:-2], self.hidden_size)
        return u + self.bias.astype(u.dtype) if add_bias else u

    def resolved_mode(self, device=None) -> str:
        """The mode ``auto`` picks (or the set mode) on ``device`` (default: MLX's default device)."""
        return resolve_mode(self.mode, device, self.cell)

    # -- forward ------------------------------------------------------------------
    def __call__(self, x: mx.array, state=None, resets: mx.array | None = None, return_state: bool = False):
        return self._forward(x, state, resets, return_state)

    def step(self, x_t: mx.array, state=None):
        """One token for every sequence of the batch: x_t [B, D] -> (y_t [B, N], new state).

        No evaluation happens here, so ``step`` may sit inside an ``mx.compile``d decode step.
        """
        return self._step(x_t, state)

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

