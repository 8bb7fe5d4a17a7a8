"""``pararnn-bench newton``: Newton residual vs iteration and the iterations needed (torch, parallel solve).

For each cell, weights (random initialisation, and briefly trained on a
synthetic task: predict a decaying running sum of the input), dtype and T, the
parallel Newton solve runs a fixed number of iterations and records
``max |h_t - f(h_{t-1}, u_t)|`` after each. "needed" is the first iteration whose
residual meets the default tolerance (NewtonConfig: 1e-6 for float32). bfloat16
means bf16 inputs, weights and gates solved the way the layers solve them: in
float32 arithmetic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from pararnn_bench.report import Report, new_figure


@dataclass
class Preset:
    steps: tuple[int, ...]
    batch: int
    size: int
    iterations: int
    train_steps: int
    train_length: int


PRESETS = {
    "quick": Preset(steps=(256, 4096), batch=2, size=128, iterations=8, train_steps=40, train_length=128),
    "full": Preset(steps=tuple(2**k for k in range(8, 16, 2)) + (2**15,), batch=4, size=256, iterations=10,
                   train_steps=300, train_length=512),
    "tiny": Preset(steps=(16, 64), batch=1, size=8, iterations=4, train_steps=2, train_length=16),
}
DTYPES = ("float32", "bfloat16")


def _train(layer, preset: Preset):
    """A few Adam steps on a synthetic target, so the weights are no longer their initialisation."""
    import torch

    torch.manual_seed(2)
    optimiser = torch.optim.Adam(layer.parameters(), lr=3e-3)
    for _ in range(preset.train_steps):
        x = torch.randn(8, preset.train_length, layer.input_size)
        target = torch.zeros_like(x)
        running = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            running = 0.9 * running + 0.1 * x[:, t]
            target[:, t] = running
        loss = (layer(x) - target[..., : layer.hidden_size]).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return layer


def residuals(layer, x, iterations: int) -> list[float]:
    """Residual after each of ``iterations`` Newton steps (iteration 0: the initial guess)."""
    import torch

    from pararnn_core.newton import NewtonConfig, newton_solve
    from pararnn_torch.ops import ops

    with torch.no_grad():
        u = layer.project(x).float()
        gates, params = list(u.unbind(2)), list(layer.recurrent.float().unbind(0))
        config = NewtonConfig(max_its=iterations, tol=1e-30, on_failure="warn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, info = newton_solve(layer.cell, ops, gates, params, None, None, config)
    return info.residuals


def run(args, report: Report) -> int:
    import torch

    from pararnn_core.newton import NewtonConfig
    from pararnn_torch import ParaGRU, ParaLSTM

    preset = PRESETS[args.preset]
    tolerance = NewtonConfig().tolerance(4)
    rows = []
    for cell in args.cells:
        torch.manual_seed(0)
        cls = {"gru": ParaGRU, "lstm": ParaLSTM}[cell]
        random_layer = cls(preset.size, preset.size, mode="parallel")
        report.console.print(f"[dim]training a Para{cell.upper()} for {preset.train_steps} steps ...[/dim]")
        trained_layer = _train(cls(preset.size, preset.size, mode="auto"), preset)
        for weights, layer in (("random", random_layer), ("trained", trained_layer)):
            for dtype in DTYPES:
                low = layer.to(getattr(torch, dtype))
                for steps in preset.steps:
                    report.console.print(f"[dim]{cell} {weights} {dtype} T={steps} ...[/dim]")
                    torch.manual_seed(steps)
                    x = torch.randn(preset.batch, steps, preset.size).to(getattr(torch, dtype))
                    curve = residuals(low, x, preset.iterations)
                    needed = next((i for i, r in enumerate(curve) if r <= tolerance), None)
                    rows.append({"cell": cell, "weights": weights, "dtype": dtype, "steps": steps,
                                 "residuals": curve, "iterations_needed": needed})
                layer.to(torch.float32)
    report.record("tolerance", tolerance)
    report.record("runs", rows)
    its = preset.iterations
    report.table(f"Newton residual max|h - f(h_prev)| per iteration (B={preset.batch}, N={preset.size}); "
                 f"needed: first <= {tolerance:g}",
                 ["cell weights dtype", "T", *(str(i) for i in range(its + 1)), "needed"],
                 [[f"{r['cell']} {r['weights']} {r['dtype']}", r["steps"], *r["residuals"],
                   r["iterations_needed"] if r["iterations_needed"] is not None else f"> {its}"] for r in rows])
    fig, axes = new_figure(1, len(args.cells), f"Newton residual vs iteration (B={preset.batch}, N={preset.size})")
    for col, cell in enumerate(args.cells):
        ax = axes[0][col]
        for r in (r for r in rows if r["cell"] == cell):
            style = "-" if r["weights"] == "random" else "--"
            ax.semilogy(range(len(r["residuals"])), [max(v, 1e-12) for v in r["residuals"]], style, marker=".",
                        label=f"{r['weights']} {r['dtype']} T={r['steps']}")
        ax.axhline(tolerance, color="k", lw=0.6)
        ax.set_title(f"Para{cell.upper()}", fontsize=9)
        ax.set_xlabel("Newton iteration")
        ax.set_ylabel("residual")
        ax.legend(fontsize=6)
    fig.tight_layout()
    report.plot("newton", fig)
    return 0
