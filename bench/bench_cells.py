"""ParaGRU / ParaLSTM forward+backward on the CPU, every mode beside torch.nn.GRU / LSTM.

    python -m bench.bench_cells                 # B=4, T=2048, D=N=256, float32
    python -m bench.bench_cells --length 512 --repeats 3 --modes parallel sequential

Prints a table per cell (median of interleaved repeats, speed-ups against the
sequential reference loop) and writes bench/results/cells.json and cells.png.
"""

from __future__ import annotations

import torch

from bench.timing import compare, layer_bench_parser, machine_description, print_table, save_bar_plot, save_json
from pararnn_torch import ParaGRU, ParaLSTM
from pararnn_torch.modes import unavailable_modes

CELLS = {"gru": (ParaGRU, torch.nn.GRU), "lstm": (ParaLSTM, torch.nn.LSTM)}


def fwd_bwd(module, x, mode=None):
    def run():
        if mode is not None:
            module.mode = mode
        out = module(x)
        y = out[0] if isinstance(out, tuple) else out
        y.square().mean().backward()
        x.grad = None
        module.zero_grad(set_to_none=True)

    return run


def main(argv=None):
    ap = layer_bench_parser(__doc__, CELLS, repeats=5, out="bench/results")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.size, requires_grad=True)
    missing = unavailable_modes(x.device)
    modes = [m for m in args.modes if m not in missing]
    skipped = [m for m in args.modes if m in missing]
    print(f"machine: {machine_description()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"B={args.batch} T={args.length} D=N={args.size} float32, forward+backward")
    for m in skipped:
        print(f"(mode {m!r} skipped: {missing[m]})")
    payload = {"machine": machine_description(), "args": vars(args), "results": {}}
    for cell in args.cells:
        layer_cls, reference_cls = CELLS[cell]
        layer = layer_cls(args.size, args.size)
        reference = reference_cls(args.size, args.size, batch_first=True)
        variants = {f"Para{cell.upper()} {m}": fwd_bwd(layer, x, m) for m in modes}
        variants[f"torch.nn.{cell.upper()}"] = fwd_bwd(reference, x)
        results = compare(variants, repeats=args.repeats)
        baseline = f"Para{cell.upper()} sequential" if "sequential" in modes else None
        print_table(results, baseline=baseline, title=f"{cell}: forward+backward")
        ref = results[f"torch.nn.{cell.upper()}"].median_ms
        for name, t in results.items():
            if name.startswith("Para"):
                print(f"  {name}: {ref / t.median_ms:.2f}x faster than torch.nn.{cell.upper()}")
        layer.mode = "parallel"
        layer(x)
        info = layer.last_solve
        print(f"  Newton iterations (parallel): {info.iterations}, residual {info.residual:.2e}")
        payload["results"][cell] = results
        save_bar_plot(f"{args.out}/cells_{cell}.png", results,
                      f"{cell} fwd+bwd, B={args.batch} T={args.length} N={args.size} ({machine_description()})")
    save_json(f"{args.out}/cells.json", payload)


if __name__ == "__main__":
    main()
