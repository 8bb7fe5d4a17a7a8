"""Fused CPU kernels against torch.nn.GRU / LSTM and the memory/matmul floor, measured side by side.

    python -m bench.bench_fused                    # B=4, T=2048, D=N=256, float32
    python -m bench.bench_fused --length 512 --repeats 3

The floor of a forward+backward is what any implementation must pay: the
input-projection matmul three times (forward, dx, dW) plus one read-and-write
pass over the gates [B, T, G*N]. Prints a table per cell with the ratios the
fused mode is judged by, and writes bench/results/fused.json and fused.png.
"""

from __future__ import annotations

import torch

from bench.bench_cells import fwd_bwd
from bench.timing import Timing, compare, layer_bench_parser, machine_description, print_table, save_bar_plot, save_json
from pararnn_torch import ParaGRU, ParaLSTM

CELLS = {"gru": (ParaGRU, torch.nn.GRU), "lstm": (ParaLSTM, torch.nn.LSTM)}


def forward_only(module, x):
    def run():
        with torch.no_grad():
            module(x)

    return run


def measure_cell(name, batch, length, size, repeats):
    para_cls, torch_cls = CELLS[name]
    torch.manual_seed(0)
    fused = para_cls(size, size, mode="fused")
    reference = torch_cls(size, size, batch_first=True)
    gates = fused.cell.num_gates
    x = torch.randn(batch, length, size, requires_grad=True)
    rows = x.detach().reshape(-1, size)
    weight = torch.randn(size, gates * size) / size**0.5
    gates_buffer = torch.randn(batch * length, gates * size)
    copy_target = torch.empty_like(gates_buffer)
    variants = {
        f"fused Para{name.upper()} fwd+bwd": fwd_bwd(fused, x),
        f"torch.nn.{name.upper()} fwd+bwd": fwd_bwd(reference, x),
        f"fused Para{name.upper()} fwd": forward_only(fused, x),
        "projection matmul": lambda: torch.matmul(rows, weight),
        f"pass over [B,T,{gates}N]": lambda: copy_target.copy_(gates_buffer),
    }
    results = compare(variants, repeats=repeats)
    names = list(variants)
    floor_ms = 3 * results["projection matmul"].median_ms + results[names[4]].median_ms
    results["floor (3 matmul + pass)"] = Timing("floor (3 matmul + pass)", floor_ms, floor_ms, [floor_ms])
    fused_fb, torch_fb, fused_fwd = (results[n].median_ms for n in names[:3])
    ratios = {
        "fused fwd+bwd / floor": fused_fb / floor_ms,
        f"torch.nn.{name.upper()} / fused (speed-up)": torch_fb / fused_fb,
        "fused fwd / projection matmul": fused_fwd / results["projection matmul"].median_ms,
    }
    return results, ratios


def main(argv=None):
    ap = layer_bench_parser(__doc__, CELLS, repeats=5, out="bench/results/fused", with_modes=False)
    args = ap.parse_args(argv)
    print(f"{machine_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"B={args.batch}, T={args.length}, D=N={args.size}, float32, median of {args.repeats} interleaved runs")
    payload, plotted = {"machine": machine_description(), "args": vars(args)}, {}
    for name in args.cells:
        results, ratios = measure_cell(name, args.batch, args.length, args.size, args.repeats)
        print_table(results, baseline=f"torch.nn.{name.upper()} fwd+bwd", title=f"== {name} ==")
        for label, value in ratios.items():
            print(f"  {label:<40} {value:6.2f}")
        payload[name] = {"timings": results, "ratios": ratios}
        plotted.update({f"{name}: {k}": v for k, v in results.items()})
    save_json(f"{args.out}.json", payload)
    save_bar_plot(f"{args.out}.png", plotted, f"fused CPU kernels vs torch.nn, {machine_description()}")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
