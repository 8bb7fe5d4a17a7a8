"""Newton solve of a whole trajectory and its adjoint, written once for every backend.

Arrays are lists: a trajectory is K arrays [B, T, N] (one per state component),
gates are G arrays [B, T, N], parameters P arrays [N], an initial state K
arrays [B, N] (or None for zeros), resets a bool array [B, T] (or None).
``ops`` is a backend's :class:`pararnn_core.ops.ArrayOps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from pararnn_core.cell import Cell, Fields
from pararnn_core.scan import block_scan, transpose_block
from pararnn_core.user_warnings import warn_at_caller


class NewtonConvergenceWarning(RuntimeWarning):
    pass


class NewtonConvergenceError(RuntimeError):
    pass


_ON_FAILURE = ("fallback", "warn", "raise")


@dataclass(frozen=True)
class NewtonConfig:
    """Settings of the parallel Newton solve.

    max_its: Newton iterations at most. Newton on this lower-triangular system
        fixes at least one more time step per iteration and converges
        quadratically near the solution; 3-4 iterations reach float32
        precision on trained and randomly initialised cells (paper, App. A).
        12 leaves room for saturated inputs.
    tol: stop when ``max |h - f(h_prev)|`` (the residual) is at most this.
        None picks by compute dtype: 1e-6 for float32 (and for bf16/fp16,
        computed in float32), 1e-10 for float64, a few hundred ulps of O(1)
        states after rounding through a length-T scan.
    damping: scale of each Newton update (1.0 = pure Newton). Values below 1
        can help very stiff cells at the price of more iterations.
    on_failure: what to do when the tolerance is not met after max_its:
        "fallback" (default) warns and recomputes with the exact sequential
        solve; "warn" warns and keeps the Newton result; "raise" raises
        :class:`NewtonConvergenceError`.
    chunk: time steps per chunk of the framework scan (None: about sqrt(T)).

    Which modes act on which field (a non-default field a mode would ignore is
    an error when that mode is asked for by name, a warning under ``auto``):
    ``parallel`` honours all; ``kernel`` all but ``chunk`` (the native scan
    has its own tiling); fused GPU kernels (CUDA, Metal) ``max_its``, ``tol``,
    ``damping`` and ``on_failure``. ``sequential`` and the fused CPU sweep
    solve the recurrence exactly, so no setting applies to them.
    """

    max_its: int = 12
    tol: float | None = None
    damping: float = 1.0
    on_failure: str = "fallback"
    chunk: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_its, int) or isinstance(self.max_its, bool) or self.max_its < 1:
            raise ValueError(f"NewtonConfig.max_its must be a positive int, got {self.max_its!r}")
        if self.tol is not None and not (self.tol > 0):
            raise ValueError(f"NewtonConfig.tol must be positive or None, got {self.tol!r}")
        if not (0 < self.damping <= 1):
            raise ValueError(f"NewtonConfig.damping must be in (0, 1], got {self.damping!r}")
        if self.on_failure not in _ON_FAILURE:
            raise ValueError(f"NewtonConfig.on_failure must be one of {_ON_FAILURE}, got {self.on_failure!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or isinstance(self.chunk, bool)
                                       or self.chunk < 1):
            raise ValueError(f"NewtonConfig.chunk must be a positive int or None, got {self.chunk!r}")

    def tolerance(self, itemsize: int) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-10 if itemsize >= 8 else 1e-6


@dataclass
class ScanPair:
    """Linear solvers for one Newton step (forward) and for the adjoint (reverse);
    None uses the chunked framework scan. Native kernels plug in here."""

    forward: Callable | None = None  # (A, b) -> h, h_t = A_t h_{t-1} + b_t
    reverse: Callable | None = None  # (A, b) -> lam, lam_t = A_t lam_{t+1} + b_t


@dataclass
class SolveInfo:
    """Diagnostics of the last solve (exposed as ``layer.last_solve``).

    ``iterations`` and ``residual`` (max abs ``h_t - f(h_{t-1}, u_t)`` at the end)
    are None where the mode computes none: the exact modes (``sequential``, the
    fused CPU sweep) and the fused Metal kernel inside a compiled graph, which
    cannot read its iteration counts back (``converged`` None there).
    ``exact`` marks solves that are exact by construction.
    """

    mode: str
    iterations: int | None = None
    residual: float | None = None
    converged: bool | None = True
    fell_back: bool = False
    residuals: list[float] = field(default_factory=list)
    exact: bool = False


# ----------------------------------------------------------------------------
# helpers shared by the solve and the adjoint


def step_fn(cell: Cell, ops):
    """``f(state_list, gate_list, param_list) -> state tuple`` for this backend."""

    def f(state, gates, params):
        return cell.step(ops, Fields(cell.state, state), Fields(cell.gates, gates), Fields(cell.param_names, params))

    return f


def step_and_jacobian(cell: Cell, ops, state, gates, params):
    """New state and its K x K Jacobian blocks w.r.t. ``state`` (closed form or forward-mode AD)."""
    out = cell.step_and_jacobian(
        ops, Fields(cell.state, state), Fields(cell.gates, gates), Fields(cell.param_names, params)
    )
    if out is not NotImplemented:
        new, jac = out
        return list(new), [list(row) for row in jac]
    f = step_fn(cell, ops)
    k = cell.state_size
    new, columns = None, []
    for j in range(k):
        tangent = [ops.ones_like(s) if i == j else ops.zeros_like(s) for i, s in enumerate(state)]
        new, col = ops.jvp(lambda *s: tuple(f(list(s), gates, params)), state, tangent)
        columns.append(col)
    return list(new), [[columns[j][i] for j in range(k)] for i in range(k)]


def previous_states(ops, traj, h0, resets):
    """h_{t-1} for every t: the trajectory shifted by one, h_0 at t = 1 and at resets."""
    prev = []
    for i, h in enumerate(traj):
        start = ops.expand_dims(h0[i], 1) if h0 is not None else ops.zeros_like(h[:, :1])
        shifted = ops.concat([start, h[:, :-1]], 1)
        if resets is not None:
            shifted = ops.where(ops.expand_dims(resets, -1), start, shifted)
        prev.append(shifted)
    return prev


def chain_mask(ops, resets, like):
    """1 where h_{t-1} comes from the trajectory, 0 where it is the given h_0 (t = 1, resets)."""
    ones = ops.ones_like(like[:, :, :1])
    mask = ops.concat([ops.zeros_like(ones[:, :1]), ones[:, 1:]], 1)
    if resets is not None:
        mask = ops.where(ops.expand_dims(resets, -1), ops.zeros_like(mask), mask)
    return mask


# ----------------------------------------------------------------------------


def sequential_solve(cell: Cell, ops, gates, params, h0, resets):
    """Reference loop over time; returns the trajectory stacked as [B, T, K, N]."""
    f = step_fn(cell, ops)
    T = gates[0].shape[1]
    zero = ops.zeros_like(gates[0][:, 0])
    start = list(h0) if h0 is not None else [zero] * cell.state_size
    state, outs = start, []
    # Split the gates once and broadcast the parameters to a step's shape once: slicing
    # step t in the loop, or reducing a broadcast parameter's cotangent at every step,
    # makes MLX's backward quadratic in T (memory and time)
    steps = [ops.unstack(g, 1) for g in gates]
    params = [p + zero for p in params]
    for t in range(T):
        if resets is not None and t > 0:
            r = ops.expand_dims(resets[:, t], -1)
            state = [ops.where(r, s0, s) for s0, s in zip(start, state)]
        state = list(f(state, [g[t] for g in steps], params))
        outs.append(ops.stack(state, 1))
    # one stack over time of per-step [B, K, N] states: stacking components and then time
    # separately made MLX's backward quadratic in T again
    return ops.stack(outs, 1)


def newton_solve(cell: Cell, ops, gates, params, h0, resets, config: NewtonConfig, scan=None):
    """Parallel Newton solve; returns (trajectory, SolveInfo).

    ``scan(A, b)`` solves the linear recurrence of one Newton step (default: the
    chunked framework scan); native kernels plug in here.
    """
    scan = scan or (lambda A, b: block_scan(ops, A, b, chunk=config.chunk))
    tol = config.tolerance(ops.itemsize(gates[0]))
    info = SolveInfo(mode="parallel")
    f = step_fn(cell, ops)
    traj = _initial_guess(cell, ops, gates, params, h0)
    mask = chain_mask(ops, resets, gates[0]) if resets is not None else None
    expect_converged = False
    for it in range(config.max_its + 1):
        prev = previous_states(ops, traj, h0, resets)
        # the Jacobian is skipped when this iterate is expected to pass the check
        if expect_converged or it == config.max_its:
            fval, jac = list(f(prev, gates, params)), None
        else:
            fval, jac = step_and_jacobian(cell, ops, prev, gates, params)
        diff = [fv - h for fv, h in zip(fval, traj)]
        res = max(ops.max_abs(d) for d in diff)
        info.residuals.append(res)
        if not math.isfinite(res):
            raise FloatingPointError(
                "Newton solve produced non-finite values (NaN/inf): check the input and the weights"
            )
        if res <= tol or it == config.max_its:
            info.iterations, info.residual, info.converged = it, res, res <= tol
            traj = fval
            break
        if jac is None:
            _, jac = step_and_jacobian(cell, ops, prev, gates, params)
        expect_converged = _newton_predicts_convergence(info.residuals, tol)
        traj = _newton_update(traj, jac, diff, mask, scan, config.damping)
    if not info.converged:
        report_nonconvergence(cell, info, config, tol)
        if config.on_failure == "fallback":
            traj = ops.unstack(sequential_solve(cell, ops, gates, params, h0, resets), 2)
            info.fell_back = True
    return traj, info


def _initial_guess(cell, ops, gates, params, h0):
    """h_t = f(h_0, u_t) for every t (zeros for h_0 when None)."""
    if h0 is not None:
        start = [ops.expand_dims(s, 1) for s in h0]
    else:
        start = [ops.zeros_like(gates[0][:, :1])] * cell.state_size
    return list(step_fn(cell, ops)(start, gates, params))


def _newton_update(traj, jac, diff, mask, scan, damping):
    """The Newton step h'_t = f_t + J_t (h'_{t-1} - h_{t-1}) as an update delta = h' - h:
    delta_t = J_t delta_{t-1} + (f_t - h_t). Where h_{t-1} is the given h_0 (t = 1 and
    resets) its delta is 0; at t = 1 the scan's zero start gives that, resets need J_t = 0."""
    if mask is not None:
        jac = [[a * mask for a in row] for row in jac]
    delta = scan(jac, diff)
    return [h + (d if damping == 1.0 else damping * d) for h, d in zip(traj, delta)]


