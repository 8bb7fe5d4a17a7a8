"""Native scan kernel on the CPU: memory bandwidth of the op, and mode='kernel' against 'parallel'.

    python -m bench.bench_scan                     # both parts, defaults of the issue
    python -m bench.bench_scan --part bandwidth --length 8192 --sequences 1024
    python -m bench.bench_scan --part layers --length 2048 --hidden 256 --repeats 5

bandwidth: torch.ops.pararnn.scan (K = 1, float32, B*N = 1024 sequences of T
steps) against a large torch copy, both counted as bytes read + written and
measured interleaved in the same run; prints both GB/s figures and the ratio.
The op is timed twice: into a preallocated output (scan.out, what the
bandwidth criterion compares) and allocating its output (the plain op, which
also pays the page faults of fresh memory).

layers: ParaGRU / ParaLSTM forward + backward in modes parallel and kernel,
side by side. Writes bench/results/scan.json.
"""

from __future__ import annotations

import argparse

import torch

from bench.timing import compare, machine_description, print_table, save_json
from pararnn_torch import ParaGRU, ParaLSTM
from pararnn_torch.kernels import scan


def bandwidth(length: int, sequences: int, repeats: int) -> dict:
    batch, channels = 4, sequences // 4
    A = torch.rand(batch, length, 1, 1, channels) * 0.9
    b = torch.randn(batch, length, 1, channels)
    h = torch.empty_like(b)
    scan_bytes = (A.numel() + b.numel() + h.numel()) * 4
    src = torch.randn(scan_bytes // 8)  # a copy moving as many bytes (read + write) as the scan
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * 4
    results = compare(
        {
            "torch copy_": lambda: dst.copy_(src),
            "scan.out": lambda: torch.ops.pararnn.scan.out(A, b, None, False, out=h),
            "scan (allocating)": lambda: scan(A, b),
        },
        repeats=repeats,
    )
    print_table(results, title=f"scan bandwidth: T={length}, B*N={sequences}, K=1, float32 ({scan_bytes / 1e6:.0f} MB)")
    gbs = {
        "torch copy_": copy_bytes / results["torch copy_"].median_ms / 1e6,
        "scan.out": scan_bytes / results["scan.out"].median_ms / 1e6,
        "scan (allocating)": scan_bytes / results["scan (allocating)"].median_ms / 1e6,
    }
    for name, value in gbs.items():
        print(f"  {name:<18} {value:6.2f} GB/s  ({value / gbs['torch copy_']:.2f} of copy)")
    print(f"bandwidth ratio scan.out / copy = {gbs['scan.out'] / gbs['torch copy_']:.2f} (criterion: >= 0.5)")
    return {"timings": results, "gb_per_s": gbs}


def layers(length: int, hidden: int, batch: int, repeats: int) -> dict:
    out = {}
    for name, cls in (("ParaGRU", ParaGRU), ("ParaLSTM", ParaLSTM)):
        torch.manual_seed(0)
        layer = cls(hidden, hidden)
        x = torch.randn(batch, length, hidden, requires_grad=True)

        def run(mode, layer=layer, x=x):
            def fn():
                layer.mode = mode
                layer(x).square().mean().backward()
                x.grad = None
                layer.zero_grad(set_to_none=True)

            return fn

        results = compare({"parallel": run("parallel"), "kernel": run("kernel")}, repeats=repeats)
        print_table(
            results, baseline="parallel", title=f"{name} forward+backward, B={batch}, T={length}, N={hidden}, float32"
        )
        out[name] = results
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "bandwidth", "layers"], default="all")
    parser.add_argument("--length", type=int, default=None, help="T (default 8192 bandwidth, 2048 layers)")
    parser.add_argument("--sequences", type=int, default=1024, help="B*N of the bandwidth test")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    payload = {"machine": machine_description()}
    if args.part in ("all", "bandwidth"):
        payload["bandwidth"] = bandwidth(args.length or 8192, args.sequences, args.repeats)
    if args.part in ("all", "layers"):
        payload["layers"] = layers(args.length or 2048, args.hidden, args.batch, max(3, args.repeats // 2))
    save_json("bench/results/scan.json", payload)


if __name__ == "__main__":
    main()
