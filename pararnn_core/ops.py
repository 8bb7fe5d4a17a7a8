"""The array namespace that cells and solvers are written against.

Each backend implements :class:`ArrayOps` once (pararnn_torch.ops, pararnn_mlx.ops);
cells use only the nonlinearities (``sigmoid``, ``tanh``, ``exp``, ``log``,
``softplus``, ``silu``) and arithmetic operators, so they also run on numpy
arrays and on sympy symbols (see :class:`NumpyOps`, ``pararnn_core.codegen``).
"""

from __future__ import annotations

import numpy as np


class ArrayOps:
    """Backend adapter. Arrays are batch-first; ``axis`` is the axis index."""

    # -- nonlinearities available to cells --------------------------------
    def sigmoid(self, x):
        raise NotImplementedError

    def tanh(self, x):
        raise NotImplementedError

    def exp(self, x):
        raise NotImplementedError

    def log(self, x):
        raise NotImplementedError

    def softplus(self, x):
        raise NotImplementedError

    def silu(self, x):
        return x * self.sigmoid(x)

    # -- array plumbing used by the solvers --------------------------------
    def zeros_like(self, x):
        raise NotImplementedError

    def ones_like(self, x):
        raise NotImplementedError

    def stack(self, xs, axis):
        raise NotImplementedError

    def concat(self, xs, axis):
        raise NotImplementedError

    def unstack(self, x, axis):
        """The slices of x along ``axis``, as a list (the inverse of ``stack``)."""
        raise NotImplementedError

    def expand_dims(self, x, axis):
        raise NotImplementedError

    def where(self, cond, a, b):
        raise NotImplementedError

    def sum(self, x, axis):
        raise NotImplementedError

    def pad_time(self, x, n):
        """Append n zero steps along axis 1."""
        raise NotImplementedError

    def max_abs(self, x) -> float:
        raise NotImplementedError

    def itemsize(self, x) -> int:
        raise NotImplementedError

    # -- differentiation ----------------------------------------------------
    def jvp(self, fn, primals, tangents):
        """Forward-mode derivative of ``fn(*primals)`` (a tuple) along ``tangents``."""
        raise NotImplementedError

    def vjp(self, fn, state, gates, params, cotangents):
        """Reverse-mode derivative of ``fn(state, gates, params)`` (a tuple of K
        arrays) against ``cotangents``; returns (d_state, d_gates, d_params) as
        lists, each d_param reduced to its parameter's shape."""
        raise NotImplementedError


class NumpyOps(ArrayOps):
    """numpy evaluation of cells (references in tests, code-generation checks)."""

    def sigmoid(self, x):
        return 1.0 / (1.0 + np.exp(-x))

    def tanh(self, x):
        return np.tanh(x)

    def exp(self, x):
        return np.exp(x)

    def log(self, x):
        return np.log(x)

    def softplus(self, x):
        return np.logaddexp(0.0, x)

    def zeros_like(self, x):
        return np.zeros_like(x)

    def ones_like(self, x):
        return np.ones_like(x)

    def stack(self, xs, axis):
        return np.stack(xs, axis)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis)

    def unstack(self, x, axis):
        return list(np.moveaxis(x, axis, 0))

    def expand_dims(self, x, axis):
        return np.expand_dims(x, axis)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def sum(self, x, axis):
        return np.sum(x, axis=axis)

    def pad_time(self, x, n):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, n)
        return np.pad(x, widths)

    def max_abs(self, x) -> float:
        return float(np.max(np.abs(x))) if x.size else 0.0

    def itemsize(self, x) -> int:
        return x.dtype.itemsize
