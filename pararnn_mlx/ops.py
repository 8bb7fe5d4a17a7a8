"""MLX implementation of :class:`pararnn_core.ops.ArrayOps`."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pararnn_core.ops import ArrayOps


class MLXOps(ArrayOps):
    sigmoid = staticmethod(mx.sigmoid)
    tanh = staticmethod(mx.tanh)
    exp = staticmethod(mx.exp)
    log = staticmethod(mx.log)
    softplus = staticmethod(nn.softplus)
    silu = staticmethod(nn.silu)
    zeros_like = staticmethod(mx.zeros_like)
    ones_like = staticmethod(mx.ones_like)
    where = staticmethod(mx.where)

    def stack(self, xs, axis):
        return mx.stack(xs, axis)

    def concat(self, xs, axis):
        return mx.concatenate(xs, axis)

    def unstack(self, x, axis):
        return [mx.squeeze(part, axis) for part in mx.split(x, x.shape[axis], axis)]

    def expand_dims(self, x, axis):
        return mx.expand_dims(x, axis)

    def sum(self, x, axis):
        return mx.sum(x, axis)

    def pad_time(self, x, n):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, n)
        return mx.pad(x, widths)

    def max_abs(self, x) -> float:
        # evaluates the lazy graph: Newton's early stop needs the number
        return float(mx.max(mx.abs(x))) if x.size else 0.0

    def itemsize(self, x) -> int:
        return x.itemsize

    def jvp(self, fn, primals, tangents):
        outputs, derivatives = mx.jvp(lambda *args: list(fn(*args)), list(primals), list(tangents))
        return tuple(outputs), tuple(derivatives)

    def vjp(self, fn, state, gates, params, cotangents):
        k, g = len(state), len(gates)

        def flat(*args):
            args = list(args)
            return list(fn(args[:k], args[k : k + g], args[k + g :]))

        # mx.vjp sums over broadcast dimensions, so parameter gradients come back as [N]
        _, grads = mx.vjp(flat, list(state) + list(gates) + list(params), list(cotangents))
        return list(grads[:k]), list(grads[k : k + g]), list(grads[k + g :])


def from_numpy(a) -> mx.array:
    """numpy (or array-like) to MLX keeping float64 (``mx.array`` alone narrows it to float32)."""
    a = np.asarray(a)
    return mx.array(a, dtype=mx.float64) if a.dtype == np.float64 else mx.array(a)


ops = MLXOps()
