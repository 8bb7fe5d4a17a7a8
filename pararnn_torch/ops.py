"""PyTorch implementation of :class:`pararnn_core.ops.ArrayOps`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pararnn_core.ops import ArrayOps


class TorchOps(ArrayOps):
    sigmoid = staticmethod(torch.sigmoid)
    tanh = staticmethod(torch.tanh)
    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    softplus = staticmethod(F.softplus)
    silu = staticmethod(F.silu)
    zeros_like = staticmethod(torch.zeros_like)
    ones_like = staticmethod(torch.ones_like)
    where = staticmethod(torch.where)

    def stack(self, xs, axis):
        return torch.stack(xs, axis)

    def concat(self, xs, axis):
        return torch.cat(xs, axis)

    def unstack(self, x, axis):
        return list(x.unbind(axis))

    def expand_dims(self, x, axis):
        return x.unsqueeze(axis)

    def sum(self, x, axis):
        return x.sum(axis)

    def pad_time(self, x, n):
        pad = x.new_zeros((x.shape[0], n) + tuple(x.shape[2:]))
        return torch.cat([x, pad], 1)

    def max_abs(self, x) -> float:
        return float(x.detach().abs().max()) if x.numel() else 0.0

    def itemsize(self, x) -> int:
        return x.element_size()

    def jvp(self, fn, primals, tangents):
        return torch.func.jvp(fn, tuple(primals), tuple(tangents))

    def vjp(self, fn, state, gates, params, cotangents):
        with torch.enable_grad():
            state = [s.detach().requires_grad_() for s in state]
            gates = [g.detach().requires_grad_() for g in gates]
            params = [p.detach().requires_grad_() for p in params]
            out = fn(state, gates, params)
            grads = torch.autograd.grad(out, state + gates + params, cotangents, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, state + gates + params)]
        k, g = len(state), len(gates)
        return grads[:k], grads[k : k + g], grads[k + g :]


ops = TorchOps()
