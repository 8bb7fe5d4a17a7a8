"""Side-by-side timing: every variant measured in the same run, interleaved, as medians.

Machines are noisy, so benchmarks compare ratios measured in one run rather than
absolute numbers across runs. Each variant is a zero-argument callable that
finishes its work before returning (call ``torch.cuda.synchronize()`` or
``mx.eval`` inside it where needed).

    from bench.timing import compare, print_table
    results = compare({"parallel": run_parallel, "sequential": run_sequential}, repeats=5)
    print_table(results, baseline="sequential")
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Timing:
    name: str
    median_ms: float
    min_ms: float
    samples_ms: list[float]


def compare(variants: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Run each variant ``warmup`` times, then ``repeats`` rounds interleaving the variants."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: Timing(name, statistics.median(s), min(s), s) for name, s in samples.items()
    }


def print_table(results: dict[str, Timing], baseline: str | None = None, title: str | None = None, file=None):
    """Print medians and, against ``baseline``, speed-ups (baseline time / variant time)."""
    file = file or sys.stdout
    if title:
        print(f"\n{title}", file=file)
    width = max(len(n) for n in results) + 2
    header = f"{'variant':<{width}} {'median ms':>10} {'min ms':>10}"
    if baseline:
        header += f" {'speed-up vs ' + baseline:>24}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for name, t in results.items():
        line = f"{name:<{width}} {t.median_ms:>10.1f} {t.min_ms:>10.1f}"
        if baseline:
            line += f" {results[baseline].median_ms / t.median_ms:>23.2f}x"
        print(line, file=file)


def layer_bench_parser(doc: str, cells, repeats: int, out: str, with_modes: bool = True) -> argparse.ArgumentParser:
    """The flags every layer benchmark takes (sizes default to the issues' B=4, T=2048, D=N=256)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--size", type=int, default=256, help="input size = hidden size")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--cells", nargs="+", default=list(cells), choices=list(cells))
    if with_modes:
        ap.add_argument("--modes", nargs="+", default=["sequential", "parallel", "kernel", "fused"])
    ap.add_argument("--out", default=out)
    return ap


def machine_description() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def save_json(path: str, payload: dict):
    """Write results atomically (temporary name, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: asdict(o) if isinstance(o, Timing) else str(o))
    os.replace(tmp, path)


def save_bar_plot(path: str, results: dict[str, Timing], title: str):
    """A horizontal bar chart of the medians (PNG), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    values = [results[n].median_ms for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
    ax.barh(names, values, color="#4a7ebb")
    ax.invert_yaxis()
    ax.set_xlabel("median time (ms), lower is better")
    ax.set_title(title, fontsize=10)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
