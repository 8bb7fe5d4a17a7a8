"""What a layer is, independent of the framework: parameter layout, checks, init, Apple import.

Parameters of a layer over a cell with G gates, K state components and P
per-channel recurrent parameters, hidden size N, input size D, H heads:

    weight     [H, D/H, G, N/H]   block-diagonal input projection (Apple's ``B``)
    bias       [G, N]             gate biases (Apple's ``b``)
    recurrent  [P, N]             per-channel parameters, rows in ``cell.params`` order

so ``u[b, t, g, h*N/H + j] = sum_i x[b, t, h*D/H + i] * weight[h, i, g, j] + bias[g, h*N/H + j]``.
The same names and shapes are used by pararnn_torch and pararnn_mlx, so one
safetensors file loads in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pararnn_core.cell import Cell, Constant, Normal, Timescales, get_cell
from pararnn_core.newton import NewtonConfig
from pararnn_core.solvers import check_mode_name

#: einsum of the input projection: x viewed [..., H, D/H] with weight [H, D/H, G, N/H]
PROJECTION_EINSUM = "...hi,higj->...ghj"


@dataclass(frozen=True)
class LayerSpec:
    cell: Cell
    input_size: int
    hidden_size: int
    num_heads: int = 1

    @classmethod
    def build(cls, cell, input_size, hidden_size, num_heads=1) -> LayerSpec:
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_heads", num_heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if v % num_heads:
                raise ValueError(
                    f"{name}={v} is not divisible by num_heads={num_heads}: every head takes an equal "
                    f"slice; pick num_heads dividing both input_size and hidden_size"
                )
        return cls(get_cell(cell), input_size, hidden_size, num_heads)

    @property
    def head_input(self) -> int:
        return self.input_size // self.num_heads

    @property
    def head_hidden(self) -> int:
        return self.hidden_size // self.num_heads

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cell
        return {
            "weight": (self.num_heads, self.head_input, c.num_gates, self.head_hidden),
            "bias": (c.num_gates, self.hidden_size),
            "recurrent": (len(c.params), self.hidden_size),
        }

    # -- initialisation (paper App. C) --------------------------------------
    def init_plan(self) -> dict[str, list]:
        """Per parameter, a description each backend samples with its own RNG:

        * weight: ("uniform", bound) Kaiming-uniform as torch.nn.Linear, bound 1/sqrt(D/H);
        * bias: one row per gate, ("values", [...]) from ``cell.gate_bias``
          (e.g. a log-uniform spread of time scales, repeated in every head) or zeros;
        * recurrent: one row per parameter, ("normal", mean, std) or ("values", [...]).
        """
        n, nh = self.hidden_size, self.head_hidden

        def row(spec, size):
            if spec is None:
                return ("values", [0.0] * size)
            if isinstance(spec, Normal):
                return ("normal", spec.mean, spec.std)
            if isinstance(spec, Constant):
                return ("values", [float(spec.value)] * size)
            if isinstance(spec, Timescales):
                return ("values", spec.values(nh) * self.num_heads)
            raise TypeError(f"unsupported init spec {spec!r}")

        return {
            "weight": [("uniform", 1.0 / math.sqrt(self.head_input))],
            "bias": [row(self.cell.gate_bias.get(g), n) for g in self.cell.gates],
            "recurrent": [row(spec, n) for spec in self.cell.params.values()],
        }

    # -- checks shared by every backend -------------------------------------
    def check_input(self, shape, what="x"):
        if len(shape) != 3:
            raise ValueError(
                f"{what} must have shape [batch, time, {self.input_size}] (batch-first), got shape {tuple(shape)}"
            )
        if shape[2] != self.input_size:
            raise ValueError(
                f"{what} has {shape[2]} features in its last dimension, but the layer was built "
                f"with input_size={self.input_size}"
            )
        if shape[1] < 1:
            raise ValueError(f"{what} has an empty time dimension (shape {tuple(shape)})")

    def check_step_input(self, shape):
        if len(shape) != 2 or shape[1] != self.input_size:
            raise ValueError(f"step() takes x_t of shape [batch, {self.input_size}], got shape {tuple(shape)}")

    def check_state(self, shapes, batch):
        expected = (batch, self.hidden_size)
        k = self.cell.state_size
        names = "(" + ", ".join(self.cell.state) + ")"
        if len(shapes) != k:
            raise ValueError(
                f"cell {self.cell.name!r} has state {names}: expected {k} tensors of shape {expected}, "
                f"got {len(shapes)}"
            )
        for name, s in zip(self.cell.state, shapes):
            if tuple(s) != expected:
                raise ValueError(f"state component {name!r} must have shape {expected}, got {tuple(s)}")

    def check_resets(self, shape, batch, length, is_bool):
        if tuple(shape) != (batch, length):
            raise ValueError(f"resets must have shape [batch, time] = {(batch, length)}, got {tuple(shape)}")
        if not is_bool:
            raise ValueError("resets must be a boolean mask (True where a new sequence starts)")


class RecurrentLayerConfig:
    """Configuration shared by the torch and MLX layers (a mixin: no framework code).

    Holds the layout (``spec``, ``cell``), the validated ``mode``, the Newton
    settings and the last solve's diagnostics, so both backends expose them alike.
    """

    def _configure(self, cell, input_size, hidden_size, num_heads, mode, newton):
        self.spec = LayerSpec.build(get_cell(cell), input_size, hidden_size, num_heads)
        self.cell = self.spec.cell
        self.mode = mode
        if newton is not None and not isinstance(newton, NewtonConfig):
            raise TypeError(f"newton must be a NewtonConfig, got {type(newton).__name__}")
        self.newton = newton or NewtonConfig()
        self.last_solve = None

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value):
        check_mode_name(value)
        self._mode = value

    #: the cell of a fixed-cell layer (ParaGRU, ParaLSTM), whose constructor takes no cell argument
    fixed_cell: str | None = None

    @classmethod
    def _construct(cls, cell, input_size, hidden_size, num_heads, **kwargs):
        if cls.fixed_cell is not None:
            return cls(input_size, hidden_size, num_heads, **kwargs)
        return cls(cell, input_size, hidden_size, num_heads, **kwargs)

    @classmethod
    def from_apple_state_dict(cls, state_dict, num_heads=1, cell=None, **kwargs):
        """Build a layer from Apple ml-pararnn cell tensors: ``A`` [3, N], ``B`` [H, D/H, 3, N/H],
        ``b`` [3, N], and for the LSTM the peepholes ``C`` [2, N] (see :func:`from_apple_tensors`).
        ``cell`` ("gru" or "lstm") is needed only on the generic ParaRNN."""
        if cls.fixed_cell is not None and cell is not None and cell != cls.fixed_cell:
            raise ValueError(
                f"{cls.__name__}.from_apple_state_dict builds a {cls.fixed_cell!r} layer, but cell={cell!r} was "
                f"given; use ParaRNN.from_apple_state_dict(sd, cell={cell!r}) or drop the cell argument"
            )
        cell = cls.fixed_cell or cell
        if cell is None:
            raise ValueError("ParaRNN.from_apple_state_dict needs cell='gru' or cell='lstm'")
        return cls._from_apple(cell, state_dict, num_heads, **kwargs)

    def describe(self) -> str:
        return (
            f"cell={self.cell.name}, input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"num_heads={self.num_heads}, mode={self.mode!r}"
        )


# ----------------------------------------------------------------------------
# Apple ml-pararnn checkpoints

_APPLE_KEYS = {"gru": ("A", "B", "b"), "lstm": ("A", "B", "b", "C")}


def from_apple_tensors(cell_name: str, state_dict: dict, num_heads: int, concat) -> dict:
    """Map the tensors of an Apple ml-pararnn cell to ``weight``/``bias``/``recurrent``.

    Apple stores ``A`` [3, N] (GRU rows z, r, c; LSTM rows f, o, c),
    ``B`` [H, D/H, 3, N/H], ``b`` [3, N] and for the LSTM ``C`` [2, N] (peepholes
    f, o). Keys may carry a module prefix (``rnn.cell.A``). ``concat(list, axis)``
    is the backend's concatenation.
    """
    if cell_name not in _APPLE_KEYS:
        raise ValueError(f"Apple checkpoints exist for cells {sorted(_APPLE_KEYS)}, not {cell_name!r}")
    wanted = _APPLE_KEYS[cell_name]
    found: dict = {}
    unknown = []
    for key, value in state_dict.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in wanted:
            if leaf in found:
                raise ValueError(f"Apple state dict has more than one {leaf!r} tensor (second one: {key!r})")
            found[leaf] = value
        else:
            unknown.append(key)
    missing = [k for k in wanted if k not in found]
    if missing or unknown:
        raise ValueError(
            f"Apple {cell_name} state dict: missing keys {missing}, unknown keys {unknown}; "
            f"expected exactly {list(wanted)} (optionally with a module prefix)"
        )
    A, B, b = found["A"], found["B"], found["b"]
    if len(A.shape) != 2 or A.shape[0] != 3:
        raise ValueError(f"Apple tensor A must have shape [3, N], got {tuple(A.shape)}")
    n = A.shape[1]
    expected_B = (num_heads, None, 3, n // num_heads)
    if (
        len(B.shape) != 4
        or B.shape[0] != num_heads
        or B.shape[2] != 3
        or B.shape[3] * num_heads != n
    ):
        raise ValueError(
            f"Apple tensor B must have shape [H={num_heads}, D/H, 3, N/H={n // num_heads}], got {tuple(B.shape)} "
            f"(expected {expected_B}; is num_heads right?)"
        )
    if tuple(b.shape) != (3, n):
        raise ValueError(f"Apple tensor b must have shape [3, {n}], got {tuple(b.shape)}")
    recurrent = A
    if cell_name == "lstm":
        C = found["C"]
        if tuple(C.shape) != (2, n):
            raise ValueError(f"Apple tensor C must have shape [2, {n}], got {tuple(C.shape)}")
        recurrent = concat([A, C], 0)
    return {
        "input_size": B.shape[0] * B.shape[1],
        "hidden_size": n,
        "weight": B,
        "bias": b,
        "recurrent": recurrent,
    }
