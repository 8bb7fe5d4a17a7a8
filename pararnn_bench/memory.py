"""``pararnn-bench memory``: peak training memory vs T, adjoint against backprop through the sequential loop.

One forward+backward of mean(y^2) per variant and T (after one warm-up call at
the same shape), peak memory above what was in use before the call. The
adjoint modes (fused, kernel, parallel) keep the gates and the trajectory; the
sequential mode, the compiled loop and torch.nn.GRU/LSTM are backpropagation
through time and keep every step's intermediates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pararnn_bench import backends as backend_registry
from pararnn_bench.peak_memory import peak_for
from pararnn_bench.report import Report, new_figure

ADJOINT_MODES = ("fused", "kernel", "parallel")


@dataclass
class Preset:
    steps: tuple[int, ...]
    batch: int
    size: int
    max_steps: dict = field(default_factory=dict)
    #: longest T per backend (every variant); MLX's CPU matmul in mlx[cpu] on Linux is slow (about 1 GFLOP/s)
    backend_max_steps: dict = field(default_factory=dict)


PRESETS = {
    "quick": Preset(steps=(256, 1024, 4096), batch=4, size=256,
                    max_steps={"sequential": 256, "compiled loop": 256, "kernel": 0},
                    backend_max_steps={"mlx-cpu": 1024}),
    "full": Preset(steps=tuple(2**k for k in range(8, 16)), batch=4, size=256,
                   max_steps={"sequential": 8192, "compiled loop": 4096}),
    "tiny": Preset(steps=(16, 64), batch=2, size=16, max_steps={"compiled loop": 0, "kernel": 0}),
}


def _variants(backend, layer, cell, size, preset, steps, loops):
    """(name, module, mode) of everything measured at this T."""
    out = [(mode, layer, mode) for mode in backend.modes(layer) if steps <= preset.max_steps.get(mode, 2**62)]
    out += [(name, peer, None) for name, peer in backend.peers(cell, size).items()]
    if steps <= preset.max_steps.get("compiled loop", 2**62):
        if cell not in loops:
            loops[cell] = backend.compiled_loop(layer, preset.batch)
        loop = loops[cell]
        if loop is not None:
            out.append(("compiled loop", loop, None))
    return out


def run(args, report: Report) -> int:
    preset = PRESETS[args.preset]
    rows = []
    for backend in backend_registry.present(args.backends):
        measure = peak_for(backend)
        if isinstance(measure, str):
            report.note(f"{backend.name}: not measured: {measure}")
            continue
        loops: dict = {}
        for cell in args.cells:
            layer = backend.layer(cell, preset.size)
            for steps in preset.steps:
                if steps > preset.backend_max_steps.get(backend.name, 2**62):
                    continue
                x = backend.input(preset.batch, steps, preset.size)
                for name, module, mode in _variants(backend, layer, cell, preset.size, preset, steps, loops):
                    report.console.print(f"[dim]{backend.name} {cell} {name} T={steps} ...[/dim]")
                    fn = backend.run(module, x, mode, backward=True)
                    fn()  # warm-up: kernels built, compiled, loaded
                    peak = measure(fn)
                    rows.append({"backend": backend.name, "cell": cell, "variant": name, "batch": preset.batch,
                                 "steps": steps, "size": preset.size, "peak_bytes": peak,
                                 "method": "adjoint" if name in ADJOINT_MODES else "backprop through time"})
    report.record("peak_training_memory", rows)
    _table_and_plot(report, rows, preset)
    return 0


def _table_and_plot(report: Report, rows: list[dict], preset: Preset):
    groups = {}
    for r in rows:
        groups.setdefault((r["backend"], r["cell"]), {}).setdefault(r["variant"], {})[r["steps"]] = r["peak_bytes"]
    if not groups:
        return
    for (backend, cell), variants in groups.items():
        steps = sorted({t for v in variants.values() for t in v})
        report.table(f"{backend} Para{cell.upper()}: peak training memory (MB), B={preset.batch} D=N={preset.size}",
                     ["variant", *(f"T={t}" for t in steps)],
                     [[name, *(v[t] / 1e6 if t in v else None for t in steps)] for name, v in variants.items()])
    fig, axes = new_figure(1, len(groups), f"peak training memory vs T (forward+backward), B={preset.batch}, "
                           f"D=N={preset.size}, float32")
    for col, ((backend, cell), variants) in enumerate(groups.items()):
        ax = axes[0][col]
        for name, by_t in variants.items():
            style = "-" if name in ADJOINT_MODES else "--"
            ax.loglog(list(by_t), [max(b, 1) / 1e6 for b in by_t.values()], style, marker="o", label=name)
        ax.set_title(f"{backend} Para{cell.upper()} (solid: adjoint, dashed: BPTT)", fontsize=8)
        ax.set_xlabel("T")
        ax.set_ylabel("MB")
        ax.legend(fontsize=7)
    fig.tight_layout()
    report.plot("memory_vs_T", fig)
