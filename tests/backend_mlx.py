"""The MLX side of tests/backends.py: the same methods as ``TorchBackend``, numpy in, numpy out."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import pararnn_mlx
from pararnn_mlx.ops import from_numpy


class MLXBackend:
    name = "mlx"
    # MLX's float64 exp/sigmoid are float32-accurate (exp: 1e-7 relative), so two
    # float64 paths through different implementations (mx ops vs the fused C++) agree to ~1e-8
    float64_cross_path_atol = 1e-7

    def __init__(self):
        self.lib = pararnn_mlx

    def dtype(self, name):
        return getattr(mx, name)

    def make_layer(self, cell, input_size, hidden_size, num_heads=1, mode="auto", dtype="float32", newton=None, seed=0):
        mx.random.seed(seed)
        return self.lib.ParaRNN(cell, input_size, hidden_size, num_heads, mode=mode, newton=newton,
                                dtype=self.dtype(dtype))

    def to_numpy(self, a):
        return np.array(a.astype(mx.float32) if a.dtype in (mx.bfloat16, mx.float16) else a)

    def params(self, layer):
        return {k: self.to_numpy(v) for k, v in layer.parameters().items()}

    def set_params(self, layer, params):
        layer.update({k: from_numpy(params[k]).astype(v.dtype) for k, v in layer.parameters().items()})

    def _state_parts(self, state, dtype):
        return tuple(from_numpy(s).astype(dtype) for s in state) if state is not None else ()

    @staticmethod
    def _as_state(parts):
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else tuple(parts)

    def _state_out(self, state):
        parts = (state,) if isinstance(state, mx.array) else state
        return tuple(self.to_numpy(p) for p in parts)

    def run(self, layer, x, state=None, resets=None, grads=False):
        """Forward (and gradients of sum(y**2) + sum(final_state**2)); numpy in, numpy out.

        Returns dict with y, state (tuple) and, when grads, d_x, d_<param>, d_state (tuple).
        """
        dtype = layer.weight.dtype
        xm = from_numpy(x).astype(dtype)
        parts = self._state_parts(state, dtype)
        rm = from_numpy(resets) if resets is not None else None

        def loss_fn(params, x, *state_parts):
            # parameters and state are arguments, so MLX differentiates with respect to them
            layer.update(params)
            y, final = layer(x, state=self._as_state(state_parts), resets=rm, return_state=True)
            finals = (final,) if isinstance(final, mx.array) else final
            loss = (y.astype(mx.float32) ** 2).sum() + sum((f.astype(mx.float32) ** 2).sum() for f in finals)
            return loss, y, final

        if not grads:
            _, y, final = loss_fn(layer.parameters(), xm, *parts)
            return {"y": self.to_numpy(y), "state": self._state_out(final)}
        value_and_grad = mx.value_and_grad(loss_fn, argnums=tuple(range(2 + len(parts))))
        (_, y, final), (d_params, d_x, *d_state) = value_and_grad(layer.parameters(), xm, *parts)
        out = {"y": self.to_numpy(y), "state": self._state_out(final), "d_x": self.to_numpy(d_x)}
        out.update({"d_" + k: self.to_numpy(v) for k, v in d_params.items()})
        if parts:
            out["d_state"] = tuple(self.to_numpy(d) for d in d_state)
        return out

    def step_loop(self, layer, x, state=None):
        dtype = layer.weight.dtype
        xm = from_numpy(x).astype(dtype)
        st = self._as_state(self._state_parts(state, dtype))
        ys = []
        for t in range(xm.shape[1]):
            y, st = layer.step(xm[:, t], st)
            ys.append(y)
        return self.to_numpy(mx.stack(ys, 1)), self._state_out(st)

    def set_mode(self, layer, mode):
        layer.mode = mode

    def last_solve(self, layer):
        return layer.last_solve

    def call_raw(self, layer, x=None, **kwargs):
        """Call the layer with raw (possibly malformed) numpy-ish arguments, for error tests."""
        conv = lambda a: from_numpy(a) if a is not None else None
        if isinstance(kwargs.get("state"), tuple):
            kwargs["state"] = tuple(conv(s) for s in kwargs["state"])
        elif "state" in kwargs:
            kwargs["state"] = conv(kwargs["state"])
        if "resets" in kwargs:
            kwargs["resets"] = conv(kwargs["resets"])
        return layer(conv(x), **kwargs)

    def gradient_penalty_grads(self, layer, x):
        """d/dx and d/dparams of sum((dL/dx)**2) with L = sum(y**2): a second-order gradient."""
        import mlx.nn as nn

        xm = from_numpy(x).astype(layer.weight.dtype)

        def penalty(model, x):
            g = mx.grad(lambda x: (model(x) ** 2).sum())(x)
            return (g**2).sum()

        _, d_params = nn.value_and_grad(layer, penalty)(layer, xm)
        d_x = mx.grad(lambda x: penalty(layer, x))(xm)
        return {"x": self.to_numpy(d_x), **{k: self.to_numpy(v) for k, v in d_params.items()}}

    def array(self, a):
        return from_numpy(np.asarray(a))

    def compiled_training_grads(self, layer, x):
        """Parameter gradients of the loss of ``run`` through mx.compile, as mlx-lm's training step runs them."""
        import mlx.nn as nn

        xm = from_numpy(x).astype(layer.weight.dtype)

        def loss(model, x):
            y, final = model(x, return_state=True)
            parts = (final,) if isinstance(final, mx.array) else final
            return (y**2).sum() + sum((p**2).sum() for p in parts)

        value_and_grad = nn.value_and_grad(layer, loss)
        # as mlx-lm's trainer: the model is captured state of the compiled step, not an argument
        step = mx.compile(lambda x: value_and_grad(layer, x), inputs=layer.state, outputs=layer.state)
        _, grads = step(xm)
        return {k: self.to_numpy(v) for k, v in grads.items()}
