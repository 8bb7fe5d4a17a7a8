"""The native kernels and every solver mode on this machine's devices, against the references, with speed.

    python -m pararnn_torch.selftest [--json PATH] [--no-timing] [--max-steps T]
    python -m pararnn_torch.selftest --sanitizer-cases     # tiny runs of every CUDA kernel (compute-sanitizer)

Stages, each reported on its own (a failing stage does not hide the others):

- ``scan``: the native scan kernel against the framework scan (CPU, and CUDA when present);
- ``layers``: every mode (parallel, kernel, fused) of ParaGRU, ParaLSTM and a cell defined here (so on CUDA
  its fused kernels come from NVRTC), float32 and bfloat16, forward and the gradients of the input, the
  initial state and every parameter, against ``sequential``; on CUDA up to T = 65,536, where the reference
  is the exact fused CPU sweep in float64 (itself checked against ``sequential`` at the shorter lengths);
- ``timing`` (CUDA): one table of forward and forward+backward times per mode and cuDNN's torch.nn.GRU/LSTM
  at B=8, N=1024, T=512..16,384, and the achieved bandwidth of each fused kernel against the device's peak.

Exits non-zero when a kernel that runs disagrees with its reference; says what it could not run and why.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch

from pararnn_core.cell import Cell, Normal
from pararnn_core.scan import block_scan
from pararnn_torch import _ext
from pararnn_torch.layer import ParaRNN
from pararnn_torch.ops import ops

# (B, T, K, N): T = 1, T not a multiple of any chunk, T over several GPU tiles, a large case for speed
CASES = [(1, 1, 1, 3), (2, 77, 2, 33), (3, 3001, 1, 20), (2, 2500, 2, 16)]
SPEED_CASE = (4, 8192, 1, 256)
MODES = ("parallel", "kernel", "fused")
LAYER_STEPS = {"cuda": (1, 300, 4096, 65536), "cpu": (1, 300)}
#: above this length the reference is the exact fused CPU sweep in float64 instead of the sequential loop
EXACT_REFERENCE_ABOVE = 4096
TIMING_MODES = ("sequential", "parallel", "kernel", "fused")
TIMING_STEPS = (512, 2048, 8192, 16384)
TIMING_BATCH, TIMING_WIDTH = 8, 1024
#: a mode slower than this (s, forward+backward) at some T is not timed at longer T
TIMING_BUDGET_S = 3.0


class SelftestCell(Cell):
    """A user cell (not built in): K = 2 with softplus and exp, so CUDA compiles its fused kernels with NVRTC."""

    name = "selftest_user_cell"
    gates = ("i", "c", "o")
    state = ("r", "h")
    params = {"a": Normal(0.2), "b": Normal(0.2), "d": Normal(0.2)}

    def step(self, ops, s, u, p):
        keep = ops.exp(-ops.softplus(u.i + p.a * s.h))
        r = keep * s.r + (1 - keep) * ops.tanh(u.c + p.b * s.r)
        return r, ops.sigmoid(u.o + p.d * r) * ops.tanh(r)


USER_CELL = SelftestCell()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- scan ---------------------------------------------------------------------------------------------


def _scan_reference(A, b, h0, reverse):
    K = b.shape[2]
    A_nested = [[A[:, :, i, j].double() for j in range(K)] for i in range(K)]
    b_list = [b[:, :, i].double().clone() for i in range(K)]
    if h0 is not None:
        edge = -1 if reverse else 0
        for i in range(K):
            b_list[i][:, edge] += sum(A_nested[i][j][:, edge] * h0[:, j].double() for j in range(K))
    return torch.stack(block_scan(ops, A_nested, b_list, reverse=reverse), 2)


def _scan_inputs(B, T, K, N, dtype, device, generator):
    A = (torch.rand(B, T, K, K, N, generator=generator, dtype=torch.float64) * 1.8 - 0.9) / K
    b = torch.randn(B, T, K, N, generator=generator, dtype=torch.float64)
    h0 = torch.randn(B, K, N, generator=generator, dtype=torch.float64)
    return A.to(device, dtype), b.to(device, dtype), h0.to(device, dtype)


def check_scan(device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    rows, ok = [], True
    print(f"\n[{device}] scan kernel vs framework scan (max abs error; tolerance scales with sqrt(T))")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for B, T, K, N in CASES:
            for reverse in (False, True):
                A, b, h0 = _scan_inputs(B, T, K, N, dtype, device, generator)
                got = torch.ops.pararnn.scan(A, b, h0, reverse).double().cpu()
                want = _scan_reference(A.cpu(), b.cpu(), h0.cpu(), reverse)
                err = float((got - want).abs().max())
                eps = torch.finfo(dtype).eps
                scale = 1 + float(want.abs().max())
                tol = 64 * eps * max(1.0, T**0.5) if dtype != torch.bfloat16 else 4 * eps * scale
                passed = err <= tol
                ok &= passed
                rows.append(dict(dtype=str(dtype), B=B, T=T, K=K, N=N, reverse=reverse, error=err, ok=passed))
                print(f"  {str(dtype):15} B={B} T={T:5} K={K} N={N:3} reverse={reverse!s:5}  err {err:.2e}  "
                      f"{'ok' if passed else 'FAIL'}")
    B, T, K, N = SPEED_CASE
    A, b, _ = _scan_inputs(B, T, K, N, torch.float32, device, generator)
    out = torch.empty_like(b)
    kernel_s = _time(lambda: torch.ops.pararnn.scan.out(A, b, None, False, out=out), device, 0.5)
    framework_s = _time(lambda: block_scan(ops, [[A[:, :, 0, 0]]], [b[:, :, 0]]), device, 0.5)
    moved = (A.numel() + 2 * b.numel()) * 4
    print(f"  speed B={B} T={T} K={K} N={N} float32: kernel {kernel_s * 1e3:.2f} ms "
          f"({moved / kernel_s / 1e9:.1f} GB/s), framework scan {framework_s * 1e3:.2f} ms, "
          f"{framework_s / kernel_s:.1f}x")
    return dict(ok=ok, cases=rows, speed=dict(kernel_s=kernel_s, framework_s=framework_s,
                                              kernel_GBps=moved / kernel_s / 1e9))


# ---- layers -------------------------------------------------------------------------------------------


def _layer_run(layer, x, state, resets):
    """Output, final state and the gradients of x, the state and every parameter, as float64 on the CPU."""
    x = x.clone().requires_grad_()
    state = [s.clone().requires_grad_() for s in state]
    y, final = layer(x, state=state[0] if len(state) == 1 else tuple(state), resets=resets, return_state=True)
    final = (final,) if isinstance(final, torch.Tensor) else final
    weights = torch.linspace(-1, 1, y.shape[-1], device=y.device, dtype=y.dtype)
    loss = (y * weights).float().sum() + sum(f.float().square().sum() for f in final)
    grads = torch.autograd.grad(loss, [x, *state, *layer.parameters()])
    names = ["y", *[f"final_{i}" for i in range(len(final))], "d_x", *[f"d_state_{i}" for i in range(len(state))]]
    names += [f"d_{n}" for n, _ in layer.named_parameters()]
    return dict(zip(names, [t.detach().double().cpu() for t in (y, *final, *grads)]))


def _relative_errors(got: dict, want: dict) -> dict:
    return {k: float((got[k] - want[k]).abs().max() / (want[k].abs().max() + 1e-6)) for k in want}


def _layer_case(cell, device, dtype, steps, batch=2, width=32, seed=0):
    torch.manual_seed(seed)
    reference = ParaRNN(cell, width, width, mode="sequential", device=device, dtype=dtype)
    x = torch.randn(batch, steps, width, device=device, dtype=dtype)
    state = [0.5 * torch.randn(batch, width, device=device, dtype=dtype) for _ in range(reference.cell.state_size)]
    resets = torch.rand(batch, steps, device=device) < 0.02
    return reference, x, state, resets


def check_layers(device: str, max_steps: int) -> dict:
    """Every mode at layer level against the sequential reference (or the exact CPU sweep at the longest T)."""
    lengths = [t for t in LAYER_STEPS[torch.device(device).type] if t <= max_steps]
    dtypes = (torch.float32, torch.bfloat16)
    tolerance = {torch.float32: 2e-3, torch.bfloat16: 6e-2}
    rows, ok = [], True
    print(f"\n[{device}] layer modes vs reference (max relative error over the output, final state and every gradient)")
    for cell in ("gru", "lstm", USER_CELL):
        cell_name = getattr(cell, "name", cell)
        for dtype in dtypes:
            for steps in lengths:
                reference, x, state, resets = _layer_case(cell, device, dtype, steps)
                # a Python loop over 65,536 steps per check would take minutes: the exact CPU sweep instead
                if steps > EXACT_REFERENCE_ABOVE:
                    ref_layer = ParaRNN(cell, 32, 32, mode="fused", dtype=torch.float64)
                    ref_layer.load_state_dict({k: v.double().cpu() for k, v in reference.state_dict().items()})
                    want = _layer_run(ref_layer, x.double().cpu(), [s.double().cpu() for s in state], resets.cpu())
                    reference_name = "fused CPU float64"
                else:
                    want = _layer_run(reference, x, state, resets)
                    reference_name = "sequential"
                for mode in MODES:
                    layer = ParaRNN(cell, 32, 32, mode=mode, device=device, dtype=dtype)
                    layer.load_state_dict(reference.state_dict())
                    row = dict(cell=cell_name, dtype=str(dtype).removeprefix("torch."), T=steps, mode=mode,
                               reference=reference_name)
                    try:
                        start = time.perf_counter()
                        got = _layer_run(layer, x, state, resets)
                        _sync(device)
                        row["seconds"] = time.perf_counter() - start
                    except (RuntimeError, ValueError) as error:
                        row.update(status="unavailable", reason=str(error).splitlines()[0])
                        print(f"  {cell_name:20} {row['dtype']:8} T={steps:6} {mode:9} unavailable: {row['reason']}")
                        rows.append(row)
                        continue
                    errors = _relative_errors(got, want)
                    worst = max(errors, key=errors.get)
                    info = getattr(layer, "last_solve", None)
                    row.update(max_error=errors[worst], worst=worst, errors=errors,
                               iterations=getattr(info, "iterations", None), residual=getattr(info, "residual", None))
                    passed = math.isfinite(errors[worst]) and errors[worst] <= tolerance[dtype]
                    row["status"] = "ok" if passed else "FAIL"
                    ok &= passed
                    rows.append(row)
                    print(f"  {cell_name:20} {row['dtype']:8} T={steps:6} {mode:9} err {errors[worst]:.1e} ({worst}) "
                          f"its {row['iterations']}  {row['status']}")
    return dict(ok=ok, cases=rows)


# ---- timing -------------------------------------------------------------------------------------------


def _time(fn, device, budget_s: float, max_repeats: int = 10) -> float:
    """Seconds per call: one warm-up, then repeats filling about budget_s (a call slower than that: itself)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    if first >= budget_s:
        return first
    repeats = max(1, min(max_repeats, int(budget_s / max(first, 1e-6))))
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _cudnn(cell_name, width, device):
    module = torch.nn.GRU if cell_name == "gru" else torch.nn.LSTM
    return module(width, width, batch_first=True, device=device)


