"""The backends a run measures (torch CPU/CUDA, MLX CPU/GPU) behind one small interface.

Each backend builds ParaGRU/ParaLSTM layers and inputs, lists the modes that
run on it, and turns (layer, input, mode) into a timed closure that has
finished (synchronised) when it returns, for the forward alone or
forward+backward. The physical floor's two ingredients, a matmul and a copy,
are timed with the backend's own ops. Only torch has the peers (torch.nn.GRU /
LSTM and a torch.compile'd sequential loop of the same cell).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

MODES = ("fused", "kernel", "parallel", "sequential")
CELLS = ("gru", "lstm")


class TorchBackend:
    framework = "torch"

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def layer(self, cell: str, size: int):
        from pararnn_torch import ParaGRU, ParaLSTM

        self.torch.manual_seed(0)
        return {"gru": ParaGRU, "lstm": ParaLSTM}[cell](size, size, device=self.device)

    def input(self, batch: int, steps: int, size: int, requires_grad: bool = True):
        self.torch.manual_seed(1)
        return self.torch.randn(batch, steps, size, device=self.device, requires_grad=requires_grad)

    def modes(self, layer) -> list[str]:
        from pararnn_torch.modes import unavailable_modes

        missing = unavailable_modes(self.device, layer.cell)
        return [m for m in MODES if m not in missing]

    def run(self, module, x, mode: str | None, backward: bool) -> Callable[[], None]:
        """A closure: forward (no autograd graph) or forward + backward of mean(y^2) through ``module``."""
        torch = self.torch

        # variants share one layer, so each closure sets its own mode when it runs
        def use_mode():
            if mode is not None:
                module.mode = mode

        def forward():
            use_mode()
            with torch.no_grad():
                module(x)
            self.sync()

        def forward_backward():
            use_mode()
            out = module(x)
            y = out[0] if isinstance(out, tuple) else out
            y.square().mean().backward()
            x.grad = None
            module.zero_grad(set_to_none=True)
            self.sync()

        return forward_backward if backward else forward

    def peers(self, cell: str, size: int) -> dict:
        """torch.nn.GRU / LSTM (batch-first) of the same size."""
        cls = {"gru": self.torch.nn.GRU, "lstm": self.torch.nn.LSTM}[cell]
        self.torch.manual_seed(0)
        return {f"torch.nn.{cell.upper()}": cls(size, size, batch_first=True, device=self.device)}

    def compiled_loop(self, layer, batch: int):
        """A module running ``layer``'s own cell as a Python loop over time of a torch.compile'd step."""
        from pararnn_bench.compiled_loop import CompiledLoop

        return CompiledLoop(layer, batch)

    def floor_parts(self, batch: int, steps: int, size: int, gates: int) -> dict[str, Callable[[], None]]:
        """The projection's three products, each by every fp32 route torch has here, and one copy of the gates.

        Products: forward rows [B*T, D] x W [D, G*N], dx = du W^T, dW = rows^T du. Routes: the dense
        matmul, and oneDNN (a 1x1 channels-last convolution and its backward, pararnn_torch.projection)
        where this CPU favours it. The floor takes the fastest route of each product.
        """
        torch = self.torch
        from pararnn_torch.projection import onednn_available, onednn_backward_products, onednn_product

        rows = torch.randn(batch * steps, size, device=self.device)
        weight = torch.randn(size, gates * size, device=self.device)
        grad = torch.randn(batch * steps, gates * size, device=self.device)
        target = torch.empty_like(grad)
        product = torch.empty_like(grad)
        d_rows = torch.empty_like(rows)
        d_weight = torch.empty_like(weight)
        parts = {
            "forward@matmul": lambda: torch.matmul(rows, weight, out=product),
            "dx@matmul": lambda: torch.matmul(grad, weight.t(), out=d_rows),
            "dw@matmul": lambda: torch.matmul(rows.t(), grad, out=d_weight),
            "copy": lambda: target.copy_(grad),
        }
        if self.device.type == "cpu" and onednn_available():
            parts["forward@onednn"] = lambda: onednn_product(rows, weight)
            parts["dx@onednn"] = lambda: onednn_backward_products(rows, weight, grad, [True, False])
            parts["dw@onednn"] = lambda: onednn_backward_products(rows, weight, grad, [False, True])

        def synced(fn):
            def run():
                fn()
                self.sync()

            return run

        return {name: synced(fn) for name, fn in parts.items()}


class MLXBackend:
    framework = "mlx"

    def __init__(self, device: str):
        import mlx.core as mx

        self.mx = mx
        self.device = mx.Device(mx.gpu if device == "gpu" else mx.cpu)
        self.name = f"mlx-{device}"

    def sync(self):
        pass  # every closure ends in mx.eval

    def layer(self, cell: str, size: int):
        from pararnn_mlx import ParaGRU, ParaLSTM

        self.mx.random.seed(0)
        self.mx.set_default_device(self.device)
        layer = {"gru": ParaGRU, "lstm": ParaLSTM}[cell](size, size)
        self.mx.eval(layer.parameters())
        return layer

    def input(self, batch: int, steps: int, size: int, requires_grad: bool = True):
        self.mx.random.seed(1)
        self.mx.set_default_device(self.device)
        x = self.mx.random.normal((batch, steps, size))
        self.mx.eval(x)
        return x

    def modes(self, layer) -> list[str]:
        from pararnn_mlx.modes import unavailable_modes

        missing = unavailable_modes(self.device, layer.cell)
        return [m for m in MODES if m not in missing]

    def run(self, layer, x, mode: str | None, backward: bool) -> Callable[[], None]:
        mx = self.mx

        def loss(params, x):
            layer.update(params)
            return mx.mean(layer(x) ** 2)

        grad_fn = mx.value_and_grad(loss, argnums=(0, 1))

        # the layers pick their kernels by MLX's default device, so each closure sets it
        def forward():
            mx.set_default_device(self.device)
            layer.mode = mode
            mx.eval(layer(x))

        def forward_backward():
            mx.set_default_device(self.device)
            layer.mode = mode
            value, grads = grad_fn(layer.trainable_parameters(), x)
            mx.eval(value, grads)

        return forward_backward if backward else forward

    def peers(self, cell: str, size: int) -> dict:
        return {}

    def compiled_loop(self, layer, batch: int):
        return None

    def floor_parts(self, batch: int, steps: int, size: int, gates: int) -> dict[str, Callable[[], None]]:
        mx = self.mx
        mx.set_default_device(self.device)
        rows = mx.random.normal((batch * steps, size))
        weight = mx.random.normal((size, gates * size))
        source = mx.random.normal((batch * steps, gates * size))
        mx.eval(rows, weight, source)

        def matmul():
            mx.set_default_device(self.device)
            mx.eval(rows @ weight)

        def copy():
            mx.set_default_device(self.device)
            mx.eval(source + 0)  # an elementwise op: reads once, writes once

        # the backward products have the forward's cost here (no separate route is timed)
        return {"forward@matmul": matmul, "copy": copy}


def present(selected: list[str] | None = None) -> list:
    """The backends installed and usable here (or those named in ``selected``)."""
    found = {}
    if importlib.util.find_spec("torch") is not None:
        import torch

        found["torch-cpu"] = lambda: TorchBackend("cpu")
        if torch.cuda.is_available():
            found["torch-cuda"] = lambda: TorchBackend("cuda")
    if importlib.util.find_spec("mlx") is not None:
        import mlx.core as mx

        found["mlx-cpu"] = lambda: MLXBackend("cpu")
        if mx.metal.is_available():
            found["mlx-gpu"] = lambda: MLXBackend("gpu")
    if selected:
        unknown = [name for name in selected if name not in found]
        if unknown:
            raise ValueError(
                f"backend(s) {', '.join(unknown)} not available here; available: {', '.join(found) or 'none'} "
                f"(install torch and/or mlx to get more)"
            )
        return [found[name]() for name in selected]
    return [make() for make in found.values()]
