"""MLX ParaGRU / ParaLSTM forward+backward: every available mode side by side on MLX's default device.

    python -m bench.bench_mlx                    # B=4, T=2048, D=N=256, float32
    python -m bench.bench_mlx --length 512 --repeats 3 --cells gru

Prints two tables per cell (median of interleaved repeats; speed-up = sequential
time / mode time): the whole layer, and the recurrence alone (gates u given,
gradients for u and the recurrent parameters), which is the part the modes
differ in; the layer adds the input projection, one matmul that every mode
shares (slow on Linux: the mlx[cpu] matmul runs far below numpy's here).
Writes bench/results/mlx.json and mlx_<cell>.png. On Linux this is the CPU
device of ``mlx[cpu]``; on a Mac, the GPU.
"""

from __future__ import annotations

import mlx.core as mx

from bench.timing import compare, layer_bench_parser, machine_description, print_table, save_bar_plot, save_json
from pararnn_mlx import ParaGRU, ParaLSTM
from pararnn_mlx.modes import run_mode, unavailable_modes

CELLS = {"gru": ParaGRU, "lstm": ParaLSTM}


def fwd_bwd(layer, x, mode):
    """Forward, mean(y**2), gradients for x and every parameter, all evaluated."""

    def loss(params, x):
        layer.update(params)
        return mx.mean(layer(x) ** 2)

    grad_fn = mx.value_and_grad(loss, argnums=(0, 1))

    def run():
        layer.mode = mode
        value, grads = grad_fn(layer.trainable_parameters(), x)
        mx.eval(value, grads)

    return run


def recurrence_fwd_bwd(layer, u, mode):
    """The solve alone: gates u [B, T, G, N] to the trajectory, gradients for u and the recurrent parameters."""

    def loss(u, recurrent):
        traj, _ = run_mode(mode, layer.cell, u, recurrent, None, None, layer.newton)
        return mx.mean(traj**2)

    grad_fn = mx.value_and_grad(loss, argnums=(0, 1))

    def run():
        value, grads = grad_fn(u, layer.recurrent)
        mx.eval(value, grads)

    return run


def main(argv=None):
    ap = layer_bench_parser(__doc__, CELLS, repeats=3, out="bench/results")
    args = ap.parse_args(argv)

    mx.random.seed(0)
    x = mx.random.normal((args.batch, args.length, args.size))
    missing = unavailable_modes()
    modes = [m for m in args.modes if m not in missing]
    if "sequential" not in modes:
        ap.error("the sequential mode is the baseline of the table; keep it in --modes")
    print(f"machine: {machine_description()}, mlx {mx.__version__}, device {mx.default_device()}")
    print(f"B={args.batch} T={args.length} D=N={args.size} float32, forward+backward")
    for m in args.modes:
        if m in missing:
            print(f"(mode {m!r} skipped: {missing[m]})")
    payload = {"machine": machine_description(), "device": str(mx.default_device()), "args": vars(args),
               "results": {}}
    for cell in args.cells:
        layer = CELLS[cell](args.size, args.size)
        where = f"B={args.batch} T={args.length} N={args.size}, forward+backward on {mx.default_device()}"
        results = compare({m: fwd_bwd(layer, x, m) for m in modes}, repeats=args.repeats)
        title = f"MLX {cell} layer: {where}"
        print_table(results, baseline="sequential", title=title)
        save_bar_plot(f"{args.out}/mlx_{cell}.png", results, title)
        u = layer.project(x)
        mx.eval(u)
        solve = compare({m: recurrence_fwd_bwd(layer, u, m) for m in modes}, repeats=args.repeats)
        print_table(solve, baseline="sequential", title=f"MLX {cell} recurrence only: {where}")
        payload["results"][cell] = {"layer": results, "recurrence": solve}
    save_json(f"{args.out}/mlx.json", payload)


if __name__ == "__main__":
    main()
