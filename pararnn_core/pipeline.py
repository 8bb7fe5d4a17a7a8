"""The layer pipeline, written once: validate -> choose the solver -> project -> compute dtype ->
pack the state -> solve -> check -> unpack. Each framework supplies an :class:`ArrayBackend`.

The state travels in one packed form, [B, K, N] (K state components), from the
layer to the solver and back; the user sees an array [B, N] for one-component
cells and a tuple in ``cell.state`` order otherwise.
"""

from __future__ import annotations

from pararnn_core.layer_spec import RecurrentLayerConfig
from pararnn_core.newton import step_fn
from pararnn_core.solvers import SolverTable, check_settings

HIGHER_ORDER_MESSAGE = (
    "second-order gradients (create_graph=True, a gradient penalty, grad of grad) through mode={mode!r} are not "
    "supported: its backward is the adjoint solve, which is not itself differentiable here. Use mode='sequential' "
    "for this layer (it differentiates to any order)"
)


class ArrayBackend:
    """What the pipeline needs from a framework (torch, MLX); no state of its own."""

    name: str
    array_type: type
    array_name: str
    table: SolverTable
    #: whether ``step`` checks its input for NaN/inf (a host read per token and layer)
    step_checks_finite: bool = True

    def is_floating(self, x) -> bool:
        raise NotImplementedError

    def is_bool(self, x) -> bool:
        raise NotImplementedError

    def device_key(self, x):
        """Hashable key of the device ``x`` computes on (the solver table caches by it)."""
        raise NotImplementedError

    def check_device(self, layer, x, what: str):
        """Raise when ``x`` is not where the layer's parameters are."""

    def traced(self, x) -> bool:
        """True inside a compiled/transformed graph, where nothing may be read back to the host."""
        return False

    def all_finite(self, x) -> bool:
        raise NotImplementedError

    def compute_dtype(self, dtype):
        raise NotImplementedError

    def cast(self, x, dtype):
        raise NotImplementedError

    def stack(self, parts, axis):
        raise NotImplementedError

    def unstack(self, x, axis):
        raise NotImplementedError

    def zeros(self, shape, like, dtype):
        raise NotImplementedError

    def step_function(self, cell):
        """``f(state_list, gate_list, param_list) -> state tuple`` used by ``step`` (compiled where it pays)."""
        return step_fn(cell, self.ops)


class RecurrentLayer(RecurrentLayerConfig):
    """The forward and step of every backend's layer; the backend sets ``backend`` and ``project``."""

    backend: ArrayBackend

    def project(self, x, add_bias: bool = True):
        """Gates u = W x (+ b) for every position: x [..., D] -> u [..., G, N]."""
        raise NotImplementedError

    # -- checks ------------------------------------------------------------------------
    def _check_array(self, x, what: str):
        be = self.backend
        if not isinstance(x, be.array_type):
            raise TypeError(f"{what} must be a {be.array_name}, got {type(x).__name__}")
        if not be.is_floating(x):
            raise TypeError(
                f"{what} must be a floating-point {be.array_name} (float32, float64, bfloat16 or float16), got "
                f"dtype {x.dtype}; convert token ids with an embedding first"
            )
        be.check_device(self, x, what)

    def _check_finite(self, x, what: str):
        if not self.backend.all_finite(x):
            raise ValueError(f"{what} contains NaN or inf; the recurrence would spread them to every later step")

    def _check_resets(self, resets, batch, length):
        if resets is None:
            return None
        be = self.backend
        if not isinstance(resets, be.array_type):
            raise TypeError(f"resets must be a boolean {be.array_name} [batch, time], got {type(resets).__name__}")
        self.spec.check_resets(tuple(resets.shape), batch, length, be.is_bool(resets))
        be.check_device(self, resets, "resets")
        return resets

    def _pack_state(self, state, batch, dtype):
        """The user's state (array or tuple of arrays) as one array [B, K, N], or None."""
        if state is None:
            return None
        be = self.backend
        parts = (state,) if isinstance(state, be.array_type) else state
        if not isinstance(parts, (tuple, list)) or not all(isinstance(p, be.array_type) for p in parts):
            raise TypeError(
                f"state must be a {be.array_name} [batch, {self.hidden_size}] or a tuple of them in the order "
                f"{self.cell.state}, got {type(state).__name__}"
            )
        self.spec.check_state([tuple(p.shape) for p in parts], batch)
        for p in parts:
            self._check_array(p, "state")
        return be.stack([be.cast(p, dtype) for p in parts], 1)

    def _unpack_state(self, packed, dtype):
        parts = tuple(self.backend.cast(p, dtype) for p in self.backend.unstack(packed, 1))
        return parts[0] if len(parts) == 1 else parts

    # -- the solver --------------------------------------------------------------------
    def solver_for(self, x, traced: bool = False):
        """The table entry that runs this layer on ``x``'s device (decided once, then cached)."""
        entry = self.backend.table.choose(self.mode, self.cell, self.backend.device_key(x), traced)
        check_settings(entry, self.newton, self.mode)
        return entry

    # -- forward -----------------------------------------------------------------------
    def _forward(self, x, state=None, resets=None, return_state=False):
        be = self.backend
        self._check_array(x, "x")
        self.spec.check_input(tuple(x.shape))
        batch, length = x.shape[0], x.shape[1]
        traced = be.traced(x)
        if not traced and batch:
            self._check_finite(x, "x")
        resets = self._check_resets(resets, batch, length)
        entry = self.solver_for(x, traced)
        u = self.project(x, add_bias=False)  # each solver adds the bias (the fused kernels inside their sweep)
        compute = be.compute_dtype(u.dtype)
        h0 = self._pack_state(state, batch, compute)
        if batch == 0:
            traj = be.zeros((0, length, self.cell.state_size, self.hidden_size), u, compute)
            info = None
        else:
            traj, info = entry.solve(
                self.cell, be.cast(u, compute), be.cast(self.recurrent, compute), be.cast(self.bias, compute),
                h0, resets, self.newton, traced,
            )  # fmt: skip
        if self.cell.state_size == 1:  # a view whose backward is a view too (indexing would fill a zero gradient)
            y = traj.reshape(traj.shape[0], traj.shape[1], traj.shape[3])
        else:
            y = traj[:, :, self.cell.output_index]
        if not traced and batch and not be.all_finite(y):
            raise FloatingPointError(
                f"mode {entry.mode!r} produced NaN/inf from a finite input: check the layer's weights "
                f"(weight, bias, recurrent) and the initial state for NaN/inf or huge values"
            )
        self.last_solve = info
        y = be.cast(y, u.dtype)
        if not return_state:
            return y
        return y, self._unpack_state(traj[:, -1], u.dtype)

    def _step(self, x_t, state=None):
        be = self.backend
        self._check_array(x_t, "x_t")
        self.spec.check_step_input(tuple(x_t.shape))
        batch = x_t.shape[0]
        if be.step_checks_finite and batch and not be.traced(x_t):
            self._check_finite(x_t, "x_t")
        u = self.project(x_t)
        compute = be.compute_dtype(u.dtype)
        h = self._pack_state(state, batch, compute)
        if h is None:
            h = be.zeros((batch, self.cell.state_size, self.hidden_size), u, compute)
        new = be.step_function(self.cell)(
            list(be.unstack(h, 1)), list(be.unstack(be.cast(u, compute), 1)),
            list(be.unstack(be.cast(self.recurrent, compute), 0)),
        )  # fmt: skip
        new = be.stack(list(new), 1)
        return be.cast(new[:, self.cell.output_index], u.dtype), self._unpack_state(new, u.dtype)
