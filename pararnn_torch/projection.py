"""The input projection's matrix product, routed to the fastest fp32 kernel torch has for it on this CPU.

On x86-64 CPUs with AVX-512, torch's dense fp32 matmul (MKL sgemm) may run
its AVX2 code (it does on AMD EPYC: 87 GFLOP/s a core on the development VM),
while oneDNN, which torch also ships, uses AVX-512 whatever the vendor. torch
reaches oneDNN for fp32 through its convolutions, so a product rows [R, D] x
[D, M] is written as a 1x1 convolution over an image of R pixels in the
channels-last layout: the input, the output and both backward products
(convolution_backward) are the same bytes as the matmul's, with no copy.
Measured on that VM (B*T=8192, D=256, M=768, 2 cores): forward 8.1 vs 18.5 ms,
forward+backward 30 vs 55 ms, equal to float32 rounding.

Small products keep the matmul: oneDNN re-lays the weight out at every call,
which only pays once there are about a thousand rows (measured at D=1024:
7.6 ms vs 0.26 ms at one row, 96 vs 165 ms at 4096 rows).
"""

from __future__ import annotations

import platform
from functools import lru_cache

import torch
import torch.nn.functional as F

#: fewest rows for which the convolution route beats the matmul (see the module docstring)
MIN_ONEDNN_ROWS = 1024


@lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this process's CPU and torch build favour oneDNN's fp32 convolution over the dense matmul."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def uses_onednn(rows: int, x: torch.Tensor) -> bool:
    """Whether :func:`project_rows` takes the oneDNN route for ``rows`` rows of ``x``."""
    return (
        rows >= MIN_ONEDNN_ROWS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()  # a traced graph (torch.compile, export) keeps the plain matmul
        and not torch.jit.is_tracing()
        and onednn_available()
    )


def _image(rows: torch.Tensor) -> torch.Tensor:
    """rows [R, C] as the image [1, C, R, 1] with channels-last strides (a view)."""
    return rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)


def _filters(weight: torch.Tensor) -> torch.Tensor:
    """weight [D, M] as the 1x1 filters [M, D, 1, 1]."""
    return weight.t().reshape(weight.shape[1], weight.shape[0], 1, 1)


def onednn_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [R, D] x weight [D, M] as a 1x1 channels-last convolution (differentiable in both)."""
    out = F.conv2d(_image(rows), _filters(weight))  # [1, M, R, 1], channels-last
    return out.permute(0, 2, 3, 1).reshape(rows.shape[0], weight.shape[1])


def onednn_backward_products(rows: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, mask: list[bool]):
    """The backward of :func:`onednn_product` for output gradient grad [R, M]: (d_rows image or None,
    d_weight filters or None) as ``mask`` = [rows?, weight?] asks (what autograd runs, callable alone)."""
    d_image, d_filters, _ = torch.ops.aten.convolution_backward(
        _image(grad), _image(rows), _filters(weight), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [*mask, False])
    return d_image, d_filters


def project_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., D] x weight [D, M] -> [..., M] by the faster route for this shape and device."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not uses_onednn(rows, x):
        return torch.matmul(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    return onednn_product(flat, weight).view(*x.shape[:-1], weight.shape[1])