def _timed_pair(forward, parameters, device):
    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        out = forward()
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        for p in parameters:
            p.grad = None

    fwd_s = _time(fwd, device, 0.5)
    return fwd_s, _time(fwd_bwd, device, 0.5)


def timing_table(device: str) -> dict:
    rows = []
    print(f"\n[{device}] time per call (ms), B={TIMING_BATCH}, N={TIMING_WIDTH}, float32: forward / forward+backward")
    header = f"  {'cell':5} {'T':>6} " + " ".join(f"{m:>17}" for m in (*TIMING_MODES, "cudnn"))
    print(header)
    for cell_name in ("gru", "lstm"):
        over_budget: dict[str, int] = {}
        for steps in TIMING_STEPS:
            x = torch.randn(TIMING_BATCH, steps, TIMING_WIDTH, device=device)
            cells = []
            for mode in (*TIMING_MODES, "cudnn"):
                row = dict(cell=cell_name, T=steps, mode=mode)
                if mode in over_budget:
                    row["skipped"] = f"over {TIMING_BUDGET_S:.0f} s at T={over_budget[mode]}"
                    cells.append(f"{'skipped':>17}")
                    rows.append(row)
                    continue
                try:
                    if mode == "cudnn":
                        module = _cudnn(cell_name, TIMING_WIDTH, device)
                        forward = lambda m=module: m(x)[0]  # noqa: B023
                    else:
                        module = ParaRNN(cell_name, TIMING_WIDTH, TIMING_WIDTH, mode=mode, device=device)
                        forward = lambda m=module: m(x)  # noqa: B023
                    fwd_s, both_s = _timed_pair(forward, list(module.parameters()), device)
                except (RuntimeError, ValueError) as error:
                    row["error"] = str(error).splitlines()[0]
                    cells.append(f"{'error':>17}")
                    rows.append(row)
                    continue
                row.update(forward_ms=fwd_s * 1e3, forward_backward_ms=both_s * 1e3)
                if both_s > TIMING_BUDGET_S:
                    over_budget[mode] = steps
                cells.append(f"{fwd_s * 1e3:8.1f}/{both_s * 1e3:8.1f}")
                rows.append(row)
                del module
            print(f"  {cell_name:5} {steps:6} " + " ".join(cells))
            torch.cuda.empty_cache()
    return dict(rows=rows, batch=TIMING_BATCH, width=TIMING_WIDTH, steps=list(TIMING_STEPS))


