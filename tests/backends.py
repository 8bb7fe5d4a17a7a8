"""One adapter per framework so every layer test is written once and run on each backend.

Tests speak numpy: parameters, inputs, states and gradients go in and come out
as numpy arrays (float64 where the layer is float64), so cases can compare
backends with each other and with references written from the equations.
"""

from __future__ import annotations

import importlib.util

import numpy as np

HAVE_MLX = importlib.util.find_spec("mlx") is not None


class TorchBackend:
    name = "torch"
    float64_cross_path_atol = 1e-10

    def __init__(self):
        import torch

        import pararnn_torch

        self.torch = torch
        self.lib = pararnn_torch

    def dtype(self, name):
        return getattr(self.torch, name)

    def make_layer(self, cell, input_size, hidden_size, num_heads=1, mode="auto", dtype="float32", newton=None, seed=0):
        self.torch.manual_seed(seed)
        return self.lib.ParaRNN(cell, input_size, hidden_size, num_heads, mode=mode, newton=newton,
                                dtype=self.dtype(dtype))

    def to_numpy(self, t):
        t = t.detach()
        return (t.float() if t.dtype in (self.torch.bfloat16, self.torch.float16) else t).numpy()

    def params(self, layer):
        return {k: self.to_numpy(v) for k, v in layer.named_parameters()}

    def set_params(self, layer, params):
        with self.torch.no_grad():
            for k, v in layer.named_parameters():
                v.copy_(self.torch.as_tensor(np.asarray(params[k])))

    def _state_in(self, state, dtype):
        if state is None:
            return None
        parts = tuple(self.torch.tensor(s, dtype=dtype) for s in state)
        return parts[0] if len(parts) == 1 else parts

    def _state_out(self, state):
        parts = (state,) if isinstance(state, self.torch.Tensor) else state
        return tuple(self.to_numpy(p) for p in parts)

    def run(self, layer, x, state=None, resets=None, grads=False):
        """Forward (and gradients of sum(y**2) + sum(final_state**2)); numpy in, numpy out.

        Returns dict with y, state (tuple) and, when grads, d_x, d_<param>, d_state (tuple).
        """
        torch = self.torch
        dtype = layer.weight.dtype
        xt = torch.tensor(np.asarray(x), dtype=dtype, requires_grad=grads)
        st = self._state_in(state, dtype)
        if grads and st is not None:
            st = tuple(s.requires_grad_() for s in (st if isinstance(st, tuple) else (st,)))
            st = st[0] if len(st) == 1 else st
        rt = torch.tensor(np.asarray(resets)) if resets is not None else None
        layer.zero_grad()
        y, final = layer(xt, state=st, resets=rt, return_state=True)
        out = {"y": self.to_numpy(y), "state": self._state_out(final)}
        if grads:
            parts = (final,) if isinstance(final, torch.Tensor) else final
            loss = (y.float() ** 2).sum() + sum((p.float() ** 2).sum() for p in parts)
            loss.backward()
            out["d_x"] = self.to_numpy(xt.grad)
            for k, v in layer.named_parameters():
                out["d_" + k] = self.to_numpy(v.grad)
            if st is not None:
                sparts = st if isinstance(st, tuple) else (st,)
                out["d_state"] = tuple(self.to_numpy(s.grad) for s in sparts)
        return out

    def step_loop(self, layer, x, state=None):
        torch = self.torch
        dtype = layer.weight.dtype
        xt = torch.tensor(np.asarray(x), dtype=dtype)
        st = self._state_in(state, dtype)
        ys = []
        with torch.no_grad():
            for t in range(xt.shape[1]):
                y, st = layer.step(xt[:, t], st)
                ys.append(y)
        return self.to_numpy(torch.stack(ys, 1)), self._state_out(st)

    def set_mode(self, layer, mode):
        layer.mode = mode

    def last_solve(self, layer):
        return layer.last_solve

    def call_raw(self, layer, x=None, **kwargs):
        """Call the layer with raw (possibly malformed) numpy-ish arguments, for error tests."""
        torch = self.torch
        conv = lambda a: torch.as_tensor(np.asarray(a)) if a is not None and not isinstance(a, tuple) else a
        if isinstance(kwargs.get("state"), tuple):
            kwargs["state"] = tuple(torch.as_tensor(np.asarray(s)) for s in kwargs["state"])
        kwargs = {k: conv(v) if k in ("state", "resets") else v for k, v in kwargs.items()}
        return layer(conv(x), **kwargs)


    def gradient_penalty_grads(self, layer, x):
        """d/dx and d/dparams of sum((dL/dx)**2) with L = sum(y**2): a second-order gradient."""
        torch = self.torch
        xt = torch.tensor(np.asarray(x), dtype=layer.weight.dtype, requires_grad=True)
        (g,) = torch.autograd.grad((layer(xt) ** 2).sum(), xt, create_graph=True)
        grads = torch.autograd.grad((g**2).sum(), [xt, *layer.parameters()])
        names = ["x"] + [k for k, _ in layer.named_parameters()]
        return {n: self.to_numpy(v) for n, v in zip(names, grads)}

    def array(self, a):
        return self.torch.as_tensor(np.asarray(a))

    def compiled_training_grads(self, layer, x):
        """Parameter gradients of the loss of ``run`` through the framework's compiler (torch.compile)."""
        xt = self.torch.tensor(np.asarray(x), dtype=layer.weight.dtype)
        layer.zero_grad()

        def loss(x):
            y, final = layer(x, return_state=True)
            parts = (final,) if isinstance(final, self.torch.Tensor) else final
            return (y**2).sum() + sum((p**2).sum() for p in parts)

        compiled = self.torch.compile(loss, backend="eager")
        compiled(xt).backward()
        return {k: self.to_numpy(v.grad) for k, v in layer.named_parameters()}


def available_backends():
    names = ["torch"]
    if HAVE_MLX:
        names.append("mlx")
    return names


def get_backend(name):
    if name == "torch":
        return TorchBackend()
    if name == "mlx":
        from tests.backend_mlx import MLXBackend

        return MLXBackend()
    raise ValueError(name)
