"""Every fast mode vs the sequential loop on a long random sequence: errors, Newton
residuals, and the speed-up of forward+backward (the training workload).

    python -m pararnn_torch.demo [--length 2048] [--batch 4] [--size 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from pararnn_torch import ParaGRU, ParaLSTM
from pararnn_torch.modes import unavailable_modes


def forward_backward(layer, x):
    """Outputs and final state of one forward, and the seconds of forward+backward."""
    start = time.perf_counter()
    y, state = layer(x, return_state=True)
    y.square().mean().backward()
    elapsed = time.perf_counter() - start
    layer.zero_grad(set_to_none=True)
    detach = lambda s: tuple(p.detach() for p in s) if isinstance(s, tuple) else s.detach()
    return (y.detach(), detach(state)), elapsed


def check_layer(layer, x, mode, reference):
    (y_seq, s_seq), t_seq = reference
    layer.mode = mode
    with torch.no_grad():
        layer(x[:, :8])  # first use may compile a kernel: keep it out of the timing
    (y_par, s_par), t_par = forward_backward(layer, x)
    info = layer.last_solve
    finals = zip(s_par if isinstance(s_par, tuple) else (s_par,), s_seq if isinstance(s_seq, tuple) else (s_seq,))
    return {
        "mode": info.mode,
        "max_abs_err_y": (y_par - y_seq).abs().max().item(),
        "max_abs_err_state": max((a - b).abs().max().item() for a, b in finals),
        "iterations": info.iterations,
        "residuals": info.residuals,
        "t_seq": t_seq,
        "t_par": t_par,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.size)
    print(f"every fast mode vs the sequential loop, B={args.batch} T={args.length} D=N={args.size} "
          f"heads={args.heads}, float32; times are forward+backward")
    print(f"{'layer':<10}{'mode':<10}{'max|dy|':>10}{'max|dstate|':>13}{'its':>5}  {'residuals':<36}"
          f"{'seq s':>7}{'par s':>7}{'speed-up':>10}")
    worst = 0.0
    modes = [m for m in ("parallel", "kernel", "fused") if m not in unavailable_modes(x.device)]
    for cls in (ParaGRU, ParaLSTM):
        layer = cls(args.size, args.size, args.heads, mode="sequential")
        reference = forward_backward(layer, x)
        for mode in modes:
            r = check_layer(layer, x, mode, reference)
            worst = max(worst, r["max_abs_err_y"], r["max_abs_err_state"])
            residuals = " ".join(f"{v:.1e}" for v in r["residuals"]) or "(exact sweep)"
            iterations = "-" if r["iterations"] is None else r["iterations"]  # exact modes run no Newton
            print(f"{cls.__name__:<10}{r['mode']:<10}{r['max_abs_err_y']:>10.2e}{r['max_abs_err_state']:>13.2e}"
                  f"{iterations:>5}  {residuals:<36}{r['t_seq']:>7.2f}{r['t_par']:>7.2f}"
                  f"{r['t_seq'] / r['t_par']:>9.1f}x")
    status = "OK" if worst <= 1e-4 else "TOO LARGE"
    print(f"largest error {worst:.2e} (<= 1e-4 expected in float32): {status}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
