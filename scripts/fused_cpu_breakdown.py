"""Where the time of a fused ParaGRU/ParaLSTM forward+backward on the CPU goes, piece by piece.

    .venv/bin/python scripts/fused_cpu_breakdown.py [--batch 4 --steps 2048 --size 256 --repeats 11]

Times, interleaved in one run (minimum over rounds, ms): the whole layer forward
and forward+backward of mean(y^2) (as pararnn-bench cells does), and its parts
alone: the projection's forward product and its two backward products (by the
route the layer takes, pararnn_torch.projection), the fused sweep and the
adjoint sweep (the C++ ops on the layer's own gates). What the parts do not add
up to is the layer's glue: input/output checks, the output selection and its
backward, the loss.
"""

from __future__ import annotations

import argparse

import torch

from pararnn_bench.timing import compare
from pararnn_torch import ParaGRU, ParaLSTM, fused
from pararnn_torch.projection import project_rows, uses_onednn


def pieces(cell: str, batch: int, steps: int, size: int) -> dict:
    torch.manual_seed(0)
    layer = {"gru": ParaGRU, "lstm": ParaLSTM}[cell](size, size, mode="fused")
    x = torch.randn(batch, steps, size, requires_grad=True)
    weight = layer.weight.detach().flatten(0, 1).flatten(1)
    reason = fused.fused_unavailable_reason(layer.cell, "cpu")  # builds and registers the cell's kernels
    if reason is not None:
        raise SystemExit(f"mode='fused' cannot run here: {reason}")
    key = fused.cell_key(layer.cell)
    with torch.no_grad():
        u = layer.project(x, add_bias=False).contiguous()
        args = (u, layer.recurrent.detach(), layer.bias.detach(), None, None)
        traj = torch.ops.pararnn.fused_forward(*args, key, 1, 0.0, 1.0)[0]
    grad = torch.randn_like(traj)
    rows = x.detach().reshape(-1, size).requires_grad_()
    flat_weight = weight.clone().requires_grad_()
    product = project_rows(rows, flat_weight)
    d_product = torch.randn_like(product)

    def layer_forward():
        with torch.no_grad():
            layer(x)

    def layer_forward_backward():
        layer(x).square().mean().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    def projection_forward():
        with torch.no_grad():
            project_rows(rows, flat_weight)

    def projection_backward():  # both products of the backward, through autograd as in the layer
        torch.autograd.grad(project_rows(rows, flat_weight), (rows, flat_weight), d_product)

    return {
        "layer fwd": layer_forward,
        "layer fwd+bwd": layer_forward_backward,
        "projection fwd": projection_forward,
        "projection fwd+bwd": projection_backward,
        "sweep": lambda: torch.ops.pararnn.fused_forward(*args, key, 1, 0.0, 1.0),
        "adjoint sweep": lambda: torch.ops.pararnn.fused_backward(*args, traj, grad, key),
    }, uses_onednn(batch * steps, x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    print(f"B={args.batch} T={args.steps} D=N={args.size} float32, {torch.get_num_threads()} threads; "
          f"min of {args.repeats} interleaved rounds, ms")
    for cell in ("gru", "lstm"):
        variants, onednn = pieces(cell, args.batch, args.steps, args.size)
        ms = {name: t.min_ms for name, t in compare(variants, repeats=args.repeats).items()}
        glue = ms["layer fwd+bwd"] - ms["projection fwd+bwd"] - ms["sweep"] - ms["adjoint sweep"]
        route = "oneDNN" if onednn else "matmul"
        print(f"Para{cell.upper()}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
              + f"; glue (fwd+bwd minus projection and sweeps) {glue:.2f}; projection by {route}")


if __name__ == "__main__":
    main()