def _newton_predicts_convergence(residuals, tol) -> bool:
    """Near the solution Newton's residual shrinks like r_next ~ C r^2; estimate C
    from the last two residuals and predict whether the next iterate meets tol."""
    if len(residuals) < 2 or residuals[-2] == 0:
        return False
    r = residuals[-1]
    rate = r / residuals[-2] ** 2
    return r < residuals[-2] and rate * r * r <= 0.1 * tol


def report_nonconvergence(cell, info, config, tol):
    """The failure policy of every Newton mode: raise, or warn at the user's line (the caller falls back
    to the sequential solve when ``config.on_failure == "fallback"``)."""
    msg = (
        f"Newton solve of cell {cell.name!r} did not reach tol={tol:g} in {config.max_its} iterations "
        f"(residual {info.residual:.3g}). Raise NewtonConfig.max_its, loosen tol, or use mode='sequential'."
    )
    if config.on_failure == "raise":
        raise NewtonConvergenceError(msg)
    suffix = " Falling back to the sequential solve." if config.on_failure == "fallback" else ""
    warn_at_caller(msg + suffix, NewtonConvergenceWarning)


# ----------------------------------------------------------------------------


def adjoint(cell: Cell, ops, gates, params, h0, resets, traj, grads, scan=None, chunk=None):
    """Gradients of a solved trajectory by the adjoint method (docs/design.md section 1).

    ``grads`` are dL/dh_t (K arrays [B, T, N]). Returns (d_gates, d_params,
    d_h0) with d_h0 None when h0 is None. ``scan(A, b)`` solves the reverse
    recurrence ``lam_t = A_t lam_{t+1} + b_t`` (default: chunked framework scan).
    """
    scan = scan or (lambda A, b: block_scan(ops, A, b, reverse=True, chunk=chunk))
    prev = previous_states(ops, traj, h0, resets)
    _, jac = step_and_jacobian(cell, ops, prev, gates, params)
    mask = chain_mask(ops, resets, gates[0]) if resets is not None else None
    if mask is not None:
        jac = [[a * mask for a in row] for row in jac]
    # lam_t = g_t + J_{t+1}^T lam_{t+1}: shift the Jacobians one step back in time (J_1 drops out)
    shifted = [[ops.concat([a[:, 1:], ops.zeros_like(a[:, :1])], 1) for a in row] for row in jac]
    lam = scan(transpose_block(shifted), list(grads))
    d_prev, d_gates, d_params = ops.vjp(step_fn(cell, ops), prev, gates, params, lam)
    d_h0 = None
    if h0 is not None:
        # d_prev at t = 1 and at resets flows into h_0; elsewhere it is already in lam
        if mask is None:
            d_h0 = [d[:, 0] for d in d_prev]
        else:
            d_h0 = [ops.sum(d * (1 - mask), axis=1) for d in d_prev]
    return d_gates, d_params, d_h0
