"""Backend-free cell definitions.

A cell is the per-channel recurrence ``new_state = step(ops, state, u, p)`` where

* ``state`` holds the K state components of one channel (GRU: h; LSTM: c, h),
* ``u`` holds the G input-projection gates of that channel (``u_t = W x_t + b``),
* ``p`` holds the per-channel recurrent parameters (vectors of length N).

All three arrive as :class:`Fields` (attribute access by name) whose entries are
arrays of any backend (torch, MLX, numpy) or sympy symbols; ``ops`` supplies the
nonlinearities for that backend. The step acts channel by channel, so the
Jacobian w.r.t. the previous state is diagonal (K = 1) or K x K block-diagonal.

Writing a new cell::

    class MyCell(Cell):
        name = "my_cell"
        gates = ("f", "c")
        state = ("h",)
        params = {"a_f": Normal(0.1), "a_c": Normal(0.1)}
        gate_bias = {"f": Timescales(kind="retain")}

        def step(self, ops, s, u, p):
            f = ops.sigmoid(p.a_f * s.h + u.f)
            return (f * s.h + (1 - f) * ops.tanh(p.a_c * s.h + u.c),)

Subclasses that set their own ``name`` register themselves by it (see :func:`get_cell`);
a name already taken by another class is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


class Fields:
    """Read-only attribute view over named values (gates, parameters, state)."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: Sequence[str], values: Sequence[Any]):
        if len(names) != len(values):
            raise ValueError(f"expected {len(names)} values for {tuple(names)}, got {len(values)}")
        object.__setattr__(self, "_names", tuple(names))
        object.__setattr__(self, "_values", tuple(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[self._names.index(name)]
        except ValueError:
            raise AttributeError(f"no field {name!r}; available: {', '.join(self._names)}") from None

    def __setattr__(self, name, value):
        raise AttributeError("Fields are read-only")

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


# ----------------------------------------------------------------------------
# Initialisation specs (sampled by each backend with its own RNG).


@dataclass(frozen=True)
class Normal:
    """Gaussian with mean ``mean`` and standard deviation ``std``."""

    std: float
    mean: float = 0.0


@dataclass(frozen=True)
class Constant:
    value: float


@dataclass(frozen=True)
class Timescales:
    """Gate bias giving channels a log-uniform spread of memory time scales.

    Channel n gets a time scale tau_n log-spaced in [min_steps, max_steps].
    ``kind="retain"``: the gate is the fraction kept (LSTM forget gate), so its
    bias is logit(1 - 1/tau).  ``kind="update"``: the gate is the fraction
    replaced (GRU update gate), so its bias is logit(1/tau).
    """

    kind: str = "retain"
    min_steps: float = 2.0
    max_steps: float = 256.0

    def values(self, n: int) -> list[float]:
        if self.kind not in ("retain", "update"):
            raise ValueError(f"Timescales.kind must be 'retain' or 'update', got {self.kind!r}")
        lo, hi = math.log(self.min_steps), math.log(self.max_steps)
        out = []
        for i in range(n):
            tau = math.exp(lo + (hi - lo) * (i / max(n - 1, 1)))
            rate = 1.0 / tau
            gate = 1.0 - rate if self.kind == "retain" else rate  # the gate's value at zero input
            gate = min(max(gate, 1e-6), 1 - 1e-6)
            out.append(math.log(gate / (1.0 - gate)))
        return out


InitSpec = Normal | Constant | Timescales


# ----------------------------------------------------------------------------


class Cell:
    """Base class of every cell; subclasses set the class attributes and ``step``."""

    name: ClassVar[str]
    gates: ClassVar[tuple[str, ...]]
    state: ClassVar[tuple[str, ...]]
    params: ClassVar[Mapping[str, InitSpec]] = {}
    #: bias initialisation per gate; gates not listed start at zero bias
    gate_bias: ClassVar[Mapping[str, InitSpec]] = {}
    #: which state component is the layer output y_t (default: the last one)
    output: ClassVar[str | None] = None

    _registry: ClassVar[dict[str, type[Cell]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr in ("name", "gates", "state"):
            if not hasattr(cls, attr):
                raise TypeError(f"cell class {cls.__name__} must define {attr!r}")
        if not cls.gates or not cls.state:
            raise TypeError(f"cell {cls.name!r} needs at least one gate and one state component")
        unknown = set(cls.gate_bias) - set(cls.gates)
        if unknown:
            raise TypeError(f"cell {cls.name!r}: gate_bias names unknown gates {sorted(unknown)}")
        if cls.output is not None and cls.output not in cls.state:
            raise TypeError(f"cell {cls.name!r}: output {cls.output!r} is not a state component")
        if "name" not in cls.__dict__:
            return  # a subclass that keeps its parent's name is a variant, not a new registered cell
        taken = Cell._registry.get(cls.name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(
                f"cell name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}; give "
                f"{cls.__module__}.{cls.__qualname__} a name of its own (class attribute `name`)"
            )
        Cell._registry[cls.name] = cls  # the same class defined again (a reloaded module) replaces itself

    # -- structure ---------------------------------------------------------
    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @property
    def state_size(self) -> int:
        """K: state components per channel, the size of each Jacobian block."""
        return len(self.state)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.params)

    @property
    def output_index(self) -> int:
        return self.state.index(self.output) if self.output else self.state_size - 1

    # -- math --------------------------------------------------------------
    def step(self, ops, s: Fields, u: Fields, p: Fields) -> tuple:
        """One time step for every channel at once; returns the new state tuple."""
        raise NotImplementedError

    def step_and_jacobian(self, ops, s: Fields, u: Fields, p: Fields):
        """Optional closed form: returns ``(new_state, J)`` with ``J[i][j] = d new_i / d s_j``.

        Returning ``NotImplemented`` (the default) makes the backends use
        forward-mode autodiff with K tangents.
        """
        return NotImplemented

    def __repr__(self) -> str:
        return f"<cell {self.name}: gates={self.gates} state={self.state} params={self.param_names}>"


def get_cell(cell: str | Cell | type[Cell]) -> Cell:
    """Resolve a cell name, class or instance to an instance."""
    if isinstance(cell, Cell):
        return cell
    if isinstance(cell, type) and issubclass(cell, Cell):
        return cell()
    if isinstance(cell, str):
        # built-in cells register on import
        from pararnn_core import cells  # noqa: F401

        try:
            return Cell._registry[cell]()
        except KeyError:
            known = ", ".join(sorted(Cell._registry))
            raise ValueError(f"unknown cell {cell!r}; registered cells: {known}") from None
    raise TypeError(f"expected a cell name or a pararnn_core.Cell, got {type(cell).__name__}")


def registered_cells() -> list[str]:
    from pararnn_core import cells  # noqa: F401

    return sorted(Cell._registry)