def peak_bandwidth_GBps(device) -> float | None:
    """Theoretical DRAM bandwidth: 2 transfers per memory clock x bus width (None when the device won't say)."""
    if torch.device(device).type != "cuda":
        return None
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if not (clock_khz and bus_bits):
        try:
            from cuda.bindings import runtime

            _, clock_khz = runtime.cudaDeviceGetAttribute(runtime.cudaDeviceAttr.cudaDevAttrMemoryClockRate, index)
            _, bus_bits = runtime.cudaDeviceGetAttribute(runtime.cudaDeviceAttr.cudaDevAttrGlobalMemoryBusWidth,
                                                         index)
        except Exception:  # cuda-bindings missing or too old: no peak figure
            return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def fused_bandwidth(device: str) -> dict:
    """Achieved bandwidth of the fused forward and adjoint kernels (minimum bytes moved / time)."""
    from pararnn_torch.fused import cell_key, fused_unavailable_reason

    peak = peak_bandwidth_GBps(device)
    rows = []
    B, N, T = TIMING_BATCH, TIMING_WIDTH, TIMING_STEPS[-1]
    print(f"\n[{device}] fused kernels, B={B}, N={N}, T={T}, float32 (peak DRAM bandwidth "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown'})")
    for cell in ("gru", "lstm", USER_CELL):
        from pararnn_core.cell import get_cell

        cell = get_cell(cell)
        reason = fused_unavailable_reason(cell, device)
        if reason is not None:
            rows.append(dict(cell=cell.name, unavailable=reason))
            print(f"  {cell.name:20} unavailable: {reason}")
            continue
        key, K, G, P = cell_key(cell), cell.state_size, cell.num_gates, len(cell.params)
        u = torch.randn(B, T, G, N, device=device)
        rec = 0.5 * torch.randn(P, N, device=device)
        bias = torch.zeros(G, N, device=device)
        traj, its, _ = torch.ops.pararnn.fused_forward(u, rec, bias, None, None, key, 12, 1e-6, 1.0)
        grad = torch.randn_like(traj)
        forward_s = _time(lambda: torch.ops.pararnn.fused_forward(u, rec, bias, None, None, key, 12, 1e-6, 1.0),  # noqa: B023
                          device, 0.5, 20)
        adjoint_s = _time(lambda: torch.ops.pararnn.fused_backward(u, rec, bias, None, None, traj, grad, key),  # noqa: B023
                          device, 0.5, 20)
        forward_bytes = B * T * N * (G + K) * 4
        adjoint_bytes = B * T * N * (2 * G + 2 * K) * 4
        for kernel, seconds, moved in (("forward", forward_s, forward_bytes), ("adjoint", adjoint_s, adjoint_bytes)):
            achieved = moved / seconds / 1e9
            rows.append(dict(cell=cell.name, kernel=kernel, ms=seconds * 1e3, bytes=moved, GBps=achieved,
                             peak_GBps=peak, fraction_of_peak=achieved / peak if peak else None,
                             newton_iterations=int(its.max()) if kernel == "forward" else None))
            share = f" = {100 * achieved / peak:.0f}% of peak" if peak else ""
            print(f"  {cell.name:20} {kernel:8} {seconds * 1e3:8.2f} ms  {achieved:7.0f} GB/s{share}"
                  + (f"  (Newton iterations {int(its.max())})" if kernel == "forward" else ""))
    return dict(rows=rows, peak_GBps=peak)


# ---- sanitizer cases ----------------------------------------------------------------------------------


def sanitizer_cases() -> int:
    """Tiny runs of every CUDA kernel: the scan (K = 1..4, both directions, every dtype) and the fused forward
    and adjoint of every built-in cell and the user cell (every dtype, h0 and resets, T over one tile)."""
    from pararnn_core.cell import get_cell
    from pararnn_torch.fused import cell_key, fused_unavailable_reason

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        for K in (1, 2, 3, 4):
            for reverse in (False, True):
                A, b, h0 = _scan_inputs(2, 70, K, 40, dtype, device, generator)
                torch.ops.pararnn.scan(A, b, h0, reverse)
    missing = []
    for cell in ("gru", "lstm", "mgu", USER_CELL):
        cell = get_cell(cell)
        reason = fused_unavailable_reason(cell, device)
        if reason is not None:
            missing.append(f"{cell.name}: {reason}")
            continue
        key = cell_key(cell)
        for dtype in dtypes:
            B, T, N = 2, 70, 40
            u = torch.randn(B, T, cell.num_gates, N, generator=generator).to(device, dtype)
            rec = (0.5 * torch.randn(len(cell.params), N, generator=generator)).to(device, dtype)
            bias = torch.randn(cell.num_gates, N, generator=generator).to(device, dtype)
            h0 = torch.randn(B, cell.state_size, N, generator=generator).to(device, dtype)
            resets = (torch.rand(B, T, generator=generator) < 0.1).to(device)
            traj, _, _ = torch.ops.pararnn.fused_forward(u, rec, bias, h0, resets, key, 12, 1e-6, 1.0)
            torch.ops.pararnn.fused_backward(u, rec, bias, h0, resets, traj, torch.ones_like(traj), key)
            torch.ops.pararnn.fused_forward(u, rec, None, None, None, key, 12, 1e-6, 1.0)
    torch.cuda.synchronize()
    for line in missing:  # the selftest stage fails on these; here they only narrow what the sanitizer saw
        print(f"sanitizer cases: fused kernels not run for {line}")
    print("sanitizer cases: done")
    return 0


# ---- main ---------------------------------------------------------------------------------------------


def _stage(results: dict, name: str, fn, *args) -> bool:
    """Run one stage; an exception fails that stage only."""
    try:
        results[name] = fn(*args)
        return results[name].get("ok", True)
    except Exception as error:  # report and go on: every stage is reported independently
        traceback.print_exc()
        results[name] = dict(ok=False, error=f"{type(error).__name__}: {error}")
        print(f"\n{name}: FAILED with {type(error).__name__}: {error}")
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pararnn_torch.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table and bandwidth figures")
    parser.add_argument("--max-steps", type=int, default=65536, help="longest sequence of the layer checks")
    parser.add_argument("--sanitizer-cases", action="store_true", help="only run tiny cases of every CUDA kernel")
    args = parser.parse_args(argv)
    if args.sanitizer_cases:
        return sanitizer_cases()
    results: dict = dict(torch=torch.__version__, cuda_build=torch.version.cuda)
    print(f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}")
    reason = _ext.missing_reason("cpu")
    if reason is not None:
        print(f"native extension unavailable: {reason}")
        return 1
    ok = _stage(results, "scan_cpu", check_scan, "cpu")
    ok &= _stage(results, "layers_cpu", check_layers, "cpu", args.max_steps)
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name()
        cuda_reason = _ext.missing_reason("cuda")
        if cuda_reason is None:
            print(f"\nCUDA device: {results['device']}")
            ok &= _stage(results, "scan_cuda", check_scan, "cuda")
        else:
            results["scan_cuda"] = dict(ok=False, error=cuda_reason)
            print(f"\nCUDA device present but the CUDA kernels are not available: {cuda_reason}")
            ok = False
        ok &= _stage(results, "layers_cuda", check_layers, "cuda", args.max_steps)
        if not args.no_timing:
            _stage(results, "timing_cuda", timing_table, "cuda")
            _stage(results, "bandwidth_cuda", fused_bandwidth, "cuda")
    else:
        print("\nno CUDA device here: the CUDA kernels were not run (tests/test_emulation.py runs them emulated)")
    results["ok"] = bool(ok)
    if args.json:
        from pathlib import Path

        from pararnn_core.codegen.sources import write_atomic

        write_atomic(Path(args.json), json.dumps(results, indent=1, default=str))
    print("\nselftest:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
